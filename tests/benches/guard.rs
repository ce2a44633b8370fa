//! Benchmark: what the database's guard (DESIGN §13) costs, and what it buys, on a billing
//! database in service (LEDGER_ROWS ledger rows, 1,000,000 by default; 100,000 customers;
//! 10,000 codes). Both halves are measured in the same run:
//!
//! 1. The redemption's price: the operator's redemption (`Store::redeem`, 32 in flight, new
//!    customers on the seeded codes) in rounds alternating with the guard's trigger enabled and
//!    disabled (by the schema owner), so that each mode's spread across its own rounds shows
//!    beside the ratio of the two.
//! 2. The kill switch: a campaign of 1,000,000 codes switched off — the one-row switch (the
//!    campaign's row; then the time until its last code is refused to the legacy checkout's
//!    INSERT, and by the preview's lookup and the operator's redemption) beside today's full
//!    rewrite of its rows (`UPDATE … SET active = false` over every code: what stood between a
//!    leak and its last code refused before). It fails if the switch takes more than 1 s to
//!    reach every path.
//!
//! Run: cargo bench --bench guard        (LEDGER_ROWS=10000 for a quick run)

#[path = "common.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use sqlx::PgPool;
use voucher_operator::domain::{Code, DeletionPolicy, Owner, Terms};
use voucher_operator::store::Store;
use voucher_operator::store::campaigns::TermsPass;
use voucher_operator::store::redeem::Redemption;

const IN_FLIGHT: usize = 32;
const PER_ROUND: usize = 3_000;
const ROUNDS: usize = 3;
const CAMPAIGN: i64 = 1_000_000;

