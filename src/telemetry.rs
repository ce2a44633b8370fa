//! The metrics and probe endpoint of the controller container, and the
//! process-wide shutdown signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// The listener of the metrics endpoint, bound before anything starts: a
/// taken port stops the start at once, naming the address.
pub async fn bind(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {address} for metrics: {e}"))
}

/// Serves `GET /metrics` (Prometheus text format), `/healthz` and `/readyz`
/// (200 once `ready` is set) on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move { metrics_response(&registry) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await?;
    Ok(())
}

/// The registry in the OpenMetrics text format, as a `GET /metrics` answer (both containers).
pub(crate) fn metrics_response(registry: &Registry) -> axum::response::Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// A token cancelled on SIGTERM or Ctrl-C.
pub fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate => {}
        }
        // First: nothing that follows (a log line to a closed pipe) may keep
        // the process from stopping.
        trigger.cancel();
        tracing::info!("shutting down");
    });
    token
}

/// The innermost cause of `error` (e.g. "Connection refused (os error
/// 111)" beneath a client library's wrappers), for a message that names
/// the target itself.
pub(crate) fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// An error and its causes on one line, without repeating a cause that a
/// library already folded into the message above it.
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = said(error);
    let mut source = error.source();
    while let Some(cause) = source {
        let message = said(cause);
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

/// One error's own words. Postgres's are its message and hint, without the
/// line of Postgres's C source that sqlx appends ("… at line 948").
fn said(error: &(dyn std::error::Error + 'static)) -> String {
    let postgres = |db: &sqlx::postgres::PgDatabaseError| match db.hint() {
        Some(hint) => format!("{} (hint: {hint})", db.message()),
        None => db.message().to_owned(),
    };
    if let Some(sqlx::Error::Database(db)) = error.downcast_ref::<sqlx::Error>() {
        return match db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
            Some(db) => format!("the database answered: {}", postgres(db)),
            None => format!("the database answered: {}", db.message()),
        };
    }
    // The same Postgres error reached through another wrapper.
    let text = error.to_string();
    match text.rsplit_once(" at line ") {
        Some((message, line)) if !line.is_empty() && line.chars().all(|c| c.is_ascii_digit()) => {
            message.to_owned()
        }
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_chain_reads_as_one_line_without_repeats() {
        let inner = std::io::Error::other("connection refused");
        let outer = anyhow::Error::new(inner).context("cannot reach NATS at nats://a:4222");
        assert_eq!(
            super::describe(outer.as_ref()),
            "cannot reach NATS at nats://a:4222: connection refused"
        );
    }
}
