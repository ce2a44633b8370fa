//! Prometheus metrics of the controller.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
