//! The hub's claim service (`perCustomer: Global`, DESIGN §11 rule 8) and a
//! Sovereign's request to it. Each claim is one key of a bucket that only
//! the hub reads — never mirrored, never exported: no Sovereign reads
//! another's customers — and every change is a compare-and-set on the
//! revision read, decided by `voucher_core::claims::decide`.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tokio_util::sync::CancellationToken;
use voucher_core::claims::{ClaimAnswer, ClaimAsk, CustomerClaim, decide};

use super::service;

/// The hub-only bucket of claims, one key per code and customer.
pub const BUCKET: &str = "voucher_claims";
/// Claims arrive on `<prefix>.<sovereign>`, as allotment requests do.
pub const SUBJECT_PREFIX: &str = "voucher.claim";
const QUEUE_GROUP: &str = "voucher-claim";
/// Compare-and-set attempts on one request before the replica stays silent.
const ATTEMPTS: usize = 16;
const CONCURRENCY: usize = 64;

/// One failed operation of the claim service, naming what it was about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening the KV bucket {BUCKET}: {0}")]
    Bucket(String),
    #[error("the claim {key}: {source}")]
    Read {
        key: String,
        source: super::bucket::ReadError,
    },
    #[error("changing the claim {key}: {source}")]
    Change {
        key: String,
        source: super::bucket::ChangeError,
    },
    #[error("starting the claim service: {0}")]
    Serve(service::ServeError),
    #[error("asking the hub to claim a customer of {code} as {sovereign}: {source}")]
    Ask {
        code: String,
        sovereign: String,
        source: service::AskError,
    },
}

/// The hub's claim bucket: created when missing.
pub async fn bucket(js: &jetstream::Context, replicas: usize) -> Result<kv::Store, Error> {
    super::bucket::open(js, BUCKET, replicas)
        .await
        .map_err(Error::Bucket)
}

/// Reads a claim and its revision.
pub async fn read(kv: &kv::Store, key: &str) -> Result<Option<(CustomerClaim, u64)>, Error> {
    super::bucket::read(kv, key)
        .await
        .map_err(|source| Error::Read {
            key: key.into(),
            source,
        })
}

/// Decides one request and writes what it changes; the answer to send
/// (only once the write is acknowledged).
async fn handle(kv: &kv::Store, sovereign: &str, ask: &ClaimAsk) -> Result<ClaimAnswer, Error> {
    let key = ask.key();
    super::bucket::change(kv, &key, ATTEMPTS, |claim: Option<&CustomerClaim>| {
        let decision = decide(claim, sovereign, ask);
        (decision.write, decision.answer)
    })
    .await
    .map_err(|source| Error::Change { key, source })
}

/// Starts one replica of the claim service, answering until `stop`.
pub async fn start(
    client: async_nats::Client,
    kv: kv::Store,
    prefix: &str,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    service::serve(client, prefix, QUEUE_GROUP, CONCURRENCY, stop, move |sovereign, ask: ClaimAsk| {
        let kv = kv.clone();
        async move {
            match handle(&kv, &sovereign, &ask).await {
                Ok(answer) => Some(answer),
                Err(e) => {
                    tracing::warn!(sovereign, error = %e, "claim request left unanswered; the Sovereign re-sends");
                    None
                }
            }
        }
    })
    .await
    .map_err(Error::Serve)
}

/// A Sovereign's claim request, answered within `timeout` or an error.
pub async fn ask(
    client: &async_nats::Client,
    prefix: &str,
    sovereign: &str,
    ask: &ClaimAsk,
    timeout: Duration,
) -> Result<ClaimAnswer, Error> {
    let code = match ask {
        ClaimAsk::Create { code, .. } | ClaimAsk::Delete { code, .. } => code.clone(),
    };
    service::ask(client, prefix, sovereign, ask, timeout)
        .await
        .map_err(|source| Error::Ask {
            code,
            sovereign: sovereign.into(),
            source,
        })
}
