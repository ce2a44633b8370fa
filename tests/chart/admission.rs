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
            &voucher(
                "revived",
                json!({"creditOMR": 10, "reissue": {"revokedAt": "2026-12-01T09:00:00.123456Z"}}),
            ),
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

#[tokio::test]
async fn a_namespace_label_caps_the_discounts_of_its_vouchers_and_campaigns() {
    let rendered = render(required());
    let cluster = support::cluster::cluster();
    let (client, ns) = support::cluster::setup("discounts").await;
    let dir = tempfile::tempdir().unwrap();
    let admin = cluster.kubeconfig(dir.path(), &ns);
    let _policy = apply_as_admin(&admin, rendered.of_kinds(&ADMISSION))
        .await
        .expect("the policy");
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client);
    let labels = json!({"metadata": {"labels": {
        "catalyst.openova.io/max-credit-omr": "100",
        "catalyst.openova.io/max-percent-off": "25",
        "catalyst.openova.io/max-amount-off": "5000",
        "catalyst.openova.io/max-discount-months": "6",
    }}});
    namespaces
        .patch(
            &ns,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(labels),
        )
        .await
        .unwrap();
    let discount = |name: &str, terms: Value| voucher(name, json!({"discount": terms}));
    // The policy takes a moment to be enforced: the first refusal proves it is.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut attempt = 0;
    let refused = loop {
        attempt += 1;
        let name = format!("generous-{attempt}");
        match cluster.apply(&admin, &discount(&name, json!({"percentOff": 30}))) {
            Err(refused) => break refused,
            Ok(()) => {
                assert!(
                    Instant::now() < deadline,
                    "the policy never capped a discount"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    assert!(
        refused.contains(&format!(
            "spec.discount.percentOff is 30; namespace {ns} allows at most 25 percent off"
        )),
        "{refused}"
    );
    // (discount, the refusal it meets or none, why)
    let cases = [
        (
            json!({"percentOff": 25, "durationMonths": 6}),
            None,
            "at both ceilings",
        ),
        (
            json!({"percentOff": 20}),
            None,
            "a once-grant is within any months cap",
        ),
        (
            json!({"amountOff": 5000, "appliesTo": ["install"]}),
            None,
            "the amount's ceiling",
        ),
        (
            json!({"amountOff": 5001}),
            Some("spec.discount.amountOff is 5001"),
            "past the amount",
        ),
        (
            json!({"percentOff": 10, "durationMonths": 12}),
            Some("spec.discount.durationMonths is 12"),
            "past the months",
        ),
    ];
    for (i, (terms, refusal, why)) in cases.into_iter().enumerate() {
        let applied = cluster.apply(&admin, &discount(&format!("case-{i}"), terms));
        match refusal {
            None => applied.unwrap_or_else(|e| panic!("{why}: {e}")),
            Some(said) => {
                let refused = applied.expect_err(why);
                assert!(refused.contains(said), "{why}: {refused}");
            }
        }
    }
    // Raising an admitted discount past the label is refused as creating it would be.
    let raised = cluster
        .apply(
            &admin,
            &discount("case-0", json!({"percentOff": 26, "durationMonths": 6})),
        )
        .unwrap_err();
    assert!(raised.contains("allows at most 25 percent off"), "{raised}");
    // A campaign's codes are held to the same ceilings.
    let campaign = json!({"apiVersion": "catalyst.openova.io/v1alpha1", "kind": "VoucherCampaign",
        "metadata": {"name": "launch"},
        "spec": {"count": 10, "discount": {"percentOff": 50}, "keySecretRef": {"name": "k"}}});
    let refused = cluster.apply(&admin, &campaign).unwrap_err();
    assert!(
        refused.contains("spec.discount.percentOff is 50"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_namespace_label_caps_a_campaigns_credit_in_all() {
    let rendered = render(required());
    let cluster = support::cluster::cluster();
    let (client, ns) = support::cluster::setup("exposure").await;
    let dir = tempfile::tempdir().unwrap();
    let admin = cluster.kubeconfig(dir.path(), &ns);
    let _policy = apply_as_admin(&admin, rendered.of_kinds(&ADMISSION))
        .await
        .expect("the policy");
    kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
        .patch(
            &ns,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"metadata": {"labels": {"catalyst.openova.io/max-campaign-credit-omr": "1000"}}}),
            ),
        )
        .await
        .unwrap();
    let campaign = |name: &str, count: i32, per_code: i32, credit: i32| {
        json!({"apiVersion": "catalyst.openova.io/v1alpha1", "kind": "VoucherCampaign",
               "metadata": {"name": name},
               "spec": {"count": count, "codeLength": 12, "redemptionsPerCode": per_code,
                        "creditOMR": credit, "keySecretRef": {"name": "k"}}})
    };
    // 10,000 codes of 100 OMR: a million OMR in all, while each code is modest.
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        match cluster.apply(&admin, &campaign("wide", 10_000, 1, 100)) {
            Err(refused) => break refused,
            Ok(()) => {
                let _ = cluster
                    .kubectl(&admin)
                    .args(["delete", "vcamp", "wide"])
                    .output();
                assert!(
                    Instant::now() < deadline,
                    "the policy never capped the total"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    assert!(
        refused.contains(&format!(
            "is 1000000 OMR in all; namespace {ns} allows a campaign at most 1000"
        )),
        "{refused}"
    );
    cluster
        .apply(&admin, &campaign("inserts", 10, 1, 100))
        .expect("at the ceiling: 10 x 1 x 100");
    for (count, per_code, what) in [(11, 1, "more codes"), (10, 2, "more redemptions per code")] {
        let grown = cluster
            .apply(&admin, &campaign("inserts", count, per_code, 100))
            .unwrap_err();
        assert!(
            grown.contains("allows a campaign at most 1000"),
            "{what}: {grown}"
        );
    }
}

#[tokio::test]
async fn a_namespace_admin_cannot_lift_its_own_credit_cap() {
    let rendered = render(required());
    let cluster = support::cluster::cluster();
    let (_client, ns) = support::cluster::setup("lift").await;
    let dir = tempfile::tempdir().unwrap();
    let admin = cluster.kubeconfig(dir.path(), &ns);
    // What a namespace admin often holds: every verb on everything in its namespace — which
    // Kubernetes also reads as a grant on the Namespace object itself.
    let mut objects = rendered.of_kinds(&ADMISSION);
    objects.push(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "namespace-admin", "namespace": ns},
        "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}),
    );
    objects.push(json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "ns-admin", "namespace": ns}}));
    objects.push(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "ns-admin", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "namespace-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "ns-admin", "namespace": ns}]}));
    let _policy = apply_as_admin(&admin, objects).await.expect("the policy");
    let tenant = cluster.service_account_kubeconfig(dir.path(), &ns, "ns-admin");
    let label = |kubeconfig: &std::path::Path, change: &str| {
        let output = cluster
            .kubectl(kubeconfig)
            .args(["label", "namespace", &ns, change, "--overwrite"])
            .output()
            .unwrap();
        match output.status.success() {
            true => Ok(()),
            false => Err(String::from_utf8_lossy(&output.stderr).into_owned()),
        }
    };
    const CAP: &str = "catalyst.openova.io/max-credit-omr";
    label(&admin, &format!("{CAP}=100")).expect("an adopter (system:masters) sets the cap");
    // RBAC lets the tenant relabel its namespace: an unrelated label goes through.
    label(&tenant, "team=checkout").expect("the Role reaches the Namespace");
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        match label(&tenant, &format!("{CAP}=100000")) {
            Err(refused) => break refused,
            Ok(()) => {
                label(&admin, &format!("{CAP}=100")).unwrap();
                assert!(
                    Instant::now() < deadline,
                    "the policy never guarded the cap"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    assert!(
        refused.contains(&format!(
            "the label {CAP} caps the credit or discount of the Vouchers and campaigns of namespace {ns}"
        )) && refused.contains(&format!(
            "system:serviceaccount:{ns}:ns-admin is not one of them"
        )),
        "{refused}"
    );
    // Nor removed, nor the campaign cap or a discount cap set.
    for change in [
        format!("{CAP}-"),
        "catalyst.openova.io/max-campaign-credit-omr=5".to_owned(),
        "catalyst.openova.io/max-percent-off=100".to_owned(),
        "catalyst.openova.io/max-amount-off=1".to_owned(),
        "catalyst.openova.io/max-discount-months=36".to_owned(),
    ] {
        let refused = label(&tenant, &change).unwrap_err();
        assert!(refused.contains("only the adopters"), "{change}: {refused}");
    }
    // Nor through the Namespace's status subresource, which carries its metadata too.
    let patch = format!(r#"{{"metadata":{{"labels":{{"{CAP}":"100000"}}}}}}"#);
    let through_status = cluster
        .kubectl(&tenant)
        .args([
            "patch",
            "namespace",
            &ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&through_status.stderr);
    assert!(
        !through_status.status.success() && stderr.contains("only the adopters"),
        "the status subresource: {stderr}"
    );
    let labels = cluster
        .kubectl(&admin)
        .args(["get", "namespace", &ns, "-o", "jsonpath={.metadata.labels}"])
        .output()
        .unwrap();
    let labels: Value = serde_json::from_slice(&labels.stdout).unwrap();
    assert_eq!(labels[CAP], "100", "{labels}");
    assert!(
        labels
            .get("catalyst.openova.io/max-campaign-credit-omr")
            .is_none()
    );
}

/// The global namespace holds the vendor's global vouchers and nothing else, written only by
/// the vendor's writers (its Flux) and the operator: a franchisee with every verb there can
/// neither raise a copy nor add one, and a Global Voucher is refused anywhere else.
#[tokio::test]
async fn a_global_voucher_is_admitted_only_in_the_global_namespace_from_the_vendors_writers() {
    let cluster = support::cluster::cluster();
    let (client, global_ns) = support::cluster::setup("global").await;
    let tenant_ns = support::cluster::namespace(&client, "franchise").await;
    let vendor = format!("system:serviceaccount:{global_ns}:vendor-flux");
    let rendered = render(with(json!({"federation": {
        "globalNamespace": global_ns, "globalWriters": {"users": [vendor], "groups": []}}})));
    rendered.assert_valid();
    let dir = tempfile::tempdir().unwrap();
    let admin = cluster.kubeconfig(dir.path(), &global_ns);
    let mut objects = rendered.of_kinds(&ADMISSION);
    for ns in [&global_ns, &tenant_ns] {
        objects.push(
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "voucher-editor", "namespace": ns},
            "rules": [{"apiGroups": ["catalyst.openova.io"], "resources": ["*"], "verbs": ["*"]}]}),
        );
    }
    objects.extend(account("vendor-flux", &global_ns));
    objects.extend(account("franchisee", &global_ns));
    objects.extend(account("tenant", &tenant_ns));
    let _policy = apply_as_admin(&admin, objects)
        .await
        .expect("the policy and the accounts");
    let vendor = cluster.service_account_kubeconfig(dir.path(), &global_ns, "vendor-flux");
    let franchisee = cluster.service_account_kubeconfig(dir.path(), &global_ns, "franchisee");
    let tenant = cluster.service_account_kubeconfig(dir.path(), &tenant_ns, "tenant");
    let global = |max: i32| {
        voucher(
            "world-50",
            json!({"scope": "Global", "creditOMR": 50, "maxRedemptions": max}),
        )
    };
    let vouchers: kube::Api<voucher_operator::api::Voucher> =
        kube::Api::namespaced(client.clone(), &global_ns);
    // Until the policy (as this test rendered it) takes effect.
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let _ = vouchers.delete("world-50", &Default::default()).await;
        // Each request may meet the policy as another test left it for a moment (the API
        // server's cache): until the franchisee is refused by *this* rule and the vendor admitted.
        let franchisee_refused = cluster
            .apply(&franchisee, &global(1000))
            .err()
            .filter(|refused| refused.contains("federation.globalWriters"));
        let vendor_admitted = cluster.apply(&vendor, &global(1000)).is_ok();
        if let (Some(refused), true) = (&franchisee_refused, vendor_admitted) {
            // Gone before anything can fail: a cluster-wide controller of another test must
            // never meet a global voucher outside the global namespace its policy names.
            vouchers
                .delete("world-50", &Default::default())
                .await
                .unwrap();
            break refused.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the policy never took effect: {franchisee_refused:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        refused.contains(&format!(
            "the global vouchers of namespace {global_ns} are the vendor's"
        )) && refused.contains("federation.globalWriters")
            && refused.contains(&format!(
                "system:serviceaccount:{global_ns}:franchisee is not one of them"
            )),
        "{refused}"
    );
    // The franchisee cannot raise the vendor's copy either (the copy removed again at once).
    cluster
        .apply(&vendor, &global(1000))
        .expect("the vendor's copy");
    let raised = cluster.apply(&franchisee, &global(100_000));
    vouchers
        .delete("world-50", &Default::default())
        .await
        .unwrap();
    let raised = raised.unwrap_err();
    assert!(raised.contains("federation.globalWriters"), "{raised}");
    // Nothing but global vouchers there, even from the vendor.
    let local = cluster
        .apply(&vendor, &voucher("local-10", json!({"creditOMR": 10})))
        .unwrap_err();
    assert!(
        local.contains(&format!(
            "namespace {global_ns} holds only the vendor's global vouchers"
        )),
        "{local}"
    );
    // And no global voucher anywhere else.
    let elsewhere = cluster.apply(&tenant, &global(1000)).unwrap_err();
    assert!(
        elsewhere.contains(&format!(
            "a Voucher with spec.scope: Global belongs in the global namespace {global_ns}"
        )),
        "{elsewhere}"
    );
    cluster
        .apply(&tenant, &voucher("local-10", json!({"creditOMR": 10})))
        .expect("the tenant's own vouchers, as before");
}

/// `cargo local` installs the chart's admission policy (so that "only adopters may adopt or
/// reissue" can be tried there) from a rendering committed beside it, with the chart's default
/// adopters, as the release `voucher-operator` in `default`: it must be what the chart renders
/// today.
#[test]
fn the_local_stacks_admission_policy_is_the_charts() {
    let path = repo().join("crates/voucher-dev/src/admission.yaml");
    let rendered = render_release(chart_dir(), "voucher-operator", "default", required());
    rendered.assert_valid();
    let expected = rendered.of_kinds(&ADMISSION);
    let committed: Vec<Value> = std::fs::read_to_string(&path)
        .map(|text| {
            serde_yaml::Deserializer::from_str(&text)
                .map(|doc| Value::deserialize(doc).expect("a YAML document"))
                .collect()
        })
        .unwrap_or_default();
    if committed != expected {
        let fresh = repo().join("target/admission.yaml");
        let text: String = expected
            .iter()
            .map(|o| format!("---\n{}", serde_yaml::to_string(o).unwrap()))
            .collect();
        std::fs::write(
            &fresh,
            format!("# The chart's admission policy as `cargo local` installs it: rendered by\n# tests/chart/admission.rs (release voucher-operator, namespace default); do not edit.\n{text}"),
        )
        .unwrap();
        panic!(
            "{} is not the chart's policy: the rendering is in {}; copy it over",
            path.display(),
            fresh.display()
        );
    }
}
