//! The server through a Postgres crash and restart, cut off from Postgres by a proxy (a lost
//! COMMIT acknowledgement, a partition), and through its own graceful shutdown. Its own test
//! binary, so the restart touches no other test.

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

/// [`start`], the server reaching `database` through a fault-injecting proxy.
async fn start_proxied(
    database: &str,
) -> (
    support::pg_faults::PgFaults,
    (String, CancellationToken, Store),
) {
    let faults = support::pg_faults::PgFaults::default();
    let upstream = support::postgres().port;
    let port = support::pg_faults::proxy(upstream, faults.clone()).await;
    let proxied = database.replace(&format!(":{upstream}/"), &format!(":{port}/"));
    assert_ne!(proxied, database, "the server goes through the proxy");
    (faults, start(&proxied).await)
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
    // A credit code and a discount code, under the same storm: each grants once or not at all.
    sqlx::raw_sql(
        "INSERT INTO promo_codes (code, credit_omr, max_redemptions) VALUES ('STORM-1', 3, 10000); \
         INSERT INTO promo_codes (code, credit_omr, max_redemptions, discount) \
           VALUES ('STORM-D', 0, 10000, '{\"percent_off\": 15}')",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let code_of = |i: usize| {
        if i.is_multiple_of(2) {
            "STORM-1"
        } else {
            "STORM-D"
        }
    };

    let load = {
        let (http, base) = (http.clone(), base.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for wave in 0..30 {
                let requests: Vec<_> = (0..10)
                    .map(|i| {
                        let (http, base) = (http.clone(), base.clone());
                        tokio::spawn(async move {
                            redeem(&http, &base, &format!("c-{wave}-{i}"), code_of(i)).await
                        })
                    })
                    .collect();
                for (i, r) in requests.into_iter().enumerate() {
                    answers.push((
                        format!("c-{wave}-{i}"),
                        r.await.unwrap(),
                        std::time::Instant::now(),
                        code_of(i),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answers
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let restart_began = std::time::Instant::now();
    // Down longer than the server waits for a connection (2 s): the requests meanwhile are
    // answered 503, those in flight lose their transaction.
    tokio::task::spawn_blocking(|| support::postgres().restart_after(Duration::from_secs(3)))
        .await
        .unwrap();
    let restart_ended = std::time::Instant::now();
    let timed = load.await.unwrap();
    assert!(
        timed.iter().any(|(_, _, at, _)| *at < restart_began)
            && timed.iter().any(|(_, _, at, _)| *at > restart_ended),
        "the restart did not fall inside the load; the test proves nothing"
    );
    let answers: Vec<StatusCode> = timed.iter().map(|(_, status, _, _)| *status).collect();

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
    assert!(
        unavailable > 0,
        "no request met the restart (all {} granted); the retries below would prove nothing",
        answers.len()
    );

    // Counter, redemptions, grants (ledger or discount) and audit records move together.
    let mut rows = 0;
    for (code, kind) in [("STORM-1", "redeemed"), ("STORM-D", "discount_granted")] {
        let (counter, redeemed, grants, audits): (i32, i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT times_redeemed FROM promo_codes WHERE code = $1), \
                    (SELECT count(*) FROM promo_redemptions WHERE code = $1), \
                    (SELECT count(*) FROM credit_ledger WHERE reason = 'promo:' || $1) \
                    + (SELECT count(*) FROM voucher_discount_grants WHERE code = $1), \
                    (SELECT count(*) FROM voucher_audit_outbox WHERE code = $1 AND kind = $2)",
        )
        .bind(code)
        .bind(kind)
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!(
            (redeemed, grants, audits),
            (counter as i64, counter as i64, counter as i64),
            "{code}: a half-written redemption"
        );
        rows += redeemed;
    }
    assert!(rows >= granted, "{rows} rows for {granted} grants answered");

    // The same server process serves again.
    assert_eq!(
        redeem(&http, &base, "after-restart", "STORM-1").await,
        StatusCode::OK
    );
    // Each customer answered 503 retries with its Idempotency-Key: a redemption whose (group)
    // commit landed replays its grant, one that did not redeems now. Each is granted once.
    for (customer, status, _, code) in &timed {
        if *status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(
                redeem(&http, &base, customer, code).await,
                StatusCode::OK,
                "{customer}'s retry"
            );
        }
    }
    let (counter, rows): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT sum(times_redeemed) FROM promo_codes WHERE code IN ('STORM-1', 'STORM-D')), \
                (SELECT count(*) FROM promo_redemptions WHERE code IN ('STORM-1', 'STORM-D'))",
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

/// A COMMIT whose acknowledgement is lost (the redemption committed; the server cannot know):
/// answered 503, never a grant nor a refusal; the retry with its Idempotency-Key replays the
/// grant, and the code is counted once. The acknowledgement is lost on purpose, by a proxy in
/// front of the real Postgres.
#[tokio::test]
async fn a_lost_commit_acknowledgement_is_a_503_and_the_retry_replays_the_one_grant() {
    let _alone = RESTARTS.lock().await;
    let database = support::fresh_database("lost_ack").await;
    let (faults, (base, _stop, store)) = start_proxied(&database).await;
    sqlx::query(
        "INSERT INTO promo_codes (code, credit_omr, max_redemptions) VALUES ('LOST-1', 4, 10)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let counts = || async {
        let direct = support::pool(&database).await;
        let counts: (i32, i64, i64) = sqlx::query_as(
            "SELECT (SELECT times_redeemed FROM promo_codes WHERE code = 'LOST-1'), \
                    (SELECT count(*) FROM promo_redemptions WHERE code = 'LOST-1'), \
                    (SELECT count(*) FROM credit_ledger WHERE reason = 'promo:LOST-1')",
        )
        .fetch_one(&direct)
        .await
        .unwrap();
        direct.close().await;
        counts
    };
    let http = reqwest::Client::new();

    faults.lose_next_commits(1);
    let first = redeem(&http, &base, "lost-ack", "LOST-1").await;
    assert_eq!(
        faults.lost(),
        1,
        "the redemption's COMMIT lost its acknowledgement"
    );
    assert_eq!(
        first,
        StatusCode::SERVICE_UNAVAILABLE,
        "an unknown outcome is a 503"
    );
    assert_eq!(counts().await, (1, 1, 1), "the redemption did commit");

    let retry = redeem(&http, &base, "lost-ack", "LOST-1").await;
    assert_eq!(retry, StatusCode::OK, "the retry replays the grant");
    assert_eq!(counts().await, (1, 1, 1), "granted once");
}

/// The preview's memory is trusted only while the database's notifications are heard: a change
/// made while the server is cut off from Postgres (its notification reaches no listener of
/// this server: proven from pg_stat_activity) is followed within a second once it reconnects.
#[tokio::test]
async fn the_preview_forgets_what_it_remembers_when_a_cut_loses_its_notifications() {
    let _alone = RESTARTS.lock().await;
    let database = support::fresh_database("preview_cut").await;
    let (faults, (base, _stop, _store)) = start_proxied(&database).await;
    let direct = support::pool(&database).await;
    sqlx::query("INSERT INTO promo_codes (code, credit_omr) VALUES ('MEMO-1', 4)")
        .execute(&direct)
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
    let listeners = async || -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
        )
        .fetch_one(&direct)
        .await
        .unwrap()
    };
    // Read once (remembered once the listener is up), then from memory.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while listeners().await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..20 {
        assert_eq!(preview().await, 4);
    }

    // Cut off: its connections (the listener's too) end, new ones are refused.
    faults.partition();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while listeners().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the listener's session never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut tx = direct.begin().await.unwrap();
    sqlx::query("UPDATE promo_codes SET credit_omr = 9 WHERE code = 'MEMO-1'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        listeners().await,
        0,
        "no listener of this server was there to hear the change"
    );
    faults.heal();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while listeners().await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never listened again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Listening again, it trusts its memory again: what it remembered from before the cut
    // must be gone.
    for _ in 0..20 {
        assert_eq!(preview().await, 9, "the preview still shows the old credit");
    }
}

/// The billing service's token.
fn service_token() -> String {
    let claims = json!({"sub": "billing-service", "role": "billing-service",
                        "exp": chrono::Utc::now().timestamp() + 600});
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A checkout's commit whose COMMIT acknowledgement is lost: answered 503 (the outcome is
/// unknown), the order recorded once; the retry with the same body answers what was recorded,
/// and the once-grant is consumed once.
#[tokio::test]
async fn a_commit_whose_acknowledgement_is_lost_is_recorded_once() {
    let _alone = RESTARTS.lock().await;
    let database = support::fresh_database("lost_commit").await;
    let (faults, (base, _stop, store)) = start_proxied(&database).await;
    sqlx::raw_sql(
        "INSERT INTO promo_codes (code, credit_omr, discount) \
           VALUES ('ACK-10', 0, '{\"percent_off\": 10}')",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let http = reqwest::Client::new();
    assert_eq!(
        redeem(&http, &base, "ack-customer", "ACK-10").await,
        StatusCode::OK
    );
    let commit = || async {
        let response = http
            .post(format!("{base}/billing/vouchers/checkout/commit"))
            .bearer_auth(service_token())
            .json(&json!({"user_id": "ack-customer", "order_id": "ACK-ORDER",
                          "lines": [{"id": "1", "category": "install", "amount": 1000}]}))
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json::<serde_json::Value>().await.unwrap())
    };
    let recorded = || async {
        let direct = support::pool(&database).await;
        let counts: (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM voucher_checkout_orders), \
                    (SELECT count(*) FROM voucher_checkout_uses), \
                    (SELECT count(*) FROM voucher_discount_grants WHERE consumed_by IS NOT NULL), \
                    (SELECT count(*) FROM voucher_audit_outbox WHERE kind = 'discount_applied')",
        )
        .fetch_one(&direct)
        .await
        .unwrap();
        direct.close().await;
        counts
    };

    faults.lose_next_commits(1);
    let (status, body) = commit().await;
    assert_eq!(
        faults.lost(),
        1,
        "the commit's COMMIT lost its acknowledgement"
    );
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(recorded().await, (1, 1, 1, 1), "the order did commit");
    let (status, body) = commit().await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["discount"], 100,
        "the retry answers what was recorded: {body}"
    );
    assert_eq!(recorded().await, (1, 1, 1, 1), "recorded once");
}
