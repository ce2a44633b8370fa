//! What a campaign reconcile does, decided from what it found and nothing
//! else: the status (phase, progress, counters, conditions), the Event that
//! reports a change of reason, and when to look again. No code ever reaches
//! any of them: they name indices.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::api::campaign::VoucherCampaignStatus;
use crate::controller::conditions::{ConditionState, READY, RECONCILING, STALLED, condition};
use crate::domain::campaign::CampaignPhase;
use crate::domain::{EventWording, Issuers, Owner, Severity, TermError, Terms};
use crate::store::campaigns::Counts;

/// How soon a campaign stalled on its Secret looks again (Secrets are not
/// watched: that would need every Secret of the namespace).
pub(crate) const KEY_RETRY: Duration = Duration::from_secs(10);

/// What applying a campaign met.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum CampaignFound {
    /// Outside the issuer namespaces; nothing was written.
    Forbidden(Issuers),
    /// The terms break a voucher rule; nothing was written.
    InvalidTerms(TermError),
    /// The generator key cannot be had (why, in words), so generation waits
    /// with `generated` codes.
    KeyUnavailable { why: String, generated: u32 },
    /// Code `index` exists already; generation stopped with `generated` codes.
    Collision { index: u32, generated: u32 },
    /// The billing database could not be asked.
    DatabaseUnavailable(String),
    /// `generated` of the campaign's codes exist; with every code, its
    /// counters, and how soon to count again when they were not read now (a
    /// change of a code came sooner than the smallest interval between two).
    Progress {
        generated: u32,
        counts: Option<Counts>,
        recount: Option<Duration>,
    },
}

/// The campaign as the reconcile saw it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CampaignSeen<'a> {
    pub(crate) owner: &'a Owner,
    pub(crate) count: u32,
    pub(crate) terms: &'a Terms,
    pub(crate) generation: i64,
    pub(crate) previous: Option<&'a VoucherCampaignStatus>,
    pub(crate) now: DateTime<Utc>,
    pub(crate) resync: Duration,
    /// Suspended (the admin endpoint or the annotation).
    pub(crate) suspended: bool,
}

/// A reconcile's decisions.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CampaignPlan {
    pub(crate) status: VoucherCampaignStatus,
    pub(crate) events: Vec<EventWording>,
    /// When to look again; `None`: report the failure and back off.
    pub(crate) next: Option<Duration>,
}

/// What the status says, before it is written as conditions.
struct Verdict {
    phase: CampaignPhase,
    ready: ConditionState<'static>,
    /// The kstatus condition beside Ready (Stalled, Reconciling), true.
    beside: Option<&'static str>,
    generated: Option<u32>,
    counts: Option<Counts>,
    next: Option<Duration>,
}

impl Verdict {
    /// Not ready until a person changes something: Stalled beside it.
    fn stalled(
        phase: CampaignPhase,
        reason: &'static str,
        message: String,
        generated: Option<u32>,
        next: Duration,
    ) -> Self {
        Self {
            phase,
            ready: not_ready(reason, message),
            beside: Some(STALLED),
            generated,
            counts: None,
            next: Some(next),
        }
    }
}

