//! create, update, patch (JSON merge, JSON patch, server-side apply) and
//! delete with finalizers, with the API server's bookkeeping: uid,
//! creationTimestamp, generation, resourceVersion preconditions, managed
//! fields, the status subresource, defaults and validation.

mod server_side_apply;

use axum::http::StatusCode;
use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};

use super::apply::Applier;
use super::resources::ResourceType;
use super::status::{ApiError, ApiResult};
use super::storage::Write;
use super::{ApiServer, Request};

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn meta<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object["metadata"][field].as_str()
}

/// Everything but metadata (and status, when it is a subresource): what a
/// change to bumps `generation`.
fn desired_state(resource: &ResourceType, object: &Value) -> Value {
    let mut rest = object.as_object().cloned().unwrap_or_default();
    rest.remove("metadata");
    if resource.status_subresource {
        rest.remove("status");
    }
    Value::Object(rest)
}

fn finalizers(object: &Value) -> Vec<String> {
    object["metadata"]["finalizers"]
        .as_array()
        .map(|f| {
            f.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

const PATCH_TYPES: &str =
    "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml";

impl ApiServer {
    /// Checks kind and version of a request body against the resource.
    fn check_kind(&self, resource: &ResourceType, object: &Value) -> ApiResult<()> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        if (!api_version.is_empty() && api_version != resource.api_version())
            || (!kind.is_empty() && kind != resource.kind)
        {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({api_version}) or its kind ({kind}) does not match \
                 the expected API version ({}) and kind ({})",
                resource.api_version(),
                resource.kind
            )));
        }
        Ok(())
    }

    /// Defaults, unknown fields (per `fieldValidation`) and validation.
    fn admit(
        &self,
        resource: &ResourceType,
        object: Value,
        old: Option<&Value>,
        request: &Request,
    ) -> ApiResult<Value> {
        let name = meta(&object, "name").unwrap_or_default().to_owned();
        if name.is_empty() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                format!(
                    "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                    resource.qualified_kind()
                ),
            ));
        }
        let Some(validator) = &resource.validator else {
            return Ok(object);
        };
        let mut object = validator.apply_defaults(&object);
        let unknown = validator.unknown_fields(&object);
        if !unknown.is_empty() {
            match request.param("fieldValidation").unwrap_or("Warn") {
                "Strict" => {
                    let list: Vec<String> = unknown
                        .iter()
                        .map(|p| format!("unknown field {p:?}"))
                        .collect();
                    return Err(ApiError::bad_request(format!(
                        "{} in version {:?} cannot be handled as a {}: strict decoding error: {}",
                        resource.kind,
                        resource.version,
                        resource.kind,
                        list.join(", ")
                    )));
                }
                "Ignore" => {
                    validator.prune_unknown_fields(&mut object);
                }
                _ => {
                    for path in validator.prune_unknown_fields(&mut object) {
                        request.warn(format!("unknown field {path:?}"));
                    }
                }
            }
        }
        validator
            .validate(&object, old)
            .map_err(|invalid| ApiError::invalid(&invalid, &resource.group, &resource.plural))?;
        Ok(object)
    }

    fn ensure_namespace(&self, resource: &ResourceType, namespace: &str) -> ApiResult<()> {
        if resource.namespaced && self.storage.get("namespaces", "", namespace).is_none() {
            return Err(ApiError::not_found("namespaces", namespace));
        }
        Ok(())
    }

    /// A new object with the server's metadata filled in.
    fn new_object(
        &self,
        resource: &ResourceType,
        namespace: Option<&str>,
        mut object: Value,
    ) -> ApiResult<Value> {
        self.check_kind(resource, &object)?;
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let body_namespace = meta(&object, "namespace").unwrap_or_default().to_owned();
        let namespace = if resource.namespaced {
            let namespace = namespace.unwrap_or_default();
            if !body_namespace.is_empty() && body_namespace != namespace {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            self.ensure_namespace(resource, namespace)?;
            namespace.to_owned()
        } else {
            String::new()
        };
        if meta(&object, "name").unwrap_or_default().is_empty()
            && let Some(prefix) = meta(&object, "generateName")
        {
            let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..5].to_owned();
            object["metadata"]["name"] = json!(format!("{prefix}{suffix}"));
        }
        let metadata = object["metadata"].as_object_mut().unwrap();
        for server_field in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        ] {
            metadata.remove(server_field);
        }
        if resource.namespaced {
            metadata.insert("namespace".into(), json!(namespace));
        } else {
            metadata.remove("namespace");
        }
        metadata.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        metadata.insert("creationTimestamp".into(), json!(now()));
        metadata.insert("generation".into(), json!(1));
        object["apiVersion"] = json!(resource.api_version());
        object["kind"] = json!(resource.kind);
        if resource.status_subresource
            && let Some(o) = object.as_object_mut()
        {
            o.remove("status");
        }
        Ok(object)
    }

    pub(super) fn create(
        &self,
        resource: &ResourceType,
        namespace: Option<&str>,
        object: Value,
        request: &Request,
    ) -> ApiResult<Value> {
        let mut object = self.new_object(resource, namespace, object)?;
        object = self.admit(resource, object, None, request)?;
        let (manager, time, api_version) = (request.field_manager(), now(), resource.api_version());
        let shell = json!({"metadata": {}});
        Applier {
            manager: &manager,
            subresource: None,
            api_version: &api_version,
            now: &time,
            force: false,
        }
        .record_update(&shell, &mut object);
        let (ns, name) = (
            meta(&object, "namespace").unwrap_or_default().to_owned(),
            meta(&object, "name").unwrap_or_default().to_owned(),
        );
        let dry_run = request.dry_run();
        let mut result = None;
        self.storage
            .write(&resource.storage, &ns, &name, |current| {
                if current.is_some() {
                    return Err(ApiError::already_exists(&resource.qualified(), &name));
                }
                result = Some(object.clone());
                Ok(if dry_run {
                    Write::Nothing
                } else {
                    Write::Put(object)
                })
            })
            .map(|stored| stored.or(result).unwrap_or_default())
    }

    /// The stored object that results from writing `new` over `old`:
    /// status separated from spec, immutable metadata kept, generation,
    /// finalizer rules, defaults and validation.
    fn next_version(
        &self,
        resource: &ResourceType,
        old: &Value,
        mut new: Value,
        sub: Option<&str>,
        request: &Request,
    ) -> ApiResult<Value> {
        self.check_kind(resource, &new)?;
        if let Some(rv) = meta(&new, "resourceVersion")
            && Some(rv) != meta(old, "resourceVersion")
        {
            return Err(ApiError::conflict(
                &resource.qualified(),
                meta(old, "name").unwrap_or_default(),
            ));
        }
        if let Some(name) = meta(&new, "name")
            && Some(name) != meta(old, "name")
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({name}) does not match the name on the URL ({})",
                meta(old, "name").unwrap_or_default()
            )));
        }
        if sub == Some("status") {
            // Only status changes through the status subresource.
            let status = new.get("status").cloned();
            new = old.clone();
            match status {
                Some(status) => new["status"] = status,
                None => {
                    new.as_object_mut().unwrap().remove("status");
                }
            }
        } else if resource.status_subresource {
            match old.get("status") {
                Some(status) => new["status"] = status.clone(),
                None => {
                    if let Some(o) = new.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
        }
        if !new["metadata"].is_object() {
            new["metadata"] = json!({});
        }
        for kept in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
        ] {
            match old["metadata"].get(kept) {
                Some(value) => new["metadata"][kept] = value.clone(),
                None => {
                    new["metadata"].as_object_mut().unwrap().remove(kept);
                }
            }
        }
        new["apiVersion"] = json!(resource.api_version());
        new["kind"] = json!(resource.kind);
        if old["metadata"].get("deletionTimestamp").is_some() {
            let before = finalizers(old);
            if finalizers(&new).iter().any(|f| !before.contains(f)) {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    format!(
                        "{} {:?} is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted",
                        resource.qualified_kind(),
                        meta(old, "name").unwrap_or_default()
                    ),
                ));
            }
        }
        let mut new = self.admit(resource, new, Some(old), request)?;
        if desired_state(resource, &new) != desired_state(resource, old) {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
            new["metadata"]["generation"] = json!(generation + 1);
        }
        Ok(new)
    }

    /// Stores `decide(old)` over the current object, honouring dry runs and
    /// finishing deletions whose last finalizer is gone.
    fn replace(
        &self,
        resource: &ResourceType,
        namespace: &str,
        name: &str,
        request: &Request,
        decide: impl FnOnce(&Value) -> ApiResult<Value>,
    ) -> ApiResult<Value> {
        let dry_run = request.dry_run();
        let mut result = None;
        let stored = self
            .storage
            .write(&resource.storage, namespace, name, |current| {
                let Some(old) = current else {
                    return Err(ApiError::not_found(&resource.qualified(), name));
                };
                let new = decide(old)?;
                result = Some(new.clone());
                if dry_run || new == *old {
                    return Ok(Write::Nothing);
                }
                if new["metadata"].get("deletionTimestamp").is_some() && finalizers(&new).is_empty()
                {
                    return Ok(Write::Delete);
                }
                Ok(Write::Put(new))
            })?;
        Ok(stored.or(result).unwrap_or_default())
    }

    /// `new` written over `old` by a non-apply request (update or patch): the
    /// next version, with the request's field manager taking what it changed.
    fn updated(
        &self,
        resource: &ResourceType,
        old: &Value,
        new: Value,
        sub: Option<&str>,
        request: &Request,
    ) -> ApiResult<Value> {
        let mut next = self.next_version(resource, old, new, sub, request)?;
        Applier {
            manager: &request.field_manager(),
            subresource: sub,
            api_version: &resource.api_version(),
            now: &now(),
            force: false,
        }
        .record_update(old, &mut next);
        Ok(next)
    }

    pub(super) fn update(
        &self,
        resource: &ResourceType,
        namespace: &str,
        name: &str,
        sub: Option<&str>,
        object: Value,
        request: &Request,
    ) -> ApiResult<Value> {
        if meta(&object, "resourceVersion").is_none() && resource.validator.is_some() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                format!(
                    "{} {name:?} is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                    resource.qualified_kind()
                ),
            ));
        }
        self.replace(resource, namespace, name, request, |old| {
            self.updated(resource, old, object, sub, request)
        })
    }

    pub(super) fn patch(
        &self,
        resource: &ResourceType,
        namespace: &str,
        name: &str,
        sub: Option<&str>,
        request: &Request,
    ) -> ApiResult<(StatusCode, Value)> {
        let content_type = request.header("content-type");
        let content_type = content_type.split(';').next().unwrap_or_default().trim();
        match content_type {
            "application/apply-patch+yaml" => {
                return self.server_side_apply(resource, namespace, name, sub, request);
            }
            "application/json-patch+json" | "application/merge-patch+json" => {}
            // Built-in kinds take strategic merge patches; for the fields of
            // Leases, Events and Namespaces that this endpoint serves (no
            // merge-keyed lists) it is the same as a JSON merge patch.
            "application/strategic-merge-patch+json" if resource.validator.is_none() => {}
            other => {
                return Err(ApiError::unsupported_media_type(format!(
                    "the body of the request was in an unknown format ({other}) - accepted media types include: {PATCH_TYPES}"
                )));
            }
        }
        let patch: Value = request.json_body()?;
        let updated = self.replace(resource, namespace, name, request, |old| {
            let mut doc = old.clone();
            if content_type == "application/json-patch+json" {
                let ops = json_patch_ops(&doc, patch.clone())?;
                json_patch::patch(&mut doc, &ops).map_err(|e| {
                    ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        format!("the JSON patch cannot be applied: {e}"),
                    )
                })?;
            } else {
                json_patch::merge(&mut doc, &patch);
            }
            // A patch without a resourceVersion applies to the current one.
            if patch_has_no_rv(&doc, old) {
                doc["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
            }
            self.updated(resource, old, doc, sub, request)
        })?;
        Ok((StatusCode::OK, updated))
    }

    pub(super) fn delete(
        &self,
        resource: &ResourceType,
        namespace: &str,
        name: &str,
        request: &Request,
    ) -> ApiResult<Value> {
        let options: Value = if request.body.is_empty() {
            json!({})
        } else {
            request.json_body()?
        };
        if resource.storage == "namespaces" {
            let occupied = self
                .registry
                .types
                .iter()
                .filter(|t| t.namespaced)
                .any(|t| !self.storage.list(&t.storage, Some(name)).0.is_empty());
            if occupied {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!(
                        "namespace {name:?} still holds objects: the local API endpoint does not cascade namespace deletion; delete its objects first"
                    ),
                ));
            }
        }
        let dry_run = request.dry_run();
        let mut result = None;
        let stored = self
            .storage
            .write(&resource.storage, namespace, name, |current| {
                let Some(old) = current else {
                    return Err(ApiError::not_found(&resource.qualified(), name));
                };
                let preconditions = &options["preconditions"];
                for (field, key) in [("uid", "uid"), ("resourceVersion", "resourceVersion")] {
                    if let Some(wanted) = preconditions[field].as_str()
                        && Some(wanted) != meta(old, key)
                    {
                        return Err(ApiError::conflict(&resource.qualified(), name));
                    }
                }
                if finalizers(old).is_empty() {
                    result = Some(old.clone());
                    return Ok(if dry_run {
                        Write::Nothing
                    } else {
                        Write::Delete
                    });
                }
                // Finalizers hold the object: mark it, and let them finish.
                let mut marked = old.clone();
                if marked["metadata"].get("deletionTimestamp").is_none() {
                    marked["metadata"]["deletionTimestamp"] = json!(now());
                    marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                    let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                    marked["metadata"]["generation"] = json!(generation + 1);
                }
                result = Some(marked.clone());
                Ok(if dry_run || marked == *old {
                    Write::Nothing
                } else {
                    Write::Put(marked)
                })
            })?;
        Ok(stored.or(result).unwrap_or_default())
    }
}

