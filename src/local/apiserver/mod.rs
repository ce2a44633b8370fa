//! A local Kubernetes API endpoint for the Voucher kind and the few built-in
//! kinds the operator and kubectl need (Namespaces, Events, Leases, CRDs).
//!
//! For development and tests only: no Kubernetes API server can be installed
//! on the project's machines, yet the product is used through `kubectl` and
//! kube-rs. It follows the API conventions for what it implements (discovery,
//! list/watch with bookmarks and 410 Gone, get, create, update, JSON merge and
//! JSON patch, server-side apply with field managers, finalizers and
//! deletionTimestamp, the status subresource, generation, resourceVersion
//! conflicts, Table output, schema and CEL validation) and answers everything
//! else with a clear error. Never used by the controller or server code paths.

mod apply;
mod discovery;
mod faults;
mod openapi;
mod reads;
mod resources;
mod selectors;
mod status;
mod storage;
mod table;
mod writes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::{Value, json};

pub use faults::Faults;
pub use resources::{Registry, ResourceType};
pub use status::{ApiError, ApiResult};
pub use storage::Storage;

/// Settings of the local endpoint.
#[derive(Clone, Debug)]
pub struct LocalApiConfig {
    /// Keep the state in this file so that a restart keeps it; in memory when `None`.
    pub state_file: Option<PathBuf>,
    /// How many changes a watch can resume from before it gets 410 Gone.
    pub watch_log_capacity: usize,
    /// How often watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
    /// Failures to inject, for tests of how clients handle them.
    pub faults: Faults,
}

impl Default for LocalApiConfig {
    fn default() -> Self {
        Self {
            state_file: None,
            watch_log_capacity: 50_000,
            bookmark_interval: Duration::from_secs(10),
            faults: Faults::default(),
        }
    }
}

/// The namespaces every cluster starts with.
const INITIAL_NAMESPACES: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];

pub struct ApiServer {
    registry: Registry,
    storage: Storage,
    config: LocalApiConfig,
}

impl ApiServer {
    pub fn new(config: LocalApiConfig) -> anyhow::Result<Arc<Self>> {
        let registry = Registry::new(&[crate::api::crd()]).map_err(anyhow::Error::msg)?;
        let storage = Storage::open(config.state_file.clone(), config.watch_log_capacity)?;
        let server = Arc::new(Self {
            registry,
            storage,
            config,
        });
        for name in INITIAL_NAMESPACES {
            if server.storage.get("namespaces", "", name).is_none() {
                let namespace =
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
                server
                    .create(
                        server.resource("", "v1", "namespaces"),
                        None,
                        namespace,
                        &Default::default(),
                    )
                    .map_err(|e| anyhow::anyhow!(e.message))?;
            }
        }
        Ok(server)
    }

    fn resource(&self, group: &str, version: &str, plural: &str) -> &ResourceType {
        self.registry
            .find(group, version, plural)
            .expect("a built-in resource type")
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/version", get(|| async { axum::Json(discovery::version()) }))
            .route("/api", get(core_versions))
            .route("/apis", get(groups))
            .route("/api/{*rest}", any(core_request))
            .route("/apis/{*rest}", any(group_request))
            .route("/openapi/v3", get(openapi_index))
            .route("/openapi/v3/{*path}", get(openapi_group_version))
            .route("/openapi/v2", get(|| async {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "the local API endpoint serves OpenAPI v3 only (/openapi/v3)",
                )
            }))
            .route("/healthz", get(|| async { "ok" }))
            .route("/livez", get(|| async { "ok" }))
            .route("/readyz", get(|| async { "ok" }))
            .fallback(|| async {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "the server could not find the requested resource (the local API endpoint serves /api, /apis and /version)",
                )
            })
            .layer(axum::middleware::from_fn_with_state(
                self.config.faults.clone(),
                faults::inject,
            ))
            .with_state(self.clone())
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(
            listener,
            self.router()
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await
    }
}

/// What a request path names.
enum Target<'a> {
    Collection {
        resource: &'a ResourceType,
        namespace: Option<String>,
    },
    Object {
        resource: &'a ResourceType,
        namespace: String,
        name: String,
        subresource: Option<String>,
    },
}

