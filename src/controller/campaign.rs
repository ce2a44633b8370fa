//! The campaign loop: reconciles every `VoucherCampaign` into its codes'
//! `promo_codes` rows and keeps its `.status` live.
//!
//! A reconcile gathers the facts (the Secret's key, the store's progress,
//! the aggregate counters), `decide` turns them into the status, Events and
//! next look, purely, and the reconcile writes them. Generation runs in
//! slices of about [`SLICE`], each chunk committed on its own: the status
//! shows progress, a crash or a leader change resumes at the last committed
//! chunk. No code ever reaches a status, an Event, a log line or an error:
//! they name indices.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::metrics::{Metrics, ResultLabel};
use super::status::{self, READY, RECONCILING, STALLED, Wanted};
use super::{FIELD_MANAGER, Settings};
use crate::api::campaign::{VoucherCampaign, VoucherCampaignStatus};
use crate::domain::campaign::{CampaignPhase, Generator};
use crate::domain::{DeletionPolicy, EventWording, Issuers, Owner, Severity, TermError, Terms};
use crate::store::campaigns::{Batch, CHUNK, Chunk, Counts, Release, TermsPass, UPDATE_CHUNK};
use crate::store::{Store, StoreError};

/// The finalizer that holds a campaign until its codes are revoked or orphaned.
pub const FINALIZER: &str = "catalyst.openova.io/campaign-cleanup";
/// The campaign CRD, whose deletion orphans instead of revoking.
pub const CRD: &str = "vouchercampaigns.catalyst.openova.io";
/// Generation work one reconcile does before it writes its progress and
/// yields to the others.
const SLICE: Duration = Duration::from_secs(2);
/// How soon a campaign stalled on its Secret looks again (Secrets are not
/// watched: that would need every Secret of the namespace).
const KEY_RETRY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("billing database: {0}")]
    Store(#[from] StoreError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    #[error("the VoucherCampaign has no namespace")]
    NotNamespaced,
    #[error(
        "cannot tell whether the campaign CRD is being deleted (get customresourcedefinitions/{CRD}): {0}"
    )]
    CrdCheck(#[source] kube::Error),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Store(_) => "database",
            Error::Kube(_) | Error::CrdCheck(_) => "kubernetes",
            Error::Finalizer(inner) => match inner.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => {
                    e.metric_label()
                }
                _ => "finalizer",
            },
            Error::NotNamespaced => "invalid",
        }
    }
}

/// What applying a campaign met.
#[derive(Clone, Debug, PartialEq)]
pub enum Found {
    /// Outside the issuer namespaces; nothing was written.
    Forbidden(Issuers),
    /// The terms break a voucher rule; nothing was written.
    InvalidTerms(TermError),
    /// The generator key cannot be had (why, in words), so generation waits
    /// with `generated` codes.
    KeyUnavailable { why: String, generated: u32 },
    /// Code `index` exists already; generation stopped with `generated` codes.
    Collision { index: u32, generated: u32 },
    /// The billing database could not be asked.
    DatabaseUnavailable(String),
    /// `generated` of the campaign's codes exist; with every code, its
    /// counters, and how soon to count again when they were not read now (a
    /// change of a code came sooner than the smallest interval between two).
    Progress {
        generated: u32,
        counts: Option<Counts>,
        recount: Option<Duration>,
    },
}

/// The campaign as the reconcile saw it.
#[derive(Clone, Copy, Debug)]
pub struct Seen<'a> {
    pub owner: &'a Owner,
    pub count: u32,
    pub terms: &'a Terms,
    pub generation: i64,
    pub previous: Option<&'a VoucherCampaignStatus>,
    pub now: DateTime<Utc>,
    pub resync: Duration,
    /// Suspended (the admin endpoint or the annotation).
    pub suspended: bool,
}

/// A reconcile's decisions.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub status: VoucherCampaignStatus,
    pub events: Vec<EventWording>,
    /// When to look again; `None`: report the failure and back off.
    pub next: Option<Duration>,
}

