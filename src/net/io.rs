//! A connection's socket as every layer above sees it (TLS, HTTP, the WebSocket after an
//! upgrade): it holds the connection's slot in the limits for as long as the socket lives, and it
//! fails with `TimedOut` once no byte moved in either direction for the idle timeout, so no
//! connection, upgraded or not, outlives it without traffic. Once the server shuts down, a
//! connection whose bytes stopped moving for [`STALLED_AT_SHUTDOWN`] fails the same way: a
//! client that does not read (an SSE stream stuck on a full socket) does not hold the shutdown.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::limits::ConnGuard;
use crate::metrics::Metrics;

/// How long a closed connection keeps reading (and discarding) what the client still sends, so
/// that the last frames (a close frame with its code) reach it before the kernel would answer
/// unread data with a reset that discards them (a lingering close, as web servers do).
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes discarded while lingering.
const LINGER_BYTES: usize = 1 << 20;
/// After the shutdown, how long a connection may go without moving a byte: what is still
/// flowing may finish (within the shutdown grace), what is stuck on its client ends.
pub const STALLED_AT_SHUTDOWN: Duration = Duration::from_secs(1);

/// A TCP stream with an idle deadline and its connection slot.
pub struct TimedIo {
    /// `None` once handed to the lingering close.
    inner: Option<TcpStream>,
    idle: Duration,
    last: Instant,
    sleep: Pin<Box<Sleep>>,
    expired: bool,
    metrics: Arc<Metrics>,
    slot: Option<ConnGuard>,
    shutdown: CancellationToken,
}

impl TimedIo {
    pub fn new(
        inner: TcpStream,
        idle: Duration,
        slot: ConnGuard,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        let last = Instant::now();
        TimedIo {
            inner: Some(inner),
            idle,
            last,
            sleep: Box::pin(tokio::time::sleep_until(last + idle)),
            expired: false,
            metrics,
            slot: Some(slot),
            shutdown,
        }
    }

    fn stream(&mut self) -> io::Result<&mut TcpStream> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "closed"))
    }

    /// Called when the socket has nothing: `Ready(error)` once the connection was idle too long
    /// (after the shutdown: stalled too long), else `Pending` with a wake-up at the deadline. The
    /// shutdown wakes up a waiting connection by the server's own polling of it (a graceful
    /// shutdown drives every open connection), so no waiter is kept here.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            let stopping = self.shutdown.is_cancelled();
            let deadline = self.last
                + if stopping {
                    self.idle.min(STALLED_AT_SHUTDOWN)
                } else {
                    self.idle
                };
            if self.expired || Instant::now() >= deadline {
                if !self.expired {
                    self.expired = true;
                    self.metrics
                        .security
                        .tcp_timeouts
                        .with_label_values(&[if stopping { "shutdown" } else { "idle" }])
                        .inc();
                }
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
            }
            if self.sleep.deadline() != deadline {
                self.sleep.as_mut().reset(deadline);
            }
            match self.sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => continue,
            }
        }
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let inner = me.stream()?;
        match Pin::new(inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                me.last = Instant::now();
                Poll::Ready(r)
            }
            Poll::Pending => me.poll_idle(cx).map(Err),
        }
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let inner = me.stream()?;
        match Pin::new(inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    me.last = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => me.poll_idle(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let inner = me.stream()?;
        match Pin::new(inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    me.last = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => me.poll_idle(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let inner = self.get_mut().stream()?;
        Pin::new(inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let inner = self.get_mut().stream()?;
        Pin::new(inner).poll_shutdown(cx)
    }
}

impl Drop for TimedIo {
    fn drop(&mut self) {
        let (Some(mut stream), Some(slot)) = (self.inner.take(), self.slot.take()) else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // FIN after what was written, then read until the client closes too (bounded in time and
        // bytes); the slot is held until then, so lingering sockets count against the limits
        rt.spawn(async move {
            use tokio::io::AsyncReadExt;
            let _slot = slot;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
            let mut buf = [0u8; 8192];
            let mut read = 0;
            let until = Instant::now() + LINGER;
            while read < LINGER_BYTES {
                match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => read += n,
                    _ => break,
                }
            }
        });
    }
}
