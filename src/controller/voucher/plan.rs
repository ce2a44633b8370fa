//! What a reconcile does, decided from what it found and nothing else: the
//! status to write, the audit records and Events that report it, and when to
//! look again. `reconcile::apply` gathers the facts (the database, the API
//! server) and carries the plan out; everything it decides is here, tested
//! without either.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::status::{self, Outcome};
use crate::api::VoucherStatus;
use crate::controller::conditions::{CODE_CONFLICT, READY};
use crate::domain::{
    Actor, AuditKind, Code, CodeError, CodeRecord, EventWording, Facts, Issuers, Owner, Phase,
    Severity, TermError, TermField, Unrequested,
};
use crate::store::sync::Synced;

/// What applying a Voucher met.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one value per reconcile, moved once into decide"
)]
pub(crate) enum VoucherFound {
    /// The resource is outside the issuer namespaces; nothing was written.
    Forbidden(Issuers),
    /// The resource names no valid code; nothing was written.
    InvalidCode(CodeError),
    /// The terms break a voucher rule (the CRD's schema refuses them, so
    /// only a resource written past it gets here); nothing was written.
    InvalidTerms(TermError),
    /// The billing database could not be asked.
    DatabaseUnavailable(String),
    /// A `scope: Global` Voucher outside the global namespace, or one of this
    /// Sovereign's own inside it (`global`: which); nothing was written.
    OutOfPlace {
        global: bool,
        global_namespace: String,
    },
    /// A `scope: Global` Voucher on an operator joined to no hub.
    NoHub,
    /// The hub defines no global voucher with this code (yet).
    NotAtHub,
    /// The hub's definitions could not be read.
    HubUnavailable(String),
    /// The global voucher states no credit in this Sovereign's currency
    /// (those it states: `offered`); not offered here, its share returned.
    NoCreditInCurrency {
        currency: String,
        offered: Vec<String>,
    },
    /// The store's answer: a conflict, or the row as synced.
    Synced(Synced),
}

/// The resource as the reconcile saw it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct VoucherSeen<'a> {
    pub(crate) code: Option<&'a Code>,
    pub(crate) owner: &'a Owner,
    pub(crate) generation: i64,
    pub(crate) previous: Option<&'a VoucherStatus>,
    pub(crate) now: DateTime<Utc>,
    /// Every Voucher is looked at again at least this often.
    pub(crate) resync: Duration,
    /// What the spec grants (`50 OMR`, `20% install 3mo`), for its Events.
    pub(crate) grant: &'a str,
    /// A global voucher's copy: where it differs from the vendor's terms.
    pub(crate) differs: &'a [&'static str],
}

/// When to reconcile this Voucher again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    After(Duration),
    /// Only when the resource changes (a person must act).
    AwaitChange,
    /// Report the failure, so kube-runtime retries with backoff.
    Retry,
}

impl Next {
    /// The sooner of the two, for a status write that asks to be retried.
    pub(crate) fn at_most(self, delay: Option<Duration>) -> Self {
        match (self, delay) {
            (Next::After(next), Some(delay)) => Next::After(next.min(delay)),
            (Next::AwaitChange, Some(delay)) => Next::After(delay),
            (next, _) => next,
        }
    }
}

/// The reconcile's decisions.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct VoucherPlan {
    pub(crate) status: VoucherStatus,
    pub(crate) phase: Phase,
    /// A conflict's audit record, to write (the owner holding the code):
    /// once per episode, on the first reconcile that meets it.
    pub(crate) audit_conflict: Option<Owner>,
    /// Audit records this reconcile caused (already committed by the store,
    /// or `audit_conflict`), for the metrics.
    pub(crate) audited: Vec<AuditKind>,
    /// Events to publish on the Voucher.
    pub(crate) events: Vec<EventWording>,
    pub(crate) next: Next,
}

/// How long after a time boundary (validFrom, expiresAt) the reconcile
/// runs, so that the row's phase has certainly changed.
const AFTER_BOUNDARY: Duration = Duration::from_millis(50);

