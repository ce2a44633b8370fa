//! The controller's transactions: a Voucher applied to its row, and released
//! on deletion. Each change and its audit records commit together.

use chrono::{DateTime, Utc};

use super::bindings::{self, Bound};
use super::campaigns;
use super::outbox;
use super::{Operation, Result, Store, StoreError, allotments, promo_codes, suspensions};
use crate::domain::{
    Actor, Applied, AuditData, AuditKind, Claim, Code, CodeRecord, DeletionPolicy, Facts, Owner,
    Phase, Request, TermField, Terms, Unrequested,
};

/// A Voucher as the controller applies it.
pub struct Wanted<'a> {
    pub code: &'a Code,
    pub owner: &'a Owner,
    pub generation: i64,
    pub terms: &'a Terms,
    /// Adoption or reissue, if the resource asks for either.
    pub request: Request,
    pub deletion_policy: DeletionPolicy,
    /// The resource's `catalyst.openova.io/suspended` annotation: honoured
    /// whoever owns the spec (a GitOps apply does not remove it).
    pub suspended: bool,
    pub now: DateTime<Utc>,
    /// A global code (`scope: Global`): bound to the hub's Voucher, its row
    /// carrying the vendor's terms (`terms`) with the share's cap and switch.
    pub global: Option<Global<'a>>,
}

/// A global code's binding, as the controller found it at the hub.
#[derive(Clone, Copy, Debug)]
pub struct Global<'a> {
    pub hub_uid: &'a str,
    /// The vendor's terms make it redeemable now: otherwise its share is returned.
    pub offered: bool,
    /// The hub asks for returns (its cap lowered below the units granted).
    pub return_asked: bool,
    /// Once per customer on any Sovereign (`perCustomer: Global`).
    pub per_customer_global: bool,
}

// One value per reconcile, never stored in bulk: boxing the row would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Synced {
    /// Another resource owns the code; nothing was written.
    Conflict { owner: Owner },
    /// A VoucherCampaign issued the code: no Voucher may claim, adopt or
    /// reissue it; nothing was written.
    CampaignCode { campaign: Owner },
    /// The row exists without an owner and the resource did not ask to adopt
    /// (or reissue) it; nothing was written.
    NotRequested(Unrequested),
    /// A global code claimed by a Voucher of this Sovereign's own (`scope`
    /// absent), or a code of this Sovereign's own by a `scope: Global` one:
    /// only a Global Voucher binds a global code, and it never takes over a
    /// local one. Nothing was written.
    ScopeMismatch { global_row: bool },
    /// The row carries the spec.
    Applied {
        claim: Claim,
        record: CodeRecord,
        phase: Phase,
        changed: Vec<TermField>,
        audited: Vec<AuditKind>,
    },
}

/// What deleting a Voucher did to its row.
#[derive(Clone, Debug, PartialEq)]
pub enum Released {
    Revoked(Option<CodeRecord>),
    Orphaned(Option<CodeRecord>),
    /// The code was bound to another resource (or to none): nothing to do.
    NotOwner,
}

impl Released {
    /// What happened to the row, for a sentence.
    pub fn said(&self) -> &'static str {
        match self {
            Released::Revoked(_) => "the row was revoked, as its deletion policy says",
            Released::Orphaned(_) => "the row was left as it is, as its deletion policy says",
            Released::NotOwner => "it was already released",
        }
    }
}

