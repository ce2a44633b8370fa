//! The controller's transactions: a Voucher applied to its row, and released
//! on deletion. Each change and its audit records commit together.

use chrono::{DateTime, Utc};

use super::outbox;
use super::{Operation, Result, Store, StoreError, bindings, promo_codes};
use crate::domain::{
    Actor, Applied, AuditData, AuditKind, Claim, Code, CodeRecord, Facts, Owner, Phase, TermField,
    Terms,
};

/// A Voucher as the controller applies it.
pub struct Wanted<'a> {
    pub code: &'a Code,
    pub owner: &'a Owner,
    pub generation: i64,
    pub terms: &'a Terms,
    pub now: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Synced {
    /// Another resource owns the code; nothing was written.
    Conflict { owner: Owner },
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

impl Store {
    /// Claims the code for the resource and brings the row to its spec,
    /// writing only what differs, with one audit record per change.
    pub async fn sync_voucher(&self, wanted: &Wanted<'_>) -> Result<Synced> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            let state = bindings::claim(&mut tx, wanted.code, wanted.owner).await?;
            if let Claim::Conflict { owner } = state.claim {
                tx.rollback().await?;
                return Ok(Synced::Conflict { owner });
            }
            let applied = promo_codes::apply(&mut tx, wanted.code, wanted.terms).await?;
            let spec_changed = state
                .binding
                .as_ref()
                .is_none_or(|b| b.generation != wanted.generation);
            let phase = Phase::of(&applied.after, wanted.now);
            let kinds = state.claim.audit_kinds(&Applied {
                changed: &applied.changed,
                now_active: applied.after.terms.active,
                spec_changed,
                phase,
                last_phase: state.binding.as_ref().and_then(|b| b.phase),
            });
            let binding_current = state
                .binding
                .as_ref()
                .is_some_and(|b| b.generation == wanted.generation && b.phase == Some(phase));
            if !binding_current {
                bindings::bind(&mut tx, wanted.code, wanted.owner, wanted.generation, phase)
                    .await?;
            }
            let actor = Actor::from(wanted.owner);
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
                outbox::append_audit(&mut tx, *kind, &data).await?;
            }
            tx.commit().await?;
            Ok(Synced::Applied {
                claim: state.claim,
                record: applied.after,
                phase,
                changed: applied.changed,
                audited: kinds,
            })
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

    /// Drops the binding of a resource that no longer exists, leaving the row
    /// as it is, so that another resource can adopt the code.
    pub async fn release_stale_binding(&self, code: &Code, holder: &Owner) -> Result<bool> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            super::lock_code(&mut tx, code).await?;
            let released = bindings::release(&mut tx, code, &holder.uid).await?;
            tx.commit().await?;
            Ok(released)
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::ReleaseStaleBinding, Some(code)))
    }

    /// Releases the code of a deleted resource: soft-deletes the row
    /// (`revoke`) or leaves it (orphan), and audits either.
    pub async fn release_voucher(
        &self,
        code: &Code,
        owner: &Owner,
        revoke: bool,
    ) -> Result<Released> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            super::lock_code(&mut tx, code).await?;
            let bound = bindings::find(&mut tx, code).await?;
            if bound.is_none_or(|b| b.owner.uid != owner.uid) {
                tx.rollback().await?;
                return Ok(Released::NotOwner);
            }
            let before = promo_codes::find_live(&mut tx, code).await?;
            let (kind, after, released) = if revoke {
                let tombstone = promo_codes::soft_delete(&mut tx, code).await?;
                (
                    AuditKind::Revoked,
                    tombstone.clone(),
                    Released::Revoked(tombstone),
                )
            } else {
                (
                    AuditKind::Orphaned,
                    before.clone(),
                    Released::Orphaned(before.clone()),
                )
            };
            bindings::release(&mut tx, code, &owner.uid).await?;
            let actor = Actor::from(owner);
            let data = AuditData::of(kind, &Facts::new(code.as_str(), &actor), before, after);
            outbox::append_audit(&mut tx, kind, &data).await?;
            tx.commit().await?;
            Ok(released)
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Release, Some(code)))
    }
}
