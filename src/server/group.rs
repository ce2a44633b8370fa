//! Group commit for hot codes: the redemptions of one code that arrive in
//! one server process while a transaction for that code is under way are
//! redeemed together, as one batch (`Store::redeem_batch`: one transaction
//! whose statements each carry all of them — one counter update by their
//! number, multi-row inserts). Each request still gets its own exact answer.
//! The queue is the server's; the store holds the batch's statements.
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

use tokio::sync::oneshot;

use crate::store::redeem::{Answer, BatchOutcome, Redemption};
use crate::store::{Operation, Result, Store, StoreError};

/// Most requests in one group.
const MAX_GROUP: usize = 64;
/// Most requests of one code waiting for a group: beyond, a request is
/// answered at once with an error to retry, so that a stalled database does
/// not make memory grow with arrivals.
const MAX_WAITING: usize = 4096;

struct Waiting {
    request: Redemption,
    reply: oneshot::Sender<Result<Answer>>,
}

/// The requests of codes with a transaction under way.
#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiting>,
}

/// What group commit did, for the metrics.
#[derive(Clone, Debug, Default)]
pub(crate) struct GroupMetrics {
    /// Groups of two or more redemptions committed together.
    pub groups: prometheus_client::metrics::counter::Counter,
    /// The redemption requests in them.
    pub grouped: prometheus_client::metrics::counter::Counter,
    /// Groups undone and redeemed one by one (the cap, or a failure).
    pub(crate) one_by_one: prometheus_client::metrics::counter::Counter,
}

pub(crate) struct GroupCommit {
    store: Store,
    metrics: GroupMetrics,
    /// Codes with a transaction under way → who waits for the next.
    codes: Mutex<HashMap<String, Queue>>,
}

impl GroupCommit {
    pub fn new(store: Store, metrics: GroupMetrics) -> Arc<Self> {
        Arc::new(Self {
            store,
            metrics,
            codes: Mutex::default(),
        })
    }

    /// Redeems `request`, together with the other requests of its code
    /// that arrive while a transaction for it is under way.
    pub async fn redeem(self: &Arc<Self>, request: Redemption) -> Result<Answer> {
        // Redemptions holding the hub's claim (once per customer anywhere) form groups of
        // their own: a first pass, which finds it needs a claim, would undo their group.
        let code = match request.intent {
            Some(_) => format!("{}#holding", request.code),
            None => request.code.to_string(),
        };
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
            let _ = reply.send(self.store.redeem(&request).await);
            return;
        }
        let requests: Vec<Redemption> = group.iter().map(|w| w.request.clone()).collect();
        match self.store.redeem_batch(&requests).await {
            Ok(BatchOutcome::Answered(answers)) => {
                self.metrics.groups.inc();
                self.metrics.grouped.inc_by(answers.len() as u64);
                for (waiting, answer) in group.into_iter().zip(answers) {
                    let _ = waiting.reply.send(Ok(answer));
                }
            }
            // Undone (the cap, a change, the guard) or failed before its
            // commit, nothing written: one by one, in their order of arrival.
            Ok(undone) => {
                if let BatchOutcome::Failed(error) = &undone {
                    tracing::debug!(error = %crate::telemetry::describe(error),
                        "a group of redemptions failed; redeeming them one by one");
                }
                self.metrics.one_by_one.inc();
                for Waiting { request, reply } in group {
                    let _ = reply.send(self.store.redeem(&request).await);
                }
            }
            Err(error) => {
                let code = &requests[0].code;
                let cause = crate::telemetry::describe(&error);
                tracing::warn!(code = %code, requests = group.len(), error = %cause,
                    "a group of redemptions lost its commit; each is answered 503");
                for waiting in group {
                    let _ = waiting.reply.send(Err(StoreError::CommitOutcomeUnknown {
                        cause: cause.clone(),
                    }
                    .during(Operation::Redeem, Some(code))));
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
