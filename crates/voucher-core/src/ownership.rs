//! Which resource owns a code, and what applying a resource to the row means.

use super::audit::AuditKind;
use super::owner::Owner;
use super::voucher::{CodeRecord, Phase, TermField};

/// What a resource may do with the code it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// No row: create it and bind it.
    Create,
    /// Only a tombstone: bring it back (keeping `times_redeemed`) and bind it.
    Resurrect,
    /// A live row nobody owns (written by the admin page before the lift):
    /// bind it, keep its counters and creation time.
    Adopt,
    /// Already ours.
    Keep,
    /// Another resource owns it: touch nothing.
    Conflict { owner: Owner },
}

impl Claim {
    pub fn decide(binding: Option<&Owner>, row: Option<&CodeRecord>, me: &Owner) -> Self {
        match (binding, row) {
            (Some(owner), _) if owner.uid != me.uid => Self::Conflict {
                owner: owner.clone(),
            },
            (Some(_), _) => Self::Keep,
            (None, None) => Self::Create,
            (None, Some(row)) if row.is_tombstoned() => Self::Resurrect,
            (None, Some(_)) => Self::Adopt,
        }
    }

    /// The audit records an apply produces.
    pub fn audit_kinds(&self, applied: &Applied<'_>) -> Vec<AuditKind> {
        let changed = applied.changed;
        let mut kinds = match self {
            Self::Create | Self::Resurrect => vec![AuditKind::Created],
            Self::Adopt => vec![AuditKind::Adopted],
            Self::Conflict { .. } => vec![AuditKind::Conflict],
            Self::Keep if changed.is_empty() => Vec::new(),
            Self::Keep if !applied.spec_changed => vec![AuditKind::DriftCorrected],
            Self::Keep => {
                let mut kinds = Vec::new();
                if changed.iter().any(|f| *f != TermField::Active) {
                    kinds.push(AuditKind::Updated);
                }
                if changed.contains(&TermField::Active) {
                    kinds.push(if applied.now_active {
                        AuditKind::Activated
                    } else {
                        AuditKind::Deactivated
                    });
                }
                kinds
            }
        };
        // The end of the window is recorded once, by the first apply that sees it.
        if applied.phase == Phase::Expired && applied.last_phase != Some(Phase::Expired) {
            kinds.push(AuditKind::Expired);
        }
        kinds
    }
}

/// What applying a resource did to its row, as far as its audit goes.
#[derive(Clone, Copy, Debug)]
pub struct Applied<'a> {
    /// The columns the apply wrote.
    pub changed: &'a [TermField],
    pub now_active: bool,
    /// A new generation of the resource, rather than an out-of-band edit of the row.
    pub spec_changed: bool,
    /// The row's phase now, and as recorded by the last apply.
    pub phase: Phase,
    pub last_phase: Option<Phase>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::voucher::Terms;
    use chrono::Utc;

    fn owner(uid: &str) -> Owner {
        Owner {
            namespace: "sales".into(),
            name: "launch".into(),
            uid: uid.into(),
        }
    }

    fn row(deleted: bool) -> CodeRecord {
        CodeRecord {
            code: "LAUNCH".into(),
            terms: Terms::granting(5),
            times_redeemed: 2,
            created_at: Utc::now(),
            deleted_at: deleted.then(Utc::now),
        }
    }

    #[test]
    fn decides_every_claim() {
        let me = owner("a");
        let live = row(false);
        let tomb = row(true);
        assert_eq!(Claim::decide(None, None, &me), Claim::Create);
        assert_eq!(Claim::decide(None, Some(&tomb), &me), Claim::Resurrect);
        assert_eq!(Claim::decide(None, Some(&live), &me), Claim::Adopt);
        assert_eq!(Claim::decide(Some(&me), Some(&live), &me), Claim::Keep);
        assert_eq!(
            Claim::decide(Some(&owner("b")), Some(&live), &me),
            Claim::Conflict { owner: owner("b") }
        );
    }

    /// An apply by the resource that already owns the code, of an active row.
    fn keep(changed: &[TermField], now_active: bool, spec_changed: bool) -> Vec<AuditKind> {
        Claim::Keep.audit_kinds(&Applied {
            changed,
            now_active,
            spec_changed,
            phase: Phase::Active,
            last_phase: Some(Phase::Active),
        })
    }

    #[test]
    fn the_end_of_the_window_is_audited_once() {
        let applied = |last_phase| Applied {
            changed: &[],
            now_active: true,
            spec_changed: false,
            phase: Phase::Expired,
            last_phase,
        };
        assert_eq!(
            Claim::Keep.audit_kinds(&applied(Some(Phase::Active))),
            vec![AuditKind::Expired]
        );
        assert!(
            Claim::Keep
                .audit_kinds(&applied(Some(Phase::Expired)))
                .is_empty()
        );
        assert_eq!(
            Claim::Create.audit_kinds(&applied(None)),
            vec![AuditKind::Created, AuditKind::Expired]
        );
    }

    #[test]
    fn a_no_op_resync_audits_nothing() {
        assert!(keep(&[], true, false).is_empty());
        assert!(keep(&[], true, true).is_empty());
    }

    #[test]
    fn spec_changes_and_drift_are_told_apart() {
        let changed = [TermField::CreditOmr];
        assert_eq!(keep(&changed, true, true), vec![AuditKind::Updated]);
        assert_eq!(keep(&changed, true, false), vec![AuditKind::DriftCorrected]);
    }

    #[test]
    fn switching_active_is_its_own_event() {
        assert_eq!(
            keep(&[TermField::Active], false, true),
            vec![AuditKind::Deactivated]
        );
        assert_eq!(
            keep(&[TermField::Active, TermField::Description], true, true),
            vec![AuditKind::Updated, AuditKind::Activated]
        );
    }
}
