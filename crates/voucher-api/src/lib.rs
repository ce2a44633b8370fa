//! The `Voucher` custom resource (`catalyst.openova.io/v1alpha1`): Kubernetes API
//! types, their OpenAPI schema with CEL rules, and the generated CRD.
//!
//! The schema's bounds are the domain's term rules (`voucher_core`), so the API
//! server refuses what the controller and the admin endpoints would refuse.

#![forbid(unsafe_code)]

pub mod campaign;

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::core::crd::CustomResourceExt;
use kube::{CustomResource, KubeSchema, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use voucher_core::DeletionPolicy;
use voucher_core::code::CODE_PATTERN;
use voucher_core::discount::{
    CATEGORY_PATTERN, MAX_AMOUNT_OFF, MAX_CATEGORIES, MAX_DURATION_MONTHS, MAX_PERCENT_OFF,
    MIN_AMOUNT_OFF, MIN_DURATION_MONTHS, MIN_PERCENT_OFF,
};
use voucher_core::voucher::{
    MAX_CREDIT_OMR, MAX_DESCRIPTION_LEN, MAX_MAX_REDEMPTIONS, MIN_CREDIT_OMR, MIN_MAX_REDEMPTIONS,
};
use voucher_core::{Code, CodeError, CodeRecord, Discount, Off, Phase, Request, TermError, Terms};

pub const GROUP: &str = "catalyst.openova.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "Voucher";
pub const PLURAL: &str = "vouchers";

/// Desired state of a voucher: a promo code granting a fixed credit in Omani Rial, or a discount.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "catalyst.openova.io",
    version = "v1alpha1",
    kind = "Voucher",
    plural = "vouchers",
    namespaced,
    status = "VoucherStatus",
    shortname = "vch",
    category = "catalyst",
    doc = "A billing voucher (promo code) that grants a fixed credit in Omani Rial or a discount on charges. The operator keeps the billing database's promo_codes row in line with it.",
    printcolumn(name = "Code", type_ = "string", json_path = ".status.code", description = "The code customers enter"),
    printcolumn(name = "Grant", type_ = "string", json_path = ".status.grant", description = "What a redemption grants: a credit (50 OMR) or a discount (20% install 3mo)"),
    printcolumn(name = "Active", type_ = "boolean", json_path = ".spec.active"),
    printcolumn(name = "Redeemed", type_ = "integer", json_path = ".status.timesRedeemed"),
    printcolumn(name = "Max", type_ = "integer", json_path = ".spec.maxRedemptions", description = "0 means unlimited"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Remaining", type_ = "integer", json_path = ".status.remaining", priority = 1, description = "Redemptions left before the cap; empty when unlimited"),
    printcolumn(name = "Scope", type_ = "string", json_path = ".spec.scope", priority = 1, description = "Global: one cap across every Sovereign; empty: this Sovereign's"),
    printcolumn(name = "Share", type_ = "integer", json_path = ".status.allotment.share", priority = 1, description = "A Global voucher's units held here (on the hub: granted in all)"),
    printcolumn(name = "Allotments", type_ = "string", json_path = ".status.allotment.sovereigns", priority = 1, description = "On the hub: each Sovereign's share/redemptions"),
    printcolumn(name = "Valid-From", type_ = "string", json_path = ".spec.validFrom", priority = 1),
    printcolumn(name = "Expires", type_ = "string", json_path = ".spec.expiresAt", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("has(self.spec.code) || self.metadata.name.matches('^[a-z0-9][a-z0-9-]{2,63}$')")
        .message("metadata.name becomes the code when spec.code is absent, so it must be 3 to 64 characters of a-z, 0-9 and '-'; otherwise set spec.code")
        .field_path(".metadata.name"),
    // The effective code never changes: spec.code may be written out as the code the name
    // gave (in either case), but not changed, added as another or removed.
    validation = Rule::new("(has(self.spec.code) ? self.spec.code.upperAscii() : self.metadata.name.upperAscii()) == (has(oldSelf.spec.code) ? oldSelf.spec.code.upperAscii() : oldSelf.metadata.name.upperAscii())")
        .message("the code is immutable (spec.code, or the upper-cased name without it): it cannot change once the Voucher exists; create a new Voucher instead")
        .field_path(".spec.code"),
)]
#[x_kube(
    validation = Rule::new("!has(self.validFrom) || !has(self.expiresAt) || self.expiresAt > self.validFrom")
        .message("spec.expiresAt must be later than spec.validFrom")
        .field_path(".expiresAt"),
    validation = Rule::new("self.deletionPolicy == oldSelf.deletionPolicy || (!oldSelf.active && !self.active)")
        .message("spec.deletionPolicy can change only while the Voucher is inactive, before and after: set spec.active to false first, then change the policy")
        .field_path(".deletionPolicy"),
    validation = Rule::new("(has(self.creditOMR) ? 1 : 0) + (has(self.creditByCurrency) ? 1 : 0) + (has(self.discount) ? 1 : 0) == 1")
        .message("set exactly one of spec.creditOMR (a credit in whole units), spec.creditByCurrency (a global voucher's credit per currency) and spec.discount (percentOff or amountOff, with appliesTo and durationMonths): a voucher grants one or the other")
        .field_path(".creditOMR"),
    validation = Rule::new("has(self.discount) == has(oldSelf.discount)")
        .message("a Voucher cannot switch between a credit (spec.creditOMR or spec.creditByCurrency) and a discount (spec.discount): vouchers already redeemed granted the one; create a new Voucher for the other")
        .field_path(".discount"),
    validation = Rule::new("!has(self.creditByCurrency) || (has(self.scope) && self.scope == 'Global')")
        .message("spec.creditByCurrency is for global vouchers (spec.scope: Global), granted in each Sovereign's currency; a Sovereign's own voucher grants spec.creditOMR in its currency")
        .field_path(".creditByCurrency"),
    validation = Rule::new("!has(self.creditByCurrency) || self.creditByCurrency.all(c, c.matches('^[A-Z]{3}$'))")
        .message("spec.creditByCurrency is keyed by ISO 4217 currency codes, three upper-case letters (e.g. OMR, BHD, USD)")
        .field_path(".creditByCurrency"),
    validation = Rule::new("(has(self.perCustomer) ? self.perCustomer : 'Sovereign') == (has(oldSelf.perCustomer) ? oldSelf.perCustomer : 'Sovereign')")
        .message("spec.perCustomer is immutable: customers who redeemed under the one rule would be judged by the other; create a new Voucher instead")
        .field_path(".perCustomer"),
    validation = Rule::new("!has(self.perCustomer) || self.perCustomer != 'Global' || (has(self.scope) && self.scope == 'Global')")
        .message("spec.perCustomer: Global (once per customer on any Sovereign) needs spec.scope: Global; a Sovereign's own voucher is once per customer here")
        .field_path(".perCustomer"),
    validation = Rule::new("(has(self.scope) ? self.scope : 'Sovereign') == (has(oldSelf.scope) ? oldSelf.scope : 'Sovereign')")
        .message("spec.scope is immutable: a Sovereign's cap and a global cap are different vouchers; create a new Voucher instead")
        .field_path(".scope"),
    validation = Rule::new("!has(self.scope) || self.scope != 'Global' || self.maxRedemptions > 0")
        .message("a Global voucher needs spec.maxRedemptions of at least 1: its cap is shared among Sovereigns, and 0 (unlimited) has nothing to share")
        .field_path(".maxRedemptions")
)]
#[serde(rename_all = "camelCase")]
pub struct VoucherSpec {
    /// The code customers enter, e.g. OMANTEL-MUSCAT-200. Upper-cased by the operator;
    /// defaults to the upper-cased resource name. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = CODE_PATTERN), length(max = voucher_core::code::MAX_CODE_LEN))]
    // The pattern for tools that read the schema; the rule says it in words to a person.
    #[x_kube(validation = Rule::new(CODE_RULE).message(CODE_MESSAGE))]
    pub code: Option<String>,

