//! The kinds of state change that are recorded in the audit outbox.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::campaign::{CampaignName, CodeRange};
use super::owner::Owner;
use super::voucher::{CodeRecord, TermField, Terms};

/// One kind of audit event. Its name appears in the CloudEvents `type`
/// (`io.openova.catalyst.voucher.<name>.v1`) and in the NATS subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuditKind {
    Created,
    Updated,
    Activated,
    Deactivated,
    Adopted,
    Reissued,
    Conflict,
    DriftCorrected,
    Exhausted,
    Expired,
    Revoked,
    Orphaned,
    Redeemed,
    /// A discount code was redeemed: the customer's discount grant was written.
    DiscountGranted,
    /// A checkout committed an order that a discount grant took something off.
    DiscountApplied,
    /// A committed order was reversed (refunded, cancelled): its discount given back.
    DiscountReversed,
    /// A redemption was reversed by an administrator: credit clawed back or grant ended.
    RedemptionReversed,
    /// A campaign's codes were generated (one record per pass, naming the range).
    CampaignGenerated,
    /// A campaign's terms changed and were applied to all its codes.
    CampaignUpdated,
    /// Out-of-band edits of a campaign's codes were reverted.
    CampaignDriftCorrected,
    /// A deleted campaign's codes were revoked (deletionPolicy Revoke).
    CampaignRevoked,
    /// A deleted campaign's codes were left live, unowned (deletionPolicy Orphan).
    CampaignOrphaned,
    /// Somebody downloaded (a range of) a campaign's codes.
    CampaignCodesDownloaded,
    /// A code was suspended (the admin endpoint, or its Voucher's annotation).
    Suspended,
    /// A code's suspension was lifted (by the way it was set).
    SuspensionLifted,
    /// A campaign was suspended: all its codes at once.
    CampaignSuspended,
    /// A campaign's suspension was lifted.
    CampaignSuspensionLifted,
}

/// Prefix of every CloudEvents `type` the operator emits.
pub const EVENT_TYPE_PREFIX: &str = "io.openova.catalyst.voucher";

impl AuditKind {
    pub const ALL: [AuditKind; 27] = [
        AuditKind::Created,
        AuditKind::Updated,
        AuditKind::Activated,
        AuditKind::Deactivated,
        AuditKind::Adopted,
        AuditKind::Reissued,
        AuditKind::Conflict,
        AuditKind::DriftCorrected,
        AuditKind::Exhausted,
        AuditKind::Expired,
        AuditKind::Revoked,
        AuditKind::Orphaned,
        AuditKind::Redeemed,
        AuditKind::DiscountGranted,
        AuditKind::DiscountApplied,
        AuditKind::DiscountReversed,
        AuditKind::RedemptionReversed,
        AuditKind::CampaignGenerated,
        AuditKind::CampaignUpdated,
        AuditKind::CampaignDriftCorrected,
        AuditKind::CampaignRevoked,
        AuditKind::CampaignOrphaned,
        AuditKind::CampaignCodesDownloaded,
        AuditKind::Suspended,
        AuditKind::SuspensionLifted,
        AuditKind::CampaignSuspended,
        AuditKind::CampaignSuspensionLifted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Activated => "activated",
            Self::Deactivated => "deactivated",
            Self::Adopted => "adopted",
            Self::Reissued => "reissued",
            Self::Conflict => "conflict",
            Self::DriftCorrected => "drift_corrected",
            Self::Exhausted => "exhausted",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Orphaned => "orphaned",
            Self::Redeemed => "redeemed",
            Self::DiscountGranted => "discount_granted",
            Self::DiscountApplied => "discount_applied",
            Self::DiscountReversed => "discount_reversed",
            Self::RedemptionReversed => "redemption_reversed",
            Self::CampaignGenerated => "campaign_generated",
            Self::CampaignUpdated => "campaign_updated",
            Self::CampaignDriftCorrected => "campaign_drift_corrected",
            Self::CampaignRevoked => "campaign_revoked",
            Self::CampaignOrphaned => "campaign_orphaned",
            Self::CampaignCodesDownloaded => "campaign_codes_downloaded",
            Self::Suspended => "suspended",
            Self::SuspensionLifted => "suspension_lifted",
            Self::CampaignSuspended => "campaign_suspended",
            Self::CampaignSuspensionLifted => "campaign_suspension_lifted",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// Whether the record concerns a whole campaign (its subject is the campaign's, not a code).
    pub fn is_campaign(self) -> bool {
        self.as_str().starts_with("campaign_")
    }

    /// The CloudEvents `type` attribute.
    pub fn event_type(self) -> String {
        format!("{EVENT_TYPE_PREFIX}.{}.v1", self.as_str())
    }
}

impl fmt::Display for AuditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who caused a change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Actor {
    /// A Voucher resource, through the controller.
    Resource {
        namespace: String,
        name: String,
        uid: String,
    },
    /// A VoucherCampaign resource, through the controller.
    Campaign {
        namespace: String,
        name: String,
        uid: String,
    },
    /// A token subject, through the HTTP API.
    Subject { subject: String },
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Resource {
                namespace, name, ..
            } => write!(f, "Voucher {namespace}/{name}"),
            Actor::Campaign {
                namespace, name, ..
            } => write!(f, "VoucherCampaign {namespace}/{name}"),
            Actor::Subject { subject } => f.write_str(subject),
        }
    }
}

