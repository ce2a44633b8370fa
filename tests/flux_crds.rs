//! The CRDs under Flux: taken out of the Kustomization they stay (the
//! `kustomize.toolkit.fluxcd.io/prune: disabled` the chart and `crds/` set),
//! and deleted anyway they revoke nothing. Its own test binary, with its own
//! API server: the test deletes the Voucher CRD.

mod support;

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use support::eventually_within;
use support::gitops::{SYNC, harness, voucher_yaml};

const VOUCHER_CRD: &str = "vouchers.catalyst.openova.io";
const CAMPAIGN_CRD: &str = "vouchercampaigns.catalyst.openova.io";

/// `crds/` of this checkout, and a Voucher, as one kustomization.
fn kustomization(with_crds: bool) -> String {
    let crds = if with_crds {
        "  - crds/voucher.yaml\n  - crds/vouchercampaign.yaml\n"
    } else {
        ""
    };
    format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n{crds}  - vouchers/kept.yaml\n"
    )
}

#[tokio::test]
async fn crds_taken_out_of_git_stay_and_a_crd_deleted_anyway_revokes_nothing() {
    let h = harness().await;
    h.repo.copy_dir("crds", "crds");
    h.repo.write(
        "vouchers/kept.yaml",
        &voucher_yaml("crd-kept", "creditOMR: 5\ndeletionPolicy: Revoke"),
    );
    h.repo.write("kustomization.yaml", &kustomization(true));
    let commit = h.repo.commit_and_push("The CRDs and a Voucher");
    let ks = h.kustomization("./").await;
    h.ready_revision(&ks, &commit).await;
    let crds: Api<CustomResourceDefinition> = Api::all(h.client.clone());
    let uids = [
        crds.get(VOUCHER_CRD).await.unwrap().metadata.uid,
        crds.get(CAMPAIGN_CRD).await.unwrap().metadata.uid,
    ];

    // The CRDs leave the Kustomization: Flux prunes what left, but not these.
    h.repo.remove("crds");
    h.repo.write("kustomization.yaml", &kustomization(false));
    let commit = h.repo.commit_and_push("The CRDs out of this Kustomization");
    ks.sync().await;
    h.ready_revision(&ks, &commit).await;
    for (name, uid) in [VOUCHER_CRD, CAMPAIGN_CRD].into_iter().zip(uids) {
        let crd = crds.get(name).await.unwrap();
        assert_eq!(crd.metadata.uid, uid, "{name}: the same CRD, never deleted");
        assert!(
            crd.metadata.deletion_timestamp.is_none(),
            "{name} is being deleted"
        );
    }
    assert!(h.vouchers().get_opt("crd-kept").await.unwrap().is_some());
    assert_eq!(h.row("CRD-KEPT").await, Some((5, true, false)));

    // Deleted anyway (by hand): every Voucher goes with it, and no code is revoked, whatever
    // its deletionPolicy says.
    crds.delete(VOUCHER_CRD, &Default::default()).await.unwrap();
    eventually_within(SYNC, "the CRD gone", || async {
        crds.get_opt(VOUCHER_CRD)
            .await
            .ok()
            .and_then(|crd| crd.is_none().then_some(()))
    })
    .await;
    assert_eq!(
        h.row("CRD-KEPT").await,
        Some((5, true, false)),
        "revoked with its CRD"
    );
    assert_eq!(
        h.audit_kinds("CRD-KEPT").await.last().map(String::as_str),
        Some("orphaned")
    );
    assert!(h.redeemable("CRD-KEPT").await);

    // Flux's next sync says what is missing, and changes nothing.
    ks.sync().await;
    let (reason, message) = h.failed(&ks, "the sync refused").await;
    assert!(
        message.contains("Voucher") && message.contains("crd-kept"),
        "{reason}: {message}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.row("CRD-KEPT").await.map(|r| r.1), Some(true));
}
