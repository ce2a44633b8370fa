//! The `VoucherCampaign` custom resource (`catalyst.openova.io/v1alpha1`): one
//! resource that issues many unique codes, each a pure function of the
//! campaign's key (`voucher_core::campaign`), so that no code is ever written
//! in the manifest, the status, an Event or a log line.
//!
//! Reconciled by the controller's campaign loop (src/controller/campaign.rs).

use chrono::{DateTime, Utc};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::core::crd::CustomResourceExt;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use voucher_core::DeletionPolicy;
use voucher_core::campaign::{
    CampaignPhase, DEFAULT_CODE_LENGTH, MAX_CODE_LENGTH, MAX_COUNT, MIN_CODE_LENGTH,
};
use voucher_core::voucher::{
    MAX_CREDIT_OMR, MAX_DESCRIPTION_LEN, MAX_MAX_REDEMPTIONS, MIN_CREDIT_OMR,
};

/// The prefix of a campaign's codes: the code alphabet, possibly empty.
pub const PREFIX_PATTERN: &str = r"^([A-Za-z0-9][A-Za-z0-9_-]{0,55})?$";
/// [`PREFIX_PATTERN`] as a CEL rule, to answer in words.
const PREFIX_RULE: &str = "self.matches('^([A-Za-z0-9][A-Za-z0-9_-]{0,55})?$')";

/// Desired state of a campaign: `count` unique codes granting the same credit or discount.
// Printer columns of one type repeat `type_ = "integer"`: not a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "catalyst.openova.io",
    version = "v1alpha1",
    kind = "VoucherCampaign",
    plural = "vouchercampaigns",
    namespaced,
    status = "VoucherCampaignStatus",
    shortname = "vcamp",
    category = "catalyst",
    doc = "A campaign of unique single-use voucher codes, generated from a secret key and never written down.",
    printcolumn(name = "Prefix", type_ = "string", json_path = ".spec.prefix"),
    printcolumn(name = "Grant", type_ = "string", json_path = ".status.grant", description = "What each code grants: a credit (50 OMR) or a discount (20% install 3mo)"),
    // The Voucher's columns, for the same questions: what exists (not what is asked for), used,
    // ready, and if not, why.
    printcolumn(name = "Generated", type_ = "integer", json_path = ".status.generated", description = "Codes that exist in the billing database (spec.count is the number asked for)"),
    printcolumn(name = "Count", type_ = "integer", json_path = ".spec.count", description = "Codes asked for"),
    printcolumn(name = "Redeemed", type_ = "integer", json_path = ".status.redeemed"),
    printcolumn(name = "Active", type_ = "boolean", json_path = ".spec.active"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Valid-From", type_ = "string", json_path = ".spec.validFrom", priority = 1),
    printcolumn(name = "Expires", type_ = "string", json_path = ".spec.expiresAt", priority = 1),
    printcolumn(name = "Key", type_ = "string", json_path = ".spec.keySecretRef.name", priority = 1, description = "The Secret holding the generator key, in the key namespace"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    // The name is part of the admin CSV URL and of the audit subject (no dots there).
    validation = Rule::new("self.metadata.name.matches('^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$')")
        .message("metadata.name of a VoucherCampaign must be a DNS label: 1 to 63 characters of a-z, 0-9 and '-' (no dots)")
        .field_path(".metadata.name"),
)]
#[x_kube(
    validation = Rule::new(crate::ONE_GRANT).message(crate::ONE_GRANT_MESSAGE).field_path(".creditOMR"),
    validation = Rule::new(crate::SAME_GRANT)
        .message("a VoucherCampaign cannot switch between a credit (spec.creditOMR) and a discount (spec.discount): its codes already redeemed granted the one; create a new campaign for the other")
        .field_path(".discount"),
    validation = Rule::new("self.count >= oldSelf.count")
        .message("spec.count can grow but never shrink: codes already issued stay issued; deactivate the campaign or revoke single codes instead")
        .field_path(".count"),
    validation = Rule::new("size(self.prefix) + self.codeLength <= 64")
        .message("spec.prefix and spec.codeLength make codes longer than 64 characters")
        .field_path(".prefix"),
    validation = Rule::new("!has(self.validFrom) || !has(self.expiresAt) || self.expiresAt > self.validFrom")
        .message("spec.expiresAt must be later than spec.validFrom")
        .field_path(".expiresAt"),
    validation = Rule::new("self.deletionPolicy == oldSelf.deletionPolicy || (!oldSelf.active && !self.active)")
        .message("spec.deletionPolicy can change only while the campaign is inactive, before and after: set spec.active to false first, then change the policy")
        .field_path(".deletionPolicy"),
    // voucher_core::campaign::max_count: a valid code takes 2^40 guesses. Checked on create and
    // whenever count grows (a campaign created before the rule keeps what it has).
    validation = Rule::new("(oldSelf.hasValue() && oldSelf.value().count == self.count) || self.codeLength >= 12 || self.count <= [1, 32, 1024, 32768][self.codeLength - 8]")
        .optional_old_self(true)
        .message("spec.count is too large for spec.codeLength (default 10): one guess in fewer than 2^40 would find a code. Allow 32^(codeLength - 8) codes at most: codeLength 9 for 32, 10 for 1024, 11 for 32768, 12 for 1000000 (set it: it is immutable)")
        .field_path(".count"),
    validation = Rule::new("self.prefix == oldSelf.prefix && self.codeLength == oldSelf.codeLength && self.keySecretRef == oldSelf.keySecretRef")
        .message("spec.prefix, spec.codeLength and spec.keySecretRef are immutable: they decide the codes already issued; create a new campaign instead")
        .field_path(".prefix"),
)]
#[serde(rename_all = "camelCase")]
pub struct VoucherCampaignSpec {
    /// The start of every code, e.g. OMANTEL-BILL- (letters, digits, '-' and '_').
    #[serde(default)]
    #[schemars(regex(pattern = PREFIX_PATTERN))]
    #[x_kube(validation = Rule::new(PREFIX_RULE).message("spec.prefix is up to 56 characters of letters, digits, '-' and '_', starting with a letter or digit, without spaces (e.g. OMANTEL-BILL-)"))]
    pub prefix: String,

