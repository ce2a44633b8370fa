//! The redemption checkout performs, written once: the steps of one
//! transaction over a batch of requests for one code — the Idempotency-Keys
//! claimed, the verdict, the customers, one redemption per customer, the
//! grants, the answers recorded, then the counter and the audit records —
//! that commits every answer or changes nothing. A single redemption is a
//! batch of one. The code's row lock is held for the last statement only.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::discounts::{self, DiscountGrant};
use super::idempotency::{self, Claimed};
use super::outbox::NewAuditRecord;
use super::redemptions::Past;
use super::{
    Operation, Result, Store, StoreError, claims, customers, ledger, promo_codes, redemptions,
};
use crate::domain::{
    Actor, AuditData, AuditKind, Code, CodeRecord, Currency, Facts, Redeemability,
};

/// Who redeems what.
#[derive(Clone, Debug)]
pub struct Redemption {
    pub code: Code,
    /// The token subject: the billing service's `customers.user_id`.
    pub subject: String,
    /// Needed only to create the customer on a first redemption.
    pub tenant: Option<String>,
    pub email: String,
    /// `Idempotency-Key` and the hash of the request it came with.
    pub idempotency: Option<(String, Vec<u8>)>,
    pub now: DateTime<Utc>,
    /// The Sovereign's currency, which a discount grant's amounts are in.
    pub currency: Currency,
    /// A once-per-customer-anywhere code's redemption (`perCustomer: Global`):
    /// the local intent whose claim the hub granted, moved to `claimed` under
    /// its row lock in the redemption's transaction and settled with it.
    pub intent: Option<Uuid>,
}

/// What a redemption decided: what its answer is rendered from, first and
/// on every replay of its Idempotency-Key (recorded as JSON, tagged
/// `outcome`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Redeemed {
    Granted {
        code: String,
        grant: Grant,
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
        discount: Option<DiscountGrant>,
        redeemed_at: Option<DateTime<Utc>>,
    },
    /// The customer does not exist and the request named no tenant.
    TenantRequired,
    /// A once-per-customer-anywhere code (`perCustomer: Global`) this
    /// customer redeemed (or is redeeming) on another Sovereign.
    ClaimedElsewhere {
        code: String,
    },
}

/// What a redemption granted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Grant {
    /// A credit in the ledger, and the customer's balance after it.
    Credit { credit_omr: i32, balance_omr: i64 },
    /// A discount grant, in `currency`'s minor units.
    Discount {
        currency: Currency,
        grant: DiscountGrant,
    },
}

impl Redeemed {
    /// The answer to a customer who redeemed `code` before (`past`: when,
    /// and what it granted).
    fn already(code: &Code, past: Option<Past>) -> Self {
        let (redeemed_at, credit_omr, discount) = match past {
            Some(past) => (Some(past.redeemed_at), past.credit_omr, past.discount),
            None => (None, None, None),
        };
        Self::AlreadyRedeemed {
            code: code.to_string(),
            credit_omr,
            discount,
            redeemed_at,
        }
    }

    /// The refusal of a code whose verdict is `verdict`, if it refuses.
    fn refusal(verdict: Redeemability) -> Option<Self> {
        if verdict.is_hidden() {
            Some(Self::NotFound)
        } else if !verdict.is_redeemable() {
            Some(Self::Gone(verdict))
        } else {
            None
        }
    }
}

/// What a request comes to: an outcome decided now, or the one recorded for
/// its `Idempotency-Key`. The caller renders the answer; the store renders
/// nothing.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// Decided now (and recorded for its key, if it has one).
    Fresh(Redeemed),
    /// Decided before, for the same request with this key.
    Replayed(Redeemed),
    /// Answered before by a version that recorded the answer as it rendered
    /// it: replayed as it is (such keys leave with the retention).
    ReplayedAsRendered {
        status: u16,
        body: serde_json::Value,
    },
    /// The key was used before with another request body.
    KeyReused,
    /// A once-per-customer-anywhere code (`perCustomer: Global`) that this
    /// customer has not redeemed here: redeemed only holding the hub's claim
    /// (`federation::claimer`); nothing was written.
    ClaimNeeded,
}

