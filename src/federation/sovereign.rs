//! A Sovereign's side of the allotment: its leader keeps each global code's
//! share topped up from the hub, one request at a time, written to the
//! database before it is sent and applied under the row lock when answered
//! (`voucher_core::allotment::Local` decides; this is the I/O around it).

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use voucher_core::allotment::{Applied, Request};

use super::allotment::{self, Ask};
use crate::domain::Code;
use crate::store::{Store, StoreError, allotments};

/// How a Sovereign asks: its name (its NATS account), the hub's subjects,
/// when and by how much it refills.
#[derive(Clone, Debug)]
pub struct Refill {
    pub sovereign: String,
    pub prefix: String,
    /// Ask for more once fewer than this many units are left.
    pub low_water: u64,
    /// How many more to ask for.
    pub step: u64,
    pub timeout: Duration,
}

/// One failed step of a refill.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Hub(#[from] allotment::Error),
    #[error("{0} is no global code of this Sovereign")]
    NotGlobal(Code),
}

/// One round for `code`: the request the state calls for (the outstanding
/// one again, a sync, or a refill), recorded, sent, and its answer applied.
/// `None`: nothing to ask for now.
pub async fn refill(
    store: &Store,
    client: &async_nats::Client,
    refill: &Refill,
    code: &Code,
    hub_uid: &str,
) -> Result<Option<Applied>, Error> {
    let identity = store.database_identity().await?;
    let Some(request) = record_request(store, refill, code, hub_uid, &identity).await? else {
        return Ok(None);
    };
    let ask = Ask {
        code: code.to_string(),
        request: request.clone(),
    };
    let reply = allotment::ask(
        client,
        &refill.prefix,
        &refill.sovereign,
        &ask,
        refill.timeout,
    )
    .await?;
    let mut tx = store.pool().begin().await.map_err(StoreError::from)?;
    let mut local = allotments::lock(&mut tx, code)
        .await?
        .ok_or_else(|| Error::NotGlobal(code.clone()))?
        .local;
    let applied = local.apply(&request, &reply, &identity);
    allotments::save(&mut tx, code, &local, &identity).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(Some(applied))
}

/// Decides the next request under the row lock and records it (with a
/// share lowered for a sync) before anything is sent.
async fn record_request(
    store: &Store,
    refill: &Refill,
    code: &Code,
    hub_uid: &str,
    identity: &str,
) -> Result<Option<Request>, Error> {
    let mut tx = store.pool().begin().await.map_err(StoreError::from)?;
    let held = allotments::lock(&mut tx, code)
        .await?
        .ok_or_else(|| Error::NotGlobal(code.clone()))?;
    let (mut local, offered, return_asked) = (held.local, held.offered, held.return_asked);
    let counted: i32 = sqlx::query_scalar("SELECT times_redeemed FROM promo_codes WHERE code = $1")
        .bind(code.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::from)?;
    local.counted(u64::try_from(counted).unwrap_or_default());
    // A code no longer offered gives back what it has not spent, once what is out is
    // answered and the state synced.
    // The hub asking for returns is answered the same way, and nothing more is asked for.
    let giving_back = !offered || return_asked;
    let request = match !giving_back || local.outstanding.is_some() || local.needs_sync(identity) {
        true => local.next_request(hub_uid, identity, refill.low_water, refill.step),
        false => local.give_back(hub_uid, 0),
    };
    allotments::save(&mut tx, code, &local, identity).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(request)
}

/// The leader's loop: every `every`, one round for each global code of this
/// Sovereign, until `stop`. A failed round is logged and tried again on the
/// next tick (its request, recorded, is re-sent as it is).
pub async fn run(
    store: Store,
    client: async_nats::Client,
    refill: Refill,
    every: Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while stop.run_until_cancelled(ticks.tick()).await.is_some() {
        let codes = match store.global_codes().await {
            Ok(codes) => codes,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the global codes; trying again");
                continue;
            }
        };
        for (code, hub_uid) in codes {
            if let Err(e) = self::refill(&store, &client, &refill, &code, &hub_uid).await {
                tracing::warn!(%code, error = %e, "allotment round failed; trying again");
            }
        }
    }
}