/// The phase of a campaign whose every code exists.
fn settled_phase(terms: &Terms, now: DateTime<Utc>) -> CampaignPhase {
    if !terms.active {
        CampaignPhase::Inactive
    } else if terms.valid_from.is_some_and(|t| now < t) {
        CampaignPhase::Scheduled
    } else if terms.expires_at.is_some_and(|t| now >= t) {
        CampaignPhase::Expired
    } else {
        CampaignPhase::Active
    }
}

/// Decides the status, Events and next look of a reconcile that met `found`.
pub fn decide(found: Found, seen: Seen<'_>) -> Plan {
    let Seen {
        owner,
        count,
        terms,
        generation,
        previous,
        now,
        resync,
        suspended,
    } = seen;
    let before = previous.map_or(&[][..], |p| p.conditions.as_slice());
    let condition = |type_, wanted| status::condition(type_, wanted, generation, now, before);
    let previous_reason = before
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| c.reason.as_str());
    // (phase, Ready, the kstatus condition beside it, generated, counts, next)
    let (phase, ready, beside, generated, counts, next) = match found {
        Found::Forbidden(issuers) => (
            CampaignPhase::Forbidden,
            Wanted {
                status: false,
                reason: "NotAnIssuerNamespace",
                message: format!(
                    "namespace {} may not issue vouchers (issuer namespaces: {}); nothing was \
                     written. To allow it, add it to the controller's --issuer-namespaces (chart \
                     value controller.issuerNamespaces)",
                    owner.namespace,
                    issuers.list()
                ),
            },
            Some(STALLED),
            None,
            None,
            Some(resync),
        ),
        Found::InvalidTerms(error) => (
            CampaignPhase::Stalled,
            Wanted {
                status: false,
                reason: "InvalidTerms",
                message: format!("the spec breaks a voucher rule: {error}; nothing was written"),
            },
            Some(STALLED),
            None,
            None,
            Some(resync),
        ),
        Found::KeyUnavailable { why, generated } => (
            CampaignPhase::Stalled,
            Wanted {
                status: false,
                reason: "KeyUnavailable",
                message: format!("{why}; no new code is written until then"),
            },
            Some(STALLED),
            Some(generated),
            None,
            Some(KEY_RETRY),
        ),
        Found::Collision { index, generated } => (
            CampaignPhase::Stalled,
            Wanted {
                status: false,
                reason: "CodeCollision",
                message: format!(
                    "code number {index} of this campaign exists already in the billing database \
                     (issued by someone else, revoked earlier, or an earlier code of this \
                     campaign); it was not overwritten and generation stopped at {generated} of \
                     {count} codes. Delete and re-create the campaign under another name, or \
                     with a longer spec.codeLength; the codes issued so far stay valid"
                ),
            },
            Some(STALLED),
            Some(generated),
            None,
            Some(resync),
        ),
        Found::DatabaseUnavailable(error) => (
            CampaignPhase::Error,
            Wanted {
                status: false,
                reason: "DatabaseUnavailable",
                message: format!("cannot reach the billing database: {error}"),
            },
            Some(RECONCILING),
            previous.and_then(|p| p.generated).map(|g| g as u32),
            None,
            None,
        ),
        Found::Progress { generated, .. } if generated < count => (
            CampaignPhase::Generating,
            Wanted {
                status: false,
                reason: "Generating",
                message: format!("generated {generated} of {count} codes"),
            },
            Some(RECONCILING),
            Some(generated),
            None,
            Some(Duration::ZERO),
        ),
        Found::Progress {
            generated,
            counts,
            recount,
        } => {
            let phase = match suspended {
                true => CampaignPhase::Suspended,
                false => settled_phase(terms, now),
            };
            // A time boundary ahead changes the phase: look again just after it.
            let boundary = [terms.valid_from, terms.expires_at]
                .into_iter()
                .flatten()
                .filter(|t| *t > now)
                .min()
                .and_then(|t| (t - now).to_std().ok())
                .map(|d| d + Duration::from_millis(50));
            let message = match phase {
                CampaignPhase::Inactive => format!(
                    "all {generated} codes exist and are switched off (spec.active is false)"
                ),
                CampaignPhase::Scheduled => format!(
                    "all {generated} codes exist and become redeemable at {}",
                    terms.valid_from.map(|t| t.to_rfc3339()).unwrap_or_default()
                ),
                CampaignPhase::Expired => format!(
                    "all {generated} codes exist and expired at {}",
                    terms.expires_at.map(|t| t.to_rfc3339()).unwrap_or_default()
                ),
                CampaignPhase::Suspended => format!(
                    "all {generated} codes exist and are suspended: none can be redeemed, \
                     whatever the spec says, until the suspension is lifted (DELETE \
                     /billing/vouchers/suspend/campaigns/{}/{}, or the annotation \
                     catalyst.openova.io/suspended removed, as it was set)",
                    owner.namespace, owner.name
                ),
                _ => format!("all {generated} codes exist and are redeemable"),
            };
            (
                phase,
                Wanted {
                    status: true,
                    reason: match phase {
                        CampaignPhase::Active => "Reconciled",
                        other => other.as_str(),
                    },
                    message,
                },
                None,
                Some(generated),
                counts,
                Some(
                    [boundary, recount]
                        .into_iter()
                        .flatten()
                        .fold(resync, Duration::min),
                ),
            )
        }
    };
    // Counters the reconcile did not read stay as last written.
    let kept = |field: fn(&VoucherCampaignStatus) -> Option<i64>| previous.and_then(field);
    let status = VoucherCampaignStatus {
        observed_generation: Some(generation),
        phase: Some(phase),
        generated: generated.map(|g| i32::try_from(g).unwrap_or(i32::MAX)),
        redeemed: counts.map(|c| c.redeemed).or_else(|| kept(|p| p.redeemed)),
        exhausted_codes: counts
            .map(|c| i32::try_from(c.exhausted).unwrap_or(i32::MAX))
            .or_else(|| previous.and_then(|p| p.exhausted_codes)),
        conditions: [
            Some(condition(READY, ready.clone())),
            beside.map(|type_| {
                condition(
                    type_,
                    Wanted {
                        status: true,
                        ..ready.clone()
                    },
                )
            }),
        ]
        .into_iter()
        .flatten()
        .collect(),
        last_synced_at: previous.and_then(|p| p.last_synced_at),
    };
    // An Event when Ready's reason changes (not for each slice of progress).
    let events = (previous_reason != Some(ready.reason))
        .then(|| EventWording {
            severity: if beside == Some(STALLED) {
                Severity::Warning
            } else {
                Severity::Normal
            },
            reason: match ready.reason {
                "Reconciled" => "Generated",
                other => other,
            },
            note: ready.message.clone(),
        })
        .into_iter()
        .collect();
    Plan {
        status,
        events,
        next,
    }
}

