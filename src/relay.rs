//! The audit relay: publishes the outbox to NATS JetStream as CloudEvents,
//! in outbox order, each with `Nats-Msg-Id` = event id so that JetStream
//! drops a copy sent twice (after a crash between publish and mark, or by a
//! second relay) within its duplicate window. Runs on the leader only.

use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, stream};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use std::sync::atomic::AtomicU64;
use tokio_util::sync::CancellationToken;

use crate::domain::AuditKind;
use crate::store::Store;
use crate::store::notify::OUTBOX_CHANNEL;
use crate::store::outbox::{self, AuditRecord};
use crate::telemetry::describe;

/// How to authenticate to NATS and whether to insist on TLS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatsAuth {
    /// A credentials file (user JWT and NKey seed, as `nsc` writes it).
    pub creds_file: Option<std::path::PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// CA certificates (PEM) the server's certificate must chain to; implies TLS.
    pub tls_ca: Option<std::path::PathBuf>,
    pub tls_required: bool,
}

/// The options of every NATS connection the operator opens: a connect
/// timeout, and the credentials and TLS of `auth`.
pub async fn connect_options(auth: &NatsAuth) -> anyhow::Result<async_nats::ConnectOptions> {
    let mut options = match &auth.creds_file {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot read the NATS credentials file {}: {e}",
                    path.display()
                )
            })?,
        None => async_nats::ConnectOptions::new(),
    };
    if let Some(user) = &auth.user {
        let password = auth.password.clone().unwrap_or_default();
        options = options.user_and_password(user.clone(), password);
    }
    if let Some(ca) = &auth.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    Ok(options
        .require_tls(auth.tls_required || auth.tls_ca.is_some())
        .connection_timeout(Duration::from_secs(5)))
}

/// Where and how audit events are published. Its `Default` is what the
/// flags default to (`voucher-operator controller --help`).
#[derive(Clone, Debug, PartialEq)]
pub struct RelaySettings {
    pub nats_url: String,
    pub nats_auth: NatsAuth,
    pub stream: String,
    /// Subjects are `<prefix>.<CODE>.<kind>`.
    pub subject_prefix: String,
    /// The CloudEvents `source` attribute.
    pub source: String,
    pub storage: stream::StorageType,
    pub replicas: usize,
    pub max_age: Duration,
    /// Longer than the relay's retry horizon, so a re-sent event is dropped.
    pub duplicate_window: Duration,
    pub batch_size: i64,
    /// Fallback when a database notification is missed.
    pub poll_interval: Duration,
    /// Published records are deleted from the outbox after this long.
    pub retention: Duration,
    /// Bring an existing stream's settings to these. Off, an existing stream
    /// is used as it is (only warned about): its owner may keep history
    /// longer, and a smaller max age here would purge it.
    pub manage_stream: bool,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_auth: NatsAuth::default(),
            stream: "VOUCHER_AUDIT".into(),
            subject_prefix: "catalyst.vouchers".into(),
            source: "/catalyst/voucher-operator".into(),
            storage: stream::StorageType::File,
            replicas: 1,
            max_age: Duration::from_secs(90 * 24 * 3600),
            duplicate_window: Duration::from_secs(2 * 3600),
            batch_size: BATCH_SIZE,
            poll_interval: Duration::from_secs(5),
            retention: Duration::from_secs(7 * 24 * 3600),
            manage_stream: false,
        }
    }
}

/// Records read from the outbox and published per round.
pub(crate) const BATCH_SIZE: i64 = 256;

/// The subject of one event: a consumer can filter one code or one kind.
pub fn subject(prefix: &str, code: &str, kind: &str) -> String {
    format!("{prefix}.{code}.{kind}")
}

/// The subject of one event of a global (cross-Sovereign) code: under
/// `<prefix>.global`, which the vendor's hub sources from every Sovereign —
/// and nothing of a Sovereign's own codes. `global` is lower-case, which no
/// code is (codes are upper-cased), so the two forms never meet.
pub fn global_subject(prefix: &str, code: &str, kind: &str) -> String {
    format!("{prefix}.global.{code}.{kind}")
}

/// The subject `record` is published on.
fn subject_of(prefix: &str, record: &outbox::AuditRecord) -> String {
    match record.global {
        true => global_subject(prefix, &record.code, &record.kind),
        false => subject(prefix, &record.code, &record.kind),
    }
}

