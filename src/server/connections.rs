//! The server's connections (hyper-util): a client must send its headers
//! within `header_read_timeout`, a connection that carries nothing for
//! `idle_timeout` is closed, and at most `max_connections` are served at
//! once — a trickle of slow or idle connections cannot hold the server. On
//! stop, new connections are refused and those in flight finish.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::ServerSettings;

/// How long connections in flight get to finish once a stop is asked for.
const DRAIN: Duration = Duration::from_secs(30);

pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: &ServerSettings,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    // HTTP/1 only: HTTP/2 without TLS (what would reach this port) has no
    // header read timeout, and its PINGs would keep an idle connection alive.
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    let per_client = Arc::new(PerClient::new(settings));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = settings.max_connections, "too many connections; closing a new one");
            continue;
        };
        let Some(client_slot) = per_client.take(peer.ip()) else {
            tracing::warn!(%peer, max = settings.max_connections_per_client, "too many connections from one client; closing a new one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let io = TokioIo::new(Watched {
            inner: stream,
            activity: activity.clone(),
        });
        let router = router.clone();
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                router.clone().oneshot(request)
            },
        );
        let connection = graceful.watch(
            builder
                .serve_connection_with_upgrades(io, service)
                .into_owned(),
        );
        let idle = settings.idle_timeout;
        tokio::spawn(async move {
            until_idle(connection, activity, idle, peer).await;
            drop(client_slot);
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN) => {
            tracing::warn!(drain = ?DRAIN, "connections still open after the drain period; closing them");
        }
    }
    Ok(())
}

/// Serves `connection` until it ends, or carries nothing for `idle`.
async fn until_idle<E: std::fmt::Display>(
    connection: impl std::future::Future<Output = Result<(), E>>,
    activity: Activity,
    idle: Duration,
    peer: std::net::SocketAddr,
) {
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        }
        _ = activity.idle_for(idle) => {
            tracing::debug!(%peer, ?idle, "closing an idle connection");
        }
    }
}

/// Connections per client address (an IPv6 client by its /64), so that one
/// client cannot take the whole cap. Trusted proxies are exempt: every
/// customer behind them arrives from their addresses.
struct PerClient {
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    max: usize,
    trusted: Vec<ipnet::IpNet>,
}

/// A connection counted against its client until it ends.
struct ClientSlot {
    clients: Option<(Arc<PerClient>, std::net::IpAddr)>,
}

impl PerClient {
    fn new(settings: &ServerSettings) -> Self {
        Self {
            open: Default::default(),
            max: settings.max_connections_per_client.max(1),
            trusted: settings.trusted_proxies.clone(),
        }
    }

    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<ClientSlot> {
        if self.trusted.iter().any(|net| net.contains(&ip)) {
            return Some(ClientSlot { clients: None });
        }
        let key = super::limits::client_key(ip);
        let mut open = self.open.lock().unwrap();
        let count = open.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            clients: Some((self.clone(), key)),
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Some((clients, key)) = self.clients.take() {
            let mut open = clients.open.lock().unwrap();
            if let Some(count) = open.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    open.remove(&key);
                }
            }
        }
    }
}

/// When a connection last moved a byte, in milliseconds since `start`.
#[derive(Clone)]
struct Activity {
    start: Instant,
    last: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// A TCP stream that records when bytes move.
struct Watched {
    inner: tokio::net::TcpStream,
    activity: Activity,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
