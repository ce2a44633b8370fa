//! The kstatus conditions both kinds write, and how a status is compared:
//! by what it says, never by its timestamps.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::VoucherStatus;
use crate::api::campaign::VoucherCampaignStatus;

pub(crate) const READY: &str = "Ready";
pub(crate) const SYNCED: &str = "Synced";
/// Ready's reason while another resource owns the code.
pub(crate) const CODE_CONFLICT: &str = "CodeConflict";
/// kstatus's abnormal-true conditions, which Flux's health checks read (they ignore Ready):
/// present only while true. Reconciling: the controller is still working on this generation
/// (retrying); Stalled: it cannot make progress until a person changes something.
pub(crate) const RECONCILING: &str = "Reconciling";
pub(crate) const STALLED: &str = "Stalled";

/// One condition's wanted state.
#[derive(Clone)]
pub(crate) struct ConditionState<'a> {
    pub(crate) status: bool,
    pub(crate) reason: &'a str,
    pub(crate) message: String,
}

impl ConditionState<'_> {
    /// The same reason and message on an abnormal-true condition.
    pub(crate) fn made_true(self) -> Self {
        Self {
            status: true,
            ..self
        }
    }
}

fn time(at: DateTime<Utc>) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(at.timestamp()).unwrap_or_default())
}

/// A condition, keeping its transition time when its status did not change
/// (`previous`: the conditions the resource has now).
pub(crate) fn condition(
    type_: &str,
    wanted: ConditionState<'_>,
    generation: i64,
    now: DateTime<Utc>,
    previous: &[Condition],
) -> Condition {
    let status = if wanted.status { "True" } else { "False" };
    let transition = previous
        .iter()
        .find(|c| c.type_ == type_)
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: wanted.reason.into(),
        message: wanted.message,
        observed_generation: Some(generation),
        last_transition_time: transition,
    }
}

/// A status written by the controller: conditions and a `lastSyncedAt`.
pub(crate) trait Reported: Clone + PartialEq {
    /// The parts that move with time alone, to be cleared for a comparison.
    fn clear_times(&mut self);
}

impl Reported for VoucherStatus {
    fn clear_times(&mut self) {
        self.last_synced_at = None;
        without_times(&mut self.conditions);
    }
}

impl Reported for VoucherCampaignStatus {
    fn clear_times(&mut self) {
        self.last_synced_at = None;
        without_times(&mut self.conditions);
    }
}

/// Clears what only moves with a condition's status (its transition time),
/// to compare conditions by what they say.
fn without_times(conditions: &mut [Condition]) {
    for c in conditions {
        c.last_transition_time = Time(Default::default());
    }
}

/// Whether writing `wanted` over `current` changes anything a person or a
/// health check reads. Timestamps alone do not count: `lastSyncedAt`, and a
/// condition's `lastTransitionTime`, which only moves with its status.
pub(crate) fn differs<S: Reported>(current: Option<&S>, wanted: &S) -> bool {
    let Some(current) = current else {
        return true;
    };
    let strip = |s: &S| {
        let mut s = s.clone();
        s.clear_times();
        s
    };
    strip(current) != strip(wanted)
}