fn not_ready(reason: &'static str, message: String) -> ConditionState<'static> {
    ConditionState {
        status: false,
        reason,
        message,
    }
}

/// Decides the status, Events and next look of a reconcile that met `found`.
pub(crate) fn decide(found: CampaignFound, seen: CampaignSeen<'_>) -> CampaignPlan {
    let CampaignSeen {
        owner,
        count,
        previous,
        resync,
        ..
    } = seen;
    let verdict = match found {
        CampaignFound::Forbidden(issuers) => Verdict::stalled(
            CampaignPhase::Forbidden,
            "NotAnIssuerNamespace",
            format!(
                "namespace {} may not issue vouchers (issuer namespaces: {}); nothing was \
                 written. To allow it, add it to the controller's --issuer-namespaces (chart \
                 value controller.issuerNamespaces)",
                owner.namespace,
                issuers.list()
            ),
            None,
            resync,
        ),
        CampaignFound::InvalidTerms(error) => Verdict::stalled(
            CampaignPhase::Stalled,
            error.reason(),
            format!("the spec breaks a voucher rule: {error}; nothing was written"),
            None,
            resync,
        ),
        CampaignFound::KeyUnavailable { why, generated } => Verdict::stalled(
            CampaignPhase::Stalled,
            "KeyUnavailable",
            format!("{why}; no new code is written until then"),
            Some(generated),
            KEY_RETRY,
        ),
        CampaignFound::Collision { index, generated } => Verdict::stalled(
            CampaignPhase::Stalled,
            "CodeCollision",
            format!(
                "code number {index} of this campaign exists already in the billing database \
                 (issued by someone else, revoked earlier, or an earlier code of this \
                 campaign); it was not overwritten and generation stopped at {generated} of \
                 {count} codes. Delete and re-create the campaign under another name, or \
                 with a longer spec.codeLength; the codes issued so far stay valid"
            ),
            Some(generated),
            resync,
        ),
        CampaignFound::DatabaseUnavailable(error) => Verdict {
            phase: CampaignPhase::Error,
            ready: not_ready(
                "DatabaseUnavailable",
                format!("cannot reach the billing database: {error}"),
            ),
            beside: Some(RECONCILING),
            generated: previous.and_then(|p| p.generated).map(|g| g as u32),
            counts: None,
            next: None,
        },
        CampaignFound::Progress { generated, .. } if generated < count => Verdict {
            phase: CampaignPhase::Generating,
            ready: not_ready(
                "Generating",
                format!("generated {generated} of {count} codes"),
            ),
            beside: Some(RECONCILING),
            generated: Some(generated),
            counts: None,
            next: Some(Duration::ZERO),
        },
        CampaignFound::Progress {
            generated,
            counts,
            recount,
        } => settled(generated, counts, recount, &seen),
    };
    plan(verdict, &seen)
}

/// The verdict on a campaign whose every code exists.
fn settled(
    generated: u32,
    counts: Option<Counts>,
    recount: Option<Duration>,
    seen: &CampaignSeen<'_>,
) -> Verdict {
    let (terms, now, owner) = (seen.terms, seen.now, seen.owner);
    let phase = match seen.suspended {
        true => CampaignPhase::Suspended,
        false => settled_phase(terms, now),
    };
    // A time boundary ahead changes the phase: look again just after it.
    let boundary = [terms.valid_from, terms.expires_at]
        .into_iter()
        .flatten()
        .filter(|t| *t > now)
        .min()
        .and_then(|t| (t - now).to_std().ok())
        .map(|d| d + Duration::from_millis(50));
    let message = match phase {
        CampaignPhase::Inactive => {
            format!("all {generated} codes exist and are switched off (spec.active is false)")
        }
        CampaignPhase::Scheduled => format!(
            "all {generated} codes exist and become redeemable at {}",
            terms.valid_from.map(|t| t.to_rfc3339()).unwrap_or_default()
        ),
        CampaignPhase::Expired => format!(
            "all {generated} codes exist and expired at {}",
            terms.expires_at.map(|t| t.to_rfc3339()).unwrap_or_default()
        ),
        CampaignPhase::Suspended => format!(
            "all {generated} codes exist and are suspended: none can be redeemed, whatever the \
             spec says, until the suspension is lifted (DELETE \
             /billing/vouchers/suspend/campaigns/{}/{}, or the annotation \
             catalyst.openova.io/suspended removed, as it was set)",
            owner.namespace, owner.name
        ),
        _ => format!("all {generated} codes exist and are redeemable"),
    };
    Verdict {
        phase,
        ready: ConditionState {
            status: true,
            reason: match phase {
                CampaignPhase::Active => "Reconciled",
                other => other.as_str(),
            },
            message,
        },
        beside: None,
        generated: Some(generated),
        counts,
        next: Some(
            [boundary, recount]
                .into_iter()
                .flatten()
                .fold(seen.resync, Duration::min),
        ),
    }
}

/// The phase of a campaign whose every code exists.
fn settled_phase(terms: &Terms, now: DateTime<Utc>) -> CampaignPhase {
    if !terms.active {
        CampaignPhase::Inactive
    } else if terms.valid_from.is_some_and(|t| now < t) {
        CampaignPhase::Scheduled
    } else if terms.expires_at.is_some_and(|t| now >= t) {
        CampaignPhase::Expired
    } else {
        CampaignPhase::Active
    }
}

/// The status and Event of `verdict`: counters the reconcile did not read
/// stay as last written; an Event only when Ready's reason changes (not for
/// each slice of progress).
fn plan(verdict: Verdict, seen: &CampaignSeen<'_>) -> CampaignPlan {
    let previous = seen.previous;
    let before = previous.map_or(&[][..], |p| p.conditions.as_slice());
    let condition = |type_, wanted| condition(type_, wanted, seen.generation, seen.now, before);
    let Verdict {
        phase,
        ready,
        beside,
        generated,
        counts,
        next,
    } = verdict;
    let previous_reason = before
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| c.reason.as_str());
    let status = VoucherCampaignStatus {
        observed_generation: Some(seen.generation),
        phase: Some(phase),
        generated: generated.map(|g| i32::try_from(g).unwrap_or(i32::MAX)),
        redeemed: counts
            .map(|c| c.redeemed)
            .or_else(|| previous.and_then(|p| p.redeemed)),
        exhausted_codes: counts
            .map(|c| i32::try_from(c.exhausted).unwrap_or(i32::MAX))
            .or_else(|| previous.and_then(|p| p.exhausted_codes)),
        // What the spec grants, said by the reconcile (it knows the currency).
        grant: None,
        conditions: [
            Some(condition(READY, ready.clone())),
            beside.map(|type_| condition(type_, ready.clone().made_true())),
        ]
        .into_iter()
        .flatten()
        .collect(),
        last_synced_at: previous.and_then(|p| p.last_synced_at),
    };
    let events = (previous_reason != Some(ready.reason))
        .then(|| EventWording {
            severity: if beside == Some(STALLED) {
                Severity::Warning
            } else {
                Severity::Normal
            },
            reason: match ready.reason {
                "Reconciled" => "Generated",
                other => other,
            },
            note: ready.message,
        })
        .into_iter()
        .collect();
    CampaignPlan {
        status,
        events,
        next,
    }
}

