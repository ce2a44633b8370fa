//! get, list (selectors, pages, Table) and watch (resume, bookmarks, 410 Gone).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::StreamExt;
use serde_json::{Value, json};

use tokio::sync::watch;

use super::resources::{Column, EVENTS_STORAGE, ResourceType};
use super::selectors::{FieldSelector, LabelSelector};
use super::status::{ApiError, ApiResult};
use super::storage::Change;
use super::{ApiServer, Request, table};

fn is_core_events(resource: &ResourceType) -> bool {
    resource.storage == EVENTS_STORAGE && resource.group.is_empty()
}

/// The object as this view of its storage shows it.
pub(super) fn view(resource: &ResourceType, object: Value) -> Value {
    if is_core_events(resource) {
        core_event(object)
    } else {
        object
    }
}

/// An events.k8s.io/v1 Event in its core/v1 shape, which `kubectl describe` reads.
fn core_event(e: Value) -> Value {
    let first = [&e["deprecatedFirstTimestamp"], &e["eventTime"]]
        .into_iter()
        .find(|v| v.is_string())
        .cloned()
        .unwrap_or(Value::Null);
    let last = [
        &e["deprecatedLastTimestamp"],
        &e["series"]["lastObservedTime"],
        &e["eventTime"],
    ]
    .into_iter()
    .find(|v| v.is_string())
    .cloned()
    .unwrap_or(Value::Null);
    let count = e["series"]["count"]
        .as_i64()
        .or_else(|| e["deprecatedCount"].as_i64())
        .unwrap_or(1);
    let component = e["deprecatedSource"]["component"]
        .as_str()
        .or_else(|| e["reportingController"].as_str())
        .unwrap_or_default();
    json!({
        "kind": "Event",
        "apiVersion": "v1",
        "metadata": e["metadata"],
        "involvedObject": e["regarding"],
        "related": e["related"],
        "reason": e["reason"],
        "message": e["note"],
        "type": e["type"],
        "action": e["action"],
        "source": {"component": component},
        "firstTimestamp": first,
        "lastTimestamp": last,
        "eventTime": e["eventTime"],
        "count": count,
        "reportingComponent": e["reportingController"],
        "reportingInstance": e["reportingInstance"],
    })
}

