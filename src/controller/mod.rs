//! The controller role: reconciles every `Voucher` into its `promo_codes` row
//! and every `VoucherCampaign` into its codes' rows, keeping each `.status`
//! live, and relays the audit outbox to NATS.
//!
//! kube-runtime drives each kind (watch, queue, retries) through the pair it
//! calls, `reconcile` and `error_policy`, with the one [`Context`] both share.
//! Each kind has its room: `voucher/` and `campaign/`, a pure `plan` (what to
//! write, from what was found) beside a `reconcile` that gathers the facts
//! and carries the plan out. What both use is in `runtime`.

pub mod campaign;
mod census;
pub(crate) mod conditions;
mod error;
pub mod leader;
pub mod metrics;
mod runtime;
pub mod voucher;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::Recorder;
use tokio_util::sync::CancellationToken;

use crate::domain::{AuditKind, EventWording, Issuers};
use crate::relay::{RelayMetrics, RelaySettings};
use crate::store::Store;
pub use error::Error;
use metrics::{KindLabel, Metrics};
pub(crate) use runtime::check_api;
pub(crate) use runtime::owner;
pub(crate) use runtime::patch_status;
pub use runtime::suspended_by_annotation;

/// How the controller behaves.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The Sovereign's currency and charge categories (a discount names only those).
    pub billing: crate::domain::Billing,
    /// Every resource is compared with its rows at least this often.
    pub resync_interval: Duration,
    /// Smallest interval between two status writes of one resource when
    /// only the counters (not the spec) changed.
    pub status_min_interval: Duration,
    /// Watch one namespace, or all.
    pub namespace: Option<String>,
    /// Name of this replica in Events.
    pub identity: String,
    /// Reconciles running at once, per kind.
    pub concurrency: u16,
    /// Namespaces whose resources may claim codes.
    pub issuers: Issuers,
    /// Namespace of the campaigns' generator-key Secrets, the only one whose
    /// Secrets the controller reads.
    pub key_namespace: String,
    /// The namespace of the vendor's `scope: Global` Vouchers, and only theirs.
    pub global_namespace: String,
    /// The vendor's hub, when this Sovereign offers global vouchers.
    pub joined: Option<crate::federation::Joined>,
}

/// The namespace of campaigns' generator-key Secrets, unless told otherwise.
pub const DEFAULT_KEY_NAMESPACE: &str = "voucher-campaign-keys";

impl Default for Settings {
    /// The defaults of the controller's flags (`voucher-operator controller --help`).
    fn default() -> Self {
        Self {
            billing: crate::domain::Billing::default(),
            resync_interval: Duration::from_secs(5 * 60),
            status_min_interval: Duration::from_secs(2),
            namespace: None,
            // The host name and process id: unique among replicas.
            identity: {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "voucher-operator".into());
                format!("{host}-{}", std::process::id())
            },
            concurrency: 8,
            issuers: Issuers::new(["default"]),
            key_namespace: DEFAULT_KEY_NAMESPACE.to_owned(),
            global_namespace: crate::federation::DEFAULT_GLOBAL_NAMESPACE.to_owned(),
            joined: None,
        }
    }
}

/// What every reconcile of either kind shares.
pub struct Context {
    pub client: kube::Client,
    pub store: Store,
    pub(crate) recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    vouchers: voucher::VoucherMemory,
    campaigns: campaign::CampaignMemory,
}

impl Context {
    pub fn new(
        client: kube::Client,
        store: Store,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Arc<Self> {
        Arc::new(Self {
            recorder: runtime::recorder(&client, &settings.identity),
            client,
            store,
            metrics,
            settings,
            vouchers: voucher::VoucherMemory::default(),
            campaigns: campaign::CampaignMemory::default(),
        })
    }

    /// Publishes an Event regarding `regarding`, which may be gone already.
    async fn publish_on(&self, regarding: &ObjectReference, event: EventWording) {
        runtime::publish(&self.recorder, regarding, event).await;
    }

    /// Counts an audit record a reconcile caused: the one place that does.
    fn count_audit(&self, kind: AuditKind) {
        self.metrics
            .audit_records
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }
}

/// The controller role as one process runs it: both kinds' loops and the
/// audit relay, under a Lease when one is given.
pub struct Config {
    pub settings: Settings,
    /// `None` where no NATS exists (records then wait in the outbox).
    pub relay: Option<RelaySettings>,
    /// Lead through this Lease (only the leader works); `None`: always work.
    pub lease: Option<leader::LeaseSettings>,
}

/// The controller role: the reconcilers and the audit relay, which run
/// together (on the leader, when leader election is on).
pub struct Role {
    pub ctx: Arc<Context>,
    relay: Option<(RelaySettings, Arc<RelayMetrics>)>,
    lease: Option<leader::LeaseSettings>,
}

impl Role {
    /// The role's parts, their metrics registered in `registry`.
    pub fn new(
        client: kube::Client,
        store: Store,
        config: Config,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Self {
        let metrics = Arc::new(Metrics::register(registry));
        let relay_metrics = Arc::new(RelayMetrics::register(registry));
        Self {
            ctx: Context::new(client, store, metrics, config.settings),
            relay: config.relay.map(|settings| (settings, relay_metrics)),
            lease: config.lease,
        }
    }

    /// Runs the role until `stop`: while this replica leads, when a Lease
    /// is configured.
    pub async fn run(&self, stop: CancellationToken) -> anyhow::Result<()> {
        match &self.lease {
            Some(lease) => {
                leader::run_while_leader(self.ctx.client.clone(), lease.clone(), stop, |term| {
                    self.work(term)
                })
                .await
            }
            None => self.work(stop).await,
        }
    }

    /// The reconcilers and the relay, until `stop`.
    async fn work(&self, stop: CancellationToken) -> anyhow::Result<()> {
        let relay = async {
            let Some((settings, metrics)) = &self.relay else {
                return Ok(());
            };
            // Said when it happens, not at shutdown: until then audit events wait in the outbox.
            crate::relay::run(
                self.ctx.store.clone(),
                settings.clone(),
                metrics.clone(),
                stop.clone(),
            )
            .await
            .inspect_err(|e| tracing::error!(error = %e, "the audit relay stopped"))
        };
        // The leader keeps each global code's share topped up (and returns what is not offered).
        let allotments = async {
            if let Some(joined) = &self.ctx.settings.joined {
                crate::federation::sovereign::run(
                    self.ctx.store.clone(),
                    joined.client.clone(),
                    joined.refill.clone(),
                    joined.every,
                    stop.clone(),
                )
                .await;
            }
        };
        let metrics = &self.ctx.metrics;
        metrics
            .resync_interval
            .set(self.ctx.settings.resync_interval.as_secs_f64());
        metrics.leader.set(1);
        let (_, _, relayed, ()) = tokio::join!(
            voucher::run(self.ctx.clone(), stop.clone()),
            campaign::run(self.ctx.clone(), stop.clone()),
            relay,
            allotments
        );
        // Not leading any more, once this work ends.
        metrics.leader.set(0);
        relayed
    }
}
