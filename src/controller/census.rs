//! What the caches hold, counted for the metrics the alerts and the dashboard
//! read: resources stalled, the oldest successful reconcile, how near each
//! capped Voucher and each campaign is to its cap, campaign codes still to
//! generate and campaigns by phase. Counted purely from the cached objects
//! ([`of_vouchers`], [`of_campaigns`]); a thin task per kind ([`run`]) sets
//! the gauges every [`EVERY`]. A gauge per Voucher or campaign (never per
//! code or customer): their number bounds the series.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use super::conditions::STALLED;
use super::metrics::{KindLabel, Metrics, PhaseLabel};
use super::runtime::Backoff;
use crate::api::Voucher;
use crate::api::campaign::VoucherCampaign;
use crate::domain::campaign::CampaignPhase;

/// How often the gauges are counted again: well inside a scrape interval's
/// multiple, cheap (one pass over the cache).
pub(crate) const EVERY: Duration = Duration::from_secs(15);

/// One Voucher or campaign, as a label set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ObjectLabel {
    pub namespace: String,
    pub name: String,
}

/// How much of a cap is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Cap {
    pub object: ObjectLabel,
    pub used: i64,
    pub max: i64,
}

/// What one pass over a kind's cache counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Census {
    /// Resources whose `Stalled` condition is True: a person must act.
    pub stalled: i64,
    pub caps: Vec<Cap>,
    /// Campaigns only: codes wanted (`spec.count`) and not generated yet.
    pub pending_codes: i64,
    /// Campaigns only: how many are in each phase.
    pub phases: Vec<(&'static str, i64)>,
}

fn is_stalled(conditions: &[Condition]) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == STALLED && c.status == "True")
}

fn label(object: &impl ResourceExt) -> ObjectLabel {
    ObjectLabel {
        namespace: object.namespace().unwrap_or_default(),
        name: object.name_any(),
    }
}

/// Vouchers: stalled ones, and the caps of those of more than one redemption
/// (a single-use code is meant to be used up).
pub(crate) fn of_vouchers(vouchers: &[Arc<Voucher>]) -> Census {
    let mut census = Census::default();
    for voucher in vouchers {
        let status = voucher.status.as_ref();
        if status.is_some_and(|s| is_stalled(&s.conditions)) {
            census.stalled += 1;
        }
        if voucher.spec.max_redemptions > 1 {
            census.caps.push(Cap {
                object: label(voucher.as_ref()),
                used: status.and_then(|s| s.times_redeemed).unwrap_or(0).into(),
                max: voucher.spec.max_redemptions.into(),
            });
        }
    }
    census
}

/// Campaigns: stalled ones, each one's redemptions against its total (codes
/// times redemptions per code), the codes still to generate, the phases.
pub(crate) fn of_campaigns(campaigns: &[Arc<VoucherCampaign>]) -> Census {
    let mut census = Census {
        phases: CampaignPhase::ALL.iter().map(|p| (p.as_str(), 0)).collect(),
        ..Census::default()
    };
    for campaign in campaigns {
        let status = campaign.status.as_ref();
        if status.is_some_and(|s| is_stalled(&s.conditions)) {
            census.stalled += 1;
        }
        let count = i64::from(campaign.spec.count);
        census.caps.push(Cap {
            object: label(campaign.as_ref()),
            used: status.and_then(|s| s.redeemed).unwrap_or(0),
            max: count * i64::from(campaign.spec.redemptions_per_code),
        });
        if campaign.metadata.deletion_timestamp.is_none() {
            let generated = status.and_then(|s| s.generated).unwrap_or(0);
            census.pending_codes += (count - i64::from(generated)).max(0);
        }
        if let Some(phase) = status.and_then(|s| s.phase)
            && let Some(entry) = census.phases.iter_mut().find(|(p, _)| *p == phase.as_str())
        {
            entry.1 += 1;
        }
    }
    census
}

/// The gauges of one kind's caps: used and maximum, per object.
pub(crate) struct CapGauges<'a> {
    pub used: &'a Family<ObjectLabel, Gauge>,
    pub max: &'a Family<ObjectLabel, Gauge>,
}

