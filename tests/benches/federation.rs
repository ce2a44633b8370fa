//! Benchmark: what a global voucher costs a Sovereign (DESIGN §11, docs/federation.md). Two
//! Sovereigns, each its own billing database in service (LEDGER_ROWS ledger rows, 1,000,000 by
//! default) and its own NATS leaf node (its own JetStream domain) linked to the hub's
//! nats-server, where two replicas of the allotment service answer. Each Sovereign's leader
//! keeps its share topped up (a step of 800 units, asked for once fewer than 400 are left).
//!
//! In the same run, in rounds that rotate: new customers redeeming a global code on both
//! Sovereigns at once, the same load on a global code that is once per customer on any Sovereign
//! (`perCustomer: Global`: each redemption claims its customer at the hub first), and on a
//! Sovereign-scoped code of each — the baseline. The allotment is meant to stay off the
//! redemption's path: the global rate should be at least 0.9× the baseline's. A claim is on the
//! path by design (one round trip to the hub per customer): its ratio is printed, not held to a
//! target. Printed: the rates and their ratios, each mode's p50/p99 latency, and the allotment
//! requests the hub answered per 1,000 global redemptions.
//!
//! Run: cargo bench --bench federation        (LEDGER_ROWS=10000 for a quick run)

#[path = "common.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use voucher_operator::domain::Code;
use voucher_operator::domain::allotment::Record;
use voucher_operator::federation::claimer::Claimer;
use voucher_operator::federation::sovereign::{self, Refill};
use voucher_operator::federation::{allotment, claims};
use voucher_operator::store::Store;
use voucher_operator::store::redeem::{Answer, Redeemed, Redemption};
use voucher_testenv::services::{SERVER_USER, server_password};

const IN_FLIGHT: usize = 32;
const PER_ROUND: usize = 2_000;
/// A multiple of the three modes: each comes first, second and third equally often.
const ROUNDS: usize = 6;
/// The shipped subjects: a Sovereign's NATS account imports only those.
const PREFIX: &str = voucher_operator::federation::allotment::SUBJECT_PREFIX;
/// A refill asked for once fewer than this many units are left: about a second of this load's
/// redemptions at one Sovereign (docs/federation.md: size it to a second of the peak rate).
const LOW_WATER: u64 = 400;
const STEP: u64 = 800;

/// A Sovereign's billing database in service, with a global code (registered, share 0) and a
/// Sovereign-scoped one.
async fn sovereign_database(global: &Code, once: &Code) -> Store {
    let url = support::fresh_database("bench_federation").await;
    let pool = support::pool(&url).await;
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    common::seed(&pool, common::ledger_rows()).await;
    for code in [global.as_str(), once.as_str(), "LOCAL-BENCH"] {
        sqlx::query(
            "INSERT INTO promo_codes (code, credit_omr, description, active, max_redemptions) \
             VALUES ($1, 5, 'bench', true, 0)",
        )
        .bind(code)
        .execute(&pool)
        .await
        .unwrap();
    }
    store
        .register_global(global, &format!("uid-{global}"))
        .await
        .unwrap();
    store
        .register_global_as(once, &format!("uid-{once}"), true)
        .await
        .unwrap();
    store
}