/// Parses a JSON patch. Like the API server, a `test` of `null` passes
/// when the path is absent (kube-runtime's finalizer helper relies on it).
fn json_patch_ops(doc: &Value, patch: Value) -> ApiResult<json_patch::Patch> {
    let Value::Array(ops) = patch else {
        return Err(ApiError::bad_request(
            "a JSON patch must be an array of operations",
        ));
    };
    let ops: Vec<Value> = ops
        .into_iter()
        .filter(|op| {
            let absent_null_test = op["op"] == "test"
                && op["value"].is_null()
                && op["path"]
                    .as_str()
                    .is_some_and(|p| doc.pointer(p).is_none());
            !absent_null_test
        })
        .collect();
    serde_json::from_value(Value::Array(ops))
        .map_err(|e| ApiError::bad_request(format!("the JSON patch is not valid: {e}")))
}

fn patch_has_no_rv(doc: &Value, old: &Value) -> bool {
    doc["metadata"]["resourceVersion"] == old["metadata"]["resourceVersion"]
        || doc["metadata"].get("resourceVersion").is_none()
}

pub(super) fn read_only(resource: &ResourceType) -> ApiError {
    ApiError::method_not_allowed(format!(
        "the local API endpoint serves {} read-only in {}; write them through events.k8s.io/v1",
        resource.plural,
        resource.api_version()
    ))
}
