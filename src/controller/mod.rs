//! The controller role: reconciles every `Voucher` into its `promo_codes` row
//! and keeps `.status` live.
//!
//! kube-runtime drives it (watch, queue, retries); `reconcile` and
//! `error_policy` are the pair it calls, with a [`Context`] that carries the
//! clients, the metrics and the per-voucher bookkeeping.

pub mod campaign;
pub mod leader;
pub mod metrics;
mod plan;
pub mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::api::{Voucher, VoucherStatus};
use crate::domain::{
    Actor, AuditKind, Code, DeletionPolicy, EventWording, Facts, Issuers, Owner, Phase, Severity,
    Terms,
};
use crate::relay::{RelayMetrics, RelaySettings};
use crate::store::notify::{CODES_CHANNEL, Changed, Notification};
use crate::store::sync::{Released, Synced, Wanted};
use crate::store::{Store, StoreError};
use metrics::{KindLabel, Metrics, PhaseLabel, ReasonLabel, ResultLabel};
use plan::{Found, Next, Seen};

/// The finalizer that holds a Voucher until its row is revoked or orphaned.
pub const FINALIZER: &str = "catalyst.openova.io/voucher-cleanup";
/// The field manager of status writes (server-side apply).
pub const FIELD_MANAGER: &str = "voucher-operator";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("billing database: {0}")]
    Store(#[from] StoreError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    #[error("the Voucher has no namespace")]
    NotNamespaced,
    /// Whether the Voucher CRD is being deleted could not be told, so a
    /// deletion neither revokes nor orphans yet.
    #[error(
        "cannot tell whether the Voucher CRD is being deleted (get customresourcedefinitions/{crd}): {source}"
    )]
    CrdCheck {
        crd: &'static str,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Store(_) => "database",
            Error::Kube(_) => "kubernetes",
            Error::Finalizer(inner) => match inner.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => {
                    e.metric_label()
                }
                _ => "finalizer",
            },
            Error::NotNamespaced => "invalid",
            Error::CrdCheck { .. } => "kubernetes",
        }
    }
}

/// How the controller behaves.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Every voucher is compared with its row at least this often.
    pub resync_interval: Duration,
    /// Smallest interval between two status writes of one voucher when only
    /// the counters (not the spec) changed.
    pub status_min_interval: Duration,
    /// Watch one namespace, or all.
    pub namespace: Option<String>,
    /// Name of this replica in Events.
    pub identity: String,
    /// Reconciles running at once.
    pub concurrency: u16,
    /// Namespaces whose Vouchers may claim codes.
    pub issuers: Issuers,
    /// Namespace of the campaigns' generator-key Secrets, the only one whose
    /// Secrets the controller reads.
    pub key_namespace: String,
}

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub store: Store,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    memory: Mutex<Memory>,
}

/// Per-voucher bookkeeping kept between reconciles.
#[derive(Default)]
struct Memory {
    /// The last status this replica wrote for each Voucher, and when.
    last_status_write: HashMap<ObjectRef<Voucher>, (VoucherStatus, Instant)>,
    failures: HashMap<ObjectRef<Voucher>, u32>,
    phases: HashMap<ObjectRef<Voucher>, Phase>,
}