/// Whether writing `wanted` over `current` changes anything a person reads.
fn differs(current: Option<&VoucherCampaignStatus>, wanted: &VoucherCampaignStatus) -> bool {
    let Some(current) = current else {
        return true;
    };
    let strip = |s: &VoucherCampaignStatus| {
        let mut s = s.clone();
        s.last_synced_at = None;
        status::without_times(&mut s.conditions);
        s
    };
    strip(current) != strip(wanted)
}

/// The campaign's code generator, from its Secret's key; why not, in words
/// that say what to do (never the key, nor its length). `issued`: codes the
/// campaign has already, which only the same key derives again.
pub async fn generator(
    client: &kube::Client,
    key_namespace: &str,
    campaign: &VoucherCampaign,
    owner: &Owner,
    issued: u32,
) -> Result<Generator, String> {
    let reference = &campaign.spec.key_secret_ref;
    let (namespace, name, key) = (key_namespace, &reference.name, &reference.key);
    let create = if issued == 0 {
        format!(
            "create it with: kubectl create secret generic {name} -n {namespace} \
             --from-literal={key}=$(openssl rand -hex 32)"
        )
    } else {
        format!(
            "put back the key that generated its first {issued} codes (a new key would make \
             other codes)"
        )
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = match secrets.get_opt(name).await {
        Ok(Some(secret)) => secret,
        Ok(None) => {
            return Err(format!(
                "the Secret {namespace}/{name} named by spec.keySecretRef does not exist; {create}"
            ));
        }
        Err(kube::Error::Api(status)) if status.code == 403 => {
            return Err(format!(
                "the Secret {namespace}/{name} may not be read: the controller's service account \
                 needs get on secrets in {namespace} (the chart grants it in \
                 controller.campaignKeyNamespace, and there only)"
            ));
        }
        Err(error) => {
            return Err(format!(
                "cannot read the Secret {namespace}/{name}: {}",
                crate::telemetry::root_cause(&error)
            ));
        }
    };
    let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(key)) else {
        return Err(format!(
            "the Secret {namespace}/{name} has no key {key:?} (spec.keySecretRef.key); {create}"
        ));
    };
    let spec = &campaign.spec;
    let length = usize::try_from(spec.code_length).unwrap_or_default();
    // A campaign created before the API server checked it: no more codes
    // than its length keeps out of a guesser's reach.
    let count = u32::try_from(spec.count).unwrap_or_default();
    crate::domain::campaign::check_guessing(count.max(issued), length).map_err(|error| {
        format!(
            "the campaign cannot generate more codes: {error}; codeLength cannot change, so create \
             a new campaign for the rest"
        )
    })?;
    Generator::new(&bytes.0, &owner.namespace, &owner.name, &spec.prefix, length).map_err(|error| {
        format!(
            "the campaign cannot generate codes from the Secret {namespace}/{name}: {error}; {create}"
        )
    })
}