/// One round on both Sovereigns at once: `PER_ROUND` new customers each on `code`. The rate
/// (redemptions per second, both together), every redemption's latency, and how often a
/// customer was told to try again (a share used up before its refill landed).
async fn round(
    stores: &[Store],
    claimers: &[Claimer],
    code: &Code,
    round: &str,
) -> (f64, Vec<Duration>, u64) {
    let started = Instant::now();
    let retries = Arc::new(AtomicU64::new(0));
    let requests = stores.iter().enumerate().flat_map(|(s, store)| {
        (0..PER_ROUND).map(move |i| (s, store.clone(), format!("{round}-s{s}-{i}")))
    });
    let latencies: Vec<Duration> = futures::stream::iter(requests)
        .map(|(s, store, subject)| {
            let (code, retries, claimer) = (code.clone(), retries.clone(), &claimers[s]);
            async move {
                let began = Instant::now();
                loop {
                    let redemption = Redemption {
                        code: code.clone(),
                        subject: subject.clone(),
                        tenant: Some("bench".into()),
                        email: String::new(),
                        idempotency: None,
                        now: chrono::Utc::now(),
                        currency: Default::default(),
                        intent: None,
                    };
                    let answer = match store.redeem(&redemption).await.unwrap() {
                        // Once per customer anywhere: the hub's claim first, as the server does.
                        Answer::ClaimNeeded => claimer.redeem(&store, redemption).await.unwrap(),
                        answer => answer,
                    };
                    match answer {
                        Answer::Fresh(Redeemed::Granted { .. }) => return began.elapsed(),
                        // A share used up before the refill landed: the customer asks again.
                        Answer::Fresh(Redeemed::Gone(
                            voucher_operator::domain::Redeemability::ShareUsedUp,
                        )) => {
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        other => panic!("{subject}: {other:?}"),
                    }
                }
            }
        })
        .buffer_unordered(IN_FLIGHT * stores.len())
        .collect()
        .await;
    let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();
    (rate, latencies, retries.load(Ordering::Relaxed))
}

fn percentile(latencies: &mut [Duration], p: f64) -> f64 {
    latencies.sort();
    let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
    latencies[i].as_secs_f64() * 1000.0
}

fn spread(figures: &[f64]) -> (f64, f64, f64) {
    let mean = figures.iter().sum::<f64>() / figures.len() as f64;
    let min = figures.iter().copied().fold(f64::INFINITY, f64::min);
    let max = figures.iter().copied().fold(0.0, f64::max);
    (mean, min, max)
}

#[tokio::main]
async fn main() {
    let hub_leaf_port = support::free_port();
    let hub = support::nats_hub(hub_leaf_port, &["sov1", "sov2"]);
    let connect = |url: String| async move { async_nats::connect(url).await.unwrap() };
    let kv = allotment::bucket(&jetstream::new(connect(hub.url.clone()).await), 1)
        .await
        .unwrap();
    let global = Code::parse("WORLD-BENCH").unwrap();
    let once = Code::parse("ONCE-BENCH").unwrap();
    for code in [&global, &once] {
        let record = Record::new(format!("uid-{code}"), 10_000_000, 10_000_000, 1_000);
        allotment::define(&kv, code.as_str(), &record)
            .await
            .unwrap();
    }
    let stop = CancellationToken::new();
    for _ in 0..2 {
        allotment::start(
            connect(hub.url.clone()).await,
            kv.clone(),
            PREFIX,
            stop.clone(),
        )
        .await
        .unwrap();
    }
    let claimed = claims::bucket(&jetstream::new(connect(hub.url.clone()).await), 1)
        .await
        .unwrap();
    for _ in 0..2 {
        let client = connect(hub.url.clone()).await;
        claims::start(
            client,
            claimed.clone(),
            claims::SUBJECT_PREFIX,
            stop.clone(),
        )
        .await
        .unwrap();
    }
    // Every request the hub's replicas answer, counted by a plain subscriber beside them.
    let requests = Arc::new(AtomicU64::new(0));
    let mut watched = connect(hub.url.clone())
        .await
        .subscribe(format!("{PREFIX}.*"))
        .await
        .unwrap();
    let counter = requests.clone();
    tokio::spawn(async move {
        while watched.next().await.is_some() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let mut stores = Vec::new();
    let mut leaves = Vec::new();
    let mut claimers = Vec::new();
    for i in 1..=2 {
        let name = format!("sov{i}");
        let leaf = support::nats_leaf(&name, hub_leaf_port);
        let store = sovereign_database(&global, &once).await;
        // The server's credentials on its leaf node: claims only.
        let server = async_nats::ConnectOptions::with_user_and_password(
            SERVER_USER.into(),
            server_password(&name),
        )
        .connect(&leaf.url)
        .await
        .unwrap();
        claimers.push(Claimer {
            client: server,
            sovereign: name.clone(),
            prefix: claims::SUBJECT_PREFIX.into(),
            key: b"the vendor's claim key, for the bench".to_vec(),
            timeout: Duration::from_secs(2),
            recover_after: Duration::from_secs(30),
        });
        let refill = Refill {
            sovereign: name,
            prefix: PREFIX.into(),
            low_water: LOW_WATER,
            step: STEP,
            timeout: Duration::from_secs(2),
        };
        let client = connect(leaf.url.clone()).await;
        tokio::spawn(sovereign::run(
            store.clone(),
            client,
            refill,
            Duration::from_millis(100),
            stop.clone(),
        ));
        stores.push(store);
        leaves.push(leaf);
    }
    // Warm: each Sovereign holds a first share before the clock starts.
    let local = Code::parse("LOCAL-BENCH").unwrap();
    for code in [&global, &once, &local] {
        let _ = round(&stores, &claimers, code, &format!("warm-{code}")).await;
    }
    let (mut global_rates, mut local_rates, mut once_rates) = (Vec::new(), Vec::new(), Vec::new());
    let (mut global_lat, mut local_lat, mut once_lat) = (Vec::new(), Vec::new(), Vec::new());
    let (mut global_requests, mut global_retries) = (0, 0);
    // Rounds rotate, and so does which mode comes first: none is favoured by what another
    // left behind (dead row versions, a checkpoint, autovacuum).
    for r in 0..ROUNDS {
        for turn in 0..3 {
            match (r + turn) % 3 {
                0 => {
                    let before = requests.load(Ordering::Relaxed);
                    let (rate, lat, retries) =
                        round(&stores, &claimers, &global, &format!("g{r}")).await;
                    global_requests += requests.load(Ordering::Relaxed) - before;
                    global_retries += retries;
                    global_rates.push(rate);
                    global_lat.extend(lat);
                }
                1 => {
                    let (rate, lat, _) = round(&stores, &claimers, &once, &format!("o{r}")).await;
                    once_rates.push(rate);
                    once_lat.extend(lat);
                }
                _ => {
                    let (rate, lat, _) = round(&stores, &claimers, &local, &format!("l{r}")).await;
                    local_rates.push(rate);
                    local_lat.extend(lat);
                }
            }
        }
    }
    let (g, g_min, g_max) = spread(&global_rates);
    let (l, l_min, l_max) = spread(&local_rates);
    let (o, o_min, o_max) = spread(&once_rates);
    let redeemed = (ROUNDS * PER_ROUND * stores.len()) as f64;
    println!(
        "two Sovereigns at once, {IN_FLIGHT} in flight each, {} ledger rows each, {ROUNDS} rounds of {PER_ROUND} per Sovereign:",
        common::ledger_rows()
    );
    println!(
        "  global voucher:            {g:8.0} redemptions/s (rounds {g_min:.0}–{g_max:.0}), p50 {:.1} ms, p99 {:.1} ms",
        percentile(&mut global_lat, 0.50),
        percentile(&mut global_lat, 0.99)
    );
    println!(
        "  Sovereign-scoped voucher:  {l:8.0} redemptions/s (rounds {l_min:.0}–{l_max:.0}), p50 {:.1} ms, p99 {:.1} ms",
        percentile(&mut local_lat, 0.50),
        percentile(&mut local_lat, 0.99)
    );
    println!(
        "  once per customer anywhere: {o:7.0} redemptions/s (rounds {o_min:.0}–{o_max:.0}), p50 {:.1} ms, p99 {:.1} ms",
        percentile(&mut once_lat, 0.50),
        percentile(&mut once_lat, 0.99)
    );
    println!("  global / Sovereign-scoped: {:.2}× (target ≥ 0.9×)", g / l);
    println!(
        "  once anywhere / Sovereign-scoped: {:.2}× (a claim at the hub per customer, by design)",
        o / l
    );
    println!(
        "  allotment requests answered by the hub: {global_requests} for {redeemed:.0} global redemptions = {:.1} per 1,000; customers told to try again (503): {global_retries}",
        global_requests as f64 * 1000.0 / redeemed
    );
    let hub_record = allotment::read(&kv, global.as_str())
        .await
        .unwrap()
        .unwrap()
        .0;
    println!(
        "  the hub's record: {} units granted ({}), the cap never passed",
        hub_record.granted(),
        hub_record.summary()
    );
    stop.cancel();
    drop(leaves);
}
