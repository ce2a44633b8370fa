//! Group commit for hot codes: the redemptions of one code that arrive in
//! one server process while a transaction for that code is under way are
//! redeemed together, in one transaction whose statements each carry all of
//! them (one counter update by their number, multi-row inserts). Each request
//! still gets its own exact answer.
//!
//! Nothing waits for company: a code's first request starts at once, and
//! those that arrive meanwhile form the next group. A group whose cap would
//! be passed, or that fails, is undone and its requests redeemed one by one
//! in their order of arrival, so the earliest are granted and one bad
//! request never fails the others. A group whose commit is lost answers
//! every request with an error (a retry with its Idempotency-Key returns
//! the original answer, or redeems).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;

use super::idempotency::{self, Claimed};
use super::outbox::NewAuditRecord;
use super::redeem::{Answer, Redeemed, Redemption, refused};
use super::{Operation, Result, Store, StoreError, customers, ledger, promo_codes, redemptions};
use crate::domain::{Actor, AuditData, AuditKind, Code, Facts, Redeemability};

/// Most requests in one group.
const MAX_GROUP: usize = 64;
/// Most requests of one code waiting for a group: beyond, a request is
/// answered at once with an error to retry, so that a stalled database does
/// not make memory grow with arrivals.
const MAX_WAITING: usize = 4096;

/// How an answer is rendered for its Idempotency-Key.
pub type Render = fn(&Redeemed) -> (u16, serde_json::Value);

/// A redemption request, owned while it waits for its group.
#[derive(Clone, Debug)]
pub struct Request {
    pub code: Code,
    pub subject: String,
    pub tenant: Option<String>,
    pub email: String,
    pub idempotency: Option<(String, Vec<u8>)>,
    pub now: DateTime<Utc>,
}

impl Request {
    fn borrow(&self) -> Redemption<'_> {
        Redemption {
            code: &self.code,
            subject: &self.subject,
            tenant: self.tenant.as_deref(),
            email: &self.email,
            idempotency: self
                .idempotency
                .as_ref()
                .map(|(key, hash)| (key.as_str(), hash.clone())),
            now: self.now,
        }
    }
}

struct Waiting {
    request: Request,
    reply: oneshot::Sender<Result<Answer>>,
}

/// The requests of codes with a transaction under way.
#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiting>,
}

/// What group commit did, for the metrics.
#[derive(Clone, Debug, Default)]
pub struct GroupMetrics {
    /// Groups of two or more redemptions committed together.
    pub groups: prometheus_client::metrics::counter::Counter,
    /// The redemption requests in them.
    pub grouped: prometheus_client::metrics::counter::Counter,
    /// Groups undone and redeemed one by one (the cap, or a failure).
    pub one_by_one: prometheus_client::metrics::counter::Counter,
}

pub struct GroupCommit {
    store: Store,
    render: Render,
    metrics: GroupMetrics,
    /// Codes with a transaction under way → who waits for the next.
    codes: Mutex<HashMap<String, Queue>>,
}

/// What a group transaction came to.
enum Group {
    Answered(Vec<Answer>),
    /// Undone: redeem its requests one by one.
    OneByOne,
}

impl GroupCommit {
    pub fn new(store: Store, render: Render, metrics: GroupMetrics) -> Arc<Self> {
        Arc::new(Self {
            store,
            render,
            metrics,
            codes: Mutex::default(),
        })
    }

