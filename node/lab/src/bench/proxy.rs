//! A byte-counting TCP proxy on loopback: the benchmarks put one between
//! two peers so that every engine's traffic is measured the same way, as
//! the bytes its connections carry (payload of TCP, after framing and
//! encryption, before IP).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Totals of a [`ByteProxy`], both directions and connections accepted.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes from the connecting side to the target.
    pub to_target: AtomicU64,
    /// Bytes from the target to the connecting side.
    pub from_target: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
}

impl Counters {
    /// Bytes in both directions.
    pub fn total(&self) -> u64 {
        self.to_target.load(Ordering::Relaxed) + self.from_target.load(Ordering::Relaxed)
    }
}

/// Forwards every connection to its listen address on to `target`,
/// counting bytes. Stops accepting when dropped.
pub struct ByteProxy {
    /// Where to connect instead of the target.
    pub addr: SocketAddr,
    /// Running totals.
    pub counters: Arc<Counters>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for ByteProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl ByteProxy {
    /// Listens on an ephemeral loopback port, forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let shared = counters.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                shared.connections.fetch_add(1, Ordering::Relaxed);
                let counters = shared.clone();
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        forward(inbound, outbound, &counters).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            counters,
            accept,
        })
    }
}

async fn forward(inbound: TcpStream, outbound: TcpStream, counters: &Counters) {
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    tokio::join!(
        copy(in_read, out_write, &counters.to_target),
        copy(out_read, in_write, &counters.from_target),
    );
}

/// Copies until end of stream or an error, counting, then shuts the
/// writing side so the other end sees the close.
async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    count: &AtomicU64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                count.fetch_add(n as u64, Ordering::Relaxed);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_what_it_forwards_both_ways() -> Result<()> {
        let echo = TcpListener::bind("127.0.0.1:0").await?;
        let target = echo.local_addr()?;
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await?;
            let mut buf = [0u8; 1000];
            s.read_exact(&mut buf).await?;
            s.write_all(&buf[..300]).await?;
            Ok::<_, std::io::Error>(())
        });
        let proxy = ByteProxy::start(target).await?;
        let mut client = TcpStream::connect(proxy.addr).await?;
        client.write_all(&[7u8; 1000]).await?;
        let mut back = [0u8; 300];
        client.read_exact(&mut back).await?;
        assert_eq!(back, [7u8; 300]);
        assert_eq!(proxy.counters.to_target.load(Ordering::Relaxed), 1000);
        assert_eq!(proxy.counters.from_target.load(Ordering::Relaxed), 300);
        assert_eq!(proxy.counters.connections.load(Ordering::Relaxed), 1);
        Ok(())
    }
}
