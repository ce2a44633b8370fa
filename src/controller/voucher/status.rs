//! A Voucher's status, computed purely: phase, counters and kstatus conditions.

use chrono::{DateTime, Utc};

use crate::api::VoucherStatus;
use crate::controller::conditions::{
    CODE_CONFLICT, ConditionState, READY, RECONCILING, STALLED, SYNCED, condition,
};
use crate::domain::{CodeRecord, Owner, Phase};

/// What a reconcile found, for the status.
pub enum Outcome<'a> {
    Synced {
        record: &'a CodeRecord,
        phase: Phase,
    },
    Conflict {
        code: &'a str,
        holder: &'a Owner,
    },
    Failed {
        phase: Phase,
        reason: &'a str,
        message: String,
        /// The controller retries (a transient cause) rather than waiting for a change.
        retrying: bool,
    },
}

fn phase_message(record: &CodeRecord, phase: Phase) -> (&'static str, String) {
    let code = &record.code;
    let at = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339()).unwrap_or_default();
    let message = match phase {
        Phase::Active => format!("{code} is redeemable"),
        Phase::Inactive => format!("{code} is switched off (spec.active is false)"),
        Phase::Scheduled => format!(
            "{code} becomes redeemable at {}",
            at(record.terms.valid_from)
        ),
        Phase::Expired => format!("{code} expired at {}", at(record.terms.expires_at)),
        Phase::Exhausted => format!(
            "{code} reached its cap of {} redemptions",
            record.terms.max_redemptions
        ),
        Phase::Suspended => format!(
            "{code} is suspended: nobody can redeem it, whatever the spec says, until the \
             suspension is lifted (DELETE /billing/vouchers/suspend/{code}, or the \
             annotation catalyst.openova.io/suspended removed, as it was set)"
        ),
        Phase::Conflict | Phase::Forbidden | Phase::Revoked | Phase::Error => String::new(),
    };
    // Ready's reason names the phase that keeps a synced code from being redeemed.
    let reason = match phase {
        Phase::Active | Phase::Conflict | Phase::Forbidden | Phase::Revoked | Phase::Error => {
            "Reconciled"
        }
        waiting => waiting.as_str(),
    };
    (reason, message)
}

/// What the status says about an outcome, before the conditions are stamped.
struct Summary<'a> {
    phase: Phase,
    code: Option<String>,
    times_redeemed: Option<i32>,
    remaining: Option<i32>,
    ready: ConditionState<'a>,
    synced: ConditionState<'a>,
    /// The kstatus condition, if any, that accompanies Ready=False.
    progress: Option<&'static str>,
}

fn said<'a>(outcome: Outcome<'a>, previous: Option<&VoucherStatus>) -> Summary<'a> {
    match outcome {
        Outcome::Synced { record, phase } => {
            let (reason, message) = phase_message(record, phase);
            Summary {
                phase,
                code: Some(record.code.clone()),
                times_redeemed: Some(record.times_redeemed),
                remaining: record.remaining(),
                ready: ConditionState {
                    status: true,
                    reason,
                    message,
                },
                synced: ConditionState {
                    status: true,
                    reason: "Reconciled",
                    message: format!("the promo_codes row of {} matches the spec", record.code),
                },
                progress: None,
            }
        }
        Outcome::Conflict { code, holder } => {
            let unready = ConditionState {
                status: false,
                reason: CODE_CONFLICT,
                message: format!(
                    "code {code} is owned by Voucher {holder}; this resource changes nothing. Once that one is gone, the code is revoked or unowned and stays so until a Voucher asks for it (spec.reissue.revokedAt or spec.adopt)"
                ),
            };
            Summary {
                phase: Phase::Conflict,
                code: Some(code.to_owned()),
                times_redeemed: None,
                remaining: None,
                ready: unready.clone(),
                synced: unready,
                progress: Some(STALLED),
            }
        }
        Outcome::Failed {
            phase,
            reason,
            message,
            retrying,
        } => {
            // The counters last seen stay: a failure says nothing new about them.
            let unready = ConditionState {
                status: false,
                reason,
                message,
            };
            Summary {
                phase,
                code: previous.and_then(|p| p.code.clone()),
                times_redeemed: previous.and_then(|p| p.times_redeemed),
                remaining: previous.and_then(|p| p.remaining),
                ready: unready.clone(),
                synced: unready,
                progress: Some(if retrying { RECONCILING } else { STALLED }),
            }
        }
    }
}