/// What a batch's transaction came to.
pub(crate) enum BatchOutcome {
    /// Committed: an answer per request, in their order.
    Answered(Vec<Answer>),
    /// Undone, nothing written: the cap was reached, the code switched off
    /// or changed since the unlocked read (`None`: read it again to say
    /// which), or the database's guard refused it (the refusal).
    Undone(Option<Redeemed>),
    /// A statement failed before the commit; nothing written.
    Failed(StoreError),
    /// A once-per-customer-anywhere code, and a customer of the batch without
    /// the hub's claim: nothing written.
    ClaimNeeded,
}

/// Attempts before a redemption whose code keeps changing gives up (each
/// retry means an administrator changed the terms in the meantime).
const ATTEMPTS: usize = 3;

impl Store {
    /// Redeems one request: a batch of one, tried again while the code's
    /// terms change under it; a refusal found only after writing is
    /// answered (and recorded for its key) on its own.
    pub async fn redeem(&self, request: &Redemption) -> Result<Answer> {
        let run = async {
            for _ in 0..ATTEMPTS {
                let refusal = match self.redeem_batch(std::slice::from_ref(request)).await? {
                    BatchOutcome::Answered(mut answers) => return Ok(answers.remove(0)),
                    BatchOutcome::Failed(error) => return Err(error),
                    BatchOutcome::ClaimNeeded => return Ok(Answer::ClaimNeeded),
                    BatchOutcome::Undone(Some(refusal)) => refusal,
                    BatchOutcome::Undone(None) => {
                        // Not counted: why, from the row as it is now.
                        let mut conn = self.pool().acquire().await?;
                        let row = promo_codes::find(&mut conn, &request.code).await?;
                        match Redeemed::refusal(Redeemability::of(row.as_ref(), request.now)) {
                            Some(refusal) => refusal,
                            None => continue,
                        }
                    }
                };
                return self.answer_refusal(request, refusal).await;
            }
            Err(StoreError::Contended { attempts: ATTEMPTS })
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Redeem, Some(&request.code)))
    }

    /// Redeems `requests` (one code, no subject twice) in one transaction.
    /// An error means the commit's outcome is unknown.
    pub(crate) async fn redeem_batch(&self, requests: &[Redemption]) -> Result<BatchOutcome> {
        let mut tx = self.pool().begin().await?;
        match steps(&mut tx, requests).await {
            Ok(BatchOutcome::Answered(answers)) => {
                // A redemption holding the hub's claim settles its intent with it.
                for (request, answer) in requests.iter().zip(&answers) {
                    let Some(intent) = request.intent else {
                        continue;
                    };
                    let granted = matches!(answer, Answer::Fresh(Redeemed::Granted { .. }));
                    if let Err(error) = claims::settle(&mut tx, intent, granted).await {
                        let _ = tx.rollback().await;
                        return Ok(BatchOutcome::Failed(error));
                    }
                }
                tx.commit().await?;
                Ok(BatchOutcome::Answered(answers))
            }
            Ok(undone) => {
                let _ = tx.rollback().await;
                Ok(undone)
            }
            Err(error) => {
                let _ = tx.rollback().await;
                Ok(BatchOutcome::Failed(error))
            }
        }
    }

    /// Answers `refusal` to a request whose batch was undone, recording it
    /// for its key in a transaction of its own (a concurrent request with
    /// the key may have answered first).
    async fn answer_refusal(&self, request: &Redemption, refusal: Redeemed) -> Result<Answer> {
        let Some((key, hash)) = &request.idempotency else {
            return Ok(Answer::Fresh(refusal));
        };
        let mut tx = self.pool().begin().await?;
        let claimed = idempotency::claim_many(&mut tx, &[(&request.subject, key, hash)]).await?;
        if let Some(answer) = replayed(claimed.into_iter().next().expect("one claim")) {
            tx.rollback().await?;
            return Ok(answer);
        }
        idempotency::answer_many(&mut tx, &[(&request.subject, key, &refusal)]).await?;
        tx.commit().await?;
        Ok(Answer::Fresh(refusal))
    }
}