/// Decides what a reconcile that met `found` does.
pub(crate) fn decide(found: VoucherFound, seen: VoucherSeen<'_>) -> VoucherPlan {
    let code = seen.code.map(Code::as_str).unwrap_or_default();
    match found {
        VoucherFound::Forbidden(issuers) => refused(
            Phase::Forbidden,
            "NotAnIssuerNamespace",
            format!(
                "namespace {} may not issue vouchers (issuer namespaces: {}); nothing was written. \
                 To allow it, add it to the controller's --issuer-namespaces \
                 (chart value controller.issuerNamespaces)",
                seen.owner.namespace,
                issuers.list()
            ),
            &seen,
        ),
        VoucherFound::InvalidCode(error) => refused(
            Phase::Error,
            "InvalidCode",
            format!("this Voucher has no valid code: {error}; set spec.code"),
            &seen,
        ),
        VoucherFound::InvalidTerms(error) => refused(
            Phase::Error,
            error.reason(),
            format!("the spec breaks a voucher rule: {error}; nothing was written"),
            &seen,
        ),
        VoucherFound::Synced(Synced::CampaignCode { campaign }) => {
            let message = format!(
                "code {code} was issued by VoucherCampaign {campaign}; a Voucher can neither claim, \
                 adopt nor reissue it, and nothing was written. Change it through the campaign, or \
                 revoke it alone with the admin revoke"
            );
            VoucherPlan {
                next: Next::After(seen.resync),
                ..refused(Phase::Conflict, "CampaignCode", message, &seen)
            }
        }
        VoucherFound::Synced(Synced::NotRequested(what)) => not_requested(code, what, &seen),
        VoucherFound::Synced(Synced::ScopeMismatch { global_row }) => {
            let message = match global_row {
                true => format!(
                    "code {code} is a global voucher's on this Sovereign: only a Voucher with \
                     spec.scope: Global in the global namespace binds it; nothing was written"
                ),
                false => format!(
                    "code {code} is this Sovereign's own (its row is no global voucher's): a \
                     Global Voucher never takes one over; nothing was written. Choose another \
                     code at the hub"
                ),
            };
            VoucherPlan {
                next: Next::After(seen.resync),
                ..refused(Phase::Conflict, "ScopeMismatch", message, &seen)
            }
        }
        VoucherFound::OutOfPlace {
            global,
            global_namespace,
        } => {
            let message = match global {
                true => format!(
                    "a Voucher with spec.scope: Global belongs in the global namespace \
                     {global_namespace} (where the vendor's copies are applied); nothing was \
                     written"
                ),
                false => format!(
                    "namespace {global_namespace} holds only the vendor's global vouchers \
                     (spec.scope: Global); nothing was written. Apply this Voucher in an issuer \
                     namespace"
                ),
            };
            refused(Phase::Forbidden, "ScopeOutOfPlace", message, &seen)
        }
        VoucherFound::NoHub => refused(
            Phase::Error,
            "NoHub",
            "a Global voucher needs the operator joined to the vendor's hub (the controller's \
             --sovereign and --nats-url, chart value federation.sovereign); nothing was written"
                .to_owned(),
            &seen,
        ),
        VoucherFound::NotAtHub => VoucherPlan {
            next: Next::After(HUB_LOOK),
            ..refused(
                Phase::Inactive,
                "NotDefinedAtHub",
                format!(
                    "the hub defines no global voucher {code} (yet): nothing is offered until the \
                     vendor applies it there; looking again every {} s",
                    HUB_LOOK.as_secs()
                ),
                &seen,
            )
        },
        VoucherFound::NoCreditInCurrency { currency, offered } => VoucherPlan {
            next: Next::After(HUB_LOOK),
            ..refused(
                Phase::Inactive,
                "NoCreditInCurrency",
                format!(
                    "global voucher {code} states no credit in {currency}, this Sovereign's                      currency (it states {}): it is not offered here and any share held is                      returned; the vendor adds {currency} to spec.creditByCurrency at the hub",
                    offered.join(", ")
                ),
                &seen,
            )
        },
        VoucherFound::HubUnavailable(error) => unavailable(
            "HubUnavailable",
            format!("cannot read the hub's definitions: {error}"),
            &seen,
        ),
        VoucherFound::DatabaseUnavailable(error) => unavailable(
            "DatabaseUnavailable",
            format!("cannot reach the billing database: {error}"),
            &seen,
        ),
        VoucherFound::Synced(Synced::Conflict { owner: holder }) => conflict(code, holder, &seen),
        VoucherFound::Synced(Synced::Applied {
            record,
            phase,
            changed,
            audited,
            ..
        }) if !seen.differs.is_empty() => {
            let synced = applied(&record, phase, &changed, audited, &seen);
            let message = format!(
                "this copy of global voucher {code} differs from the vendor's definition at the \
                 hub in {}: the row carries the hub's terms and this copy changes nothing; make it \
                 match the hub's (the vendor's Flux applies it)",
                seen.differs.join(", ")
            );
            let stalled = refused(phase, "DiffersFromHub", message, &seen);
            VoucherPlan {
                events: [synced.events, stalled.events].concat(),
                audited: synced.audited,
                next: synced.next,
                ..stalled
            }
        }
        VoucherFound::Synced(Synced::Applied {
            record,
            phase,
            changed,
            audited,
            ..
        }) => applied(&record, phase, &changed, audited, &seen),
    }
}

