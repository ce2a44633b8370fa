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
use voucher_operator::controller::{self, Context, Settings};
use voucher_operator::domain::Issuers;
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
        Settings {
            resync_interval: Duration::from_secs(3600),
            status_min_interval: Duration::from_millis(500),
            namespace: Some(ns.clone()),
            identity: "test".into(),
            concurrency: 4,
            issuers: Issuers::new([ns.clone()]),
            key_namespace: ns.clone(),
        },
    );
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    tokio::spawn(controller::run(ctx, stop));

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
