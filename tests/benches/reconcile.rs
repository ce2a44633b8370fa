//! Benchmark: the controller (the real binary, in its own process) reconciling
//! N Vouchers (default 10,000) served by the local API endpoint into a real
//! Postgres. Prints vouchers per second and the controller's resident memory,
//! beside baselines measured in the same run:
//!   - the same N database transactions driven directly, without Kubernetes;
//!   - the controller's memory while idle (watching a namespace with no Vouchers).
//!
//! Run: cargo bench --bench reconcile            (VOUCHERS=1000 for a quick run)

#[path = "../support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, PostParams};
use serde_json::json;
use voucher_operator::api::{Voucher, VoucherSpec};
use voucher_operator::domain::{Code, Owner};
use voucher_operator::local::apiserver::LocalApiConfig;
use voucher_operator::store::Store;
use voucher_operator::store::sync::Wanted;

fn spec(i: usize) -> VoucherSpec {
    serde_json::from_value(json!({"creditOMR": 1 + (i % 500), "maxRedemptions": i % 7, "description": format!("bench voucher {i}")})).unwrap()
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn metric(port: u16, name: &str) -> f64 {
    support::http_get(port, "/metrics")
        .await
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn controller(kubeconfig: &std::path::Path, database: &str, port: u16, namespace: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
        .args([
            "controller",
            "--leader-election",
            "false",
            "--status-min-interval",
            "0s",
            "--skip-migrations",
            "--audit-relay",
            "false",
        ])
        .args([
            "--metrics-address",
            &format!("127.0.0.1:{port}"),
            "--watch-namespace",
            namespace,
        ])
        .env("KUBECONFIG", kubeconfig)
        .env("DATABASE_URL", database)
        .env("DATABASE_MAX_CONNECTIONS", "16")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the controller")
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("VOUCHERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);

    // Baseline 1: the controller's database work alone, 8 at a time.
    let baseline_db = support::fresh_database("bench_baseline").await;
    let store = Store::from_pool(support::pool(&baseline_db).await);
    store.migrate().await.unwrap();
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let store = store.clone();
            async move {
                let code = Code::parse(&format!("bench-{i:05}")).unwrap();
                let owner = Owner {
                    namespace: "bench".into(),
                    name: format!("bench-{i:05}"),
                    uid: format!("uid-{i}"),
                };
                let terms = spec(i).terms();
                store
                    .sync_voucher(&Wanted {
                        code: &code,
                        owner: &owner,
                        generation: 1,
                        terms: &terms,
                        now: chrono::Utc::now(),
                    })
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    let baseline = started.elapsed();

    // The real thing: N Vouchers in the local API, then the controller binary.
    let database = support::fresh_database("bench").await;
    Store::from_pool(support::pool(&database).await)
        .migrate()
        .await
        .unwrap();
    let api_config = LocalApiConfig {
        watch_log_capacity: 4 * n + 1_000,
        ..Default::default()
    };
    let (api_url, client) = support::local_api(api_config).await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    for ns in ["bench", "idle"] {
        let object = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        namespaces
            .create(&PostParams::default(), &object)
            .await
            .unwrap();
    }
    let vouchers: Api<Voucher> = Api::namespaced(client.clone(), "bench");
    futures::stream::iter(0..n)
        .map(|i| {
            let vouchers = vouchers.clone();
            async move {
                vouchers
                    .create(
                        &PostParams::default(),
                        &Voucher::new(&format!("bench-{i:05}"), spec(i)),
                    )
                    .await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = support::kubeconfig(dir.path(), &api_url);

    // Baseline 2: an idle controller's memory.
    let idle_port = support::free_port();
    let mut idle = controller(&kubeconfig, &database, idle_port, "idle");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_rss = rss_kib(idle.id(), "VmRSS:");
    let _ = idle.kill();
    let _ = idle.wait();

    let port = support::free_port();
    let started = Instant::now();
    let mut child = controller(&kubeconfig, &database, port, "bench");
    let mut peak = 0;
    loop {
        peak = peak.max(rss_kib(child.id(), "VmRSS:"));
        let active = metric(port, "voucher_operator_vouchers{phase=\"Active\"}").await
            + metric(port, "voucher_operator_vouchers{phase=\"Exhausted\"}").await;
        if active as usize >= n {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "the controller did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    let patches = metric(port, "voucher_operator_status_patches_total").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled_rss = rss_kib(child.id(), "VmRSS:");
    let hwm = rss_kib(child.id(), "VmHWM:");
    let _ = child.kill();
    let _ = child.wait();

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!("reconcile of {n} Vouchers (controller binary, local API endpoint, real Postgres)");
    println!("  {:<46} {:>10} {:>14}", "", "seconds", "vouchers/s");
    println!(
        "  {:<46} {:>10.2} {:>14.0}",
        "baseline: database transactions alone (8 at once)",
        baseline.as_secs_f64(),
        rate(baseline)
    );
    println!(
        "  {:<46} {:>10.2} {:>14.0}",
        "controller: watch, finalizer, sync, status",
        elapsed.as_secs_f64(),
        rate(elapsed)
    );
    println!("  status patches: {patches}");
    println!("  {:<46} {:>10}", "resident memory", "MiB");
    println!(
        "  {:<46} {:>10.1}",
        "baseline: idle controller (no Vouchers)",
        idle_rss as f64 / 1024.0
    );
    println!(
        "  {:<46} {:>10.1}",
        format!("with {n} Vouchers, settled"),
        settled_rss as f64 / 1024.0
    );
    println!(
        "  {:<46} {:>10.1}",
        "with them, peak (VmHWM)",
        hwm.max(peak) as f64 / 1024.0
    );
}
