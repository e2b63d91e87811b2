//! Bounded listeners: at most `server.max_connections` connections per listener (the next is
//! accepted when one closes), a deadline for a new connection to say what it wants (the HTTP
//! request headers, `server.header_read_timeout`; the HTTP/2 preface on the gRPC port,
//! `server.handshake_timeout`), and a backoff instead of a spinning loop when accepting fails
//! (`EMFILE`: out of file descriptors). Before, 200 connections that never finished their
//! headers were held forever, and at a 256-file limit both listeners spun at 100 % CPU.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::telemetry::Metrics;
use crate::tls::{Alpn, Tls};

#[cfg(test)]
mod tests;

/// What each listener allows.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// How long an HTTP client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// How long a gRPC client may take to send the HTTP/2 preface and its first frame.
    pub handshake_timeout: Duration,
    /// How long shutdown waits for open connections to finish their requests.
    pub shutdown_timeout: Duration,
}

/// Accepts connections within the limits: a permit per connection, and a growing pause after
/// an accept error that is about resources (no descriptors, no memory) rather than about the
/// one connection.
#[derive(Debug)]
struct Acceptor {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    pause: Duration,
}

impl Acceptor {
    fn new(listener: TcpListener, limits: &ConnectionLimits, metrics: Arc<Metrics>) -> Acceptor {
        Acceptor {
            listener,
            permits: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            metrics,
            pause: Duration::ZERO,
        }
    }

    /// The next connection with its permit; `None` once the permits are closed.
    async fn accept(&mut self) -> Option<(TcpStream, OwnedSemaphorePermit)> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // At the cap: wait for a connection to close; the kernel's backlog holds the rest.
                self.metrics.limit_hit("server.max_connections");
                self.permits.clone().acquire_owned().await.ok()?
            }
        };
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    self.pause = Duration::ZERO;
                    let _ = stream.set_nodelay(true);
                    return Some((stream, permit));
                }
                Err(e) if is_resource_error(&e) => {
                    self.metrics.limit_hit("open_files");
                    self.pause = (self.pause * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    tracing::warn!(error = %e, pause = ?self.pause, "cannot accept a connection; pausing");
                    tokio::time::sleep(self.pause).await;
                }
                // A connection that failed before it was accepted: the next one may do.
                Err(_) => {}
            }
        }
    }

    /// Waits until every connection has closed, at most `timeout`.
    async fn drain(&self, max: usize, timeout: Duration) {
        let all = u32::try_from(max.max(1)).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(timeout, self.permits.acquire_many(all)).await;
    }
}

/// Errors of `accept` that say the process or system is out of something.
fn is_resource_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Serves `router` over HTTP/1.1 on `listener` (inside TLS when `tls` is given) within
/// `limits` until `stop` turns true; then lets open connections finish their requests (at most
/// `limits.shutdown_timeout`).
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    tls: Option<Arc<Tls>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut acceptor = Acceptor::new(listener, &limits, metrics.clone());
    loop {
        let accepted = tokio::select! {
            a = acceptor.accept() => a,
            _ = stop.wait_for(|&s| s) => None,
        };
        let Some((stream, permit)) = accepted else { break };
        let service = TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        let tls = tls.as_ref().map(|t| t.acceptor(Alpn::Http1));
        let metrics = metrics.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, service, limits, stop).await,
                Some(tls) => {
                    // The handshake within the same deadline as the request's headers.
                    match tokio::time::timeout(limits.header_read_timeout, tls.accept(stream)).await {
                        Ok(Ok(stream)) => serve_connection(stream, service, limits, stop).await,
                        Ok(Err(e)) => handshake_failed(&metrics, &e.to_string()),
                        Err(_) => {
                            handshake_failed(&metrics, "no TLS handshake within server.header_read_timeout")
                        }
                    }
                }
            }
            drop(permit);
        });
    }
    acceptor.drain(limits.max_connections, limits.shutdown_timeout).await;
}

/// A TLS handshake that failed: counted and logged (the peer's words, never a secret).
fn handshake_failed(metrics: &Metrics, why: &str) {
    metrics.tls_handshake_failures.inc();
    tracing::debug!(error = why, "TLS handshake failed");
}

/// One HTTP/1.1 connection, until it closes or the server stops.
async fn serve_connection<I>(
    io: I,
    service: TowerToHyperService<Router>,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let stopped = async move {
        let _ = stop.wait_for(|&s| s).await;
    };
    tokio::select! {
        _ = conn.as_mut() => {}
        () = stopped => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// The connections of the gRPC listener, within `limits`: each holds its permit while open, and
/// must deliver the HTTP/2 preface within `limits.handshake_timeout`; with `tls`, each is
/// decrypted first, its TLS handshake done in a task of its own within the same deadline, so a
/// slow handshake never holds up the next connection.
pub fn grpc_incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    tls: Option<Arc<Tls>>,
) -> futures::stream::BoxStream<'static, io::Result<Limited>> {
    let mut acceptor = Acceptor::new(listener, &limits, metrics.clone());
    let Some(tls) = tls else {
        return Box::pin(futures::stream::unfold(acceptor, move |mut acceptor| async move {
            let (stream, permit) = acceptor.accept().await?;
            Some((Ok(Limited::new(Stream::Plain(stream), permit, limits.handshake_timeout)), acceptor))
        }));
    };
    // Established connections wait here for the server to take them; at most one per permit.
    let (tx, rx) = tokio::sync::mpsc::channel(limits.max_connections.max(1));
    tokio::spawn(async move {
        while let Some((stream, permit)) = acceptor.accept().await {
            let (conns, tls, metrics) = (tx.clone(), tls.acceptor(Alpn::H2), metrics.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(limits.handshake_timeout, tls.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let conn =
                            Limited::new(Stream::Tls(Box::new(stream)), permit, limits.handshake_timeout);
                        let _ = conns.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => handshake_failed(&metrics, &e.to_string()),
                    Err(_) => handshake_failed(&metrics, "no TLS handshake within server.handshake_timeout"),
                }
            });
            if tx.is_closed() {
                break;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A gRPC connection's transport: TCP, or TLS over TCP.
#[derive(Debug)]
pub enum Stream {
    /// Plaintext.
    Plain(TcpStream),
    /// Decrypted.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The HTTP/2 client preface (24 bytes) and the header of the SETTINGS frame that must follow.
const PREFACE_BYTES: usize = 24 + 9;

/// A connection that holds a listener permit while open, and fails if its first
/// [`PREFACE_BYTES`] do not arrive before a deadline.
#[derive(Debug)]
pub struct Limited {
    inner: Stream,
    _permit: OwnedSemaphorePermit,
    /// Until the preface is in: the deadline and the bytes read so far.
    handshake: Option<(Pin<Box<Sleep>>, usize)>,
}

impl Limited {
    fn new(inner: Stream, permit: OwnedSemaphorePermit, timeout: Duration) -> Limited {
        Limited { inner, _permit: permit, handshake: Some((Box::pin(tokio::time::sleep(timeout)), 0)) }
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some((deadline, _)) = &mut this.handshake {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within server.handshake_timeout",
                )));
            }
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some((_, got))) = (&read, &mut this.handshake) {
            *got += buf.filled().len() - before;
            if *got >= PREFACE_BYTES {
                this.handshake = None;
            }
        }
        read
    }
}

impl AsyncWrite for Limited {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Limited {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.tcp().connect_info()
    }
}