    /// How many codes the campaign issues (1 to 1000000). It may grow, never shrink.
    #[schemars(extend("minimum" = 1, "maximum" = MAX_COUNT))]
    pub count: i32,

    /// Characters of each code's random part (Crockford base32, 5 bits each; default 10): at
    /// least 8, and enough that a guess finds a code at most once in 2^40 tries (count up to
    /// 32^(codeLength - 8): 10 allows 1024 codes, 12 allows 1000000).
    #[serde(default = "default_code_length")]
    #[schemars(extend("minimum" = MIN_CODE_LENGTH, "maximum" = MAX_CODE_LENGTH))]
    pub code_length: i32,

    /// Credit each code grants, in whole Omani Rial. Set this or spec.discount, not both;
    /// which one is immutable.
    #[serde(rename = "creditOMR", default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = MIN_CREDIT_OMR, "maximum" = MAX_CREDIT_OMR))]
    pub credit_omr: Option<i32>,

    /// A discount each code grants instead of a credit, e.g. 20 percent off installs for 3
    /// months. Set this or spec.creditOMR, not both; which one is immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discount: Option<crate::DiscountSpec>,

    /// Free text shown to customers on the redemption page.
    #[serde(default)]
    #[schemars(length(max = MAX_DESCRIPTION_LEN))]
    pub description: String,

    /// Whether the codes can be redeemed; false pauses all of them at once.
    #[serde(default = "crate::default_active")]
    pub active: bool,

    /// Start of the redemption window (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_from: Option<DateTime<Utc>>,

