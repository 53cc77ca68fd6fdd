//! The request-response codec for direct messages between nodes.
//!
//! A request is one replication envelope (already CBOR, encoded by the
//! engine's `wire` module) behind a 4-byte big-endian length; the response is
//! a single byte saying whether the receiver accepted it. A frame longer than
//! [`MAX_FRAME_BYTES`](causeway_engine::replication::wire::MAX_FRAME_BYTES)
//! is refused before it is read, so a peer cannot make this node buffer more.

use std::io;

use causeway_engine::replication::wire::MAX_FRAME_BYTES;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::request_response;
use libp2p::StreamProtocol;

/// The receiver's answer to a direct message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// Handed to the replication core, which accepted it.
    Accepted,
    /// Refused by the replication core (the sender misbehaved or speaks
    /// another version); nothing was stored.
    Refused,
}

/// A frame's buffer starts at most this large and grows as its bytes
/// arrive.
pub const FRAME_READ_CHUNK: usize = 64 << 10;

/// Length-prefixed frames of at most `MAX_FRAME_BYTES` bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameCodec;

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Receipt;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {len} bytes exceeds the limit of {MAX_FRAME_BYTES}"),
            ));
        }
        // Memory grows with the bytes that arrive, not with the length a
        // peer declares: a peer that announces 10 MiB frames on every
        // stream and sends nothing holds no memory for them.
        let mut frame = Vec::with_capacity(len.min(FRAME_READ_CHUNK));
        io.take(len as u64).read_to_end(&mut frame).await?;
        if frame.len() != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("frame of {len} bytes ended after {}", frame.len()),
            ));
        }
        Ok(frame)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Receipt>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut byte = [0u8; 1];
        io.read_exact(&mut byte).await?;
        match byte[0] {
            0 => Ok(Receipt::Accepted),
            1 => Ok(Receipt::Refused),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown receipt byte {other}"),
            )),
        }
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        frame: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let len = u32::try_from(frame.len())
            .ok()
            .filter(|&n| n as usize <= MAX_FRAME_BYTES)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "frame exceeds the limit")
            })?;
        io.write_all(&len.to_be_bytes()).await?;
        io.write_all(&frame).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        receipt: Receipt,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let byte = match receipt {
            Receipt::Accepted => 0u8,
            Receipt::Refused => 1u8,
        };
        io.write_all(&[byte]).await?;
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::request_response::Codec;

    fn protocol() -> StreamProtocol {
        StreamProtocol::new("/causeway/test/sync/1")
    }

    #[test]
    fn a_frame_round_trips() -> io::Result<()> {
        futures::executor::block_on(async {
            let mut buf = Vec::new();
            let mut codec = FrameCodec;
            codec
                .write_request(
                    &protocol(),
                    &mut futures::io::Cursor::new(&mut buf),
                    vec![7; 300],
                )
                .await?;
            assert_eq!(buf.len(), 304);
            let read = codec
                .read_request(&protocol(), &mut futures::io::Cursor::new(&buf))
                .await?;
            assert_eq!(read, vec![7; 300]);
            Ok(())
        })
    }

    #[test]
    fn a_frame_larger_than_the_first_buffer_round_trips() -> io::Result<()> {
        futures::executor::block_on(async {
            let frame: Vec<u8> = (0..3 * FRAME_READ_CHUNK + 5).map(|i| i as u8).collect();
            let mut buf = Vec::new();
            FrameCodec
                .write_request(
                    &protocol(),
                    &mut futures::io::Cursor::new(&mut buf),
                    frame.clone(),
                )
                .await?;
            let read = FrameCodec
                .read_request(&protocol(), &mut futures::io::Cursor::new(&buf))
                .await?;
            assert_eq!(read, frame);
            Ok(())
        })
    }

    #[test]
    fn an_oversized_frame_is_refused_before_it_is_read() {
        futures::executor::block_on(async {
            let len = (MAX_FRAME_BYTES as u32 + 1).to_be_bytes();
            let err = FrameCodec
                .read_request(&protocol(), &mut futures::io::Cursor::new(&len[..]))
                .await
                .err();
            assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::InvalidData));
        });
    }

    #[test]
    fn a_truncated_frame_is_an_error() {
        futures::executor::block_on(async {
            let mut bytes = 10u32.to_be_bytes().to_vec();
            bytes.extend([1, 2, 3]);
            let err = FrameCodec
                .read_request(&protocol(), &mut futures::io::Cursor::new(&bytes))
                .await
                .err();
            assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::UnexpectedEof));
        });
    }
}