    /// Credit granted on redemption, in whole Omani Rial (1 to 100000; a namespace may be
    /// held lower by the label catalyst.openova.io/max-credit-omr). Set this or
    /// spec.discount, not both; which one is immutable.
    #[serde(rename = "creditOMR", default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = MIN_CREDIT_OMR, "maximum" = MAX_CREDIT_OMR))]
    pub credit_omr: Option<i32>,

    /// A discount on the customer's charges instead of a credit, e.g. 20 percent off installs
    /// for 3 months. Set this or spec.creditOMR, not both; which one is immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discount: Option<DiscountSpec>,

    /// Free text shown to customers on the redemption page.
    #[serde(default)]
    #[schemars(length(max = MAX_DESCRIPTION_LEN))]
    pub description: String,

    /// Whether the code can be redeemed. Set false to pause a campaign without deleting it.
    #[serde(default = "default_active")]
    pub active: bool,

    /// Redemptions allowed in total, across all customers; 0 means unlimited.
    #[serde(default)]
    #[schemars(extend("minimum" = MIN_MAX_REDEMPTIONS, "maximum" = MAX_MAX_REDEMPTIONS))]
    pub max_redemptions: i32,

    /// Start of the redemption window (RFC 3339). Before it the phase is Scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_from: Option<DateTime<Utc>>,

    /// End of the redemption window (RFC 3339, exclusive). From then on the phase is Expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,

