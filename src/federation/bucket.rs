//! The hub's KV buckets (the allotment records, the customer claims), opened
//! and read one way: one revision kept per key (the value is all there is),
//! created when missing (another replica may make it first), a value read as
//! JSON with the revision its compare-and-set names.

use async_nats::jetstream::{self, kv};
use serde::de::DeserializeOwned;

/// Why a key could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading it: {0}")]
    Entry(#[from] kv::EntryError),
    #[error("it is unreadable: {0}")]
    Json(#[from] serde_json::Error),
}

/// The bucket `name`: created when missing, with `replicas` (3 on a
/// JetStream cluster). The error says why, as the server did.
pub(crate) async fn open(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<kv::Store, String> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    let config = kv::Config {
        bucket: name.into(),
        history: 1,
        num_replicas: replicas,
        ..Default::default()
    };
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Another replica made it first.
        Err(created) => js
            .get_key_value(name)
            .await
            .map_err(|_| created.to_string()),
    }
}

/// The value of `key` and its revision; `None` when absent or deleted.
pub(crate) async fn read<T: DeserializeOwned>(
    kv: &kv::Store,
    key: &str,
) -> Result<Option<(T, u64)>, ReadError> {
    let Some(entry) = kv
        .entry(key)
        .await?
        .filter(|e| e.operation == kv::Operation::Put)
    else {
        return Ok(None);
    };
    Ok(Some((
        serde_json::from_slice(&entry.value)?,
        entry.revision,
    )))
}

/// Why a change of a key did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("creating it: {0}")]
    Create(kv::CreateError),
    #[error("writing it: {0}")]
    Update(kv::UpdateError),
    #[error("it kept moving: {0} compare-and-sets lost")]
    Contended(usize),
}

/// Changes the value of `key` by a compare-and-set on the revision read:
/// `decide` sees the value (`None`: absent) and says what to write (`None`:
/// nothing) and what to answer, which is returned only once the write is
/// acknowledged. A compare-and-set lost to another writer is decided again on
/// the new value, at most `attempts` times.
pub(crate) async fn change<T, R>(
    kv: &kv::Store,
    key: &str,
    attempts: usize,
    mut decide: impl FnMut(Option<&T>) -> (Option<T>, R),
) -> Result<R, ChangeError>
where
    T: serde::Serialize + DeserializeOwned,
{
    for _ in 0..attempts {
        let read = read::<T>(kv, key).await?;
        let (write, answer) = decide(read.as_ref().map(|(value, _)| value));
        let Some(write) = write else {
            return Ok(answer);
        };
        let body = bytes::Bytes::from(serde_json::to_vec(&write).expect("a value serialises"));
        match read {
            None => match kv.create(key, body).await {
                Ok(_) => return Ok(answer),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ChangeError::Create(e)),
            },
            Some((_, revision)) => match kv.update(key, body, revision).await {
                Ok(_) => return Ok(answer),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(ChangeError::Update(e)),
            },
        }
    }
    Err(ChangeError::Contended(attempts))
}
