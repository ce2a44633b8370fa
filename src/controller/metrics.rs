//! Prometheus metrics of the controller.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use std::sync::atomic::AtomicU64;

use super::census::ObjectLabel;
use crate::domain::Phase;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PhaseLabel {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabel {
    pub kind: &'static str,
}

pub struct Metrics {
    pub reconciles: Family<ResultLabel, Counter>,
    pub failures: Family<ReasonLabel, Counter>,
    pub duration: Histogram,
    pub(crate) vouchers: Family<PhaseLabel, Gauge>,
    pub status_patches: Counter,
    pub status_patches_suppressed: Counter,
    pub(crate) audit_records: Family<KindLabel, Counter>,
    pub(crate) campaign_reconciles: Family<ResultLabel, Counter>,
    pub(crate) campaign_codes_generated: Counter,
    /// 1 while this replica leads (or runs without a Lease).
    pub(crate) leader: Gauge,
    /// From the census (census.rs), by kind: resources Stalled, and the age of
    /// the oldest last successful reconcile.
    pub(crate) stalled: Family<KindLabel, Gauge>,
    pub(crate) reconcile_oldest_age: Family<KindLabel, Gauge<f64, AtomicU64>>,
    pub(crate) resync_interval: Gauge<f64, AtomicU64>,
    pub(crate) voucher_redemptions: Family<ObjectLabel, Gauge>,
    pub(crate) voucher_max_redemptions: Family<ObjectLabel, Gauge>,
    pub(crate) campaign_redemptions: Family<ObjectLabel, Gauge>,
    pub(crate) campaign_max_redemptions: Family<ObjectLabel, Gauge>,
    pub(crate) campaign_codes_pending: Gauge,
    pub(crate) campaigns: Family<PhaseLabel, Gauge>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            reconciles: Family::default(),
            failures: Family::default(),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            vouchers: Family::default(),
            status_patches: Counter::default(),
            status_patches_suppressed: Counter::default(),
            audit_records: Family::default(),
            campaign_reconciles: Family::default(),
            campaign_codes_generated: Counter::default(),
            leader: Gauge::default(),
            stalled: Family::default(),
            reconcile_oldest_age: Family::default(),
            resync_interval: Gauge::default(),
            voucher_redemptions: Family::default(),
            voucher_max_redemptions: Family::default(),
            campaign_redemptions: Family::default(),
            campaign_max_redemptions: Family::default(),
            campaign_codes_pending: Gauge::default(),
            campaigns: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("voucher_operator");
        r.register(
            "reconciles",
            "Reconciles by result (ok, error)",
            metrics.reconciles.clone(),
        );
        r.register(
            "reconcile_failures",
            "Failed reconciles by reason",
            metrics.failures.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            metrics.duration.clone(),
        );
        r.register(
            "vouchers",
            "Vouchers by phase, as last reconciled",
            metrics.vouchers.clone(),
        );
        r.register(
            "status_patches",
            "Status patches sent to the API server",
            metrics.status_patches.clone(),
        );
        r.register(
            "status_patches_suppressed",
            "Status patches deferred by the per-voucher rate limit",
            metrics.status_patches_suppressed.clone(),
        );
        r.register(
            "controller_audit_records",
            "Audit records written by the controller, by kind",
            metrics.audit_records.clone(),
        );
        r.register(
            "campaign_reconciles",
            "VoucherCampaign reconciles by result (ok, error)",
            metrics.campaign_reconciles.clone(),
        );
        r.register(
            "campaign_codes_generated",
            "Campaign codes written to the billing database",
            metrics.campaign_codes_generated.clone(),
        );
        r.register(
            "leader",
            "1 while this controller replica leads (holds the Lease, or runs without one)",
            metrics.leader.clone(),
        );
        r.register(
            "stalled",
            "Resources whose Stalled condition is True (a person must act), by kind",
            metrics.stalled.clone(),
        );
        r.register(
            "reconcile_oldest_age_seconds",
            "Age of the oldest last successful reconcile among the cached resources, by kind",
            metrics.reconcile_oldest_age.clone(),
        );
        r.register(
            "resync_interval_seconds",
            "How often every resource is reconciled at the latest (--resync-interval)",
            metrics.resync_interval.clone(),
        );
        r.register(
            "voucher_redemptions",
            "Redemptions of each Voucher of more than one (a series per Voucher, never per code)",
            metrics.voucher_redemptions.clone(),
        );
        r.register(
            "voucher_max_redemptions",
            "The cap (maxRedemptions) of each Voucher of more than one redemption",
            metrics.voucher_max_redemptions.clone(),
        );
        r.register(
            "campaign_redemptions",
            "Redemptions of all the codes of each VoucherCampaign",
            metrics.campaign_redemptions.clone(),
        );
        r.register(
            "campaign_max_redemptions",
            "The total of each VoucherCampaign: count times redemptionsPerCode",
            metrics.campaign_max_redemptions.clone(),
        );
        r.register(
            "campaign_codes_pending",
            "Campaign codes wanted (spec.count) and not generated yet, all campaigns",
            metrics.campaign_codes_pending.clone(),
        );
        r.register(
            "campaigns",
            "VoucherCampaigns by phase",
            metrics.campaigns.clone(),
        );
        // Every label value at 0 from the start: a rate() over them works before the first event.
        for reason in super::Error::CATEGORIES {
            metrics
                .failures
                .get_or_create(&ReasonLabel { reason })
                .inc_by(0);
        }
        for phase in Phase::ALL {
            metrics
                .vouchers
                .get_or_create(&PhaseLabel {
                    phase: phase.as_str(),
                })
                .set(0);
        }
        metrics
    }
}