    /// What happens to the billing row when this resource is deleted: Revoke soft-deletes it
    /// (redemption history is kept), Orphan leaves it untouched.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Take over a billing row that exists without an owner (written by the admin page, or
    /// left by an Orphan deletion), keeping its redemptions. Without it such a row is a
    /// Conflict. Only those the chart's admission policy allows may set it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopt: bool,

    /// Bring back a revoked (soft-deleted) code, keeping its redemptions: the revocation it
    /// undoes, as the status shows it. Without it, or naming another revocation, a revoked
    /// code stays revoked. Only those the chart's admission policy allows may set it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "reissue_or_legacy_flag"
    )]
    pub reissue: Option<Reissue>,

    /// Where the cap holds: Sovereign (this billing database alone, the default) or Global
    /// (one cap across every Sovereign, kept by the vendor's hub; applied only in the global
    /// namespace, maxRedemptions at least 1). Immutable.
    #[serde(default, skip_serializing_if = "Scope::is_sovereign")]
    pub scope: Scope,

    /// A global voucher's credit per currency, in whole units of each, e.g. {OMR: 50, BHD: 50}:
    /// each Sovereign grants it in its own currency (--currency), and one whose currency is
    /// missing does not offer the voucher (Stalled, saying which). Only with scope Global, instead
    /// of spec.creditOMR (which on a global voucher is a credit in OMR alone).
    #[serde(
        rename = "creditByCurrency",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = {"type": "integer", "minimum": MIN_CREDIT_OMR, "maximum": MAX_CREDIT_OMR}
    ))]
    pub credit_by_currency: Option<BTreeMap<String, i32>>,

    /// Once per customer where: Sovereign (on this billing database, the default) or Global
    /// (once on any Sovereign, the customer being the federated token subject: the hub holds a
    /// claim per customer; only with scope Global). Immutable.
    #[serde(default, skip_serializing_if = "PerCustomer::is_sovereign")]
    pub per_customer: PerCustomer,
}

/// Where "once per customer" holds (DESIGN §11, docs/federation.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PerCustomer {
    /// Once on this Sovereign's billing database.
    #[default]
    Sovereign,
    /// Once on any Sovereign: a claim at the hub, per customer.
    Global,
}

impl PerCustomer {
    fn is_sovereign(&self) -> bool {
        *self == PerCustomer::Sovereign
    }
}

/// Where a Voucher's cap holds (DESIGN §11, docs/federation.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Scope {
    /// This Sovereign's billing database alone.
    #[default]
    Sovereign,
    /// One cap across every Sovereign: the hub's record, allotted to each in shares.
    Global,
}

impl Scope {
    fn is_sovereign(&self) -> bool {
        *self == Scope::Sovereign
    }
}

/// A code's grammar as a CEL rule, with its message (the schema's pattern alone answers with
/// the raw regular expression).
const CODE_RULE: &str = "self.matches('^[A-Za-z0-9][A-Za-z0-9_-]{2,63}$')";
const CODE_MESSAGE: &str = "a code is 3 to 64 characters of letters, digits, '-' and '_', starting with a letter or digit, without spaces (e.g. OMANTEL-MUSCAT-200); it is upper-cased";

/// Exactly one grant (a CEL rule of both kinds' specs).
pub(crate) const ONE_GRANT: &str = "has(self.creditOMR) != has(self.discount)";
pub(crate) const ONE_GRANT_MESSAGE: &str = "set exactly one of spec.creditOMR (a credit in whole OMR) and spec.discount (percentOff or amountOff, with appliesTo and durationMonths): a voucher grants one or the other";
/// The kind of grant never changes (a transition rule of both kinds' specs).
pub(crate) const SAME_GRANT: &str = "has(self.creditOMR) == has(oldSelf.creditOMR)";

/// A discount on the customer's charges (DESIGN §10): a share of each matching charge, or an
/// amount off an order's matching charges, for a number of months or once.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(
    validation = Rule::new("has(self.percentOff) != has(self.amountOff)")
        .message("spec.discount takes exactly one of percentOff (1 to 100) and amountOff (minor units of the currency, at least 1)")
        .field_path(".percentOff")
)]
#[serde(rename_all = "camelCase")]
pub struct DiscountSpec {
    /// Percent off each matching charge, 1 to 100 (rounded down to the currency's minor unit).
    /// A namespace may be held lower by the label catalyst.openova.io/max-percent-off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = MIN_PERCENT_OFF, "maximum" = MAX_PERCENT_OFF))]
    pub percent_off: Option<i32>,

    /// An amount off an order's matching charges together, once per order, in minor units of
    /// the Sovereign's currency (baisa for OMR: 5000 is 5 OMR), at least 1. A namespace may be
    /// held lower by the label catalyst.openova.io/max-amount-off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = MIN_AMOUNT_OFF, "maximum" = MAX_AMOUNT_OFF))]
    pub amount_off: Option<i64>,

