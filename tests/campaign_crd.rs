//! The VoucherCampaign schema against the real API server, through the real kubectl: what a
//! campaign may say, and the rules that keep issued codes issued.

mod support;

use serde_json::{Value, json};

fn campaign(spec: Value) -> Value {
    let mut base = json!({
        "apiVersion": "catalyst.openova.io/v1alpha1",
        "kind": "VoucherCampaign",
        "metadata": {"name": "bill-2027"},
        "spec": {"prefix": "OMANTEL-BILL-", "count": 2000, "codeLength": 12, "creditOMR": 5,
                 "keySecretRef": {"name": "bill-2027-key"}},
    });
    for (k, v) in spec.as_object().unwrap() {
        match v {
            // null: the field left out.
            Value::Null => {
                base["spec"].as_object_mut().unwrap().remove(k);
            }
            v => base["spec"][k] = v.clone(),
        }
    }
    base
}

/// Applies `docs` in order in a fresh namespace: the last one's outcome.
async fn apply(docs: &[Value]) -> Result<(), String> {
    let cluster = support::cluster::cluster();
    let (_, ns) = support::cluster::setup("campaign").await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = cluster.kubeconfig(dir.path(), &ns);
    let mut last = Ok(());
    for doc in docs {
        last = cluster.apply(&kubeconfig, doc);
    }
    last
}

#[tokio::test]
async fn a_campaign_is_accepted_with_its_defaults() {
    apply(&[campaign(json!({}))]).await.unwrap();
    apply(&[campaign(
        json!({"prefix": "", "codeLength": 51, "count": 1_000_000}),
    )])
    .await
    .unwrap();
}

#[tokio::test]
async fn count_grows_but_never_shrinks() {
    apply(&[campaign(json!({})), campaign(json!({"count": 5000}))])
        .await
        .unwrap();
    let refused = apply(&[campaign(json!({})), campaign(json!({"count": 1999}))])
        .await
        .unwrap_err();
    assert!(
        refused.contains("spec.count can grow but never shrink"),
        "{refused}"
    );
}

#[tokio::test]
async fn what_decides_the_codes_cannot_change() {
    for change in [
        json!({"prefix": "OTHER-"}),
        json!({"codeLength": 13}),
        json!({"keySecretRef": {"name": "another-key"}}),
    ] {
        let refused = apply(&[campaign(json!({})), campaign(change.clone())])
            .await
            .unwrap_err();
        assert!(refused.contains("are immutable"), "{change}: {refused}");
    }
    // What does not decide the codes may change.
    apply(&[
        campaign(json!({})),
        campaign(json!({"creditOMR": 7, "active": false})),
    ])
    .await
    .unwrap();
}

#[tokio::test]
async fn a_campaign_grants_one_kind_and_keeps_it() {
    let discount = campaign(
        json!({"creditOMR": null, "discount": {"amountOff": 5000, "appliesTo": ["install"]}}),
    );
    apply(std::slice::from_ref(&discount)).await.unwrap();
    for (docs, says) in [
        (
            vec![campaign(json!({"creditOMR": null}))],
            "set exactly one of spec.creditOMR",
        ),
        (
            vec![campaign(json!({"discount": {"percentOff": 10}}))],
            "set exactly one of spec.creditOMR",
        ),
        (
            vec![campaign(json!({})), discount.clone()],
            "a VoucherCampaign cannot switch between a credit",
        ),
        (
            vec![discount.clone(), campaign(json!({}))],
            "a VoucherCampaign cannot switch between a credit",
        ),
    ] {
        let refused = apply(&docs).await.unwrap_err();
        assert!(refused.contains(says), "{says}: {refused}");
    }
}

#[tokio::test]
async fn weak_or_impossible_campaigns_are_refused_by_the_schema() {
    for (spec, says) in [
        (json!({"count": 0}), "spec.count"),
        (json!({"count": 1_000_001}), "spec.count"),
        (json!({"codeLength": 7}), "spec.codeLength"),
        (json!({"prefix": "-BAD"}), "spec.prefix"),
        (json!({"prefix": "HAS SPACE"}), "spec.prefix"),
        (
            json!({"prefix": "P".repeat(20), "codeLength": 51}),
            "longer than 64 characters",
        ),
        (json!({"creditOMR": 0}), "spec.creditOMR"),
        (json!({"redemptionsPerCode": 0}), "spec.redemptionsPerCode"),
        (
            json!({"keySecretRef": {"name": ""}}),
            "spec.keySecretRef.name",
        ),
    ] {
        let refused = apply(&[campaign(spec.clone())]).await.unwrap_err();
        assert!(refused.contains(says), "{spec}: {refused}");
    }
}

#[tokio::test]
async fn a_campaign_name_is_a_dns_label() {
    let mut dotted = campaign(json!({}));
    dotted["metadata"]["name"] = json!("bill.2027");
    let refused = apply(&[dotted]).await.unwrap_err();
    assert!(refused.contains("must be a DNS label"), "{refused}");
}

#[tokio::test]
async fn the_deletion_policy_changes_only_while_inactive() {
    let refused = apply(&[
        campaign(json!({"deletionPolicy": "Revoke"})),
        campaign(json!({"deletionPolicy": "Orphan"})),
    ])
    .await
    .unwrap_err();
    assert!(
        refused.contains("only while the campaign is inactive"),
        "{refused}"
    );
    apply(&[
        campaign(json!({"deletionPolicy": "Revoke"})),
        campaign(json!({"deletionPolicy": "Revoke", "active": false})),
        campaign(json!({"deletionPolicy": "Orphan", "active": false})),
    ])
    .await
    .unwrap();
}

#[tokio::test]
async fn the_guessing_bound_is_checked_by_the_api_server() {
    // The default length (10) takes 1,024 codes; more must say a longer one.
    let mut defaulted = campaign(json!({"count": 1024}));
    defaulted["spec"]
        .as_object_mut()
        .unwrap()
        .remove("codeLength");
    apply(&[defaulted.clone()]).await.unwrap();
    defaulted["spec"]["count"] = json!(1025);
    let refused = apply(&[defaulted]).await.unwrap_err();
    assert!(refused.contains("(default 10)"), "{refused}");
    // A million codes of 8 characters: one guess in 1.1 million finds one.
    let refused = apply(&[campaign(json!({"codeLength": 8, "count": 1_000_000}))])
        .await
        .unwrap_err();
    assert!(
        refused.contains("spec.count is too large for spec.codeLength"),
        "{refused}"
    );
    for (length, most) in [(9, 32), (10, 1024), (11, 32768)] {
        apply(&[campaign(json!({"codeLength": length, "count": most}))])
            .await
            .unwrap_or_else(|e| panic!("{most} codes of {length}: {e}"));
        // Growing past the bound later is refused the same way.
        let grown = apply(&[
            campaign(json!({"codeLength": length, "count": most})),
            campaign(json!({"codeLength": length, "count": most + 1})),
        ])
        .await
        .unwrap_err();
        assert!(grown.contains("too large for spec.codeLength"), "{grown}");
    }
}
