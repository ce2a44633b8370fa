//! A global voucher end to end (DESIGN §11, docs/federation.md): the vendor
//! applies a `scope: Global` Voucher at the hub (`federation::hub`), a
//! Sovereign's controller binds its copy to the hub's definition, and its
//! leader keeps the share topped up — against the real kube-apiserver, a real
//! nats-server and a real Postgres. The hub's namespace and the Sovereign's
//! global namespace are two namespaces of one API server here.

mod support;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use voucher_operator::api::{Voucher, VoucherSpec};
use voucher_operator::controller::metrics::Metrics;
use voucher_operator::controller::{self, Context, Settings};
use voucher_operator::domain::{Code, Issuers, Phase};
use voucher_operator::federation::sovereign::Refill;
use voucher_operator::federation::{Joined, allotment, hub, sovereign};
use voucher_operator::store::Store;

const PREFIX: &str = "test.global";

struct Federation {
    client: kube::Client,
    hub_ns: String,
    sov_ns: String,
    pool: PgPool,
    store: Store,
    nats: async_nats::Client,
    stop: CancellationToken,
    _server: support::Nats,
}

impl Drop for Federation {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A hub and one Sovereign ("sov1"), each in its namespace, on a nats-server
/// of the test's own (the hub's bucket is the server's).
async fn federation() -> Federation {
    federation_in("OMR").await
}

/// [`federation`] with a Sovereign whose currency is `currency`.
async fn federation_in(currency: &str) -> Federation {
    support::init_tracing();
    let server = support::nats_of_its_own();
    let connect = || async { async_nats::connect(&server.url).await.expect("nats") };
    let (client, hub_ns) = support::cluster::setup("hub").await;
    let sov_ns = support::cluster::namespace(&client, "sov").await;
    let stop = CancellationToken::new();
    let settings = hub::Settings {
        global_namespace: hub_ns.clone(),
        prefix: PREFIX.into(),
        replicas: 1,
        ceiling_percent: 100,
        max_grant: 1000,
        refresh: Duration::from_millis(300),
        audit: None,
    };
    tokio::spawn(hub::run(
        client.clone(),
        connect().await,
        settings,
        stop.clone(),
    ));
    let nats = connect().await;
    let js = jetstream::new(nats.clone());
    support::eventually_within(Duration::from_secs(10), "the hub's bucket", || {
        let js = js.clone();
        async move { js.get_key_value(allotment::BUCKET).await.ok() }
    })
    .await;
    let url = support::fresh_database("global").await;
    let pool = support::pool(&url).await;
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    let refill = Refill {
        sovereign: "sov1".into(),
        prefix: PREFIX.into(),
        low_water: 2,
        step: 3,
        timeout: Duration::from_secs(2),
    };
    let joined = Joined {
        client: nats.clone(),
        refill: refill.clone(),
        every: Duration::from_millis(50),
    };
    let settings = Settings {
        resync_interval: Duration::from_secs(3600),
        status_min_interval: Duration::from_millis(200),
        namespace: Some(sov_ns.clone()),
        identity: "test".into(),
        concurrency: 4,
        issuers: Issuers::new(["default"]),
        key_namespace: "voucher-campaign-keys".into(),
        billing: voucher_operator::domain::Billing {
            currency: voucher_operator::domain::Currency::parse(currency).unwrap(),
            ..Default::default()
        },
        global_namespace: sov_ns.clone(),
        joined: Some(joined),
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let ctx = Context::new(client.clone(), store.clone(), metrics, settings);
    tokio::spawn(controller::voucher::run(ctx, stop.clone()));
    tokio::spawn(sovereign::run(
        store.clone(),
        nats.clone(),
        refill,
        Duration::from_millis(50),
        stop.clone(),
    ));
    Federation {
        client,
        hub_ns,
        sov_ns,
        pool,
        store,
        nats,
        stop,
        _server: server,
    }
}

impl Federation {
    fn vouchers(&self, namespace: &str) -> Api<Voucher> {
        Api::namespaced(self.client.clone(), namespace)
    }

    async fn create(&self, namespace: &str, name: &str, spec: serde_json::Value) {
        let spec: VoucherSpec = serde_json::from_value(spec).unwrap();
        self.vouchers(namespace)
            .create(&PostParams::default(), &Voucher::new(name, spec))
            .await
            .unwrap();
    }

    async fn until(
        &self,
        namespace: &str,
        name: &str,
        what: &str,
        check: impl Fn(&Voucher) -> bool,
    ) -> Voucher {
        let api = self.vouchers(namespace);
        support::eventually_within(Duration::from_secs(20), what, || async {
            api.get_opt(name).await.unwrap().filter(|v| check(v))
        })
        .await
    }

    /// The vendor's global voucher (cap `cap`) applied at the hub and on the Sovereign, which
    /// holds a share of it (at least one refill step) when this returns.
    async fn applied_at_hub_and_held(&self, cap: i32) {
        self.create(&self.hub_ns, "global-e2e", global(cap)).await;
        self.until(&self.hub_ns, "global-e2e", "the hub's definition", |v| {
            phase(v) == Some(Phase::Active)
        })
        .await;
        self.create(&self.sov_ns, "global-e2e", global(cap)).await;
        self.until(&self.sov_ns, "global-e2e", "a share held here", |v| {
            share(v).is_some_and(|s| s >= 3)
        })
        .await;
    }

    async fn row(&self, code: &str) -> Option<(bool, i32, i32)> {
        sqlx::query_as(
            "SELECT active, max_redemptions, times_redeemed FROM promo_codes WHERE code = $1",
        )
        .bind(code)
        .fetch_optional(&self.pool)
        .await
        .unwrap()
    }

    async fn record(&self, code: &str) -> voucher_operator::domain::allotment::Record {
        let kv = jetstream::new(self.nats.clone())
            .get_key_value(allotment::BUCKET)
            .await
            .unwrap();
        allotment::read(&kv, code)
            .await
            .unwrap()
            .expect("a record")
            .0
    }
}

fn phase(v: &Voucher) -> Option<Phase> {
    v.status.as_ref().and_then(|s| s.phase)
}

fn reason(v: &Voucher) -> Option<String> {
    let status = v.status.as_ref()?;
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some(ready.reason.clone())
}

fn share(v: &Voucher) -> Option<i64> {
    Some(v.status.as_ref()?.allotment.as_ref()?.share)
}

fn global(cap: i32) -> serde_json::Value {
    json!({"code": "GLOBAL-E2E", "creditOMR": 50, "maxRedemptions": cap, "scope": "Global"})
}

/// Redeems for `customer`, asking again while this Sovereign's share is used up.
async fn redeem(store: &Store, customer: &str) -> bool {
    let code = Code::parse("GLOBAL-E2E").unwrap();
    support::redeem_within(store, &code, customer, 1000)
        .await
        .unwrap_or_else(|| panic!("{customer} was told to try again for 20 s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_global_voucher_defined_at_the_hub_is_redeemed_on_a_sovereign_up_to_the_global_cap() {
    let f = federation().await;
    f.create(&f.hub_ns, "global-e2e", global(8)).await;
    f.until(&f.hub_ns, "global-e2e", "the hub's definition", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    f.create(&f.sov_ns, "global-e2e", global(8)).await;
    let copy = f
        .until(&f.sov_ns, "global-e2e", "a share held here", |v| {
            phase(v) == Some(Phase::Active) && share(v).is_some_and(|s| s > 0)
        })
        .await;
    let held = share(&copy).unwrap();
    assert!(held <= 8, "a share within the cap: {held}");
    let (active, max, _) = f.row("GLOBAL-E2E").await.expect("the row");
    assert!(active, "a row with a share is live");
    assert!(
        i64::from(max) <= held,
        "the row's cap is the share, never the spec's 8"
    );

    let mut granted = 0;
    for n in 0..10 {
        granted += usize::from(redeem(&f.store, &format!("customer-{n}")).await);
    }
    assert_eq!(granted, 8, "exactly the global cap");
    let hub = f
        .until(&f.hub_ns, "global-e2e", "the hub's totals", |v| {
            phase(v) == Some(Phase::Exhausted)
        })
        .await;
    let allotment = hub.status.unwrap().allotment.unwrap();
    assert_eq!(allotment.share, 8);
    assert_eq!(allotment.sovereigns.as_deref(), Some("sov1=8/8"));
    f.until(&f.sov_ns, "global-e2e", "the copy exhausted", |v| {
        phase(v) == Some(Phase::Exhausted)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_franchisee_raising_its_copy_is_stalled_and_changes_nothing() {
    let f = federation().await;
    f.create(&f.hub_ns, "global-e2e", global(6)).await;
    f.until(&f.hub_ns, "global-e2e", "the hub's definition", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    let raised =
        json!({"code": "GLOBAL-E2E", "creditOMR": 500, "maxRedemptions": 600, "scope": "Global"});
    f.create(&f.sov_ns, "global-e2e", raised).await;
    let copy = f
        .until(&f.sov_ns, "global-e2e", "the copy stalled", |v| {
            reason(v).as_deref() == Some("DiffersFromHub")
        })
        .await;
    let message = copy.status.unwrap().conditions[0].message.clone();
    assert!(message.contains("maxRedemptions, creditOMR"), "{message}");
    let credit: i32 =
        sqlx::query_scalar("SELECT credit_omr FROM promo_codes WHERE code = 'GLOBAL-E2E'")
            .fetch_one(&f.pool)
            .await
            .unwrap();
    assert_eq!(
        credit, 50,
        "the row carries the hub's credit, not the copy's"
    );
    for n in 0..8 {
        redeem(&f.store, &format!("customer-{n}")).await;
    }
    let (_, _, redeemed) = f.row("GLOBAL-E2E").await.unwrap();
    assert_eq!(redeemed, 6, "the hub's cap holds, whatever the copy says");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_copy_returns_its_unspent_share_before_it_goes() {
    let f = federation().await;
    f.applied_at_hub_and_held(20).await;
    assert!(redeem(&f.store, "customer-1").await);
    f.vouchers(&f.sov_ns)
        .delete("global-e2e", &DeleteParams::default())
        .await
        .unwrap();
    support::eventually_within(Duration::from_secs(20), "the copy gone", || async {
        f.vouchers(&f.sov_ns)
            .get_opt("global-e2e")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let entry = f.record("GLOBAL-E2E").await.sovereigns["sov1"].clone();
    assert_eq!(
        (entry.share, entry.reported),
        (1, 1),
        "only what was spent stays granted"
    );
    assert_eq!(
        f.row("GLOBAL-E2E").await.map(|r| r.0),
        Some(false),
        "the row stays, offered no more"
    );
    // The hub's Voucher deleted: its record switched off, the units spent stay granted.
    f.vouchers(&f.hub_ns)
        .delete("global-e2e", &DeleteParams::default())
        .await
        .unwrap();
    support::eventually_within(
        Duration::from_secs(20),
        "the record switched off",
        || async { (!f.record("GLOBAL-E2E").await.active).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cap_lowered_at_the_hub_below_what_is_granted_brings_the_unspent_share_back() {
    let f = federation().await;
    f.applied_at_hub_and_held(20).await;
    assert!(redeem(&f.store, "customer-1").await);
    // The vendor lowers the cap to 2, below the units granted: the hub asks for them back.
    let lowered = json!({"spec": {"maxRedemptions": 2}});
    for ns in [&f.hub_ns, &f.sov_ns] {
        f.vouchers(ns)
            .patch(
                "global-e2e",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&lowered),
            )
            .await
            .unwrap();
    }
    let record = support::eventually_within(
        Duration::from_secs(30),
        "the units back under the cap",
        || async {
            let record = f.record("GLOBAL-E2E").await;
            (record.granted() <= 2).then_some(record)
        },
    )
    .await;
    let entry = &record.sovereigns["sov1"];
    assert!(
        entry.share >= entry.reported,
        "never below what was spent: {entry:?}"
    );
    // Within the new cap, the Sovereign is granted again: one more customer, then no more.
    let mut granted = 1;
    for n in 2..6 {
        granted += usize::from(redeem(&f.store, &format!("customer-{n}")).await);
    }
    assert_eq!(granted, 2, "the lowered cap holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_global_voucher_without_the_sovereigns_currency_is_not_offered_and_with_it_grants_in_that_currency()
 {
    let f = federation_in("BHD").await;
    let omr_only = json!({"code": "GLOBAL-E2E", "creditByCurrency": {"OMR": 50}, "maxRedemptions": 20, "scope": "Global"});
    f.create(&f.hub_ns, "global-e2e", omr_only.clone()).await;
    let hub = f
        .until(&f.hub_ns, "global-e2e", "the hub's definition", |v| {
            phase(v) == Some(Phase::Active)
        })
        .await;
    assert_eq!(hub.status.unwrap().grant.as_deref(), Some("50 OMR"));
    f.create(&f.sov_ns, "global-e2e", omr_only).await;
    let copy = f
        .until(&f.sov_ns, "global-e2e", "the copy not offered", |v| {
            reason(v).as_deref() == Some("NoCreditInCurrency")
        })
        .await;
    let message = copy.status.unwrap().conditions[0].message.clone();
    assert!(
        message.contains("no credit in BHD") && message.contains("OMR"),
        "{message}"
    );
    assert_eq!(
        f.row("GLOBAL-E2E").await,
        None,
        "nothing written, nothing offered"
    );

    // The vendor adds the Sovereign's currency (at the hub, and in the copy its Flux applies).
    let both = json!({"spec": {"creditByCurrency": {"OMR": 50, "BHD": 60}}});
    for ns in [&f.hub_ns, &f.sov_ns] {
        f.vouchers(ns)
            .patch(
                "global-e2e",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&both),
            )
            .await
            .unwrap();
    }
    let copy = f
        .until(&f.sov_ns, "global-e2e", "a share held in BHD", |v| {
            phase(v) == Some(Phase::Active) && share(v).is_some_and(|s| s > 0)
        })
        .await;
    let grant = copy.status.unwrap().grant.unwrap_or_default();
    assert!(grant.contains("60") && grant.contains("BHD"), "{grant}");
    assert!(redeem(&f.store, "customer-1").await);
    let credit: i32 =
        sqlx::query_scalar("SELECT credit_omr FROM promo_codes WHERE code = 'GLOBAL-E2E'")
            .fetch_one(&f.pool)
            .await
            .unwrap();
    assert_eq!(credit, 60, "the credit in this Sovereign's currency");

    // The vendor takes BHD away again: not offered, and the unspent share goes back.
    let omr_again = json!({"spec": {"creditByCurrency": {"OMR": 50, "BHD": null}}});
    for ns in [&f.hub_ns, &f.sov_ns] {
        f.vouchers(ns)
            .patch(
                "global-e2e",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&omr_again),
            )
            .await
            .unwrap();
    }
    f.until(&f.sov_ns, "global-e2e", "not offered again", |v| {
        reason(v).as_deref() == Some("NoCreditInCurrency")
    })
    .await;
    let (active, _, redeemed) = f.row("GLOBAL-E2E").await.unwrap();
    assert!(!active, "the row is switched off at once");
    assert_eq!(redeemed, 1);
    support::eventually_within(
        Duration::from_secs(20),
        "the unspent share returned",
        || async {
            let record = f.record("GLOBAL-E2E").await;
            (record.sovereigns.get("sov1").map(|e| e.share) == Some(1)).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn once_per_customer_anywhere_holds_on_a_sovereign_whatever_its_copy_says() {
    let f = federation().await;
    let once = json!({"code": "GLOBAL-E2E", "creditOMR": 50, "maxRedemptions": 20, "scope": "Global", "perCustomer": "Global"});
    f.create(&f.hub_ns, "global-e2e", once).await;
    f.until(&f.hub_ns, "global-e2e", "the hub's definition", |v| {
        phase(v) == Some(Phase::Active)
    })
    .await;
    assert!(f.record("GLOBAL-E2E").await.per_customer_global);
    // A franchisee's copy without it: said, and changes nothing.
    f.create(&f.sov_ns, "global-e2e", global(20)).await;
    let copy = f
        .until(&f.sov_ns, "global-e2e", "the copy stalled", |v| {
            reason(v).as_deref() == Some("DiffersFromHub") && share(v).is_some_and(|s| s > 0)
        })
        .await;
    let message = copy.status.unwrap().conditions[0].message.clone();
    assert!(message.contains("perCustomer"), "{message}");
    let once: bool = sqlx::query_scalar(
        "SELECT per_customer_global FROM voucher_global_allotments WHERE code = 'GLOBAL-E2E'",
    )
    .fetch_one(&f.pool)
    .await
    .unwrap();
    assert!(once, "bound as the hub defines it");
    let refused = support::seed_checkout(&f.pool, "GLOBAL-E2E", "legacy-customer")
        .await
        .expect_err("only a redemption holding the hub's claim");
    assert!(refused.contains("once per customer"), "{refused}");
}
