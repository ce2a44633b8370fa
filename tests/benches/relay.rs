//! Benchmark: the audit relay publishing the outbox into a local JetStream,
//! beside the same envelopes published directly (no database), measured in
//! the same run; then the publish lag while changes arrive at a steady rate.
//!
//! Run: cargo bench --bench relay              (EVENTS=20000 by default)

#[path = "../support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use voucher_operator::domain::AuditKind;
use voucher_operator::relay::{self, RelayMetrics, RelaySettings};
use voucher_operator::store::Store;
use voucher_operator::store::outbox::{self, NewAuditRecord};

async fn fill(store: &Store, n: usize) {
    let mut tx = store.pool().begin().await.unwrap();
    for i in 0..n {
        let payload = serde_json::json!({"code": format!("BENCH-{}", i % 50), "reason": "bench", "after": {"credit_omr": i}});
        outbox::append(
            &mut tx,
            &NewAuditRecord::new(format!("BENCH-{}", i % 50), AuditKind::Updated, payload),
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
}

async fn unpublished(store: &Store) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM voucher_audit_outbox WHERE published_at IS NULL")
        .fetch_one(store.pool())
        .await
        .unwrap()
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let nats = support::nats();
    let url = support::fresh_database("bench_relay").await;
    let store = Store::from_pool(support::pool(&url).await);
    store.migrate().await.unwrap();
    fill(&store, n).await;

    // Baseline: the same envelopes straight into JetStream, pipelined the same way.
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = jetstream::new(client);
    let baseline_settings = RelaySettings {
        nats_url: nats.url.clone(),
        stream: "BENCH_BASELINE".into(),
        subject_prefix: "bench.baseline".into(),
        ..Default::default()
    };
    js.create_or_update_stream(relay::stream_config(&baseline_settings))
        .await
        .unwrap();
    let mut conn = store.pool().acquire().await.unwrap();
    let records = outbox::pending(&mut conn, n as i64).await.unwrap();
    drop(conn);
    let started = Instant::now();
    for chunk in records.chunks(256) {
        let mut acks = Vec::new();
        for record in chunk {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", record.event_id.to_string().as_str());
            let body = serde_json::to_vec(&relay::envelope(record, "/bench")).unwrap();
            acks.push(
                js.publish_with_headers(
                    relay::subject("bench.baseline", &record.code, &record.kind),
                    headers,
                    body.into(),
                )
                .await
                .unwrap(),
            );
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }
    let baseline = started.elapsed();

    // The relay draining the same backlog from the outbox.
    let settings = RelaySettings {
        nats_url: nats.url.clone(),
        stream: "BENCH_RELAY".into(),
        subject_prefix: "bench.relay".into(),
        ..Default::default()
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(RelayMetrics::register(&mut registry));
    let stop = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(relay::run(
        store.clone(),
        settings.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    while unpublished(&store).await > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain = started.elapsed();
    assert_eq!(
        (
            stored(&js, "BENCH_BASELINE").await,
            stored(&js, "BENCH_RELAY").await
        ),
        (n as u64, n as u64),
        "every event in each stream, once"
    );

    // Lag at a steady rate: changes committed one by one at half the drain rate.
    let rate = ((n as f64 / drain.as_secs_f64()) / 2.0).max(100.0);
    let steady = (rate * 5.0) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut next = tokio::time::Instant::now();
    let steady_started = Instant::now();
    for i in 0..steady {
        let mut conn = store.pool().acquire().await.unwrap();
        let payload = serde_json::json!({"code": "STEADY", "i": i});
        outbox::append(
            &mut conn,
            &NewAuditRecord::new("STEADY", AuditKind::Redeemed, payload),
        )
        .await
        .unwrap();
        next += interval;
        tokio::time::sleep_until(next).await;
    }
    let achieved = steady as f64 / steady_started.elapsed().as_secs_f64();
    while unpublished(&store).await > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (p50, p99, max): (f64, f64, f64) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lag), percentile_cont(0.99) WITHIN GROUP (ORDER BY lag), max(lag) \
         FROM (SELECT EXTRACT(EPOCH FROM published_at - occurred_at)::float8 * 1000 AS lag \
               FROM voucher_audit_outbox WHERE code = 'STEADY') l",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(
        stored(&js, "BENCH_RELAY").await,
        (n + steady) as u64,
        "every steady change in the stream, once"
    );

    let per_second = |d: Duration| n as f64 / d.as_secs_f64();
    println!("audit relay into a local JetStream (file storage), {n} events");
    println!("  {:<52} {:>10} {:>12}", "", "seconds", "events/s");
    println!(
        "  {:<52} {:>10.2} {:>12.0}",
        "baseline: the same envelopes published directly",
        baseline.as_secs_f64(),
        per_second(baseline)
    );
    println!(
        "  {:<52} {:>10.2} {:>12.0}",
        "relay: outbox -> JetStream -> marked published",
        drain.as_secs_f64(),
        per_second(drain)
    );
    println!(
        "  publish lag while {steady} changes are committed one by one, aiming at {rate:.0}/s, achieved {achieved:.0}/s:"
    );
    println!("    p50 {p50:.1} ms   p99 {p99:.1} ms   max {max:.1} ms");
}

/// The messages stream `name` holds.
async fn stored(js: &jetstream::Context, name: &str) -> u64 {
    let mut stream = js.get_stream(name).await.unwrap();
    stream.info().await.unwrap().state.messages
}
