//! A TCP proxy between the Kafka clients and the broker, under the suite's control. The broker
//! advertises the proxy's address, so every connection a client opens (bootstrap and the broker
//! connections metadata names) goes through it.
//!
//! Modes: pass (forward at once), blackhole (accept and hold connections but forward nothing:
//! packets vanish, nothing is reset), delay (every chunk is forwarded a fixed time after it was
//! read, both ways, throughput kept). `cut` closes every open connection at once.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Blackhole,
    Delay(Duration),
}

pub struct Proxy {
    mode: watch::Sender<Mode>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    /// Listens on `listen` and forwards to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind(listen).await?;
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let c = conns.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let mode_rx = mode_rx.clone();
                let task = tokio::spawn(async move {
                    let _ = connection(client, upstream, mode_rx).await;
                });
                let mut all = c.lock().unwrap_or_else(|e| e.into_inner());
                all.retain(|h| !h.is_finished());
                all.push(task.abort_handle());
            }
        })
        .abort_handle();
        Ok(Proxy {
            mode,
            conns,
            accept,
        })
    }

    pub fn set(&self, m: Mode) {
        let _ = self.mode.send(m);
    }

    /// Closes every open connection (the clients see a reset and reconnect).
    pub fn cut(&self) -> usize {
        let mut all = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let n = all.iter().filter(|h| !h.is_finished()).count();
        for h in all.drain(..) {
            h.abort();
        }
        n
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn wait_not_blackhole(rx: &mut watch::Receiver<Mode>) {
    while *rx.borrow_and_update() == Mode::Blackhole {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
) -> std::io::Result<()> {
    // a connection opened during a blackhole goes nowhere until it ends
    wait_not_blackhole(&mut mode).await;
    let server = TcpStream::connect(upstream).await?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let a = pump(cr, sw, mode.clone());
    let b = pump(sr, cw, mode);
    tokio::select! {
        _ = a => {}
        _ = b => {}
    }
    Ok(())
}

/// One direction: a reader that stamps each chunk, a writer that sends it when its delay is over.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(256);
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at.into()).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            wait_not_blackhole(&mut mode).await;
            let n = tokio::select! {
                r = from.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                // a blackhole starts: stop reading at once
                _ = mode.changed() => continue,
            };
            let delay = match *mode.borrow() {
                Mode::Delay(d) => d,
                _ => Duration::ZERO,
            };
            // bytes read while the hole opened are held too
            wait_not_blackhole(&mut mode).await;
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
}
