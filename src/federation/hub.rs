//! The hub role (`voucher-operator hub`, in the vendor's cluster; no billing
//! database): each `scope: Global` Voucher of the global namespace defines its
//! code's record in the hub's bucket, and its status shows the units granted
//! and to whom; the allotment service and the claim service (`perCustomer:
//! Global`) answer the Sovereigns beside it.
//!
//! Every replica runs both: a definition is a compare-and-set that writes only
//! what changed, and every replica computes the same status from the record.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use chrono::Utc;
use futures::StreamExt as _;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::watcher;
use kube::{Resource as _, ResourceExt as _};
use tokio_util::sync::CancellationToken;
use voucher_core::allotment::Record;

use super::{allotment, claims};
use crate::api::{AllotmentStatus, Scope, Voucher};
use crate::controller::voucher::status::{self, Outcome};
use crate::domain::{CodeError, CodeRecord, Phase, TermError};

/// The finalizer that switches a deleted Voucher's record off (its units
/// stay granted until the Sovereigns return them).
pub const FINALIZER: &str = "catalyst.openova.io/global-voucher";

/// How the hub behaves.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The namespace of the vendor's `scope: Global` Vouchers.
    pub global_namespace: String,
    /// The allotment service's subject prefix.
    pub prefix: String,
    /// Replicas of the bucket (3 in the shipped configuration: a JetStream cluster).
    pub replicas: usize,
    /// The most one Sovereign may hold, in percent of the cap: no Sovereign hoards it.
    pub ceiling_percent: u64,
    /// The most one request may add.
    pub max_grant: u64,
    /// The status (units granted, redemptions reported) is refreshed this often.
    pub refresh: Duration,
    /// The audit events of global vouchers gathered from the Sovereigns.
    pub audit: Option<super::audit::Gather>,
}

