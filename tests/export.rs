//! `voucher-operator export` on a database in the billing service's shape
//! (never touched by the operator), then the round trip: the manifests
//! applied to the real API server are adopted by the controller, with
//! their counters and creation times unchanged and no `created` record.

mod support;

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;
use voucher_operator::api::Voucher;
use voucher_operator::controller::metrics::Metrics;
use voucher_operator::controller::{self, Context, Settings};
use voucher_operator::domain::Phase;
use voucher_operator::store::Store;

const BILLING: &str = "
CREATE TABLE customers (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), user_id TEXT UNIQUE NOT NULL,
  tenant_id TEXT NOT NULL, stripe_customer_id TEXT UNIQUE, email TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE TABLE promo_codes (code TEXT PRIMARY KEY, credit_omr INT NOT NULL, description TEXT NOT NULL DEFAULT '',
  active BOOLEAN NOT NULL DEFAULT true, max_redemptions INT NOT NULL DEFAULT 0, times_redeemed INT NOT NULL DEFAULT 0,
  created_at TIMESTAMPTZ NOT NULL DEFAULT now(), deleted_at TIMESTAMPTZ NULL);
INSERT INTO promo_codes (code, credit_omr, description, active, max_redemptions, times_redeemed, created_at, deleted_at) VALUES
  ('OMANTEL-MUSCAT-200', 200, 'launch', true, 200, 17, '2025-03-01T00:00:00Z', NULL),
  ('SPRING_SALE', 15, 'spring', false, 0, 4, '2025-04-01T00:00:00Z', NULL),
  ('FREE-1', 0, 'a legacy zero-credit code', true, 0, 0, '2025-01-01T00:00:00Z', NULL),
  ('OLD-PROMO', 5, '', false, 0, 9, '2024-06-01T00:00:00Z', '2025-01-15T00:00:00Z');
";

fn export(database: &str, namespace: &str, extra: &[&str]) -> (String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
        .args(["export", "--namespace", namespace])
        .args(extra)
        .env("DATABASE_URL", database)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// The Vouchers of a multi-document YAML (a document of comments only is none).
fn documents(yaml: &str) -> Vec<Voucher> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap())
        .filter(|doc| !doc.is_null())
        .map(|doc| serde_yaml::from_value(doc).unwrap())
        .collect()
}

#[tokio::test]
async fn exported_codes_are_adopted_with_their_history() {
    let database = support::fresh_database("export").await;
    let pool = support::pool(&database).await;
    sqlx::raw_sql(BILLING).execute(&pool).await.unwrap();
    let (client, ns) = support::cluster::setup("export").await;

    let (db, namespace) = (database.clone(), ns.clone());
    let (yaml, report) = tokio::task::spawn_blocking(move || export(&db, &namespace, &[]))
        .await
        .unwrap();
    let vouchers = documents(&yaml);
    let codes: Vec<_> = vouchers
        .iter()
        .map(|v| v.spec.code.clone().unwrap())
        .collect();
    assert_eq!(
        codes,
        ["OMANTEL-MUSCAT-200", "SPRING_SALE"],
        "live, valid codes only"
    );
    assert!(
        report.contains("skipped \"FREE-1\": the credit is 0 OMR; a voucher grants at least 1 OMR"),
        "{report}"
    );
    // Whether the API server accepts them (schema, CEL, names) shows when they are created below.
    let spring = &vouchers[1];
    assert!(!spring.spec.active);
    // The point of an exported manifest is to take its row over: it asks to.
    assert!(
        vouchers
            .iter()
            .all(|v| v.spec.adopt && v.spec.reissue.is_none())
    );

    let (db, namespace) = (database.clone(), ns.clone());
    let (with_deleted, _) =
        tokio::task::spawn_blocking(move || export(&db, &namespace, &["--include-deleted"]))
            .await
            .unwrap();
    let all = documents(&with_deleted);
    let old = all
        .iter()
        .find(|v| v.spec.code.as_deref() == Some("OLD-PROMO"))
        .expect("the tombstone, on request");
    assert!(!old.spec.active);
    // It asks to bring back this revocation, and no later one: re-applied after another
    // revoke, the manifest revives nothing.
    let revoked_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT deleted_at FROM promo_codes WHERE code = 'OLD-PROMO'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        old.spec.reissue.as_ref().map(|r| r.revoked_at),
        Some(revoked_at),
        "a revoked code asks to be reissued, naming its revocation"
    );
    assert!(!old.spec.adopt);

    // The round trip: the operator migrates the billing database and adopts.
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let settings = Settings {
        status_min_interval: Duration::from_millis(100),
        identity: "export".into(),
        concurrency: 2,
        ..support::controller_settings(&ns)
    };
    let ctx = Context::new(
        client.clone(),
        store,
        Arc::new(Metrics::register(&mut registry)),
        settings,
    );
    let stop = CancellationToken::new();
    tokio::spawn(controller::voucher::run(ctx, stop.clone()));
    let api: Api<Voucher> = Api::namespaced(client, &ns);
    for v in &vouchers {
        api.create(&PostParams::default(), v).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    for v in &vouchers {
        let name = v.metadata.name.clone().unwrap();
        loop {
            let current = api.get(&name).await.unwrap();
            if matches!(
                current.status.and_then(|s| s.phase),
                Some(Phase::Active | Phase::Inactive)
            ) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} was not reconciled"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stop.cancel();

    let rows: Vec<(String, i32, String)> =
        sqlx::query_as("SELECT code, times_redeemed, created_at::text FROM promo_codes WHERE code IN ('OMANTEL-MUSCAT-200', 'SPRING_SALE') ORDER BY code")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        [
            (
                "OMANTEL-MUSCAT-200".to_owned(),
                17,
                "2025-03-01 00:00:00+00".to_owned()
            ),
            (
                "SPRING_SALE".to_owned(),
                4,
                "2025-04-01 00:00:00+00".to_owned()
            ),
        ]
    );
    let audits: Vec<(String, String)> =
        sqlx::query_as("SELECT code, kind FROM voucher_audit_outbox ORDER BY code, seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        audits,
        [
            ("OMANTEL-MUSCAT-200".to_owned(), "adopted".to_owned()),
            ("SPRING_SALE".to_owned(), "adopted".to_owned())
        ],
        "one adopted record each, nothing created"
    );

    // Exported again, the codes the Vouchers now own are left out, naming their owner: applying
    // them a second time could only conflict.
    let (db, namespace) = (database.clone(), ns.clone());
    let (again, report) = tokio::task::spawn_blocking(move || export(&db, &namespace, &[]))
        .await
        .unwrap();
    assert!(documents(&again).is_empty(), "{again}");
    assert!(
        again.contains(&format!(
            "# OMANTEL-MUSCAT-200 is owned by Voucher {ns}/omantel-muscat-200 (deletionPolicy Revoke): not exported"
        )),
        "{again}"
    );
    assert!(
        report.contains("skipped \"SPRING_SALE\": owned by Voucher"),
        "{report}"
    );
}