impl Context {
    pub fn new(
        client: kube::Client,
        store: Store,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Arc<Self> {
        Arc::new(Self {
            recorder: recorder(&client, &settings.identity),
            client,
            store,
            metrics,
            settings,
            memory: Mutex::default(),
        })
    }

    fn api(&self, voucher: &Voucher) -> Result<Api<Voucher>, Error> {
        let namespace = voucher.namespace().ok_or(Error::NotNamespaced)?;
        Ok(Api::namespaced(self.client.clone(), &namespace))
    }

    async fn publish(&self, voucher: &Voucher, event: EventWording) {
        self.publish_on(&voucher.object_ref(&()), event).await;
    }

    /// Publishes an Event regarding `regarding`, which may be gone already.
    async fn publish_on(&self, regarding: &ObjectReference, event: EventWording) {
        publish(&self.recorder, regarding, event).await;
    }

    fn remember_phase(&self, voucher: &Voucher, phase: Option<Phase>) {
        let mut memory = self.memory.lock().unwrap();
        let key = ObjectRef::from_obj(voucher);
        match phase {
            Some(phase) => memory.phases.insert(key, phase),
            None => memory.phases.remove(&key),
        };
        for p in Phase::ALL {
            let count = memory.phases.values().filter(|v| **v == p).count();
            self.metrics
                .vouchers
                .get_or_create(&PhaseLabel { phase: p.as_str() })
                .set(count as i64);
        }
    }

    /// Writes `wanted` unless it equals the current status, or unless only
    /// the counters changed and this voucher's status was written too recently
    /// (then the returned delay says when to try again).
    async fn write_status(
        &self,
        voucher: &Voucher,
        mut wanted: VoucherStatus,
    ) -> Result<Option<Duration>, Error> {
        let current = voucher.status.as_ref();
        if !status::differs(current, &wanted) {
            return Ok(None);
        }
        let key = ObjectRef::from_obj(voucher);
        let last = self
            .memory
            .lock()
            .unwrap()
            .last_status_write
            .get(&key)
            .cloned();
        // The cached object may predate our own last write (a wake-up raced
        // the watch): writing the same status again would change nothing.
        // After a resync interval the cache is trusted again.
        if let Some((written, at)) = &last
            && !status::differs(Some(written), &wanted)
            && at.elapsed() < self.settings.resync_interval
        {
            return Ok(None);
        }
        let spec_changed = current.and_then(|s| s.observed_generation)
            != wanted.observed_generation
            || current.and_then(|s| s.phase) != wanted.phase;
        if !spec_changed && let Some((_, at)) = &last {
            let elapsed = at.elapsed();
            if elapsed < self.settings.status_min_interval {
                self.metrics.status_patches_suppressed.inc();
                return Ok(Some(self.settings.status_min_interval - elapsed));
            }
        }
        wanted.last_synced_at = Some(Utc::now());
        let written = wanted.clone();
        let patch = json!({
            "apiVersion": Voucher::api_version(&()),
            "kind": Voucher::kind(&()),
            "status": wanted,
        });
        self.api(voucher)?
            .patch_status(
                &voucher.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        self.metrics.status_patches.inc();
        self.memory
            .lock()
            .unwrap()
            .last_status_write
            .insert(key, (written, Instant::now()));
        Ok(None)
    }

    /// The owner a Voucher is bound as: compared by uid, so a resource
    /// re-created under the same name is a new owner.
    fn owner(voucher: &Voucher) -> Result<Owner, Error> {
        Ok(Owner {
            namespace: voucher.namespace().ok_or(Error::NotNamespaced)?,
            name: voucher.name_any(),
            uid: voucher.uid().unwrap_or_default(),
        })
    }

    /// Counts an audit record the reconcile caused: the one place that does.
    fn count_audit(&self, kind: AuditKind) {
        self.metrics
            .audit_records
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }

    /// Applies a Voucher: gathers what `plan::decide` needs, then carries out its plan.
    async fn apply(&self, voucher: &Voucher) -> Result<Action, Error> {
        let owner = Self::owner(voucher)?;
        let code = voucher.code();
        let now = Utc::now();
        let terms = voucher.spec.terms();
        let issuer = self.settings.issuers.allows(&owner.namespace);
        let (found, failure) = match (&code, terms.validate()) {
            _ if !issuer => (Found::Forbidden(self.settings.issuers.clone()), None),
            (Err(error), _) => (Found::InvalidCode(error.clone()), None),
            (_, Err(error)) => (Found::InvalidTerms(error), None),
            (Ok(code), Ok(())) => match self.sync(code, &owner, &terms, voucher, now).await {
                Ok(synced) => (Found::Synced(synced), None),
                // This replica's copy is older than what another applied: it
                // writes nothing, the status neither; the watch brings the
                // newer copy.
                Err(error) if error.is_superseded() => {
                    tracing::info!(voucher = %owner, error = %crate::telemetry::describe(&error),
                        "an older copy of the Voucher: nothing written");
                    return Ok(Action::requeue(std::time::Duration::from_secs(1)));
                }
                Err(error) => (
                    Found::DatabaseUnavailable(crate::telemetry::describe(&error)),
                    Some(error),
                ),
            },
        };
        let seen = Seen {
            code: code.as_ref().ok(),
            owner: &owner,
            generation: voucher.metadata.generation.unwrap_or_default(),
            previous: voucher.status.as_ref(),
            now,
            resync: self.settings.resync_interval,
        };
        let plan = plan::decide(found, seen);
        if let (Some(holder), Ok(code)) = (&plan.audit_conflict, &code) {
            self.store.audit_conflict(code, &owner, holder).await?;
        }
        for kind in &plan.audited {
            self.count_audit(*kind);
        }
        for event in plan.events {
            self.publish(voucher, event).await;
        }
        let written = self.write_status(voucher, plan.status).await;
        self.remember_phase(voucher, Some(plan.phase));
        if let Some(error) = failure {
            // The database error is what gets retried; the status was best effort.
            return Err(error.into());
        }
        Ok(match plan.next.at_most(written?) {
            Next::After(delay) => Action::requeue(delay),
            Next::AwaitChange | Next::Retry => Action::await_change(),
        })
    }

    /// Brings the row to the spec. A binding whose Voucher is gone (deleted
    /// without its finalizer running, e.g. forced by hand) would hold the code
    /// forever: it is released and the code claimed again.
    async fn sync(
        &self,
        code: &Code,
        owner: &Owner,
        terms: &Terms,
        voucher: &Voucher,
        now: chrono::DateTime<Utc>,
    ) -> Result<Synced, StoreError> {
        let wanted = Wanted {
            code,
            owner,
            generation: voucher.metadata.generation.unwrap_or_default(),
            terms,
            request: voucher.request(),
            deletion_policy: voucher.spec.deletion_policy,
            suspended: suspended_by_annotation(voucher),
            now,
        };
        let synced = self.store.sync_voucher(&wanted).await?;
        let Synced::Conflict { owner: holder } = &synced else {
            return Ok(synced);
        };
        if !self.is_gone(holder).await {
            return Ok(synced);
        }
        tracing::warn!(code = %code, holder = %holder, "releasing the binding of a Voucher that no longer exists");
        let released = self.store.release_vanished(code, holder).await?;
        let note = format!(
            "code {code} was bound to Voucher {holder}, which no longer exists; released ({})",
            released.said()
        );
        let event = EventWording {
            severity: Severity::Warning,
            reason: "StaleBindingReleased",
            note,
        };
        self.publish(voucher, event).await;
        self.store.sync_voucher(&wanted).await
    }

    /// Releases the bindings whose Voucher vanished without its finalizer
    /// (removed by hand), applying the deletion policy recorded in each, with
    /// its audit record and an Event on the vanished object. `cache` must be
    /// ready: an empty cache would make every binding look vanished, which is
    /// why each is confirmed with the API server first.
    async fn sweep(&self, cache: &reflector::Store<Voucher>) {
        // A Voucher API that is not served (the CRD being removed, a version
        // dropped) answers 404 for every Voucher: that is no evidence that
        // any of them vanished, so the sweep waits for a list that works.
        let api: Api<Voucher> = match &self.settings.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        if let Err(error) = api.list_metadata(&ListParams::default().limit(1)).await {
            tracing::warn!(%error, "the Voucher API does not answer a list; no sweep this time");
            return;
        }
        let bindings = match self
            .store
            .bindings(self.settings.namespace.as_deref())
            .await
        {
            Ok(bindings) => bindings,
            Err(error) => {
                tracing::warn!(error = %crate::telemetry::describe(&error), "cannot sweep the bindings");
                return;
            }
        };
        for (code, binding) in bindings {
            let holder = &binding.owner;
            let key = ObjectRef::new(&holder.name).within(&holder.namespace);
            if cache
                .get(&key)
                .is_some_and(|v| v.uid().as_deref() == Some(holder.uid.as_str()))
                || !self.is_gone(holder).await
            {
                continue;
            }
            let Ok(code) = Code::parse(&code) else {
                continue;
            };
            let kind = match self.store.release_vanished(&code, holder).await {
                Ok(Released::Revoked(_)) => AuditKind::Revoked,
                Ok(Released::Orphaned(_)) => AuditKind::Orphaned,
                Ok(Released::NotOwner) => continue,
                Err(error) => {
                    tracing::warn!(error = %crate::telemetry::describe(&error), "cannot release a vanished Voucher's binding");
                    continue;
                }
            };
            tracing::warn!(code = %code, holder = %holder, %kind, "released the binding of a Voucher that vanished without its finalizer");
            self.count_audit(kind);
            let regarding = ObjectReference {
                api_version: Some(Voucher::api_version(&()).into_owned()),
                kind: Some(Voucher::kind(&()).into_owned()),
                namespace: Some(holder.namespace.clone()),
                name: Some(holder.name.clone()),
                uid: Some(holder.uid.clone()),
                ..ObjectReference::default()
            };
            let actor = Actor::from(holder);
            if let Some(mut event) = kind.wording(&Facts::new(code.as_str(), &actor)).event {
                event.severity = Severity::Warning;
                event.note = format!(
                    "{}; the Voucher was deleted without its finalizer, so its recorded deletion policy was applied by the sweep",
                    event.note
                );
                self.publish_on(&regarding, event).await;
            }
        }
    }

    /// Whether the resource a binding names is gone (absent, or re-created
    /// under a new uid). Unknown (e.g. not allowed to look) counts as present.
    async fn is_gone(&self, holder: &Owner) -> bool {
        let api: Api<Voucher> = Api::namespaced(self.client.clone(), &holder.namespace);
        match api.get_opt(&holder.name).await {
            Ok(None) => true,
            Ok(Some(found)) => found.uid().as_deref() != Some(holder.uid.as_str()),
            Err(_) => false,
        }
    }

    /// Whether the Voucher CRD is being deleted (or gone): then the API
    /// server is deleting every Voucher, and revoking their codes would
    /// revoke every code at once.
    async fn crd_going(&self) -> Result<bool, Error> {
        const CRD: &str = "vouchers.catalyst.openova.io";
        crd_going(&self.client, CRD)
            .await
            .map_err(|source| Error::CrdCheck { crd: CRD, source })
    }

    async fn cleanup(&self, voucher: &Voucher) -> Result<Action, Error> {
        self.remember_phase(voucher, None);
        let Ok(code) = voucher.code() else {
            return Ok(Action::await_change());
        };
        let owner = Self::owner(voucher)?;
        // Deleting the CRD (by mistake, an uninstall, a prune) deletes every
        // Voucher: their codes are orphaned, never revoked, and it is said.
        let crd_going = self.crd_going().await?;
        let policy = crd_going.then_some(DeletionPolicy::Orphan);
        let released = self.store.release_voucher(&code, &owner, policy).await?;
        if crd_going && matches!(released, Released::Orphaned(_)) {
            tracing::warn!(code = %code, voucher = %voucher.name_any(),
                "the Voucher CRD is being deleted: the code is orphaned, not revoked");
            self.publish(
                voucher,
                EventWording {
                    severity: Severity::Warning,
                    reason: "OrphanedWhileCRDDeleted",
                    note: format!(
                        "the Voucher CRD is being deleted, so code {code} was orphaned (left live in \
                         the billing database), not revoked; to manage it again, re-create the CRD \
                         and a Voucher with spec.adopt: true"
                    ),
                },
            )
            .await;
        }
        let kind = match released {
            Released::Revoked(_) => Some(AuditKind::Revoked),
            Released::Orphaned(_) => Some(AuditKind::Orphaned),
            Released::NotOwner => None,
        };
        if let Some(kind) = kind {
            self.count_audit(kind);
            let actor = Actor::from(&owner);
            if let Some(event) = kind.wording(&Facts::new(code.as_str(), &actor)).event {
                self.publish(voucher, event).await;
            }
        }
        let mut memory = self.memory.lock().unwrap();
        let key = ObjectRef::from_obj(voucher);
        memory.last_status_write.remove(&key);
        memory.failures.remove(&key);
        Ok(Action::await_change())
    }
}

/// Called by kube-runtime for every change of a Voucher and every requeue.
pub async fn reconcile(voucher: Arc<Voucher>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let api = ctx.api(&voucher)?;
    let result = finalizer(&api, FINALIZER, voucher.clone(), |event| async {
        match event {
            finalizer::Event::Apply(v) => ctx.apply(&v).await,
            finalizer::Event::Cleanup(v) => ctx.cleanup(&v).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabel { result: label })
        .inc();
    if result.is_ok() {
        ctx.memory
            .lock()
            .unwrap()
            .failures
            .remove(&ObjectRef::from_obj(voucher.as_ref()));
    }
    result
}

/// Called by kube-runtime when `reconcile` fails: retry with a per-voucher
/// exponential backoff (1 s, 2 s, 4 s … at most 5 min).
pub fn error_policy(voucher: Arc<Voucher>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .failures
        .get_or_create(&ReasonLabel {
            reason: error.metric_label(),
        })
        .inc();
    let failures = {
        let mut memory = ctx.memory.lock().unwrap();
        let count = memory
            .failures
            .entry(ObjectRef::from_obj(voucher.as_ref()))
            .or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    let delay = retry_delay(failures);
    tracing::warn!(voucher = %voucher.name_any(), %error, failures, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

/// The wait before retrying a Voucher that failed `failures` times in a row.
fn retry_delay(failures: u32) -> Duration {
    const MAX: Duration = Duration::from_secs(300);
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(MAX)
        .without_max_times()
        .build()
        .nth(failures.saturating_sub(1).min(16) as usize)
        .unwrap_or(MAX)
}

/// Checks that the Kubernetes API answers and serves the Voucher kind, so a
/// misconfiguration fails at start-up with a clear message.
pub async fn check_api(
    client: &kube::Client,
    server: &str,
    namespace: Option<&str>,
) -> anyhow::Result<()> {
    let version = tokio::time::timeout(Duration::from_secs(10), client.apiserver_version())
        .await
        .map_err(|_| {
            anyhow::anyhow!("the Kubernetes API server at {server} did not answer within 10 s")
        })?
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the Kubernetes API server at {server}: {}",
                crate::telemetry::root_cause(&e)
            )
        })?;
    tracing::info!(version = %version.git_version, "connected to the Kubernetes API server");
    let api: Api<Voucher> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    api.list(&ListParams::default().limit(1))
        .await
        .map_err(|e| match e {
            kube::Error::Api(status) if status.code == 404 => anyhow::anyhow!(
                "the Kubernetes API does not serve vouchers.catalyst.openova.io: install the CRD \
             (voucher-operator crd | kubectl apply -f -)"
            ),
            other => anyhow::anyhow!("cannot list Vouchers: {other}"),
        })?;
    Ok(())
}

/// Runs the controller until `stop` is cancelled.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    let api: Api<Voucher> = match &ctx.settings.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    // A change of a row (a redemption, an edit by another writer) wakes the
    // resource that owns it; after a reconnect every resource is checked.
    let store = ctx.store.clone();
    let (rows_changed, catch_up) = wake_on_rows(&ctx.store, stop.clone(), move |changed| {
        let store = store.clone();
        async move {
            match changed {
                Changed::Code(code) => store.owner_of(&code).await.ok().flatten(),
                Changed::Campaign(_) | Changed::Any => None,
            }
        }
    });
    let config = kube::runtime::controller::Config::default().concurrency(ctx.settings.concurrency);
    let shutdown = stop.clone();
    let (cache, writer) = reflector::store();
    let vouchers = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(trim)
        .reflect(writer)
        .applied_objects();
    // Every resync interval, once the cache holds every Voucher: bindings
    // whose Voucher vanished without its finalizer.
    let sweeper = {
        let (ctx, cache, stop) = (ctx.clone(), cache.clone(), stop.clone());
        async move {
            tokio::select! {
                _ = stop.cancelled() => return,
                ready = cache.wait_until_ready() => if ready.is_err() { return },
            }
            loop {
                ctx.sweep(&cache).await;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(ctx.settings.resync_interval) => {}
                }
            }
        }
    };
    let controller = Controller::for_stream(vouchers, cache)
        .with_config(config)
        .reconcile_on(rows_changed)
        .reconcile_all_on(catch_up)
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile result");
            }
        });
    until_stopped(async { tokio::join!(controller, sweeper) }, stop).await;
}