impl From<&Owner> for Actor {
    fn from(owner: &Owner) -> Self {
        Actor::Resource {
            namespace: owner.namespace.clone(),
            name: owner.name.clone(),
            uid: owner.uid.clone(),
        }
    }
}

/// The `data` of an audit event: the voucher before and after, who did it, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditData {
    pub code: String,
    pub before: Option<CodeRecord>,
    pub after: Option<CodeRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<TermField>,
    pub actor: Actor,
    pub reason: String,
    /// The campaign that issued the code (its redemptions name it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<CampaignName>,
    /// A checkout's records: the order a grant of the code took something off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<OrderUse>,
}

/// Which order a discount grant took something off, whose, and how much.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderUse {
    pub order_id: String,
    /// The customer (`customers.user_id`).
    pub user_id: String,
    pub grant_id: String,
    /// Minor units of `currency` taken off the order (given back, on a reversal).
    pub amount: i64,
    pub currency: String,
}

impl AuditData {
    /// The record of one change, its reason worded by [`AuditKind::wording`].
    pub fn of(
        kind: AuditKind,
        facts: &Facts<'_>,
        before: Option<CodeRecord>,
        after: Option<CodeRecord>,
    ) -> Self {
        Self {
            code: facts.code.to_owned(),
            before,
            after,
            changed: facts.changed.to_vec(),
            actor: facts.actor.clone(),
            reason: kind.wording(facts).reason,
            campaign: None,
            order: None,
        }
    }
}

/// What a change's wording draws on.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub code: &'a str,
    pub actor: &'a Actor,
    /// The fields an update, activation or drift correction changed.
    pub changed: &'a [TermField],
    /// For a conflict: the resource that owns the code.
    pub holder: Option<&'a Owner>,
    /// For a redemption: what it granted (`50 OMR`, `20% install 3mo`).
    pub grant: Option<&'a str>,
    /// For a campaign's record: how many of its codes it concerns.
    pub codes: Option<u32>,
    /// For a reversed redemption: whose (`customers.user_id`).
    pub customer: Option<&'a str>,
}

impl<'a> Facts<'a> {
    pub fn new(code: &'a str, actor: &'a Actor) -> Self {
        Self {
            code,
            actor,
            changed: &[],
            holder: None,
            grant: None,
            codes: None,
            customer: None,
        }
    }
}

/// Whether a Kubernetes Event reports normal operation or asks for attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

/// The Kubernetes Event that accompanies an audit record on the Voucher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventWording {
    pub severity: Severity,
    /// The Event's `reason`: CamelCase, stable, documented in docs/reference.md.
    pub reason: &'static str,
    pub note: String,
}

/// The `data` of a campaign's own audit event: which campaign, which of its
/// codes (indices `from..to`), the terms before and after, who, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignAuditData {
    pub campaign: CampaignName,
    pub codes: CodeRange,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Terms>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Terms>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<TermField>,
    pub actor: Actor,
    pub reason: String,
}

