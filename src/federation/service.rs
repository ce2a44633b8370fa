//! The hub's services (the allotment, the customer claims) and a Sovereign's
//! request to one, written once: request/reply on `<prefix>.<sovereign>`, the
//! last token naming the Sovereign — fixed by its NATS account's import,
//! never the body's word — every replica in one queue group, an answer sent
//! only once the handler has one (a handler that cannot decide answers
//! nothing: the Sovereign times out and re-sends, which each protocol applies
//! at most once).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

/// Why a service did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("subscribing to {subject}: {source}")]
    Subscribe {
        subject: String,
        source: async_nats::SubscribeError,
    },
    #[error("subscribing to {subject}: the server did not confirm: {cause}")]
    Flush { subject: String, cause: String },
}

/// Why a request got no answer to read.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("{0}")]
    Send(async_nats::RequestError),
    #[error("the answer is unreadable: {0}")]
    Unreadable(serde_json::Error),
}

/// Starts one replica of a service on `<prefix>.*`, answering until `stop`
/// with what `handle` returns for (the Sovereign, the request); returns once
/// it is subscribed (a request sent after that is answered).
pub(crate) async fn serve<Q, R, F, Fut>(
    client: async_nats::Client,
    prefix: &str,
    queue: &'static str,
    concurrency: usize,
    stop: CancellationToken,
    handle: F,
) -> Result<tokio::task::JoinHandle<()>, ServeError>
where
    Q: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
    F: Fn(String, Q) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<R>> + Send,
{
    let subject = format!("{prefix}.*");
    let requests = client
        .queue_subscribe(subject.clone(), queue.into())
        .await
        .map_err(|source| ServeError::Subscribe {
            subject: subject.clone(),
            source,
        })?;
    client.flush().await.map_err(|e| ServeError::Flush {
        subject: subject.clone(),
        cause: e.to_string(),
    })?;
    let handle = Arc::new(handle);
    Ok(tokio::spawn(async move {
        requests
            .take_until(stop.cancelled_owned())
            .for_each_concurrent(concurrency, |message| {
                let (client, handle) = (client.clone(), handle.clone());
                async move {
                    let Some(reply_to) = message.reply.clone() else {
                        return;
                    };
                    let sovereign = message.subject.rsplit('.').next().unwrap_or_default();
                    let request = match serde_json::from_slice::<Q>(&message.payload) {
                        Ok(request) => request,
                        Err(e) => {
                            tracing::warn!(sovereign, service = queue, error = %e, "a request that is no request");
                            return;
                        }
                    };
                    let Some(reply) = handle(sovereign.to_owned(), request).await else {
                        return;
                    };
                    let body = serde_json::to_vec(&reply).expect("a reply serialises");
                    if let Err(e) = client.publish(reply_to, body.into()).await {
                        tracing::warn!(sovereign, service = queue, error = %e, "the reply was not sent");
                    }
                }
            })
            .await;
    }))
}

/// A Sovereign's request on `<prefix>.<sovereign>`, answered within
/// `timeout` or an error.
pub(crate) async fn ask<Q: Serialize, R: DeserializeOwned>(
    client: &async_nats::Client,
    prefix: &str,
    sovereign: &str,
    request: &Q,
    timeout: Duration,
) -> Result<R, AskError> {
    let body = Bytes::from(serde_json::to_vec(request).expect("a request serialises"));
    let request = async_nats::Request::new()
        .payload(body)
        .timeout(Some(timeout));
    let answer = client
        .send_request(format!("{prefix}.{sovereign}"), request)
        .await
        .map_err(AskError::Send)?;
    serde_json::from_slice(&answer.payload).map_err(AskError::Unreadable)
}