/// How often a global copy reads the hub's definition again (the vendor's
/// switch-off or new window reaches a Sovereign within it).
pub(super) const HUB_LOOK: Duration = Duration::from_secs(10);

/// A service could not be asked: said, and retried with backoff.
fn unavailable(reason: &'static str, message: String, seen: &VoucherSeen<'_>) -> VoucherPlan {
    let outcome = Outcome::Failed {
        phase: Phase::Error,
        reason,
        message,
        retrying: true,
    };
    VoucherPlan {
        status: status::desired(outcome, seen.generation, seen.now, seen.previous),
        phase: Phase::Error,
        audit_conflict: None,
        audited: Vec::new(),
        events: Vec::new(),
        next: Next::Retry,
    }
}

/// A code that needs a request the spec does not make: adoption of an
/// unowned row, or a reissue of a revoked one.
fn not_requested(code: &str, what: Unrequested, seen: &VoucherSeen<'_>) -> VoucherPlan {
    let (phase, reason, message) = match what {
        Unrequested::Adopt => (
            Phase::Conflict,
            "AdoptionNotRequested",
            format!(
                "code {code} exists in the billing database without an owner; nothing was \
                 written. To take it over with its redemptions, set spec.adopt: true \
                 (allowed only to those the admission policy names)"
            ),
        ),
        Unrequested::Reissue { revoked_at } => {
            let at = revoked_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            (
                Phase::Revoked,
                "Revoked",
                format!(
                    "code {code} was revoked at {at} (the admin revoke, the billing admin \
                     page or by hand) and stays revoked; nothing was written. To bring it \
                     back with its redemptions, set spec.reissue.revokedAt: \"{at}\" \
                     (allowed only to those the admission policy names)"
                ),
            )
        }
    };
    // The row can change without this resource changing: look again.
    VoucherPlan {
        next: Next::After(seen.resync),
        ..refused(phase, reason, message, seen)
    }
}

