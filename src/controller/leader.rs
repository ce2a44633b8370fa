//! Leader election on a `coordination.k8s.io/v1` Lease (kube-lease-manager):
//! the leader-only work runs while this replica holds the lease and is
//! stopped as soon as it loses it.

use std::future::Future;
use std::time::Duration;

use kube_lease_manager::LeaseManagerBuilder;
use tokio_util::sync::CancellationToken;

/// Where the lease is and who we are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
}

impl Default for LeaseSettings {
    /// The defaults of the leader-election flags; `identity` is the
    /// controller's ([`super::Settings`]).
    fn default() -> Self {
        Self {
            name: "voucher-operator".into(),
            namespace: "default".into(),
            identity: super::Settings::default().identity,
            duration: Duration::from_secs(15),
        }
    }
}

/// Runs `work` whenever this replica leads, until `shutdown` is cancelled.
/// `work` gets a token that is cancelled when leadership ends; it must stop
/// promptly then. The lease is released on shutdown.
pub async fn run_while_leader<W, F>(
    client: kube::Client,
    settings: LeaseSettings,
    shutdown: CancellationToken,
    mut work: W,
) -> anyhow::Result<()>
where
    W: FnMut(CancellationToken) -> F,
    F: Future<Output = anyhow::Result<()>>,
{
    let duration = settings.duration.as_secs().max(2);
    let manager = LeaseManagerBuilder::new(client, &settings.name)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.identity)
        .with_duration(duration)
        .with_grace((duration / 3).max(1))
        .build()
        .await
        .map_err(|error| {
            let (name, namespace) = (&settings.name, &settings.namespace);
            match api_status(&error) {
                Some(404) => anyhow::anyhow!(
                    "cannot create the Lease {name}: the namespace {namespace} does not exist; \
                     set --lease-namespace (POD_NAMESPACE) to an existing one"
                ),
                Some(403) => anyhow::anyhow!(
                    "may not create or read the Lease {namespace}/{name}: grant the controller's \
                     service account create, get and patch on leases there (the chart's RBAC does)"
                ),
                _ => anyhow::anyhow!("cannot create or read the Lease {namespace}/{name}: {error}"),
            }
        })?;
    let (mut leading, lease_task) = manager.watch().await;
    tracing::info!(lease = %settings.name, identity = %settings.identity, "waiting for leadership");
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        if !*leading.borrow_and_update() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = leading.changed() => {
                    if changed.is_err() {
                        anyhow::bail!("the lease manager stopped");
                    }
                }
            }
            continue;
        }
        tracing::info!(identity = %settings.identity, "acquired leadership");
        let term = shutdown.child_token();
        let work_done = work(term.clone());
        tokio::pin!(work_done);
        let result = loop {
            tokio::select! {
                result = &mut work_done => break result,
                changed = leading.changed() => {
                    if changed.is_err() || !*leading.borrow_and_update() {
                        tracing::warn!(identity = %settings.identity, "lost leadership; stopping");
                        term.cancel();
                        break (&mut work_done).await;
                    }
                }
            }
        };
        result?;
    }
    // Dropping the receiver makes the lease manager release the lease.
    drop(leading);
    match tokio::time::timeout(Duration::from_secs(5), lease_task).await {
        Ok(Ok(Ok(_))) => tracing::info!("released the lease"),
        Ok(Ok(Err(error))) => tracing::warn!(%error, "could not release the lease"),
        Ok(Err(error)) => tracing::warn!(%error, "the lease task failed"),
        Err(_) => tracing::warn!("releasing the lease timed out"),
    }
    Ok(())
}

/// The HTTP status the API server answered, if `error` (or one of its
/// causes) is such an answer.
fn api_status(error: &(dyn std::error::Error + 'static)) -> Option<u16> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(kube::Error::Api(status)) = error.downcast_ref::<kube::Error>() {
            return Some(status.code);
        }
        next = error.source();
    }
    None
}
