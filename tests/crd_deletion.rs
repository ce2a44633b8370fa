//! Deleting the Voucher CRD deletes every Voucher at once: the controller then
//! orphans their codes (left live, said in an Event), never revokes them. Its
//! own test binary, with its own API server: the test deletes the CRD.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use tokio_util::sync::CancellationToken;
use voucher_operator::api::{Voucher, VoucherSpec};
use voucher_operator::controller::metrics::Metrics;
use voucher_operator::controller::{self, Context};
use voucher_operator::store::Store;

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "{what} did not happen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn deleting_the_crd_orphans_every_code_and_revokes_none() {
    support::init_tracing();
    let url = support::fresh_database("crd_deletion").await;
    let pool = support::pool(&url).await;
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    let (client, ns) = support::cluster::setup("crd").await;
    let mut registry = prometheus_client::registry::Registry::default();
    let ctx = Context::new(
        client.clone(),
        store,
        Arc::new(Metrics::register(&mut registry)),
        support::controller_settings(&ns),
    );
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    tokio::spawn(controller::voucher::run(ctx, stop));

    let vouchers: Api<Voucher> = Api::namespaced(client.clone(), &ns);
    for name in ["kept-1", "kept-2", "deleted-1"] {
        let spec: VoucherSpec =
            serde_json::from_value(serde_json::json!({"creditOMR": 5, "deletionPolicy": "Revoke"}))
                .unwrap();
        vouchers
            .create(&PostParams::default(), &Voucher::new(name, spec))
            .await
            .unwrap();
    }
    let live = async |code: &str| -> Option<bool> {
        sqlx::query_scalar::<_, bool>("SELECT deleted_at IS NULL FROM promo_codes WHERE code = $1")
            .bind(code)
            .fetch_optional(&pool)
            .await
            .unwrap()
    };
    for code in ["KEPT-1", "KEPT-2", "DELETED-1"] {
        eventually(&format!("{code} created"), async || {
            live(code).await == Some(true)
        })
        .await;
    }
    // A Voucher deleted on its own, while the CRD stays: its policy, Revoke, applies.
    vouchers
        .delete("deleted-1", &Default::default())
        .await
        .unwrap();
    eventually("DELETED-1 revoked", async || {
        live("DELETED-1").await == Some(false)
    })
    .await;

    // The CRD deleted: every Voucher goes, and every code stays live.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete("vouchers.catalyst.openova.io", &Default::default())
        .await
        .unwrap();
    eventually("the CRD gone", async || {
        crds.get_opt("vouchers.catalyst.openova.io")
            .await
            .unwrap()
            .is_none()
    })
    .await;
    for code in ["KEPT-1", "KEPT-2"] {
        assert_eq!(live(code).await, Some(true), "{code} was revoked");
        let kinds: Vec<String> = sqlx::query_scalar(
            "SELECT kind FROM voucher_audit_outbox WHERE code = $1 ORDER BY seq",
        )
        .bind(code)
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(
            kinds.last().map(String::as_str),
            Some("orphaned"),
            "{code}: {kinds:?}"
        );
    }
    let bindings: i64 = sqlx::query_scalar("SELECT count(*) FROM voucher_bindings")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(bindings, 0, "released, for a Voucher to adopt later");
    // Said where an operator looks.
    let events: Api<Event> = Api::namespaced(client, &ns);
    let warned: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("OrphanedWhileCRDDeleted"))
        .filter_map(|e| e.note)
        .collect();
    assert_eq!(warned.len(), 2, "{warned:?}");
    assert!(
        warned.iter().all(|note| note.contains("spec.adopt")),
        "{warned:?}"
    );
}

#[tokio::test]
async fn deleting_the_campaign_crd_orphans_every_code_and_revokes_none() {
    use k8s_openapi::api::core::v1::Secret;
    use voucher_operator::api::campaign::VoucherCampaign;
    use voucher_operator::controller::campaign;
    use voucher_operator::domain::{Code, Redeemability};
    support::init_tracing();
    let url = support::fresh_database("campaign_crd_deletion").await;
    let pool = support::pool(&url).await;
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    let (client, ns) = support::cluster::setup("campcrd").await;
    let mut registry = prometheus_client::registry::Registry::default();
    let ctx = controller::Context::new(
        client.clone(),
        store.clone(),
        Arc::new(Metrics::register(&mut registry)),
        support::controller_settings(&ns),
    );
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    tokio::spawn(campaign::run(ctx, stop));
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "keep-key"},
        "stringData": {"key": "0123456789abcdef0123456789abcdef"},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    // deletionPolicy Revoke, as most campaigns are: the CRD's deletion must not apply it.
    let campaign: VoucherCampaign = serde_json::from_value(serde_json::json!({
        "apiVersion": "catalyst.openova.io/v1alpha1", "kind": "VoucherCampaign",
        "metadata": {"name": "kept"},
        "spec": {"prefix": "KEPT-", "count": 20, "creditOMR": 5, "deletionPolicy": "Revoke",
                 "keySecretRef": {"name": "keep-key"}},
    }))
    .unwrap();
    Api::<VoucherCampaign>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &campaign)
        .await
        .unwrap();
    let live = async || -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM promo_codes p JOIN voucher_campaign_codes c ON c.code = p.code \
             WHERE p.deleted_at IS NULL AND p.active",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    eventually("20 codes generated", async || live().await == 20).await;

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete("vouchercampaigns.catalyst.openova.io", &Default::default())
        .await
        .unwrap();
    eventually("the campaign CRD gone", async || {
        crds.get_opt("vouchercampaigns.catalyst.openova.io")
            .await
            .unwrap()
            .is_none()
    })
    .await;
    let released: bool = {
        let mut done = false;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done && Instant::now() < deadline {
            done = sqlx::query_scalar(
                "SELECT released_at IS NOT NULL FROM voucher_campaigns WHERE name = 'kept'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        done
    };
    assert!(released, "the campaign's codes were released");
    assert_eq!(live().await, 20, "every code live: none revoked");
    let kinds: Vec<String> = sqlx::query_scalar(
        "SELECT kind FROM voucher_audit_outbox WHERE kind LIKE 'campaign_%' ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("campaign_orphaned"),
        "{kinds:?}"
    );
    assert!(!kinds.iter().any(|k| k == "campaign_revoked"), "{kinds:?}");
    // The orphaned codes are their own: the deleted campaign decides nothing for them any more.
    let first: String =
        sqlx::query_scalar("SELECT code FROM voucher_campaign_codes WHERE code_index = 0")
            .fetch_one(&pool)
            .await
            .unwrap();
    let record = store
        .find_live(&Code::parse(&first).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.campaign_on, None);
    assert_eq!(
        Redeemability::of(Some(&record), chrono::Utc::now()),
        Redeemability::Redeemable
    );
    // Said where an operator looks.
    let events: Api<Event> = Api::namespaced(client, &ns);
    let warned = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("OrphanedWhileCRDDeleted"))
        .count();
    assert_eq!(warned, 1);
}
