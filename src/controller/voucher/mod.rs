//! The Voucher loop: each `Voucher` reconciled into its `promo_codes` row.
//!
//! `reconcile` gathers the facts and carries out what `plan::decide` makes of
//! them; `status` is the status that plan writes; `sweep` releases the rows
//! of Vouchers that vanished without their finalizer.

mod global;
mod plan;
mod reconcile;
pub mod status;
mod sweep;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use tokio_util::sync::CancellationToken;

use super::census;
use super::metrics::{PhaseLabel, ReasonLabel};
use super::runtime::{self, Backoff};
use super::{Context, Error};
use crate::api::{Voucher, VoucherStatus};
use crate::domain::{Owner, Phase};
use crate::store::notify::Changed;

/// The finalizer that holds a Voucher until its row is revoked or orphaned.
pub const FINALIZER: &str = "catalyst.openova.io/voucher-cleanup";
/// The Voucher CRD, whose deletion orphans instead of revoking.
const CRD: &str = "vouchers.catalyst.openova.io";

/// Per-Voucher bookkeeping kept between reconciles.
#[derive(Default)]
pub(crate) struct VoucherMemory {
    /// The last status this replica wrote for each Voucher, and when.
    status_writes: Mutex<HashMap<ObjectRef<Voucher>, (VoucherStatus, Instant)>>,
    phases: Mutex<HashMap<ObjectRef<Voucher>, Phase>>,
    failures: Backoff<Voucher>,
}

impl VoucherMemory {
    /// Notes `voucher`'s phase (`None`: gone) and sets the phase gauges.
    fn remember_phase(&self, ctx: &Context, voucher: &Voucher, phase: Option<Phase>) {
        let mut phases = self.phases.lock().unwrap();
        let key = ObjectRef::from_obj(voucher);
        match phase {
            Some(phase) => phases.insert(key, phase),
            None => phases.remove(&key),
        };
        for p in Phase::ALL {
            let count = phases.values().filter(|v| **v == p).count();
            ctx.metrics
                .vouchers
                .get_or_create(&PhaseLabel { phase: p.as_str() })
                .set(count as i64);
        }
    }

    /// Forgets a deleted Voucher.
    fn forget(&self, voucher: &Voucher) {
        self.status_writes
            .lock()
            .unwrap()
            .remove(&ObjectRef::from_obj(voucher));
        self.failures.clear(voucher);
    }
}

/// Called by kube-runtime for every change of a Voucher and every requeue.
pub async fn reconcile(voucher: Arc<Voucher>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let api = runtime::api_of(&ctx.client, voucher.as_ref())?;
    let result = finalizer(&api, FINALIZER, voucher.clone(), |event| async {
        match event {
            finalizer::Event::Apply(v) => reconcile::apply(&ctx, &v).await,
            finalizer::Event::Cleanup(v) => reconcile::cleanup(&ctx, &v).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    ctx.vouchers
        .failures
        .count(voucher.as_ref(), &result, &ctx.metrics.reconciles);
    result
}

/// Called by kube-runtime when `reconcile` fails: retry with a per-voucher
/// exponential backoff (1 s, 2 s, 4 s … at most 5 min).
pub(crate) fn error_policy(voucher: Arc<Voucher>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .failures
        .get_or_create(&ReasonLabel {
            reason: error.category(),
        })
        .inc();
    let delay = ctx.vouchers.failures.failed(voucher.as_ref());
    tracing::warn!(voucher = %voucher.name_any(), %error, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

/// Runs the Voucher loop until `stop` is cancelled.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    let api = runtime::api_for::<Voucher>(&ctx.client, ctx.settings.namespace.as_deref());
    // A change of a row (a redemption, an edit by another writer) wakes the
    // resource that owns it; after a reconnect every resource is checked.
    let store = ctx.store.clone();
    let wake = runtime::wake_on_rows(&ctx.store, stop.clone(), move |changed| {
        let store = store.clone();
        async move {
            match changed {
                Changed::Code(code) => store.owner_of(&code).await.ok().flatten(),
                // Only the name is needed to wake it: the reconcile reads the rest.
                Changed::Voucher { namespace, name } => Some(Owner {
                    namespace,
                    name,
                    uid: String::new(),
                }),
                Changed::Campaign(_) | Changed::Any => None,
            }
        }
    });
    let controller = runtime::controller(api, ctx.settings.concurrency, wake, &stop);
    // Every resync interval, once the cache holds every Voucher: bindings
    // whose Voucher vanished without its finalizer.
    let sweeper = {
        let (ctx, cache, stop) = (ctx.clone(), controller.store(), stop.clone());
        async move {
            tokio::select! {
                _ = stop.cancelled() => return,
                ready = cache.wait_until_ready() => if ready.is_err() { return },
            }
            loop {
                sweep::sweep(&ctx, &cache).await;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(ctx.settings.resync_interval) => {}
                }
            }
        }
    };
    let census = {
        let (ctx, cache, stop) = (ctx.clone(), controller.store(), stop.clone());
        async move {
            let metrics = &ctx.metrics;
            let caps = census::CapGauges {
                used: &metrics.voucher_redemptions,
                max: &metrics.voucher_max_redemptions,
            };
            let count = census::of_vouchers;
            let reconciled = &ctx.vouchers.failures;
            census::run("Voucher", cache, count, reconciled, metrics, caps, stop).await;
        }
    };
    let controller = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile result");
            }
        });
    runtime::until_stopped(async { tokio::join!(controller, sweeper, census) }, stop).await;
}
