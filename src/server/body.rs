//! A JSON body extractor whose every rejection is a JSON error: 413 for a
//! body over the limit, 400 (with serde's reason) for anything unreadable.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::HttpError;

pub(crate) struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = HttpError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    HttpError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "the request body is too large",
                    )
                } else {
                    HttpError::bad_request(format!("cannot read the request body: {rejection}"))
                }
            })?;
        if bytes.is_empty() {
            return Err(HttpError::bad_request(
                "the request body is empty: send a JSON object",
            ));
        }
        let deserializer = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(deserializer)
            .map(JsonBody)
            .map_err(|e| {
                // The field it failed at, when it is one (lines[3].amount): "." is the body.
                let at = match e.path().to_string() {
                    path if path == "." => String::new(),
                    path => format!(" (at {path})"),
                };
                HttpError::bad_request(format!(
                    "the request body is not valid JSON for this endpoint{at}: {}",
                    e.inner()
                ))
            })
    }
}
