//! Benchmark: campaign generation at production scale. The controller (the release
//! binary, in its own process) reconciles a VoucherCampaign of 100,000 codes, then one of
//! 1,000,000, applied to the real Kubernetes API server, into a Postgres filled like a
//! billing database in service (LEDGER_ROWS ledger rows, 1,000,000 by default, and 10,000
//! codes). Printed for each: the time from the apply until the status says every code
//! exists (Ready), codes per second, and the controller's peak resident memory, beside
//! baselines measured in the same run:
//!   - the same number of rows written by one `INSERT … SELECT generate_series` in the
//!     database itself (codes and their campaign rows): the floor for writing them;
//!   - the controller's peak memory before any campaign (watching, idle).
//!
//! Then, on the 1,000,000-code campaign: one status aggregate (the counters' query), a
//! deactivation applied to every code (apply → status Inactive), and the deletion that
//! revokes every code (delete → the resource gone).
//!
//! Run: cargo bench --bench campaign        (LEDGER_ROWS=10000 for a quick run)

#[path = "common.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::json;
use sqlx::PgPool;
use voucher_operator::api::campaign::{VoucherCampaign, VoucherCampaignStatus};
use voucher_operator::domain::Owner;
use voucher_operator::domain::campaign::CampaignPhase;
use voucher_operator::store::Store;

const SIZES: [u32; 2] = [100_000, 1_000_000];

/// Writes `n` codes and their campaign rows in two statements inside Postgres.
async fn baseline(pool: &PgPool, n: u32) -> Duration {
    let uid = format!("baseline-{n}");
    sqlx::query("INSERT INTO voucher_campaigns (uid, namespace, name) VALUES ($1, 'bench', $1)")
        .bind(&uid)
        .execute(pool)
        .await
        .unwrap();
    let started = Instant::now();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT set_config('voucher_operator.bulk', 'on', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO promo_codes (code, credit_omr, description, max_redemptions) \
         SELECT $1 || '-' || lpad(i::text, 10, '0'), 5, 'baseline', 1 \
         FROM generate_series(0, $2 - 1) i",
    )
    .bind(uid.to_uppercase())
    .bind(n as i32)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO voucher_campaign_codes (code, campaign_uid, code_index) \
         SELECT $1 || '-' || lpad(i::text, 10, '0'), $2, i FROM generate_series(0, $3 - 1) i",
    )
    .bind(uid.to_uppercase())
    .bind(&uid)
    .bind(n as i32)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    started.elapsed()
}

