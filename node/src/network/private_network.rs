//! The private-network handshake under the cluster key, accepting any of
//! several keys, so that a cluster can move to a new key without downtime.
//!
//! The wire format is libp2p's private networks (`libp2p-pnet`, IPFS's
//! `swarm.key`): each side sends a random 24-byte nonce, then everything it
//! sends is XSalsa20-encrypted under the key and its own nonce. No key is
//! named on the wire. A node dials under its own key. When accepting, it
//! sends its nonce, reads the dialer's nonce and the first 20 bytes after
//! it, which a libp2p dialer always fills with the multistream-select
//! header (`"\x13/multistream/1.0.0\n"`), and keeps the key among the ones
//! it accepts under which those bytes decrypt to that header. The
//! connection then goes on under that key in both directions. A dialer
//! holding none of them is refused before anything else is read.
//!
//! Rotation: every node accepts the new key besides its own (a rolling
//! restart), then dials under the new key and still accepts the old one (a
//! second), then drops the old one (a third). At every step any two nodes
//! share a key one dials under and the other accepts.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use salsa20::cipher::{KeyIvInit, StreamCipher};
use salsa20::XSalsa20;

use crate::cluster_key::ClusterKey;

/// Bytes of a nonce.
pub const NONCE_BYTES: usize = 24;
/// What a libp2p dialer sends first: multistream-select's header.
pub const MULTISTREAM_HEADER: &[u8; 20] = b"\x13/multistream/1.0.0\n";
/// Ciphertext encrypted at once by one write (larger writes are split).
const WRITE_CHUNK: usize = 64 << 10;

/// A connection encrypted under a cluster key.
pub struct PrivateStream<S> {
    inner: S,
    read_cipher: XSalsa20,
    write_cipher: XSalsa20,
    /// Plaintext read ahead while choosing the key, served first.
    read_ahead: Vec<u8>,
    read_at: usize,
    /// Ciphertext a write accepted that is not yet on the socket.
    pending: Vec<u8>,
}

/// Dials: the handshake under `key`.
pub async fn dial<S>(mut socket: S, key: &ClusterKey) -> io::Result<PrivateStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (local, remote) = exchange_nonces(&mut socket).await?;
    Ok(PrivateStream {
        inner: socket,
        read_cipher: cipher(key, &remote),
        write_cipher: cipher(key, &local),
        read_ahead: Vec::new(),
        read_at: 0,
        pending: Vec::new(),
    })
}

/// Sends a fresh nonce and reads the peer's: `(local, remote)`.
async fn exchange_nonces<S>(socket: &mut S) -> io::Result<([u8; NONCE_BYTES], [u8; NONCE_BYTES])>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let local = nonce()?;
    socket.write_all(&local).await?;
    socket.flush().await?;
    let mut remote = [0u8; NONCE_BYTES];
    socket.read_exact(&mut remote).await?;
    Ok((local, remote))
}

/// Accepts: the handshake under whichever of `keys` the dialer uses;
/// returns the stream and the index of that key.
pub async fn accept<S>(mut socket: S, keys: &[ClusterKey]) -> io::Result<(PrivateStream<S>, usize)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (local, remote) = exchange_nonces(&mut socket).await?;
    let mut first = [0u8; MULTISTREAM_HEADER.len()];
    socket.read_exact(&mut first).await?;
    for (i, key) in keys.iter().enumerate() {
        let mut read_cipher = cipher(key, &remote);
        let mut plain = first;
        read_cipher.apply_keystream(&mut plain);
        if &plain == MULTISTREAM_HEADER {
            let stream = PrivateStream {
                inner: socket,
                read_cipher,
                write_cipher: cipher(key, &local),
                read_ahead: plain.to_vec(),
                read_at: 0,
                pending: Vec::new(),
            };
            return Ok((stream, i));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        "the peer holds none of this node's cluster keys",
    ))
}

fn cipher(key: &ClusterKey, nonce: &[u8; NONCE_BYTES]) -> XSalsa20 {
    XSalsa20::new(&key.bytes().into(), nonce.into())
}

fn nonce() -> io::Result<[u8; NONCE_BYTES]> {
    use std::io::Read;
    let mut nonce = [0u8; NONCE_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut nonce)?;
    Ok(nonce)
}