fn not_found_path() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
    )
}

impl ApiServer {
    fn target<'a>(&'a self, group: &str, version: &str, rest: &[&str]) -> ApiResult<Target<'a>> {
        let find = |plural: &str| self.registry.find(group, version, plural);
        let named = |resource, namespace: &str, name: &str, sub: Option<&str>| {
            Ok(Target::Object {
                resource,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                subresource: sub.map(str::to_owned),
            })
        };
        match rest {
            ["namespaces", ns, plural, tail @ ..] if find(plural).is_some_and(|r| r.namespaced) => {
                let resource = find(plural).unwrap();
                match tail {
                    [] => Ok(Target::Collection {
                        resource,
                        namespace: Some((*ns).to_owned()),
                    }),
                    [name] => named(resource, ns, name, None),
                    [name, sub] => named(resource, ns, name, Some(sub)),
                    _ => Err(not_found_path()),
                }
            }
            [plural, tail @ ..] => {
                let resource = find(plural).ok_or_else(not_found_path)?;
                match tail {
                    [] => Ok(Target::Collection {
                        resource,
                        namespace: None,
                    }),
                    [name] if !resource.namespaced => named(resource, "", name, None),
                    [name, sub] if !resource.namespaced => named(resource, "", name, Some(sub)),
                    _ => Err(not_found_path()),
                }
            }
            [] => Err(not_found_path()),
        }
    }

    async fn dispatch(
        self: Arc<Self>,
        method: Method,
        group: &str,
        version: &str,
        rest: &[&str],
        request: Request,
    ) -> Response {
        let result = match self.target(group, version, rest) {
            Ok(target) => self.handle(method, target, request).await,
            Err(error) => Err(error),
        };
        result.unwrap_or_else(IntoResponse::into_response)
    }

    async fn handle(
        self: &Arc<Self>,
        method: Method,
        target: Target<'_>,
        request: Request,
    ) -> ApiResult<Response> {
        let (Target::Collection { resource, .. } | Target::Object { resource, .. }) = &target;
        if method != Method::GET && resource.read_only {
            return Err(writes::read_only(resource));
        }
        match target {
            Target::Collection {
                resource,
                namespace,
            } => match method {
                Method::GET if request.flag("watch") => {
                    Ok(self.watch(resource, namespace, &request)?)
                }
                Method::GET => self.list(resource, namespace.as_deref(), &request),
                Method::POST => {
                    if resource.namespaced && namespace.is_none() {
                        return Err(ApiError::method_not_allowed(
                            "create namespaced objects under /namespaces/{namespace}/",
                        ));
                    }
                    let object = request.json_body()?;
                    let created = self.create(resource, namespace.as_deref(), object, &request)?;
                    Ok(
                        (StatusCode::CREATED, request.warnings(), axum::Json(created))
                            .into_response(),
                    )
                }
                other => Err(ApiError::method_not_allowed(format!(
                    "{other} on a collection is not supported by the local API endpoint"
                ))),
            },
            Target::Object {
                resource,
                namespace,
                name,
                subresource,
            } => {
                match subresource.as_deref() {
                    None => {}
                    Some("status") if resource.status_subresource => {}
                    Some(other) => {
                        return Err(ApiError::new(
                            StatusCode::NOT_FOUND,
                            "NotFound",
                            format!(
                                "the local API endpoint serves no {other:?} subresource of {}",
                                resource.plural
                            ),
                        ));
                    }
                }
                let sub = subresource.as_deref();
                match method {
                    Method::GET => self.get(resource, &namespace, &name, &request),
                    Method::PUT => {
                        let object = request.json_body()?;
                        let updated =
                            self.update(resource, &namespace, &name, sub, object, &request)?;
                        Ok((request.warnings(), axum::Json(updated)).into_response())
                    }
                    Method::PATCH => {
                        let (code, patched) =
                            self.patch(resource, &namespace, &name, sub, &request)?;
                        Ok((code, request.warnings(), axum::Json(patched)).into_response())
                    }
                    Method::DELETE if sub.is_none() => {
                        let deleted = self.delete(resource, &namespace, &name, &request)?;
                        Ok(axum::Json(deleted).into_response())
                    }
                    other => Err(ApiError::method_not_allowed(format!(
                        "{other} is not supported here by the local API endpoint"
                    ))),
                }
            }
        }
    }
}

