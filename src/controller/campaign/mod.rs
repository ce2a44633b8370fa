//! The campaign loop: every `VoucherCampaign` reconciled into its codes'
//! `promo_codes` rows, its `.status` kept live.
//!
//! `reconcile` gathers the facts (the Secret's key, the store's progress,
//! the aggregate counters) and carries out what `plan::decide` makes of
//! them; `generate` brings the codes to the spec in slices. No code ever
//! reaches a status, an Event, a log line or an error: they name indices.

mod generate;
mod plan;
mod reconcile;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use tokio_util::sync::CancellationToken;

use super::census;
use super::runtime::{self, Backoff};
use super::{Context, Error};
use crate::api::campaign::VoucherCampaign;
use crate::store::notify::Changed;
pub(crate) use generate::generator;

/// The finalizer that holds a campaign until its codes are revoked or orphaned.
pub const FINALIZER: &str = "catalyst.openova.io/campaign-cleanup";
/// The campaign CRD, whose deletion orphans instead of revoking.
pub const CRD: &str = "vouchercampaigns.catalyst.openova.io";

/// Per-campaign bookkeeping kept between reconciles.
#[derive(Default)]
pub(crate) struct CampaignMemory {
    remembered: Mutex<HashMap<ObjectRef<VoucherCampaign>, generate::Remembered>>,
    failures: Backoff<VoucherCampaign>,
}

impl CampaignMemory {
    fn forget(&self, campaign: &VoucherCampaign) {
        self.remembered
            .lock()
            .unwrap()
            .remove(&ObjectRef::from_obj(campaign));
    }
}

/// Called by kube-runtime for every change of a campaign and every requeue.
pub async fn reconcile(campaign: Arc<VoucherCampaign>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api = runtime::api_of(&ctx.client, campaign.as_ref())?;
    let result = finalizer(&api, FINALIZER, campaign.clone(), |event| async {
        match event {
            finalizer::Event::Apply(c) => reconcile::apply(&ctx, &c).await,
            finalizer::Event::Cleanup(c) => reconcile::cleanup(&ctx, &c).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.campaigns
        .failures
        .count(campaign.as_ref(), &result, &ctx.metrics.campaign_reconciles);
    result
}

/// Called by kube-runtime when `reconcile` fails: retry with a per-campaign
/// exponential backoff.
pub(crate) fn error_policy(
    campaign: Arc<VoucherCampaign>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let delay = ctx.campaigns.failures.failed(campaign.as_ref());
    tracing::warn!(campaign = %campaign.name_any(), %error, ?delay, "campaign reconcile failed; retrying");
    Action::requeue(delay)
}

/// Runs the campaign loop until `stop`. A cluster without the campaign CRD
/// (a chart upgrade does not install new CRDs) runs none, and says so.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    let api = runtime::api_for::<VoucherCampaign>(&ctx.client, ctx.settings.namespace.as_deref());
    match api.list_metadata(&ListParams::default().limit(1)).await {
        Err(kube::Error::Api(status)) if status.code == 404 => {
            tracing::warn!(
                "the Kubernetes API does not serve {CRD}: VoucherCampaigns are not reconciled; \
                 install the CRD (voucher-operator crd | kubectl apply -f -) and restart"
            );
            return;
        }
        _ => {}
    }
    let store = ctx.store.clone();
    let wake = runtime::wake_on_rows(&ctx.store, stop.clone(), move |changed| {
        let store = store.clone();
        async move {
            match changed {
                Changed::Code(code) => store.campaign_of(&code).await.ok().flatten(),
                // Its switch or its suspension: its status says so at once.
                Changed::Campaign(uid) => store.campaign_by_uid(&uid).await.ok().flatten(),
                Changed::Any | Changed::Voucher { .. } => None,
            }
        }
    });
    let controller = runtime::controller(api, ctx.settings.concurrency, wake, &stop);
    let census = {
        let (ctx, cache, stop) = (ctx.clone(), controller.store(), stop.clone());
        async move {
            let metrics = &ctx.metrics;
            let caps = census::CapGauges {
                used: &metrics.campaign_redemptions,
                max: &metrics.campaign_max_redemptions,
            };
            let count = census::of_campaigns;
            let reconciled = &ctx.campaigns.failures;
            census::run(
                "VoucherCampaign",
                cache,
                count,
                reconciled,
                metrics,
                caps,
                stop,
            )
            .await;
        }
    };
    let controller = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "campaign reconcile result");
            }
        });
    runtime::until_stopped(async { tokio::join!(controller, census) }, stop).await;
}