/// Runs `controller` until it ends. Graceful shutdown lets running reconciles
/// finish; stopped before the first list completed, kube-runtime's runner
/// keeps waiting for a cache that nothing fills any more: a grace period
/// after `stop`, it is stopped regardless.
async fn until_stopped(controller: impl std::future::Future, stop: CancellationToken) {
    let grace = async {
        stop.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        _ = controller => {}
        _ = grace => tracing::warn!(
            grace = ?SHUTDOWN_GRACE,
            "the controller had not stopped within its grace period; stopping regardless"
        ),
    }
}

/// Follows the changes of `promo_codes` rows until `stop`: each changed code
/// that `owner` maps to a resource wakes that resource (first stream); each
/// (re)connection, after which changes may have gone unheard, wakes all
/// (second stream). A payload that is no code, or an unreachable database,
/// wakes nothing.
fn wake_on_rows<K, F, Fut>(
    store: &Store,
    stop: CancellationToken,
    owner: F,
) -> (
    futures::channel::mpsc::UnboundedReceiver<ObjectRef<K>>,
    futures::channel::mpsc::UnboundedReceiver<()>,
)
where
    K: kube::Resource<DynamicType = ()> + 'static,
    F: Fn(Changed) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<Owner>> + Send,
{
    let (tx_one, rx_one) = futures::channel::mpsc::unbounded::<ObjectRef<K>>();
    let (tx_all, rx_all) = futures::channel::mpsc::unbounded::<()>();
    let mut notifications = Box::pin(store.listen(CODES_CHANNEL));
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                next = notifications.next() => next,
            };
            match next {
                Some(Notification::Payload(payload)) => {
                    let owner = owner(Changed::of(&payload)).await;
                    if let Some(owner) = owner
                        && tx_one
                            .unbounded_send(ObjectRef::new(&owner.name).within(&owner.namespace))
                            .is_err()
                    {
                        return;
                    }
                }
                Some(Notification::Connected) => {
                    if tx_all.unbounded_send(()).is_err() {
                        return;
                    }
                }
                // The pass on reconnecting catches up.
                Some(Notification::Disconnected) => {}
                None => return,
            }
        }
    });
    (rx_one, rx_all)
}