/// What a claimed key answers already, if anything.
fn replayed(claimed: Claimed<Redeemed>) -> Option<Answer> {
    match claimed {
        Claimed::New => None,
        Claimed::Replay(outcome) => Some(Answer::Replayed(outcome)),
        Claimed::Rendered { status, response } => Some(Answer::ReplayedAsRendered {
            status,
            body: response,
        }),
        Claimed::Mismatch => Some(Answer::KeyReused),
    }
}

/// A batch's requests and what has been decided for each so far.
struct Decisions<'a> {
    requests: &'a [Redemption],
    code: &'a Code,
    /// One time for the batch: the latest arrival's, so that no request is
    /// judged before it came (one that arrived after the window closed is
    /// not granted for having been grouped with an earlier one).
    now: DateTime<Utc>,
    /// Answered by their key (a replay, a reused key).
    replays: Vec<Option<Answer>>,
    /// Decided here, to be recorded for their keys.
    decided: Vec<(usize, Redeemed)>,
    /// Not decided yet.
    open: Vec<usize>,
}

impl<'a> Decisions<'a> {
    fn new(requests: &'a [Redemption]) -> Self {
        Self {
            requests,
            code: &requests[0].code,
            now: requests.iter().map(|r| r.now).max().expect("a batch"),
            replays: vec![None; requests.len()],
            decided: Vec::new(),
            open: (0..requests.len()).collect(),
        }
    }

    fn subject(&self, i: usize) -> &'a str {
        &self.requests[i].subject
    }

    /// Every request's answer, in order.
    fn answers(self) -> Vec<Answer> {
        let mut answers = self.replays;
        for (i, outcome) in self.decided {
            answers[i] = Some(Answer::Fresh(outcome));
        }
        answers
            .into_iter()
            .map(|a| a.expect("every request answered"))
            .collect()
    }
}

/// The batch's statements, in `tx`, in their order.
async fn steps(tx: &mut sqlx::PgConnection, requests: &[Redemption]) -> Result<BatchOutcome> {
    let mut batch = Decisions::new(requests);
    claim_keys(tx, &mut batch).await?;
    let Some(seen) = verdict(tx, &mut batch).await? else {
        record_answers(tx, &batch).await?;
        return Ok(BatchOutcome::Answered(batch.answers()));
    };
    let ids = find_customers(tx, &mut batch).await?;
    if seen.once_anywhere && !hold_claims(tx, &mut batch, &ids).await? {
        return Ok(BatchOutcome::ClaimNeeded);
    }
    let winners = match one_per_customer(tx, &mut batch, &ids, &seen).await? {
        Ok(winners) => winners,
        Err(refusal) => return Ok(BatchOutcome::Undone(Some(refusal))),
    };
    if winners.is_empty() {
        record_answers(tx, &batch).await?;
        return Ok(BatchOutcome::Answered(batch.answers()));
    }
    // Room under the cap for all of them, as far as the unlocked read tells:
    // otherwise undone (a group then goes one by one, so that exactly the
    // earliest win).
    if seen
        .remaining()
        .is_some_and(|left| (left as usize) < winners.len())
    {
        return Ok(BatchOutcome::Undone(None));
    }
    grant(tx, &mut batch, &seen, &ids, &winners).await?;
    record_answers(tx, &batch).await?;
    match count(tx, &batch, &seen, &winners).await {
        Ok(true) => {}
        Ok(false) => return Ok(BatchOutcome::Undone(None)),
        // A global row's guard refused the count: no share is held here under this
        // database's identity (a restore, before the leader's sync) — try again.
        Err(error) if error.refused_by_guard() && seen.global_gone.is_some() => {
            let share_used_up = Redeemed::Gone(Redeemability::ShareUsedUp);
            return Ok(BatchOutcome::Undone(Some(share_used_up)));
        }
        Err(error) => return Err(error),
    }
    Ok(BatchOutcome::Answered(batch.answers()))
}