    /// Charge categories the discount applies to, from the operator's configured list
    /// (--charge-categories; by default install, subscription, usage and support). Empty or
    /// absent: every charge. A category outside the list is refused by the controller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = MAX_CATEGORIES),
        inner(regex(pattern = CATEGORY_PATTERN)),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub applies_to: Vec<String>,

    /// Calendar months (UTC) the discount lasts from its redemption, 1 to 36. Absent: once, on
    /// the first order it discounts. A namespace may be held lower by the label
    /// catalyst.openova.io/max-discount-months.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = MIN_DURATION_MONTHS, "maximum" = MAX_DURATION_MONTHS))]
    pub duration_months: Option<i32>,
}

impl DiscountSpec {
    /// The terms as the domain holds them. Both or neither of percentOff and amountOff (which
    /// the schema refuses) read as 0 percent, which the terms' validation refuses.
    pub fn discount(&self) -> Discount {
        Discount {
            off: Off::join(self.percent_off, self.amount_off),
            applies_to: self.applies_to.clone(),
            duration_months: self.duration_months,
        }
    }
}

impl From<&Discount> for DiscountSpec {
    fn from(discount: &Discount) -> Self {
        let (percent_off, amount_off) = discount.off.split();
        Self {
            percent_off,
            amount_off,
            applies_to: discount.applies_to.clone(),
            duration_months: discount.duration_months,
        }
    }
}

/// `reissue` as this version writes it, or the boolean of earlier ones: a
/// stored `reissue: true` (or `false`) reads as no request — it named no
/// revocation — rather than failing the watch of every Voucher.
fn reissue_or_legacy_flag<'de, D>(deserializer: D) -> Result<Option<Reissue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Named(Reissue),
        // Read to be accepted, then dropped: true or false named nothing.
        LegacyFlag(#[allow(dead_code)] bool),
    }
    Ok(match Option::<Written>::deserialize(deserializer)? {
        Some(Written::Named(reissue)) => Some(reissue),
        Some(Written::LegacyFlag(_)) | None => None,
    })
}

/// Which revocation a reissue undoes: one request, spent once honoured, since a later
/// revoke is another revocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reissue {
    /// When the code was revoked (RFC 3339, to the microsecond), as the Voucher's
    /// status.revokedAt (or the revoked audit event) shows it.
    pub revoked_at: DateTime<Utc>,
}

/// A voucher is active unless it says otherwise.
pub fn default_active() -> bool {
    true
}

/// Observed state of a voucher, written by the controller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VoucherStatus {
    /// The metadata.generation the controller last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The effective code (spec.code or the upper-cased name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,

    /// Lifecycle phase: Active, Inactive, Scheduled, Expired, Exhausted, Suspended, Conflict,
    /// Forbidden, Revoked or Error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// Redemptions recorded in the billing database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times_redeemed: Option<i32>,

    /// Redemptions left before the cap; absent when unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<i32>,

    /// What a redemption grants, as the printer column shows it: 50 OMR, or 20% install 3mo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,

    /// Standard conditions: Ready and Synced; with kstatus's Stalled (waiting for a change by a
    /// person, e.g. a code conflict) or Reconciling (retrying) while they hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// When the row was last compared with the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_synced_at: Option<DateTime<Utc>>,

    /// A Global voucher's allotment: on a Sovereign, the share it holds; on the hub, the
    /// units granted and to whom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allotment: Option<AllotmentStatus>,
}

/// A Global voucher's allotment, as the printer columns show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllotmentStatus {
    /// On a Sovereign: the units of the global cap this Sovereign holds (its redemptions are
    /// status.timesRedeemed). On the hub: the units granted to every Sovereign together.
    pub share: i64,
    /// On the hub: each Sovereign's share and reported redemptions, e.g. "sov1=30/12 sov2=20/20".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sovereigns: Option<String>,
}

impl VoucherSpec {
    /// The terms as the billing database can hold them: Postgres keeps
    /// timestamps to the microsecond, so finer digits would read back as a
    /// difference on every pass.
    pub fn terms(&self) -> Terms {
        let micros = |t: Option<DateTime<Utc>>| t.map(|t| t.trunc_subsecs(6));
        Terms {
            // The billing service's column cannot be NULL: a discount grants no credit.
            credit_omr: self.credit_omr.unwrap_or(0),
            discount: self.discount.as_ref().map(DiscountSpec::discount),
            description: self.description.clone(),
            active: self.active,
            max_redemptions: self.max_redemptions,
            valid_from: micros(self.valid_from),
            expires_at: micros(self.expires_at),
        }
    }

