//! The Voucher CRD: the committed manifest is the generated one, every example
//! is accepted, and each kind of invalid manifest is refused with a reason a
//! person understands — by the real API server (OpenAPI schema, strict field
//! validation, CEL rules including transition rules), through the real
//! `kubectl`, each case in a namespace of its own.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

/// Applies `old` (when given), then `doc`, with `kubectl apply` (strict field
/// validation, as kubectl does by default) in a fresh namespace: Ok, or
/// kubectl's error output.
async fn apply(doc: &Value, old: Option<&Value>) -> Result<(), String> {
    let (_, ns) = support::cluster::setup("crd").await;
    let dir = tempfile::tempdir().unwrap();
    let cluster = support::cluster::cluster();
    let kubeconfig = cluster.kubeconfig(dir.path(), &ns);
    let run = |doc: &Value| cluster.apply(&kubeconfig, doc);
    if let Some(old) = old {
        run(old).map_err(|e| format!("the old object was refused: {e}"))?;
    }
    run(doc)
}

async fn assert_valid(doc: &Value, old: Option<&Value>) {
    if let Err(refused) = apply(doc, old).await {
        panic!("refused, but should be accepted: {doc}\n{refused}");
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn committed_crd_is_the_generated_one() {
    let printed = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
            .args(args)
            .output()
            .expect("run voucher-operator crd");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let committed = |file: &str| std::fs::read_to_string(repo().join("crds").join(file)).unwrap();
    for (kind, file) in [
        ("voucher", "voucher.yaml"),
        ("campaign", "vouchercampaign.yaml"),
    ] {
        assert!(
            printed(&["crd", "--kind", kind]) == committed(file),
            "crds/{file} is out of date: regenerate it with `cargo run -- crd --kind {kind} > crds/{file}`"
        );
    }
    // Without --kind: both, as one stream for `kubectl apply -f -`.
    assert_eq!(
        printed(&["crd"]),
        format!(
            "{}---\n{}",
            committed("voucher.yaml"),
            committed("vouchercampaign.yaml")
        )
    );
}

fn yaml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, found);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            found.push(path);
        }
    }
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|doc: &Value| !doc.is_null())
        .collect()
}

#[tokio::test]
async fn every_example_voucher_and_campaign_is_valid() {
    let mut files = Vec::new();
    yaml_files(&repo().join("examples"), &mut files);
    let (mut vouchers, mut campaigns) = (0, 0);
    for file in &files {
        for doc in documents(file) {
            let counted = match doc["kind"].as_str() {
                Some("Voucher") => &mut vouchers,
                Some("VoucherCampaign") => &mut campaigns,
                _ => continue,
            };
            *counted += 1;
            // Judged by the schema in a namespace of the test's own, wherever the example goes
            // (the global voucher names the global namespace).
            let mut doc = doc;
            if let Some(metadata) = doc["metadata"].as_object_mut() {
                metadata.remove("namespace");
            }
            if let Err(invalid) = apply(&doc, None).await {
                panic!("{}: {invalid}", file.display());
            }
        }
    }
    assert!(
        vouchers >= 4 && campaigns >= 1,
        "expected the example Vouchers and campaign, found {vouchers} and {campaigns}"
    );
}

