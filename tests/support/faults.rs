//! A fault-injecting HTTP proxy in front of the real API server (test code
//! only): requests pass through with the admin credentials, except those a
//! test asked to fail (an HTTP status) or to hang a number of times.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};

#[derive(Clone, Debug)]
enum Action {
    Fail(u16),
    Delay(Duration),
}

#[derive(Debug)]
struct Fault {
    method: String,
    path_contains: String,
    action: Action,
    remaining: usize,
}

/// The faults still to inject; shared between the test and its proxy.
#[derive(Clone, Default)]
pub struct Faults(Arc<Mutex<Vec<Fault>>>);

impl Faults {
    /// The next `times` requests of `method` whose path (with its query) contains
    /// `path_contains` answer `status`.
    pub fn inject(&self, method: &str, path_contains: &str, status: u16, times: usize) {
        self.push(method, path_contains, Action::Fail(status), times);
    }

    /// The next `times` such requests hang for `delay`, then time out as the
    /// API server's own request timeout answers: 504, nothing done.
    pub fn hang(&self, method: &str, path_contains: &str, delay: Duration, times: usize) {
        self.push(method, path_contains, Action::Delay(delay), times);
    }

    /// Forgets the injections that have not happened.
    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    /// How many injections have not happened yet.
    pub fn pending(&self) -> usize {
        self.0.lock().unwrap().iter().map(|f| f.remaining).sum()
    }

    fn push(&self, method: &str, path_contains: &str, action: Action, times: usize) {
        self.0.lock().unwrap().push(Fault {
            method: method.to_owned(),
            path_contains: path_contains.to_owned(),
            action,
            remaining: times,
        });
    }

    fn take(&self, method: &str, path: &str) -> Option<Action> {
        let mut faults = self.0.lock().unwrap();
        let fault = faults.iter_mut().find(|f| {
            f.remaining > 0 && f.method == method && path.contains(f.path_contains.as_str())
        })?;
        fault.remaining -= 1;
        Some(fault.action.clone())
    }
}

#[derive(Clone)]
struct Proxy {
    faults: Faults,
    upstream: kube::Client,
}

/// Serves the proxy on a free loopback port for as long as the calling
/// test's runtime lives; its `http://` URL.
pub async fn proxy(faults: Faults) -> String {
    let upstream = super::cluster::cluster().client().await;
    let app = axum::Router::new()
        .fallback(forward)
        .with_state(Proxy { faults, upstream });
    let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// An answer in the API server's shape for a failed request.
fn failure(code: u16) -> Response {
    let status = axum::http::StatusCode::from_u16(code).unwrap();
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("injected by the test proxy: {code}"),
        "reason": status.canonical_reason().unwrap_or("Unknown"), "code": code,
    });
    (status, axum::Json(body)).into_response()
}

async fn forward(State(proxy): State<Proxy>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    // Matched against the path and its query (a list's `limit=1` tells it from a watch's).
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    match proxy.faults.take(parts.method.as_str(), &target) {
        Some(Action::Fail(code)) => return failure(code),
        Some(Action::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            return failure(504);
        }
        None => {}
    }
    let Ok(bytes) = axum::body::to_bytes(body, 64 << 20).await else {
        return axum::http::StatusCode::BAD_REQUEST.into_response();
    };
    // The upstream client adds the API server's address and credentials.
    parts.uri = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
        .parse()
        .unwrap();
    parts.headers.remove(axum::http::header::HOST);
    let request = http::Request::from_parts(parts, kube::client::Body::from(bytes.to_vec()));
    match proxy.upstream.send(request).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            Response::from_parts(parts, axum::body::Body::new(body))
        }
        Err(error) => (axum::http::StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
    }
}