    /// Redeems `request`, together with the other requests of its code
    /// that arrive while a transaction for it is under way.
    pub async fn redeem(self: &Arc<Self>, request: Request) -> Result<Answer> {
        let code = request.code.to_string();
        let (reply, answer) = oneshot::channel();
        let first = {
            let mut codes = self.codes.lock().expect("the queues");
            match codes.get_mut(&code) {
                Some(queue) if queue.waiting.len() >= MAX_WAITING => {
                    return Err(StoreError::Busy {
                        waiting: queue.waiting.len(),
                    }
                    .during(Operation::Redeem, Some(&request.code)));
                }
                Some(queue) => {
                    queue.waiting.push_back(Waiting { request, reply });
                    None
                }
                None => {
                    codes.insert(code.clone(), Queue::default());
                    Some(Waiting { request, reply })
                }
            }
        };
        if let Some(first) = first {
            // This request opens the code's queue: it and then each group
            // that formed meanwhile are redeemed by a task of their own, so
            // that a client going away never strands the others.
            tokio::spawn(self.clone().drain(code, first));
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::CommitOutcomeUnknown {
                cause: "the redemption task ended".into(),
            })
        })
    }

    /// Redeems `first`, then the groups that wait, until none does.
    async fn drain(self: Arc<Self>, code: String, first: Waiting) {
        use futures::FutureExt;
        let mut group = vec![first];
        loop {
            // A panic fails this group's requests (their answers are dropped:
            // 503), never the code: the next group still goes.
            let redeemed = std::panic::AssertUnwindSafe(self.redeem_group(group))
                .catch_unwind()
                .await;
            if redeemed.is_err() {
                tracing::error!(code = %code, "a group of redemptions panicked; its requests were answered 503");
            }
            let mut codes = self.codes.lock().expect("the queues");
            let Some(queue) = codes.get_mut(&code) else {
                return;
            };
            if queue.waiting.is_empty() {
                codes.remove(&code);
                return;
            }
            group = take_group(&mut queue.waiting);
        }
    }

    async fn redeem_group(&self, group: Vec<Waiting>) {
        if group.len() == 1 {
            let Waiting { request, reply } = group.into_iter().next().expect("one");
            let _ = reply.send(self.store.redeem(&request.borrow(), self.render).await);
            return;
        }
        let requests: Vec<Redemption<'_>> = group.iter().map(|w| w.request.borrow()).collect();
        let code = group[0].request.code.clone();
        match self.store.redeem_together(&requests, self.render).await {
            Ok(Group::Answered(answers)) => {
                self.metrics.groups.inc();
                self.metrics.grouped.inc_by(answers.len() as u64);
                for (waiting, answer) in group.into_iter().zip(answers) {
                    let _ = waiting.reply.send(Ok(answer));
                }
            }
            Ok(Group::OneByOne) => {
                self.metrics.one_by_one.inc();
                drop(requests);
                for Waiting { request, reply } in group {
                    let _ = reply.send(self.store.redeem(&request.borrow(), self.render).await);
                }
            }
            Err(error) => {
                let cause = crate::telemetry::describe(&error);
                tracing::warn!(code = %code, requests = group.len(), error = %cause,
                    "a group of redemptions lost its commit; each is answered 503");
                for waiting in group {
                    let _ = waiting.reply.send(Err(StoreError::CommitOutcomeUnknown {
                        cause: cause.clone(),
                    }
                    .during(Operation::Redeem, Some(&code))));
                }
            }
        }
    }
}

/// The next group: the earliest waiting requests, at most [`MAX_GROUP`], no
/// customer twice (a customer's second request waits for the next group,
/// where it finds the first one's grant).
fn take_group(waiting: &mut VecDeque<Waiting>) -> Vec<Waiting> {
    let mut group = Vec::new();
    let mut subjects = HashSet::new();
    let mut later = VecDeque::new();
    while let Some(next) = waiting.pop_front() {
        if group.len() < MAX_GROUP && subjects.insert(next.request.subject.clone()) {
            group.push(next);
        } else {
            later.push_back(next);
        }
    }
    *waiting = later;
    group
}

