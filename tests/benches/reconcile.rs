//! Benchmark: the controller (the real binary, in its own process) reconciling
//! N Vouchers (default 10,000) applied to the real Kubernetes API server
//! (kube-apiserver + etcd) into a real Postgres. Prints the time from the
//! first and from the last apply until every Voucher is reconciled, the
//! controller's resident memory and its writes to the API server per Voucher
//! (from the API server's own request counters), on a first reconcile and on
//! a no-op resync, beside baselines measured in the same run:
//!   - the same N database transactions driven directly, without Kubernetes;
//!   - the controller's memory while idle (watching a namespace with no Vouchers).
//!
//! Run: cargo bench --bench reconcile            (VOUCHERS=1000 for a quick run)

#[path = "common.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

use common::rss_kib;

use std::process::Child;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, PostParams};
use serde_json::json;
use voucher_operator::api::{Voucher, VoucherSpec};
use voucher_operator::domain::{Code, Owner};
use voucher_operator::store::Store;
use voucher_operator::store::sync::Wanted;

fn spec(i: usize) -> VoucherSpec {
    serde_json::from_value(json!({"creditOMR": 1 + (i % 500), "maxRedemptions": i % 7, "description": format!("bench voucher {i}")})).unwrap()
}

/// CPU time (user + system) a process has used so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command; in clock ticks.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    let per_second = voucher_testenv::supervisor::clock_ticks_per_second() as f64;
    ticks as f64 / per_second
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

/// Resync interval of the measured controller: one no-op pass over every Voucher is measured.
const RESYNC: Duration = Duration::from_secs(20);

/// The writes the API server has answered so far, from one read of its
/// `apiserver_request_total`.
#[derive(Clone, Copy, Default)]
struct Writes {
    /// PATCH and APPLY (server-side apply) of Vouchers: the finalizer.
    vouchers: f64,
    /// The same on their status subresource.
    status: f64,
    /// Every write of any resource: the bench's creates, the controller's patches, its Events.
    all: f64,
}

impl Writes {
    async fn read(client: &kube::Client) -> Self {
        let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
        let text = client.request_text(request).await.unwrap();
        let mut writes = Self::default();
        for line in text
            .lines()
            .filter(|l| l.starts_with("apiserver_request_total{"))
        {
            let Some(count) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            let verb = |v: &str| line.contains(&format!("verb=\"{v}\""));
            if !["POST", "PATCH", "APPLY", "PUT", "DELETE"]
                .iter()
                .any(|v| verb(v))
            {
                continue;
            }
            writes.all += count;
            if line.contains("resource=\"vouchers\"") && (verb("PATCH") || verb("APPLY")) {
                if line.contains("subresource=\"status\"") {
                    writes.status += count;
                } else if line.contains("subresource=\"\"") {
                    writes.vouchers += count;
                }
            }
        }
        writes
    }

    fn since(self, before: Self) -> Self {
        Self {
            vouchers: self.vouchers - before.vouchers,
            status: self.status - before.status,
            all: self.all - before.all,
        }
    }
}