/// The parts of an HTTP request the handlers read.
pub struct Request {
    query: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
    warnings: std::sync::Mutex<Vec<String>>,
}

impl Default for Request {
    fn default() -> Self {
        Self {
            query: HashMap::new(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            warnings: Default::default(),
        }
    }
}

impl Request {
    fn new(query: HashMap<String, String>, headers: HeaderMap, body: Bytes) -> Self {
        Self {
            query,
            headers,
            body,
            warnings: Default::default(),
        }
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.param(name), Some("true" | "1"))
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    fn wants_table(&self) -> bool {
        self.header("accept").contains("as=Table")
    }

    fn dry_run(&self) -> bool {
        self.param("dryRun") == Some("All")
    }

    /// The field manager: `?fieldManager=`, else the client's user agent.
    fn field_manager(&self) -> String {
        self.param("fieldManager")
            .map(str::to_owned)
            .unwrap_or_else(|| {
                let agent = self.header("user-agent");
                let name = agent.split('/').next().unwrap_or_default();
                if name.is_empty() {
                    "unknown".to_owned()
                } else {
                    name.to_owned()
                }
            })
    }

    fn json_body(&self) -> ApiResult<Value> {
        serde_json::from_slice(&self.body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
    }

    fn warn(&self, message: String) {
        self.warnings.lock().unwrap().push(message);
    }

    fn warnings(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for message in self.warnings.lock().unwrap().iter() {
            let value = format!("299 - {:?}", message);
            if let Ok(value) = value.parse() {
                headers.append("warning", value);
            }
        }
        headers
    }
}

async fn core_versions(headers: HeaderMap) -> impl IntoResponse {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_owned();
    axum::Json(discovery::core_versions(&host))
}

async fn openapi_index(State(server): State<Arc<ApiServer>>) -> impl IntoResponse {
    axum::Json(openapi::index(&server.registry))
}

async fn openapi_group_version(
    State(server): State<Arc<ApiServer>>,
    Path(path): Path<String>,
) -> Response {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let doc = match segments.as_slice() {
        ["api", version] => openapi::group_version(&server.registry, "", version),
        ["apis", group, version] => openapi::group_version(&server.registry, group, version),
        _ => None,
    };
    doc.map(|d| axum::Json(d).into_response())
        .unwrap_or_else(|| not_found_path().into_response())
}

async fn groups(State(server): State<Arc<ApiServer>>) -> impl IntoResponse {
    axum::Json(discovery::groups(&server.registry))
}

/// `/api/...`: the core group, which has no name in its paths.
async fn core_request(
    state: State<Arc<ApiServer>>,
    method: Method,
    Path(rest): Path<String>,
    query: Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    api_request(state, method, format!("/{rest}"), query, headers, body).await
}

/// `/apis/...`: named groups.
async fn group_request(
    state: State<Arc<ApiServer>>,
    method: Method,
    Path(rest): Path<String>,
    query: Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    api_request(state, method, rest, query, headers, body).await
}

/// `group/version/...` (the core group as an empty first segment): discovery documents, or a
/// request for a resource.
async fn api_request(
    State(server): State<Arc<ApiServer>>,
    method: Method,
    path: String,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let core = path.starts_with('/');
    let mut segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if core {
        segments.insert(0, "");
    }
    let found = |doc: Option<serde_json::Value>| {
        doc.map_or_else(
            || not_found_path().into_response(),
            |doc| axum::Json(doc).into_response(),
        )
    };
    match segments.as_slice() {
        [group] if !core => found(discovery::group(&server.registry, group)),
        [group, version] => found(discovery::resources(&server.registry, group, version)),
        [group, version, rest @ ..] => {
            let request = Request::new(query, headers, body);
            server.dispatch(method, group, version, rest, request).await
        }
        _ => not_found_path().into_response(),
    }
}