/// Redemptions per second of `PER_ROUND` new customers `{round}-i` on the seeded codes.
async fn round(store: &Store, round: &str) -> f64 {
    let started = Instant::now();
    let granted = futures::stream::iter(0..PER_ROUND)
        .map(|i| {
            let store = store.clone();
            let subject = format!("{round}-{i}");
            let code = Code::parse(&format!("C-{:05}", 1 + (i * 7919) % 10_000)).unwrap();
            async move {
                let redemption = Redemption {
                    code,
                    subject,
                    tenant: Some("bench".into()),
                    email: String::new(),
                    idempotency: None,
                    now: chrono::Utc::now(),
                    currency: Default::default(),
                    intent: None,
                };
                let answer = store.redeem(&redemption).await.unwrap();
                matches!(
                    answer,
                    voucher_operator::store::redeem::Answer::Fresh(
                        voucher_operator::store::redeem::Redeemed::Granted { .. }
                    )
                )
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .filter(|granted| futures::future::ready(*granted))
        .count()
        .await;
    assert_eq!(granted, PER_ROUND, "every redemption of the round granted");
    PER_ROUND as f64 / started.elapsed().as_secs_f64()
}

async fn guard(pool: &PgPool, on: bool) {
    let statement = match on {
        true => "ALTER TABLE promo_redemptions ENABLE TRIGGER voucher_operator_guard",
        false => "ALTER TABLE promo_redemptions DISABLE TRIGGER voucher_operator_guard",
    };
    sqlx::query(statement).execute(pool).await.unwrap();
}

fn spread(figures: &[f64]) -> (f64, f64, f64) {
    let mean = figures.iter().sum::<f64>() / figures.len() as f64;
    let min = figures.iter().copied().fold(f64::INFINITY, f64::min);
    let max = figures.iter().copied().fold(0.0, f64::max);
    (mean, min, max)
}

/// The legacy checkout's redemption INSERT for `code`: refused by the guard?
async fn refused(pool: &PgPool, code: &str) -> bool {
    let mut tx = pool.begin().await.unwrap();
    let customer: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO customers (user_id, tenant_id, email) \
         VALUES ('probe-' || gen_random_uuid(), 't', '') RETURNING id",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let inserted = sqlx::query("INSERT INTO promo_redemptions (customer_id, code) VALUES ($1, $2)")
        .bind(customer)
        .bind(code)
        .execute(&mut *tx)
        .await;
    let _ = tx.rollback().await;
    inserted.is_err()
}

#[tokio::main]
async fn main() {
    let url = support::fresh_database("bench_guard").await;
    let pool = support::pool(&url).await;
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    common::seed(&pool, common::ledger_rows()).await;

    // 1. The redemption's price, rounds alternating.
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        for on in [true, false] {
            guard(&pool, on).await;
            let label = format!("r{r}-{}", if on { "on" } else { "off" });
            let rate = round(&store, &label).await;
            println!(
                "round {r}, guard {:>3}: {rate:>7.0} redemptions/s",
                if on { "on" } else { "off" }
            );
            match on {
                true => with.push(rate),
                false => without.push(rate),
            }
        }
    }
    guard(&pool, true).await;
    let (on_mean, on_min, on_max) = spread(&with);
    let (off_mean, off_min, off_max) = spread(&without);
    println!();
    println!(
        "| redemption ({IN_FLIGHT} in flight) | mean /s | min /s | max /s | spread (max/min) |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| guard on | {on_mean:.0} | {on_min:.0} | {on_max:.0} | {:.2} |",
        on_max / on_min
    );
    println!(
        "| guard off (baseline) | {off_mean:.0} | {off_min:.0} | {off_max:.0} | {:.2} |",
        off_max / off_min
    );
    println!("| ratio on/off | {:.2} | | | |", on_mean / off_mean);

    // 2. The kill switch on a campaign of a million codes.
    let owner = Owner {
        namespace: "bench".into(),
        name: "million".into(),
        uid: "bench-million".into(),
    };
    let started = Instant::now();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO voucher_campaigns (uid, namespace, name, generated) \
           VALUES ('bench-million', 'bench', 'million', {CAMPAIGN}); \
         SELECT set_config('voucher_operator.bulk', 'on', false); \
         INSERT INTO promo_codes (code, credit_omr, max_redemptions) \
           SELECT 'MIL-' || lpad(i::text, 7, '0'), 5, 1 FROM generate_series(0, {CAMPAIGN} - 1) i; \
         INSERT INTO voucher_campaign_codes (code, campaign_uid, code_index) \
           SELECT 'MIL-' || lpad(i::text, 7, '0'), 'bench-million', i \
           FROM generate_series(0, {CAMPAIGN} - 1) i; \
         SELECT set_config('voucher_operator.bulk', 'off', false); \
         ANALYZE promo_codes; ANALYZE voucher_campaign_codes;"
    )))
    .execute(&pool)
    .await
    .unwrap();
    println!();
    println!(
        "a campaign of {CAMPAIGN} codes written in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    store
        .register_campaign(&owner, DeletionPolicy::Revoke)
        .await
        .unwrap();
    let last = format!("MIL-{:07}", CAMPAIGN - 1);
    assert!(!refused(&pool, &last).await, "live before the switch");
    let on = Terms {
        max_redemptions: 1,
        ..Terms::granting(5)
    };
    let off = Terms {
        active: false,
        ..on.clone()
    };
    let started = Instant::now();
    let change = TermsPass::Change {
        before: Some(&on),
        codes: CAMPAIGN as u32,
    };
    store
        .apply_campaign_terms(&owner, (0, 0), &off, 2, &change)
        .await
        .unwrap();
    let switched = started.elapsed();
    assert!(refused(&pool, &last).await, "the last code refused");
    let until_refused = started.elapsed();
    // The operator's own paths read the same row: the preview's lookup and the redemption.
    let code = Code::parse(&last).unwrap();
    let record = store.find_live(&code).await.unwrap();
    assert!(
        voucher_operator::domain::Redeemability::of(record.as_ref(), chrono::Utc::now())
            .is_hidden(),
        "the preview answers 404"
    );
    let redemption = Redemption {
        code: code.clone(),
        subject: "after-the-switch".into(),
        tenant: Some("bench".into()),
        email: String::new(),
        idempotency: None,
        now: chrono::Utc::now(),
        currency: Default::default(),
        intent: None,
    };
    let answer = store.redeem(&redemption).await.unwrap();
    assert_eq!(
        answer,
        voucher_operator::store::redeem::Answer::Fresh(
            voucher_operator::store::redeem::Redeemed::NotFound
        ),
        "the redemption answers 404"
    );
    let until_every_path = started.elapsed();

    // Today's way: every row rewritten before the last one is refused.
    let started = Instant::now();
    sqlx::query(
        "UPDATE promo_codes p SET active = false FROM voucher_campaign_codes c \
         WHERE c.campaign_uid = 'bench-million' AND p.code = c.code AND p.active",
    )
    .execute(&pool)
    .await
    .unwrap();
    let rewrite = started.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!();
    println!("| switching off {CAMPAIGN} codes | until the last code is refused |");
    println!("|---|---|");
    println!(
        "| the one-row switch (the guard) | {:.1} ms (the switch itself {:.1} ms; \
         refused by the preview and the redemption too after {:.1} ms) |",
        ms(until_refused),
        ms(switched),
        ms(until_every_path)
    );
    println!(
        "| the full rewrite of the rows (baseline) | {:.1} ms |",
        ms(rewrite)
    );
    println!(
        "| ratio | {:.4} |",
        until_refused.as_secs_f64() / rewrite.as_secs_f64()
    );
    // The kill switch's promise (#24): off on every path within 1 s, whatever `count` is.
    assert!(
        until_every_path < Duration::from_secs(1),
        "switching off {CAMPAIGN} codes took {:.1} ms to reach every path, beyond 1 s",
        ms(until_every_path)
    );
}
