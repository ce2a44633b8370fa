//! A Voucher's reconcile: gather the facts (the row, through the store; the
//! API server), let `plan::decide` make the plan, carry it out.

use std::time::{Duration, Instant};

use chrono::Utc;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::global;
use super::plan::{self, HUB_LOOK, Next, VoucherFound, VoucherSeen};
use super::{CRD, sweep};
use crate::api::{AllotmentStatus, Scope, Voucher, VoucherStatus};
use crate::controller::conditions::differs;
use crate::controller::runtime::{self, owner};
use crate::controller::{Context, Error, suspended_by_annotation};
use crate::domain::{
    Actor, AuditKind, Code, DeletionPolicy, EventWording, Facts, Owner, Severity, Terms,
};
use crate::store::StoreError;
use crate::store::sync::{Global, Released, Synced, Wanted};

async fn publish(ctx: &Context, voucher: &Voucher, event: EventWording) {
    ctx.publish_on(&voucher.object_ref(&()), event).await;
}

/// Applies a Voucher: gathers what `plan::decide` needs, then carries out its plan.
pub(super) async fn apply(ctx: &Context, voucher: &Voucher) -> Result<Action, Error> {
    let owner = owner(voucher)?;
    let code = voucher.code();
    let now = Utc::now();
    let copy = voucher.spec.terms();
    // The global namespace holds the vendor's copies: issued at the hub, not here.
    let issuer = ctx.settings.issuers.allows(&owner.namespace)
        || owner.namespace == ctx.settings.global_namespace;
    let place = match &code {
        Ok(code) if issuer => global::place(ctx, voucher, &owner, code).await,
        _ => Ok(None),
    };
    let (record, refusal) = match place {
        Ok(record) => (record, None),
        Err(found) => (None, Some(found)),
    };
    // A global code's row carries the vendor's terms, its credit in this Sovereign's currency;
    // the copy is only compared with them.
    let currency = ctx.settings.billing.currency.as_str();
    let (terms, differs, refusal) = match &record {
        Some(record) => {
            let copied =
                voucher
                    .spec
                    .global_record(&record.uid, record.ceiling, record.per_request);
            let differs = copied.map(|c| record.differences(&c)).unwrap_or_default();
            match record.terms_in(currency, &copy) {
                Some(terms) => (terms, differs, refusal),
                None => {
                    let offered = record.credits.keys().cloned().collect();
                    let currency = currency.to_owned();
                    let lacking = VoucherFound::NoCreditInCurrency { currency, offered };
                    // The hub's terms (valid there) stand in, with its first credit: nothing
                    // is written from them, and the status says every credit it states.
                    let first = record.credits.values().next().copied();
                    let hub = record.terms.clone().unwrap_or_else(|| copy.clone());
                    let credit_omr = first.unwrap_or(hub.credit_omr);
                    (Terms { credit_omr, ..hub }, differs, Some(lacking))
                }
            }
        }
        None => (copy.clone(), Vec::new(), refusal),
    };
    if let (Some(VoucherFound::NoCreditInCurrency { .. }), Ok(code)) = (&refusal, &code) {
        // Offered here no more: the allotment loop returns the share, the row goes inactive.
        ctx.store.withdraw(code).await?;
    }
    let bound = record.as_ref().map(|record| Global {
        hub_uid: &record.uid,
        offered: record.offered(now),
        return_asked: record.asks_returns(),
        per_customer_global: record.per_customer_global,
    });
    let (found, failure) = match (&code, terms.validate_for(&ctx.settings.billing.categories)) {
        _ if !issuer => (VoucherFound::Forbidden(ctx.settings.issuers.clone()), None),
        (Err(error), _) => (VoucherFound::InvalidCode(error.clone()), None),
        (_, Err(error)) => (VoucherFound::InvalidTerms(error), None),
        (Ok(_), Ok(())) if refusal.is_some() => (refusal.expect("just checked"), None),
        (Ok(code), Ok(())) => match sync(ctx, code, &owner, &terms, voucher, now, bound).await {
            Ok(synced) => (VoucherFound::Synced(synced), None),
            // This replica's copy is older than what another applied: it
            // writes nothing, the status neither; the watch brings the
            // newer copy.
            Err(error) if error.is_superseded() => {
                tracing::info!(voucher = %owner, error = %crate::telemetry::describe(&error),
                    "an older copy of the Voucher: nothing written");
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            Err(error) => (
                VoucherFound::DatabaseUnavailable(crate::telemetry::describe(&error)),
                Some(error),
            ),
        },
    };
    let grant = match &record {
        Some(record) if matches!(found, VoucherFound::NoCreditInCurrency { .. }) => {
            record.grants(&terms, &ctx.settings.billing.currency)
        }
        _ => terms.grant(&ctx.settings.billing.currency),
    };
    let seen = VoucherSeen {
        code: code.as_ref().ok(),
        owner: &owner,
        generation: voucher.metadata.generation.unwrap_or_default(),
        previous: voucher.status.as_ref(),
        now,
        resync: ctx.settings.resync_interval,
        grant: &grant,
        differs: &differs,
    };
    let mut plan = plan::decide(found, seen);
    plan.status.grant = Some(grant.clone());
    if let (Some(_), Ok(code)) = (bound, &code) {
        plan.status.allotment = ctx.store.held(code).await?.map(|held| AllotmentStatus {
            share: i64::try_from(held.local.share).unwrap_or(i64::MAX),
            sovereigns: None,
        });
    }
    if let (Some(holder), Ok(code)) = (&plan.audit_conflict, &code) {
        ctx.store.audit_conflict(code, &owner, holder).await?;
    }
    for kind in &plan.audited {
        ctx.count_audit(*kind);
    }
    for event in plan.events {
        publish(ctx, voucher, event).await;
    }
    let written = write_status(ctx, voucher, plan.status).await;
    ctx.vouchers.remember_phase(ctx, voucher, Some(plan.phase));
    if let Some(error) = failure {
        // The database error is what gets retried; the status was best effort.
        return Err(error.into());
    }
    // A global copy looks at the hub's definition again soon: the vendor's
    // switch-off or new window reaches this Sovereign within that time.
    if bound.is_some() {
        plan.next = plan.next.at_most(Some(HUB_LOOK));
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
    ctx: &Context,
    code: &Code,
    owner: &Owner,
    terms: &Terms,
    voucher: &Voucher,
    now: chrono::DateTime<Utc>,
    global: Option<Global<'_>>,
) -> Result<Synced, StoreError> {
    let mut request = voucher.request();
    // The hub's definition is what lets a copy take up its global row (left
    // unowned when a copy was deleted); a row of this Sovereign's own is never
    // a global one's to take (the store refuses it).
    request.adopt |= global.is_some();
    let wanted = Wanted {
        code,
        owner,
        generation: voucher.metadata.generation.unwrap_or_default(),
        terms,
        request,
        deletion_policy: voucher.spec.deletion_policy,
        suspended: suspended_by_annotation(voucher),
        now,
        global,
    };
    let synced = ctx.store.sync_voucher(&wanted).await?;
    let Synced::Conflict { owner: holder } = &synced else {
        return Ok(synced);
    };
    if !sweep::is_gone(ctx, holder).await {
        return Ok(synced);
    }
    tracing::warn!(code = %code, holder = %holder, "releasing the binding of a Voucher that no longer exists");
    let released = ctx.store.release_vanished(code, holder).await?;
    let note = format!(
        "code {code} was bound to Voucher {holder}, which no longer exists; released ({})",
        released.said()
    );
    let event = EventWording {
        severity: Severity::Warning,
        reason: "StaleBindingReleased",
        note,
    };
    publish(ctx, voucher, event).await;
    ctx.store.sync_voucher(&wanted).await
}

/// Writes `wanted` unless it equals the current status, or unless only
/// the counters changed and this voucher's status was written too recently
/// (then the returned delay says when to try again).
async fn write_status(
    ctx: &Context,
    voucher: &Voucher,
    mut wanted: VoucherStatus,
) -> Result<Option<Duration>, Error> {
    let current = voucher.status.as_ref();
    if !differs(current, &wanted) {
        return Ok(None);
    }
    let key = ObjectRef::from_obj(voucher);
    let last = ctx
        .vouchers
        .status_writes
        .lock()
        .unwrap()
        .get(&key)
        .cloned();
    // The cached object may predate our own last write (a wake-up raced
    // the watch): writing the same status again would change nothing.
    // After a resync interval the cache is trusted again.
    if let Some((written, at)) = &last
        && !differs(Some(written), &wanted)
        && at.elapsed() < ctx.settings.resync_interval
    {
        return Ok(None);
    }
    let spec_changed = current.and_then(|s| s.observed_generation) != wanted.observed_generation
        || current.and_then(|s| s.phase) != wanted.phase;
    if !spec_changed && let Some((_, at)) = &last {
        let elapsed = at.elapsed();
        if elapsed < ctx.settings.status_min_interval {
            ctx.metrics.status_patches_suppressed.inc();
            return Ok(Some(ctx.settings.status_min_interval - elapsed));
        }
    }
    wanted.last_synced_at = Some(Utc::now());
    runtime::patch_status(&ctx.client, voucher, &wanted).await?;
    ctx.metrics.status_patches.inc();
    ctx.vouchers
        .status_writes
        .lock()
        .unwrap()
        .insert(key, (wanted, Instant::now()));
    Ok(None)
}

/// A deleted Voucher: its row is released as its deletion policy says —
/// orphaned, never revoked, while the CRD itself is being deleted.
pub(super) async fn cleanup(ctx: &Context, voucher: &Voucher) -> Result<Action, Error> {
    ctx.vouchers.remember_phase(ctx, voucher, None);
    let Ok(code) = voucher.code() else {
        return Ok(Action::await_change());
    };
    let owner = owner(voucher)?;
    // Deleting the CRD (by mistake, an uninstall, a prune) deletes every
    // Voucher: their codes are orphaned, never revoked, and it is said.
    let crd_going = runtime::crd_going(&ctx.client, CRD).await?;
    let mut policy = crd_going.then_some(DeletionPolicy::Orphan);
    // A global copy: offered no more, and its unused share returned to the hub
    // before it goes (while a leader can return it); its row stays, inactive —
    // the vendor's Voucher at the hub is what ends a global code.
    let bound_here = voucher.spec.scope == Scope::Global
        && ctx
            .store
            .owner_of(&code)
            .await?
            .is_some_and(|o| o.uid == owner.uid);
    if bound_here && let Some(held) = ctx.store.withdraw(&code).await? {
        let local = &held.local;
        let returned = local.outstanding.is_none() && local.share <= local.high_water;
        // Only an error keeps the finalizer (a requeue would let it go).
        if !returned && ctx.settings.joined.is_some() && !crd_going {
            return Err(Error::ShareNotReturned {
                code: code.to_string(),
                unspent: local.share.saturating_sub(local.high_water),
            });
        }
        policy = Some(DeletionPolicy::Orphan);
    }
    let released = ctx.store.release_voucher(&code, &owner, policy).await?;
    if crd_going && matches!(released, Released::Orphaned(_)) {
        tracing::warn!(code = %code, voucher = %voucher.name_any(),
            "the Voucher CRD is being deleted: the code is orphaned, not revoked");
        let note = format!(
            "the Voucher CRD is being deleted, so code {code} was orphaned (left live in the \
             billing database), not revoked; to manage it again, re-create the CRD and a \
             Voucher with spec.adopt: true"
        );
        let event = EventWording {
            severity: Severity::Warning,
            reason: "OrphanedWhileCRDDeleted",
            note,
        };
        publish(ctx, voucher, event).await;
    }
    let kind = match released {
        Released::Revoked(_) => Some(AuditKind::Revoked),
        Released::Orphaned(_) => Some(AuditKind::Orphaned),
        Released::NotOwner => None,
    };
    if let Some(kind) = kind {
        ctx.count_audit(kind);
        let actor = Actor::from(&owner);
        if let Some(event) = kind.wording(&Facts::new(code.as_str(), &actor)).event {
            publish(ctx, voucher, event).await;
        }
    }
    ctx.vouchers.forget(voucher);
    Ok(Action::await_change())
}
