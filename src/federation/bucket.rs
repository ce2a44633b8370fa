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