    /// End of the redemption window (RFC 3339, exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,

    /// Redemptions each code allows (single-use: 1).
    #[serde(default = "default_redemptions_per_code")]
    #[schemars(extend("minimum" = 1, "maximum" = MAX_MAX_REDEMPTIONS))]
    pub redemptions_per_code: i32,

    /// What happens to the codes when the campaign is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// The Secret holding the generator key, in the namespace kept for keys (the chart's
    /// voucher-campaign-keys, --campaign-key-namespace), the only one whose Secrets the controller
    /// reads.
    pub key_secret_ref: KeySecretRef,
}

/// Where a campaign's generator key is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeySecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the generator key in the Secret (at least 32 bytes).
    #[serde(default = "default_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_code_length() -> i32 {
    DEFAULT_CODE_LENGTH as i32
}

fn default_redemptions_per_code() -> i32 {
    1
}

fn default_key() -> String {
    "key".into()
}

/// Observed state of a campaign, written by the controller.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VoucherCampaignStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<CampaignPhase>,
    /// Codes that exist in the billing database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated: Option<i32>,
    /// Redemptions of all its codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redeemed: Option<i64>,
    /// Codes that reached their redemptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exhausted_codes: Option<i32>,
    /// What each code grants, as the printer column shows it: 50 OMR, or 20% install 3mo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_synced_at: Option<DateTime<Utc>>,
}

/// The campaign CRD, generated from the types above, kept like the Voucher's
/// ([`crate::kept`]): deleting it deletes every campaign at once (the
/// controller then orphans their codes, but every campaign is gone).
pub fn crd() -> CustomResourceDefinition {
    crate::published(VoucherCampaign::crd())
}

/// The CRD as the YAML document committed in `crds/vouchercampaign.yaml`.
pub fn crd_yaml() -> String {
    let body = serde_yaml::to_string(&crd()).expect("a CRD always serialises to YAML");
    format!(
        "# Generated by `voucher-operator crd --kind campaign`; do not edit. Regenerate with:\n#   cargo run -- crd --kind campaign > crds/vouchercampaign.yaml\n{body}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_bounds_every_number_and_the_prefix() {
        let crd = serde_json::to_value(crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let props = &spec["properties"];
        assert_eq!(props["count"]["maximum"], f64::from(MAX_COUNT));
        assert_eq!(props["codeLength"]["minimum"], MIN_CODE_LENGTH as f64);
        assert_eq!(props["prefix"]["pattern"], PREFIX_PATTERN);
        // The same grammar, as a rule that answers in words.
        assert_eq!(PREFIX_RULE, format!("self.matches('{PREFIX_PATTERN}')"));
        for (name, field) in props.as_object().unwrap() {
            if field["type"] == "integer" {
                assert!(
                    field["minimum"].is_number() && field["maximum"].is_number(),
                    "{name}"
                );
            }
        }
        let rules = spec["x-kubernetes-validations"].to_string();
        assert!(rules.contains("self.count >= oldSelf.count"), "{rules}");
        assert_eq!(
            crd["spec"]["names"]["shortNames"],
            serde_json::json!(["vcamp"])
        );
        let columns: Vec<&str> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            columns,
            [
                "Prefix",
                "Grant",
                "Generated",
                "Count",
                "Redeemed",
                "Active",
                "Phase",
                "Ready",
                "Reason",
                "Valid-From",
                "Expires",
                "Key",
                "Age"
            ],
            "the Voucher's READY and REASON, what exists beside what is asked for, -o wide the window and key"
        );
        // Kept by Helm and by Flux: deleting it deletes every campaign.
        let annotations = &crd["metadata"]["annotations"];
        assert_eq!(annotations["helm.sh/resource-policy"], "keep");
        assert_eq!(annotations["kustomize.toolkit.fluxcd.io/prune"], "disabled");
    }
}
