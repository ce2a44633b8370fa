//! The controller end to end: kube-runtime against the real Kubernetes API
//! server (kube-apiserver + etcd, shared by the tests of this binary, a
//! namespace each) and a real Postgres. Each reconciliation rule has a test
//! that fails without it.

mod support;

use support::eventually_within;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use voucher_operator::api::{Voucher, VoucherSpec};
use voucher_operator::controller::metrics::{Metrics, ResultLabel};
use voucher_operator::controller::voucher::FINALIZER;
use voucher_operator::controller::{self, Context, Settings};
use voucher_operator::domain::{Issuers, Phase};
use voucher_operator::store::Store;

struct Harness {
    client: kube::Client,
    /// This test's namespace; the controller watches only it.
    ns: String,
    pool: PgPool,
    ctx: Arc<Context>,
    stop: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn settings() -> Settings {
    Settings {
        resync_interval: Duration::from_secs(3600),
        status_min_interval: Duration::from_millis(500),
        namespace: None,
        identity: "test".into(),
        concurrency: 4,
        // Set to the test's namespace by the harness unless a test says otherwise.
        issuers: Issuers::new(Vec::<String>::new()),
        key_namespace: "voucher-campaign-keys".into(),
        global_namespace: "catalyst-global".into(),
        joined: None,
        billing: Default::default(),
    }
}

/// A controller for a namespace of its own, on a fresh database; with
/// `faults`, it talks to the API server through the fault-injecting proxy.
async fn harness_with(mut settings: Settings, faults: Option<support::faults::Faults>) -> Harness {
    support::init_tracing();
    let url = support::fresh_database("controller").await;
    let pool = support::pool(&url).await;
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    let (admin, ns) = support::cluster::setup("controller").await;
    let client = match faults {
        None => admin,
        Some(faults) => {
            let proxy = support::faults::proxy(faults).await;
            kube::Client::try_from(kube::Config::new(proxy.parse().unwrap())).unwrap()
        }
    };
    settings.namespace = Some(ns.clone());
    if settings.issuers == Issuers::new(Vec::<String>::new()) {
        settings.issuers = Issuers::new([ns.clone()]);
    }
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let ctx = Context::new(client.clone(), store, metrics, settings);
    let stop = CancellationToken::new();
    tokio::spawn(controller::voucher::run(ctx.clone(), stop.clone()));
    Harness {
        client,
        ns,
        pool,
        ctx,
        stop,
    }
}

async fn harness() -> Harness {
    harness_with(settings(), None).await
}

impl Harness {
    /// Another namespace, watched by a second controller on the same
    /// database (as a second installation sharing the billing database).
    async fn second_namespace(&self, prefix: &str) -> String {
        let ns = support::cluster::namespace(&self.client, prefix).await;
        let ctx = Context::new(
            self.client.clone(),
            self.ctx.store.clone(),
            self.ctx.metrics.clone(),
            Settings {
                namespace: Some(ns.clone()),
                issuers: Issuers::new([ns.clone()]),
                ..settings()
            },
        );
        tokio::spawn(controller::voucher::run(ctx, self.stop.clone()));
        ns
    }

    fn vouchers(&self, namespace: &str) -> Api<Voucher> {
        Api::namespaced(self.client.clone(), namespace)
    }

    async fn create(&self, namespace: &str, name: &str, spec: serde_json::Value) -> Voucher {
        let spec: VoucherSpec = serde_json::from_value(spec).unwrap();
        self.vouchers(namespace)
            .create(&PostParams::default(), &Voucher::new(name, spec))
            .await
            .unwrap()
    }

    async fn audit_kinds(&self, code: &str) -> Vec<String> {
        sqlx::query_scalar("SELECT kind FROM voucher_audit_outbox WHERE code = $1 ORDER BY seq")
            .bind(code)
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    async fn row(&self, code: &str) -> Option<(i32, bool, i32, Option<chrono::DateTime<Utc>>)> {
        sqlx::query_as("SELECT credit_omr, active, times_redeemed, deleted_at FROM promo_codes WHERE code = $1")
            .bind(code)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
    }

    async fn xmin(&self, code: &str) -> String {
        sqlx::query_scalar("SELECT xmin::text FROM promo_codes WHERE code = $1")
            .bind(code)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Waits until the Voucher satisfies `check`.
    async fn until(
        &self,
        namespace: &str,
        name: &str,
        what: &str,
        check: impl Fn(&Voucher) -> bool,
    ) -> Voucher {
        let api = self.vouchers(namespace);
        eventually(what, || async {
            api.get_opt(name).await.unwrap().filter(|v| check(v))
        })
        .await
    }

    async fn events(&self, name: &str) -> Vec<(String, String)> {
        self.events_in(&self.ns, name).await
    }

    async fn events_in(&self, namespace: &str, name: &str) -> Vec<(String, String)> {
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let params = ListParams::default().fields(&format!("regarding.name={name}"));
        api.list(&params)
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default()))
            .collect()
    }
}

async fn eventually<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(Duration::from_secs(10), what, probe).await
}

fn phase(v: &Voucher) -> Option<Phase> {
    v.status.as_ref().and_then(|s| s.phase)
}

fn ready(v: &Voucher) -> Option<(String, String)> {
    condition(v, "Ready")
}

