//! What both kinds' loops share: the watch that drives a kube-runtime
//! Controller and the rows' notifications that wake it, Events, status
//! writes, per-resource retries, the CRD-deletion check, and start-up checks.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use futures::channel::mpsc::{UnboundedReceiver, unbounded};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Controller;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::Error;
use super::metrics::ResultLabel;
use crate::api::Voucher;
use crate::domain::{EventWording, Owner, Severity};
use crate::store::Store;
use crate::store::notify::{CODES_CHANNEL, Changed, Notification};

/// The field manager of status writes (server-side apply).
pub(crate) const FIELD_MANAGER: &str = "voucher-operator";
/// How long running reconciles get to finish once a stop is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The API of `K` in `namespace`, or in every namespace.
pub(crate) fn api_for<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The owner a resource's codes are bound to: compared by uid, so a resource
/// re-created under the same name is a new owner.
pub(crate) fn owner<K: Resource<DynamicType = ()>>(resource: &K) -> Result<Owner, Error> {
    Ok(Owner {
        namespace: resource.namespace().ok_or_else(|| Error::NotNamespaced {
            kind: K::kind(&()).into_owned(),
        })?,
        name: resource.name_any(),
        uid: resource.uid().unwrap_or_default(),
    })
}

/// The Api of `resource`'s own namespace.
pub(crate) fn api_of<K>(client: &kube::Client, resource: &K) -> Result<Api<K>, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    let namespace = resource.namespace().ok_or_else(|| Error::NotNamespaced {
        kind: K::kind(&()).into_owned(),
    })?;
    Ok(Api::namespaced(client.clone(), &namespace))
}

/// Writes `status` as the whole status this controller manages (server-side apply).
pub(crate) async fn patch_status<K>(
    client: &kube::Client,
    resource: &K,
    status: &impl Serialize,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api_of(client, resource)?
        .patch_status(
            &resource.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(())
}

/// Per resource: failed reconciles in a row, for the backoff, and when it was
/// last reconciled successfully, for the status-lag gauge (see `census`).
pub(crate) struct Backoff<K: Resource> {
    failures: Mutex<HashMap<ObjectRef<K>, u32>>,
    succeeded: Mutex<HashMap<ObjectRef<K>, Instant>>,
}

impl<K> Default for Backoff<K>
where
    K: Resource,
    K::DynamicType: Hash + Eq,
{
    fn default() -> Self {
        Self {
            failures: Mutex::default(),
            succeeded: Mutex::default(),
        }
    }
}

impl<K> Backoff<K>
where
    K: Resource<DynamicType = ()>,
{
    /// Counts one more failure of `resource`; the wait before its retry.
    pub(crate) fn failed(&self, resource: &K) -> Duration {
        let mut failures = self.failures.lock().unwrap();
        let count = failures.entry(ObjectRef::from_obj(resource)).or_insert(0);
        *count = count.saturating_add(1);
        retry_delay(*count)
    }

    /// Forgets a deleted `resource`.
    pub(crate) fn clear(&self, resource: &K) {
        let key = ObjectRef::from_obj(resource);
        self.failures.lock().unwrap().remove(&key);
        self.succeeded.lock().unwrap().remove(&key);
    }

    /// Counts a reconcile of `resource` by its result; a success ends its
    /// run of failures.
    pub(crate) fn count<T>(
        &self,
        resource: &K,
        result: &Result<T, Error>,
        reconciles: &Family<ResultLabel, Counter>,
    ) {
        let label = if result.is_ok() { "ok" } else { "error" };
        reconciles
            .get_or_create(&ResultLabel { result: label })
            .inc();
        if result.is_ok() {
            let key = ObjectRef::from_obj(resource);
            self.failures.lock().unwrap().remove(&key);
            self.succeeded.lock().unwrap().insert(key, Instant::now());
        }
    }

    /// The age of the oldest last success among `resources` (one never
    /// reconciled successfully counts from `since`).
    pub(crate) fn oldest_success(
        &self,
        resources: impl Iterator<Item = ObjectRef<K>>,
        since: Instant,
    ) -> Duration {
        let succeeded = self.succeeded.lock().unwrap();
        resources
            .map(|key| succeeded.get(&key).copied().unwrap_or(since).elapsed())
            .max()
            .unwrap_or_default()
    }
}

/// The wait before retrying a resource that failed `failures` times in a
/// row: exponential, 1 s, 2 s, 4 s … at most 5 min.
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

/// A kube-runtime Controller over `api`'s resources (trimmed in its cache),
/// woken also by `wake` (from [`wake_on_rows`]), stopping gracefully on `stop`.
pub(crate) fn controller<K>(
    api: Api<K>,
    concurrency: u16,
    wake: Wake<K>,
    stop: &CancellationToken,
) -> Controller<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (cache, writer) = reflector::store();
    let objects = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(trim)
        .reflect(writer)
        .applied_objects();
    let config = kube::runtime::controller::Config::default().concurrency(concurrency);
    let shutdown = stop.clone();
    Controller::for_stream(objects, cache)
        .with_config(config)
        .reconcile_on(wake.one)
        .reconcile_all_on(wake.all)
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
}

