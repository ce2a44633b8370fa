//! The redemption checkout performs: one transaction that records the
//! redemption, grants the credit, counts it and audits it — or changes
//! nothing. The code's row lock is held for its last statement only.

use chrono::{DateTime, Utc};

use super::idempotency::{self, Claimed};
use super::outbox::NewAuditRecord;
use super::{Operation, Result, Store, StoreError, customers, ledger, promo_codes, redemptions};
use crate::domain::{Actor, AuditData, AuditKind, Code, Facts, Redeemability};

/// Who redeems what.
pub struct Redemption<'a> {
    pub code: &'a Code,
    /// The token subject: the billing service's `customers.user_id`.
    pub subject: &'a str,
    /// Needed only to create the customer on a first redemption.
    pub tenant: Option<&'a str>,
    pub email: &'a str,
    /// `Idempotency-Key` and the hash of the request it came with.
    pub idempotency: Option<(&'a str, Vec<u8>)>,
    pub now: DateTime<Utc>,
}

/// What a redemption decided.
#[derive(Clone, Debug, PartialEq)]
pub enum Redeemed {
    Granted {
        code: String,
        credit_omr: i32,
        balance_omr: i64,
    },
    /// Unknown or soft-deleted: indistinguishable on purpose.
    NotFound,
    /// Exists but cannot be redeemed now, and why.
    Gone(Redeemability),
    /// This customer redeemed the code before: when, and for how much, so
    /// that a retry without its Idempotency-Key can still reconcile.
    AlreadyRedeemed {
        code: String,
        credit_omr: Option<i32>,
        redeemed_at: Option<DateTime<Utc>>,
    },
    /// The customer does not exist and the request named no tenant.
    TenantRequired,
}

impl Redeemed {
    /// The answer to a customer who redeemed `code` before (`grant`: when,
    /// and the credit granted).
    pub(super) fn already(code: &Code, grant: Option<(DateTime<Utc>, Option<i32>)>) -> Self {
        Self::AlreadyRedeemed {
            code: code.to_string(),
            credit_omr: grant.and_then(|(_, credit)| credit),
            redeemed_at: grant.map(|(at, _)| at),
        }
    }
}

/// A code that cannot be redeemed now, for `subject`: a repeat when the
/// subject redeemed it before — whatever the code's state, checked before
/// the cap, so that a checkout retrying without its Idempotency-Key hears
/// "already redeemed, here is your grant", never "fully redeemed" — and
/// `refusal` otherwise.
pub(super) async fn refused(
    tx: &mut sqlx::PgConnection,
    code: &Code,
    subject: &str,
    refusal: Redeemed,
) -> Result<Redeemed> {
    Ok(
        match redemptions::grant_of_subject(tx, subject, code.as_str()).await? {
            Some(grant) => Redeemed::already(code, Some(grant)),
            None => refusal,
        },
    )
}

/// The answer to a request, as it is replayed for its `Idempotency-Key`.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Fresh(Redeemed),
    Replayed {
        status: u16,
        body: serde_json::Value,
    },
    /// The key was used before with another request body.
    KeyReused,
}

/// How far one attempt at a redemption got.
enum Attempt {
    /// Decided: commit what was written (a grant; nothing, for a refusal
    /// before any write) with the answer recorded for its key.
    Decided(Redeemed),
    /// Refused after the grant was written (the cap was reached, or the code
    /// switched off, meanwhile): the transaction is rolled back, and the
    /// refusal answered.
    Undone(Redeemed),
    /// The code's terms changed between the read and the count: try again.
    Changed,
}

/// Attempts before a redemption whose code keeps changing gives up (each
/// retry means an administrator changed the terms in the meantime).
const ATTEMPTS: usize = 3;

impl Store {
    /// Redeems in one transaction. `render` turns the outcome into the HTTP
    /// answer stored for the idempotency key, inside the same transaction.
    ///
    /// The code's row is locked by one statement only, the last before the
    /// commit: everything that does not need the lock (the key, the customer,
    /// the redemption row, the ledger grant, the balance, the answer) comes
    /// first, checked against an unlocked read; then one conditional update
    /// counts the redemption — only if the code is still live, active, in
    /// its window, under its cap and carrying the terms read — and writes its
    /// audit records. The cap stays exact: the update re-checks the row it
    /// locks.
    pub async fn redeem(
        &self,
        request: &Redemption<'_>,
        render: impl Fn(&Redeemed) -> (u16, serde_json::Value),
    ) -> Result<Answer> {
        let run = async {
            for _ in 0..ATTEMPTS {
                let mut tx = self.pool().begin().await?;
                if let Some(answer) = claim_key(&mut tx, request).await? {
                    tx.rollback().await?;
                    return Ok(answer);
                }
                match attempt(&mut tx, request, &render).await? {
                    Attempt::Decided(outcome) => {
                        let wrote = matches!(outcome, Redeemed::Granted { .. });
                        match &request.idempotency {
                            Some((key, _)) => {
                                if !wrote {
                                    let (status, body) = render(&outcome);
                                    idempotency::answer(
                                        &mut tx,
                                        request.subject,
                                        key,
                                        status,
                                        &body,
                                    )
                                    .await?;
                                }
                                tx.commit().await?;
                            }
                            None if wrote => tx.commit().await?,
                            None => tx.rollback().await?,
                        }
                        return Ok(Answer::Fresh(outcome));
                    }
                    Attempt::Undone(outcome) => {
                        tx.rollback().await?;
                        let Some((key, _)) = &request.idempotency else {
                            return Ok(Answer::Fresh(outcome));
                        };
                        // The refusal is the key's answer, in a transaction
                        // of its own (a concurrent request with the key may
                        // have answered first).
                        let mut tx = self.pool().begin().await?;
                        if let Some(answer) = claim_key(&mut tx, request).await? {
                            tx.rollback().await?;
                            return Ok(answer);
                        }
                        let (status, body) = render(&outcome);
                        idempotency::answer(&mut tx, request.subject, key, status, &body).await?;
                        tx.commit().await?;
                        return Ok(Answer::Fresh(outcome));
                    }
                    Attempt::Changed => tx.rollback().await?,
                }
            }
            Err(StoreError::Contended { attempts: ATTEMPTS })
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Redeem, Some(request.code)))
    }
}