/// The stream, as configuration says it should be.
pub fn stream_config(settings: &RelaySettings) -> stream::Config {
    stream::Config {
        name: settings.stream.clone(),
        subjects: vec![format!("{}.>", settings.subject_prefix)],
        storage: settings.storage,
        num_replicas: settings.replicas,
        max_age: settings.max_age,
        duplicate_window: settings.duplicate_window,
        description: Some("voucher-operator audit events (CloudEvents 1.0, JSON)".into()),
        ..Default::default()
    }
}

/// Creates the stream when it is missing; an existing one is used as it is,
/// with a warning for each setting that differs from ours, unless the relay
/// is told to manage it. Returns the stream's message size limit (-1: none).
async fn prepare_stream(js: &jetstream::Context, settings: &RelaySettings) -> anyhow::Result<i32> {
    let wanted = stream_config(settings);
    if settings.manage_stream {
        let info = js.create_or_update_stream(wanted).await?;
        tracing::info!(stream = %settings.stream, "audit stream ready (managed)");
        return Ok(info.config.max_message_size);
    }
    let stream = js.get_or_create_stream(wanted.clone()).await?;
    let found = &stream.cached_info().config;
    for difference in stream_differences(found, &wanted) {
        tracing::warn!(stream = %settings.stream, %difference, "the audit stream's settings differ from the relay's; left as they are (--audit-manage-stream changes them)");
    }
    tracing::info!(stream = %settings.stream, "audit stream ready");
    Ok(found.max_message_size)
}

/// How an existing stream's settings differ from the wanted ones, said per setting.
pub fn stream_differences(found: &stream::Config, wanted: &stream::Config) -> Vec<String> {
    let mut differences = Vec::new();
    let mut differ = |what: &str, found: String, wanted: String| {
        if found != wanted {
            differences.push(format!("{what} is {found}, the relay's is {wanted}"));
        }
    };
    differ(
        "max_age",
        format!("{:?}", found.max_age),
        format!("{:?}", wanted.max_age),
    );
    differ(
        "storage",
        format!("{:?}", found.storage),
        format!("{:?}", wanted.storage),
    );
    differ(
        "replicas",
        found.num_replicas.to_string(),
        wanted.num_replicas.to_string(),
    );
    differ(
        "duplicate_window",
        format!("{:?}", found.duplicate_window),
        format!("{:?}", wanted.duplicate_window),
    );
    if !wanted.subjects.iter().all(|s| found.subjects.contains(s)) {
        differences.push(format!(
            "subjects are {:?} and do not include {:?}: publishing will fail",
            found.subjects, wanted.subjects
        ));
    }
    differences
}

/// The CloudEvents 1.0 structured-mode JSON envelope of a record.
pub fn envelope(record: &AuditRecord, source: &str) -> Value {
    let event_type = AuditKind::parse(&record.kind)
        .map(AuditKind::event_type)
        .unwrap_or_else(|| {
            format!(
                "{}.{}.v1",
                crate::domain::audit::EVENT_TYPE_PREFIX,
                record.kind
            )
        });
    json!({
        "specversion": "1.0",
        "id": record.event_id.to_string(),
        "source": source,
        "type": event_type,
        "subject": record.code,
        "time": record.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "datacontenttype": "application/json",
        "data": record.payload,
    })
}

pub struct RelayMetrics {
    pub backlog: Gauge,
    pub(crate) oldest_age_seconds: Gauge<f64, AtomicU64>,
    pub published: Counter,
    pub failures: Counter,
    pub truncated: Counter,
    pub(crate) dead_letters: Counter,
}

impl RelayMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            backlog: Gauge::default(),
            oldest_age_seconds: Gauge::default(),
            published: Counter::default(),
            failures: Counter::default(),
            truncated: Counter::default(),
            dead_letters: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("voucher_operator_audit");
        r.register(
            "outbox_backlog",
            "Audit records waiting to be published",
            metrics.backlog.clone(),
        );
        r.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest unpublished audit record",
            metrics.oldest_age_seconds.clone(),
        );
        r.register(
            "published",
            "Audit events acknowledged by JetStream",
            metrics.published.clone(),
        );
        r.register(
            "publish_failures",
            "Failed publish attempts",
            metrics.failures.clone(),
        );
        r.register(
            "truncated",
            "Events published with their free text shortened to fit NATS",
            metrics.truncated.clone(),
        );
        r.register(
            "dead_letters",
            "Audit records moved to voucher_audit_dead_letters: they cannot be published",
            metrics.dead_letters.clone(),
        );
        metrics
    }
}

