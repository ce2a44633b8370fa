//! The redemption checkout performs: one transaction that locks the code,
//! checks it, records the redemption, counts it, grants the credit and
//! audits it — or changes nothing.

use chrono::{DateTime, Utc};

use super::idempotency::{self, Claimed};
use super::outbox;
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

impl Store {
    /// Redeems in one transaction. `render` turns the outcome into the HTTP
    /// answer stored for the idempotency key, inside the same transaction.
    pub async fn redeem(
        &self,
        request: &Redemption<'_>,
        render: impl Fn(&Redeemed) -> (u16, serde_json::Value),
    ) -> Result<Answer> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            if let Some((key, hash)) = &request.idempotency {
                match idempotency::claim(&mut tx, request.subject, key, hash).await? {
                    Claimed::New => {}
                    Claimed::Replay { status, response } => {
                        tx.rollback().await?;
                        return Ok(Answer::Replayed {
                            status,
                            body: response,
                        });
                    }
                    Claimed::Mismatch => {
                        tx.rollback().await?;
                        return Ok(Answer::KeyReused);
                    }
                }
            }
            let outcome = self.redeem_in(&mut tx, request).await?;
            match &request.idempotency {
                Some((key, _)) => {
                    let (status, body) = render(&outcome);
                    idempotency::answer(&mut tx, request.subject, key, status, &body).await?;
                    tx.commit().await?;
                }
                None if matches!(
                    outcome,
                    Redeemed::Granted { .. } | Redeemed::AlreadyRedeemed { .. }
                ) =>
                {
                    tx.commit().await?
                }
                None => tx.rollback().await?,
            }
            Ok(Answer::Fresh(outcome))
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Redeem, Some(request.code)))
    }

    async fn redeem_in(
        &self,
        tx: &mut sqlx::PgConnection,
        request: &Redemption<'_>,
    ) -> Result<Redeemed> {
        let code = request.code;
        let before = promo_codes::find_for_update(tx, code).await?;
        let verdict = Redeemability::of(before.as_ref(), request.now);
        if verdict.is_hidden() {
            return Ok(Redeemed::NotFound);
        }
        let Some(before) = before.filter(|_| verdict.is_redeemable()) else {
            return Ok(Redeemed::Gone(verdict));
        };
        let customer = match customers::find(tx, request.subject).await? {
            Some(id) => id,
            None => match request.tenant {
                Some(tenant) => {
                    customers::ensure(tx, request.subject, tenant, request.email).await?
                }
                None => return Ok(Redeemed::TenantRequired),
            },
        };
        if !redemptions::insert(tx, customer, code.as_str()).await? {
            let grant = redemptions::grant_of(tx, customer, code.as_str()).await?;
            return Ok(Redeemed::AlreadyRedeemed {
                code: code.to_string(),
                credit_omr: grant.and_then(|(_, credit)| credit),
                redeemed_at: grant.map(|(at, _)| at),
            });
        }
        let after = promo_codes::count_redemption(tx, code.as_str()).await?;
        let credit = after.terms.credit_omr;
        ledger::append(tx, customer, credit, &ledger::promo_reason(code.as_str())).await?;
        let balance = ledger::balance(tx, customer).await?;
        let mut kinds = vec![AuditKind::Redeemed];
        if after.is_capped() {
            kinds.push(AuditKind::Exhausted);
        }
        let actor = Actor::Subject {
            subject: request.subject.to_owned(),
        };
        let facts = Facts {
            credit_omr: Some(credit),
            ..Facts::new(code.as_str(), &actor)
        };
        for kind in kinds {
            let data = AuditData::of(kind, &facts, Some(before.clone()), Some(after.clone()));
            outbox::append_audit(tx, kind, &data).await?;
        }
        Ok(Redeemed::Granted {
            code: code.to_string(),
            credit_omr: credit,
            balance_omr: balance,
        })
    }
}