/// `kubectl kustomize` (the real kubectl's kustomize) builds the example kustomization into
/// every example Voucher file: a Voucher added to examples/vouchers cannot be left out of it.
#[tokio::test]
async fn the_example_kustomization_lists_every_example_voucher() {
    let dir = repo().join("examples/vouchers");
    let output = Command::new(support::cluster::cluster().binaries.kubectl())
        .args(["kustomize", dir.to_str().unwrap()])
        .output()
        .expect("run kubectl kustomize");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let built: Vec<Value> =
        serde_yaml::Deserializer::from_str(std::str::from_utf8(&output.stdout).unwrap())
            .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
            .collect();
    let mut names: Vec<String> = built
        .iter()
        .map(|doc| {
            assert_eq!(doc["kind"], "Voucher");
            assert_eq!(
                doc["metadata"]["labels"]["catalyst.openova.io/source"],
                "examples"
            );
            doc["metadata"]["name"].as_str().unwrap().to_owned()
        })
        .collect();
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    let mut expected: Vec<String> = files
        .iter()
        .flat_map(|f| documents(f))
        .filter(|doc| doc["kind"] == "Voucher")
        .map(|doc| doc["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    expected.sort();
    assert_eq!(names, expected);
}

fn base() -> Value {
    json!({
        "apiVersion": "catalyst.openova.io/v1alpha1",
        "kind": "Voucher",
        "metadata": {"name": "launch-50"},
        "spec": {"creditOMR": 50, "maxRedemptions": 10}
    })
}

fn with(patch: Value) -> Value {
    let mut doc = base();
    json_merge(&mut doc, patch);
    doc
}

/// RFC 7386 merge, so each case states only what it breaks.
fn json_merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    json_merge(t.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p,
    }
}

async fn assert_rejected(doc: Value, old: Option<Value>, expected: &[&str]) {
    let message = match apply(&doc, old.as_ref()).await {
        Ok(()) => panic!("accepted, but should be rejected: {doc}"),
        Err(refused) => refused,
    };
    for part in expected {
        assert!(
            message.contains(part),
            "{message:?} does not mention {part:?}"
        );
    }
}

#[tokio::test]
async fn the_base_manifest_is_valid() {
    assert_valid(&base(), None).await;
}

#[tokio::test]
async fn credit_below_one_is_rejected() {
    assert_rejected(
        with(json!({"spec": {"creditOMR": 0}})),
        None,
        &[
            "spec.creditOMR: Invalid value: 0",
            "should be greater than or equal to 1",
        ],
    )
    .await;
}

#[tokio::test]
async fn credit_above_the_maximum_is_rejected() {
    assert_rejected(
        with(json!({"spec": {"creditOMR": 100_001}})),
        None,
        &[
            "spec.creditOMR: Invalid value: 100001",
            "should be less than or equal to 100000",
        ],
    )
    .await;
    assert_valid(&with(json!({"spec": {"creditOMR": 100_000}})), None).await;
}

/// A number beyond an int32 passed the schema once and then could not be read by the
/// controller, which stalled without a word: every integer is bounded.
#[tokio::test]
async fn integers_beyond_their_bounds_are_rejected_not_stalled() {
    for (field, value) in [
        ("creditOMR", 3_000_000_000_i64),
        ("maxRedemptions", 3_000_000_000),
    ] {
        let refused = apply(&with(json!({"spec": {field: value}})), None)
            .await
            .unwrap_err();
        assert!(
            refused.contains(&format!("spec.{field}")) && refused.contains("less than or equal to"),
            "{field}: {refused}"
        );
    }
    assert_rejected(
        with(json!({"spec": {"maxRedemptions": 100_000_001}})),
        None,
        &["should be less than or equal to 100000000"],
    )
    .await;
}

#[tokio::test]
async fn deletion_policy_changes_only_while_inactive() {
    let orphan = "spec.deletionPolicy can change only while the Voucher is inactive";
    // Switching to Orphan just before a delete would skip the revoke.
    assert_rejected(
        with(json!({"spec": {"deletionPolicy": "Orphan"}})),
        Some(base()),
        &[orphan],
    )
    .await;
    // Also not together with deactivating: the old object must be inactive.
    assert_rejected(
        with(json!({"spec": {"deletionPolicy": "Orphan", "active": false}})),
        Some(base()),
        &[orphan],
    )
    .await;
    let inactive = with(json!({"spec": {"active": false}}));
    // Nor while activating: the change happens while the code cannot be redeemed.
    assert_rejected(
        with(json!({"spec": {"deletionPolicy": "Orphan", "active": true}})),
        Some(inactive.clone()),
        &[orphan],
    )
    .await;
    assert_valid(
        &with(json!({"spec": {"deletionPolicy": "Orphan", "active": false}})),
        Some(&inactive),
    )
    .await;
    // Created with either policy; unchanged policy passes.
    assert_valid(&with(json!({"spec": {"deletionPolicy": "Orphan"}})), None).await;
    assert_valid(&with(json!({"spec": {"creditOMR": 60}})), Some(&base())).await;
}

#[tokio::test]
async fn negative_max_redemptions_is_rejected() {
    assert_rejected(
        with(json!({"spec": {"maxRedemptions": -1}})),
        None,
        &[
            "spec.maxRedemptions: Invalid value: -1",
            "greater than or equal to 0",
        ],
    )
    .await;
}

/// A Voucher granting `discount` instead of the base's credit.
fn discount(terms: Value) -> Value {
    with(json!({"spec": {"creditOMR": null, "discount": terms}}))
}

const ONE_GRANT: &str = "set exactly one of spec.creditOMR (a credit in whole units), spec.creditByCurrency (a global voucher's credit per currency) and spec.discount";

#[tokio::test]
async fn a_voucher_grants_exactly_one_of_a_credit_and_a_discount() {
    assert_rejected(
        with(json!({"spec": {"creditOMR": null}})),
        None,
        &[ONE_GRANT],
    )
    .await;
    let both = with(json!({"spec": {"discount": {"percentOff": 20}}}));
    assert_rejected(both, None, &[ONE_GRANT]).await;
    assert_valid(
        &discount(json!({"percentOff": 20, "appliesTo": ["install"], "durationMonths": 3})),
        None,
    )
    .await;
}

#[tokio::test]
async fn discount_terms_outside_their_rules_are_refused() {
    // (terms, what the API server says, why)
    let cases = [
        (
            json!({"percentOff": 0}),
            "spec.discount.percentOff: Invalid value: 0",
            "nothing off",
        ),
        (
            json!({"percentOff": 101}),
            "spec.discount.percentOff: Invalid value: 101",
            "more than the charge",
        ),
        (
            json!({"amountOff": -5}),
            "spec.discount.amountOff: Invalid value: -5",
            "a negative amount",
        ),
        (
            json!({"amountOff": 1.5}),
            "must be of type integer",
            "a fraction of a minor unit",
        ),
        (
            json!({"percentOff": 10, "durationMonths": 0}),
            "spec.discount.durationMonths: Invalid value: 0",
            "no month",
        ),
        (
            json!({"percentOff": 10, "durationMonths": 37}),
            "spec.discount.durationMonths: Invalid value: 37",
            "past three years",
        ),
        (
            json!({"percentOff": 10, "amountOff": 500}),
            "spec.discount takes exactly one of percentOff",
            "both",
        ),
        (
            json!({"appliesTo": ["install"]}),
            "spec.discount takes exactly one of percentOff",
            "neither",
        ),
        (
            json!({"percentOff": 10, "appliesTo": ["install", "install"]}),
            "Duplicate value",
            "a category twice",
        ),
        (
            json!({"percentOff": 10, "appliesTo": ["Install"]}),
            "spec.discount.appliesTo[0]",
            "categories are lower-case",
        ),
    ];
    for (terms, said, why) in cases {
        let refused = apply(&discount(terms), None).await.expect_err(why);
        assert!(refused.contains(said), "{why}: {refused}");
    }
}

#[tokio::test]
async fn the_kind_of_grant_is_immutable() {
    let percent = discount(json!({"percentOff": 20}));
    const SWITCH: &str = "a Voucher cannot switch between a credit (spec.creditOMR or spec.creditByCurrency) and a discount";
    assert_rejected(percent.clone(), Some(base()), &[SWITCH]).await;
    assert_rejected(base(), Some(percent.clone()), &[SWITCH]).await;
    // The terms of a discount may change like a credit's (grants already made keep theirs).
    let deeper = discount(json!({"percentOff": 25, "durationMonths": 6}));
    assert_valid(&deeper, Some(&percent)).await;
}

#[tokio::test]
async fn credit_must_be_an_integer() {
    assert_rejected(
        with(json!({"spec": {"creditOMR": "50"}})),
        None,
        &["spec.creditOMR", "must be of type integer"],
    )
    .await;
}

#[tokio::test]
async fn code_outside_the_grammar_is_rejected() {
    for bad in ["summer sale", "-LAUNCH", "AB", "CAFÉ10"] {
        assert_rejected(
            with(json!({"spec": {"code": bad}})),
            None,
            &[
                "spec.code",
                "should match '^[A-Za-z0-9][A-Za-z0-9_-]{2,63}$'",
                // The grammar in words, for a person.
                "a code is 3 to 64 characters of letters, digits, '-' and '_'",
            ],
        )
        .await;
    }
    assert_rejected(
        with(json!({"spec": {"code": "A".repeat(65)}})),
        None,
        &["spec.code: Too long: may not be more than 64"],
    )
    .await;
}

#[tokio::test]
async fn unknown_fields_are_rejected_not_pruned() {
    assert_rejected(
        with(json!({"spec": {"credit": 50}})),
        None,
        &["unknown field \"spec.credit\""],
    )
    .await;
    assert_rejected(
        with(json!({"extra": true})),
        None,
        &["unknown field \"extra\""],
    )
    .await;
}

#[tokio::test]
async fn bad_dates_are_rejected() {
    assert_rejected(
        with(json!({"spec": {"expiresAt": "next tuesday"}})),
        None,
        &["spec.expiresAt", "must be of type date-time"],
    )
    .await;
}

#[tokio::test]
async fn window_must_end_after_it_starts() {
    assert_rejected(
        with(json!({"spec": {
            "validFrom": "2027-01-02T00:00:00Z",
            "expiresAt": "2027-01-01T00:00:00Z"
        }})),
        None,
        // Named by its field (fieldPath), not `spec: Invalid value: "object"`.
        &[
            "spec.expiresAt: Invalid value",
            "spec.expiresAt must be later than spec.validFrom",
        ],
    )
    .await;
    // Equal instants in different offsets are still an empty window.
    assert_rejected(
        with(json!({"spec": {
            "validFrom": "2027-01-01T04:00:00+04:00",
            "expiresAt": "2027-01-01T00:00:00Z"
        }})),
        None,
        &["spec.expiresAt must be later than spec.validFrom"],
    )
    .await;
    assert_valid(
        &with(json!({"spec": {
            "validFrom": "2027-01-01T00:00:00Z",
            "expiresAt": "2027-01-01T00:00:01Z"
        }})),
        None,
    )
    .await;
}

#[tokio::test]
async fn unknown_deletion_policy_is_rejected() {
    assert_rejected(
        with(json!({"spec": {"deletionPolicy": "Delete"}})),
        None,
        &[
            "spec.deletionPolicy: Unsupported value: \"Delete\"",
            "\"Revoke\", \"Orphan\"",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_name_that_cannot_be_a_code_needs_an_explicit_code() {
    let dotted = with(json!({"metadata": {"name": "launch.2026"}}));
    // `metadata.name: Invalid value`, not `<nil>: Invalid value` (a rule without fieldPath).
    assert_rejected(
        dotted.clone(),
        None,
        &[
            "metadata.name: Invalid value",
            "metadata.name becomes the code",
        ],
    )
    .await;
    let mut explicit = dotted;
    explicit["spec"]["code"] = json!("LAUNCH-2026");
    assert_valid(&explicit, None).await;
}

#[tokio::test]
async fn object_names_must_be_dns_subdomains() {
    assert_rejected(
        with(json!({"metadata": {"name": "Launch_50"}})),
        None,
        &["metadata.name", "RFC 1123"],
    )
    .await;
}

#[tokio::test]
async fn wrong_api_version_is_rejected() {
    assert_rejected(
        with(json!({"apiVersion": "catalyst.openova.io/v1"})),
        None,
        &["no matches for kind \"Voucher\" in version \"catalyst.openova.io/v1\""],
    )
    .await;
}

#[tokio::test]
async fn code_is_immutable_once_created() {
    let old = with(json!({"spec": {"code": "LAUNCH-50"}}));
    let immutable = "the code is immutable";
    assert_rejected(
        with(json!({"spec": {"code": "LAUNCH-60"}})),
        Some(old.clone()),
        &[immutable],
    )
    .await;
    // Added as another code than the name gave, or removed when it was another.
    assert_rejected(
        with(json!({"spec": {"code": "OTHER-1"}})),
        Some(base()),
        &[immutable],
    )
    .await;
    let promo = with(json!({"spec": {"code": "PROMO-X"}}));
    assert_rejected(base(), Some(promo), &[immutable]).await;

    // Written out as the code it already is (from the name, in either case), or
    // removed when the name gives the same code: accepted.
    for same in ["LAUNCH-50", "launch-50"] {
        assert_valid(&with(json!({"spec": {"code": same}})), Some(&base())).await;
    }
    assert_valid(&base(), Some(&old)).await;
    // Other fields stay editable, and an unchanged code passes the transition rule.
    let edited = with(json!({"spec": {"code": "LAUNCH-50", "creditOMR": 75, "active": false}}));
    assert_valid(&edited, Some(&old)).await;
    assert_valid(&base(), Some(&base())).await;
}

#[tokio::test]
async fn several_problems_are_reported_together() {
    assert_rejected(
        with(json!({"spec": {"creditOMR": 0, "maxRedemptions": -5}})),
        None,
        &["spec.creditOMR", "spec.maxRedemptions"],
    )
    .await;
}

/// The messages quoted in the README, verbatim: what kubectl prints.
#[tokio::test]
async fn readme_messages_are_what_the_api_server_answers() {
    let low = apply(&with(json!({"spec": {"creditOMR": 0}})), None)
        .await
        .unwrap_err();
    let immutable = apply(
        &with(json!({"spec": {"code": "LAUNCH-60"}})),
        Some(&with(json!({"spec": {"code": "LAUNCH-50"}}))),
    )
    .await
    .unwrap_err();
    let readme = std::fs::read_to_string(repo().join("docs/reference.md")).unwrap();
    for message in [low, immutable] {
        let message = message.trim();
        assert!(
            readme.contains(message),
            "docs/reference.md does not quote: {message:?}"
        );
    }
}

/// A global cap is shared among Sovereigns: 0 (unlimited) has nothing to share,
/// and a voucher never changes where its cap holds.
#[tokio::test]
async fn a_global_voucher_needs_a_cap_and_keeps_its_scope() {
    let global = |max: i32| with(json!({"spec": {"scope": "Global", "maxRedemptions": max}}));
    assert_rejected(global(0), None, &["maxRedemptions of at least 1"]).await;
    assert_valid(&global(1000), None).await;
    assert_rejected(global(1000), Some(base()), &["spec.scope is immutable"]).await;
    assert_rejected(base(), Some(global(1000)), &["spec.scope is immutable"]).await;
    let scope = with(json!({"spec": {"scope": "Everywhere"}}));
    assert_rejected(scope, None, &["spec.scope"]).await;
}

/// Once per customer on any Sovereign, and a credit per currency, are a global voucher's:
/// refused on a Sovereign's own, and "once per customer" never changes.
#[tokio::test]
async fn once_per_customer_anywhere_and_a_credit_per_currency_are_a_global_vouchers() {
    let global = json!({"spec": {"scope": "Global", "maxRedemptions": 100}});
    let once =
        with(json!({"spec": {"scope": "Global", "maxRedemptions": 100, "perCustomer": "Global"}}));
    assert_valid(&once, None).await;
    let local_once = with(json!({"spec": {"perCustomer": "Global"}}));
    assert_rejected(
        local_once,
        None,
        &["spec.perCustomer: Global (once per customer on any Sovereign) needs spec.scope: Global"],
    )
    .await;
    let relaxed = with(global.clone());
    assert_rejected(
        relaxed.clone(),
        Some(once.clone()),
        &["spec.perCustomer is immutable"],
    )
    .await;
    assert_rejected(once, Some(relaxed), &["spec.perCustomer is immutable"]).await;
    let per_currency = |credits: Value| {
        let mut doc = with(global.clone());
        json_merge(
            &mut doc,
            json!({"spec": {"creditOMR": null, "creditByCurrency": credits}}),
        );
        doc
    };
    assert_valid(
        &per_currency(json!({"OMR": 50, "BHD": 50, "USD": 130})),
        None,
    )
    .await;
    assert_rejected(
        per_currency(json!({"omr": 50})),
        None,
        &["keyed by ISO 4217 currency codes"],
    )
    .await;
    assert_rejected(per_currency(json!({"OMR": 0})), None, &["creditByCurrency"]).await;
    assert_rejected(
        per_currency(json!({"OMR": 100001})),
        None,
        &["creditByCurrency"],
    )
    .await;
    let both = with(
        json!({"spec": {"scope": "Global", "maxRedemptions": 100, "creditByCurrency": {"OMR": 50}}}),
    );
    assert_rejected(both, None, &[ONE_GRANT]).await;
    let local = with(json!({"spec": {"creditOMR": null, "creditByCurrency": {"OMR": 50}}}));
    assert_rejected(
        local,
        None,
        &["spec.creditByCurrency is for global vouchers"],
    )
    .await;
}
