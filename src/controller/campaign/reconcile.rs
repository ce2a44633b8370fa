//! A campaign's reconcile: gather the facts (its suspension, its codes'
//! progress and counters, the Secret's key), let `plan::decide` make the
//! plan, carry it out.

use chrono::Utc;
use kube::Resource;
use kube::runtime::controller::Action;

use super::CRD;
use super::generate::work;
use super::plan::{CampaignFound, CampaignSeen, decide};
use crate::api::campaign::{VoucherCampaign, VoucherCampaignStatus};
use crate::controller::conditions::differs;
use crate::controller::runtime::{self, owner};
use crate::controller::{Context, Error, suspended_by_annotation};
use crate::domain::{DeletionPolicy, EventWording, Owner, Severity, Terms};
use crate::store::StoreError;
use crate::store::campaigns::Release;

async fn publish(ctx: &Context, campaign: &VoucherCampaign, event: EventWording) {
    ctx.publish_on(&campaign.object_ref(&()), event).await;
}

/// The terms every code of `campaign` carries.
fn terms(campaign: &VoucherCampaign) -> Terms {
    let spec = &campaign.spec;
    Terms {
        credit_omr: spec.credit_omr.unwrap_or(0),
        discount: spec
            .discount
            .as_ref()
            .map(crate::api::DiscountSpec::discount),
        description: spec.description.clone(),
        active: spec.active,
        max_redemptions: spec.redemptions_per_code,
        valid_from: spec.valid_from,
        expires_at: spec.expires_at,
    }
}

/// Applies a campaign: gathers what `decide` needs, then carries out its plan.
pub(super) async fn apply(ctx: &Context, campaign: &VoucherCampaign) -> Result<Action, Error> {
    let owner = owner(campaign)?;
    let terms = terms(campaign);
    let mut failure = None;
    let mut suspended = false;
    let found = if !ctx.settings.issuers.allows(&owner.namespace) {
        CampaignFound::Forbidden(ctx.settings.issuers.clone())
    } else if let Err(error) = terms.validate_for(&ctx.settings.billing.categories) {
        CampaignFound::InvalidTerms(error)
    } else {
        match suspend_and_work(ctx, campaign, &owner, &terms).await {
            Ok((found, held)) => {
                suspended = held;
                found
            }
            Err(error) => {
                let said = crate::telemetry::describe(&error);
                failure = Some(error);
                CampaignFound::DatabaseUnavailable(said)
            }
        }
    };
    let seen = CampaignSeen {
        owner: &owner,
        count: u32::try_from(campaign.spec.count).unwrap_or_default(),
        terms: &terms,
        generation: campaign.metadata.generation.unwrap_or_default(),
        previous: campaign.status.as_ref(),
        now: Utc::now(),
        resync: ctx.settings.resync_interval,
        suspended,
    };
    let mut plan = decide(found, seen);
    plan.status.grant = Some(terms.grant(&ctx.settings.billing.currency));
    for event in plan.events {
        publish(ctx, campaign, event).await;
    }
    let written = write_status(ctx, campaign, plan.status).await;
    if let Some(error) = failure {
        return Err(error.into());
    }
    written?;
    Ok(match plan.next {
        Some(delay) => Action::requeue(delay.min(ctx.settings.resync_interval)),
        None => Action::await_change(),
    })
}

/// Its annotation's suspension, whoever owns the spec (idempotent, audited
/// when it changes), before anything remembered: an annotation moves no
/// generation. Every code at once, on every path. Then the codes' work;
/// with whether the campaign is suspended now.
async fn suspend_and_work(
    ctx: &Context,
    campaign: &VoucherCampaign,
    owner: &Owner,
    terms: &Terms,
) -> Result<(CampaignFound, bool), StoreError> {
    let annotated = suspended_by_annotation(campaign);
    let held = ctx
        .store
        .set_campaign_annotation_suspension(owner, annotated)
        .await?;
    let found = work(ctx, campaign, owner, terms).await?;
    Ok((found, held.suspended))
}

async fn write_status(
    ctx: &Context,
    campaign: &VoucherCampaign,
    mut wanted: VoucherCampaignStatus,
) -> Result<(), Error> {
    if !differs(campaign.status.as_ref(), &wanted) {
        return Ok(());
    }
    wanted.last_synced_at = Some(Utc::now());
    runtime::patch_status(&ctx.client, campaign, &wanted).await
}

/// A deleted campaign: its codes released as its last apply's deletion
/// policy says — orphaned, never revoked, while the CRD itself is being deleted.
pub(super) async fn cleanup(ctx: &Context, campaign: &VoucherCampaign) -> Result<Action, Error> {
    let owner = owner(campaign)?;
    ctx.campaigns.forget(campaign);
    // Deleting the CRD deletes every campaign: their codes are orphaned, never revoked.
    let crd_going = runtime::crd_going(&ctx.client, CRD).await?;
    let asked = crd_going.then_some(DeletionPolicy::Orphan);
    let applied = loop {
        if let Release::Done(applied) = ctx.store.release_campaign(&owner, asked).await? {
            break applied;
        }
    };
    if let Some(event) = released(applied, crd_going) {
        publish(ctx, campaign, event).await;
    }
    ctx.campaigns.failures.clear(campaign);
    Ok(Action::await_change())
}

/// The Event of a release, as the store applied it: the policy of the
/// campaign's last apply.
fn released(applied: Option<DeletionPolicy>, crd_going: bool) -> Option<EventWording> {
    let (severity, reason, note) = match applied? {
        DeletionPolicy::Revoke => (
            Severity::Normal,
            "Revoked",
            "the campaign's codes were revoked (deletionPolicy Revoke); redemption history is kept",
        ),
        DeletionPolicy::Orphan if crd_going => (
            Severity::Warning,
            "OrphanedWhileCRDDeleted",
            "the VoucherCampaign CRD is being deleted, so the campaign's codes were orphaned \
             (left live in the billing database), not revoked",
        ),
        DeletionPolicy::Orphan => (
            Severity::Normal,
            "Orphaned",
            "the campaign's codes were left live as they are (deletionPolicy Orphan); they \
             stay the campaign's: no Voucher can take them, the admin revoke revokes one",
        ),
    };
    Some(EventWording {
        severity,
        reason,
        note: note.into(),
    })
}
