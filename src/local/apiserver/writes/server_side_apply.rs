//! PATCH with `application/apply-patch+yaml`: server-side apply of an apply configuration,
//! creating the object when it is absent, with field ownership (see `apiserver::apply`).

use axum::http::StatusCode;
use serde_json::{Map, Value, json};

use super::super::apply::{Applier, Conflict};
use super::super::resources::ResourceType;
use super::super::status::{ApiError, ApiResult};
use super::super::storage::Write;
use super::super::{ApiServer, Request};
use super::{meta, now};

impl ApiServer {
    pub(super) fn server_side_apply(
        &self,
        resource: &ResourceType,
        namespace: &str,
        name: &str,
        sub: Option<&str>,
        request: &Request,
    ) -> ApiResult<(StatusCode, Value)> {
        let Some(manager) = request.param("fieldManager") else {
            return Err(ApiError::bad_request(
                "PATCH /apply requires the fieldManager parameter",
            ));
        };
        let config: Value = serde_yaml::from_slice(&request.body).map_err(|e| {
            ApiError::bad_request(format!("the apply configuration is not valid YAML: {e}"))
        })?;
        if config["apiVersion"].as_str().is_none() || config["kind"].as_str().is_none() {
            return Err(ApiError::bad_request(
                "apiVersion and kind must be set in an apply configuration",
            ));
        }
        self.check_kind(resource, &config)?;
        if let Some(config_name) = meta(&config, "name")
            && config_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({config_name}) does not match the name on the URL ({name})"
            )));
        }
        // Only what this endpoint lets the manager own: status through the
        // subresource, everything else through the main resource.
        let mut owned = Map::new();
        for (key, value) in config.as_object().unwrap() {
            let is_status = key == "status";
            let keep = match sub {
                Some(_) => is_status || key == "apiVersion" || key == "kind",
                None => !(is_status && resource.status_subresource),
            };
            if keep {
                owned.insert(key.clone(), value.clone());
            }
        }
        if let Some(metadata) = owned.get_mut("metadata").and_then(Value::as_object_mut) {
            for server_field in [
                "name",
                "namespace",
                "uid",
                "resourceVersion",
                "generation",
                "creationTimestamp",
                "managedFields",
            ] {
                metadata.remove(server_field);
            }
        }
        let owned = Value::Object(owned);
        let force = request.flag("force");
        let (time, api_version) = (now(), resource.api_version());
        let applier = Applier {
            manager,
            subresource: sub,
            api_version: &api_version,
            now: &time,
            force,
        };

        if self
            .storage
            .get(&resource.storage, namespace, name)
            .is_none()
        {
            if sub.is_some() {
                return Err(ApiError::not_found(&resource.qualified(), name));
            }
            let shell = json!({"apiVersion": api_version, "kind": resource.kind, "metadata": {"name": name}});
            let shell = self.new_object(
                resource,
                Some(namespace).filter(|_| resource.namespaced),
                shell,
            )?;
            let applied = applier
                .apply(&shell, &owned)
                .map_err(|c| apply_conflict(&c, &api_version))?;
            // Defaults are the server's, not the applier's: the fields owned are the applied ones.
            let managed = applied["metadata"]["managedFields"].clone();
            let mut admitted = self.admit(resource, applied, None, request)?;
            admitted["metadata"]["managedFields"] = managed;
            let dry_run = request.dry_run();
            let stored = self
                .storage
                .write(&resource.storage, namespace, name, |current| {
                    if current.is_some() {
                        return Err(ApiError::conflict(&resource.qualified(), name));
                    }
                    Ok(if dry_run {
                        Write::Nothing
                    } else {
                        Write::Put(admitted.clone())
                    })
                })?;
            return Ok((StatusCode::CREATED, stored.unwrap_or(admitted)));
        }
        let updated = self.replace(resource, namespace, name, request, |old| {
            let applied = applier
                .apply(old, &owned)
                .map_err(|c| apply_conflict(&c, &api_version))?;
            let managed = applied["metadata"]["managedFields"].clone();
            let mut new = self.next_version(resource, old, applied, sub, request)?;
            match managed {
                Value::Null => {
                    new["metadata"]
                        .as_object_mut()
                        .unwrap()
                        .remove("managedFields");
                }
                managed => new["metadata"]["managedFields"] = managed,
            }
            Ok(new)
        })?;
        Ok((StatusCode::OK, updated))
    }
}

fn apply_conflict(conflicts: &[Conflict], api_version: &str) -> ApiError {
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|c| {
            json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with {:?} using {api_version}", c.manager),
                "field": c.field(),
            })
        })
        .collect();
    let lines: Vec<String> = conflicts
        .iter()
        .map(|c| {
            format!(
                "conflict with {:?} using {api_version}: {}",
                c.manager,
                c.field()
            )
        })
        .collect();
    ApiError::new(
        StatusCode::CONFLICT,
        "Conflict",
        format!(
            "Apply failed with {} conflict{}: {}",
            conflicts.len(),
            if conflicts.len() == 1 { "" } else { "s" },
            lines.join("\n")
        ),
    )
    .with_details(json!({"causes": causes}))
}