/// Another resource holds the code: reported (and audited) once, when the
/// conflict begins; the status keeps saying it.
fn conflict(code: &str, holder: Owner, seen: &VoucherSeen<'_>) -> VoucherPlan {
    let begins = ready_reason(seen.previous) != Some(CODE_CONFLICT);
    let actor = Actor::from(seen.owner);
    let facts = Facts {
        holder: Some(&holder),
        ..Facts::new(code, &actor)
    };
    let events = begins
        .then(|| AuditKind::Conflict.wording(&facts).event)
        .flatten()
        .into_iter()
        .collect();
    let outcome = Outcome::Conflict {
        code,
        holder: &holder,
    };
    VoucherPlan {
        status: status::desired(outcome, seen.generation, seen.now, seen.previous),
        phase: Phase::Conflict,
        audited: if begins {
            vec![AuditKind::Conflict]
        } else {
            Vec::new()
        },
        events,
        audit_conflict: begins.then_some(holder.clone()),
        next: Next::After(seen.resync),
    }
}

/// The row as synced: its audit records' Events, a phase reached without
/// one, and a look again just after the next time boundary.
fn applied(
    record: &CodeRecord,
    phase: Phase,
    changed: &[TermField],
    audited: Vec<AuditKind>,
    seen: &VoucherSeen<'_>,
) -> VoucherPlan {
    let actor = Actor::from(seen.owner);
    let facts = Facts {
        changed,
        grant: Some(seen.grant),
        ..Facts::new(&record.code, &actor)
    };
    let mut events: Vec<EventWording> = audited
        .iter()
        .filter_map(|kind| kind.wording(&facts).event)
        .collect();
    let before = seen.previous.and_then(|p| p.phase);
    events.extend(phase_change(before, phase, record, &audited));
    let now = seen.now;
    let until_boundary = record
        .terms
        .next_boundary(now)
        .and_then(|at| (at - now).to_std().ok())
        .map(|d| d + AFTER_BOUNDARY);
    VoucherPlan {
        status: status::desired(
            Outcome::Synced { record, phase },
            seen.generation,
            now,
            seen.previous,
        ),
        phase,
        audit_conflict: None,
        audited,
        events,
        next: Next::After(until_boundary.map_or(seen.resync, |d| d.min(seen.resync))),
    }
}

/// The Event of a phase the row reached without an audit record of the
/// reconcile saying so: the cap reached by redemptions at checkout, or a
/// code that can be redeemed again (a raised cap, a moved window). Once, on
/// the reconcile that sees the change.
fn phase_change(
    before: Option<Phase>,
    now: Phase,
    record: &CodeRecord,
    audited: &[AuditKind],
) -> Option<EventWording> {
    let before = before?;
    let code = &record.code;
    match (before, now) {
        (Phase::Exhausted, Phase::Exhausted) => None,
        (_, Phase::Exhausted) => Some(EventWording {
            severity: Severity::Normal,
            reason: "Exhausted",
            note: format!(
                "code {code} reached its cap of {} redemptions; raise spec.maxRedemptions to \
                 accept more",
                record.terms.max_redemptions
            ),
        }),
        (Phase::Exhausted | Phase::Expired, Phase::Active)
            if !audited.contains(&AuditKind::Activated) =>
        {
            Some(EventWording {
                severity: Severity::Normal,
                reason: "Reactivated",
                note: format!("code {code} can be redeemed again"),
            })
        }
        _ => None,
    }
}

/// The reason of the Ready condition the resource last showed.
fn ready_reason(previous: Option<&VoucherStatus>) -> Option<&str> {
    previous?
        .conditions
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| c.reason.as_str())
}