/// Runs `controller` until it ends. Graceful shutdown lets running reconciles
/// finish; stopped before the first list completed, kube-runtime's runner
/// keeps waiting for a cache that nothing fills any more: a grace period
/// after `stop`, it is stopped regardless.
pub(crate) async fn until_stopped(controller: impl std::future::Future, stop: CancellationToken) {
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

/// What wakes resources besides their own changes: one resource whose row
/// changed, or all of them after the notifications were not heard.
pub(crate) struct Wake<K: Resource> {
    one: UnboundedReceiver<ObjectRef<K>>,
    all: UnboundedReceiver<()>,
}

/// Follows the changes of `promo_codes` rows until `stop`: each change that
/// `owner` maps to a resource wakes that resource; each (re)connection, after
/// which changes may have gone unheard, wakes all. A payload that is no
/// code, or an unreachable database, wakes nothing.
pub(crate) fn wake_on_rows<K, F, Fut>(store: &Store, stop: CancellationToken, owner: F) -> Wake<K>
where
    K: kube::Resource<DynamicType = ()> + 'static,
    F: Fn(Changed) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<Owner>> + Send,
{
    let (tx_one, one) = unbounded::<ObjectRef<K>>();
    let (tx_all, all) = unbounded::<()>();
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
    Wake { one, all }
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

/// The annotation that suspends a resource's codes whoever owns its spec (a
/// GitOps apply leaves an annotation it did not set alone).
pub(crate) const SUSPENDED_ANNOTATION: &str = "catalyst.openova.io/suspended";

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
pub(crate) fn recorder(client: &kube::Client, identity: &str) -> Recorder {
    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: Some(identity.to_owned()),
    };
    Recorder::new(client.clone(), reporter)
}

/// Publishes an Event regarding `regarding`, which may be gone already; a
/// failure is logged, never a failed reconcile.
pub(crate) async fn publish(recorder: &Recorder, regarding: &ObjectReference, event: EventWording) {
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

/// Whether the CRD `crd` is being deleted (or gone): then the API server is
/// deleting every resource of its kind, and revoking their codes would
/// revoke every code at once.
pub(crate) async fn crd_going(client: &kube::Client, crd: &'static str) -> Result<bool, Error> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds.get_opt(crd).await {
        Ok(Some(found)) => Ok(found.metadata.deletion_timestamp.is_some()),
        Ok(None) => Ok(true),
        Err(source) => Err(Error::CrdCheck { crd, source }),
    }
}

/// Checks that the Kubernetes API answers and serves the Voucher kind, so a
/// misconfiguration fails at start-up with a clear message.
pub(crate) async fn check_api(
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
    let api: Api<Voucher> = api_for(client, namespace);
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