/// Counts `cache` every [`EVERY`] with `count` and sets the gauges of `kind`,
/// until `stop`. The oldest reconcile is the oldest of the cached objects'
/// last successful reconciles (`reconciled`; one never reconciled counts
/// from this task's start).
pub(crate) async fn run<K>(
    kind: &'static str,
    cache: Store<K>,
    count: fn(&[Arc<K>]) -> Census,
    reconciled: &Backoff<K>,
    metrics: &Metrics,
    caps: CapGauges<'_>,
    stop: CancellationToken,
) where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let started = Instant::now();
    let mut shown: HashSet<ObjectLabel> = HashSet::new();
    let kind_label = KindLabel { kind };
    loop {
        let objects = cache.state();
        let census = count(&objects);
        metrics
            .stalled
            .get_or_create(&kind_label)
            .set(census.stalled);
        let oldest = reconciled.oldest_success(
            objects.iter().map(|o| ObjectRef::from_obj(o.as_ref())),
            started,
        );
        metrics
            .reconcile_oldest_age
            .get_or_create(&kind_label)
            .set(oldest.as_secs_f64());
        let now: HashSet<ObjectLabel> = census.caps.iter().map(|c| c.object.clone()).collect();
        for gone in shown.difference(&now) {
            caps.used.remove(gone);
            caps.max.remove(gone);
        }
        for cap in &census.caps {
            caps.used.get_or_create(&cap.object).set(cap.used);
            caps.max.get_or_create(&cap.object).set(cap.max);
        }
        shown = now;
        if !census.phases.is_empty() {
            metrics.campaign_codes_pending.set(census.pending_codes);
            for (phase, n) in &census.phases {
                metrics
                    .campaigns
                    .get_or_create(&PhaseLabel { phase })
                    .set(*n);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn voucher(name: &str, max: i32, redeemed: Option<i32>, stalled: bool) -> Arc<Voucher> {
        let mut status = serde_json::json!({"conditions": []});
        if let Some(n) = redeemed {
            status["timesRedeemed"] = n.into();
        }
        if stalled {
            status["conditions"] = serde_json::json!([{"type": "Stalled", "status": "True",
                "reason": "CodeConflict", "message": "m", "lastTransitionTime": "2026-12-05T00:00:00Z"}]);
        }
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "catalyst.openova.io/v1alpha1", "kind": "Voucher",
                "metadata": {"name": name, "namespace": "billing"},
                "spec": {"creditOMR": 5, "maxRedemptions": max},
                "status": status,
            }))
            .unwrap(),
        )
    }

    fn campaign(
        name: &str,
        count: i32,
        generated: i32,
        redeemed: i64,
        phase: &str,
    ) -> Arc<VoucherCampaign> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "catalyst.openova.io/v1alpha1", "kind": "VoucherCampaign",
                "metadata": {"name": name, "namespace": "billing"},
                "spec": {"prefix": "BILL-", "count": count, "codeLength": 12, "creditOMR": 5,
                         "redemptionsPerCode": 2, "keySecretRef": {"name": "k"}},
                "status": {"generated": generated, "redeemed": redeemed, "phase": phase},
            }))
            .unwrap(),
        )
    }

    fn object(name: &str) -> ObjectLabel {
        ObjectLabel {
            namespace: "billing".into(),
            name: name.into(),
        }
    }

    #[test]
    fn each_rule_of_the_voucher_census() {
        let census = of_vouchers(&[
            voucher("capped", 200, Some(190), false),
            voucher("single-use", 1, Some(1), false),
            voucher("unlimited", 0, Some(5000), false),
            voucher("unseen", 10, None, true),
        ]);
        assert_eq!(census.stalled, 1, "the Stalled condition, True");
        assert_eq!(
            census.caps,
            [
                Cap {
                    object: object("capped"),
                    used: 190,
                    max: 200
                },
                // Not seen by the operator yet: nothing used.
                Cap {
                    object: object("unseen"),
                    used: 0,
                    max: 10
                },
            ],
            "a cap above one only: single-use codes are meant to be used up, 0 is no cap"
        );
        assert_eq!((census.pending_codes, census.phases.len()), (0, 0));
    }

    #[test]
    fn each_rule_of_the_campaign_census() {
        let census = of_campaigns(&[
            campaign("done", 100, 100, 150, "Active"),
            campaign("halfway", 1000, 400, 0, "Generating"),
        ]);
        assert_eq!(
            census.caps,
            [
                Cap {
                    object: object("done"),
                    used: 150,
                    max: 200
                },
                Cap {
                    object: object("halfway"),
                    used: 0,
                    max: 2000
                },
            ],
            "the total is codes times redemptions per code"
        );
        assert_eq!(
            census.pending_codes, 600,
            "the codes wanted and not generated"
        );
        let phase = |p: &str| census.phases.iter().find(|(q, _)| *q == p).unwrap().1;
        assert_eq!(
            (phase("Active"), phase("Generating"), phase("Stalled")),
            (1, 1, 0)
        );
        assert_eq!(
            census.phases.len(),
            CampaignPhase::ALL.len(),
            "every phase, 0 included"
        );
    }
}