    /// A global voucher's credit per currency: spec.creditByCurrency, or
    /// spec.creditOMR as a credit in OMR alone; empty for a discount.
    pub fn credits(&self) -> BTreeMap<String, i32> {
        match (&self.credit_by_currency, self.credit_omr) {
            (Some(credits), _) => credits.clone(),
            (None, Some(credit)) => [("OMR".to_owned(), credit)].into(),
            (None, None) => BTreeMap::new(),
        }
    }

    /// The record a global voucher defines at the hub (its cap shared in
    /// shares, `ceiling` the most one Sovereign holds), checked: each credit
    /// a valid one. On a Sovereign, the record its copy would define.
    pub fn global_record(
        &self,
        uid: &str,
        ceiling: u64,
        per_request: u64,
    ) -> Result<voucher_core::allotment::Record, TermError> {
        let terms = self.terms();
        let credits = self.credits();
        if credits.is_empty() {
            terms.validate()?;
        }
        for credit_omr in credits.values() {
            Terms {
                credit_omr: *credit_omr,
                ..terms.clone()
            }
            .validate()?;
        }
        let once_anywhere = self.per_customer == PerCustomer::Global;
        Ok(
            voucher_core::allotment::Record::defined(uid, &terms, ceiling, per_request)
                .offering(credits, once_anywhere),
        )
    }
}

impl Voucher {
    /// What this resource asks for beyond a code nobody has.
    pub fn request(&self) -> Request {
        Request {
            adopt: self.spec.adopt,
            reissue: self.spec.reissue.as_ref().map(|r| r.revoked_at),
        }
    }

    /// The code this resource owns: `spec.code`, or the resource name, normalised.
    pub fn code(&self) -> Result<Code, CodeError> {
        match &self.spec.code {
            Some(code) => Code::parse(code),
            None => Code::parse(&self.name_any()),
        }
    }
}

/// A resource name for a code: its lower-cased self when that is a valid
/// name, otherwise made valid (and unique) with a short hash of the code.
pub fn resource_name(code: &Code) -> String {
    use sha2::{Digest, Sha256};
    let lower = code.as_str().to_ascii_lowercase();
    let valid =
        lower.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') && !lower.ends_with('-');
    if valid {
        return lower;
    }
    let base: String = lower
        .replace('_', "-")
        .trim_end_matches('-')
        .chars()
        .take(50)
        .collect();
    let hash = Sha256::digest(code.as_str());
    format!("{base}-{:02x}{:02x}{:02x}", hash[0], hash[1], hash[2])
}

