//! The audit events read back from JetStream: `voucher-operator events`
//! (and the dev stack's smoke check) follow the stream the relay writes.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::relay::{NatsAuth, connect_options, server_addresses, subject};

/// What `voucher-operator events` shows.
#[derive(Clone, Debug, Default)]
pub struct EventQuery {
    pub code: Option<String>,
    pub kind: Option<String>,
    pub since: Option<Duration>,
    pub follow: bool,
}

/// The subject filters of a query: one code, one kind, or both — each in
/// both forms, a Sovereign's own code's and a global code's (whose events a
/// hub gathers from every Sovereign).
pub(crate) fn filter_subjects(prefix: &str, query: &EventQuery) -> Vec<String> {
    if query.code.is_none() && query.kind.is_none() {
        return vec![format!("{prefix}.>")];
    }
    let code = query
        .code
        .as_deref()
        .map(crate::domain::code::normalize)
        .unwrap_or_else(|| "*".into());
    let kind = query.kind.as_deref().unwrap_or("*");
    vec![
        subject(prefix, &code, kind),
        crate::relay::global_subject(prefix, &code, kind),
    ]
}

/// Where `follow_events` hands the events.
pub trait EventSink {
    /// One event, in stream order.
    fn event(&mut self, event: &Value) -> std::io::Result<()>;
    /// Every event stored when the query began has been handed over (later
    /// ones, with `follow`, come as they arrive).
    fn caught_up(&mut self) -> std::io::Result<()>;
}

/// Streams the events that match `query` from an ephemeral ordered consumer
/// to `sink`, oldest first; without `follow` it stops when caught up.
pub async fn follow_events(
    nats_url: &str,
    auth: &NatsAuth,
    stream_name: &str,
    prefix: &str,
    query: &EventQuery,
    sink: &mut impl EventSink,
) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};

    let client = connect_options(auth)
        .await?
        .connect(server_addresses(nats_url)?)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to NATS at {nats_url}: {e}"))?;
    let js = jetstream::new(client);
    let mut stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| anyhow::anyhow!("no audit stream {stream_name}: {e}"))?;
    let stored = stream.info().await?.state.messages;
    if stored == 0 {
        sink.caught_up()?;
        if !query.follow {
            return Ok(());
        }
    }
    let deliver_policy = match query.since {
        Some(since) => DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::now_utc() - since,
        },
        None => DeliverPolicy::All,
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subjects: filter_subjects(prefix, query),
            deliver_policy,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut caught_up = stored == 0;
    loop {
        let next = if caught_up {
            messages.next().await
        } else {
            // Caught up when nothing more arrives shortly after the last one
            // (a filter may match nothing at all).
            match tokio::time::timeout(Duration::from_millis(500), messages.next()).await {
                Ok(next) => next,
                Err(_) => {
                    sink.caught_up()?;
                    if !query.follow {
                        return Ok(());
                    }
                    caught_up = true;
                    continue;
                }
            }
        };
        let Some(message) = next else { return Ok(()) };
        let message = message?;
        let event: Value = serde_json::from_slice(&message.payload).unwrap_or_else(
            |_| json!({"error": "not a JSON event", "subject": message.subject.as_str()}),
        );
        sink.event(&event)?;
        if !caught_up && message.info().is_ok_and(|info| info.pending == 0) {
            sink.caught_up()?;
            if !query.follow {
                return Ok(());
            }
            caught_up = true;
        }
    }
}