/// The owner a campaign's codes are bound to: compared by uid, so a campaign
/// re-created under the same name is a new owner.
pub fn owner(campaign: &VoucherCampaign) -> Result<Owner, Error> {
    Ok(Owner {
        namespace: campaign.namespace().ok_or(Error::NotNamespaced)?,
        name: campaign.name_any(),
        uid: campaign.uid().unwrap_or_default(),
    })
}

/// What the loop remembers of a campaign between reconciles.
#[derive(Clone)]
struct Remembered {
    uid: String,
    generation: i64,
    /// When every code was last compared with the terms (drift).
    checked: Instant,
    /// With every code generated: the counters, when they were read, and
    /// how long before they may be read again.
    counted: Option<(Counts, Instant, Duration)>,
}

/// How long counters that took `took` to aggregate wait before the next
/// read: `--status-min-interval`, or ten times the query (a million codes
/// take about a second), so that counting takes at most a tenth of a
/// Postgres core however hot the campaign.
fn recount_after(min_interval: Duration, took: Duration) -> Duration {
    min_interval.max(took * 10)
}

/// What every campaign reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub store: Store,
    pub recorder: Recorder,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    remembered: Mutex<HashMap<ObjectRef<VoucherCampaign>, Remembered>>,
    failures: Mutex<HashMap<ObjectRef<VoucherCampaign>, u32>>,
}

