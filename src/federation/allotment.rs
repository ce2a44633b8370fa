//! The hub's allotment service and a Sovereign's request to it.
//!
//! The record of each global code is one key of a JetStream KV bucket; a
//! replica of the service (every replica in one queue group) reads it, lets
//! `voucher_core::allotment::decide` decide, writes with a compare-and-set on
//! the revision it read, and answers only once that write is acknowledged. A
//! compare-and-set that loses to another replica is decided again on the new
//! record — the same as the Sovereign re-sending its request, which the
//! protocol applies at most once. A replica that cannot reach the bucket
//! answers nothing: the Sovereign times out and re-sends.

use std::hash::{Hash as _, Hasher as _};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use voucher_core::allotment::{Record, Reply, Request, decide};

use super::service;

/// The KV bucket of the hub's records, one key per global code.
pub const BUCKET: &str = "voucher_allotments";
/// Requests arrive on `<prefix>.<sovereign>`: the last token names the
/// Sovereign, fixed by its NATS account's import (never the body's word).
/// This is the prefix the shipped configuration uses.
pub const SUBJECT_PREFIX: &str = "voucher.allotment";
const QUEUE_GROUP: &str = "voucher-allotment";
/// A Sovereign reads the hub's definition of a code on `<prefix>.<sovereign>`:
/// a service, like the allotment — never the hub's JetStream API, which would
/// reach every bucket of the hub (rule 11).
pub const DEFINITION_PREFIX: &str = "voucher.definition";
const DEFINITION_QUEUE_GROUP: &str = "voucher-definition";
/// Compare-and-set attempts on one request before the replica gives up
/// (and stays silent: the Sovereign re-sends).
const ATTEMPTS: usize = 16;
/// Requests one replica decides at once.
const CONCURRENCY: usize = 64;

/// What a Sovereign sends: the code and its request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ask {
    pub code: String,
    pub request: Request,
}

/// One failed operation of the service, naming what it was about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening the KV bucket {BUCKET}: {0}")]
    Bucket(String),
    #[error("the allotment record of {code}: {source}")]
    Read {
        code: String,
        source: super::bucket::ReadError,
    },
    #[error("changing the allotment record of {code}: {source}")]
    Change {
        code: String,
        source: super::bucket::ChangeError,
    },
    #[error("starting the allotment service: {0}")]
    Serve(service::ServeError),
    #[error("asking the hub for an allotment of {code} as {sovereign}: {source}")]
    Ask {
        code: String,
        sovereign: String,
        source: service::AskError,
    },
}

/// The hub's bucket: created when missing (`replicas`: 3 in the shipped
/// configuration).
pub async fn bucket(js: &jetstream::Context, replicas: usize) -> Result<kv::Store, Error> {
    super::bucket::open(js, BUCKET, replicas)
        .await
        .map_err(Error::Bucket)
}

/// Reads a code's record and its revision.
pub async fn read(kv: &kv::Store, code: &str) -> Result<Option<(Record, u64)>, Error> {
    super::bucket::read(kv, code)
        .await
        .map_err(|source| Error::Read {
            code: code.into(),
            source,
        })
}

/// The vendor's terms for a code: the record created, or its cap, state,
/// window and terms changed by a compare-and-set like every other change
/// (rule 7: a grant decided under the old terms then fails its own). An
/// unchanged definition writes nothing.
pub async fn define(kv: &kv::Store, code: &str, terms: &Record) -> Result<Record, Error> {
    super::bucket::change(kv, code, ATTEMPTS, |record: Option<&Record>| match record {
        None => (Some(terms.clone()), terms.clone()),
        Some(record) if record.redefined(terms) == *record => (None, record.clone()),
        Some(record) => {
            let changed = record.redefined(terms);
            (Some(changed.clone()), changed)
        }
    })
    .await
    .map_err(|source| Error::Change {
        code: code.into(),
        source,
    })
}

/// Decides one request and writes what it changes; the reply to send, once
/// the write is acknowledged (rule 2).
async fn handle(
    kv: &kv::Store,
    sovereign: &str,
    ask: &Ask,
    stripes: &[Mutex<()>],
) -> Result<Reply, Error> {
    let code = ask.code.as_str();
    let mut hasher = std::hash::DefaultHasher::new();
    code.hash(&mut hasher);
    let _turn = stripes[hasher.finish() as usize % stripes.len()]
        .lock()
        .await;
    super::bucket::change(kv, code, ATTEMPTS, |record: Option<&Record>| {
        let Some(record) = record else {
            return (None, Reply::Unknown);
        };
        let decision = decide(record, sovereign, &ask.request, chrono::Utc::now());
        (decision.write, decision.reply)
    })
    .await
    .map_err(|source| Error::Change {
        code: code.into(),
        source,
    })
}

/// Starts one replica of the allotment service, answering until `stop`:
/// returns once it is subscribed (a request sent after that is answered).
pub async fn start(
    client: async_nats::Client,
    kv: kv::Store,
    prefix: &str,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    // One request per code at a time in this replica: its compare-and-sets
    // then race only the other replicas' (a hot code's requests would
    // otherwise starve each other here).
    let stripes: Arc<Vec<Mutex<()>>> = Arc::new((0..CONCURRENCY).map(|_| Mutex::new(())).collect());
    service::serve(client, prefix, QUEUE_GROUP, CONCURRENCY, stop, move |sovereign, ask: Ask| {
        let (kv, stripes) = (kv.clone(), stripes.clone());
        async move {
            match handle(&kv, &sovereign, &ask, &stripes).await {
                Ok(reply) => Some(reply),
                Err(e) => {
                    tracing::warn!(sovereign, error = %e, "allotment request left unanswered; the Sovereign re-sends");
                    None
                }
            }
        }
    })
    .await
    .map_err(Error::Serve)
}

/// Starts one replica of the definition service: a code's record as the
/// hub holds it (`null`: no global voucher has the code).
pub async fn start_definitions(
    client: async_nats::Client,
    kv: kv::Store,
    prefix: &str,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let queue = DEFINITION_QUEUE_GROUP;
    service::serve(
        client,
        prefix,
        queue,
        CONCURRENCY,
        stop,
        move |sovereign, code: String| {
            let kv = kv.clone();
            async move {
                match read(&kv, &code).await {
                    Ok(record) => Some(record.map(|(record, _)| record)),
                    Err(e) => {
                        tracing::warn!(sovereign, error = %e, "definition request left unanswered");
                        None
                    }
                }
            }
        },
    )
    .await
    .map_err(Error::Serve)
}

/// The hub's definition of `code`, as `sovereign` reads it.
pub async fn definition(
    client: &async_nats::Client,
    prefix: &str,
    sovereign: &str,
    code: &str,
    timeout: Duration,
) -> Result<Option<Record>, Error> {
    service::ask(client, prefix, sovereign, &code, timeout)
        .await
        .map_err(|source| Error::Ask {
            code: code.into(),
            sovereign: sovereign.into(),
            source,
        })
}

/// A Sovereign's request to the hub, answered within `timeout` or an error
/// (then the request is re-sent as it is: applied at most once).
pub async fn ask(
    client: &async_nats::Client,
    prefix: &str,
    sovereign: &str,
    ask: &Ask,
    timeout: Duration,
) -> Result<Reply, Error> {
    service::ask(client, prefix, sovereign, ask, timeout)
        .await
        .map_err(|source| Error::Ask {
            code: ask.code.clone(),
            sovereign: sovereign.into(),
            source,
        })
}
