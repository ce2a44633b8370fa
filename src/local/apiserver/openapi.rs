//! OpenAPI v3 documents, as far as kubectl needs them: the index at
//! `/openapi/v3`, and per group-version the PATCH operations (which tell
//! kubectl that server-side field validation is supported) and the schemas
//! (which `kubectl explain` reads).

use serde_json::{Map, Value, json};

use super::resources::{Registry, ResourceType};

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// A stable version tag of the documents: they change only with the binary.
fn hash() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

pub fn index(registry: &Registry) -> Value {
    let mut paths = Map::new();
    let mut seen = Vec::new();
    for t in &registry.types {
        let path = gv_path(&t.group, &t.version);
        if !seen.contains(&path) {
            paths.insert(
                path.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={}", hash())}),
            );
            seen.push(path);
        }
    }
    json!({"paths": paths})
}

fn schema_name(t: &ResourceType) -> String {
    let group = if t.group.is_empty() {
        "io.k8s.api.core".to_owned()
    } else {
        t.group.split('.').rev().collect::<Vec<_>>().join(".")
    };
    format!("{group}.{}.{}", t.version, t.kind)
}

const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";

fn kind_schema(t: &ResourceType) -> Value {
    let gvk = json!([{"group": t.group, "version": t.version, "kind": t.kind}]);
    let mut schema = match &t.validator {
        Some(validator) => validator.schema().clone(),
        None => json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
    };
    schema["x-kubernetes-group-version-kind"] = gvk;
    if schema.get("properties").is_some() {
        schema["properties"]["apiVersion"] = json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."});
        schema["properties"]["kind"] = json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."});
        schema["properties"]["metadata"] = json!({
            "allOf": [{"$ref": format!("#/components/schemas/{OBJECT_META}")}],
            "description": "Standard object's metadata.",
        });
    }
    schema
}

fn query(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "description": description, "schema": {"type": "string", "uniqueItems": true}})
}

pub fn group_version(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let types: Vec<&ResourceType> = registry.in_group_version(group, version).collect();
    if types.is_empty() {
        return None;
    }
    let mut paths = Map::new();
    let mut schemas = Map::new();
    schemas.insert(
        OBJECT_META.into(),
        json!({"type": "object", "description": "ObjectMeta is metadata that all persisted resources must have, which includes all objects users must create.", "x-kubernetes-preserve-unknown-fields": true}),
    );
    let base = format!("/{}", gv_path(group, version));
    for t in types {
        schemas.insert(schema_name(t), kind_schema(t));
        let gvk = json!({"group": t.group, "version": t.version, "kind": t.kind});
        let object = if t.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", t.plural)
        } else {
            format!("{base}/{}/{{name}}", t.plural)
        };
        let reference = json!({"$ref": format!("#/components/schemas/{}", schema_name(t))});
        let ok = json!({"200": {"description": "OK", "content": {"application/json": {"schema": reference}}}});
        let mut item = json!({
            "get": {"operationId": format!("read{}", t.kind), "x-kubernetes-action": "get", "x-kubernetes-group-version-kind": gvk, "responses": ok},
        });
        if !t.read_only {
            let params = json!([
                query(
                    "dryRun",
                    "When present, indicates that modifications should not be persisted."
                ),
                query(
                    "fieldManager",
                    "fieldManager is a name associated with the actor or entity that is making these changes."
                ),
                query(
                    "fieldValidation",
                    "fieldValidation instructs the server on how to handle objects in the request containing unknown or duplicate fields: Ignore, Warn or Strict."
                ),
                query("force", "Force is going to \"force\" Apply requests."),
            ]);
            item["patch"] = json!({"operationId": format!("patch{}", t.kind), "x-kubernetes-action": "patch", "x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": ok});
            item["put"] = json!({"operationId": format!("replace{}", t.kind), "x-kubernetes-action": "put", "x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": ok});
            item["delete"] = json!({"operationId": format!("delete{}", t.kind), "x-kubernetes-action": "delete", "x-kubernetes-group-version-kind": gvk, "responses": ok});
        }
        paths.insert(object, item);
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "voucher-operator local API endpoint", "version": hash()},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}