fn controller(kubeconfig: &std::path::Path, database: &str, port: u16, namespace: &str) -> Child {
    common::controller(kubeconfig, database, port, namespace)
        .args(["--status-min-interval", "0s"])
        .args(["--resync-interval", &format!("{}s", RESYNC.as_secs())])
        .env("DATABASE_MAX_CONNECTIONS", "16")
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
                        request: Default::default(),
                        deletion_policy: Default::default(),
                        suspended: false,
                        now: chrono::Utc::now(),
                        global: None,
                    })
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    let baseline = started.elapsed();

    // The real thing: the controller binary watching, then N Vouchers applied.
    let database = support::fresh_database("bench").await;
    Store::from_pool(support::pool(&database).await)
        .migrate()
        .await
        .unwrap();
    let cluster = support::cluster::cluster();
    let client = cluster.client().await;
    let bench_ns = support::cluster::namespace(&client, "bench").await;
    let idle_ns = support::cluster::namespace(&client, "idle").await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = cluster.kubeconfig(dir.path(), &bench_ns);

    // Baseline 2: an idle controller's memory.
    let idle_port = support::free_port();
    let mut idle = controller(&kubeconfig, &database, idle_port, &idle_ns);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_rss = rss_kib(idle.id(), "VmRSS:");
    let _ = idle.kill();
    let _ = idle.wait();

    let port = support::free_port();
    let mut child = controller(&kubeconfig, &database, port, &bench_ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    while support::http_get(port, "/readyz").await.is_empty() {
        assert!(
            matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline,
            "the controller did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let vouchers: Api<Voucher> = Api::namespaced(client.clone(), &bench_ns);
    let apiserver_cpu_before = cpu_seconds(cluster.apiserver_pid);
    let writes_before = Writes::read(&client).await;
    let started = Instant::now();
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
    let applied = started.elapsed();
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
    let after_last_apply = elapsed - applied;
    let apiserver_cpu = cpu_seconds(cluster.apiserver_pid) - apiserver_cpu_before;
    let controller_cpu = cpu_seconds(child.id());
    let writes = Writes::read(&client).await.since(writes_before).all;
    // Let the last status patches land before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = Writes::read(&client).await;
    let Writes {
        vouchers: finalizer_patches,
        status: status_patches,
        ..
    } = first.since(writes_before);
    let settled_rss = rss_kib(child.id(), "VmRSS:");

    // A no-op resync: every Voucher is reconciled again and nothing is written.
    let reconciles_before = metric(port, "voucher_operator_reconciles_total{result=\"ok\"}").await;
    tokio::time::sleep(RESYNC + Duration::from_secs(10)).await;
    let resynced =
        metric(port, "voucher_operator_reconciles_total{result=\"ok\"}").await - reconciles_before;
    assert!(
        resynced >= n as f64,
        "the resync reconciled {resynced} of {n} Vouchers: it measured nothing"
    );
    let resync = Writes::read(&client).await.since(first);
    let resync_writes = resync.vouchers + resync.status;
    let hwm = rss_kib(child.id(), "VmHWM:");
    let _ = child.kill();
    let _ = child.wait();

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "reconcile of {n} Vouchers (controller binary, real kube-apiserver {}, real Postgres)",
        voucher_testenv::control_plane::version(&client).await
    );
    println!("  {:<52} {:>10} {:>14}", "", "seconds", "vouchers/s");
    println!(
        "  {:<52} {:>10.2} {:>14.0}",
        "baseline: database transactions alone (8 at once)",
        baseline.as_secs_f64(),
        rate(baseline)
    );
    println!(
        "  {:<52} {:>10.2} {:>14.0}",
        "applying them (32 creates in flight)",
        applied.as_secs_f64(),
        rate(applied)
    );
    println!(
        "  {:<52} {:>10.2} {:>14.0}",
        "controller: first apply to all reconciled",
        elapsed.as_secs_f64(),
        rate(elapsed)
    );
    println!(
        "  {:<52} {:>10.2}",
        "controller: last apply to all reconciled",
        after_last_apply.as_secs_f64()
    );
    println!(
        "  ratio to the database baseline: {:.2}x the time",
        elapsed.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "  CPU time until all reconciled: kube-apiserver {apiserver_cpu:.1} s ({:.0}% of one core), \
         controller {controller_cpu:.1} s; {} cores in all",
        100.0 * apiserver_cpu / elapsed.as_secs_f64(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "  writes the API server answered until then: {writes} ({:.1} per Voucher: create, finalizer, \
         status, Event), {:.0} per second, {:.1} ms of its CPU each",
        writes / n as f64,
        writes / elapsed.as_secs_f64(),
        1000.0 * apiserver_cpu / writes
    );
    println!("  writes to the API server per Voucher (its apiserver_request_total):");
    println!(
        "    first reconcile: {:.2} (finalizer patches {finalizer_patches}, status patches {status_patches})",
        (finalizer_patches + status_patches) / n as f64
    );
    println!(
        "    no-op resync:    {:.2} ({resync_writes} writes during a pass of {resynced} reconciles)",
        resync_writes / n as f64
    );
    println!("  {:<52} {:>10}", "resident memory", "MiB");
    println!(
        "  {:<52} {:>10.1}",
        "baseline: idle controller (no Vouchers)",
        idle_rss as f64 / 1024.0
    );
    println!(
        "  {:<52} {:>10.1}",
        format!("with {n} Vouchers, settled"),
        settled_rss as f64 / 1024.0
    );
    println!(
        "  {:<52} {:>10.1}",
        "with them, peak (VmHWM)",
        hwm.max(peak) as f64 / 1024.0
    );
}
