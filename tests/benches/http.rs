//! Benchmark: redemptions of one hot code, and redeem-previews, through the
//! HTTP server, each beside the same work done directly in SQL (the
//! baseline), measured in the same run against the same Postgres.
//!
//! The database first gets a ledger the size of a billing service's in
//! service (LEDGER_ROWS, by default 1,000,000 rows over 100,000 customers),
//! and HTTP redemption is measured twice: with the index `migrate` builds on
//! `credit_ledger (customer_id)`, and without it.
//!
//! Run: cargo bench --bench http               (REQUESTS=2000, LEDGER_ROWS=1000000 by default)

#[path = "../support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

/// The HS256 secret of these tests (at least 32 bytes, as the server requires).
const SECRET: &str = "shared-secret-of-at-least-32-bytes-long";

use serde_json::json;
use sqlx::PgPool;
use voucher_operator::server::ServerSettings;
use voucher_operator::server::auth::AuthSettings;
use voucher_operator::store::Store;

const CONCURRENCY: usize = 32;

fn token(subject: &str) -> String {
    let claims = json!({"sub": subject, "exp": chrono::Utc::now().timestamp() + 3600});
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// The redemption transaction written directly in SQL: what the server does
/// minus HTTP, auth and the audit record.
async fn sql_redemption(pool: &PgPool, code: &str, customer: &str) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM promo_codes WHERE code = $1 FOR UPDATE")
        .bind(code)
        .execute(&mut *tx)
        .await
        .unwrap();
    let id: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO customers (user_id, tenant_id, email) VALUES ($1, 't', '') RETURNING id",
    )
    .bind(customer)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    sqlx::query("INSERT INTO promo_redemptions (customer_id, code) VALUES ($1, $2)")
        .bind(id)
        .bind(code)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE promo_codes SET times_redeemed = times_redeemed + 1 WHERE code = $1")
        .bind(code)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("INSERT INTO credit_ledger (customer_id, amount_omr, reason) VALUES ($1, 1, 'promo:' || $2)")
        .bind(id)
        .bind(code)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn timed<F, Fut>(n: usize, f: F) -> Duration
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(f)
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    started.elapsed()
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let url = support::fresh_database("bench_http").await;
    let pool = support::pool(&url).await;
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO promo_codes (code, credit_omr) VALUES ('HOT-SQL', 1), ('HOT-HTTP', 1), ('HOT-NOINDEX', 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let ledger_rows: i64 = std::env::var("LEDGER_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let seeding = Instant::now();
    sqlx::query(
        "INSERT INTO customers (user_id, tenant_id, email) \
           SELECT 'seed-' || i, 't', '' FROM generate_series(1, GREATEST($1 / 10, 1)) i",
    )
    .bind(ledger_rows)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO credit_ledger (customer_id, amount_omr, reason) \
           SELECT c.id, 1, 'seed' FROM customers c, generate_series(1, 10) \
           LIMIT $1",
    )
    .bind(ledger_rows)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::raw_sql("ANALYZE customers; ANALYZE credit_ledger")
        .execute(&pool)
        .await
        .unwrap();
    println!(
        "seeded {ledger_rows} ledger rows in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    let settings = ServerSettings {
        rate_limit_per_minute: u32::MAX,
        rate_limit_burst: u32::MAX,
        request_timeout: Duration::from_secs(30),
        ..support::server_settings()
    };
    let auth = AuthSettings {
        hs256_secret: Some(SECRET.into()),
        ..Default::default()
    };
    let (base, stop) = support::serve_http(store, settings, auth, None).await;
    let http = reqwest::Client::new();
    let tokens: Vec<String> = (0..n).map(|i| token(&format!("http-{i}"))).collect();

    let sql_redeem = timed(n, |i| {
        let pool = pool.clone();
        async move { sql_redemption(&pool, "HOT-SQL", &format!("sql-{i}")).await }
    })
    .await;
    let http_redeem = timed(n, |i| {
        let (http, base, token) = (http.clone(), base.clone(), tokens[i].clone());
        async move {
            let response = http
                .post(format!("{base}/billing/vouchers/redeem"))
                .bearer_auth(token)
                .json(&json!({"code": "HOT-HTTP", "tenant_id": "t"}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
    })
    .await;
    // The same, on a database without the ledger's index (as before `migrate` built it).
    sqlx::raw_sql("DROP INDEX voucher_operator_credit_ledger_customer")
        .execute(&pool)
        .await
        .unwrap();
    let no_index_tokens: Vec<String> = (0..n).map(|i| token(&format!("noindex-{i}"))).collect();
    let http_redeem_no_index = timed(n, |i| {
        let (http, base, token) = (http.clone(), base.clone(), no_index_tokens[i].clone());
        async move {
            let response = http
                .post(format!("{base}/billing/vouchers/redeem"))
                .bearer_auth(token)
                .json(&json!({"code": "HOT-NOINDEX", "tenant_id": "t"}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
    })
    .await;
    let previews = n * 5;
    let sql_preview = timed(previews, |_| {
        let pool = pool.clone();
        async move {
            sqlx::query("SELECT code, credit_omr, description, active, max_redemptions, times_redeemed, valid_from, expires_at \
                         FROM promo_codes WHERE code = $1 AND deleted_at IS NULL")
                .bind("HOT-HTTP")
                .fetch_one(&pool)
                .await
                .unwrap();
        }
    })
    .await;
    let http_preview = timed(previews, |_| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let response = http
                .post(format!("{base}/billing/vouchers/redeem-preview"))
                .json(&json!({"code": " hot-http "}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
    })
    .await;
    stop.cancel();

    let rate = |count: usize, d: Duration| count as f64 / d.as_secs_f64();
    println!(
        "HTTP server against Postgres ({ledger_rows} ledger rows), {CONCURRENCY} requests in flight"
    );
    println!(
        "  {:<52} {:>8} {:>10} {:>10}",
        "", "requests", "seconds", "per second"
    );
    for (label, count, d) in [
        (
            "redeem one hot code: baseline, the transaction in SQL",
            n,
            sql_redeem,
        ),
        (
            "redeem one hot code: POST /billing/vouchers/redeem",
            n,
            http_redeem,
        ),
        (
            "  the same without the ledger's customer index",
            n,
            http_redeem_no_index,
        ),
        (
            "preview: baseline, the SELECT in SQL",
            previews,
            sql_preview,
        ),
        (
            "preview: POST /billing/vouchers/redeem-preview",
            previews,
            http_preview,
        ),
    ] {
        println!(
            "  {label:<52} {count:>8} {:>10.2} {:>10.0}",
            d.as_secs_f64(),
            rate(count, d)
        );
    }
    println!(
        "  HTTP redeem with the index / without: {:.1}x",
        http_redeem_no_index.as_secs_f64() / http_redeem.as_secs_f64()
    );
}
