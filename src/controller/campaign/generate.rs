//! A campaign's codes brought to its spec: the terms of those that exist
//! (which needs no key), then more codes, in slices of about [`SLICE`], each
//! chunk committed on its own so that a crash or a leader change resumes at
//! the last committed one; then its counters, read at most so often.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;

use super::plan::{CampaignFound, recount_after};
use crate::api::campaign::VoucherCampaign;
use crate::controller::Context;
use crate::domain::Owner;
use crate::domain::Terms;
use crate::domain::campaign::Generator;
use crate::store::StoreError;
use crate::store::campaigns::{Batch, CHUNK, Chunk, Counts, Progress, TermsPass, UPDATE_CHUNK};

/// Generation work one reconcile does before it writes its progress and
/// yields to the others.
const SLICE: Duration = Duration::from_secs(2);

/// What the loop remembers of a campaign between reconciles.
#[derive(Clone)]
pub(super) struct Remembered {
    uid: String,
    generation: i64,
    /// When every code was last compared with the terms (drift).
    checked: Instant,
    /// With every code generated: the counters, when they were read, and
    /// how long before they may be read again.
    counted: Option<(Counts, Instant, Duration)>,
}

/// Brings the campaign's codes to its spec: the terms of the codes that
/// exist (which needs no key: a campaign whose Secret is gone can still be
/// switched off), then more codes, for at most [`SLICE`].
pub(super) async fn work(
    ctx: &Context,
    campaign: &VoucherCampaign,
    owner: &Owner,
    terms: &Terms,
) -> Result<CampaignFound, StoreError> {
    let key = ObjectRef::from_obj(campaign);
    let generation = campaign.metadata.generation.unwrap_or_default();
    let count = u32::try_from(campaign.spec.count).unwrap_or_default();
    let resync = ctx.settings.resync_interval;
    let remembered = ctx
        .campaigns
        .remembered
        .lock()
        .unwrap()
        .get(&key)
        .cloned()
        .filter(|r| {
            r.uid == owner.uid && r.generation == generation && r.checked.elapsed() < resync
        });
    // A complete campaign only needs its counters, read at most so often.
    if let Some(counted) = remembered.as_ref().and_then(|r| r.counted) {
        return recount(ctx, &key, owner, count, counted).await;
    }
    let policy = campaign.spec.deletion_policy;
    let mut progress = ctx.store.register_campaign(owner, policy).await?;
    if remembered.is_none() {
        apply_terms(ctx, owner, terms, generation, &mut progress).await?;
        ctx.campaigns.remembered.lock().unwrap().insert(
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
        if let Some(stopped) = generate(ctx, campaign, owner, terms, &mut progress).await? {
            return Ok(stopped);
        }
        if progress.generated < count {
            return Ok(CampaignFound::Progress {
                generated: progress.generated,
                counts: None,
                recount: None,
            });
        }
    }
    count_codes(ctx, &key, owner, progress.generated).await
}

/// The counters of a complete campaign: as last read until they may be read
/// again.
async fn recount(
    ctx: &Context,
    key: &ObjectRef<VoucherCampaign>,
    owner: &Owner,
    count: u32,
    (counts, counted, wait): (Counts, Instant, Duration),
) -> Result<CampaignFound, StoreError> {
    let since = counted.elapsed();
    if since < wait {
        return Ok(CampaignFound::Progress {
            generated: count,
            counts: Some(counts),
            recount: Some(wait - since),
        });
    }
    count_codes(ctx, key, owner, count).await
}

/// Reads the counters of every code, and remembers when and how long it took.
async fn count_codes(
    ctx: &Context,
    key: &ObjectRef<VoucherCampaign>,
    owner: &Owner,
    generated: u32,
) -> Result<CampaignFound, StoreError> {
    let started = Instant::now();
    let counts = ctx.store.campaign_counts(owner).await?;
    let wait = recount_after(ctx.settings.status_min_interval, started.elapsed());
    if let Some(r) = ctx.campaigns.remembered.lock().unwrap().get_mut(key) {
        r.counted = Some((counts, Instant::now(), wait));
    }
    Ok(CampaignFound::Progress {
        generated,
        counts: Some(counts),
        recount: None,
    })
}

/// The codes that exist carry the spec's terms: one statement per chunk,
/// out-of-band edits reverted. A spec change first moves the campaign's own
/// row on, alone (its terms, its one-row switch that every path reads at
/// once, the one audit record); the codes' rows follow chunk by chunk.
async fn apply_terms(
    ctx: &Context,
    owner: &Owner,
    terms: &Terms,
    generation: i64,
    progress: &mut Progress,
) -> Result<(), StoreError> {
    let change = progress.terms.as_ref() != Some(terms) || progress.generation != generation;
    let pass = if change {
        let first = TermsPass::Change {
            before: progress.terms.as_ref(),
            codes: progress.generated,
        };
        ctx.store
            .apply_campaign_terms(owner, (0, 0), terms, generation, &first)
            .await?;
        TermsPass::Continue
    } else {
        TermsPass::Drift
    };
    let mut from = 0;
    while from < progress.generated {
        let to = (from + UPDATE_CHUNK).min(progress.generated);
        ctx.store
            .apply_campaign_terms(owner, (from, to), terms, generation, &pass)
            .await?;
        from = to;
    }
    progress.generation = generation;
    Ok(())
}

/// More codes, a chunk per transaction, for one slice: only now is the key
/// needed. `Some`: generation stopped, and why.
async fn generate(
    ctx: &Context,
    campaign: &VoucherCampaign,
    owner: &Owner,
    terms: &Terms,
    progress: &mut Progress,
) -> Result<Option<CampaignFound>, StoreError> {
    let generation = campaign.metadata.generation.unwrap_or_default();
    let count = u32::try_from(campaign.spec.count).unwrap_or_default();
    let key_namespace = &ctx.settings.key_namespace;
    let generator = match generator(
        &ctx.client,
        key_namespace,
        campaign,
        owner,
        progress.generated,
    )
    .await
    {
        Ok(generator) => generator,
        Err(why) => {
            return Ok(Some(CampaignFound::KeyUnavailable {
                why,
                generated: progress.generated,
            }));
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
        let chunk = ctx.store.generate_campaign_codes(owner, &batch).await?;
        match after_chunk(ctx, campaign, owner, chunk, from, progress).await? {
            AfterChunk::Go => {}
            AfterChunk::Stop(found) => return Ok(Some(found)),
            AfterChunk::Yield => break,
        }
    }
    Ok(None)
}

/// What generation does after a chunk.
enum AfterChunk {
    Go,
    /// Generation stopped, and why.
    Stop(CampaignFound),
    /// Another replica moved the campaign to another generation: this
    /// reconcile yields.
    Yield,
}

/// Takes in what writing a chunk from `from` came to.
async fn after_chunk(
    ctx: &Context,
    campaign: &VoucherCampaign,
    owner: &Owner,
    chunk: Chunk,
    from: u32,
    progress: &mut Progress,
) -> Result<AfterChunk, StoreError> {
    Ok(match chunk {
        Chunk::Generated { generated } => {
            ctx.metrics
                .campaign_codes_generated
                .inc_by(u64::from(generated - from));
            progress.generated = generated;
            AfterChunk::Go
        }
        Chunk::Collision { index } => {
            tracing::warn!(campaign = %owner, index, "a campaign code exists already; generation stopped");
            AfterChunk::Stop(CampaignFound::Collision {
                index,
                generated: progress.generated,
            })
        }
        Chunk::KeyChanged => {
            let reference = &campaign.spec.key_secret_ref.name;
            let key_namespace = &ctx.settings.key_namespace;
            AfterChunk::Stop(CampaignFound::KeyUnavailable {
                why: format!(
                    "the key in the Secret {key_namespace}/{reference} is not the one that \
                     generated this campaign's first {from} codes (a new key would make \
                     other codes); put that key back, or issue new codes from a new campaign"
                ),
                generated: from,
            })
        }
        // Being deleted (this replica may have lost its lease): no more codes.
        Chunk::Released => AfterChunk::Stop(CampaignFound::Progress {
            generated: progress.generated,
            counts: None,
            recount: None,
        }),
        // Another replica moved it on (a leader change): read where it is.
        Chunk::Moved => {
            ctx.campaigns.forget(campaign);
            let generation = campaign.metadata.generation.unwrap_or_default();
            *progress = ctx
                .store
                .register_campaign(owner, campaign.spec.deletion_policy)
                .await?;
            match progress.generation == generation {
                true => AfterChunk::Go,
                false => AfterChunk::Yield,
            }
        }
    })
}

/// The campaign's code generator, from its Secret's key; why not, in words
/// that say what to do (never the key, nor its length). `issued`: codes the
/// campaign has already, which only the same key derives again.
pub(crate) async fn generator(
    client: &kube::Client,
    key_namespace: &str,
    campaign: &VoucherCampaign,
    owner: &Owner,
    issued: u32,
) -> Result<Generator, String> {
    let reference = &campaign.spec.key_secret_ref;
    let (namespace, name, key) = (key_namespace, &reference.name, &reference.key);
    // What to do: make the Secret, or (it exists) write the key into it; or, once codes were
    // issued, put the same key back.
    let fix = |exists: bool| match (issued, exists) {
        (0, false) => format!(
            "create it with: kubectl create secret generic {name} -n {namespace} \
             --from-literal={key}=$(openssl rand -hex 32)"
        ),
        (0, true) => format!(
            "write a key into it with: kubectl create secret generic {name} -n {namespace} \
             --from-literal={key}=$(openssl rand -hex 32) --dry-run=client -o yaml | kubectl \
             apply -f -"
        ),
        _ => format!(
            "put back the key that generated its first {issued} codes (a new key would make \
             other codes)"
        ),
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = match secrets.get_opt(name).await {
        Ok(Some(secret)) => secret,
        Ok(None) => {
            return Err(format!(
                "the Secret {namespace}/{name} named by spec.keySecretRef does not exist; {}",
                fix(false)
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
            "the Secret {namespace}/{name} has no key {key:?} (spec.keySecretRef.key); {}",
            fix(true)
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
    Generator::new(
        &bytes.0,
        &owner.namespace,
        &owner.name,
        &spec.prefix,
        length,
    )
    .map_err(|error| {
        format!(
            "the campaign cannot generate codes from the Secret {namespace}/{name}: {error}; {}",
            fix(true)
        )
    })
}
