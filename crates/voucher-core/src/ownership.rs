//! Who may mint credit: which resource owns a code, what it may do with a
//! row that already exists, and what applying it means for the audit.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::audit::AuditKind;
use super::owner::Owner;
use super::voucher::{CodeRecord, Phase, TermField};

/// What a resource asks for beyond a code nobody has: taking over a row that
/// exists without an owner, or bringing back a revoked one. Both are
/// requests only some people may make (the chart's admission policy), so
/// neither ever happens by accident.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub adopt: bool,
    /// The tombstone to bring back, named by when it was revoked. A request
    /// is spent by the reissue it asked for: a later revoke makes another
    /// tombstone, which it does not name, so a manifest that still carries it
    /// (re-applied by Flux, exported, written by the admin issue) never
    /// undoes that revoke.
    pub reissue: Option<DateTime<Utc>>,
}

impl Request {
    /// Whether this request names `row`'s tombstone (to the microsecond, the
    /// database's precision).
    fn reissues(&self, row: &CodeRecord) -> bool {
        let micros = |at: DateTime<Utc>| at.timestamp_micros();
        match (self.reissue, row.deleted_at) {
            (Some(asked), Some(revoked)) => micros(asked) == micros(revoked),
            _ => false,
        }
    }
}

/// What deleting a Voucher does to its billing row. Recorded in the binding,
/// so that it applies even when the Voucher vanished without its finalizer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// Soft-delete the row: deleted_at = now(), active = false.
    #[default]
    Revoke,
    /// Leave the row as it is and release the binding.
    Orphan,
}

impl DeletionPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Revoke => "Revoke",
            Self::Orphan => "Orphan",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [Self::Revoke, Self::Orphan]
            .into_iter()
            .find(|p| p.as_str() == name)
    }
}

/// The namespaces whose Vouchers may claim codes: creating a Voucher mints
/// money, so namespace RBAC is the boundary, and a claim never crosses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issuers(Vec<String>);

impl Issuers {
    pub fn new(namespaces: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let mut namespaces: Vec<String> = namespaces.into_iter().map(Into::into).collect();
        namespaces.sort();
        namespaces.dedup();
        Self(namespaces)
    }

    pub fn allows(&self, namespace: &str) -> bool {
        self.0.iter().any(|n| n == namespace)
    }

    /// `a, b`: for messages.
    pub fn list(&self) -> String {
        self.0.join(", ")
    }
}

/// A row that exists although nobody owns it, and that the resource did not
/// ask to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unrequested {
    /// A live row (written by the admin page before the lift, or left by an
    /// Orphan deletion): needs `spec.adopt`.
    Adopt,
    /// A revoked row: needs `spec.reissue.revokedAt` naming this revocation.
    Reissue { revoked_at: DateTime<Utc> },
}

/// What a resource may do with the code it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// No row: create it and bind it.
    Create,
    /// A revoked row, and the resource asked to reissue it: bring it back
    /// (keeping `times_redeemed`) and bind it.
    Reissue,
    /// A live row nobody owns, and the resource asked to adopt it: bind it,
    /// keep its counters and creation time.
    Adopt,
    /// Already ours.
    Keep,
    /// Another resource owns it: touch nothing.
    Conflict { owner: Owner },
    /// A row nobody owns that the resource did not ask for: touch nothing.
    NotRequested(Unrequested),
}

impl Claim {
    pub fn decide(
        binding: Option<&Owner>,
        row: Option<&CodeRecord>,
        me: &Owner,
        request: Request,
    ) -> Self {
        match (binding, row) {
            (Some(owner), _) if owner.uid != me.uid => Self::Conflict {
                owner: owner.clone(),
            },
            // Ours, but revoked since (the admin revoke, the admin page, by
            // hand): it stays revoked unless this resource names this very
            // tombstone.
            (Some(_), Some(row)) if row.is_tombstoned() => Self::reissue(row, request),
            (Some(_), _) => Self::Keep,
            (None, None) => Self::Create,
            (None, Some(row)) if row.is_tombstoned() => Self::reissue(row, request),
            (None, Some(_)) => match request.adopt {
                true => Self::Adopt,
                false => Self::NotRequested(Unrequested::Adopt),
            },
        }
    }

    /// A tombstone: brought back only when the request names it.
    fn reissue(row: &CodeRecord, request: Request) -> Self {
        match row.deleted_at {
            Some(revoked_at) if !request.reissues(row) => {
                Self::NotRequested(Unrequested::Reissue { revoked_at })
            }
            _ => Self::Reissue,
        }
    }

    /// Whether the resource may write the row.
    pub fn may_write(&self) -> bool {
        !matches!(self, Self::Conflict { .. } | Self::NotRequested(_))
    }

