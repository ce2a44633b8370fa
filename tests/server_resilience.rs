//! The server through a Postgres crash and restart, and through its own
//! graceful shutdown. Its own test binary, so the restart touches no other test.

mod support;

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

/// The HS256 secret of these tests (at least 32 bytes, as the server requires).
const SECRET: &str = "shared-secret-of-at-least-32-bytes-long";

use reqwest::StatusCode;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use voucher_operator::server::auth::AuthSettings;
use voucher_operator::store::{DatabaseSettings, Store};

/// The tests that restart the shared Postgres take turns.
static RESTARTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn token(subject: &str) -> String {
    let claims = json!({"sub": subject, "exp": chrono::Utc::now().timestamp() + 600});
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn start(database: &str) -> (String, CancellationToken, Store) {
    support::init_tracing();
    let store = Store::connect(&DatabaseSettings {
        url: database.into(),
        max_connections: 20,
        connect_timeout: Duration::from_secs(2),
    })
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let auth = AuthSettings {
        hs256_secret: Some(SECRET.into()),
        ..Default::default()
    };
    let (base, stop) =
        support::serve_http(store.clone(), support::server_settings(), auth, None).await;
    (base, stop, store)
}

/// A redemption by `customer`, with the customer's name as its Idempotency-Key.
async fn redeem(http: &reqwest::Client, base: &str, customer: &str, code: &str) -> StatusCode {
    match http
        .post(format!("{base}/billing/vouchers/redeem"))
        .bearer_auth(token(customer))
        .header("Idempotency-Key", customer)
        .json(&json!({"code": code, "tenant_id": "t"}))
        .send()
        .await
    {
        Ok(response) => {
            let status = response.status();
            let body: serde_json::Value = response.json().await.expect("every answer is JSON");
            assert!(
                status == StatusCode::OK || body["error"].is_string(),
                "{status}: {body}"
            );
            status
        }
        Err(error) => panic!("the server dropped a request: {error}"),
    }
}

#[tokio::test]
async fn a_postgres_restart_loses_no_half_redemption_and_needs_no_server_restart() {
    let _alone = RESTARTS.lock().await;
    let database = support::fresh_database("restart").await;
    let (base, _stop, store) = start(&database).await;
    sqlx::query(
        "INSERT INTO promo_codes (code, credit_omr, max_redemptions) VALUES ('STORM-1', 3, 10000)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let http = reqwest::Client::new();

    let load = {
        let (http, base) = (http.clone(), base.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for wave in 0..30 {
                let requests: Vec<_> = (0..10)
                    .map(|i| {
                        let (http, base) = (http.clone(), base.clone());
                        tokio::spawn(async move {
                            redeem(&http, &base, &format!("c-{wave}-{i}"), "STORM-1").await
                        })
                    })
                    .collect();
                for (i, r) in requests.into_iter().enumerate() {
                    answers.push((
                        format!("c-{wave}-{i}"),
                        r.await.unwrap(),
                        std::time::Instant::now(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answers
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let restart_began = std::time::Instant::now();
    tokio::task::spawn_blocking(|| support::postgres().restart())
        .await
        .unwrap();
    let restart_ended = std::time::Instant::now();
    let timed = load.await.unwrap();
    assert!(
        timed.iter().any(|(_, _, at)| *at < restart_began)
            && timed.iter().any(|(_, _, at)| *at > restart_ended),
        "the restart did not fall inside the load; the test proves nothing"
    );
    let answers: Vec<StatusCode> = timed.iter().map(|(_, status, _)| *status).collect();

    let granted = answers.iter().filter(|s| **s == StatusCode::OK).count() as i64;
    let unavailable = answers
        .iter()
        .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    assert_eq!(
        granted as usize + unavailable,
        answers.len(),
        "only 200 or 503: {answers:?}"
    );

    let (counter, rows, grants, audits): (i32, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT times_redeemed FROM promo_codes WHERE code = 'STORM-1'), \
                (SELECT count(*) FROM promo_redemptions WHERE code = 'STORM-1'), \
                (SELECT count(*) FROM credit_ledger WHERE reason = 'promo:STORM-1'), \
                (SELECT count(*) FROM voucher_audit_outbox WHERE code = 'STORM-1' AND kind = 'redeemed')",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(
        (rows, grants, audits),
        (counter as i64, counter as i64, counter as i64),
        "a half-written redemption"
    );
    // A commit whose acknowledgement was lost counts but was answered 503.
    assert!(rows >= granted, "{rows} rows for {granted} grants answered");

    // The same server process serves again.
    assert_eq!(
        redeem(&http, &base, "after-restart", "STORM-1").await,
        StatusCode::OK
    );
    // Each customer answered 503 retries with its Idempotency-Key: a redemption whose (group)
    // commit landed replays its grant, one that did not redeems now. Each is granted once.
    for (customer, status, _) in &timed {
        if *status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(
                redeem(&http, &base, customer, "STORM-1").await,
                StatusCode::OK,
                "{customer}'s retry"
            );
        }
    }
    let (counter, rows): (i32, i64) = sqlx::query_as(
        "SELECT (SELECT times_redeemed FROM promo_codes WHERE code = 'STORM-1'), \
                (SELECT count(*) FROM promo_redemptions WHERE code = 'STORM-1')",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(
        (counter as usize, rows as usize),
        (timed.len() + 1, timed.len() + 1),
        "every customer granted exactly once"
    );
}

/// The preview's memory is trusted only while the database's notifications are heard: a change
/// made right after a Postgres restart, before the server listens again (its notification is
/// lost), is still followed within a second.
#[tokio::test]
async fn the_preview_forgets_what_it_remembers_when_a_restart_cuts_the_notifications() {
    let _alone = RESTARTS.lock().await;
    let database = support::fresh_database("preview_restart").await;
    let (base, _stop, store) = start(&database).await;
    sqlx::query("INSERT INTO promo_codes (code, credit_omr) VALUES ('MEMO-1', 4)")
        .execute(store.pool())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let preview = async || {
        let response = http
            .post(format!("{base}/billing/vouchers/redeem-preview"))
            .json(&json!({"code": "MEMO-1"}))
            .send()
            .await;
        match response {
            Ok(r) => r.json::<serde_json::Value>().await.unwrap_or_default()["credit_omr"].clone(),
            Err(_) => serde_json::Value::Null,
        }
    };
    // Read once (remembered once the listener is up), then many times from memory.
    for _ in 0..20 {
        assert_eq!(preview().await, 4);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::task::spawn_blocking(|| support::postgres().restart())
        .await
        .unwrap();
    // At once, before the server's listener is back.
    let mut changed = false;
    for _ in 0..50 {
        if sqlx::query("UPDATE promo_codes SET credit_omr = 9 WHERE code = 'MEMO-1'")
            .execute(store.pool())
            .await
            .is_ok()
        {
            changed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(changed, "the database did not come back");
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while preview().await != 9 {
        assert!(
            std::time::Instant::now() < deadline,
            "the preview still shows the old credit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