struct Filter {
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn from(request: &Request) -> ApiResult<Self> {
        Ok(Self {
            labels: LabelSelector::parse(request.param("labelSelector").unwrap_or_default())?,
            fields: FieldSelector::parse(request.param("fieldSelector").unwrap_or_default())?,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }
}

fn continue_token(object: &Value) -> String {
    let key = format!(
        "{}\u{0}{}",
        object["metadata"]["namespace"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().unwrap_or_default()
    );
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(token: &str) -> ApiResult<(String, String)> {
    let bad = || ApiError::bad_request("the continue token is not valid; start the list again");
    let bytes: Vec<u8> = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    let key = String::from_utf8(bytes).map_err(|_| bad())?;
    let (ns, name) = key.split_once('\u{0}').ok_or_else(bad)?;
    Ok((ns.to_owned(), name.to_owned()))
}

fn key_of(object: &Value) -> (&str, &str) {
    (
        object["metadata"]["namespace"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().unwrap_or_default(),
    )
}

impl ApiServer {
    pub(super) fn get(
        &self,
        resource: &ResourceType,
        namespace: &str,
        name: &str,
        request: &Request,
    ) -> ApiResult<Response> {
        let object = self
            .storage
            .get(&resource.storage, namespace, name)
            .ok_or_else(|| ApiError::not_found(&resource.qualified(), name))?;
        let object = view(resource, object);
        if request.wants_table() {
            let metadata = json!({"resourceVersion": object["metadata"]["resourceVersion"]});
            let include = request.param("includeObject").unwrap_or("Metadata");
            return Ok(axum::Json(table::table(
                &resource.columns,
                &[object],
                metadata,
                include,
                Utc::now(),
            ))
            .into_response());
        }
        Ok(axum::Json(object).into_response())
    }

    pub(super) fn list(
        &self,
        resource: &ResourceType,
        namespace: Option<&str>,
        request: &Request,
    ) -> ApiResult<Response> {
        let filter = Filter::from(request)?;
        let (objects, rv) = self.storage.list(&resource.storage, namespace);
        let after = request.param("continue").map(decode_token).transpose()?;
        let mut items: Vec<Value> = objects
            .into_iter()
            .filter(|o| {
                after
                    .as_ref()
                    .is_none_or(|(ns, name)| key_of(o) > (ns.as_str(), name.as_str()))
            })
            .map(|o| view(resource, o))
            .filter(|o| filter.matches(o))
            .collect();
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        let limit = request
            .param("limit")
            .map(|l| {
                l.parse::<usize>().map_err(|_| {
                    ApiError::bad_request(format!("limit must be a number, not {l:?}"))
                })
            })
            .transpose()?
            .filter(|l| *l > 0);
        if let Some(limit) = limit
            && items.len() > limit
        {
            let remaining = items.len() - limit;
            items.truncate(limit);
            metadata["continue"] = json!(continue_token(items.last().unwrap()));
            metadata["remainingItemCount"] = json!(remaining);
        }
        if request.wants_table() {
            let include = request.param("includeObject").unwrap_or("Metadata");
            return Ok(axum::Json(table::table(
                &resource.columns,
                &items,
                metadata,
                include,
                Utc::now(),
            ))
            .into_response());
        }
        Ok(axum::Json(json!({
            "kind": format!("{}List", resource.kind),
            "apiVersion": resource.api_version(),
            "metadata": metadata,
            "items": items,
        }))
        .into_response())
    }

    pub(super) fn watch(
        self: &Arc<Self>,
        resource: &ResourceType,
        namespace: Option<String>,
        request: &Request,
    ) -> ApiResult<Response> {
        let filter = Filter::from(request)?;
        let bookmarks = request.flag("allowWatchBookmarks");
        let as_table = request.wants_table();
        let timeout = request
            .param("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1800));
        // Subscribed before reading, so that no write falls between the two.
        let receiver = self.storage.subscribe();
        let watch = Arc::new(WatchSpec {
            server: self.clone(),
            storage: resource.storage.clone(),
            namespace,
            filter,
            core_events: is_core_events(resource),
            kind: resource.kind.clone(),
            api_version: resource.api_version(),
            table_columns: as_table.then(|| resource.columns.clone()),
            bookmarks,
            bookmark_every: self.config.bookmark_interval,
            deadline: tokio::time::Instant::now() + timeout,
        });
        let mut state = WatchState {
            queue: VecDeque::new(),
            last_rv: 0,
            done: false,
        };
        match request.param("resourceVersion").filter(|rv| *rv != "0") {
            // Resume: the changes after `rv`, or 410 Gone when they are compacted.
            Some(rv) => {
                let rv: u64 = rv.parse().map_err(|_| {
                    ApiError::bad_request(format!("resourceVersion {rv:?} is not valid"))
                })?;
                state.last_rv = rv;
                match self.storage.changes_since(rv) {
                    Ok(changes) => {
                        for change in changes {
                            state.last_rv = change.rv;
                            state.queue.extend(watch.event_of(change));
                        }
                    }
                    Err(_) => {
                        state
                            .queue
                            .push_back(gone_event(rv, self.storage.current_rv()));
                        state.done = true;
                    }
                }
            }
            // Start now: the current state as ADDED events first.
            None => {
                let (objects, rv) = self
                    .storage
                    .list(&resource.storage, watch.namespace.as_deref());
                state.last_rv = rv;
                for object in objects.into_iter().map(|o| view(resource, o)) {
                    if watch.filter.matches(&object) {
                        state
                            .queue
                            .push_back(json!({"type": "ADDED", "object": object}));
                    }
                }
                if request.flag("sendInitialEvents") {
                    state.queue.push_back(json!({"type": "BOOKMARK", "object": {
                        "kind": resource.kind, "apiVersion": resource.api_version(),
                        "metadata": {"resourceVersion": rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}
                    }}));
                }
            }
        }
        let stream = futures::stream::unfold((state, receiver), move |(state, receiver)| {
            watch.clone().next_line(state, receiver)
        });
        let body = Body::from_stream(stream.map(Ok::<_, Infallible>));
        Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response())
    }
}

struct WatchState {
    queue: VecDeque<Value>,
    last_rv: u64,
    done: bool,
}

/// Everything one watch needs, shared by the steps of its stream.
struct WatchSpec {
    server: Arc<ApiServer>,
    storage: String,
    namespace: Option<String>,
    filter: Filter,
    core_events: bool,
    kind: String,
    api_version: String,
    table_columns: Option<Vec<Column>>,
    bookmarks: bool,
    bookmark_every: Duration,
    deadline: tokio::time::Instant,
}

impl WatchSpec {
    /// The next line of the watch stream, or `None` when it ends.
    async fn next_line(
        self: Arc<Self>,
        mut state: WatchState,
        mut receiver: watch::Receiver<u64>,
    ) -> Option<(Vec<u8>, (WatchState, watch::Receiver<u64>))> {
        loop {
            if let Some(event) = state.queue.pop_front() {
                let mut line = serde_json::to_vec(&self.render(event)).unwrap_or_default();
                line.push(b'\n');
                return Some((line, (state, receiver)));
            }
            if state.done {
                return None;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(self.deadline) => return None,
                changed = receiver.changed() => {
                    changed.ok()?;
                    match self.server.storage.changes_since(state.last_rv) {
                        Ok(changes) => {
                            for change in changes {
                                state.last_rv = change.rv;
                                if let Some(event) = self.event_of(change) {
                                    state.queue.push_back(event);
                                }
                            }
                        }
                        Err(_) => {
                            let current = self.server.storage.current_rv();
                            state.queue.push_back(gone_event(state.last_rv, current));
                            state.done = true;
                        }
                    }
                }
                _ = tokio::time::sleep(self.bookmark_every), if self.bookmarks => {
                    state.queue.push_back(json!({"type": "BOOKMARK", "object": {
                        "kind": self.kind, "apiVersion": self.api_version,
                        "metadata": {"resourceVersion": state.last_rv.to_string()}
                    }}));
                }
            }
        }
    }

    fn event_of(&self, change: Change) -> Option<Value> {
        if change.storage != self.storage
            || self
                .namespace
                .as_ref()
                .is_some_and(|ns| *ns != change.namespace)
        {
            return None;
        }
        let object = if self.core_events {
            core_event(change.object)
        } else {
            change.object
        };
        self.filter
            .matches(&object)
            .then(|| json!({"type": change.kind.as_str(), "object": object}))
    }

    /// A Table watch wraps each object in a one-row table.
    fn render(&self, mut event: Value) -> Value {
        let Some(columns) = &self.table_columns else {
            return event;
        };
        if event["type"] == "ERROR" || event["type"] == "BOOKMARK" {
            return event;
        }
        let object = event["object"].take();
        let metadata = json!({"resourceVersion": object["metadata"]["resourceVersion"]});
        event["object"] = table::table(columns, &[object], metadata, "Metadata", Utc::now());
        event
    }
}

fn gone_event(requested: u64, current: u64) -> Value {
    json!({"type": "ERROR", "object": ApiError::gone(format!(
        "too old resource version: {requested} ({current})"
    )).to_status()})
}