async fn until(
    api: &Api<VoucherCampaign>,
    name: &str,
    limit: Duration,
    done: impl Fn(Option<&VoucherCampaign>) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        if done(api.get_opt(name).await.unwrap().as_ref()) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{name}: not done within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn status(campaign: Option<&VoucherCampaign>) -> Option<&VoucherCampaignStatus> {
    campaign.and_then(|c| c.status.as_ref())
}

fn ready_with(count: u32) -> impl Fn(Option<&VoucherCampaign>) -> bool {
    move |c| {
        status(c).is_some_and(|s| {
            s.generated == Some(count as i32)
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    }
}

#[tokio::main]
async fn main() {
    let ledger_rows = common::ledger_rows();
    let url = support::fresh_database("bench_campaign").await;
    let pool = support::pool(&url).await;
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    common::seed(&pool, ledger_rows).await;

    // Baselines: the rows written inside Postgres, in a database seeded the same way (rows
    // cannot be removed cheaply again: each deleted code is looked up in promo_redemptions).
    let baseline_url = support::fresh_database("bench_campaign_baseline").await;
    let baseline_pool = support::pool(&baseline_url).await;
    Store::from_pool(baseline_pool.clone())
        .migrate()
        .await
        .unwrap();
    common::seed(&baseline_pool, ledger_rows).await;
    let mut floors = Vec::new();
    for n in SIZES {
        floors.push(baseline(&baseline_pool, n).await);
    }
    baseline_pool.close().await;

    let (client, ns) = support::cluster::setup("bench-campaign").await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = support::cluster::cluster().kubeconfig(dir.path(), &ns);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "bench-key"},
        "stringData": {"key": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let mut child = common::controller(&kubeconfig, &url, support::free_port(), &ns)
        .spawn()
        .expect("start the controller");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_hwm = common::rss_kib(child.id(), "VmHWM:");
    let api: Api<VoucherCampaign> = Api::namespaced(client.clone(), &ns);

    let mut runs = Vec::new();
    for n in SIZES {
        let name = format!("bench-{n}");
        let campaign: VoucherCampaign = serde_json::from_value(json!({
            "apiVersion": "catalyst.openova.io/v1alpha1", "kind": "VoucherCampaign",
            "metadata": {"name": name},
            "spec": {"prefix": format!("B{}-", n / 1000), "count": n, "codeLength": 12, "creditOMR": 5,
                     "keySecretRef": {"name": "bench-key"}},
        }))
        .unwrap();
        api.create(&PostParams::default(), &campaign).await.unwrap();
        let took = until(&api, &name, Duration::from_secs(600), ready_with(n)).await;
        let hwm = common::rss_kib(child.id(), "VmHWM:");
        runs.push((n, took, hwm));
    }

    // The million-code campaign: its counters, a deactivation, a revocation.
    let big = format!("bench-{}", SIZES[1]);
    let uid = api.get(&big).await.unwrap().metadata.uid.unwrap();
    let owner = Owner {
        namespace: ns.clone(),
        name: big.clone(),
        uid,
    };
    let started = Instant::now();
    let counts = store.campaign_counts(&owner).await.unwrap();
    let aggregate = started.elapsed();
    assert_eq!(counts.codes, SIZES[1]);
    let patch = json!({"spec": {"active": false}});
    api.patch(
        &big,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .unwrap();
    let deactivation = until(&api, &big, Duration::from_secs(600), |c| {
        status(c).is_some_and(|s| s.phase == Some(CampaignPhase::Inactive))
    })
    .await;
    let active: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM voucher_campaign_codes c JOIN promo_codes p ON p.code = c.code \
         WHERE c.campaign_uid = $1 AND p.active",
    )
    .bind(&owner.uid)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(active, 0, "every code switched off");
    api.delete(&big, &Default::default()).await.unwrap();
    let revocation = until(&api, &big, Duration::from_secs(600), |c| c.is_none()).await;
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM promo_codes WHERE code LIKE 'B1000-%' AND deleted_at IS NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(live, 0, "every code revoked");
    let _ = child.kill();
    let _ = child.wait();

    println!(
        "\n{ledger_rows} ledger rows, {} cores; the controller as its own process",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  {:<46} {:>9} {:>12} {:>14} {:>9}",
        "", "seconds", "codes/s", "baseline s", "ratio"
    );
    for ((n, took, _), floor) in runs.iter().zip(&floors) {
        println!(
            "  {:<46} {:>9.2} {:>12.0} {:>14.2} {:>8.2}×",
            format!("campaign of {n} codes: apply → Ready"),
            took.as_secs_f64(),
            f64::from(*n) / took.as_secs_f64(),
            floor.as_secs_f64(),
            took.as_secs_f64() / floor.as_secs_f64()
        );
    }
    println!("  (baseline: the same rows written by INSERT … SELECT generate_series in Postgres)");
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!("  controller peak RSS, idle: {:.1} MiB", mib(idle_hwm));
    for (n, _, hwm) in &runs {
        println!(
            "  controller peak RSS, up to {n} codes: {:.1} MiB ({:.2}× idle)",
            mib(*hwm),
            *hwm as f64 / idle_hwm.max(1) as f64
        );
    }
    println!(
        "  1,000,000 codes: counters' aggregate {:.0} ms; deactivate (apply → Inactive) {:.1} s; \
         delete with Revoke (→ gone) {:.1} s",
        aggregate.as_secs_f64() * 1000.0,
        deactivation.as_secs_f64(),
        revocation.as_secs_f64()
    );
}
