//! One GitOps test's world: the operator's controllers on a fresh database,
//! watching a namespace of their own, a Git repository of the test's own, and
//! Flux ([`super::flux`]) syncing the one into the other through
//! `examples/flux/vouchers.yaml` as shipped.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use voucher_operator::api::Voucher;
use voucher_operator::controller::metrics::Metrics;
use voucher_operator::controller::{self, Context, Settings};
use voucher_operator::domain::Code;
use voucher_operator::store::Store;

use super::eventually_within;
use super::flux::{GitServer, Kustomization, Repo};
use voucher_testenv::flux::Sync;

/// What a Flux sync may take here: a fetch, a build, an apply and the health
/// checks, polled every 5 s by kustomize-controller.
pub const SYNC: Duration = Duration::from_secs(90);

pub struct Harness {
    pub client: kube::Client,
    pub ns: String,
    pub pool: PgPool,
    pub store: Store,
    pub repo: Repo,
    pub settings: Settings,
    /// The operator's controllers (Vouchers and campaigns), to stop and start again.
    pub operator: CancellationToken,
    _stop: tokio_util::sync::DropGuard,
}

/// The operator on a fresh database watching a namespace of its own, a
/// repository of the test's own on the shared Git server, and Flux running.
pub async fn harness() -> Harness {
    harness_on(&super::flux::flux().git).await
}

pub async fn harness_on(git: &GitServer) -> Harness {
    super::init_tracing();
    let url = super::fresh_database("flux").await;
    let pool = super::pool(&url).await;
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    let (client, ns) = super::cluster::setup("flux").await;
    let stop = CancellationToken::new();
    let mut harness = Harness {
        client,
        pool,
        store,
        repo: Repo::new(git, &ns),
        settings: super::controller_settings(&ns),
        ns,
        operator: stop.child_token(),
        _stop: stop.clone().drop_guard(),
    };
    harness.operator = harness.start_operator(&stop);
    harness
}

impl Harness {
    pub fn start_operator(&self, parent: &CancellationToken) -> CancellationToken {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::register(&mut registry));
        let ctx = Context::new(
            self.client.clone(),
            self.store.clone(),
            metrics,
            self.settings.clone(),
        );
        let operator = parent.child_token();
        tokio::spawn(controller::voucher::run(ctx.clone(), operator.clone()));
        tokio::spawn(controller::campaign::run(ctx, operator.clone()));
        operator
    }

    /// `examples/flux/vouchers.yaml` as shipped, but for what a fleet repository
    /// changes: where it lives, the directory it applies, the target namespace.
    pub async fn kustomization(&self, path: &str) -> Kustomization {
        let sync = Sync {
            name: "vouchers",
            namespace: &self.ns,
            url: &self.repo.url,
            path,
            target_namespace: &self.ns,
            // Each test asks for a sync after its push.
            poll: "1m",
        };
        let kustomization = Kustomization::apply(&self.client, &sync).await;
        kustomization.sync().await;
        kustomization
    }

    pub fn vouchers(&self) -> Api<Voucher> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn ready_revision(&self, ks: &Kustomization, commit: &str) {
        eventually_within(
            SYNC,
            &format!("the Kustomization Ready at {commit}"),
            || async {
                let ready = ks.condition("Ready").await?;
                (ready.0 == "True" && ks.last_applied().await?.ends_with(commit)).then_some(())
            },
        )
        .await;
    }

    /// A customer's redemption of `code`, as the store answers it.
    pub async fn redeem(&self, code: &str) -> String {
        let redemption = super::redemption(&Code::parse(code).unwrap(), "flux-customer");
        format!("{:?}", self.store.redeem(&redemption).await.unwrap())
    }

    pub async fn redeemable(&self, code: &str) -> bool {
        self.redeem(code).await.starts_with("Fresh(Granted")
    }
}

/// A Voucher manifest as a person commits it.
pub fn voucher_yaml(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: catalyst.openova.io/v1alpha1\nkind: Voucher\nmetadata:\n  name: {name}\nspec:\n{}",
        spec.lines()
            .map(|line| format!("  {line}\n"))
            .collect::<String>()
    )
}

pub fn ready(voucher: &Voucher) -> bool {
    voucher
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

impl Harness {
    /// The Kustomization's Ready condition once it is False: (reason, message).
    pub async fn failed(&self, ks: &Kustomization, what: &str) -> (String, String) {
        eventually_within(SYNC, what, || async {
            let (status, reason, message) = ks.condition("Ready").await?;
            (status == "False" && reason != "Progressing" && reason != "ProgressingWithRetry")
                .then_some((reason, message))
        })
        .await
    }

    pub async fn row(&self, code: &str) -> Option<(i32, bool, bool)> {
        sqlx::query_as(
            "SELECT credit_omr, active, deleted_at IS NOT NULL FROM promo_codes WHERE code = $1",
        )
        .bind(code)
        .fetch_optional(&self.pool)
        .await
        .unwrap()
    }

    pub async fn audit_kinds(&self, code: &str) -> Vec<String> {
        sqlx::query_scalar("SELECT kind FROM voucher_audit_outbox WHERE code = $1 ORDER BY seq")
            .bind(code)
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    /// A campaign key Secret, as a secret manager (SOPS, External Secrets) makes it: never in Git.
    pub async fn key_secret(&self, name: &str) {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": name},
            "stringData": {"key": "4f6d616e74656c2d62696c6c2d323032372d6b65792d666f722d7465737473"},
        }))
        .unwrap();
        Api::<Secret>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
}
