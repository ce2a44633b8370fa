//! The test services themselves: a real nats-server with JetStream and a real
//! Postgres, as the audit relay and the store tests need them.

mod support;

use std::time::Duration;

use async_nats::jetstream::{self, stream};

#[tokio::test]
async fn jetstream_accepts_deduplicated_publishes() {
    let nats = support::nats();
    let client = async_nats::connect(&nats.url)
        .await
        .expect("connect to nats-server");
    let js = jetstream::new(client);
    let mut stream = js
        .get_or_create_stream(stream::Config {
            name: "SERVICES_CHECK".into(),
            subjects: vec!["services.check.>".into()],
            duplicate_window: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .expect("JetStream is enabled");

    for _ in 0..2 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "event-1");
        js.publish_with_headers("services.check.A", headers, "hello".into())
            .await
            .unwrap()
            .await
            .expect("JetStream acknowledges the publish");
    }
    let info = stream.info().await.unwrap();
    assert_eq!(
        info.state.messages, 1,
        "the duplicate window drops the second copy"
    );
}

#[tokio::test]
async fn postgres_serves_fresh_databases() {
    let url = support::fresh_database("services").await;
    let pool = support::pool(&url).await;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!version.is_empty());
    let other = support::fresh_database("services").await;
    assert_ne!(url, other, "each test gets its own database");
}