/// A change as people read it: the audit record's reason and, for the changes
/// a Voucher's reconcile makes, the Event on that Voucher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wording {
    pub reason: String,
    pub event: Option<EventWording>,
}

impl AuditKind {
    /// The one table of what each kind of change is called: declarative, one
    /// arm per kind, so it stays one function however many kinds there are.
    pub fn wording(self, facts: &Facts<'_>) -> Wording {
        use Severity::{Normal, Warning};
        let Facts {
            code,
            actor,
            changed,
            holder,
            grant,
            codes,
            customer,
        } = *facts;
        let grant = grant.unwrap_or_default();
        let codes = codes.unwrap_or_default();
        let fields = TermField::join(changed);
        let holder = holder.map_or("another resource".into(), |h| format!("Voucher {h}"));
        let event = |severity, reason, note: String| {
            Some(EventWording {
                severity,
                reason,
                note,
            })
        };
        let (reason, event) = match self {
            Self::Created => (
                format!("created by {actor}"),
                event(
                    Normal,
                    "Created",
                    match grant {
                        "" => format!("created code {code}"),
                        grant => format!("created code {code} granting {grant}"),
                    },
                ),
            ),
            Self::Adopted => (
                format!("existing code adopted by {actor}"),
                event(
                    Normal,
                    "Adopted",
                    format!("adopted the existing code {code}; its redemptions are kept"),
                ),
            ),
            Self::Reissued => (
                format!("revoked code reissued by {actor}"),
                event(
                    Normal,
                    "Reissued",
                    format!("reissued the revoked code {code}; its redemptions are kept"),
                ),
            ),
            Self::Updated => (
                format!("{actor} changed {fields}"),
                event(
                    Normal,
                    "Updated",
                    format!("updated {fields} of code {code}"),
                ),
            ),
            Self::Activated => (
                format!("{actor} activated the code"),
                event(
                    Normal,
                    "Activated",
                    format!("code {code} can be redeemed again"),
                ),
            ),
            Self::Deactivated => (
                format!("{actor} deactivated the code"),
                event(
                    Normal,
                    "Deactivated",
                    format!("code {code} is switched off"),
                ),
            ),
            Self::DriftCorrected => (
                format!("out-of-band edit of {fields} reverted to {actor}"),
                event(
                    Warning,
                    "DriftCorrected",
                    format!("reverted an out-of-band edit of {fields} on code {code}"),
                ),
            ),
            Self::Expired => (
                "the redemption window ended".into(),
                event(
                    Normal,
                    "Expired",
                    format!("code {code} reached spec.expiresAt"),
                ),
            ),
            Self::Revoked => (
                match actor {
                    Actor::Subject { .. } => format!("revoked by {actor} through the admin API"),
                    Actor::Resource { .. } | Actor::Campaign { .. } => {
                        format!("{actor} deleted with deletionPolicy Revoke")
                    }
                },
                event(
                    Normal,
                    "Revoked",
                    format!(
                        "code {code} soft-deleted (deletionPolicy Revoke); redemption history is kept"
                    ),
                ),
            ),
            Self::Orphaned => (
                format!("{actor} deleted with deletionPolicy Orphan; the row is left as it is"),
                event(
                    Normal,
                    "Orphaned",
                    format!("code {code} left as it is (deletionPolicy Orphan)"),
                ),
            ),
            Self::Conflict => (
                format!("{actor} claims code {code}, which {holder} owns; nothing was changed"),
                event(
                    Warning,
                    "CodeConflict",
                    format!("code {code} is already owned by {holder}; nothing was changed"),
                ),
            ),
            // Redemptions happen at checkout, not in a reconcile: no Event.
            Self::Redeemed => (format!("redeemed by {actor} for {grant}"), None),
            Self::DiscountGranted => (
                format!("redeemed by {actor} for a discount of {grant}"),
                None,
            ),
            // The checkout's records: not a reconcile, no Event.
            Self::DiscountApplied => (format!("{actor} applied the discount: {grant}"), None),
            Self::DiscountReversed => (format!("{actor} reversed the discount: {grant}"), None),
            Self::RedemptionReversed => (
                format!(
                    "{actor} reversed the redemption by {}",
                    customer.unwrap_or("a customer")
                ),
                None,
            ),
            Self::Exhausted => (format!("the redemption by {actor} reached the cap"), None),
            // A campaign's records: the campaign's own Events are published by its controller.
            Self::CampaignGenerated => (format!("{actor} generated {codes} code(s)"), None),
            Self::CampaignUpdated => (
                format!("{actor} changed {fields} of its {codes} code(s)"),
                None,
            ),
            Self::CampaignDriftCorrected => (
                format!("out-of-band edits of {codes} code(s) reverted to {actor}"),
                None,
            ),
            Self::CampaignRevoked => (
                format!("{actor} deleted with deletionPolicy Revoke: {codes} code(s) revoked"),
                None,
            ),
            Self::CampaignOrphaned => (
                format!(
                    "{actor} deleted with deletionPolicy Orphan: {codes} code(s) left as they are"
                ),
                None,
            ),
            Self::CampaignCodesDownloaded => (
                format!("{actor} downloaded {codes} code(s) of {code}"),
                None,
            ),
            Self::Suspended => (
                format!("suspended by {actor}"),
                event(
                    Warning,
                    "Suspended",
                    format!("code {code} is suspended: nobody can redeem it until it is lifted"),
                ),
            ),
            Self::SuspensionLifted => (
                format!("suspension lifted by {actor}"),
                event(
                    Normal,
                    "SuspensionLifted",
                    format!("the suspension of code {code} by {actor} was lifted"),
                ),
            ),
            Self::CampaignSuspended => (
                format!("suspended by {actor}: none of its {codes} code(s) can be redeemed"),
                None,
            ),
            Self::CampaignSuspensionLifted => (format!("suspension lifted by {actor}"), None),
        };
        Wording { reason, event }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_subject_safe() {
        for kind in AuditKind::ALL {
            assert_eq!(AuditKind::parse(kind.as_str()), Some(kind));
            // NATS subject tokens cannot hold '.', '*', '>' or whitespace.
            assert!(
                kind.as_str()
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_')
            );
        }
        assert_eq!(AuditKind::parse("deleted"), None);
    }

    #[test]
    fn every_kind_is_worded_and_reconcile_kinds_have_an_event() {
        let actor = Actor::from(&Owner {
            namespace: "billing".into(),
            name: "launch".into(),
            uid: "u-1".into(),
        });
        let holder = Owner {
            namespace: "team-a".into(),
            name: "other".into(),
            uid: "u-2".into(),
        };
        let facts = Facts {
            changed: &[TermField::CreditOmr, TermField::Active],
            holder: Some(&holder),
            ..Facts::new("LAUNCH", &actor)
        };
        for kind in AuditKind::ALL {
            let wording = kind.wording(&facts);
            assert!(!wording.reason.is_empty(), "{kind}");
            let elsewhere = matches!(
                kind,
                AuditKind::Redeemed
                    | AuditKind::DiscountGranted
                    | AuditKind::DiscountApplied
                    | AuditKind::DiscountReversed
                    | AuditKind::RedemptionReversed
                    | AuditKind::Exhausted
            ) || kind.is_campaign();
            assert_eq!(wording.event.is_none(), elsewhere, "{kind}");
        }
        let conflict = AuditKind::Conflict.wording(&facts);
        assert_eq!(
            conflict.reason,
            "Voucher billing/launch claims code LAUNCH, which Voucher team-a/other owns; nothing was changed"
        );
        let event = conflict.event.unwrap();
        assert_eq!(
            (event.severity, event.reason),
            (Severity::Warning, "CodeConflict")
        );
        assert_eq!(
            AuditKind::Updated.wording(&facts).reason,
            "Voucher billing/launch changed credit_omr, active"
        );
    }

    #[test]
    fn event_types_follow_the_cloudevents_naming() {
        assert_eq!(
            AuditKind::Redeemed.event_type(),
            "io.openova.catalyst.voucher.redeemed.v1"
        );
    }
}