/// Why a `promo_codes` row cannot become a Voucher as it is.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error(transparent)]
    Code(#[from] CodeError),
    #[error(transparent)]
    Terms(#[from] TermError),
}

/// A Voucher that adopts an existing `promo_codes` row as it is.
pub fn voucher_for(record: &CodeRecord, namespace: &str) -> Result<Voucher, AdoptError> {
    let code = Code::parse(&record.code)?;
    record.terms.validate()?;
    let mut voucher = Voucher::new(
        &resource_name(&code),
        VoucherSpec {
            code: Some(code.to_string()),
            credit_omr: record
                .terms
                .discount
                .is_none()
                .then_some(record.terms.credit_omr),
            discount: record.terms.discount.as_ref().map(DiscountSpec::from),
            description: record.terms.description.clone(),
            active: record.terms.active && !record.is_tombstoned(),
            max_redemptions: record.terms.max_redemptions,
            valid_from: record.terms.valid_from,
            expires_at: record.terms.expires_at,
            deletion_policy: DeletionPolicy::Revoke,
            // The point of an exported manifest is to take the row over as it is.
            adopt: !record.is_tombstoned(),
            // This revocation only: a later one stays.
            reissue: record.deleted_at.map(|revoked_at| Reissue { revoked_at }),
            scope: Scope::Sovereign,
            credit_by_currency: None,
            per_customer: PerCustomer::Sovereign,
        },
    );
    voucher.metadata.namespace = Some(namespace.to_owned());
    Ok(voucher)
}

/// The CRD as installed in a cluster, generated from the types above, kept
/// (see [`kept`]): deleting it deletes every Voucher at once (the controller
/// then orphans their codes rather than revoking them, but every Voucher is gone).
pub fn crd() -> CustomResourceDefinition {
    published(Voucher::crd())
}

/// Every kind's CRD, as installed: what a cluster needs, and what the tests hold to the same
/// rules (the columns, the messages).
pub fn crds() -> [CustomResourceDefinition; 2] {
    [crd(), campaign::crd()]
}

/// A generated CRD as it is installed: kept, readable, its rules on the name pointing at it.
pub(crate) fn published(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    kept(readable(name_addressable(crd)))
}

/// The root schema names `metadata.name` (a string, the one field of metadata a CRD may
/// describe besides generateName), so that a rule on the name can give `.metadata.name` as its
/// fieldPath: the API server refuses a path the schema does not hold.
fn name_addressable(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps;
    for version in &mut crd.spec.versions {
        let Some(root) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        let name = JSONSchemaProps {
            type_: Some("string".into()),
            ..Default::default()
        };
        let metadata = JSONSchemaProps {
            type_: Some("object".into()),
            properties: Some([("name".to_owned(), name)].into()),
            ..Default::default()
        };
        root.properties
            .get_or_insert_with(Default::default)
            .insert("metadata".into(), metadata);
    }
    crd
}

/// `crd` with descriptions that read as sentences in `kubectl explain`: a doc comment's line
/// breaks are the source's wrapping, not the text's (a blank line stays a paragraph).
pub(crate) fn readable(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn unwrap(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map.iter_mut() {
                    match (key.as_str(), value) {
                        ("description", serde_json::Value::String(text)) => *text = sentences(text),
                        (_, value) => unwrap(value),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(unwrap),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(&crd).expect("a CRD always serialises");
    unwrap(&mut value);
    serde_json::from_value(value).expect("only descriptions changed")
}

/// A doc comment's text with its lines joined, paragraphs kept.
fn sentences(text: &str) -> String {
    text.split("\n\n")
        .map(|paragraph| {
            paragraph
                .split('\n')
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// `crd` marked to be kept by Helm (uninstall) and by Flux (a prune, when it
/// leaves a Kustomization): deleting a CRD deletes every resource of its kind.
pub(crate) fn kept(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    crd.metadata.annotations = Some(
        [
            ("helm.sh/resource-policy", "keep"),
            ("kustomize.toolkit.fluxcd.io/prune", "disabled"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
    );
    crd
}

/// The CRD as the YAML document committed in `crds/voucher.yaml`.
pub fn crd_yaml() -> String {
    let body = serde_yaml::to_string(&crd()).expect("a CRD always serialises to YAML");
    format!(
        "# Generated by `voucher-operator crd --kind voucher`; do not edit. Regenerate with:\n#   cargo run -- crd --kind voucher > crds/voucher.yaml\n{body}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn voucher(name: &str, code: Option<&str>) -> Voucher {
        let mut v = Voucher::new(
            name,
            VoucherSpec {
                code: code.map(str::to_owned),
                credit_omr: Some(10),
                discount: None,
                description: String::new(),
                active: true,
                max_redemptions: 0,
                valid_from: None,
                expires_at: None,
                deletion_policy: DeletionPolicy::Revoke,
                adopt: false,
                reissue: None,
                scope: Scope::Sovereign,
                credit_by_currency: None,
                per_customer: PerCustomer::Sovereign,
            },
        );
        v.metadata.namespace = Some("default".into());
        v
    }

    #[test]
    fn a_legacy_reissue_flag_reads_as_no_request() {
        for legacy in [serde_json::json!(true), serde_json::json!(false)] {
            let voucher: Voucher = serde_json::from_value(serde_json::json!({
                "apiVersion": "catalyst.openova.io/v1alpha1", "kind": "Voucher",
                "metadata": {"name": "old"}, "spec": {"creditOMR": 5, "reissue": legacy}
            }))
            .expect("an earlier version's Voucher still reads");
            assert_eq!(voucher.spec.reissue, None);
        }
        let named: Voucher = serde_json::from_value(serde_json::json!({
            "apiVersion": "catalyst.openova.io/v1alpha1", "kind": "Voucher",
            "metadata": {"name": "new"},
            "spec": {"creditOMR": 5, "reissue": {"revokedAt": "2026-12-05T03:00:00.123456Z"}}
        }))
        .unwrap();
        assert!(named.spec.reissue.is_some());
    }

    #[test]
    fn code_defaults_to_the_upper_cased_name() {
        assert_eq!(
            voucher("omantel-200", None).code().unwrap().as_str(),
            "OMANTEL-200"
        );
        assert_eq!(
            voucher("x", Some(" launch ")).code().unwrap().as_str(),
            "LAUNCH"
        );
    }

    #[test]
    fn resource_names_are_valid_and_distinct() {
        let name = |c: &str| resource_name(&Code::parse(c).unwrap());
        assert_eq!(name("OMANTEL-MUSCAT-200"), "omantel-muscat-200");
        let (a, b) = (name("SPRING_SALE"), name("SPRING-SALE"));
        assert_ne!(a, b);
        // What the API server requires of a name (an RFC 1123 subdomain).
        let valid = |n: &str| {
            n.len() <= 253
                && n.split('.').all(|label| {
                    !label.is_empty()
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                })
        };
        assert!(valid(&a), "{a}");
        assert!(valid(&name("ABC-")), "{}", name("ABC-"));
    }

    #[test]
    fn terms_keep_what_postgres_keeps() {
        let mut v = voucher("x-y-z", None);
        v.spec.expires_at = Some("2027-01-01T00:00:00.123456789Z".parse().unwrap());
        let expires = v.spec.terms().expires_at.unwrap();
        assert_eq!(expires.to_rfc3339(), "2027-01-01T00:00:00.123456+00:00");
    }

    #[test]
    fn defaults_apply_when_fields_are_omitted() {
        let spec: VoucherSpec =
            serde_json::from_value(serde_json::json!({"creditOMR": 5})).unwrap();
        assert!(spec.active);
        assert_eq!(spec.max_redemptions, 0);
        assert_eq!(spec.deletion_policy, DeletionPolicy::Revoke);
    }

    /// The schema the API server checks, as generated.
    fn spec_schema() -> serde_json::Value {
        let crd = serde_json::to_value(crd()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
    }

    #[test]
    fn the_crd_schema_enforces_the_domain_term_rules() {
        let spec = spec_schema();
        let props = &spec["properties"];
        // OpenAPI's minimum is a number; the API server compares integers to it.
        assert_eq!(props["creditOMR"]["minimum"], f64::from(MIN_CREDIT_OMR));
        assert_eq!(props["creditOMR"]["maximum"], f64::from(MAX_CREDIT_OMR));
        assert_eq!(
            props["maxRedemptions"]["minimum"],
            f64::from(MIN_MAX_REDEMPTIONS)
        );
        assert_eq!(
            props["maxRedemptions"]["maximum"],
            f64::from(MAX_MAX_REDEMPTIONS)
        );
        // Every integer of the spec is bounded both ways.
        for (name, field) in props.as_object().unwrap() {
            if field["type"] == "integer" {
                assert!(
                    field["minimum"].is_number() && field["maximum"].is_number(),
                    "{name}"
                );
            }
        }
        assert_eq!(props["description"]["maxLength"], MAX_DESCRIPTION_LEN);
        assert_eq!(props["code"]["pattern"], CODE_PATTERN);
        // The same grammar, as a rule that answers in words.
        assert_eq!(CODE_RULE, format!("self.matches('{CODE_PATTERN}')"));
        assert_eq!(
            props["code"]["x-kubernetes-validations"][0]["rule"],
            CODE_RULE
        );
        // The window rule is a CEL rule on the spec.
        let rules = spec["x-kubernetes-validations"].to_string();
        assert!(rules.contains("self.expiresAt > self.validFrom"), "{rules}");
    }

    /// Every rule of both CRDs on an object names the field a person must change, so the API
    /// server answers `spec.expiresAt: …`, not `<nil>` or `spec`, and no description breaks a
    /// sentence (`kubectl explain` prints its line breaks).
    #[test]
    fn every_object_rule_names_its_field_and_descriptions_read_as_sentences() {
        fn walk(at: &str, value: &serde_json::Value, found: &mut Vec<String>) {
            match value {
                serde_json::Value::Object(map) => {
                    for rule in map
                        .get("x-kubernetes-validations")
                        .and_then(|r| r.as_array())
                        .into_iter()
                        .flatten()
                    {
                        let on_object = map.get("type").and_then(|t| t.as_str()) == Some("object");
                        if on_object && rule.get("fieldPath").is_none() {
                            found.push(format!("{at}: a rule without fieldPath: {}", rule["rule"]));
                        }
                    }
                    let text = map.get("description").and_then(|d| d.as_str());
                    if let Some(text) = text.filter(|t| t.replace("\n\n", "").contains('\n')) {
                        found.push(format!(
                            "{at}: a description broken mid-paragraph: {text:?}"
                        ));
                    }
                    for (key, value) in map {
                        walk(&format!("{at}/{key}"), value, found);
                    }
                }
                serde_json::Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        walk(&format!("{at}/{i}"), item, found);
                    }
                }
                _ => {}
            }
        }
        let mut found = Vec::new();
        for crd in crds() {
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
            walk(&crd.metadata.name.unwrap(), &schema, &mut found);
        }
        assert!(found.is_empty(), "{found:#?}");
        assert_eq!(sentences("a\nb\n\nc\n d"), "a b\n\nc d");
    }

    proptest::proptest! {
        /// A code the schema admits is one the domain parses, and the other
        /// way round (for input without surrounding blanks, which the
        /// domain trims and the schema refuses).
        #[test]
        fn the_crd_code_pattern_admits_exactly_the_domain_codes(input in "[A-Za-z0-9_ .-]{0,70}") {
            let pattern = regex::Regex::new(CODE_PATTERN).unwrap();
            proptest::prop_assume!(input.trim() == input);
            proptest::prop_assert_eq!(pattern.is_match(&input), Code::parse(&input).is_ok());
        }
    }

    #[test]
    fn rows_outside_the_term_rules_are_not_adopted() {
        let mut row = CodeRecord {
            global_gone: None,
            once_anywhere: false,
            code: "FREE-1".into(),
            terms: voucher("free-1", None).spec.terms(),
            times_redeemed: 0,
            created_at: chrono::Utc::now(),
            deleted_at: None,
            campaign_on: None,
            suspended: false,
        };
        assert!(voucher_for(&row, "billing").is_ok());
        row.terms.credit_omr = 0;
        assert!(matches!(
            voucher_for(&row, "billing"),
            Err(AdoptError::Terms(TermError::CreditTooSmall(0)))
        ));
    }

    #[test]
    fn a_discount_row_is_exported_as_a_discount_voucher_that_round_trips() {
        let discount = Discount {
            off: Off::AmountOff(5000),
            applies_to: vec!["install".into()],
            duration_months: None,
        };
        let row = CodeRecord {
            global_gone: None,
            once_anywhere: false,
            code: "FIVE-OFF".into(),
            terms: Terms {
                credit_omr: 0,
                discount: Some(discount.clone()),
                ..Terms::granting(1)
            },
            times_redeemed: 2,
            created_at: chrono::Utc::now(),
            deleted_at: None,
            campaign_on: None,
            suspended: false,
        };
        let voucher = voucher_for(&row, "billing").unwrap();
        assert_eq!(voucher.spec.credit_omr, None, "no credit beside a discount");
        assert_eq!(
            voucher.spec.discount.as_ref().map(DiscountSpec::discount),
            Some(discount)
        );
        assert_eq!(
            voucher.spec.terms(),
            row.terms,
            "adopting it changes nothing"
        );
    }

    /// `kubectl get` answers the same questions for every kind, in the same columns: what it
    /// grants, whether it is on, how much is used, where it stands and why (READY and REASON from
    /// the Ready condition), its age; `-o wide` adds the window.
    #[test]
    fn every_kind_answers_the_same_questions_in_kubectl_get() {
        let shared = [
            ("Grant", ".status.grant", 0),
            ("Active", ".spec.active", 0),
            ("Phase", ".status.phase", 0),
            (
                "Ready",
                ".status.conditions[?(@.type==\"Ready\")].status",
                0,
            ),
            (
                "Reason",
                ".status.conditions[?(@.type==\"Ready\")].reason",
                0,
            ),
            ("Valid-From", ".spec.validFrom", 1),
            ("Expires", ".spec.expiresAt", 1),
            ("Age", ".metadata.creationTimestamp", 0),
        ];
        for crd in crds() {
            let kind = &crd.spec.names.kind;
            let columns = crd.spec.versions[0]
                .additional_printer_columns
                .clone()
                .unwrap_or_default();
            for (name, path, priority) in shared {
                let column = columns.iter().find(|c| c.name == name);
                let found = column.map(|c| (c.json_path.as_str(), c.priority.unwrap_or(0)));
                assert_eq!(found, Some((path, priority)), "{kind}: {name}");
            }
            assert!(
                columns.iter().any(|c| c.name == "Redeemed"),
                "{kind}: how much is used"
            );
        }
    }

    #[test]
    fn crd_has_names_columns_and_status() {
        let crd = crd();
        assert_eq!(crd.spec.names.short_names, Some(vec!["vch".into()]));
        assert_eq!(crd.spec.names.categories, Some(vec!["catalyst".into()]));
        let version = &crd.spec.versions[0];
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns = |wide: bool| -> Vec<String> {
            version
                .additional_printer_columns
                .as_ref()
                .unwrap()
                .iter()
                .filter(|c| wide || c.priority.unwrap_or(0) == 0)
                .map(|c| c.name.to_uppercase())
                .collect()
        };
        assert_eq!(
            columns(false),
            [
                "CODE", "GRANT", "ACTIVE", "REDEEMED", "MAX", "PHASE", "READY", "REASON", "AGE"
            ]
        );
        assert_eq!(
            columns(true),
            [
                "CODE",
                "GRANT",
                "ACTIVE",
                "REDEEMED",
                "MAX",
                "PHASE",
                "READY",
                "REASON",
                "REMAINING",
                "SCOPE",
                "SHARE",
                "ALLOTMENTS",
                "VALID-FROM",
                "EXPIRES",
                "AGE"
            ]
        );
        // Kept by Helm and by Flux: deleting it deletes every Voucher.
        let annotations = crd.metadata.annotations.unwrap();
        assert_eq!(annotations["helm.sh/resource-policy"], "keep");
        assert_eq!(annotations["kustomize.toolkit.fluxcd.io/prune"], "disabled");
    }
}