/// The annotation that suspends a resource's codes whoever owns its spec (a
/// GitOps apply leaves an annotation it did not set alone).
pub const SUSPENDED_ANNOTATION: &str = "catalyst.openova.io/suspended";

/// Whether `resource` carries `catalyst.openova.io/suspended: "true"`.
pub fn suspended_by_annotation(resource: &impl kube::Resource) -> bool {
    resource
        .meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(SUSPENDED_ANNOTATION))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// The Event recorder of this replica.
fn recorder(client: &kube::Client, identity: &str) -> Recorder {
    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: Some(identity.to_owned()),
    };
    Recorder::new(client.clone(), reporter)
}

/// Publishes an Event regarding `regarding`, which may be gone already; a
/// failure is logged, never a failed reconcile.
async fn publish(recorder: &Recorder, regarding: &ObjectReference, event: EventWording) {
    let reason = event.reason;
    let event = Event {
        type_: match event.severity {
            Severity::Normal => EventType::Normal,
            Severity::Warning => EventType::Warning,
        },
        reason: reason.into(),
        note: Some(event.note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, regarding).await {
        tracing::warn!(%error, reason, "cannot publish a Kubernetes event");
    }
}

/// What the caches keep of a watched object: what reconciles read.
/// managedFields and kubectl's last-applied annotation are most of an
/// object's size, and unused here.
fn trim<K: ResourceExt>(object: &mut K) {
    object.managed_fields_mut().clear();
    object
        .annotations_mut()
        .remove("kubectl.kubernetes.io/last-applied-configuration");
}

/// Whether the CRD `name` is being deleted (or gone): then the API server is
/// deleting every resource of its kind, and revoking their codes would
/// revoke every code at once.
async fn crd_going(client: &kube::Client, name: &str) -> Result<bool, kube::Error> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds.get_opt(name).await {
        Ok(Some(crd)) => Ok(crd.metadata.deletion_timestamp.is_some()),
        Ok(None) => Ok(true),
        Err(error) => Err(error),
    }
}

