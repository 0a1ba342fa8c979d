//! A TCP relay on loopback in front of a server: delaying and bandwidth-limited when asked
//! (the public route through an uplink), counting what it carries, and stoppable (a LAN
//! server that goes away) and startable again on the same address (it comes back).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// How the relay shapes traffic.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape {
    /// Added before each chunk is passed on (a round trip's share of latency).
    pub delay: Duration,
    /// Bytes per second each way, when limited.
    pub bytes_per_second: Option<u64>,
}

/// What the relay has carried.
#[derive(Debug, Default)]
pub struct Carried {
    /// Connections accepted.
    pub connections: AtomicUsize,
    /// Bytes from clients to the server.
    pub bytes_up: AtomicU64,
}

/// A running relay; dropping or stopping it closes its port and every connection.
pub struct Relay {
    pub addr: SocketAddr,
    pub carried: Arc<Carried>,
    target: SocketAddr,
    shape: Shape,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    /// A relay on 127.0.0.1:0 to `target`.
    pub async fn start(target: SocketAddr, shape: Shape) -> Relay {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into(), target, shape).await
    }

    /// A relay on `ip` (a local address), port 0, to `target`.
    pub async fn start_on(ip: std::net::IpAddr, target: SocketAddr, shape: Shape) -> Relay {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        Self::serve(listener, target, shape, Arc::default())
    }

    fn serve(
        listener: TcpListener,
        target: SocketAddr,
        shape: Shape,
        carried: Arc<Carried>,
    ) -> Relay {
        let addr = listener.local_addr().unwrap();
        let counts = carried.clone();
        let task = tokio::spawn(async move {
            // Dropped with the task: every connection closes with the port.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                counts.connections.fetch_add(1, Ordering::SeqCst);
                let counts = counts.clone();
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up = pass(client_read, server_write, shape, Some(&counts.bytes_up));
                    let down = pass(server_read, client_write, shape, None);
                    tokio::join!(up, down);
                });
            }
        });
        Relay {
            addr,
            carried,
            target,
            shape,
            task: Some(task),
        }
    }

    /// Closes the port and every connection through it, and returns once they are closed:
    /// the server is gone from here.
    pub async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Opens the same port again (after [`Relay::stop`]): the server is back.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = TcpListener::bind(self.addr)
            .await
            .unwrap_or_else(|err| panic!("cannot bind {} again: {err}", self.addr));
        let mut again = Self::serve(listener, self.target, self.shape, self.carried.clone());
        self.task = again.task.take();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Copies one way until either side ends, shaping and counting.
async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shape: Shape,
    count: Option<&AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !shape.delay.is_zero() {
            tokio::time::sleep(shape.delay).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if let Some(count) = count {
            count.fetch_add(n as u64, Ordering::SeqCst);
        }
        if let Some(rate) = shape.bytes_per_second {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
    }
    let _ = to.shutdown().await;
}
