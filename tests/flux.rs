//! GitOps through Flux itself: source-controller and kustomize-controller
//! built from their upstream modules, a Git server on loopback, the real API
//! server and Postgres, and the operator's controllers. Every test commits to
//! Git and pushes; nothing is applied by hand. The Kustomization is
//! `examples/flux/vouchers.yaml` as shipped (prune, wait, its health
//! expressions), pointed at the test's repository and namespace.

mod support;

use std::time::Duration;

use kube::api::Api;
use serde_json::{Value, json};
use support::eventually_within;
use support::gitops::{SYNC, harness, harness_on, ready, voucher_yaml};
use tokio_util::sync::CancellationToken;
use voucher_operator::api::campaign::VoucherCampaign;
use voucher_operator::domain::Phase;

#[tokio::test]
async fn the_examples_committed_to_git_become_ready_vouchers_and_a_ready_kustomization() {
    let h = harness().await;
    h.repo.copy_dir("examples/vouchers", "vouchers");
    let commit = h.repo.commit_and_push("The example Vouchers");
    let ks = h.kustomization("./vouchers").await;
    h.ready_revision(&ks, &commit).await;

    // Ready only once the operator had reconciled each (the health expressions): so at that
    // moment every Voucher is Ready already, with no waiting here.
    let vouchers = h.vouchers().list(&Default::default()).await.unwrap().items;
    let names: Vec<_> = vouchers
        .iter()
        .map(|v| v.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(vouchers.len(), 5, "{names:?}");
    for voucher in &vouchers {
        assert!(
            ready(voucher),
            "{:?} not Ready when Flux was",
            voucher.metadata.name
        );
    }
    assert!(h.redeemable("OMANTEL-MUSCAT-200").await);
    assert!(h.redeemable("PARTNER_WELCOME_10").await);
}

#[tokio::test]
async fn a_committed_campaign_makes_the_kustomization_ready_only_once_every_code_exists() {
    let h = harness().await;
    h.key_secret("flux-key").await;
    // Large enough that generation takes several of kustomize-controller's 5 s health polls.
    h.repo.write(
        "campaigns/bill.yaml",
        "apiVersion: catalyst.openova.io/v1alpha1\nkind: VoucherCampaign\nmetadata:\n  name: flux-bill\n\
         spec:\n  prefix: FLUX-\n  count: 60000\n  codeLength: 12\n  creditOMR: 5\n  description: bill insert\n\
         \x20 keySecretRef:\n    name: flux-key\n",
    );
    let commit = h.repo.commit_and_push("A campaign");
    let ks = h.kustomization("./campaigns").await;
    h.ready_revision(&ks, &commit).await;
    let campaign = Api::<VoucherCampaign>::namespaced(h.client.clone(), &h.ns)
        .get("flux-bill")
        .await
        .unwrap();
    let generated = campaign.status.as_ref().and_then(|s| s.generated);
    assert_eq!(
        generated,
        Some(60000),
        "Flux called the campaign ready before it had generated its codes"
    );
}

#[tokio::test]
async fn a_committed_voucher_claiming_a_taken_code_fails_the_kustomization_naming_it() {
    let h = harness().await;
    h.repo.write(
        "vouchers/first.yaml",
        &voucher_yaml("first", "code: SHARED-1\ncreditOMR: 5"),
    );
    let commit = h.repo.commit_and_push("The first owner");
    let ks = h.kustomization("./vouchers").await;
    h.ready_revision(&ks, &commit).await;

    h.repo.write(
        "vouchers/second.yaml",
        &voucher_yaml("second", "code: SHARED-1\ncreditOMR: 7"),
    );
    h.repo.commit_and_push("A second claim on the same code");
    ks.sync().await;
    let (reason, message) = h.failed(&ks, "the health check failed").await;
    assert_eq!(reason, "HealthCheckFailed", "{message}");
    // Flux names the resource and its verdict, never the resource's own message (fluxcd/pkg
    // ssa's WaitForSet prints `Kind/namespace/name status: 'Failed'`): the reason is on the
    // Voucher it names, one `kubectl get vouchers` away.
    assert!(
        message.contains(&format!("Voucher/{}/second status: 'Failed'", h.ns)),
        "the Kustomization's message does not name the Voucher: {message}"
    );
    let second = h.vouchers().get("second").await.unwrap();
    let stalled = second
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Stalled"))
        .expect("the second Voucher is Stalled");
    assert_eq!(stalled.reason, "CodeConflict", "{}", stalled.message);
    assert_eq!(
        h.row("SHARED-1").await,
        Some((5, true, false)),
        "the first owner's row untouched"
    );
}

#[tokio::test]
async fn a_credit_changed_in_git_moves_the_row_once_and_drift_is_reverted_without_flux() {
    let h = harness().await;
    h.repo.write(
        "vouchers/v.yaml",
        &voucher_yaml("flux-credit", "creditOMR: 5"),
    );
    let commit = h.repo.commit_and_push("5 OMR");
    let ks = h.kustomization("./vouchers").await;
    h.ready_revision(&ks, &commit).await;
    let before = h.audit_kinds("FLUX-CREDIT").await;

    h.repo.write(
        "vouchers/v.yaml",
        &voucher_yaml("flux-credit", "creditOMR: 9"),
    );
    let commit = h.repo.commit_and_push("9 OMR");
    ks.sync().await;
    h.ready_revision(&ks, &commit).await;
    assert_eq!(h.row("FLUX-CREDIT").await, Some((9, true, false)));
    let after = h.audit_kinds("FLUX-CREDIT").await;
    assert_eq!(
        after.len(),
        before.len() + 1,
        "one audit record for one change: {after:?}"
    );

    // The billing admin page (or psql) edits the row: the operator reverts it, Flux not involved.
    sqlx::query("UPDATE promo_codes SET credit_omr = 500 WHERE code = 'FLUX-CREDIT'")
        .execute(&h.pool)
        .await
        .unwrap();
    eventually_within(SYNC, "the drift reverted", || async {
        (h.row("FLUX-CREDIT").await == Some((9, true, false))).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_manifest_removed_from_git_is_pruned_and_its_code_revoked_or_orphaned_per_its_policy() {
    let h = harness().await;
    h.repo.write(
        "vouchers/keep.yaml",
        &voucher_yaml("flux-keep", "creditOMR: 1"),
    );
    h.repo.write(
        "vouchers/revoke.yaml",
        &voucher_yaml("flux-revoke", "creditOMR: 5"),
    );
    h.repo.write(
        "vouchers/orphan.yaml",
        &voucher_yaml("flux-orphan", "creditOMR: 5\ndeletionPolicy: Orphan"),
    );
    let commit = h.repo.commit_and_push("Three Vouchers");
    let ks = h.kustomization("./vouchers").await;
    h.ready_revision(&ks, &commit).await;

    h.repo.remove("vouchers/revoke.yaml");
    h.repo.remove("vouchers/orphan.yaml");
    let commit = h.repo.commit_and_push("Two removed");
    ks.sync().await;
    h.ready_revision(&ks, &commit).await;
    eventually_within(SYNC, "both pruned Vouchers gone", || async {
        let names: Vec<_> = h
            .vouchers()
            .list(&Default::default())
            .await
            .ok()?
            .items
            .iter()
            .map(|v| v.metadata.name.clone().unwrap())
            .collect();
        (names == ["flux-keep"]).then_some(())
    })
    .await;
    assert_eq!(
        h.row("FLUX-REVOKE").await,
        Some((5, false, true)),
        "revoked"
    );
    assert_eq!(
        h.row("FLUX-ORPHAN").await,
        Some((5, true, false)),
        "left live"
    );
    assert!(h.redeemable("FLUX-ORPHAN").await);
    assert_eq!(h.row("FLUX-KEEP").await, Some((1, true, false)));
}

fn admin_token() -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"sub": "root", "role": "sovereign-admin", "exp": now + 600, "iat": now});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

const JWT_SECRET: &str = "flux-test-secret-of-32-bytes-long!";

#[tokio::test]
async fn the_admin_revoke_of_a_flux_voucher_holds_and_the_next_sync_says_so() {
    let h = harness().await;
    h.repo.write(
        "vouchers/v.yaml",
        &voucher_yaml("flux-leaked", "creditOMR: 5"),
    );
    let commit = h.repo.commit_and_push("A code that will leak");
    let ks = h.kustomization("./vouchers").await;
    h.ready_revision(&ks, &commit).await;

    let auth = voucher_operator::server::auth::AuthSettings {
        hs256_secret: Some(JWT_SECRET.into()),
        leeway: Duration::from_secs(5),
        ..Default::default()
    };
    let (base, server) = support::serve_http(
        h.store.clone(),
        voucher_operator::server::ServerSettings {
            admin_namespace: h.ns.clone(),
            ..support::server_settings()
        },
        auth,
        Some(h.client.clone()),
    )
    .await;
    let _server = server.drop_guard();
    let response = reqwest::Client::new()
        .delete(format!("{base}/billing/vouchers/revoke/FLUX-LEAKED"))
        .bearer_auth(admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    // The real kustomize-controller's labels are what the server recognises.
    assert_eq!(body["voucher_deleted"], false, "{body}");
    assert!(
        body["note"]
            .as_str()
            .unwrap()
            .contains("Flux Kustomization"),
        "{body}"
    );

    // The kept Voucher says so at once (its code's binding went with the revoke: the revoke
    // wakes it by name), not at its next resync, an hour away here.
    eventually_within(
        Duration::from_secs(10),
        "the Voucher's phase Revoked",
        || async {
            let voucher = h.vouchers().get("flux-leaked").await.ok()?;
            (voucher.status?.phase? == Phase::Revoked).then_some(())
        },
    )
    .await;

    ks.sync().await;
    let (reason, message) = h
        .failed(&ks, "the next sync reporting the revoked code")
        .await;
    assert_eq!(reason, "HealthCheckFailed", "{message}");
    assert!(
        message.contains(&format!("Voucher/{}/flux-leaked", h.ns)),
        "{message}"
    );
    assert_eq!(
        h.row("FLUX-LEAKED").await,
        Some((5, false, true)),
        "still revoked"
    );
    assert_eq!(h.redeem("FLUX-LEAKED").await, "Fresh(NotFound)");
}

#[tokio::test]
async fn an_invalid_voucher_in_a_commit_is_reported_with_the_api_servers_message() {
    let h = harness().await;
    h.repo.write(
        "vouchers/good.yaml",
        &voucher_yaml("flux-good", "creditOMR: 5"),
    );
    let commit = h.repo.commit_and_push("A good Voucher");
    let ks = h.kustomization("./vouchers").await;
    h.ready_revision(&ks, &commit).await;

    h.repo.write(
        "vouchers/also-good.yaml",
        &voucher_yaml("flux-also-good", "creditOMR: 6"),
    );
    h.repo.write(
        "vouchers/bad.yaml",
        &voucher_yaml("flux-bad", "creditOMR: -5"),
    );
    h.repo.commit_and_push("One good, one bad");
    ks.sync().await;
    let (reason, message) = h.failed(&ks, "the apply refused").await;
    assert_eq!(reason, "ReconciliationFailed", "{message}");
    assert!(
        message.contains("Voucher/")
            && message.contains("flux-bad")
            && message.contains("creditOMR"),
        "the API server's message is not in: {message}"
    );
    // Flux validates the whole commit (a server-side dry run) before applying any of it.
    assert!(
        h.vouchers()
            .get_opt("flux-also-good")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(h.row("FLUX-GOOD").await, Some((5, true, false)));
}

#[tokio::test]
async fn with_the_git_server_down_flux_retries_and_nothing_is_revoked() {
    let git = support::flux::flux().git_server_of_its_own();
    let h = harness_on(&git).await;
    h.repo.write(
        "vouchers/v.yaml",
        &voucher_yaml("flux-steady", "creditOMR: 5"),
    );
    let commit = h.repo.commit_and_push("5 OMR");
    let ks = h.kustomization("./vouchers").await;
    h.ready_revision(&ks, &commit).await;

    h.repo.write(
        "vouchers/v.yaml",
        &voucher_yaml("flux-steady", "creditOMR: 8"),
    );
    let commit = h.repo.commit_and_push("8 OMR");
    git.stop();
    ks.sync().await;
    eventually_within(SYNC, "the source failing its fetch", || async {
        let (status, _, message) = ks.source_condition("Ready").await?;
        (status == "False").then_some(message)
    })
    .await;
    assert_eq!(
        h.row("FLUX-STEADY").await,
        Some((5, true, false)),
        "nothing revoked or changed"
    );
    assert!(h.vouchers().get_opt("flux-steady").await.unwrap().is_some());

    git.start();
    ks.sync().await;
    h.ready_revision(&ks, &commit).await;
    assert_eq!(h.row("FLUX-STEADY").await, Some((8, true, false)));
}

#[tokio::test]
async fn with_the_operator_stopped_flux_waits_and_everything_converges_when_it_returns() {
    let mut h = harness().await;
    h.operator.cancel();
    h.repo.write(
        "vouchers/v.yaml",
        &voucher_yaml("flux-waiting", "creditOMR: 5"),
    );
    let commit = h
        .repo
        .commit_and_push("A Voucher while the operator is away");
    let ks = h.kustomization("./vouchers").await;
    eventually_within(SYNC, "Flux waiting on the health check", || async {
        let (status, reason, _) = ks.condition("Reconciling").await?;
        (status == "True"
            && reason == "Progressing"
            && h.vouchers()
                .get_opt("flux-waiting")
                .await
                .ok()??
                .status
                .is_none())
        .then_some(())
    })
    .await;
    // A while longer: still waiting, not Ready, and no row.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_ne!(
        ks.condition("Ready").await.map(|c| c.0),
        Some("True".into())
    );
    assert_eq!(h.row("FLUX-WAITING").await, None);

    let parent = CancellationToken::new();
    h.operator = h.start_operator(&parent);
    let _operator = parent.drop_guard();
    h.ready_revision(&ks, &commit).await;
    assert!(h.redeemable("FLUX-WAITING").await);
}