/// Longest free text kept in an event that does not fit as it is.
const KEPT_CHARS: usize = 256;

/// The event's body within `limit` bytes: as it is, or with its free text
/// (descriptions before and after, the reason) shortened, marked
/// `data.truncated`; `None` when even that does not fit.
pub(crate) fn fit(mut envelope: Value, limit: usize) -> Option<(Vec<u8>, bool)> {
    let body = serde_json::to_vec(&envelope).ok()?;
    if body.len() <= limit {
        return Some((body, false));
    }
    let shorten = |value: &mut Value| {
        if let Some(text) = value.as_str()
            && text.chars().count() > KEPT_CHARS
        {
            let kept: String = text.chars().take(KEPT_CHARS).collect();
            let total = text.chars().count();
            *value = Value::String(format!("{kept}… [truncated from {total} characters]"));
        }
    };
    let data = &mut envelope["data"];
    for side in ["before", "after"] {
        if let Some(description) = data
            .get_mut(side)
            .and_then(|s| s.get_mut("terms"))
            .and_then(|t| t.get_mut("description"))
        {
            shorten(description);
        }
    }
    if let Some(reason) = data.get_mut("reason") {
        shorten(reason);
    }
    if let Some(data) = data.as_object_mut() {
        data.insert("truncated".into(), Value::Bool(true));
    }
    let body = serde_json::to_vec(&envelope).ok()?;
    (body.len() <= limit).then_some((body, true))
}

/// The largest event body sent: well under the server's `max_payload` and
/// the stream's own message size limit (headers travel in both).
fn event_limit(client: &async_nats::Client, stream_max: i32) -> usize {
    const MOST: usize = 64 * 1024;
    let server = client.server_info().max_payload;
    let stream = usize::try_from(stream_max)
        .ok()
        .filter(|m| *m > 0)
        .unwrap_or(usize::MAX);
    server.min(stream).saturating_sub(1024).clamp(1024, MOST)
}

/// Whether the stream refused this message for good: it is larger than the
/// stream allows. Every other refusal (a full stream, no leader, too few
/// resources) passes, so the record is retried, never set aside.
fn refused_by_stream(error: &async_nats::jetstream::context::PublishError) -> bool {
    use async_nats::jetstream::ErrorCode;
    error.kind() == PublishErrorKind::Other
        && std::error::Error::source(error)
            .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
            .is_some_and(|e| e.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)
}

/// Moves a record that can never be published to the dead letters, with why.
async fn set_aside(
    conn: &mut sqlx::PgConnection,
    metrics: &RelayMetrics,
    seq: i64,
    why: &str,
) -> anyhow::Result<()> {
    tracing::error!(seq, error = %why, "audit record refused for good; moved to the dead letters");
    outbox::dead_letter(conn, seq, why).await?;
    metrics.dead_letters.inc();
    Ok(())
}

/// What a round of publishing keeps from batch to batch.
#[derive(Default)]
struct Round {
    /// Codes with an event refused or lost this round: nothing more of
    /// theirs is sent (nor read) until the next round, so no later event of
    /// that code is ever stored ahead of it, while the other codes go on.
    blocked: std::collections::HashSet<String>,
    /// The first failure; the round ends with it once the others are done.
    failure: Option<anyhow::Error>,
    /// NATS itself failed (not sent, or no ack in time): nothing more is
    /// tried this round.
    stopped: bool,
}

