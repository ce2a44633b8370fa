//! The chart's admission policy, applied as rendered to the real API server and tried through
//! the real `kubectl` by ServiceAccounts that are and are not named adopters: who may ask to
//! take over an existing or revoked code, and a namespace's credit ceiling.

use std::time::{Duration, Instant};

use super::*;

/// A ServiceAccount of `ns` that may create and change Vouchers there — with every verb, as a
/// namespace administrator's Role often grants: RBAC is not what makes an adopter.
fn account(name: &str, ns: &str) -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": name, "namespace": ns}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": format!("{name}-edit"), "namespace": ns},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "voucher-editor"},
               "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]}),
    ]
}

fn voucher(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "catalyst.openova.io/v1alpha1", "kind": "Voucher",
           "metadata": {"name": name}, "spec": spec})
}

#[tokio::test]
async fn the_admission_policy_refuses_adopt_from_a_non_admin() {
    let cluster = support::cluster::cluster();
    let (client, ns) = support::cluster::setup("tenant").await;
    let adopter = format!("system:serviceaccount:{ns}:billing-admin");
    let rendered = render(with(
        json!({"admission": {"adopters": {"users": [adopter]}}}),
    ));
    rendered.assert_valid();
    let dir = tempfile::tempdir().unwrap();
    let admin = cluster.kubeconfig(dir.path(), &ns);

    let mut objects = rendered.of_kinds(&ADMISSION);
    objects.push(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "voucher-editor", "namespace": ns},
        "rules": [{"apiGroups": ["catalyst.openova.io"], "resources": ["vouchers"],
                   "verbs": ["*"]}]}),
    );
    objects.extend(account("tenant", &ns));
    objects.extend(account("billing-admin", &ns));
    let _policy = apply_as_admin(&admin, objects)
        .await
        .expect("the policy and the accounts");
    let tenant = cluster.service_account_kubeconfig(dir.path(), &ns, "tenant");
    let billing_admin = cluster.service_account_kubeconfig(dir.path(), &ns, "billing-admin");
    let vouchers: kube::Api<voucher_operator::api::Voucher> =
        kube::Api::namespaced(client.clone(), &ns);

    // A policy takes effect a moment after it is created or changed (another test may have
    // applied it with other adopters): until the tenant is refused and the adopter admitted,
    // what slipped through is removed and tried again.
    let asks_adopt = voucher("rvw-a1", json!({"creditOMR": 99999, "adopt": true}));
    let probe = voucher("rvw-probe", json!({"creditOMR": 1, "adopt": true}));
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let tenant_refused = cluster.apply(&tenant, &asks_adopt).err();
        let adopter_admitted = cluster.apply(&billing_admin, &probe).is_ok();
        for name in ["rvw-a1", "rvw-probe"] {
            let _ = vouchers.delete(name, &Default::default()).await;
        }
        if let (Some(refused), true) = (&tenant_refused, adopter_admitted) {
            break refused.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the policy never took effect: the tenant {tenant_refused:?}, the adopter admitted: \
             {adopter_admitted}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        refused.contains("spec.adopt takes over a code that already exists or was revoked")
            && refused.contains("admission.adopters")
            && refused.contains(&format!("system:serviceaccount:{ns}:tenant")),
        "{refused}"
    );

    // What the tenant may do: a new code; and not ask for more later, nor for a reissue.
    cluster
        .apply(&tenant, &voucher("plain-1", json!({"creditOMR": 10})))
        .expect("a Voucher without a request");
    let later = cluster
        .apply(
            &tenant,
            &voucher("plain-1", json!({"creditOMR": 10, "adopt": true})),
        )
        .unwrap_err();
    assert!(later.contains("spec.adopt takes over"), "{later}");
    let reissue = cluster
        .apply(
            &tenant,
            &voucher("revived", json!({"creditOMR": 10, "reissue": true})),
        )
        .unwrap_err();
    assert!(reissue.contains("spec.reissue takes over"), "{reissue}");

    // The named adopter may; and once set, editing other fields needs nothing more.
    cluster
        .apply(&billing_admin, &asks_adopt)
        .expect("the adopter sets spec.adopt");
    cluster
        .apply(
            &tenant,
            &voucher("rvw-a1", json!({"creditOMR": 50, "adopt": true})),
        )
        .expect("an edit that leaves spec.adopt as it was");
    assert!(vouchers.get_opt("revived").await.unwrap().is_none());
}

#[tokio::test]
async fn a_namespace_label_caps_the_credit_of_its_vouchers_and_campaigns() {
    let rendered = render(required());
    let cluster = support::cluster::cluster();
    let (client, ns) = support::cluster::setup("capped").await;
    let dir = tempfile::tempdir().unwrap();
    let admin = cluster.kubeconfig(dir.path(), &ns);
    let objects = rendered.of_kinds(&ADMISSION);
    let _policy = apply_as_admin(&admin, objects).await.expect("the policy");
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client);
    namespaces
        .patch(
            &ns,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"metadata": {"labels": {"catalyst.openova.io/max-credit-omr": "100"}}}),
            ),
        )
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut attempt = 0;
    let refused = loop {
        attempt += 1;
        let name = format!("too-much-{attempt}");
        match cluster.apply(&admin, &voucher(&name, json!({"creditOMR": 500}))) {
            Err(refused) => break refused,
            Ok(()) => {
                assert!(
                    Instant::now() < deadline,
                    "the policy never capped the credit"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    assert!(
        refused.contains(&format!(
            "spec.creditOMR is 500 OMR; namespace {ns} allows at most 100"
        )),
        "{refused}"
    );
    cluster
        .apply(&admin, &voucher("enough", json!({"creditOMR": 100})))
        .expect("at the ceiling");
    let raised = cluster
        .apply(&admin, &voucher("enough", json!({"creditOMR": 101})))
        .unwrap_err();
    assert!(raised.contains("allows at most 100"), "{raised}");
    // A campaign's codes are held to the same ceiling.
    let campaign = |credit: i32| {
        json!({"apiVersion": "catalyst.openova.io/v1alpha1", "kind": "VoucherCampaign",
               "metadata": {"name": "inserts"},
               "spec": {"count": 10, "creditOMR": credit, "keySecretRef": {"name": "k"}}})
    };
    let refused = cluster.apply(&admin, &campaign(500)).unwrap_err();
    assert!(
        refused.contains(&format!(
            "spec.creditOMR is 500 OMR; namespace {ns} allows at most 100"
        )),
        "{refused}"
    );
    cluster
        .apply(&admin, &campaign(100))
        .expect("a campaign at the ceiling");
}