impl Store {
    /// Redeems `requests` (one code, no subject twice) in one transaction,
    /// or tells to redeem them one by one (nothing written). An error means
    /// the commit's outcome is unknown.
    async fn redeem_together(&self, requests: &[Redemption<'_>], render: Render) -> Result<Group> {
        let mut tx = self.pool().begin().await?;
        match together(&mut tx, requests, render).await {
            Ok(Some(answers)) => {
                tx.commit().await?;
                Ok(Group::Answered(answers))
            }
            Ok(None) => {
                let _ = tx.rollback().await;
                Ok(Group::OneByOne)
            }
            Err(error) => {
                // Undone before the commit: nothing was written.
                tracing::debug!(error = %crate::telemetry::describe(&error),
                    "a group of redemptions failed; redeeming them one by one");
                let _ = tx.rollback().await;
                Ok(Group::OneByOne)
            }
        }
    }
}

/// The group's statements, in `tx`: `None` when it must be undone and its
/// requests redeemed one by one.
async fn together(
    tx: &mut sqlx::PgConnection,
    requests: &[Redemption<'_>],
    render: Render,
) -> Result<Option<Vec<Answer>>> {
    let code = requests[0].code;
    // One time for the group: the latest arrival's, so that no request is
    // judged before it came (one that arrived after the window closed is not
    // granted for having been grouped with an earlier one).
    let now = requests.iter().map(|r| r.now).max().expect("a group");
    let mut answers: Vec<Option<Answer>> = vec![None; requests.len()];
    // Outcomes to record for the Idempotency-Keys claimed here.
    let mut decided: Vec<(usize, Redeemed)> = Vec::new();

    let keyed: Vec<usize> = (0..requests.len())
        .filter(|&i| requests[i].idempotency.is_some())
        .collect();
    if !keyed.is_empty() {
        let claims: Vec<(&str, &str, &[u8])> = keyed
            .iter()
            .map(|&i| {
                let (key, hash) = requests[i].idempotency.as_ref().expect("keyed");
                (requests[i].subject, *key, hash.as_slice())
            })
            .collect();
        for (&i, claimed) in keyed
            .iter()
            .zip(idempotency::claim_many(tx, &claims).await?)
        {
            answers[i] = match claimed {
                Claimed::New => None,
                Claimed::Replay { status, response } => Some(Answer::Replayed {
                    status,
                    body: response,
                }),
                Claimed::Mismatch => Some(Answer::KeyReused),
            };
        }
    }
    let mut open: Vec<usize> = (0..requests.len())
        .filter(|&i| answers[i].is_none())
        .collect();

    // What the code says now, unlocked.
    let seen = promo_codes::find(tx, code).await?;
    let verdict = Redeemability::of(seen.as_ref(), now);
    let refusal = if verdict.is_hidden() {
        Some(Redeemed::NotFound)
    } else if !verdict.is_redeemable() {
        Some(Redeemed::Gone(verdict))
    } else {
        None
    };
    if let Some(refusal) = refusal {
        for i in open.drain(..) {
            let answer = refused(tx, code, requests[i].subject, refusal.clone()).await?;
            decided.push((i, answer));
        }
    }
    let seen = seen.filter(|_| verdict.is_redeemable());

    // The customers, created on a first redemption.
    let mut ids = HashMap::new();
    if !open.is_empty() {
        let subjects: Vec<&str> = open.iter().map(|&i| requests[i].subject).collect();
        ids = customers::find_many(tx, &subjects).await?;
        let new: Vec<(&str, &str, &str)> = open
            .iter()
            .filter(|&&i| !ids.contains_key(requests[i].subject))
            .filter_map(|&i| {
                let r = &requests[i];
                r.tenant.map(|tenant| (r.subject, tenant, r.email))
            })
            .collect();
        if !new.is_empty() {
            ids.extend(customers::ensure_many(tx, &new).await?);
        }
        open.retain(|&i| {
            let known = ids.contains_key(requests[i].subject);
            if !known {
                decided.push((i, Redeemed::TenantRequired));
            }
            known
        });
    }

    // One per customer: the unique rows decide.
    let mut winners = Vec::new();
    if !open.is_empty() {
        let customers: Vec<uuid::Uuid> = open.iter().map(|&i| ids[requests[i].subject]).collect();
        let inserted = redemptions::insert_many(tx, &customers, code.as_str()).await?;
        for &i in &open {
            let customer = ids[requests[i].subject];
            if inserted.contains(&customer) {
                winners.push(i);
            } else {
                let grant = redemptions::grant_of(tx, customer, code.as_str()).await?;
                decided.push((i, Redeemed::already(code, grant)));
            }
        }
    }

    if let Some(seen) = seen.filter(|_| !winners.is_empty()) {
        // Room under the cap for all of them, as far as the unlocked read
        // tells: otherwise one by one, so that exactly the earliest win.
        if seen
            .remaining()
            .is_some_and(|left| (left as usize) < winners.len())
        {
            return Ok(None);
        }
        let credit = seen.terms.credit_omr;
        let customers: Vec<uuid::Uuid> =
            winners.iter().map(|&i| ids[requests[i].subject]).collect();
        ledger::append_many(tx, &customers, credit, &ledger::promo_reason(code.as_str())).await?;
        let balances = ledger::balances(tx, &customers).await?;
        for &i in &winners {
            decided.push((
                i,
                Redeemed::Granted {
                    code: code.to_string(),
                    credit_omr: credit,
                    balance_omr: balances
                        .get(&ids[requests[i].subject])
                        .copied()
                        .unwrap_or_default(),
                },
            ));
        }
        record_answers(tx, requests, &decided, render).await?;
        // The lock, as late as possible: the counter by all of them, and
        // their audit records.
        let audit = |i: usize, kind| {
            let actor = Actor::Subject {
                subject: requests[i].subject.to_owned(),
            };
            let facts = Facts {
                credit_omr: Some(credit),
                ..Facts::new(code.as_str(), &actor)
            };
            let data = AuditData::of(kind, &facts, Some(seen.clone()), Some(seen.clone()));
            NewAuditRecord::new(
                code.as_str(),
                kind,
                serde_json::to_value(&data).expect("audit data serialises"),
            )
        };
        let redeemed: Vec<NewAuditRecord> = winners
            .iter()
            .map(|&i| audit(i, AuditKind::Redeemed))
            .collect();
        let last = *winners.last().expect("winners");
        let counted = promo_codes::count_redemptions(
            tx,
            &seen,
            now,
            &redeemed,
            &audit(last, AuditKind::Exhausted),
        )
        .await?;
        if counted.is_none() {
            // The cap was reached, the code switched off or changed meanwhile.
            return Ok(None);
        }
    } else {
        record_answers(tx, requests, &decided, render).await?;
    }
    for (i, outcome) in decided {
        answers[i] = Some(Answer::Fresh(outcome));
    }
    Ok(Some(
        answers
            .into_iter()
            .map(|a| a.expect("every request answered"))
            .collect(),
    ))
}

/// Records the outcome of each request that claimed an Idempotency-Key.
async fn record_answers(
    tx: &mut sqlx::PgConnection,
    requests: &[Redemption<'_>],
    decided: &[(usize, Redeemed)],
    render: Render,
) -> Result<()> {
    let answers: Vec<(&str, &str, u16, serde_json::Value)> = decided
        .iter()
        .filter_map(|(i, outcome)| {
            let r = &requests[*i];
            r.idempotency.as_ref().map(|(key, _)| {
                let (status, body) = render(outcome);
                (r.subject, *key, status, body)
            })
        })
        .collect();
    idempotency::answer_many(tx, &answers).await
}