impl<S: AsyncWrite + Unpin> PrivateStream<S> {
    /// Writes out the pending ciphertext.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.pending) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    self.pending.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrivateStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.read_at < this.read_ahead.len() {
            let n = buf.len().min(this.read_ahead.len() - this.read_at);
            buf[..n].copy_from_slice(&this.read_ahead[this.read_at..this.read_at + n]);
            this.read_at += n;
            if this.read_at == this.read_ahead.len() {
                this.read_ahead = Vec::new();
                this.read_at = 0;
            }
            return Poll::Ready(Ok(n));
        }
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = &read {
            this.read_cipher.apply_keystream(&mut buf[..*n]);
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrivateStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.poll_pending(cx)?.is_pending() {
            return Poll::Pending;
        }
        let n = buf.len().min(WRITE_CHUNK);
        let at = this.pending.len();
        this.pending.extend_from_slice(&buf[..n]);
        this.write_cipher.apply_keystream(&mut this.pending[at..]);
        // Accepted and encrypted: it goes out now if it can, else on the
        // next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.poll_pending(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.poll_pending(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_close(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use std::task::Waker;

    use futures::future::join;
    use libp2p::pnet::PnetConfig;

    use super::*;

    /// One direction of an in-memory pipe.
    #[derive(Default)]
    struct Buf {
        data: VecDeque<u8>,
        waker: Option<Waker>,
    }

    /// One end of an in-memory duplex pipe.
    struct End {
        read: Arc<Mutex<Buf>>,
        write: Arc<Mutex<Buf>>,
    }

    fn duplex() -> (End, End) {
        let (a, b) = (Arc::default(), Arc::default());
        (
            End {
                read: Arc::clone(&a),
                write: Arc::clone(&b),
            },
            End { read: b, write: a },
        )
    }

    impl AsyncRead for End {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let mut r = self.read.lock().unwrap();
            if r.data.is_empty() {
                r.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let n = buf.len().min(r.data.len());
            for (i, b) in r.data.drain(..n).enumerate() {
                buf[i] = b;
            }
            Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for End {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let mut w = self.write.lock().unwrap();
            // Short writes, to exercise the pending ciphertext.
            let n = buf.len().min(7);
            w.data.extend(&buf[..n]);
            if let Some(waker) = w.waker.take() {
                waker.wake();
            }
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn key() -> ClusterKey {
        ClusterKey::generate().unwrap()
    }

    /// What a libp2p dialer sends, then a message.
    fn opening(message: &[u8]) -> Vec<u8> {
        [MULTISTREAM_HEADER.as_slice(), message].concat()
    }

    #[test]
    fn a_libp2p_pnet_dialer_is_accepted_under_the_key_it_holds() {
        let (old, new) = (key(), key());
        let (dialer, listener) = duplex();
        let dialing = async {
            let mut s = PnetConfig::new(new.psk()).handshake(dialer).await.unwrap();
            s.write_all(&opening(b"hello")).await.unwrap();
            s.flush().await.unwrap();
            let mut answer = [0u8; 5];
            s.read_exact(&mut answer).await.unwrap();
            answer
        };
        let accepting = async {
            let (mut s, index) = accept(listener, &[old, new]).await.unwrap();
            let mut got = vec![0u8; MULTISTREAM_HEADER.len() + 5];
            s.read_exact(&mut got).await.unwrap();
            s.write_all(b"world").await.unwrap();
            s.flush().await.unwrap();
            (index, got)
        };
        let (answer, (index, got)) = futures::executor::block_on(join(dialing, accepting));
        assert_eq!(index, 1);
        assert_eq!(got, opening(b"hello"));
        assert_eq!(&answer, b"world");
    }

    #[test]
    fn a_dial_is_understood_by_a_libp2p_pnet_listener() {
        let k = key();
        let (dialer, listener) = duplex();
        let big: Vec<u8> = (0..3 * WRITE_CHUNK + 11).map(|i| (i % 251) as u8).collect();
        let dialing = async {
            let mut s = dial(dialer, &k).await.unwrap();
            s.write_all(&big).await.unwrap();
            s.flush().await.unwrap();
            let mut answer = [0u8; 2];
            s.read_exact(&mut answer).await.unwrap();
            answer
        };
        let accepting = async {
            let mut s = PnetConfig::new(k.psk()).handshake(listener).await.unwrap();
            let mut got = vec![0u8; big.len()];
            s.read_exact(&mut got).await.unwrap();
            s.write_all(b"ok").await.unwrap();
            s.flush().await.unwrap();
            got
        };
        let (answer, got) = futures::executor::block_on(join(dialing, accepting));
        assert_eq!(got, big);
        assert_eq!(&answer, b"ok");
    }

    #[test]
    fn a_dialer_holding_none_of_the_keys_is_refused() {
        let (k, other) = (key(), key());
        let (dialer, listener) = duplex();
        let dialing = async {
            let mut s = dial(dialer, &other).await.unwrap();
            s.write_all(&opening(b"let me in")).await.unwrap();
            s.flush().await.unwrap();
        };
        let (_, accepted) = futures::executor::block_on(join(dialing, accept(listener, &[k])));
        let err = accepted.err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }
}