#[test]
fn export_takes_a_path_not_a_format_word() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
        .args(["export", "-o", "yaml"])
        .env("DATABASE_URL", "postgres://127.0.0.1:1/none")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("-o vouchers.yaml") && stderr.contains("always YAML"),
        "{stderr}"
    );
}

/// A Voucher deleted with `deletionPolicy: Orphan` left its code to nobody, on purpose: exported
/// again, the code keeps that choice (the default would revoke it when the adopting Voucher is
/// deleted), until it is bound or revoked again; a release forced to Orphan (the CRD going) is
/// not the owner's choice.
#[tokio::test]
async fn a_code_released_with_orphan_is_exported_with_orphan() {
    use voucher_operator::api::DeletionPolicy::{self, Orphan, Revoke};
    use voucher_operator::domain::{Code, Owner, Request, Terms};
    use voucher_operator::store::sync::{Released, Wanted};

    let database = support::fresh_database("export_orphan").await;
    let pool = support::pool(&database).await;
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    let code = Code::parse("KEPT-ON-DELETE").unwrap();
    let owner = |uid: &str| Owner {
        namespace: "billing".into(),
        name: "kept-on-delete".into(),
        uid: uid.into(),
    };
    let terms = Terms::granting(20);
    let bind = |owner: Owner, adopt: bool, deletion_policy: DeletionPolicy| {
        let (store, code, terms) = (store.clone(), code.clone(), terms.clone());
        async move {
            let wanted = Wanted {
                code: &code,
                owner: &owner,
                generation: 1,
                terms: &terms,
                request: Request {
                    adopt,
                    ..Request::default()
                },
                deletion_policy,
                suspended: false,
                now: chrono::Utc::now(),
                global: None,
            };
            store.sync_voucher(&wanted).await.unwrap()
        }
    };
    let exported = || {
        let db = database.clone();
        async move {
            let run = move || export(&db, "billing", &["--include-deleted"]).0;
            tokio::task::spawn_blocking(run).await.unwrap()
        }
    };
    let recorded = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM voucher_orphan_releases")
            .fetch_one(&pool)
            .await
            .unwrap()
    };

    bind(owner("uid-1"), false, Orphan).await;
    let released = store
        .release_voucher(&code, &owner("uid-1"), None)
        .await
        .unwrap();
    assert!(matches!(released, Released::Orphaned(_)), "{released:?}");
    let yaml = exported().await;
    let vouchers = documents(&yaml);
    assert_eq!(vouchers.len(), 1, "{yaml}");
    assert_eq!(vouchers[0].spec.deletion_policy, Orphan, "{yaml}");
    assert!(
        yaml.contains(
            "# released by Voucher billing/kept-on-delete with deletionPolicy Orphan at "
        ),
        "{yaml}"
    );

    // Adopted again: the new owner's policy holds, and the record of the old choice is gone.
    bind(owner("uid-2"), true, Revoke).await;
    assert_eq!(recorded().await, 0, "bound again, the release is forgotten");
    // Released with Orphan forced (as while the CRD is deleted) by an owner that chose Revoke:
    // exported with the owner's Revoke.
    store
        .release_voucher(&code, &owner("uid-2"), Some(Orphan))
        .await
        .unwrap();
    assert_eq!(
        recorded().await,
        0,
        "a forced Orphan is not the owner's choice"
    );
    let yaml = exported().await;
    assert_eq!(documents(&yaml)[0].spec.deletion_policy, Revoke, "{yaml}");

    // Released with Orphan by choice again, then revoked by an administrator: the revocation is
    // the last word, and the export asks for a reissue with the default policy.
    bind(owner("uid-3"), true, Orphan).await;
    store
        .release_voucher(&code, &owner("uid-3"), None)
        .await
        .unwrap();
    assert_eq!(recorded().await, 1);
    store
        .revoke(&code, "admin")
        .await
        .unwrap()
        .expect("revoked");
    assert_eq!(recorded().await, 0, "revoked, the release is forgotten");
    let yaml = exported().await;
    let vouchers = documents(&yaml);
    assert_eq!(vouchers.len(), 1, "{yaml}");
    assert_eq!(vouchers[0].spec.deletion_policy, Revoke, "{yaml}");
    assert!(!yaml.contains("released by"), "{yaml}");
}
