//! Injected failures: an error status or a delay for the next requests that
//! match a method and a path fragment. Lets tests show how a client copes
//! with 409s, 500s and hanging requests from a real HTTP server.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::status::ApiError;

#[derive(Clone, Debug)]
enum Effect {
    Status(u16),
    Delay(Duration),
}

#[derive(Clone, Debug)]
struct Fault {
    method: String,
    path_contains: String,
    effect: Effect,
    remaining: usize,
}

/// A shared list of faults; clones share it.
#[derive(Clone, Debug, Default)]
pub struct Faults(Arc<Mutex<Vec<Fault>>>);

impl Faults {
    /// Answers the next `times` matching requests with `status`.
    pub fn inject(&self, method: &str, path_contains: &str, status: u16, times: usize) {
        self.push(method, path_contains, Effect::Status(status), times);
    }

    /// Holds the next `times` matching requests for `delay` before serving them.
    pub fn delay(&self, method: &str, path_contains: &str, delay: Duration, times: usize) {
        self.push(method, path_contains, Effect::Delay(delay), times);
    }

    /// Faults not yet triggered.
    pub fn pending(&self) -> usize {
        self.0.lock().unwrap().iter().map(|f| f.remaining).sum()
    }

    fn push(&self, method: &str, path_contains: &str, effect: Effect, remaining: usize) {
        self.0.lock().unwrap().push(Fault {
            method: method.into(),
            path_contains: path_contains.into(),
            effect,
            remaining,
        });
    }

    fn take(&self, method: &str, path: &str) -> Option<Effect> {
        let mut faults = self.0.lock().unwrap();
        let fault = faults
            .iter_mut()
            .find(|f| f.remaining > 0 && f.method == method && path.contains(&f.path_contains))?;
        fault.remaining -= 1;
        Some(fault.effect.clone())
    }
}

pub async fn inject(State(faults): State<Faults>, request: Request, next: Next) -> Response {
    let effect = faults.take(request.method().as_str(), request.uri().path());
    match effect {
        None => next.run(request).await,
        Some(Effect::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            next.run(request).await
        }
        Some(Effect::Status(code)) => {
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let reason = match code {
                StatusCode::CONFLICT => "Conflict",
                StatusCode::INTERNAL_SERVER_ERROR => "InternalError",
                _ => "Unknown",
            };
            ApiError::new(code, reason, format!("injected failure ({code})")).into_response()
        }
    }
}