/// The status for `outcome`. `lastSyncedAt` is carried over from `previous`;
/// the caller stamps it when it writes a changed status.
pub fn desired(
    outcome: Outcome<'_>,
    generation: i64,
    now: DateTime<Utc>,
    previous: Option<&VoucherStatus>,
) -> VoucherStatus {
    let said = said(outcome, previous);
    let before = previous.map_or(&[][..], |p| p.conditions.as_slice());
    let condition = |type_, wanted| condition(type_, wanted, generation, now, before);
    VoucherStatus {
        observed_generation: Some(generation),
        code: said.code,
        phase: Some(said.phase),
        times_redeemed: said.times_redeemed,
        remaining: said.remaining,
        // What the spec grants, said by the reconcile (it knows the currency).
        grant: None,
        conditions: [
            Some(condition(READY, said.ready.clone())),
            Some(condition(SYNCED, said.synced)),
            said.progress
                .map(|type_| condition(type_, said.ready.made_true())),
        ]
        .into_iter()
        .flatten()
        .collect(),
        last_synced_at: previous.and_then(|p| p.last_synced_at),
        // A global code's share, said by the reconcile (it reads the allotment).
        allotment: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::conditions::differs;
    use crate::domain::Terms;

    fn record(times: i32) -> CodeRecord {
        CodeRecord {
            global_gone: None,
            once_anywhere: false,
            code: "LAUNCH".into(),
            terms: Terms {
                max_redemptions: 10,
                ..Terms::granting(5)
            },
            times_redeemed: times,
            created_at: Utc::now(),
            deleted_at: None,
            campaign_on: None,
            suspended: false,
        }
    }

    #[test]
    fn synced_status_is_ready_with_counters() {
        let r = record(3);
        let s = desired(
            Outcome::Synced {
                record: &r,
                phase: Phase::Active,
            },
            2,
            Utc::now(),
            None,
        );
        assert_eq!(
            (s.times_redeemed, s.remaining, s.observed_generation),
            (Some(3), Some(7), Some(2))
        );
        let ready = &s.conditions[0];
        assert_eq!(
            (
                ready.type_.as_str(),
                ready.status.as_str(),
                ready.reason.as_str()
            ),
            (READY, "True", "Reconciled")
        );
    }

    #[test]
    fn unchanged_conditions_keep_their_transition_time() {
        let r = record(3);
        let early = Utc::now() - chrono::Duration::hours(1);
        let first = desired(
            Outcome::Synced {
                record: &r,
                phase: Phase::Active,
            },
            1,
            early,
            None,
        );
        let r4 = record(4);
        let second = desired(
            Outcome::Synced {
                record: &r4,
                phase: Phase::Active,
            },
            1,
            Utc::now(),
            Some(&first),
        );
        assert_eq!(
            first.conditions[0].last_transition_time,
            second.conditions[0].last_transition_time
        );
        assert!(differs(Some(&first), &second), "the counter changed");
        assert!(!differs(Some(&second), &second.clone()));
    }

    #[test]
    fn conflicts_are_not_ready() {
        let holder = Owner {
            namespace: "a".into(),
            name: "b".into(),
            uid: "u".into(),
        };
        let s = desired(
            Outcome::Conflict {
                code: "LAUNCH",
                holder: &holder,
            },
            1,
            Utc::now(),
            None,
        );
        assert_eq!(s.phase, Some(Phase::Conflict));
        assert_eq!(s.conditions[0].status, "False");
        assert_eq!(s.conditions[0].reason, "CodeConflict");
        assert!(s.conditions[0].message.contains("a/b"));
    }

    fn kstatus(s: &VoucherStatus) -> Vec<(&str, &str, &str)> {
        s.conditions
            .iter()
            .filter(|c| c.type_ == RECONCILING || c.type_ == STALLED)
            .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
            .collect()
    }

    #[test]
    fn kstatus_sees_stalled_and_reconciling_only_while_they_hold() {
        let holder = Owner {
            namespace: "a".into(),
            name: "b".into(),
            uid: "u".into(),
        };
        let conflict = desired(
            Outcome::Conflict {
                code: "LAUNCH",
                holder: &holder,
            },
            1,
            Utc::now(),
            None,
        );
        assert_eq!(kstatus(&conflict), [(STALLED, "True", "CodeConflict")]);
        let failed = |reason, retrying| {
            desired(
                Outcome::Failed {
                    phase: Phase::Error,
                    reason,
                    message: "m".into(),
                    retrying,
                },
                1,
                Utc::now(),
                Some(&conflict),
            )
        };
        assert_eq!(
            kstatus(&failed("InvalidCode", false)),
            [(STALLED, "True", "InvalidCode")]
        );
        assert_eq!(
            kstatus(&failed("DatabaseUnavailable", true)),
            [(RECONCILING, "True", "DatabaseUnavailable")]
        );
        let r = record(0);
        let synced = desired(
            Outcome::Synced {
                record: &r,
                phase: Phase::Active,
            },
            1,
            Utc::now(),
            Some(&conflict),
        );
        assert!(kstatus(&synced).is_empty(), "gone once resolved");
        assert!(differs(Some(&conflict), &synced));
    }
}