    /// The audit records an apply produces.
    pub fn audit_kinds(&self, applied: &Applied<'_>) -> Vec<AuditKind> {
        let changed = applied.changed;
        let mut kinds = match self {
            Self::Create => vec![AuditKind::Created],
            Self::Reissue => vec![AuditKind::Reissued],
            Self::Adopt => vec![AuditKind::Adopted],
            Self::Conflict { .. } => vec![AuditKind::Conflict],
            Self::NotRequested(_) => Vec::new(),
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
            global_gone: None,
            once_anywhere: false,
            code: "LAUNCH".into(),
            terms: Terms::granting(5),
            times_redeemed: 2,
            created_at: Utc::now(),
            // As the database keeps it: to the microsecond.
            deleted_at: deleted.then(|| "2026-12-05T03:00:00.123456Z".parse().unwrap()),
            campaign_on: None,
            suspended: false,
        }
    }

    const NONE: Request = Request {
        adopt: false,
        reissue: None,
    };

    /// Asks for adoption and for the reissue of `row`'s tombstone.
    fn both(row: &CodeRecord) -> Request {
        Request {
            adopt: true,
            reissue: row.deleted_at,
        }
    }

    #[test]
    fn decides_every_claim() {
        let me = owner("a");
        let live = row(false);
        let tomb = row(true);
        assert_eq!(Claim::decide(None, None, &me, NONE), Claim::Create);
        assert_eq!(
            Claim::decide(None, Some(&tomb), &me, both(&tomb)),
            Claim::Reissue
        );
        assert_eq!(
            Claim::decide(None, Some(&live), &me, both(&tomb)),
            Claim::Adopt
        );
        assert_eq!(
            Claim::decide(Some(&me), Some(&live), &me, NONE),
            Claim::Keep
        );
        assert_eq!(
            Claim::decide(Some(&owner("b")), Some(&live), &me, both(&tomb)),
            Claim::Conflict { owner: owner("b") }
        );
    }

    #[test]
    fn an_existing_row_is_taken_only_on_request() {
        let me = owner("a");
        let (live, tomb) = (row(false), row(true));
        let adopt_only = Request {
            adopt: true,
            reissue: None,
        };
        let revoked_at = tomb.deleted_at.unwrap();
        let claim = Claim::decide(None, Some(&live), &me, NONE);
        assert_eq!(claim, Claim::NotRequested(Unrequested::Adopt));
        assert!(!claim.may_write());
        // Adoption does not extend to a revoked code: that is its own request.
        assert_eq!(
            Claim::decide(None, Some(&tomb), &me, adopt_only),
            Claim::NotRequested(Unrequested::Reissue { revoked_at })
        );
        assert!(
            Claim::NotRequested(Unrequested::Reissue { revoked_at })
                .audit_kinds(&Applied {
                    changed: &[],
                    now_active: true,
                    spec_changed: true,
                    phase: Phase::Active,
                    last_phase: None,
                })
                .is_empty()
        );
    }

    #[test]
    fn a_reissue_is_spent_by_the_tombstone_it_names() {
        let me = owner("a");
        let first = row(true);
        let asked = Request {
            adopt: false,
            reissue: first.deleted_at,
        };
        assert_eq!(
            Claim::decide(Some(&me), Some(&first), &me, asked),
            Claim::Reissue
        );
        // Revoked again later (a microsecond is enough): the standing request
        // names the old tombstone and brings back nothing, bound or not.
        let again = CodeRecord {
            deleted_at: first
                .deleted_at
                .map(|at| at + chrono::Duration::microseconds(1)),
            ..first.clone()
        };
        let revoked_at = again.deleted_at.unwrap();
        for binding in [Some(&me), None] {
            assert_eq!(
                Claim::decide(binding, Some(&again), &me, asked),
                Claim::NotRequested(Unrequested::Reissue { revoked_at }),
                "bound: {}",
                binding.is_some()
            );
        }
        // Nanoseconds the database does not keep do not matter.
        let nanos = Request {
            adopt: false,
            reissue: first
                .deleted_at
                .map(|at| at + chrono::Duration::nanoseconds(1)),
        };
        assert_eq!(
            Claim::decide(Some(&me), Some(&first), &me, nanos),
            Claim::Reissue
        );
    }

    #[test]
    fn only_issuer_namespaces_may_claim() {
        let issuers = Issuers::new(["billing", "sales", "billing"]);
        assert!(issuers.allows("sales"));
        assert!(!issuers.allows("team-a"));
        assert!(!issuers.allows(""));
        assert_eq!(issuers.list(), "billing, sales");
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
