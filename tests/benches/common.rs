//! What the benchmarks share: a billing database in service, and a process's memory.

#![allow(dead_code)] // each benchmark uses its own part

use std::process::{Command, Stdio};
use std::time::Instant;

use sqlx::PgPool;

/// Ledger rows of the billing database in service: LEDGER_ROWS, a million unless told
/// (`LEDGER_ROWS=10000` for a quick run).
pub fn ledger_rows() -> i64 {
    std::env::var("LEDGER_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// Codes of the billing database in service.
pub const CODES: i64 = 10_000;

/// Fills a migrated database like a billing database in service.
pub async fn seed(pool: &PgPool, ledger_rows: i64) {
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO promo_codes (code, credit_omr, description) \
           SELECT 'C-' || lpad(i::text, 5, '0'), 1 + i % 50, 'campaign ' || i \
           FROM generate_series(1, $1) i",
    )
    .bind(CODES)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO customers (user_id, tenant_id, email) \
           SELECT 'seed-' || i, 'tenant-' || i % 100, 'seed-' || i || '@example.om' \
           FROM generate_series(1, GREATEST($1 / 10, 1)) i",
    )
    .bind(ledger_rows)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO credit_ledger (customer_id, amount_omr, reason) \
           SELECT c.id, 1 + g % 20, 'seed' FROM customers c, generate_series(1, 10) g \
           LIMIT $1",
    )
    .bind(ledger_rows)
    .execute(pool)
    .await
    .unwrap();
    sqlx::raw_sql(
        "INSERT INTO promo_redemptions (customer_id, code) \
           SELECT c.id, 'C-' || lpad((1 + abs(hashtext(c.user_id)) % 10000)::text, 5, '0') \
           FROM customers c; \
         UPDATE promo_codes p SET times_redeemed = r.n \
           FROM (SELECT code, count(*) AS n FROM promo_redemptions GROUP BY code) r \
           WHERE r.code = p.code",
    )
    .execute(pool)
    .await
    .unwrap();
    // On its own: VACUUM cannot run in the transaction a multi-statement query is.
    sqlx::raw_sql("VACUUM ANALYZE").execute(pool).await.unwrap();
    println!(
        "seeded {ledger_rows} ledger rows, {} customers, {CODES} codes in {:.1} s",
        (ledger_rows / 10).max(1),
        started.elapsed().as_secs_f64()
    );
}

/// A field of a process's /proc status, in KiB (VmRSS: now; VmHWM: its peak).
pub fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The controller's release binary watching (and issuing in) `namespace` alone, without
/// leader election, migrations or the relay, its metrics on `port`; each benchmark adds its
/// own flags, then spawns it.
pub fn controller(
    kubeconfig: &std::path::Path,
    database: &str,
    port: u16,
    namespace: &str,
) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_voucher-operator"));
    command
        .args([
            "controller",
            "--leader-election",
            "false",
            "--skip-migrations",
        ])
        .args(["--audit-relay", "false"])
        .args(["--metrics-address", &format!("127.0.0.1:{port}")])
        .args([
            "--watch-namespace",
            namespace,
            "--issuer-namespaces",
            namespace,
        ])
        .env("KUBECONFIG", kubeconfig)
        .env("DATABASE_URL", database)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    command
}
