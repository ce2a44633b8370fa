//! The kinds of state change that are recorded in the audit outbox.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::owner::Owner;
use super::voucher::{CodeRecord, TermField};

/// One kind of audit event. Its name appears in the CloudEvents `type`
/// (`io.openova.catalyst.voucher.<name>.v1`) and in the NATS subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuditKind {
    Created,
    Updated,
    Activated,
    Deactivated,
    Adopted,
    Conflict,
    DriftCorrected,
    Exhausted,
    Expired,
    Revoked,
    Orphaned,
    Redeemed,
}

/// Prefix of every CloudEvents `type` the operator emits.
pub const EVENT_TYPE_PREFIX: &str = "io.openova.catalyst.voucher";

impl AuditKind {
    pub const ALL: [AuditKind; 12] = [
        AuditKind::Created,
        AuditKind::Updated,
        AuditKind::Activated,
        AuditKind::Deactivated,
        AuditKind::Adopted,
        AuditKind::Conflict,
        AuditKind::DriftCorrected,
        AuditKind::Exhausted,
        AuditKind::Expired,
        AuditKind::Revoked,
        AuditKind::Orphaned,
        AuditKind::Redeemed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Activated => "activated",
            Self::Deactivated => "deactivated",
            Self::Adopted => "adopted",
            Self::Conflict => "conflict",
            Self::DriftCorrected => "drift_corrected",
            Self::Exhausted => "exhausted",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Orphaned => "orphaned",
            Self::Redeemed => "redeemed",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
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
    /// A token subject, through the HTTP API.
    Subject { subject: String },
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
    fn event_types_follow_the_cloudevents_naming() {
        assert_eq!(
            AuditKind::Redeemed.event_type(),
            "io.openova.catalyst.voucher.redeemed.v1"
        );
    }
}
