//! A Sovereign's side of once per customer on any Sovereign (`perCustomer:
//! Global`, DESIGN §11 rule 8): the server redeems such a code holding the
//! hub's claim for the customer, and recovers the intents a redemption left
//! behind (`voucher_core::claims` decides at the hub; `store::claims` keeps
//! the intents; this is the I/O between them).
//!
//! A redemption: a pending intent committed; the hub asked to claim the
//! customer for it; then one transaction that holds the intent under its row
//! lock (`claimed`), redeems, and settles it (`done`). Whatever else comes of
//! it — the hub out of reach, nothing granted, a failure — the intent is
//! aborted under the same lock and its claim deleted. Recovery aborts the
//! intents of redemptions that never finished (a process killed between the
//! claim and the commit) and deletes their claims, until the hub acknowledges.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use voucher_core::claims::{ClaimAnswer, ClaimAsk, claimant};

use super::claims;
use crate::store::claims::Unheld;
use crate::store::redeem::{Answer, Redeemed, Redemption};
use crate::store::{Store, StoreError};

/// How this Sovereign's server claims customers at the hub.
#[derive(Clone)]
pub struct Claimer {
    pub client: async_nats::Client,
    /// This Sovereign's name (its NATS account's).
    pub sovereign: String,
    pub prefix: String,
    /// The vendor's claim key: the same on every Sovereign, so that one
    /// customer is one claimant everywhere.
    pub key: Vec<u8>,
    pub timeout: Duration,
    /// A pending intent older than this is recovered (aborted, its claim
    /// deleted): longer than any redemption takes.
    pub recover_after: Duration,
}

impl std::fmt::Debug for Claimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claimer")
            .field("sovereign", &self.sovereign)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("recover_after", &self.recover_after)
            .finish_non_exhaustive()
    }
}

/// What a claim came to.
#[derive(Debug)]
pub enum Claimed {
    /// The redemption to make, holding the hub's claim (its `intent`).
    Holding(Redemption),
    /// Decided without redeeming: the customer is held elsewhere.
    Answered(Answer),
}

/// Why a once-per-customer-anywhere redemption was not decided.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The hub could not be asked: such a redemption fails closed.
    #[error("the hub's claim service cannot be reached: {0}")]
    Unreachable(#[from] claims::Error),
}

impl Claimer {
    /// Redeems `request` (a code whose `Answer` was `ClaimNeeded`) holding the
    /// hub's claim for its customer, alone (the server groups the holding
    /// redemptions of a code instead: [`Claimer::claim`], then
    /// [`Claimer::settle`]).
    pub async fn redeem(&self, store: &Store, request: Redemption) -> Result<Answer, Error> {
        match self.claim(store, request).await? {
            Claimed::Answered(answer) => Ok(answer),
            Claimed::Holding(holding) => {
                let answer = store.redeem(&holding).await;
                self.settle(store, &holding, &answer).await?;
                Ok(answer?)
            }
        }
    }

    /// Claims the customer of `request` at the hub for a new intent: the
    /// redemption to make holding the claim, or the answer (the customer is
    /// held elsewhere). The hub out of reach: an error, the intent aborted.
    pub async fn claim(&self, store: &Store, request: Redemption) -> Result<Claimed, Error> {
        let intent = Uuid::new_v4();
        let claimant = claimant(&self.key, &request.subject);
        store
            .open_intent(intent, &request.code, &request.subject, &claimant)
            .await?;
        let ask = ClaimAsk::Create {
            code: request.code.to_string(),
            claimant,
            intent: intent.to_string(),
        };
        match self.ask(&ask).await {
            Ok(ClaimAnswer::Claimed) => Ok(Claimed::Holding(Redemption {
                intent: Some(intent),
                ..request
            })),
            Ok(ClaimAnswer::Held | ClaimAnswer::Released) => {
                store.refuse_intent(intent).await?;
                let code = request.code.to_string();
                Ok(Claimed::Answered(Answer::Fresh(
                    Redeemed::ClaimedElsewhere { code },
                )))
            }
            Err(error) => {
                self.give_back(store, intent).await?;
                Err(Error::Unreachable(error))
            }
        }
    }

    /// After a holding redemption: granted, its intent was settled `done` with
    /// it; otherwise (nothing granted, or nothing known) the claim goes back
    /// at once, or by recovery if the hub does not answer now.
    pub async fn settle(
        &self,
        store: &Store,
        holding: &Redemption,
        answer: &Result<Answer, StoreError>,
    ) -> Result<(), Error> {
        let Some(intent) = holding.intent else {
            return Ok(());
        };
        if let Ok(Answer::Fresh(Redeemed::Granted { .. })) = answer {
            return Ok(());
        }
        self.give_back(store, intent).await
    }

    /// Aborts `intent` if still pending (under its row lock) and deletes its
    /// claim, which recovery retries if the hub does not acknowledge now.
    async fn give_back(&self, store: &Store, intent: Uuid) -> Result<(), Error> {
        if let Some(unheld) = store.abort_intent(intent).await? {
            let _ = self.delete(store, &unheld).await;
        }
        Ok(())
    }

    async fn ask(&self, ask: &ClaimAsk) -> Result<ClaimAnswer, claims::Error> {
        claims::ask(
            &self.client,
            &self.prefix,
            &self.sovereign,
            ask,
            self.timeout,
        )
        .await
    }

    /// Deletes an unheld claim at the hub; acknowledged once it answers.
    async fn delete(&self, store: &Store, unheld: &Unheld) -> Result<(), Error> {
        let ask = ClaimAsk::Delete {
            code: unheld.code.clone(),
            claimant: unheld.claimant.clone(),
            intent: unheld.intent.to_string(),
        };
        self.ask(&ask).await?;
        store.acknowledge_unheld(unheld.intent).await?;
        Ok(())
    }

    /// One round of recovery: stale pending intents aborted, then every
    /// unacknowledged claim deleted at the hub (the oldest first).
    pub async fn recover(&self, store: &Store) -> Result<(), Error> {
        let aborted = store.abort_stale_intents(self.recover_after).await?;
        if aborted > 0 {
            tracing::info!(
                aborted,
                "recovered intents of unfinished once-per-customer-anywhere redemptions"
            );
        }
        for unheld in store.unheld_claims(100).await? {
            self.delete(store, &unheld).await?;
        }
        Ok(())
    }

    /// Recovery every `every`, until `stop` (every server replica runs it:
    /// each intent is moved under its row lock, and a delete is idempotent).
    pub async fn run(self, store: Store, every: Duration, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while stop.run_until_cancelled(ticks.tick()).await.is_some() {
            if let Err(e) = self.recover(&store).await {
                tracing::warn!(error = %e, "claim recovery round failed; trying again");
            }
        }
    }
}