/// Claims the Idempotency-Keys: a key answered before (or used with another
/// body) answers its request now.
async fn claim_keys(tx: &mut sqlx::PgConnection, batch: &mut Decisions<'_>) -> Result<()> {
    let keyed: Vec<usize> = (0..batch.requests.len())
        .filter(|&i| batch.requests[i].idempotency.is_some())
        .collect();
    if keyed.is_empty() {
        return Ok(());
    }
    let claims: Vec<(&str, &str, &[u8])> = keyed
        .iter()
        .map(|&i| {
            let (key, hash) = batch.requests[i].idempotency.as_ref().expect("keyed");
            (batch.subject(i), key.as_str(), hash.as_slice())
        })
        .collect();
    let claimed = idempotency::claim_many(tx, &claims).await?;
    for (&i, claimed) in keyed.iter().zip(claimed) {
        batch.replays[i] = replayed(claimed);
    }
    let replays = &batch.replays;
    batch.open.retain(|&i| replays[i].is_none());
    Ok(())
}

/// What the code says now, unlocked: most refusals end here, each a repeat
/// when its customer redeemed the code before — whatever the code's state,
/// checked before the cap, so that a checkout retrying without its
/// Idempotency-Key hears "already redeemed, here is your grant", never
/// "fully redeemed". `Some`: the row, redeemable as read.
async fn verdict(
    tx: &mut sqlx::PgConnection,
    batch: &mut Decisions<'_>,
) -> Result<Option<CodeRecord>> {
    let seen = promo_codes::find(tx, batch.code).await?;
    let verdict = Redeemability::of(seen.as_ref(), batch.now);
    let Some(refusal) = Redeemed::refusal(verdict) else {
        return Ok(seen);
    };
    for i in std::mem::take(&mut batch.open) {
        let grant =
            redemptions::grant_of_subject(tx, batch.subject(i), batch.code.as_str()).await?;
        let answer = match grant {
            Some(grant) => Redeemed::already(batch.code, Some(grant)),
            None => refusal.clone(),
        };
        batch.decided.push((i, answer));
    }
    Ok(None)
}

/// The customers of the open requests, created on a first redemption; a
/// request of an unknown customer that names no tenant is refused.
async fn find_customers(
    tx: &mut sqlx::PgConnection,
    batch: &mut Decisions<'_>,
) -> Result<HashMap<String, Uuid>> {
    let subjects: Vec<&str> = batch.open.iter().map(|&i| batch.subject(i)).collect();
    let mut ids = customers::find_many(tx, &subjects).await?;
    let new: Vec<(&str, &str, &str)> = batch
        .open
        .iter()
        .map(|&i| &batch.requests[i])
        .filter(|r| !ids.contains_key(&r.subject))
        .filter_map(|r| {
            let tenant = r.tenant.as_deref()?;
            Some((r.subject.as_str(), tenant, r.email.as_str()))
        })
        .collect();
    if !new.is_empty() {
        ids.extend(customers::ensure_many(tx, &new).await?);
    }
    let (requests, decided) = (batch.requests, &mut batch.decided);
    batch.open.retain(|&i| {
        let known = ids.contains_key(&requests[i].subject);
        if !known {
            decided.push((i, Redeemed::TenantRequired));
        }
        known
    });
    Ok(ids)
}

/// A once-per-customer-anywhere code (`perCustomer: Global`): a customer who
/// redeemed it here hears so; any other is redeemed only holding the hub's
/// claim, its intent moved to `claimed` under the intent's row lock (the
/// guard admits the insert only then). `false`: a customer without the
/// claim — redeem through the hub. An intent recovery aborted first: an
/// error, nothing granted.
async fn hold_claims(
    tx: &mut sqlx::PgConnection,
    batch: &mut Decisions<'_>,
    ids: &HashMap<String, Uuid>,
) -> Result<bool> {
    let code = batch.code.as_str();
    for i in std::mem::take(&mut batch.open) {
        if let Some(grant) = redemptions::grant_of(tx, ids[batch.subject(i)], code).await? {
            batch
                .decided
                .push((i, Redeemed::already(batch.code, Some(grant))));
            continue;
        }
        let Some(intent) = batch.requests[i].intent else {
            return Ok(false);
        };
        if !claims::hold(tx, intent).await? {
            return Err(StoreError::ClaimWithdrawn);
        }
        batch.open.push(i);
    }
    Ok(true)
}

