//! Benchmark at production scale: redemption and redeem-preview through the
//! HTTP server (the release binary, run as its own process), each beside the
//! same work done directly in SQL, measured in one run against one Postgres.
//!
//! The database is filled first like a billing database in service:
//! LEDGER_ROWS ledger rows (1,000,000 by default) over a tenth as many
//! customers, 10,000 codes, and a redemption per customer. Printed, each with
//! throughput, p50 and p99 at 32 requests in flight:
//!   - the baselines, on a pool with a connection per request in flight: the
//!     seed's redemption SQL (`support::seed_checkout`: the customer, then its
//!     five statements under the code's row lock), the single-statement
//!     hot-row update, and the prepared SELECT by code;
//!   - HTTP redeem of one hot code, of one hot discount code (a discount
//!     grant instead of a ledger grant), and spread over 1,000 codes, each
//!     followed by an exactness check (counter = redemption rows = grants =
//!     audit records, or the run fails);
//!   - HTTP preview of the hot code;
//!   - the checkout: a quote and a commit (3 lines) for customers holding three
//!     live grants each, beside the prepared SELECT and the seed's SQL;
//!   - HTTP redeem of one hot code and spread over 1,000 codes again, by a
//!     server whose connections to Postgres are TLS (verify-full), beside the
//!     same by the plain-text server;
//!   - HTTP redeem of one hot code on a ledger a hundred times smaller (the
//!     cost must not grow with the ledger) and on the large ledger without
//!     the index `migrate` builds on credit_ledger (customer_id);
//!   - the server's peak resident memory, sampled throughout.
//!
//! Run: cargo bench --bench http      (REQUESTS=2000, LEDGER_ROWS=1000000 by default)

#[path = "common.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use sqlx::PgPool;
use voucher_operator::store::Store;

/// The HS256 secret of these tests (at least 32 bytes, as the server requires).
const SECRET: &str = "shared-secret-of-at-least-32-bytes-long";
const CONCURRENCY: usize = 32;
const SPREAD: usize = 1_000;

fn token(subject: &str) -> String {
    signed(json!({"sub": subject, "exp": chrono::Utc::now().timestamp() + 3600}))
}

/// The billing service's token: it quotes and commits orders for customers.
fn service_token() -> String {
    signed(json!({"sub": "billing-service", "role": "billing-service",
                  "exp": chrono::Utc::now().timestamp() + 3600}))
}