/// One failed step of the hub, naming what it was about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Allotment(#[from] allotment::Error),
    #[error(transparent)]
    Claims(#[from] claims::Error),
    #[error("{0}")]
    Audit(String),
    #[error("writing the status: {0}")]
    Status(#[from] crate::controller::Error),
    #[error("Voucher {0} has no valid code: {1}")]
    Code(String, CodeError),
    #[error("Voucher {0} breaks a voucher rule: {1}")]
    Terms(String, TermError),
    #[error("Voucher {0} has no uid yet")]
    NoUid(String),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

struct Hub {
    kv: kv::Store,
    client: kube::Client,
    settings: Settings,
}

/// Runs the hub until `stop`: the allotment service, and the definitions.
pub async fn run(
    client: kube::Client,
    nats: async_nats::Client,
    settings: Settings,
    stop: CancellationToken,
) -> Result<(), Error> {
    let js = jetstream::new(nats.clone());
    if let Some(gather) = &settings.audit {
        super::audit::gather(&js, gather)
            .await
            .map_err(|e| Error::Audit(e.to_string()))?;
    }
    let kv = allotment::bucket(&js, settings.replicas).await?;
    let claimed = claims::bucket(&js, settings.replicas).await?;
    let service =
        allotment::start(nats.clone(), kv.clone(), &settings.prefix, stop.clone()).await?;
    let definitions = allotment::start_definitions(
        nats.clone(),
        kv.clone(),
        allotment::DEFINITION_PREFIX,
        stop.clone(),
    )
    .await?;
    let claim_service = claims::start(nats, claimed, claims::SUBJECT_PREFIX, stop.clone()).await?;
    let api: Api<Voucher> = Api::namespaced(client.clone(), &settings.global_namespace);
    let hub = Arc::new(Hub {
        kv,
        client,
        settings,
    });
    tracing::info!(namespace = %hub.settings.global_namespace, "hub started");
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile, error_policy, hub)
        .for_each(|_| async {})
        .await;
    let _ = service.await;
    let _ = claim_service.await;
    let _ = definitions.await;
    Ok(())
}

async fn reconcile(voucher: Arc<Voucher>, hub: Arc<Hub>) -> Result<Action, Error> {
    let api: Api<Voucher> = Api::namespaced(hub.client.clone(), &hub.settings.global_namespace);
    finalizer(&api, FINALIZER, voucher, |event| async {
        match event {
            finalizer::Event::Apply(v) => define(&hub, &v, true).await,
            finalizer::Event::Cleanup(v) => define(&hub, &v, false).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

fn error_policy(voucher: Arc<Voucher>, error: &Error, _: Arc<Hub>) -> Action {
    tracing::warn!(voucher = %voucher.name_any(), %error, "hub reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Defines the Voucher's record (switched off once it is deleted) and writes
/// what the record says into its status.
async fn define(hub: &Hub, voucher: &Voucher, live: bool) -> Result<Action, Error> {
    let name = voucher.name_any();
    if voucher.spec.scope != Scope::Global {
        let message = format!(
            "the hub's namespace {} holds only global vouchers (spec.scope: Global); nothing was \
             defined",
            hub.settings.global_namespace
        );
        let failed = Outcome::Failed {
            phase: Phase::Forbidden,
            reason: "ScopeOutOfPlace",
            message,
            retrying: false,
        };
        patch(hub, voucher, failed, None, None).await?;
        return Ok(Action::await_change());
    }
    let code = voucher.code().map_err(|e| Error::Code(name.clone(), e))?;
    let uid = voucher.uid().ok_or_else(|| Error::NoUid(name.clone()))?;
    let mut spec = voucher.spec.clone();
    spec.active &= live;
    let terms = spec.terms();
    let cap = u64::try_from(terms.max_redemptions).unwrap_or_default();
    let ceiling = (cap * hub.settings.ceiling_percent / 100).max(1);
    let wanted = spec
        .global_record(&uid, ceiling, hub.settings.max_grant)
        .map_err(|e| Error::Terms(name.clone(), e))?;
    let record = allotment::define(&hub.kv, code.as_str(), &wanted).await?;
    if live {
        let row = said(code.as_str(), &record, &terms);
        let phase = Phase::of(&row, Utc::now());
        let outcome = Outcome::Synced {
            record: &row,
            phase,
        };
        // The grant in each currency it states (each Sovereign says it in its own).
        let grant = record.grants(&terms, &crate::domain::Billing::default().currency);
        patch(hub, voucher, outcome, Some(&record), Some(grant)).await?;
    }
    Ok(Action::requeue(hub.settings.refresh))
}

/// The record as a row's status reads it: the redemptions every Sovereign
/// reported, exhausted once every unit is granted and spent everywhere.
fn said(code: &str, record: &Record, terms: &crate::domain::Terms) -> CodeRecord {
    let reported = i32::try_from(record.reported()).unwrap_or(i32::MAX);
    CodeRecord {
        code: code.to_owned(),
        terms: crate::domain::Terms {
            max_redemptions: if record.gone() { reported.max(1) } else { 0 },
            ..terms.clone()
        },
        times_redeemed: if record.gone() {
            reported.max(1)
        } else {
            reported
        },
        created_at: Utc::now(),
        deleted_at: None,
        campaign_on: None,
        suspended: false,
        global_gone: None,
        once_anywhere: false,
    }
}

async fn patch(
    hub: &Hub,
    voucher: &Voucher,
    outcome: Outcome<'_>,
    record: Option<&Record>,
    grant: Option<String>,
) -> Result<(), Error> {
    let generation = voucher.meta().generation.unwrap_or_default();
    let mut status = status::desired(outcome, generation, Utc::now(), voucher.status.as_ref());
    status.grant = grant;
    status.allotment = record.map(|r| AllotmentStatus {
        share: i64::try_from(r.granted()).unwrap_or(i64::MAX),
        sovereigns: Some(r.summary()),
    });
    if voucher.status.as_ref() != Some(&status) {
        crate::controller::patch_status(&hub.client, voucher, &status).await?;
    }
    Ok(())
}