/// One redemption per customer and code: the unique rows decide, not the
/// code's lock. The winners, or the refusal of the database's guard (the
/// code was switched off or suspended since the read, or is outside its
/// window by the database's clock), answered as the code would be (a
/// campaign's: like a guess).
async fn one_per_customer(
    tx: &mut sqlx::PgConnection,
    batch: &mut Decisions<'_>,
    ids: &HashMap<String, Uuid>,
    seen: &CodeRecord,
) -> Result<std::result::Result<Vec<usize>, Redeemed>> {
    if batch.open.is_empty() {
        return Ok(Ok(Vec::new()));
    }
    let code = batch.code.as_str();
    let customers: Vec<Uuid> = batch.open.iter().map(|&i| ids[batch.subject(i)]).collect();
    let inserted = match redemptions::insert_many(tx, &customers, code).await {
        Err(error) if error.refused_by_guard() => {
            return Ok(Err(match seen.campaign_on {
                Some(_) => Redeemed::NotFound,
                None => Redeemed::Gone(Redeemability::Inactive),
            }));
        }
        inserted => inserted?,
    };
    let mut winners = Vec::new();
    for i in std::mem::take(&mut batch.open) {
        let customer = ids[batch.subject(i)];
        if inserted.contains(&customer) {
            winners.push(i);
        } else {
            let grant = redemptions::grant_of(tx, customer, code).await?;
            batch
                .decided
                .push((i, Redeemed::already(batch.code, grant)));
        }
    }
    Ok(Ok(winners))
}

/// The winners' grants: a credit in the ledger (and their balances), or a
/// discount grant each.
async fn grant(
    tx: &mut sqlx::PgConnection,
    batch: &mut Decisions<'_>,
    seen: &CodeRecord,
    ids: &HashMap<String, Uuid>,
    winners: &[usize],
) -> Result<()> {
    let code = batch.code.as_str();
    let customers: Vec<Uuid> = winners.iter().map(|&i| ids[batch.subject(i)]).collect();
    let mut grants: HashMap<Uuid, Grant> = match &seen.terms.discount {
        Some(discount) => {
            let currency = &batch.requests[0].currency;
            let terms = (discount, currency);
            let expires_at = seen.terms.expires_at;
            discounts::insert_many(tx, &customers, code, terms, batch.now, expires_at)
                .await?
                .into_iter()
                .map(|(customer, grant)| {
                    let currency = currency.clone();
                    (customer, Grant::Discount { currency, grant })
                })
                .collect()
        }
        None => {
            let credit_omr = seen.terms.credit_omr;
            ledger::append_many(tx, &customers, credit_omr, &ledger::promo_reason(code)).await?;
            let balances = ledger::balances(tx, &customers).await?;
            customers
                .iter()
                .map(|customer| {
                    let balance_omr = balances.get(customer).copied().unwrap_or_default();
                    let credit = Grant::Credit {
                        credit_omr,
                        balance_omr,
                    };
                    (*customer, credit)
                })
                .collect()
        }
    };
    for (&i, customer) in winners.iter().zip(&customers) {
        let grant = grants.remove(customer).expect("a grant per winner");
        let code = code.to_owned();
        batch.decided.push((i, Redeemed::Granted { code, grant }));
    }
    Ok(())
}