impl Store {
    /// Claims the code for the resource and brings the row to its spec,
    /// writing only what differs, with one audit record per change.
    pub async fn sync_voucher(&self, wanted: &Wanted<'_>) -> Result<Synced> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            // The allotment before the billing row, in the order the refill loop locks them.
            if wanted.global.is_some() {
                allotments::lock(&mut tx, wanted.code).await?;
            }
            let state = bindings::claim(&mut tx, wanted.code, wanted.owner, wanted.request).await?;
            match refused(&mut tx, wanted, &state).await {
                Ok(None) => {}
                Ok(Some(synced)) => {
                    tx.rollback().await?;
                    return Ok(synced);
                }
                Err(error) => {
                    tx.rollback().await?;
                    return Err(error);
                }
            }
            let synced = apply(&mut tx, wanted, state).await?;
            tx.commit().await?;
            Ok(synced)
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Sync, Some(wanted.code)))
    }

    /// Records that a resource lost a conflict (once per episode: the caller
    /// knows from the resource's status whether it already did).
    pub async fn audit_conflict(
        &self,
        code: &Code,
        claimant: &Owner,
        holder: &Owner,
    ) -> Result<()> {
        let run = async {
            let mut conn = self.pool().acquire().await?;
            let row = promo_codes::find_live(&mut conn, code).await?;
            let actor = Actor::from(claimant);
            let facts = Facts {
                holder: Some(holder),
                ..Facts::new(code.as_str(), &actor)
            };
            let data = AuditData::of(AuditKind::Conflict, &facts, row.clone(), row);
            outbox::append_audit(&mut conn, AuditKind::Conflict, &data).await?;
            Ok(())
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::AuditConflict, Some(code)))
    }

    /// Releases the code of a deleted resource: soft-deletes the row
    /// (`Revoke`) or leaves it (`Orphan`), and audits either. `policy`
    /// `None` applies the one recorded at the last bind: what the controller
    /// last applied, not a spec edited since (perhaps while it could not be
    /// applied, outside the issuer namespaces).
    pub async fn release_voucher(
        &self,
        code: &Code,
        owner: &Owner,
        policy: Option<DeletionPolicy>,
    ) -> Result<Released> {
        self.release(code, owner, policy, Operation::Release).await
    }

    /// Releases the binding of a resource that vanished without its
    /// finalizer (removed by hand), applying the deletion policy recorded at
    /// its last bind. The code goes to nobody: a resource waiting for it must
    /// still ask to adopt or reissue it.
    pub async fn release_vanished(&self, code: &Code, holder: &Owner) -> Result<Released> {
        self.release(code, holder, None, Operation::ReleaseStaleBinding)
            .await
    }

    async fn release(
        &self,
        code: &Code,
        owner: &Owner,
        policy: Option<DeletionPolicy>,
        operation: Operation,
    ) -> Result<Released> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            super::lock_code(&mut tx, code).await?;
            let Some(bound) = bindings::find(&mut tx, code)
                .await?
                .filter(|b| b.owner.uid == owner.uid)
            else {
                tx.rollback().await?;
                return Ok(Released::NotOwner);
            };
            let before = promo_codes::find_live(&mut tx, code).await?;
            let (kind, after, released) = match policy.unwrap_or(bound.deletion_policy) {
                DeletionPolicy::Revoke => {
                    let tombstone = promo_codes::soft_delete(&mut tx, code).await?;
                    (
                        AuditKind::Revoked,
                        tombstone.clone(),
                        Released::Revoked(tombstone),
                    )
                }
                DeletionPolicy::Orphan => (
                    AuditKind::Orphaned,
                    before.clone(),
                    Released::Orphaned(before.clone()),
                ),
            };
            bindings::release(&mut tx, code, &owner.uid).await?;
            // Kept only when the owner chose Orphan and the row lives on: a release forced to
            // Orphan (the CRD going, a global copy) is not the owner's choice for export.
            let chosen = bound.deletion_policy == DeletionPolicy::Orphan;
            match released {
                Released::Orphaned(Some(_)) if chosen => {
                    bindings::record_orphan(&mut tx, code, owner).await?
                }
                _ => bindings::forget_orphan(&mut tx, code).await?,
            }
            let actor = Actor::from(owner);
            // Its annotation went with it (an admin's suspension stays).
            let target = suspensions::Target::Code(code);
            let source = suspensions::Source::Annotation;
            suspensions::set(&mut tx, &target, source, false, &actor).await?;
            let data = AuditData::of(kind, &Facts::new(code.as_str(), &actor), before, after);
            outbox::append_audit(&mut tx, kind, &data).await?;
            tx.commit().await?;
            Ok(released)
        };
        run.await
            .map_err(|e: StoreError| e.during(operation, Some(code)))
    }

    /// The admin revoke: soft-deletes the row and releases its binding,
    /// whoever holds it and whatever its deletion policy, with the audit
    /// record, in one transaction. `None` when there was nothing to revoke.
    pub async fn revoke(&self, code: &Code, subject: &str) -> Result<Option<Revocation>> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            super::lock_code(&mut tx, code).await?;
            let before = promo_codes::find_live(&mut tx, code).await?;
            let owner = bindings::release_any(&mut tx, code).await?;
            bindings::forget_orphan(&mut tx, code).await?;
            let live = before.as_ref().is_some_and(|r| !r.is_tombstoned());
            if !live && owner.is_none() {
                tx.rollback().await?;
                return Ok(None);
            }
            if live {
                let after = promo_codes::soft_delete(&mut tx, code).await?;
                let actor = Actor::Subject {
                    subject: subject.to_owned(),
                };
                let kind = AuditKind::Revoked;
                let data = AuditData::of(kind, &Facts::new(code.as_str(), &actor), before, after);
                outbox::append_audit(&mut tx, kind, &data).await?;
            }
            if let Some(owner) = &owner {
                // No row names the Voucher any more: wake it by name, so that a Voucher
                // that stays (GitOps keeps it) shows phase Revoked now, not at its resync.
                super::notify::wake_voucher(&mut tx, owner).await?;
            }
            tx.commit().await?;
            Ok(Some(Revocation { owner }))
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Revoke, Some(code)))
    }
}