/// A resource that waits for a person to change it: nothing written,
/// Stalled, and a Warning when it begins (not on every look).
fn refused(
    phase: Phase,
    reason: &'static str,
    message: String,
    seen: &VoucherSeen<'_>,
) -> VoucherPlan {
    let begins = ready_reason(seen.previous) != Some(reason);
    let events = begins
        .then(|| EventWording {
            severity: Severity::Warning,
            reason,
            note: message.clone(),
        })
        .into_iter()
        .collect();
    let outcome = Outcome::Failed {
        phase,
        reason,
        message,
        retrying: false,
    };
    VoucherPlan {
        status: status::desired(outcome, seen.generation, seen.now, seen.previous),
        phase,
        audit_conflict: None,
        audited: Vec::new(),
        events,
        next: Next::AwaitChange,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::conditions::RECONCILING;
    use crate::domain::{Claim, CodeRecord, TermField, Terms};

    const RESYNC: Duration = Duration::from_secs(300);

    fn owner(name: &str) -> Owner {
        Owner {
            namespace: "billing".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }
    }

    fn record(terms: Terms) -> CodeRecord {
        CodeRecord {
            global_gone: None,
            once_anywhere: false,
            code: "LAUNCH".into(),
            terms,
            times_redeemed: 0,
            created_at: Utc::now(),
            deleted_at: None,
            campaign_on: None,
            suspended: false,
        }
    }

    fn terms() -> Terms {
        Terms::granting(5)
    }

    fn applied(record: CodeRecord, audited: Vec<AuditKind>) -> VoucherFound {
        VoucherFound::Synced(Synced::Applied {
            claim: Claim::Create,
            phase: Phase::of(&record, Utc::now()),
            record,
            changed: vec![TermField::CreditOmr],
            audited,
        })
    }

    fn decide_for(found: VoucherFound, previous: Option<&VoucherStatus>) -> VoucherPlan {
        let code = Code::parse("LAUNCH").unwrap();
        let me = owner("launch");
        decide(
            found,
            VoucherSeen {
                code: Some(&code),
                owner: &me,
                generation: 2,
                previous,
                now: Utc::now(),
                resync: RESYNC,
                grant: "5 OMR",
                differs: &[],
            },
        )
    }

    fn reasons(plan: &VoucherPlan) -> Vec<(Severity, &str)> {
        plan.events.iter().map(|e| (e.severity, e.reason)).collect()
    }

    #[test]
    fn exhaustion_and_reactivation_are_reported_once_each() {
        let capped = |times_redeemed| CodeRecord {
            times_redeemed,
            ..record(Terms {
                max_redemptions: 3,
                ..terms()
            })
        };
        let seen_as = |phase| VoucherStatus {
            phase: Some(phase),
            ..Default::default()
        };
        // The last redemption at checkout: the next reconcile says so, once.
        let plan = decide_for(applied(capped(3), vec![]), Some(&seen_as(Phase::Active)));
        assert_eq!(
            (plan.phase, reasons(&plan)),
            (Phase::Exhausted, vec![(Severity::Normal, "Exhausted")])
        );
        assert!(plan.events[0].note.contains("cap of 3"));
        let again = decide_for(applied(capped(3), vec![]), Some(&seen_as(Phase::Exhausted)));
        assert!(again.events.is_empty());
        // The cap raised: redeemable again.
        let raised = decide_for(applied(capped(2), vec![]), Some(&seen_as(Phase::Exhausted)));
        assert_eq!(
            (raised.phase, reasons(&raised)),
            (Phase::Active, vec![(Severity::Normal, "Reactivated")])
        );
        // An activation says it by its own Event.
        let activated = decide_for(
            applied(capped(2), vec![AuditKind::Activated]),
            Some(&seen_as(Phase::Exhausted)),
        );
        assert_eq!(reasons(&activated), [(Severity::Normal, "Activated")]);
    }

    #[test]
    fn each_committed_audit_record_is_reported_by_an_event() {
        let plan = decide_for(
            applied(
                record(terms()),
                vec![AuditKind::Created, AuditKind::Updated],
            ),
            None,
        );
        assert_eq!(plan.audited, [AuditKind::Created, AuditKind::Updated]);
        assert_eq!(
            reasons(&plan),
            [(Severity::Normal, "Created"), (Severity::Normal, "Updated")]
        );
        assert_eq!(plan.events[1].note, "updated credit_omr of code LAUNCH");
        assert_eq!(plan.audit_conflict, None);
        assert_eq!(
            (plan.phase, plan.next),
            (Phase::Active, Next::After(RESYNC))
        );
        assert_eq!(plan.status.observed_generation, Some(2));
    }

    #[test]
    fn a_time_boundary_brings_the_next_reconcile_forward() {
        let soon = Utc::now() + chrono::Duration::seconds(10);
        let plan = decide_for(
            applied(
                record(Terms {
                    valid_from: Some(soon),
                    ..terms()
                }),
                vec![],
            ),
            None,
        );
        assert_eq!(plan.phase, Phase::Scheduled);
        let Next::After(after) = plan.next else {
            panic!("{:?}", plan.next)
        };
        assert!(
            after > Duration::from_secs(9) && after <= Duration::from_secs(10) + AFTER_BOUNDARY,
            "{after:?}"
        );
        let far = Utc::now() + chrono::Duration::days(30);
        let plan = decide_for(
            applied(
                record(Terms {
                    expires_at: Some(far),
                    ..terms()
                }),
                vec![],
            ),
            None,
        );
        assert_eq!(plan.next, Next::After(RESYNC), "never later than a resync");
    }

    #[test]
    fn a_conflict_is_audited_and_reported_once_per_episode() {
        let holder = owner("first");
        let conflict = || {
            VoucherFound::Synced(Synced::Conflict {
                owner: holder.clone(),
            })
        };
        let first = decide_for(conflict(), None);
        assert_eq!(first.audit_conflict, Some(holder.clone()));
        assert_eq!(first.audited, [AuditKind::Conflict]);
        assert_eq!(reasons(&first), [(Severity::Warning, "CodeConflict")]);
        assert!(first.events[0].note.contains("billing/first"));
        assert_eq!(first.phase, Phase::Conflict);

        let again = decide_for(conflict(), Some(&first.status));
        assert_eq!(again.audit_conflict, None);
        assert!(again.audited.is_empty() && again.events.is_empty());
        assert_eq!(again.next, Next::After(RESYNC));
    }

    #[test]
    fn an_invalid_code_waits_for_a_person() {
        let plan = decide_for(VoucherFound::InvalidCode(CodeError::Empty), None);
        assert_eq!((plan.phase, plan.next), (Phase::Error, Next::AwaitChange));
        assert_eq!(reasons(&plan), [(Severity::Warning, "InvalidCode")]);
        assert!(plan.events[0].note.contains("set spec.code"));
    }

    #[test]
    fn terms_outside_the_rules_are_refused_without_writing() {
        let plan = decide_for(
            VoucherFound::InvalidTerms(TermError::CreditTooSmall(0)),
            None,
        );
        assert_eq!((plan.phase, plan.next), (Phase::Error, Next::AwaitChange));
        assert_eq!(reasons(&plan), [(Severity::Warning, "InvalidTerms")]);
        assert!(plan.events[0].note.contains("at least 1 OMR"));
        assert!(plan.audited.is_empty() && plan.audit_conflict.is_none());
    }

    #[test]
    fn an_unreachable_database_is_retried_and_keeps_the_counters() {
        let synced = decide_for(applied(record(terms()), vec![]), None);
        let plan = decide_for(
            VoucherFound::DatabaseUnavailable("connection refused".into()),
            Some(&synced.status),
        );
        assert_eq!((plan.phase, plan.next), (Phase::Error, Next::Retry));
        assert!(plan.events.is_empty() && plan.audited.is_empty());
        assert_eq!(plan.status.times_redeemed, synced.status.times_redeemed);
        assert!(
            plan.status
                .conditions
                .iter()
                .any(|c| c.type_ == RECONCILING && c.message.contains("connection refused"))
        );
    }

    #[test]
    fn a_status_write_asking_to_wait_shortens_only() {
        let five = Duration::from_secs(5);
        assert_eq!(Next::After(RESYNC).at_most(Some(five)), Next::After(five));
        assert_eq!(Next::After(five).at_most(Some(RESYNC)), Next::After(five));
        assert_eq!(Next::AwaitChange.at_most(Some(five)), Next::After(five));
        assert_eq!(Next::Retry.at_most(Some(five)), Next::Retry);
        assert_eq!(Next::AwaitChange.at_most(None), Next::AwaitChange);
    }
}