/// The lock, as late as possible: the counter by all the winners, and their
/// audit records, in one statement that re-checks the row it locks (so the
/// cap is exact). `false`: not counted, nothing written by it.
async fn count(
    tx: &mut sqlx::PgConnection,
    batch: &Decisions<'_>,
    seen: &CodeRecord,
    winners: &[usize],
) -> Result<bool> {
    let code = batch.code.as_str();
    let granted = seen.terms.grant(&batch.requests[0].currency);
    let audit = |i: usize, kind| {
        let actor = Actor::Subject {
            subject: batch.subject(i).to_owned(),
        };
        let facts = Facts {
            grant: Some(&granted),
            ..Facts::new(code, &actor)
        };
        let data = AuditData::of(kind, &facts, Some(seen.clone()), Some(seen.clone()));
        let payload = serde_json::to_value(&data).expect("audit data serialises");
        NewAuditRecord::new(code, kind, payload)
    };
    // The kind of grant, by the kind of record: a discount is not a credit.
    let kind = match seen.terms.discount {
        Some(_) => AuditKind::DiscountGranted,
        None => AuditKind::Redeemed,
    };
    let redeemed: Vec<NewAuditRecord> = winners.iter().map(|&i| audit(i, kind)).collect();
    let last = *winners.last().expect("winners");
    let exhausted = audit(last, AuditKind::Exhausted);
    let counted =
        promo_codes::count_redemptions(tx, seen, batch.now, &redeemed, &exhausted).await?;
    Ok(counted.is_some())
}

/// Records the outcome of each request that claimed an Idempotency-Key.
async fn record_answers(tx: &mut sqlx::PgConnection, batch: &Decisions<'_>) -> Result<()> {
    let answers: Vec<(&str, &str, &Redeemed)> = batch
        .decided
        .iter()
        .filter_map(|(i, outcome)| {
            let r = &batch.requests[*i];
            let (key, _) = r.idempotency.as_ref()?;
            Some((r.subject.as_str(), key.as_str(), outcome))
        })
        .collect();
    idempotency::answer_many(tx, &answers).await
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::domain::{Discount, Off};

    /// Every outcome reads back as it was recorded for its key.
    #[test]
    fn every_outcome_reads_back_as_recorded() {
        let at = Utc.with_ymd_and_hms(2027, 1, 2, 3, 4, 5).unwrap();
        let grant = DiscountGrant {
            grant_id: Uuid::from_u128(7),
            discount: Discount {
                off: Off::AmountOff(5000),
                applies_to: vec!["install".into()],
                duration_months: Some(3),
            },
            starts_at: at,
            ends_at: Some(at + chrono::Duration::days(90)),
        };
        let once = DiscountGrant {
            discount: Discount {
                off: Off::PercentOff(10),
                applies_to: Vec::new(),
                duration_months: None,
            },
            ends_at: None,
            ..grant.clone()
        };
        let code = || "LIVE-10".to_owned();
        let mut outcomes = vec![
            Redeemed::Granted {
                code: code(),
                grant: Grant::Credit {
                    credit_omr: 10,
                    balance_omr: 1_000_000_000_000,
                },
            },
            Redeemed::Granted {
                code: code(),
                grant: Grant::Discount {
                    currency: Currency::parse("JPY").unwrap(),
                    grant: grant.clone(),
                },
            },
            Redeemed::NotFound,
            Redeemed::AlreadyRedeemed {
                code: code(),
                credit_omr: Some(10),
                discount: None,
                redeemed_at: Some(at),
            },
            Redeemed::AlreadyRedeemed {
                code: code(),
                credit_omr: None,
                discount: Some(once),
                redeemed_at: Some(at),
            },
            Redeemed::AlreadyRedeemed {
                code: code(),
                credit_omr: None,
                discount: None,
                redeemed_at: None,
            },
            Redeemed::TenantRequired,
            Redeemed::ClaimedElsewhere { code: code() },
        ];
        outcomes.extend(
            [
                Redeemability::Redeemable,
                Redeemability::Unknown,
                Redeemability::Tombstoned,
                Redeemability::Unlaunched,
                Redeemability::Suspended,
                Redeemability::Inactive,
                Redeemability::NotYetValid { valid_from: at },
                Redeemability::Expired { expired_at: at },
                Redeemability::Capped { max_redemptions: 3 },
                Redeemability::ShareUsedUp,
            ]
            .map(Redeemed::Gone),
        );
        for outcome in outcomes {
            let recorded = serde_json::to_value(&outcome).unwrap();
            let read: Redeemed = serde_json::from_value(recorded.clone())
                .unwrap_or_else(|e| panic!("{recorded}: {e}"));
            assert_eq!(read, outcome, "{recorded}");
        }
    }
}