impl Context {
    pub fn new(
        client: kube::Client,
        store: Store,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Arc<Self> {
        Arc::new(Self {
            recorder: super::recorder(&client, &settings.identity),
            client,
            store,
            settings,
            metrics,
            remembered: Mutex::default(),
            failures: Mutex::default(),
        })
    }

    async fn publish(&self, campaign: &VoucherCampaign, event: EventWording) {
        super::publish(&self.recorder, &campaign.object_ref(&()), event).await;
    }

    /// Brings the campaign's codes to its spec: the terms of the codes that
    /// exist (which needs no key: a campaign whose Secret is gone can still
    /// be switched off), then more codes, for at most [`SLICE`].
    async fn work(
        &self,
        campaign: &VoucherCampaign,
        owner: &Owner,
        terms: &Terms,
    ) -> Result<Found, StoreError> {
        let key = ObjectRef::from_obj(campaign);
        let generation = campaign.metadata.generation.unwrap_or_default();
        let count = u32::try_from(campaign.spec.count).unwrap_or_default();
        let resync = self.settings.resync_interval;
        let min_interval = self.settings.status_min_interval;
        let remembered = self
            .remembered
            .lock()
            .unwrap()
            .get(&key)
            .cloned()
            .filter(|r| {
                r.uid == owner.uid && r.generation == generation && r.checked.elapsed() < resync
            });
        // A complete campaign only needs its counters, read at most so often.
        if let Some((counts, counted, wait)) = remembered.as_ref().and_then(|r| r.counted) {
            let since = counted.elapsed();
            if since < wait {
                return Ok(Found::Progress {
                    generated: count,
                    counts: Some(counts),
                    recount: Some(wait - since),
                });
            }
            let started = Instant::now();
            let fresh = self.store.campaign_counts(owner).await?;
            let wait = recount_after(min_interval, started.elapsed());
            if let Some(r) = self.remembered.lock().unwrap().get_mut(&key) {
                r.counted = Some((fresh, Instant::now(), wait));
            }
            return Ok(Found::Progress {
                generated: count,
                counts: Some(fresh),
                recount: None,
            });
        }
        let policy = campaign.spec.deletion_policy;
        let mut progress = self.store.register_campaign(owner, policy).await?;
        if remembered.is_none() {
            // The codes that exist carry the spec's terms: one statement per
            // chunk, out-of-band edits reverted. A spec change first moves the
            // campaign's own row on, alone (its terms, its one-row switch that
            // every path reads at once, the one audit record); the codes' rows
            // follow chunk by chunk.
            let change =
                progress.terms.as_ref() != Some(terms) || progress.generation != generation;
            let pass = if change {
                let first = TermsPass::Change {
                    before: progress.terms.as_ref(),
                    codes: progress.generated,
                };
                self.store
                    .apply_campaign_terms(owner, (0, 0), terms, generation, &first)
                    .await?;
                TermsPass::Continue
            } else {
                TermsPass::Drift
            };
            let mut from = 0;
            while from < progress.generated {
                let to = (from + UPDATE_CHUNK).min(progress.generated);
                self.store
                    .apply_campaign_terms(owner, (from, to), terms, generation, &pass)
                    .await?;
                from = to;
            }
            progress.generation = generation;
            self.remembered.lock().unwrap().insert(
                key.clone(),
                Remembered {
                    uid: owner.uid.clone(),
                    generation,
                    checked: Instant::now(),
                    counted: None,
                },
            );
        }
        if progress.generated < count {
            // More codes, a chunk per transaction, for one slice: only now is the key needed.
            let generator = match generator(
                &self.client,
                &self.settings.key_namespace,
                campaign,
                owner,
                progress.generated,
            )
            .await
            {
                Ok(generator) => generator,
                Err(why) => {
                    return Ok(Found::KeyUnavailable {
                        why,
                        generated: progress.generated,
                    });
                }
            };
            let started = Instant::now();
            while progress.generated < count && started.elapsed() < SLICE {
                let from = progress.generated;
                let to = (from + CHUNK as u32).min(count);
                let codes: Vec<_> = (from..to).map(|i| generator.code(i)).collect();
                let batch = Batch {
                    from,
                    codes: &codes,
                    terms,
                    of: count,
                    generation,
                    key_fingerprint: generator.fingerprint(),
                };
                match self.store.generate_campaign_codes(owner, &batch).await? {
                    Chunk::Generated { generated } => {
                        self.metrics
                            .campaign_codes_generated
                            .inc_by(u64::from(generated - from));
                        progress.generated = generated;
                    }
                    Chunk::Collision { index } => {
                        tracing::warn!(campaign = %owner, index, "a campaign code exists already; generation stopped");
                        return Ok(Found::Collision {
                            index,
                            generated: progress.generated,
                        });
                    }
                    Chunk::KeyChanged => {
                        let reference = &campaign.spec.key_secret_ref.name;
                        return Ok(Found::KeyUnavailable {
                            why: format!(
                                "the key in the Secret {}/{reference} is not the one that \
                                 generated this campaign's first {from} codes (a new key would \
                                 make other codes); put that key back, or issue new codes from a \
                                 new campaign",
                                self.settings.key_namespace
                            ),
                            generated: from,
                        });
                    }
                    // Being deleted (this replica may have lost its lease): no more codes.
                    Chunk::Released => {
                        return Ok(Found::Progress {
                            generated: progress.generated,
                            counts: None,
                            recount: None,
                        });
                    }
                    // Another replica moved it on (a leader change): read where it is.
                    Chunk::Moved => {
                        self.remembered.lock().unwrap().remove(&key);
                        progress = self.store.register_campaign(owner, policy).await?;
                        if progress.generation != generation {
                            break;
                        }
                    }
                }
            }
            if progress.generated < count {
                return Ok(Found::Progress {
                    generated: progress.generated,
                    counts: None,
                    recount: None,
                });
            }
        }
        let started = Instant::now();
        let counts = self.store.campaign_counts(owner).await?;
        let wait = recount_after(min_interval, started.elapsed());
        if let Some(r) = self.remembered.lock().unwrap().get_mut(&key) {
            r.counted = Some((counts, Instant::now(), wait));
        }
        Ok(Found::Progress {
            generated: progress.generated,
            counts: Some(counts),
            recount: None,
        })
    }

    async fn apply(&self, campaign: &VoucherCampaign) -> Result<Action, Error> {
        let owner = owner(campaign)?;
        let spec = &campaign.spec;
        let terms = Terms {
            credit_omr: spec.credit_omr,
            description: spec.description.clone(),
            active: spec.active,
            max_redemptions: spec.redemptions_per_code,
            valid_from: spec.valid_from,
            expires_at: spec.expires_at,
        };
        let mut failure = None;
        let mut suspended = false;
        let found = if !self.settings.issuers.allows(&owner.namespace) {
            Found::Forbidden(self.settings.issuers.clone())
        } else if let Err(error) = terms.validate() {
            Found::InvalidTerms(error)
        } else {
            let worked = async {
                // Its annotation's suspension, whoever owns the spec (idempotent,
                // audited when it changes), before anything remembered: an
                // annotation moves no generation. Every code at once, on every path.
                let annotated = super::suspended_by_annotation(campaign);
                let held = self
                    .store
                    .set_campaign_annotation_suspension(&owner, annotated)
                    .await?;
                suspended = held.suspended;
                self.work(campaign, &owner, &terms).await
            };
            match worked.await {
                Ok(found) => found,
                Err(error) => {
                    let said = crate::telemetry::describe(&error);
                    failure = Some(error);
                    Found::DatabaseUnavailable(said)
                }
            }
        };
        let seen = Seen {
            owner: &owner,
            count: u32::try_from(spec.count).unwrap_or_default(),
            terms: &terms,
            generation: campaign.metadata.generation.unwrap_or_default(),
            previous: campaign.status.as_ref(),
            now: Utc::now(),
            resync: self.settings.resync_interval,
            suspended,
        };
        let plan = decide(found, seen);
        for event in plan.events {
            self.publish(campaign, event).await;
        }
        let written = self.write_status(campaign, plan.status).await;
        if let Some(error) = failure {
            return Err(error.into());
        }
        written?;
        Ok(match plan.next {
            Some(delay) => Action::requeue(delay.min(self.settings.resync_interval)),
            None => Action::await_change(),
        })
    }

    async fn write_status(
        &self,
        campaign: &VoucherCampaign,
        mut wanted: VoucherCampaignStatus,
    ) -> Result<(), Error> {
        if !differs(campaign.status.as_ref(), &wanted) {
            return Ok(());
        }
        wanted.last_synced_at = Some(Utc::now());
        let patch = json!({
            "apiVersion": VoucherCampaign::api_version(&()),
            "kind": VoucherCampaign::kind(&()),
            "status": wanted,
        });
        let namespace = campaign.namespace().ok_or(Error::NotNamespaced)?;
        Api::<VoucherCampaign>::namespaced(self.client.clone(), &namespace)
            .patch_status(
                &campaign.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        Ok(())
    }

    async fn cleanup(&self, campaign: &VoucherCampaign) -> Result<Action, Error> {
        let owner = owner(campaign)?;
        self.remembered
            .lock()
            .unwrap()
            .remove(&ObjectRef::from_obj(campaign));
        // Deleting the CRD deletes every campaign: their codes are orphaned, never revoked.
        let crd_going = super::crd_going(&self.client, CRD)
            .await
            .map_err(Error::CrdCheck)?;
        let asked = crd_going.then_some(DeletionPolicy::Orphan);
        let applied = loop {
            if let Release::Done(applied) = self.store.release_campaign(&owner, asked).await? {
                break applied;
            }
        };
        // Said as the store applied it: the policy of the campaign's last apply.
        let said = match applied {
            None => None,
            Some(DeletionPolicy::Revoke) => Some((
                Severity::Normal,
                "Revoked",
                "the campaign's codes were revoked (deletionPolicy Revoke); redemption history is kept",
            )),
            Some(DeletionPolicy::Orphan) if crd_going => Some((
                Severity::Warning,
                "OrphanedWhileCRDDeleted",
                "the VoucherCampaign CRD is being deleted, so the campaign's codes were orphaned \
                 (left live in the billing database), not revoked",
            )),
            Some(DeletionPolicy::Orphan) => Some((
                Severity::Normal,
                "Orphaned",
                "the campaign's codes were left live as they are (deletionPolicy Orphan); they \
                 stay the campaign's: no Voucher can take them, the admin revoke revokes one",
            )),
        };
        if let Some((severity, reason, note)) = said {
            let note = note.into();
            self.publish(
                campaign,
                EventWording {
                    severity,
                    reason,
                    note,
                },
            )
            .await;
        }
        self.failures
            .lock()
            .unwrap()
            .remove(&ObjectRef::from_obj(campaign));
        Ok(Action::await_change())
    }
}

/// Called by kube-runtime for every change of a campaign and every requeue.
pub async fn reconcile(campaign: Arc<VoucherCampaign>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = campaign.namespace().ok_or(Error::NotNamespaced)?;
    let api: Api<VoucherCampaign> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, campaign.clone(), |event| async {
        match event {
            finalizer::Event::Apply(c) => ctx.apply(&c).await,
            finalizer::Event::Cleanup(c) => ctx.cleanup(&c).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .campaign_reconciles
        .get_or_create(&ResultLabel { result: label })
        .inc();
    if result.is_ok() {
        ctx.failures
            .lock()
            .unwrap()
            .remove(&ObjectRef::from_obj(campaign.as_ref()));
    }
    result
}

/// Called by kube-runtime when `reconcile` fails: retry with a per-campaign
/// exponential backoff.
pub fn error_policy(campaign: Arc<VoucherCampaign>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = {
        let mut failures = ctx.failures.lock().unwrap();
        let count = failures
            .entry(ObjectRef::from_obj(campaign.as_ref()))
            .or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    let delay = super::retry_delay(failures);
    tracing::warn!(campaign = %campaign.name_any(), %error, failures, ?delay, "campaign reconcile failed; retrying");
    Action::requeue(delay)
}

/// Runs the campaign loop until `stop`. A cluster without the campaign CRD
/// (a chart upgrade does not install new CRDs) runs none, and says so.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    let api: Api<VoucherCampaign> = match &ctx.settings.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
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
    let (rows_changed, catch_up) = super::wake_on_rows(&ctx.store, stop.clone(), move |changed| {
        use crate::store::notify::Changed;
        let store = store.clone();
        async move {
            match changed {
                Changed::Code(code) => store.campaign_of(&code).await.ok().flatten(),
                // Its switch or its suspension: its status says so at once.
                Changed::Campaign(uid) => store.campaign_by_uid(&uid).await.ok().flatten(),
                Changed::Any => None,
            }
        }
    });
    let (cache, writer) = reflector::store();
    let campaigns = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(super::trim)
        .reflect(writer)
        .applied_objects();
    let config = kube::runtime::controller::Config::default().concurrency(ctx.settings.concurrency);
    let shutdown = stop.clone();
    let controller = Controller::for_stream(campaigns, cache)
        .with_config(config)
        .reconcile_on(rows_changed)
        .reconcile_all_on(catch_up)
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "campaign reconcile result");
            }
        });
    super::until_stopped(controller, stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner {
            namespace: "billing".into(),
            name: "bill-2027".into(),
            uid: "u-1".into(),
        }
    }

