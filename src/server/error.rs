//! Every error answer is JSON `{"error": "..."}` with a message a client can show.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::AuthError;
use crate::store::StoreError;

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    /// What went wrong, in words a checkout page can show.
    pub error: String,
}

#[derive(Debug)]
pub(crate) struct HttpError {
    pub status: StatusCode,
    pub message: String,
    pub(crate) retry_after: Option<u64>,
    /// What really failed, for the log (never for the client); logged when
    /// the answer is rendered.
    pub cause: Option<String>,
}

impl HttpError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
            cause: None,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<AuthError> for HttpError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Unavailable => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: error.to_string(),
                retry_after: Some(30),
                cause: None,
            },
            other => Self::new(StatusCode::UNAUTHORIZED, other.to_string()),
        }
    }
}

impl From<StoreError> for HttpError {
    fn from(error: StoreError) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the billing database is unavailable; please try again shortly".into(),
            retry_after: Some(2),
            // The operation and the cause, never the code (the caller's input).
            cause: Some(crate::telemetry::describe(&error.without_code())),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        if let Some(cause) = &self.cause {
            tracing::error!(status = self.status.as_u16(), error = %cause, "request failed");
        }
        let mut response = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Operation;

    #[test]
    fn a_failed_redemption_logs_its_operation_never_the_code() {
        let failed = StoreError::Failed {
            operation: Operation::Redeem,
            code: Some("BILL-7Q2M9XK4TR1D".into()),
            source: Box::new(StoreError::Contended { attempts: 3 }),
        };
        let answer = HttpError::from(failed);
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        let cause = answer.cause.unwrap();
        assert!(!cause.contains("BILL-7Q2M9XK4TR1D"), "{cause}");
        assert!(
            cause.contains("changed during each of 3 attempts"),
            "{cause}"
        );
    }
}