/// Publishes the outbox: batches until nothing more can go this round.
async fn publish_round(
    store: &Store,
    js: &jetstream::Context,
    settings: &RelaySettings,
    metrics: &RelayMetrics,
    limit: usize,
) -> anyhow::Result<()> {
    let mut round = Round::default();
    while !round.stopped
        && publish_batch(store, js, settings, metrics, limit, &mut round).await? > 0
    {}
    match round.failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Whether an ack's failure is NATS's as a whole (the connection, the
/// stream, the server's time) rather than the stream refusing this message.
fn failed_for_all(error: &async_nats::jetstream::context::PublishError) -> bool {
    matches!(
        error.kind(),
        PublishErrorKind::TimedOut
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::StreamNotFound
            | PublishErrorKind::MaxAckPending
    )
}

/// Publishes one batch of the records not held back, pipelined: records are
/// sent without waiting for their acks, except that a record waits for the
/// ack of its code's previous one. A record that cannot fit is moved to the
/// dead letters. Returns how many records it read: none, when nothing more
/// can go this round (each batch moves records or holds back their codes,
/// which the next one does not read). The error is the database's.
async fn publish_batch(
    store: &Store,
    js: &jetstream::Context,
    settings: &RelaySettings,
    metrics: &RelayMetrics,
    limit: usize,
    round: &mut Round,
) -> anyhow::Result<usize> {
    let mut conn = store.pool().acquire().await?;
    let held: Vec<String> = round.blocked.iter().cloned().collect();
    let records = outbox::pending_except(&mut conn, settings.batch_size, &held).await?;
    if records.is_empty() {
        return Ok(0);
    }
    let mut batch = Acks::default();
    for record in &records {
        if batch.in_flight(&record.code) {
            // Its code's previous event must be stored first.
            batch.settle(&mut conn, metrics, round).await?;
        }
        if round.stopped {
            break;
        }
        if round.blocked.contains(&record.code) {
            continue;
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", record.event_id.to_string().as_str());
        headers.insert("Content-Type", "application/cloudevents+json");
        let Some((body, truncated)) = fit(envelope(record, &settings.source), limit) else {
            let why = format!("larger than {limit} bytes even with its free text shortened");
            set_aside(&mut conn, metrics, record.seq, &why).await?;
            continue;
        };
        if truncated {
            metrics.truncated.inc();
        }
        let subject = subject_of(&settings.subject_prefix, record);
        match js.publish_with_headers(subject, headers, body.into()).await {
            Ok(ack) => batch.pending.push((record.seq, record.code.clone(), ack)),
            Err(error) if error.kind() == PublishErrorKind::MaxPayloadExceeded => {
                set_aside(&mut conn, metrics, record.seq, &describe(&error)).await?;
            }
            // Not sent (the connection is gone): nothing more is.
            Err(error) => {
                round.failure.get_or_insert(anyhow::Error::from(error));
                round.stopped = true;
                break;
            }
        }
    }
    batch.settle(&mut conn, metrics, round).await?;
    if !batch.published.is_empty() {
        outbox::mark_published(&mut conn, &batch.published).await?;
        metrics.published.inc_by(batch.published.len() as u64);
    }
    Ok(records.len())
}

/// A batch's records sent and awaiting their acks, and what left the outbox.
#[derive(Default)]
struct Acks {
    pending: Vec<(
        i64,
        String,
        async_nats::jetstream::context::PublishAckFuture,
    )>,
    published: Vec<i64>,
}

impl Acks {
    fn in_flight(&self, code: &str) -> bool {
        self.pending.iter().any(|(_, c, _)| c == code)
    }

    /// Awaits every pending ack (the error is the database's).
    async fn settle(
        &mut self,
        conn: &mut sqlx::PgConnection,
        metrics: &RelayMetrics,
        round: &mut Round,
    ) -> anyhow::Result<()> {
        for (seq, code, ack) in std::mem::take(&mut self.pending) {
            if round.stopped {
                // NATS failed as a whole: the rest are not waited for (each
                // would wait out its own timeout); they are sent again next
                // round, and a copy already stored is dropped as a duplicate.
                break;
            }
            match ack.await {
                Ok(_) => self.published.push(seq),
                // The stream itself refuses this one (its size limit, say): it
                // would be refused again forever, so it is set aside and the
                // records after it go on.
                Err(error) if refused_by_stream(&error) => {
                    set_aside(conn, metrics, seq, &describe(&error)).await?;
                }
                // Retried next round, first of its code; a copy that was
                // stored after all is dropped by the duplicate window.
                Err(error) => {
                    tracing::debug!(seq, %code, error = %error, "audit event not acknowledged");
                    if failed_for_all(&error) {
                        round.stopped = true;
                    }
                    round.blocked.insert(code);
                    round.failure.get_or_insert(anyhow::Error::from(error));
                }
            }
        }
        Ok(())
    }
}

/// The servers of a comma-separated NATS URL list (`nats://a:4222,nats://b:4222`).
pub(crate) fn server_addresses(urls: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| anyhow::anyhow!("invalid NATS URL {u:?}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .and_then(|addresses| {
            anyhow::ensure!(!addresses.is_empty(), "no NATS URL given");
            Ok(addresses)
        })
}

/// Runs the relay until `stop` is cancelled: creates or updates the stream,
/// then publishes whenever the outbox grows (NOTIFY) or the poll interval
/// passes, backing off exponentially while NATS is unreachable.
pub async fn run(
    store: Store,
    settings: RelaySettings,
    metrics: std::sync::Arc<RelayMetrics>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let connect = connect_options(&settings.nats_auth)
        .await?
        .retry_on_initial_connect()
        .connect(server_addresses(&settings.nats_url)?);
    // The first connection is retried for as long as NATS is away: a stop
    // must not wait for it (a controller asked to stop while NATS is down
    // would otherwise never exit).
    let client = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        client = connect => client?,
    };
    let js = jetstream::new(client.clone());
    // Known once connected: the stream is prepared over the same connection.
    let mut limit = 0;
    let mut wake = Box::pin(store.listen(OUTBOX_CHANNEL));
    // While NATS (or the database) is down: 100 ms, 200 ms … at most 30 s, with jitter.
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times();
    let mut backoff = policy.build();
    let mut stream_ready = false;
    let mut last_prune = Instant::now() - Duration::from_secs(3600);
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        let work = async {
            if !stream_ready {
                let stream_max = prepare_stream(&js, &settings).await?;
                limit = event_limit(&client, stream_max);
                stream_ready = true;
            }
            publish_round(&store, &js, &settings, &metrics, limit).await?;
            if last_prune.elapsed() > Duration::from_secs(60) {
                let mut conn = store.pool().acquire().await?;
                outbox::prune(&mut conn, settings.retention).await?;
                last_prune = Instant::now();
            }
            Ok(())
        };
        // A round waits on NATS and Postgres; shutdown does not wait for it
        // (whatever was not marked published is sent again, and deduplicated).
        let round: anyhow::Result<()> = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            round = work => round,
        };
        record_backlog(&store, &metrics).await;
        match round {
            Ok(()) => {
                backoff = policy.build();
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = wake.next() => {}
                    _ = tokio::time::sleep(settings.poll_interval) => {}
                }
            }
            Err(error) => {
                // While NATS (or the database) is down, new records only wait.
                metrics.failures.inc();
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(error = %error, nats = %settings.nats_url, retry_in = ?delay,
                    "publishing audit events failed");
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Sets the backlog gauges from the outbox, when the database answers.
async fn record_backlog(store: &Store, metrics: &RelayMetrics) {
    if let Ok(mut conn) = store.pool().acquire().await
        && let Ok((count, age)) = outbox::backlog(&mut conn).await
    {
        metrics.backlog.set(count);
        metrics.oldest_age_seconds.set(age);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chart's alert rules read these names.
    #[test]
    fn the_metrics_the_alerts_read_are_exported_under_their_names() {
        let mut registry = Registry::default();
        let metrics = RelayMetrics::register(&mut registry);
        metrics.dead_letters.inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let rules = include_str!("../charts/voucher-operator/rules/voucher-operator.yaml");
        for name in [
            "voucher_operator_audit_dead_letters_total",
            "voucher_operator_audit_outbox_oldest_age_seconds",
        ] {
            assert!(text.contains(name), "{name} in {text}");
            assert!(rules.contains(name), "{name} in the alert rules");
        }
    }

    #[test]
    fn an_oversized_event_is_shortened_and_marked() {
        let envelope = json!({"data": {"reason": "r".repeat(5000),
                              "after": {"terms": {"description": "d".repeat(5000)}}}});
        let (small, truncated) = fit(envelope.clone(), 100_000).unwrap();
        assert!(!truncated && small.len() > 10_000, "fits as it is");
        let (body, truncated) = fit(envelope.clone(), 2048).unwrap();
        assert!(truncated && body.len() <= 2048);
        let shortened: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(shortened["data"]["truncated"], true);
        assert!(fit(envelope, 100).is_none(), "cannot fit at all");
    }
}