    fn seen<'a>(
        owner: &'a Owner,
        terms: &'a Terms,
        previous: Option<&'a VoucherCampaignStatus>,
    ) -> Seen<'a> {
        Seen {
            owner,
            count: 2000,
            terms,
            generation: 3,
            previous,
            now: Utc::now(),
            resync: Duration::from_secs(300),
            suspended: false,
        }
    }

    fn ready(status: &VoucherCampaignStatus) -> (String, String) {
        let c = status.conditions.iter().find(|c| c.type_ == READY).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn a_campaign_generating_reports_progress_and_comes_back_at_once() {
        let (owner, terms) = (owner(), Terms::granting(5));
        let found = Found::Progress {
            generated: 500,
            counts: None,
            recount: None,
        };
        let plan = decide(found, seen(&owner, &terms, None));
        assert_eq!(plan.status.phase, Some(CampaignPhase::Generating));
        assert_eq!(plan.status.generated, Some(500));
        assert_eq!(plan.next, Some(Duration::ZERO));
        let reconciling = plan
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == RECONCILING)
            .unwrap();
        assert_eq!(reconciling.message, "generated 500 of 2000 codes");
        // The Event says generation began; the next slice says nothing new.
        assert_eq!(plan.events.len(), 1);
        let again = decide(
            Found::Progress {
                generated: 1000,
                counts: None,
                recount: None,
            },
            seen(&owner, &terms, Some(&plan.status)),
        );
        assert!(again.events.is_empty());
    }

    #[test]
    fn a_complete_campaign_is_ready_with_its_counters() {
        let (owner, terms) = (owner(), Terms::granting(5));
        let counts = Counts {
            codes: 2000,
            redeemed: 7,
            exhausted: 6,
        };
        let found = Found::Progress {
            generated: 2000,
            counts: Some(counts),
            recount: None,
        };
        let plan = decide(found, seen(&owner, &terms, None));
        assert_eq!(plan.status.phase, Some(CampaignPhase::Active));
        assert_eq!(ready(&plan.status), ("True".into(), "Reconciled".into()));
        assert_eq!(
            (plan.status.redeemed, plan.status.exhausted_codes),
            (Some(7), Some(6))
        );
        assert_eq!(plan.status.conditions.len(), 1, "no Stalled or Reconciling");
        let inactive = Terms {
            active: false,
            ..terms
        };
        let plan = decide(
            Found::Progress {
                generated: 2000,
                counts: Some(counts),
                recount: Some(Duration::from_millis(300)),
            },
            seen(&owner, &inactive, None),
        );
        assert_eq!(plan.status.phase, Some(CampaignPhase::Inactive));
        assert_eq!(
            plan.next,
            Some(Duration::from_millis(300)),
            "counters read too recently are read again once allowed"
        );
    }

    #[test]
    fn a_collision_stalls_naming_the_index_never_the_code() {
        let (owner, terms) = (owner(), Terms::granting(5));
        let plan = decide(
            Found::Collision {
                index: 1234,
                generated: 1000,
            },
            seen(&owner, &terms, None),
        );
        assert_eq!(plan.status.phase, Some(CampaignPhase::Stalled));
        assert_eq!(
            ready(&plan.status),
            ("False".into(), "CodeCollision".into())
        );
        let stalled = plan
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == STALLED)
            .unwrap();
        assert!(
            stalled.message.contains("code number 1234"),
            "{}",
            stalled.message
        );
        assert_eq!(plan.events[0].severity, Severity::Warning);
        assert_eq!(plan.status.generated, Some(1000));
    }

    #[test]
    fn counting_a_large_campaign_takes_a_tenth_of_the_time_at_most() {
        let min = Duration::from_secs(2);
        assert_eq!(recount_after(min, Duration::from_millis(5)), min);
        assert_eq!(
            recount_after(min, Duration::from_millis(900)),
            Duration::from_secs(9)
        );
    }

    #[test]
    fn a_missing_key_is_looked_for_again_soon() {
        let (owner, terms) = (owner(), Terms::granting(5));
        let plan = decide(
            Found::KeyUnavailable {
                why: "the Secret billing/k does not exist".into(),
                generated: 0,
            },
            seen(&owner, &terms, None),
        );
        assert_eq!(plan.next, Some(KEY_RETRY));
        assert_eq!(ready(&plan.status).1, "KeyUnavailable");
    }

    #[test]
    fn a_database_failure_is_retried_with_the_counters_kept() {
        let (owner, terms) = (owner(), Terms::granting(5));
        let previous = VoucherCampaignStatus {
            generated: Some(2000),
            redeemed: Some(9),
            ..Default::default()
        };
        let plan = decide(
            Found::DatabaseUnavailable("refused".into()),
            seen(&owner, &terms, Some(&previous)),
        );
        assert_eq!(plan.next, None);
        assert_eq!(
            (plan.status.generated, plan.status.redeemed),
            (Some(2000), Some(9))
        );
    }
}