fn condition(v: &Voucher, type_: &str) -> Option<(String, String)> {
    v.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn a_new_voucher_gets_its_row_binding_finalizer_and_status() {
    let h = harness().await;
    h.create(
        &h.ns,
        "launch-50",
        json!({"creditOMR": 50, "maxRedemptions": 10}),
    )
    .await;
    let v = h
        .until(&h.ns, "launch-50", "status Active", |v| {
            phase(v) == Some(Phase::Active)
        })
        .await;

    assert!(
        v.metadata
            .finalizers
            .clone()
            .unwrap()
            .contains(&FINALIZER.to_owned())
    );
    assert_eq!(ready(&v), Some(("True".into(), "Reconciled".into())));
    let status = v.status.clone().unwrap();
    assert_eq!(status.code.as_deref(), Some("LAUNCH-50"));
    assert_eq!(
        (status.times_redeemed, status.remaining),
        (Some(0), Some(10))
    );
    assert_eq!(status.observed_generation, v.metadata.generation);
    assert!(status.last_synced_at.is_some());

    assert_eq!(h.row("LAUNCH-50").await, Some((50, true, 0, None)));
    let uid: String =
        sqlx::query_scalar("SELECT uid FROM voucher_bindings WHERE code = 'LAUNCH-50'")
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert_eq!(Some(uid), v.metadata.uid);
    assert_eq!(h.audit_kinds("LAUNCH-50").await, ["created"]);
    assert!(
        h.events("launch-50")
            .await
            .contains(&("Normal".into(), "Created".into()))
    );
}

#[tokio::test]
async fn a_failing_database_is_reported_with_the_operation_and_code_then_retried() {
    let h = harness().await;
    h.create(&h.ns, "lost-1", json!({"creditOMR": 5})).await;
    h.until(&h.ns, "lost-1", "status Active", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    // The bindings table goes missing: every sync fails until it is back.
    sqlx::query("ALTER TABLE voucher_bindings RENAME TO voucher_bindings_away")
        .execute(&h.pool)
        .await
        .unwrap();
    h.vouchers(&h.ns)
        .patch(
            "lost-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"creditOMR": 6}})),
        )
        .await
        .unwrap();
    let failed = h
        .until(&h.ns, "lost-1", "status Error", |v| {
            phase(v) == Some(Phase::Error)
        })
        .await;
    let conditions = &failed.status.as_ref().unwrap().conditions;
    let reconciling = conditions
        .iter()
        .find(|c| c.type_ == "Reconciling")
        .expect("a retried failure is Reconciling");
    assert_eq!(reconciling.reason, "DatabaseUnavailable");
    assert!(
        reconciling.message.contains("cannot sync code LOST-1")
            && reconciling.message.contains("voucher_bindings")
            // Postgres's words, not the line of its C source that the driver appends.
            && !reconciling.message.contains(" at line "),
        "{}",
        reconciling.message
    );
    assert_eq!(
        h.row("LOST-1").await,
        Some((5, true, 0, None)),
        "nothing half-written"
    );

    sqlx::query("ALTER TABLE voucher_bindings_away RENAME TO voucher_bindings")
        .execute(&h.pool)
        .await
        .unwrap();
    h.until(&h.ns, "lost-1", "Active again after a retry", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    assert_eq!(h.row("LOST-1").await, Some((6, true, 0, None)));
}

#[tokio::test]
async fn a_no_op_resync_writes_nothing() {
    let h = harness().await;
    h.create(&h.ns, "steady", json!({"creditOMR": 5})).await;
    let v = h
        .until(&h.ns, "steady", "Active", |v| {
            phase(v) == Some(Phase::Active)
        })
        .await;
    let (xmin, rv, audits) = (
        h.xmin("STEADY").await,
        v.metadata.resource_version.clone(),
        h.audit_kinds("STEADY").await,
    );

    for _ in 0..3 {
        let current = h.vouchers(&h.ns).get("steady").await.unwrap();
        controller::voucher::reconcile(Arc::new(current), h.ctx.clone())
            .await
            .unwrap();
    }
    assert_eq!(h.xmin("STEADY").await, xmin, "the row was written");
    assert_eq!(
        h.audit_kinds("STEADY").await,
        audits,
        "an audit record was written"
    );
    let after = h.vouchers(&h.ns).get("steady").await.unwrap();
    assert_eq!(
        after.metadata.resource_version, rv,
        "the status was patched"
    );
}

/// The Voucher reconciles that succeeded so far.
fn reconciled(h: &Harness) -> u64 {
    let ok = ResultLabel { result: "ok" };
    h.ctx.metrics.reconciles.get_or_create(&ok).get()
}

/// Waits until no reconcile has run for a second (the status writes after a change settled).
async fn until_quiet(h: &Harness) {
    eventually("the controller quiet", || async {
        let before = reconciled(h);
        tokio::time::sleep(Duration::from_secs(1)).await;
        (reconciled(h) == before).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_notification_from_any_database_role_only_wakes_the_controller_to_read_the_truth() {
    let h = harness().await;
    h.create(&h.ns, "woken", json!({"creditOMR": 5})).await;
    h.until(&h.ns, "woken", "Active", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    until_quiet(&h).await;
    let rv = |v: Voucher| v.metadata.resource_version;
    let before = (
        h.row("WOKEN").await,
        h.xmin("WOKEN").await,
        h.audit_kinds("WOKEN").await,
        rv(h.vouchers(&h.ns).get("woken").await.unwrap()),
    );
    let (outbox, reconciles): (i64, u64) = (
        sqlx::query_scalar("SELECT count(*) FROM voucher_audit_outbox")
            .fetch_one(&h.pool)
            .await
            .unwrap(),
        reconciled(&h),
    );
    // NOTIFY needs no privilege: a role granted nothing at all names the Voucher's code, every
    // code ('*') and a campaign on the operator's channel.
    let stranger = format!("stranger_{}", std::process::id());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP ROLE IF EXISTS {stranger}; CREATE ROLE {stranger}"
    )))
    .execute(&h.pool)
    .await
    .unwrap();
    let mut tx = h.pool.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET LOCAL ROLE {stranger}")))
        .execute(&mut *tx)
        .await
        .unwrap();
    for payload in [
        "WOKEN",
        "*",
        "campaign:00000000-0000-0000-0000-000000000000",
    ] {
        sqlx::query("SELECT pg_notify('voucher_operator_codes', $1)")
            .bind(payload)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    // Heard: the Voucher was woken and reconciled, reading the row, which is as its spec says.
    eventually("the Voucher woken", || async {
        (reconciled(&h) > reconciles).then_some(())
    })
    .await;
    until_quiet(&h).await;
    let after = (
        h.row("WOKEN").await,
        h.xmin("WOKEN").await,
        h.audit_kinds("WOKEN").await,
        rv(h.vouchers(&h.ns).get("woken").await.unwrap()),
    );
    assert_eq!(
        after, before,
        "the row, its audit records or the status changed"
    );
    let outbox_after: i64 = sqlx::query_scalar("SELECT count(*) FROM voucher_audit_outbox")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(outbox_after, outbox, "nothing audited");
}

#[tokio::test]
async fn a_spec_change_is_one_update_and_one_audit_record() {
    let h = harness().await;
    h.create(&h.ns, "change-me", json!({"creditOMR": 5})).await;
    h.until(&h.ns, "change-me", "Active", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;

    let patch = json!({"spec": {"creditOMR": 9}});
    h.vouchers(&h.ns)
        .patch("change-me", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    h.until(&h.ns, "change-me", "generation 2 observed", |v| {
        v.status.as_ref().and_then(|s| s.observed_generation) == Some(2)
    })
    .await;
    assert_eq!(h.row("CHANGE-ME").await.unwrap().0, 9);
    assert_eq!(h.audit_kinds("CHANGE-ME").await, ["created", "updated"]);

    let patch = json!({"spec": {"active": false}});
    h.vouchers(&h.ns)
        .patch("change-me", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    h.until(&h.ns, "change-me", "Inactive", |v| {
        phase(v) == Some(Phase::Inactive)
    })
    .await;
    assert_eq!(
        h.audit_kinds("CHANGE-ME").await,
        ["created", "updated", "deactivated"]
    );
}

#[tokio::test]
async fn an_existing_row_is_adopted_only_on_request_with_its_counters() {
    let h = harness().await;
    sqlx::query(
        "INSERT INTO promo_codes (code, credit_omr, times_redeemed, max_redemptions, created_at) \
         VALUES ('LEGACY-7', 7, 4, 10, '2025-01-01T00:00:00Z')",
    )
    .execute(&h.pool)
    .await
    .unwrap();
    // Without the request: a Conflict that says how to ask, and the row untouched.
    h.create(
        &h.ns,
        "legacy-7",
        json!({"creditOMR": 99999, "maxRedemptions": 10}),
    )
    .await;
    let refused = h
        .until(&h.ns, "legacy-7", "Conflict", |v| {
            phase(v) == Some(Phase::Conflict)
        })
        .await;
    assert_eq!(
        ready(&refused),
        Some(("False".into(), "AdoptionNotRequested".into()))
    );
    assert_eq!(
        condition(&refused, "Stalled"),
        Some(("True".into(), "AdoptionNotRequested".into()))
    );
    assert_eq!(h.row("LEGACY-7").await, Some((7, true, 4, None)));
    assert!(h.audit_kinds("LEGACY-7").await.is_empty());
    assert!(
        h.events("legacy-7")
            .await
            .contains(&("Warning".into(), "AdoptionNotRequested".into()))
    );

    // With it (and sane terms): adopted, counters and creation time kept.
    h.vouchers(&h.ns)
        .patch(
            "legacy-7",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"adopt": true, "creditOMR": 8}})),
        )
        .await
        .unwrap();
    let v = h
        .until(&h.ns, "legacy-7", "Active", |v| {
            phase(v) == Some(Phase::Active)
        })
        .await;
    let status = v.status.unwrap();
    assert_eq!(
        (status.times_redeemed, status.remaining),
        (Some(4), Some(6))
    );
    let (credit, _, times, _) = h.row("LEGACY-7").await.unwrap();
    assert_eq!((credit, times), (8, 4));
    let created: chrono::DateTime<Utc> =
        sqlx::query_scalar("SELECT created_at FROM promo_codes WHERE code = 'LEGACY-7'")
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert_eq!(created.to_rfc3339(), "2025-01-01T00:00:00+00:00");
    assert_eq!(h.audit_kinds("LEGACY-7").await, ["adopted"]);
}

#[tokio::test]
async fn a_second_claim_on_a_code_is_a_conflict_that_touches_nothing() {
    let h = harness().await;
    let franchise = h.second_namespace("franchise").await;

    h.create(&h.ns, "first", json!({"code": "SHARED-1", "creditOMR": 5}))
        .await;
    h.until(&h.ns, "first", "Active", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    h.create(
        &franchise,
        "second",
        json!({"code": "shared-1", "creditOMR": 500}),
    )
    .await;
    let v = h
        .until(&franchise, "second", "Conflict", |v| {
            phase(v) == Some(Phase::Conflict)
        })
        .await;

    assert_eq!(ready(&v), Some(("False".into(), "CodeConflict".into())));
    assert_eq!(
        condition(&v, "Stalled"),
        Some(("True".into(), "CodeConflict".into())),
        "kstatus (Flux) sees a failure"
    );
    let winner = h.vouchers(&h.ns).get("first").await.unwrap();
    assert_eq!(condition(&winner, "Stalled"), None);
    assert_eq!(h.row("SHARED-1").await.unwrap().0, 5, "the row was changed");
    assert!(
        h.events_in(&franchise, "second")
            .await
            .contains(&("Warning".into(), "CodeConflict".into()))
    );
    // A resync of the loser records the conflict once, not per pass.
    let current = h.vouchers(&franchise).get("second").await.unwrap();
    controller::voucher::reconcile(Arc::new(current), h.ctx.clone())
        .await
        .unwrap();
    assert_eq!(h.audit_kinds("SHARED-1").await, ["created", "conflict"]);

    // Deleting the loser leaves the owner's row alone.
    h.vouchers(&franchise)
        .delete("second", &DeleteParams::default())
        .await
        .unwrap();
    eventually("loser gone", || async {
        h.vouchers(&franchise)
            .get_opt("second")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(h.row("SHARED-1").await, Some((5, true, 0, None)));
}

#[tokio::test]
async fn an_out_of_band_edit_is_reverted_and_audited() {
    let h = harness().await;
    h.create(&h.ns, "guarded", json!({"creditOMR": 5})).await;
    h.until(&h.ns, "guarded", "Active", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;

    sqlx::query(
        "UPDATE promo_codes SET credit_omr = 999, description = 'hacked' WHERE code = 'GUARDED'",
    )
    .execute(&h.pool)
    .await
    .unwrap();
    eventually("drift reverted", || async {
        (h.row("GUARDED").await.unwrap().0 == 5).then_some(())
    })
    .await;
    let description: String =
        sqlx::query_scalar("SELECT description FROM promo_codes WHERE code = 'GUARDED'")
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert_eq!(description, "");
    assert_eq!(
        h.audit_kinds("GUARDED").await,
        ["created", "drift_corrected"]
    );
    eventually("DriftCorrected event", || async {
        h.events("guarded")
            .await
            .contains(&("Warning".into(), "DriftCorrected".into()))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_redemption_in_the_database_reaches_status_within_seconds() {
    let h = harness().await;
    h.create(&h.ns, "hot", json!({"creditOMR": 5, "maxRedemptions": 3}))
        .await;
    h.until(&h.ns, "hot", "Active", |v| phase(v) == Some(Phase::Active))
        .await;

    let started = std::time::Instant::now();
    sqlx::query("UPDATE promo_codes SET times_redeemed = times_redeemed + 1 WHERE code = 'HOT'")
        .execute(&h.pool)
        .await
        .unwrap();
    let v = h
        .until(&h.ns, "hot", "timesRedeemed 1", |v| {
            v.status.as_ref().and_then(|s| s.times_redeemed) == Some(1)
        })
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(v.status.unwrap().remaining, Some(2));

    sqlx::query("UPDATE promo_codes SET times_redeemed = 3 WHERE code = 'HOT'")
        .execute(&h.pool)
        .await
        .unwrap();
    h.until(&h.ns, "hot", "Exhausted", |v| {
        phase(v) == Some(Phase::Exhausted)
    })
    .await;
}

#[tokio::test]
async fn a_hot_code_does_not_flood_the_api_server() {
    let mut s = settings();
    s.status_min_interval = Duration::from_secs(2);
    let h = harness_with(s, None).await;
    h.create(&h.ns, "flood", json!({"creditOMR": 5})).await;
    h.until(&h.ns, "flood", "Active", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    let patches_before = h.ctx.metrics.status_patches.get();

    for _ in 0..20 {
        sqlx::query(
            "UPDATE promo_codes SET times_redeemed = times_redeemed + 1 WHERE code = 'FLOOD'",
        )
        .execute(&h.pool)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    h.until(&h.ns, "flood", "all 20 redemptions", |v| {
        v.status.as_ref().and_then(|s| s.times_redeemed) == Some(20)
    })
    .await;
    let patches = h.ctx.metrics.status_patches.get() - patches_before;
    assert!(
        patches <= 3,
        "{patches} status patches for 20 redemptions within ~0.5 s"
    );
    assert!(h.ctx.metrics.status_patches_suppressed.get() > 0);
}

#[tokio::test]
async fn deletion_with_revoke_tombstones_the_row() {
    let h = harness().await;
    h.create(&h.ns, "revoke-me", json!({"creditOMR": 5})).await;
    h.until(&h.ns, "revoke-me", "Active", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    h.vouchers(&h.ns)
        .delete("revoke-me", &DeleteParams::default())
        .await
        .unwrap();
    eventually("resource gone", || async {
        h.vouchers(&h.ns)
            .get_opt("revoke-me")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;

    let (_, active, _, deleted_at) = h.row("REVOKE-ME").await.unwrap();
    assert!(!active && deleted_at.is_some());
    let bound: i64 =
        sqlx::query_scalar("SELECT count(*) FROM voucher_bindings WHERE code = 'REVOKE-ME'")
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert_eq!(bound, 0);
    assert_eq!(h.audit_kinds("REVOKE-ME").await, ["created", "revoked"]);
}

#[tokio::test]
async fn deletion_with_orphan_leaves_the_row() {
    let h = harness().await;
    h.create(
        &h.ns,
        "keep-me",
        json!({"creditOMR": 5, "deletionPolicy": "Orphan"}),
    )
    .await;
    h.until(&h.ns, "keep-me", "Active", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    h.vouchers(&h.ns)
        .delete("keep-me", &DeleteParams::default())
        .await
        .unwrap();
    eventually("resource gone", || async {
        h.vouchers(&h.ns)
            .get_opt("keep-me")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;

    assert_eq!(h.row("KEEP-ME").await, Some((5, true, 0, None)));
    assert_eq!(h.audit_kinds("KEEP-ME").await, ["created", "orphaned"]);
    // Released: a new resource that asks for it adopts it.
    h.create(
        &h.ns,
        "keep-me-again",
        json!({"code": "KEEP-ME", "creditOMR": 6, "adopt": true}),
    )
    .await;
    h.until(&h.ns, "keep-me-again", "Active", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    assert_eq!(
        h.audit_kinds("KEEP-ME").await,
        ["created", "orphaned", "adopted"]
    );
}

#[tokio::test]
async fn the_validity_window_flips_the_phase_on_time_and_audits_once() {
    let h = harness().await;
    let now = Utc::now();
    let from = (now + chrono::Duration::seconds(2)).to_rfc3339();
    let until = (now + chrono::Duration::seconds(4)).to_rfc3339();
    h.create(
        &h.ns,
        "window",
        json!({"creditOMR": 5, "validFrom": from, "expiresAt": until}),
    )
    .await;
    h.until(&h.ns, "window", "Scheduled", |v| {
        phase(v) == Some(Phase::Scheduled)
    })
    .await;
    h.until(&h.ns, "window", "Active", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    let v = h
        .until(&h.ns, "window", "Expired", |v| {
            phase(v) == Some(Phase::Expired)
        })
        .await;
    assert_eq!(ready(&v), Some(("True".into(), "Expired".into())));

    controller::voucher::reconcile(Arc::new(v), h.ctx.clone())
        .await
        .unwrap();
    assert_eq!(h.audit_kinds("WINDOW").await, ["created", "expired"]);
}

#[tokio::test]
async fn api_server_errors_are_retried_without_duplicate_audit_records() {
    let faults = support::faults::Faults::default();
    let h = harness_with(settings(), Some(faults.clone())).await;
    // The first status writes fail with 500, then 409, then hang and time out.
    faults.inject("PATCH", "/status", 500, 2);
    faults.inject("PATCH", "/status", 409, 1);
    faults.hang("PATCH", "/status", Duration::from_secs(3), 1);
    h.create(&h.ns, "flaky", json!({"creditOMR": 5})).await;
    // Backoff after four failures: 1 + 2 + 4 + 8 s.
    let api = h.vouchers(&h.ns);
    eventually_within(
        Duration::from_secs(30),
        "Active despite failures",
        || async {
            api.get_opt("flaky")
                .await
                .unwrap()
                .filter(|v| phase(v) == Some(Phase::Active))
        },
    )
    .await;

    assert!(faults.pending() == 0, "every injected fault was hit");
    assert_eq!(h.audit_kinds("FLAKY").await, ["created"]);
    let failures: f64 = ["kubernetes"]
        .iter()
        .map(|reason| {
            h.ctx
                .metrics
                .failures
                .get_or_create(&voucher_operator::controller::metrics::ReasonLabel { reason })
                .get() as f64
        })
        .sum();
    assert!(failures >= 3.0, "{failures} failures recorded");
}

#[tokio::test]
async fn two_controllers_sharing_a_lease_never_reconcile_together() {
    use voucher_operator::controller::leader::{self, LeaseSettings};
    use voucher_operator::controller::metrics::ResultLabel;

    support::init_tracing();
    let url = support::fresh_database("leader").await;
    let pool = support::pool(&url).await;
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    let (client, ns) = support::cluster::setup("leader").await;

    let start = |identity: &'static str| {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::register(&mut registry));
        let ctx = Context::new(
            client.clone(),
            store.clone(),
            metrics,
            Settings {
                identity: identity.into(),
                namespace: Some(ns.clone()),
                issuers: Issuers::new([ns.clone()]),
                ..settings()
            },
        );
        let stop = CancellationToken::new();
        let lease = LeaseSettings {
            name: "voucher-operator".into(),
            namespace: ns.clone(),
            identity: identity.into(),
            duration: Duration::from_secs(3),
        };
        let task = tokio::spawn(leader::run_while_leader(
            client.clone(),
            lease,
            stop.clone(),
            {
                let ctx = ctx.clone();
                move |term| {
                    let ctx = ctx.clone();
                    async move {
                        controller::voucher::run(ctx, term).await;
                        Ok(())
                    }
                }
            },
        ));
        (ctx, stop, task)
    };
    let reconciles = |ctx: &Arc<Context>| {
        ctx.metrics
            .reconciles
            .get_or_create(&ResultLabel { result: "ok" })
            .get()
    };

    let (ctx_a, stop_a, task_a) = start("replica-a");
    let (ctx_b, stop_b, task_b) = start("replica-b");
    let vouchers: Api<Voucher> = Api::namespaced(client.clone(), &ns);
    for i in 0..3 {
        let spec: VoucherSpec = serde_json::from_value(json!({"creditOMR": 5})).unwrap();
        vouchers
            .create(
                &PostParams::default(),
                &Voucher::new(&format!("led-{i}"), spec),
            )
            .await
            .unwrap();
    }
    for i in 0..3 {
        let name = format!("led-{i}");
        eventually("reconciled by the leader", || async {
            vouchers
                .get(&name)
                .await
                .ok()
                .filter(|v| phase(v) == Some(Phase::Active))
        })
        .await;
    }
    let (a, b) = (reconciles(&ctx_a), reconciles(&ctx_b));
    assert!(
        (a > 0) != (b > 0),
        "exactly one replica reconciles: a={a} b={b}"
    );
    let (leader_stop, leader_task, follower, leader) = if a > 0 {
        (stop_a, task_a, &ctx_b, "replica-a")
    } else {
        (stop_b, task_b, &ctx_a, "replica-b")
    };
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &ns);
    let holder = || async {
        leases
            .get("voucher-operator")
            .await
            .unwrap()
            .spec
            .and_then(|s| s.holder_identity)
    };
    assert_eq!(holder().await.as_deref(), Some(leader));

    // The leader steps down and releases the lease — seen at once, before expiry could have
    // freed it — and the follower takes over.
    leader_stop.cancel();
    leader_task.await.unwrap().unwrap();
    assert_ne!(
        holder().await.as_deref(),
        Some(leader),
        "the lease was not released when the leader stepped down"
    );
    let spec: VoucherSpec = serde_json::from_value(json!({"creditOMR": 7})).unwrap();
    vouchers
        .create(
            &PostParams::default(),
            &Voucher::new("after-failover", spec),
        )
        .await
        .unwrap();
    eventually_within(
        Duration::from_secs(20),
        "reconciled by the new leader",
        || async {
            vouchers
                .get("after-failover")
                .await
                .ok()
                .filter(|v| phase(v) == Some(Phase::Active))
        },
    )
    .await;
    assert!(reconciles(follower) > 0);
    let holder: k8s_openapi::api::coordination::v1::Lease = Api::namespaced(client.clone(), &ns)
        .get("voucher-operator")
        .await
        .unwrap();
    assert!(holder.spec.unwrap().holder_identity.is_some());
}

/// Removes a Voucher without its finalizer while no controller runs (a
/// running one would put the finalizer straight back), so that its binding
/// stays behind; then starts the controller again.
async fn vanish(h: &Harness, name: &str) -> tokio_util::sync::DropGuard {
    remove_without_finalizer(h, &[name]).await;
    let restarted = CancellationToken::new();
    tokio::spawn(controller::voucher::run(h.ctx.clone(), restarted.clone()));
    restarted.drop_guard()
}

/// Stops the controller, then removes `names` without their finalizer: their bindings stay.
async fn remove_without_finalizer(h: &Harness, names: &[&str]) {
    h.stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let api = h.vouchers(&h.ns);
    for name in names {
        let clear = json!({"metadata": {"finalizers": null}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&clear))
            .await
            .unwrap();
        api.delete(name, &DeleteParams::default()).await.unwrap();
        assert!(api.get_opt(name).await.unwrap().is_none());
    }
}

async fn bound(h: &Harness, code: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM voucher_bindings WHERE code = $1")
        .bind(code)
        .fetch_one(&h.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_vanished_vouchers_binding_is_swept_with_its_recorded_policy() {
    let h = harness().await;
    for (name, policy) in [("gone-revoke", "Revoke"), ("gone-orphan", "Orphan")] {
        h.create(
            &h.ns,
            name,
            json!({"creditOMR": 5, "deletionPolicy": policy}),
        )
        .await;
        h.until(&h.ns, name, "Active", |v| phase(v) == Some(Phase::Active))
            .await;
    }
    remove_without_finalizer(&h, &["gone-revoke", "gone-orphan"]).await;
    assert_eq!(
        bound(&h, "GONE-REVOKE").await,
        1,
        "the stale binding this test is about"
    );
    // The sweep runs once the restarted controller's cache is complete.
    let restarted = CancellationToken::new();
    tokio::spawn(controller::voucher::run(h.ctx.clone(), restarted.clone()));
    let _stop_restarted = restarted.drop_guard();
    eventually("both bindings swept", || async {
        (bound(&h, "GONE-REVOKE").await + bound(&h, "GONE-ORPHAN").await == 0).then_some(())
    })
    .await;
    let (_, active, _, deleted) = h.row("GONE-REVOKE").await.unwrap();
    assert!(!active && deleted.is_some(), "Revoke, as recorded: revoked");
    assert_eq!(
        h.row("GONE-ORPHAN").await,
        Some((5, true, 0, None)),
        "Orphan: left"
    );
    assert_eq!(h.audit_kinds("GONE-REVOKE").await, ["created", "revoked"]);
    assert_eq!(h.audit_kinds("GONE-ORPHAN").await, ["created", "orphaned"]);
    assert!(
        h.events("gone-revoke")
            .await
            .contains(&("Warning".into(), "Revoked".into())),
        "an Event on the vanished Voucher"
    );
}

/// The sweep releases a binding only on evidence that its Voucher is gone: while the Voucher
/// API does not answer a list, it sweeps nothing; while a vanished Voucher's get fails, that
/// binding stays (the others go).
#[tokio::test]
async fn the_sweep_releases_nothing_it_could_not_confirm_gone() {
    let faults = support::faults::Faults::default();
    let h = harness_with(
        Settings {
            // The sweep runs every resync interval.
            resync_interval: Duration::from_millis(500),
            ..settings()
        },
        Some(faults.clone()),
    )
    .await;
    for name in ["unlisted", "unread"] {
        h.create(&h.ns, name, json!({"creditOMR": 5})).await;
        h.until(&h.ns, name, "Active", |v| phase(v) == Some(Phase::Active))
            .await;
    }
    remove_without_finalizer(&h, &["unlisted", "unread"]).await;
    let both = || async { bound(&h, "UNLISTED").await + bound(&h, "UNREAD").await };
    assert_eq!(both().await, 2, "the stale bindings this test is about");

    // The sweep's list (limit=1; the watch lists in pages of 500) fails: nothing is swept.
    const MANY: usize = 1_000;
    faults.inject("GET", "limit=1", 500, MANY);
    let restarted = CancellationToken::new();
    tokio::spawn(controller::voucher::run(h.ctx.clone(), restarted.clone()));
    eventually("three sweeps refused their list", || async {
        (faults.pending() <= MANY - 3).then_some(())
    })
    .await;
    assert_eq!(both().await, 2, "a sweep without a list released a binding");
    restarted.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The list works; the get of one vanished Voucher fails: that one stays.
    faults.clear();
    faults.inject("GET", "/vouchers/unread", 500, MANY);
    let restarted = CancellationToken::new();
    tokio::spawn(controller::voucher::run(h.ctx.clone(), restarted.clone()));
    let _stop_restarted = restarted.drop_guard();
    eventually("the confirmed one swept", || async {
        (bound(&h, "UNLISTED").await == 0).then_some(())
    })
    .await;
    eventually("a get of the other refused", || async {
        (faults.pending() < MANY).then_some(())
    })
    .await;
    // Two more sweeps: whatever that sweep did with the refused get is done.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(faults.pending() < MANY - 1, "the sweep asked again");
    assert_eq!(
        bound(&h, "UNREAD").await,
        1,
        "released without a get that said gone"
    );
    // Once the get answers, it goes too.
    faults.clear();
    eventually("the other swept once its get answers", || async {
        (bound(&h, "UNREAD").await == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_revoked_code_is_not_revived_by_a_waiting_conflict() {
    // A short resync: the waiting Voucher looks again and again.
    let h = harness_with(
        Settings {
            resync_interval: Duration::from_secs(1),
            ..settings()
        },
        None,
    )
    .await;
    h.create(
        &h.ns,
        "owner-1",
        json!({"code": "WAITED-1", "creditOMR": 5}),
    )
    .await;
    h.until(&h.ns, "owner-1", "Active", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    h.create(
        &h.ns,
        "waiter",
        json!({"code": "WAITED-1", "creditOMR": 777}),
    )
    .await;
    h.until(&h.ns, "waiter", "Conflict", |v| {
        phase(v) == Some(Phase::Conflict)
    })
    .await;

    // The owner goes, with deletionPolicy Revoke (the default).
    h.vouchers(&h.ns)
        .delete("owner-1", &DeleteParams::default())
        .await
        .unwrap();
    eventually("owner-1 revoked", || async {
        h.row("WAITED-1").await.unwrap().3.map(|_| ())
    })
    .await;
    // The waiter is looked at every second; it must say why and stay away.
    let waiting = h
        .until(&h.ns, "waiter", "Revoked", |v| {
            ready(v).is_some_and(|(_, reason)| reason == "Revoked")
        })
        .await;
    assert_eq!(phase(&waiting), Some(Phase::Revoked));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (credit, active, _, deleted) = h.row("WAITED-1").await.unwrap();
    assert!(
        credit == 5 && !active && deleted.is_some(),
        "still revoked, with the owner's terms"
    );
    assert_eq!(bound(&h, "WAITED-1").await, 0);
    assert_eq!(
        h.audit_kinds("WAITED-1").await,
        ["created", "conflict", "revoked"]
    );

    // A person asks, naming the revocation: reissued, audited as such, with the waiter's terms.
    h.vouchers(&h.ns)
        .patch(
            "waiter",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"reissue": {"revokedAt": micros(deleted.unwrap())}}})),
        )
        .await
        .unwrap();
    h.until(&h.ns, "waiter", "Active", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    assert_eq!(h.row("WAITED-1").await, Some((777, true, 0, None)));
    assert_eq!(
        h.audit_kinds("WAITED-1").await,
        ["created", "conflict", "revoked", "reissued"]
    );
}

#[tokio::test]
async fn a_conflict_with_a_vanished_owner_releases_the_binding_but_takes_nothing() {
    let h = harness().await;
    h.create(
        &h.ns,
        "first-owner",
        json!({"code": "ORPHANED-1", "creditOMR": 5}),
    )
    .await;
    h.until(&h.ns, "first-owner", "Active", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    let _restarted = vanish(&h, "first-owner").await;
    h.create(
        &h.ns,
        "second-owner",
        json!({"code": "ORPHANED-1", "creditOMR": 6}),
    )
    .await;
    let v = h
        .until(
            &h.ns,
            "second-owner",
            "Revoked: reissue not requested",
            |v| ready(v).is_some_and(|(_, reason)| reason == "Revoked"),
        )
        .await;
    assert_eq!(phase(&v), Some(Phase::Revoked));
    assert_eq!(bound(&h, "ORPHANED-1").await, 0, "released");
    let (credit, active, _, deleted) = h.row("ORPHANED-1").await.unwrap();
    assert!(
        credit == 5 && !active && deleted.is_some(),
        "revoked as recorded, not handed on"
    );
    assert_eq!(h.audit_kinds("ORPHANED-1").await, ["created", "revoked"]);
}

#[tokio::test]
async fn a_code_revoked_out_of_band_is_not_revived_by_its_own_voucher() {
    let h = harness().await;
    h.create(&h.ns, "revoked-1", json!({"creditOMR": 5})).await;
    h.until(&h.ns, "revoked-1", "Active", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    // The admin page (or a person with psql) soft-deletes it: the row's change wakes the Voucher.
    sqlx::query(
        "UPDATE promo_codes SET deleted_at = now(), active = false WHERE code = 'REVOKED-1'",
    )
    .execute(&h.pool)
    .await
    .unwrap();
    h.until(&h.ns, "revoked-1", "Revoked", |v| {
        ready(v).is_some_and(|(_, reason)| reason == "Revoked")
    })
    .await;
    let (_, active, _, deleted) = h.row("REVOKED-1").await.unwrap();
    assert!(!active && deleted.is_some(), "still revoked");
    assert_eq!(h.audit_kinds("REVOKED-1").await, ["created"]);
}

/// RFC 3339 to the microsecond, as the status shows a revocation.
fn micros(at: chrono::DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

#[tokio::test]
async fn a_spent_reissue_never_undoes_a_later_revoke() {
    let h = harness().await;
    h.create(&h.ns, "spent-1", json!({"creditOMR": 5})).await;
    h.until(&h.ns, "spent-1", "Active", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    let revoke_by_hand = || async {
        sqlx::query(
            "UPDATE promo_codes SET deleted_at = now(), active = false WHERE code = 'SPENT-1'",
        )
        .execute(&h.pool)
        .await
        .unwrap();
        h.row("SPENT-1").await.unwrap().3.unwrap()
    };
    let first = revoke_by_hand().await;
    // The status names the revocation, for the reissue to copy.
    let revoked = h
        .until(&h.ns, "spent-1", "Revoked", |v| {
            phase(v) == Some(Phase::Revoked)
        })
        .await;
    let status = revoked.status.as_ref().unwrap();
    let message = &status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message;
    assert!(
        message.contains(&format!("spec.reissue.revokedAt: \"{}\"", micros(first))),
        "{message}"
    );
    h.vouchers(&h.ns)
        .patch(
            "spent-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"reissue": {"revokedAt": micros(first)}}})),
        )
        .await
        .unwrap();
    h.until(&h.ns, "spent-1", "Active again", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    // Incident response revokes it again; the standing request names the old revocation.
    let second = revoke_by_hand().await;
    assert!(second > first);
    h.until(&h.ns, "spent-1", "Revoked again", |v| {
        phase(v) == Some(Phase::Revoked)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, active, _, deleted) = h.row("SPENT-1").await.unwrap();
    assert_eq!((active, deleted), (false, Some(second)), "stays revoked");
    assert_eq!(h.audit_kinds("SPENT-1").await, ["created", "reissued"]);
}

#[tokio::test]
async fn a_voucher_outside_the_issuer_namespaces_writes_nothing() {
    let h = harness_with(
        Settings {
            issuers: Issuers::new(["billing-only"]),
            ..settings()
        },
        None,
    )
    .await;
    sqlx::query("INSERT INTO promo_codes (code, credit_omr) VALUES ('RVW-A1', 10)")
        .execute(&h.pool)
        .await
        .unwrap();
    for (name, spec) in [
        ("rvw-a1", json!({"creditOMR": 99999, "adopt": true})),
        ("brand-new", json!({"creditOMR": 50})),
    ] {
        h.create(&h.ns, name, spec).await;
        let v = h
            .until(&h.ns, name, "Forbidden", |v| {
                phase(v) == Some(Phase::Forbidden)
            })
            .await;
        let stalled = v
            .status
            .as_ref()
            .unwrap()
            .conditions
            .iter()
            .find(|c| c.type_ == "Stalled")
            .cloned()
            .unwrap();
        assert_eq!(stalled.reason, "NotAnIssuerNamespace");
        assert!(
            stalled.message.contains("--issuer-namespaces"),
            "{}",
            stalled.message
        );
        assert!(
            h.events(name)
                .await
                .contains(&("Warning".into(), "NotAnIssuerNamespace".into()))
        );
    }
    assert_eq!(
        h.row("RVW-A1").await,
        Some((10, true, 0, None)),
        "not adopted"
    );
    assert_eq!(h.row("BRAND-NEW").await, None, "not created");
    assert_eq!(bound(&h, "RVW-A1").await + bound(&h, "BRAND-NEW").await, 0);
    assert!(h.audit_kinds("RVW-A1").await.is_empty());
}

#[tokio::test]
async fn a_suspension_by_annotation_holds_across_the_gitops_owners_next_apply() {
    let h = harness().await;
    let manifest = json!({"apiVersion": "catalyst.openova.io/v1alpha1", "kind": "Voucher",
                          "metadata": {"name": "gitops-1"}, "spec": {"creditOMR": 5}});
    // Flux's kustomize-controller owns the spec (server-side apply, forced, as it applies).
    let flux = PatchParams::apply("kustomize-controller").force();
    let vouchers = h.vouchers(&h.ns);
    vouchers
        .patch("gitops-1", &flux, &Patch::Apply(&manifest))
        .await
        .unwrap();
    h.until(&h.ns, "gitops-1", "Active", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    // Incident response annotates it, as kubectl annotate does.
    let annotate = |value: serde_json::Value| {
        let vouchers = vouchers.clone();
        async move {
            vouchers
                .patch(
                    "gitops-1",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations":
                        {"catalyst.openova.io/suspended": value}}})),
                )
                .await
                .unwrap();
        }
    };
    annotate(json!("true")).await;
    let suspended = h
        .until(&h.ns, "gitops-1", "Suspended", |v| {
            phase(v) == Some(Phase::Suspended)
        })
        .await;
    assert_eq!(
        ready(&suspended).map(|(_, reason)| reason).as_deref(),
        Some("Suspended")
    );
    // Refused to every writer: the database's guard, for a plain INSERT as psql would do it.
    let refused = sqlx::raw_sql(
        "INSERT INTO customers (user_id, tenant_id, email) VALUES ('mallory', 't', ''); \
         INSERT INTO promo_redemptions (customer_id, code) \
           SELECT id, 'GITOPS-1' FROM customers WHERE user_id = 'mallory'",
    )
    .execute(&h.pool)
    .await
    .unwrap_err();
    assert!(refused.to_string().contains("is suspended"), "{refused}");
    // Flux applies its manifest again: the annotation is not its field, and stays.
    vouchers
        .patch("gitops-1", &flux, &Patch::Apply(&manifest))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = vouchers.get("gitops-1").await.unwrap();
    assert!(
        controller::suspended_by_annotation(&after),
        "the annotation stays"
    );
    assert_eq!(phase(&after), Some(Phase::Suspended));
    // Lifted the way it was set.
    annotate(serde_json::Value::Null).await;
    h.until(&h.ns, "gitops-1", "Active again", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    assert_eq!(
        h.audit_kinds("GITOPS-1").await,
        ["created", "suspended", "suspension_lifted"]
    );
}

#[tokio::test]
async fn a_discount_voucher_is_reconciled_and_its_edited_row_reverted() {
    let h = harness().await;
    h.create(
        &h.ns,
        "installs-20",
        json!({"discount": {"percentOff": 20, "appliesTo": ["install"], "durationMonths": 3}}),
    )
    .await;
    let v = h
        .until(&h.ns, "installs-20", "status Active", |v| {
            phase(v) == Some(Phase::Active)
        })
        .await;
    assert_eq!(
        v.status.unwrap().grant.as_deref(),
        Some("20% install 3mo"),
        "the printer column's grant"
    );
    // The Event says what kind of grant was created.
    let events: Api<K8sEvent> = Api::namespaced(h.client.clone(), &h.ns);
    let params = ListParams::default().fields("regarding.name=installs-20");
    eventually("the Created event", || async {
        let notes: Vec<String> = events
            .list(&params)
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|e| e.note)
            .collect();
        notes
            .iter()
            .any(|n| n == "created code INSTALLS-20 granting 20% install 3mo")
            .then_some(())
    })
    .await;
    let discount = || async {
        sqlx::query_as::<_, (i32, serde_json::Value)>(
            "SELECT credit_omr, discount FROM promo_codes WHERE code = 'INSTALLS-20'",
        )
        .fetch_one(&h.pool)
        .await
        .unwrap()
    };
    let terms = json!({"percent_off": 20, "applies_to": ["install"], "duration_months": 3});
    assert_eq!(discount().await, (0, terms.clone()));
    // The admin page (or psql) deepens the discount: reverted, audited.
    sqlx::query(
        "UPDATE promo_codes SET discount = '{\"percent_off\": 90}' WHERE code = 'INSTALLS-20'",
    )
    .execute(&h.pool)
    .await
    .unwrap();
    eventually("drift reverted", || async {
        (discount().await.1 == terms).then_some(())
    })
    .await;
    assert_eq!(
        h.audit_kinds("INSTALLS-20").await,
        ["created", "drift_corrected"]
    );
}

#[tokio::test]
async fn a_discount_naming_an_unknown_category_is_refused_by_name() {
    let h = harness().await;
    h.create(
        &h.ns,
        "typo",
        json!({"discount": {"percentOff": 20, "appliesTo": ["instal"]}}),
    )
    .await;
    let v = h
        .until(&h.ns, "typo", "refused", |v| {
            ready(v).is_some_and(|(_, reason)| reason == "UnknownCategory")
        })
        .await;
    assert_eq!(phase(&v), Some(Phase::Error));
    let message = v
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message;
    assert!(
        message.contains("spec.discount.appliesTo names instal, which is not a charge category")
            && message.contains("configured: install,subscription,usage,support"),
        "{message}"
    );
    assert_eq!(h.row("TYPO").await, None, "nothing written");
}