/// What the admin revoke did.
#[derive(Clone, Debug, PartialEq)]
pub struct Revocation {
    /// The Voucher the code was bound to, to delete next.
    pub owner: Option<Owner>,
}

/// Why the resource may not write the row, if it may not: an older copy
/// (an error: a replica that lost its lease, still finishing a reconcile,
/// never writes an older spec over the one the new leader applied), a
/// campaign's code, a conflict, a request the spec does not make.
async fn refused(
    tx: &mut sqlx::PgConnection,
    wanted: &Wanted<'_>,
    state: &bindings::ClaimState,
) -> Result<Option<Synced>> {
    if let Some(newer) = state
        .binding
        .as_ref()
        .filter(|b| b.owner.uid == wanted.owner.uid && b.generation > wanted.generation)
    {
        return Err(StoreError::Superseded {
            stored: newer.generation,
            mine: wanted.generation,
        });
    }
    if let Some(campaign) = campaigns::owner_of(tx, wanted.code.as_str()).await? {
        return Ok(Some(Synced::CampaignCode { campaign }));
    }
    let global_row = allotments::is_global(tx, wanted.code).await?;
    if global_row.is_some_and(|global| global != wanted.global.is_some()) {
        return Ok(Some(Synced::ScopeMismatch {
            global_row: global_row == Some(true),
        }));
    }
    Ok(match &state.claim {
        Claim::Conflict { owner } => Some(Synced::Conflict {
            owner: owner.clone(),
        }),
        Claim::NotRequested(what) => Some(Synced::NotRequested(*what)),
        _ => None,
    })
}

/// Brings the row to the spec under the code's lock: the annotation's
/// suspension first (so that the row read back, and the phase, carry it),
/// the terms, the binding, one audit record per change.
async fn apply(
    tx: &mut sqlx::PgConnection,
    wanted: &Wanted<'_>,
    state: bindings::ClaimState,
) -> Result<Synced> {
    let actor = Actor::from(wanted.owner);
    let target = suspensions::Target::Code(wanted.code);
    let source = suspensions::Source::Annotation;
    let suspension = suspensions::set(tx, &target, source, wanted.suspended, &actor).await?;
    let applied = match &wanted.global {
        Some(global) => {
            let terms =
                allotments::row_terms(tx, wanted.code, wanted.terms, global.offered).await?;
            let applied = promo_codes::apply(tx, wanted.code, &terms).await?;
            allotments::bind(tx, wanted.code, global).await?;
            applied
        }
        None => promo_codes::apply(tx, wanted.code, wanted.terms).await?,
    };
    let spec_changed = state
        .binding
        .as_ref()
        .is_none_or(|b| b.generation != wanted.generation);
    let phase = match &wanted.global {
        Some(_) => Phase::of(&applied.after.as_global(wanted.terms), wanted.now),
        None => Phase::of(&applied.after, wanted.now),
    };
    let mut kinds = state.claim.audit_kinds(&Applied {
        changed: &applied.changed,
        now_active: applied.after.terms.active,
        spec_changed,
        phase,
        last_phase: state.binding.as_ref().and_then(|b| b.phase),
    });
    if suspension {
        kinds.push(match wanted.suspended {
            true => AuditKind::Suspended,
            false => AuditKind::SuspensionLifted,
        });
    }
    let bound = Bound {
        generation: wanted.generation,
        phase,
        deletion_policy: wanted.deletion_policy,
    };
    let binding_current = state.binding.as_ref().is_some_and(|b| {
        b.generation == bound.generation
            && b.phase == Some(phase)
            && b.deletion_policy == bound.deletion_policy
    });
    if !binding_current {
        bindings::bind(tx, wanted.code, wanted.owner, bound).await?;
    }
    let facts = Facts {
        changed: &applied.changed,
        ..Facts::new(wanted.code.as_str(), &actor)
    };
    for kind in &kinds {
        let data = AuditData::of(
            *kind,
            &facts,
            applied.before.clone(),
            Some(applied.after.clone()),
        );
        outbox::append_audit(tx, *kind, &data).await?;
    }
    Ok(Synced::Applied {
        claim: state.claim,
        record: applied.after,
        phase,
        changed: applied.changed,
        audited: kinds,
    })
}