/// Claims the request's Idempotency-Key, if it has one: `Some` when the key
/// already has an answer (or another request's body).
async fn claim_key(
    tx: &mut sqlx::PgConnection,
    request: &Redemption<'_>,
) -> Result<Option<Answer>> {
    let Some((key, hash)) = &request.idempotency else {
        return Ok(None);
    };
    Ok(
        match idempotency::claim(tx, request.subject, key, hash).await? {
            Claimed::New => None,
            Claimed::Replay { status, response } => Some(Answer::Replayed {
                status,
                body: response,
            }),
            Claimed::Mismatch => Some(Answer::KeyReused),
        },
    )
}

/// One attempt, in `tx`: the writes that need no lock, then the one
/// statement that takes it.
async fn attempt(
    tx: &mut sqlx::PgConnection,
    request: &Redemption<'_>,
    render: &impl Fn(&Redeemed) -> (u16, serde_json::Value),
) -> Result<Attempt> {
    let code = request.code;
    // What the code says now, unlocked: most refusals end here.
    let seen = promo_codes::find(tx, code).await?;
    let verdict = Redeemability::of(seen.as_ref(), request.now);
    let Some(seen) = seen.filter(|_| verdict.is_redeemable()) else {
        let refusal = match verdict.is_hidden() {
            true => Redeemed::NotFound,
            false => Redeemed::Gone(verdict),
        };
        let answer = refused(tx, code, request.subject, refusal).await?;
        return Ok(Attempt::Decided(answer));
    };
    let customer = match customers::find(tx, request.subject).await? {
        Some(id) => id,
        None => match request.tenant {
            Some(tenant) => customers::ensure(tx, request.subject, tenant, request.email).await?,
            None => return Ok(Attempt::Decided(Redeemed::TenantRequired)),
        },
    };
    // One per customer: the unique row, not the code's lock, decides. The
    // database's guard may refuse it: the code was switched off or suspended
    // since the read, or is outside its window by the database's clock. A
    // refusal, as the code would be answered (a campaign's: like a guess).
    let inserted = match redemptions::insert(tx, customer, code.as_str()).await {
        Err(error) if error.refused_by_guard() => {
            return Ok(Attempt::Undone(match seen.campaign_on {
                Some(_) => Redeemed::NotFound,
                None => Redeemed::Gone(Redeemability::Inactive),
            }));
        }
        inserted => inserted?,
    };
    if !inserted {
        let grant = redemptions::grant_of(tx, customer, code.as_str()).await?;
        return Ok(Attempt::Decided(Redeemed::already(code, grant)));
    }
    let credit = seen.terms.credit_omr;
    ledger::append(tx, customer, credit, &ledger::promo_reason(code.as_str())).await?;
    let balance = ledger::balance(tx, customer).await?;
    let granted = Redeemed::Granted {
        code: code.to_string(),
        credit_omr: credit,
        balance_omr: balance,
    };
    if let Some((key, _)) = &request.idempotency {
        let (status, body) = render(&granted);
        idempotency::answer(tx, request.subject, key, status, &body).await?;
    }
    // The lock, as late as possible: the counter and the audit records.
    let actor = Actor::Subject {
        subject: request.subject.to_owned(),
    };
    let facts = Facts {
        credit_omr: Some(credit),
        ..Facts::new(code.as_str(), &actor)
    };
    let audit = |kind| {
        let data = AuditData::of(kind, &facts, Some(seen.clone()), Some(seen.clone()));
        NewAuditRecord::new(
            code.as_str(),
            kind,
            serde_json::to_value(&data).expect("audit data serialises"),
        )
    };
    if promo_codes::count_redemptions(
        tx,
        &seen,
        request.now,
        &[audit(AuditKind::Redeemed)],
        &audit(AuditKind::Exhausted),
    )
    .await?
    .is_some()
    {
        return Ok(Attempt::Decided(granted));
    }
    // Not counted: why, from the row as it is now.
    let current = promo_codes::find(tx, code).await?;
    let verdict = Redeemability::of(current.as_ref(), request.now);
    Ok(if verdict.is_hidden() {
        Attempt::Undone(Redeemed::NotFound)
    } else if !verdict.is_redeemable() {
        Attempt::Undone(Redeemed::Gone(verdict))
    } else {
        Attempt::Changed
    })
}