/// The controller role: the reconciler and the audit relay, which run
/// together (on the leader, when leader election is on).
pub struct Role {
    pub ctx: Arc<Context>,
    pub campaigns: Arc<campaign::Context>,
    relay: Option<(RelaySettings, Arc<RelayMetrics>)>,
}

impl Role {
    /// The role's parts, their metrics registered in `registry`; `relay` is
    /// `None` where no NATS exists (records then wait in the outbox).
    pub fn new(
        client: kube::Client,
        store: Store,
        settings: Settings,
        relay: Option<RelaySettings>,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Self {
        let metrics = Arc::new(Metrics::register(registry));
        let relay_metrics = Arc::new(RelayMetrics::register(registry));
        Self {
            campaigns: campaign::Context::new(
                client.clone(),
                store.clone(),
                metrics.clone(),
                settings.clone(),
            ),
            ctx: Context::new(client, store, metrics, settings),
            relay: relay.map(|settings| (settings, relay_metrics)),
        }
    }

    /// Runs the reconciler and the relay until `stop`.
    pub async fn start(&self, stop: CancellationToken) -> anyhow::Result<()> {
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
        let (_, _, relayed) = tokio::join!(
            run(self.ctx.clone(), stop.clone()),
            campaign::run(self.campaigns.clone(), stop.clone()),
            relay
        );
        relayed
    }
}

/// How long running reconciles get to finish once a stop is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_reconciles_back_off_exponentially_up_to_five_minutes() {
        let delays: Vec<u64> = [1, 2, 3, 4, 9, 10, 1000]
            .into_iter()
            .map(|n| retry_delay(n).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 256, 300, 300]);
    }
}