/// How long counters that took `took` to aggregate wait before the next
/// read: `--status-min-interval`, or ten times the query (a million codes
/// take about a second), so that counting takes at most a tenth of a
/// Postgres core however hot the campaign.
pub(crate) fn recount_after(min_interval: Duration, took: Duration) -> Duration {
    min_interval.max(took * 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner {
            namespace: "billing".into(),
            name: "bill-2027".into(),
            uid: "u-1".into(),
        }
    }

    fn seen<'a>(
        owner: &'a Owner,
        terms: &'a Terms,
        previous: Option<&'a VoucherCampaignStatus>,
    ) -> CampaignSeen<'a> {
        CampaignSeen {
            owner,
            count: 2000,
            terms,
            generation: 3,
            previous,
            now: Utc::now(),
            resync: Duration::from_secs(300),
            suspended: false,
        }
    }

    fn ready(status: &VoucherCampaignStatus) -> (String, String) {
        let c = status.conditions.iter().find(|c| c.type_ == READY).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn a_campaign_generating_reports_progress_and_comes_back_at_once() {
        let (owner, terms) = (owner(), Terms::granting(5));
        let found = CampaignFound::Progress {
            generated: 500,
            counts: None,
            recount: None,
        };
        let plan = decide(found, seen(&owner, &terms, None));
        assert_eq!(plan.status.phase, Some(CampaignPhase::Generating));
        assert_eq!(plan.status.generated, Some(500));
        assert_eq!(plan.next, Some(Duration::ZERO));
        let reconciling = plan
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == RECONCILING)
            .unwrap();
        assert_eq!(reconciling.message, "generated 500 of 2000 codes");
        // The Event says generation began; the next slice says nothing new.
        assert_eq!(plan.events.len(), 1);
        let again = decide(
            CampaignFound::Progress {
                generated: 1000,
                counts: None,
                recount: None,
            },
            seen(&owner, &terms, Some(&plan.status)),
        );
        assert!(again.events.is_empty());
    }

    #[test]
    fn a_complete_campaign_is_ready_with_its_counters() {
        let (owner, terms) = (owner(), Terms::granting(5));
        let counts = Counts {
            codes: 2000,
            redeemed: 7,
            exhausted: 6,
        };
        let found = CampaignFound::Progress {
            generated: 2000,
            counts: Some(counts),
            recount: None,
        };
        let plan = decide(found, seen(&owner, &terms, None));
        assert_eq!(plan.status.phase, Some(CampaignPhase::Active));
        assert_eq!(ready(&plan.status), ("True".into(), "Reconciled".into()));
        assert_eq!(
            (plan.status.redeemed, plan.status.exhausted_codes),
            (Some(7), Some(6))
        );
        assert_eq!(plan.status.conditions.len(), 1, "no Stalled or Reconciling");
        let inactive = Terms {
            active: false,
            ..terms
        };
        let plan = decide(
            CampaignFound::Progress {
                generated: 2000,
                counts: Some(counts),
                recount: Some(Duration::from_millis(300)),
            },
            seen(&owner, &inactive, None),
        );
        assert_eq!(plan.status.phase, Some(CampaignPhase::Inactive));
        assert_eq!(
            plan.next,
            Some(Duration::from_millis(300)),
            "counters read too recently are read again once allowed"
        );
    }

    #[test]
    fn a_collision_stalls_naming_the_index_never_the_code() {
        let (owner, terms) = (owner(), Terms::granting(5));
        let plan = decide(
            CampaignFound::Collision {
                index: 1234,
                generated: 1000,
            },
            seen(&owner, &terms, None),
        );
        assert_eq!(plan.status.phase, Some(CampaignPhase::Stalled));
        assert_eq!(
            ready(&plan.status),
            ("False".into(), "CodeCollision".into())
        );
        let stalled = plan
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == STALLED)
            .unwrap();
        assert!(
            stalled.message.contains("code number 1234"),
            "{}",
            stalled.message
        );
        assert_eq!(plan.events[0].severity, Severity::Warning);
        assert_eq!(plan.status.generated, Some(1000));
    }

    #[test]
    fn counting_a_large_campaign_takes_a_tenth_of_the_time_at_most() {
        let min = Duration::from_secs(2);
        assert_eq!(recount_after(min, Duration::from_millis(5)), min);
        assert_eq!(
            recount_after(min, Duration::from_millis(900)),
            Duration::from_secs(9)
        );
    }

    #[test]
    fn a_missing_key_is_looked_for_again_soon() {
        let (owner, terms) = (owner(), Terms::granting(5));
        let plan = decide(
            CampaignFound::KeyUnavailable {
                why: "the Secret billing/k does not exist".into(),
                generated: 0,
            },
            seen(&owner, &terms, None),
        );
        assert_eq!(plan.next, Some(KEY_RETRY));
        assert_eq!(ready(&plan.status).1, "KeyUnavailable");
    }

    #[test]
    fn a_database_failure_is_retried_with_the_counters_kept() {
        let (owner, terms) = (owner(), Terms::granting(5));
        let previous = VoucherCampaignStatus {
            generated: Some(2000),
            redeemed: Some(9),
            ..Default::default()
        };
        let plan = decide(
            CampaignFound::DatabaseUnavailable("refused".into()),
            seen(&owner, &terms, Some(&previous)),
        );
        assert_eq!(plan.next, None);
        assert_eq!(
            (plan.status.generated, plan.status.redeemed),
            (Some(2000), Some(9))
        );
    }
}