fn signed(claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Three live grants for each of the customers seed-1 to seed-1000.
const CHECKOUT_GRANTS: &str = "\
    INSERT INTO promo_codes (code, credit_omr, discount) VALUES \
      ('DISC-ALL', 0, '{\"percent_off\": 10, \"duration_months\": 1}'), \
      ('DISC-INSTALL', 0, '{\"percent_off\": 20, \"applies_to\": [\"install\"], \"duration_months\": 3}'), \
      ('DISC-AMOUNT', 0, '{\"amount_off\": 5000, \"duration_months\": 6}'); \
    INSERT INTO voucher_discount_grants (customer_id, code, percent_off, amount_off, applies_to, \
      duration_months, currency, starts_at, ends_at) \
    SELECT c.id, g.code, g.p, g.a, g.t, g.m, 'OMR', now() - interval '1 day', now() + interval '30 days' \
    FROM customers c, (VALUES ('DISC-ALL', 10, NULL::bigint, '{}'::text[], 1), \
                              ('DISC-INSTALL', 20, NULL, '{install}', 3), \
                              ('DISC-AMOUNT', NULL, 5000, '{}', 6)) g(code, p, a, t, m) \
    WHERE c.user_id IN (SELECT 'seed-' || i FROM generate_series(1, 1000) i)";

/// A migrated database filled with `ledger_rows` ledger rows.
async fn dataset(ledger_rows: i64) -> (String, PgPool) {
    let url = support::fresh_database("bench_http").await;
    let pool = support::pool(&url).await;
    Store::from_pool(pool.clone()).migrate().await.unwrap();
    common::seed(&pool, ledger_rows).await;
    sqlx::raw_sql(
        "INSERT INTO promo_codes (code, credit_omr) VALUES \
           ('HOT-SQL', 1), ('HOT-UPDATE', 1), ('HOT-HTTP', 1), ('HOT-NOINDEX', 1), ('HOT-TLS', 1); \
         INSERT INTO promo_codes (code, credit_omr, discount) VALUES \
           ('HOT-DISCOUNT', 0, '{\"percent_off\": 20, \"applies_to\": [\"install\"], \"duration_months\": 3}')",
    )
    .execute(&pool)
    .await
    .unwrap();
    (url, pool)
}

/// The release binary serving HTTP on `url`'s database, its peak RSS sampled.
struct Server {
    child: Child,
    base: String,
    peak_rss_kib: Arc<AtomicU64>,
}

impl Server {
    async fn start(url: &str) -> Self {
        let port = support::free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
            .arg("server")
            .env("DATABASE_URL", url)
            .env("SKIP_MIGRATIONS", "true")
            .env("LISTEN_ADDRESS", format!("127.0.0.1:{port}"))
            .env("JWT_HS256_SECRET", SECRET)
            .env("RATE_LIMIT_PER_MINUTE", "1000000")
            .env("RATE_LIMIT_BURST", "1000000")
            .env("RATE_LIMIT_PER_SUBJECT", "1000000")
            .env("MAX_CONNECTIONS_PER_CLIENT", "4096")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the server");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !support::http_get(port, "/readyz")
            .await
            .starts_with("HTTP/1.0 200")
        {
            assert!(Instant::now() < deadline, "the server did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let peak_rss_kib = Arc::new(AtomicU64::new(0));
        let (pid, peak) = (child.id(), peak_rss_kib.clone());
        tokio::spawn(async move {
            while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                if let Some(kib) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
                {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self {
            child,
            base,
            peak_rss_kib,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds used so far: by the server process, by every Postgres
/// process, and by this benchmark (the load generator).
#[derive(Clone, Copy, Default)]
struct Cpu {
    server: f64,
    postgres: f64,
    generator: f64,
}

/// utime + stime of a /proc/<pid>/stat, in seconds.
fn cpu_seconds(stat: &str) -> f64 {
    let ticks = voucher_testenv::supervisor::clock_ticks_per_second() as f64;
    // The fields after the command name (which may hold spaces), from its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(11) + field(12)) / ticks
}

impl Cpu {
    fn now(server: u32) -> Self {
        let read =
            |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let mut postgres = 0.0;
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if pid.chars().all(|c| c.is_ascii_digit())
                && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim() == "postgres")
            {
                postgres += cpu_seconds(&read(&pid));
            }
        }
        Self {
            server: cpu_seconds(&read(&server.to_string())),
            postgres,
            generator: cpu_seconds(&read("self")),
        }
    }

    fn since(self, before: Self) -> Self {
        Self {
            server: self.server - before.server,
            postgres: self.postgres - before.postgres,
            generator: self.generator - before.generator,
        }
    }
}

/// What one measured run did.
struct Run {
    label: String,
    latencies: Vec<Duration>,
    elapsed: Duration,
    /// CPU used during the run (HTTP runs).
    cpu: Option<Cpu>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        sorted[((sorted.len() - 1) as f64 * p).round() as usize]
    }
}

/// Runs `f(0..n)` with CONCURRENCY in flight, timing each call.
async fn measure<F, Fut>(label: &str, n: usize, f: F) -> Run
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    let latencies = futures::stream::iter(0..n)
        .map(|i| {
            let call = f(i);
            async move {
                let began = Instant::now();
                call.await;
                began.elapsed()
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    Run {
        label: label.to_owned(),
        latencies,
        elapsed: started.elapsed(),
        cpu: None,
    }
}

/// HTTP redemptions of `code_of(i)` by new customers `{prefix}-{i}`, every one granted.
async fn http_redeem(
    label: &str,
    server: &Server,
    prefix: &str,
    n: usize,
    code_of: impl Fn(usize) -> String,
) -> Run {
    let http = reqwest::Client::new();
    let tokens: Vec<String> = (0..n).map(|i| token(&format!("{prefix}-{i}"))).collect();
    let before = Cpu::now(server.child.id());
    let mut run = measure(label, n, |i| {
        let (http, url, token, code) = (
            http.clone(),
            format!("{}/billing/vouchers/redeem", server.base),
            tokens[i].clone(),
            code_of(i),
        );
        async move {
            let response = http
                .post(url)
                .bearer_auth(token)
                .json(&json!({"code": code, "tenant_id": "t"}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        }
    })
    .await;
    run.cpu = Some(Cpu::now(server.child.id()).since(before));
    run
}

/// The `batch`-th SPREAD codes of the seed (C-00001 on), and their redemptions counted so far.
async fn spread_codes(pool: &PgPool, batch: usize) -> (Vec<String>, i64) {
    let codes: Vec<String> = (batch * SPREAD + 1..=(batch + 1) * SPREAD)
        .map(|i| format!("C-{i:05}"))
        .collect();
    let before: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(times_redeemed), 0)::bigint FROM promo_codes WHERE code = ANY($1)",
    )
    .bind(&codes)
    .fetch_one(pool)
    .await
    .unwrap();
    (codes, before)
}

/// Counter = redemption rows = grants (ledger or discount) = audit records, for
/// `codes` (their counts before the run subtracted); panics otherwise.
async fn exact(pool: &PgPool, codes: &[String], before: i64, granted: usize) {
    let (counter, redemptions, grants, audits): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT \
           (SELECT COALESCE(sum(times_redeemed), 0) FROM promo_codes WHERE code = ANY($1))::bigint, \
           (SELECT count(*) FROM promo_redemptions WHERE code = ANY($1)), \
           (SELECT count(*) FROM credit_ledger WHERE reason = ANY(SELECT 'promo:' || c FROM unnest($1) c)) \
           + (SELECT count(*) FROM voucher_discount_grants WHERE code = ANY($1)), \
           (SELECT count(*) FROM voucher_audit_outbox \
             WHERE kind IN ('redeemed', 'discount_granted') AND code = ANY($1))",
    )
    .bind(codes)
    .fetch_one(pool)
    .await
    .unwrap();
    let granted = granted as i64;
    assert_eq!(
        (counter - before, redemptions - before, grants, audits),
        (granted, granted, granted, granted),
        "counter, redemption rows, ledger grants, audit records after {granted} grants"
    );
}

#[tokio::main]
async fn main() {
    voucher_operator::install_tls_provider();
    let n = env_number("REQUESTS", 2000) as usize;
    let ledger_rows = env_number("LEDGER_ROWS", 1_000_000) as i64;
    let small_rows = (ledger_rows / 100).max(1000);
    let (url, pool) = dataset(ledger_rows).await;
    let (small_url, small_pool) = dataset(small_rows).await;
    // Plain text to Postgres, said outright: later in the run the server also offers TLS.
    let server = Server::start(&format!("{url}?sslmode=disable")).await;
    // The baselines get a connection for each request in flight.
    let seed_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(CONCURRENCY as u32)
        .connect(&url)
        .await
        .unwrap();

    let mut runs = Vec::new();
    let before = Cpu::now(server.child.id());
    let mut seed = measure(
        "seed's redemption SQL, one hot code (5 statements)",
        n,
        |i| {
            let pool = seed_pool.clone();
            async move {
                support::seed_checkout(&pool, "HOT-SQL", &format!("sql-{i}"))
                    .await
                    .unwrap()
            }
        },
    )
    .await;
    seed.cpu = Some(Cpu::now(server.child.id()).since(before));
    runs.push(seed);
    let before = Cpu::now(server.child.id());
    let statements = Statements::start(&pool).await;
    let mut update = measure("single-statement hot-row update", n, |_| {
        let pool = seed_pool.clone();
        async move {
            sqlx::query(
                "UPDATE promo_codes SET times_redeemed = times_redeemed + 1 WHERE code = $1",
            )
            .bind("HOT-UPDATE")
            .execute(&pool)
            .await
            .unwrap();
        }
    })
    .await;
    update.cpu = Some(Cpu::now(server.child.id()).since(before));
    runs.push(update);
    let update_statements = statements.read(n).await;
    runs.push(
        measure("prepared SELECT by code", n * 5, |_| {
            let pool = seed_pool.clone();
            async move {
                sqlx::query(
                    "SELECT code, credit_omr, description, active, max_redemptions, \
                     times_redeemed, valid_from, expires_at \
                     FROM promo_codes WHERE code = $1 AND deleted_at IS NULL",
                )
                .bind("HOT-HTTP")
                .fetch_one(&pool)
                .await
                .unwrap();
            }
        })
        .await,
    );
    let statements = Statements::start(&pool).await;
    runs.push(
        http_redeem("HTTP redeem, one hot code", &server, "hot", n, |_| {
            "HOT-HTTP".into()
        })
        .await,
    );
    let redeem_statements = statements.read(n).await;
    exact(&pool, &["HOT-HTTP".into()], 0, n).await;
    // The same, for a discount code: a discount grant instead of a ledger grant.
    let statements = Statements::start(&pool).await;
    runs.push(
        http_redeem(
            "HTTP redeem, one hot discount code",
            &server,
            "discount",
            n,
            |_| "HOT-DISCOUNT".into(),
        )
        .await,
    );
    let discount_statements = statements.read(n).await;
    exact(&pool, &["HOT-DISCOUNT".into()], 0, n).await;

    let (spread, before) = spread_codes(&pool, 0).await;
    runs.push(
        http_redeem(
            "HTTP redeem, spread over 1,000 codes",
            &server,
            "spread",
            n,
            |i| spread[i % SPREAD].clone(),
        )
        .await,
    );
    exact(&pool, &spread, before, n).await;

    let http = reqwest::Client::new();
    let before = Cpu::now(server.child.id());
    let mut preview = measure("HTTP preview, the hot code", n * 5, |_| {
        let (http, url) = (
            http.clone(),
            format!("{}/billing/vouchers/redeem-preview", server.base),
        );
        async move {
            let response = http
                .post(url)
                .json(&json!({"code": " hot-http "}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
    })
    .await;
    preview.cpu = Some(Cpu::now(server.child.id()).since(before));
    runs.push(preview);

    // The checkout: 1,000 customers hold three live grants each (a share of everything, a share
    // of installs, an amount off); each request prices (and commits) three lines for one of them.
    sqlx::raw_sql(CHECKOUT_GRANTS).execute(&pool).await.unwrap();
    let service = service_token();
    let order = |i: usize| {
        json!({"user_id": format!("seed-{}", i % 1000 + 1), "order_id": format!("bench-{i}"),
               "lines": [{"id": "1", "category": "install", "amount": 50_000},
                         {"id": "2", "category": "subscription", "amount": 12_000},
                         {"id": "3", "category": "support", "amount": 3_000}]})
    };
    let mut commit_statements = Vec::new();
    for (label, path, count) in [
        (
            "HTTP checkout quote, 3 lines, 3 live grants",
            "quote",
            n * 5,
        ),
        ("HTTP checkout commit, 3 lines, 3 live grants", "commit", n),
    ] {
        let statements = Statements::start(&pool).await;
        let before = Cpu::now(server.child.id());
        let mut run = measure(label, count, |i| {
            let (http, url, service) = (
                http.clone(),
                format!("{}/billing/vouchers/checkout/{path}", server.base),
                service.clone(),
            );
            let body = order(i);
            async move {
                let response = http
                    .post(url)
                    .bearer_auth(service)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
                let answer: serde_json::Value = response.json().await.unwrap();
                assert_eq!(answer["discount"], 10_000 + 1_200 + 300, "{answer}");
            }
        })
        .await;
        run.cpu = Some(Cpu::now(server.child.id()).since(before));
        runs.push(run);
        let read = statements.read(count).await;
        if path == "commit" {
            commit_statements = read;
        }
    }
    let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM voucher_checkout_orders")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(committed as usize, n, "every commit recorded once");

    let small = Server::start(&small_url).await;
    runs.push(
        http_redeem(
            &format!("HTTP redeem, one hot code, {small_rows} ledger rows"),
            &small,
            "small",
            n,
            |_| "HOT-HTTP".into(),
        )
        .await,
    );
    drop(small);
    exact(&small_pool, &["HOT-HTTP".into()], 0, n).await;
    runs.extend(over_tls(&url, &pool, n).await);

    // As before `migrate` built the ledger's index (slow: a tenth of the requests).
    sqlx::raw_sql("DROP INDEX voucher_operator_credit_ledger_customer")
        .execute(&pool)
        .await
        .unwrap();
    let without_index = (n / 10).max(CONCURRENCY);
    runs.push(
        http_redeem(
            "HTTP redeem, one hot code, no ledger index",
            &server,
            "noindex",
            without_index,
            |_| "HOT-NOINDEX".into(),
        )
        .await,
    );
    exact(&pool, &["HOT-NOINDEX".into()], 0, without_index).await;
    let peak_rss_mib = server.peak_rss_kib.load(Ordering::Relaxed) as f64 / 1024.0;
    drop(server);

    println!(
        "\n{ledger_rows} ledger rows, {CONCURRENCY} requests in flight, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  {:<58} {:>8} {:>10} {:>9} {:>9}",
        "", "requests", "per second", "p50 ms", "p99 ms"
    );
    for run in &runs {
        println!(
            "  {:<58} {:>8} {:>10.0} {:>9.2} {:>9.2}",
            run.label,
            run.latencies.len(),
            run.rate(),
            run.percentile(0.50).as_secs_f64() * 1000.0,
            run.percentile(0.99).as_secs_f64() * 1000.0
        );
    }
    println!("  CPU per request, ms (2 cores = 2,000 ms a second):");
    println!(
        "  {:<58} {:>8} {:>10} {:>9}",
        "", "server", "Postgres", "load gen."
    );
    for run in &runs {
        if let Some(cpu) = run.cpu {
            let per = |seconds: f64| seconds * 1000.0 / run.latencies.len() as f64;
            println!(
                "  {:<58} {:>8.3} {:>10.3} {:>9.3}",
                run.label,
                per(cpu.server),
                per(cpu.postgres),
                per(cpu.generator)
            );
        }
    }
    let rate = |i: usize| runs[i].rate();
    println!(
        "  exactness: counter = redemption rows = grants = audit records, after each of the 7 HTTP redeem runs"
    );
    println!("  server peak RSS: {peak_rss_mib:.1} MiB");
    println!("ratios:");
    for (label, a, b) in [
        ("HTTP redeem (hot) / seed's redemption SQL", 3, 0),
        ("HTTP redeem (hot) / single-statement update", 3, 1),
        ("HTTP redeem (hot): a discount code / a credit code", 4, 3),
        ("HTTP preview / prepared SELECT", 6, 2),
        (
            "HTTP checkout quote / prepared SELECT (target >= 0.5)",
            7,
            2,
        ),
        (
            "HTTP checkout commit / seed's redemption SQL (target >= 1)",
            8,
            0,
        ),
        (
            &*format!("HTTP redeem (hot), {ledger_rows} / {small_rows} ledger rows"),
            3,
            9,
        ),
        ("HTTP redeem (hot), with / without the ledger index", 3, 12),
        ("HTTP redeem (hot), TLS to Postgres / plain text", 10, 3),
        ("HTTP redeem (spread), TLS to Postgres / plain text", 11, 5),
    ] {
        println!("  {label:<58} {:>6.2}x", rate(a) / rate(b));
    }
    for (label, rows) in [
        ("single-statement hot-row update", &update_statements),
        ("HTTP redeem, one hot code", &redeem_statements),
        ("HTTP redeem, one hot discount code", &discount_statements),
        ("HTTP checkout commit", &commit_statements),
    ] {
        Statements::print(label, rows);
    }
    // What the database pays per redemption, beside the least a counted grant can cost it.
    let postgres_per = |i: usize| {
        runs[i].cpu.map_or(f64::NAN, |cpu| {
            cpu.postgres / runs[i].latencies.len() as f64
        })
    };
    for (label, a) in [
        ("Postgres CPU: HTTP redeem (hot) / hot-row update", 3),
        (
            "Postgres CPU: HTTP redeem (hot discount) / hot-row update",
            4,
        ),
        ("Postgres CPU: HTTP redeem (spread) / hot-row update", 5),
        ("Postgres CPU: seed's redemption SQL / hot-row update", 0),
    ] {
        println!("  {label:<58} {:>6.2}x", postgres_per(a) / postgres_per(1));
    }
}

/// The hot and the spread redemption again, by a server whose connections to Postgres are TLS
/// (`verify-full` against the CA that signed Postgres's certificate, which the shared Postgres
/// now serves beside plain text), each checked for exactness; the connections checked encrypted.
async fn over_tls(url: &str, pool: &PgPool, n: usize) -> Vec<Run> {
    let dir = tempfile::tempdir().unwrap();
    let pki = voucher_testenv::control_plane::Pki::ensure(dir.path()).unwrap();
    support::postgres().serve_tls(&pki, false).await;
    let ca = pki.dir.join("ca.crt");
    let server = Server::start(&format!(
        "{url}?sslmode=verify-full&sslrootcert={}",
        ca.display()
    ))
    .await;
    let hot = http_redeem(
        "HTTP redeem, one hot code, TLS to Postgres",
        &server,
        "tls-hot",
        n,
        |_| "HOT-TLS".into(),
    )
    .await;
    exact(pool, &["HOT-TLS".into()], 0, n).await;
    // The next 1,000 codes: `exact` counts every grant and audit record of its codes.
    let (spread, before) = spread_codes(pool, 1).await;
    let spread_run = http_redeem(
        "HTTP redeem, spread over 1,000 codes, TLS to Postgres",
        &server,
        "tls-spread",
        n,
        |i| spread[i % SPREAD].clone(),
    )
    .await;
    exact(pool, &spread, before, n).await;
    // Every connection the TLS server holds is encrypted (the plain server's are not).
    let (encrypted, plain): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
         FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() \
           AND a.backend_type = 'client backend'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(
        encrypted > 0 && plain > 0,
        "{encrypted} encrypted, {plain} plain connections"
    );
    vec![hot, spread_run]
}

/// What Postgres spent per statement during a run (pg_stat_statements, where the test
/// Postgres loads it): time, buffers and WAL, per request of the run.
struct Statements {
    pool: Option<PgPool>,
}

/// One statement's cost per request: (statement, calls, exec ms, shared blocks, WAL bytes,
/// whether a client sent it — not a trigger's, whose cost its statement's includes).
type StatementCost = (String, f64, f64, f64, f64, bool);

impl Statements {
    async fn start(pool: &PgPool) -> Self {
        let loaded = sqlx::raw_sql(
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset()",
        )
        .execute(pool)
        .await
        .is_ok();
        Self {
            pool: loaded.then(|| pool.clone()),
        }
    }

    /// The statements of this database since `start`, most expensive first, per request.
    async fn read(self, requests: usize) -> Vec<StatementCost> {
        let Some(pool) = self.pool else {
            return Vec::new();
        };
        let rows: Vec<(String, i64, f64, i64, f64, bool)> = sqlx::query_as(
            "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls, total_exec_time, \
                    shared_blks_hit + shared_blks_read + shared_blks_dirtied, wal_bytes::float8, \
                    toplevel \
             FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND query NOT ILIKE '%pg_stat_statements%' \
             ORDER BY total_exec_time DESC LIMIT 12",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
        let per = |x: f64| x / requests as f64;
        rows.into_iter()
            .map(|(query, calls, time, blocks, wal, toplevel)| {
                let query: String = query.chars().take(70).collect();
                let (calls, blocks) = (per(calls as f64), per(blocks as f64));
                (query, calls, per(time), blocks, per(wal), toplevel)
            })
            .collect()
    }

    fn print(label: &str, rows: &[StatementCost]) {
        if rows.is_empty() {
            return;
        }
        println!("  {label}: Postgres per request, by statement (pg_stat_statements)");
        println!(
            "    {:>6} {:>9} {:>8} {:>9}  statement",
            "calls", "exec ms", "buffers", "WAL B"
        );
        let mut total = (0.0, 0.0, 0.0);
        for (query, calls, time, blocks, wal, toplevel) in rows {
            let nested = if *toplevel { "" } else { "  (in a trigger)" };
            println!("    {calls:>6.2} {time:>9.4} {blocks:>8.1} {wal:>9.0}  {query}{nested}");
            if *toplevel {
                total = (total.0 + time, total.1 + blocks, total.2 + wal);
            }
        }
        println!(
            "    {:>6} {:>9.4} {:>8.1} {:>9.0}  (the client's statements above)",
            "", total.0, total.1, total.2
        );
    }
}
