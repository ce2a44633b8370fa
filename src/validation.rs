//! Checks a Voucher object the way the Kubernetes API server does before it
//! stores one: strict field validation (unknown fields), the CRD's OpenAPI
//! schema, and its CEL rules (transition rules against the stored object).
//! Used by the tests of the CRD and by the local API endpoint.

use std::fmt;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionVersion,
};
use kube::core::cel::{CompiledSchema, compile_schema, validate_compiled};
use serde_json::Value;

use crate::api;

/// One reason an object is invalid, with the field it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    /// Dotted path, e.g. `spec.creditOMR`; empty for the whole object.
    pub field: String,
    pub message: String,
}

/// An object the API server would reject with 422 Unprocessable Entity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub kind: String,
    pub name: String,
    pub causes: Vec<Cause>,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl fmt::Display for Invalid {
    /// Worded like the API server's message, which kubectl prints as is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?} is invalid: ", self.kind, self.name)?;
        let causes: Vec<String> = self.causes.iter().map(ToString::to_string).collect();
        if causes.len() == 1 {
            f.write_str(&causes[0])
        } else {
            write!(f, "[{}]", causes.join(", "))
        }
    }
}

impl std::error::Error for Invalid {}

/// The version of a CRD that objects are stored (and validated, and served) as.
pub fn storage_version(
    crd: &CustomResourceDefinition,
) -> Result<&CustomResourceDefinitionVersion, String> {
    crd.spec
        .versions
        .iter()
        .find(|v| v.storage)
        .ok_or_else(|| "the CRD has no storage version".to_owned())
}

/// A compiled validator for one CRD version.
pub struct Validator {
    api_version: String,
    kind: String,
    qualified_kind: String,
    schema: Value,
    json_schema: jsonschema::Validator,
    cel: CompiledSchema,
}

impl Validator {
    /// The validator of the Voucher CRD this binary generates.
    pub fn for_vouchers() -> Self {
        Self::from_crd(&api::crd()).expect("the generated Voucher CRD has a valid schema")
    }

    pub fn from_crd(crd: &CustomResourceDefinition) -> Result<Self, String> {
        let version = storage_version(crd)?;
        let schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .ok_or("the CRD version has no openAPIV3Schema")?;
        let schema = serde_json::to_value(schema).map_err(|e| e.to_string())?;
        let json_schema = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .should_validate_formats(true)
            .should_ignore_unknown_formats(true)
            .build(&schema)
            .map_err(|e| format!("the openAPIV3Schema is not a valid JSON schema: {e}"))?;
        let cel = compile_schema(&schema);
        if cel.has_errors() {
            let errors: Vec<String> = cel
                .compilation_errors()
                .iter()
                .map(|e| e.to_string())
                .collect();
            return Err(format!("CEL rules do not compile: {}", errors.join("; ")));
        }
        Ok(Self {
            api_version: format!("{}/{}", crd.spec.group, version.name),
            kind: crd.spec.names.kind.clone(),
            qualified_kind: format!("{}.{}", crd.spec.names.kind, crd.spec.group),
            schema,
            json_schema,
            cel,
        })
    }

    /// Validates `object`; `old` is the stored object on update, so that
    /// transition rules (those using `oldSelf`) run.
    pub fn validate(&self, object: &Value, old: Option<&Value>) -> Result<(), Invalid> {
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let mut causes = Vec::new();
        self.check_type(object, &mut causes);
        check_name(object, &mut causes);
        causes.extend(self.unknown_fields(object).into_iter().map(|path| Cause {
            field: String::new(),
            message: format!("unknown field {path:?}"),
        }));
        if causes.is_empty() {
            causes.extend(
                self.json_schema
                    .iter_errors(object)
                    .map(|e| schema_cause(&e)),
            );
        }
        // CEL rules assume a schema-valid object, as in the API server.
        if causes.is_empty()
            && let Err(errors) = validate_compiled(&self.cel, object, old)
        {
            for error in errors.iter() {
                causes.push(Cause {
                    field: error.field_path.trim_start_matches('.').to_owned(),
                    message: error.message.clone(),
                });
            }
        }
        if causes.is_empty() {
            Ok(())
        } else {
            Err(Invalid {
                kind: self.qualified_kind.clone(),
                name,
                causes,
            })
        }
    }

    /// Paths of the fields the schema does not declare (what strict field
    /// validation rejects).
    pub fn unknown_fields(&self, object: &Value) -> Vec<String> {
        let mut found = Vec::new();
        unknown_fields(&self.schema, &mut object.clone(), "", false, &mut found);
        found
    }

    /// Removes the fields the schema does not declare, as the API server
    /// prunes them when field validation is not strict; returns their paths.
    pub fn prune_unknown_fields(&self, object: &mut Value) -> Vec<String> {
        let mut found = Vec::new();
        unknown_fields(&self.schema, object, "", true, &mut found);
        found
    }

    /// Fills the schema's defaults into `object`, as the API server does
    /// before validation and storage.
    pub fn apply_defaults(&self, object: &Value) -> Value {
        kube::core::cel::apply_defaults(&self.schema, object)
    }

    pub fn schema(&self) -> &Value {
        &self.schema
    }

    fn check_type(&self, object: &Value, causes: &mut Vec<Cause>) {
        for (field, wanted) in [("apiVersion", &self.api_version), ("kind", &self.kind)] {
            match object.get(field).and_then(Value::as_str) {
                Some(found) if found == wanted => {}
                Some(found) => causes.push(Cause {
                    field: field.into(),
                    message: format!("must be {wanted:?}, not {found:?}"),
                }),
                None => causes.push(Cause {
                    field: field.into(),
                    message: format!("Required value: must be {wanted:?}"),
                }),
            }
        }
    }
}

/// `metadata.name` must be a DNS-1123 subdomain, as for every object.
fn check_name(object: &Value, causes: &mut Vec<Cause>) {
    let message = match object.pointer("/metadata/name").and_then(Value::as_str) {
        None | Some("") => "Required value: name is required".to_owned(),
        Some(name) if is_dns1123_subdomain(name) => return,
        Some(name) => format!(
            "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case \
             alphanumeric characters, '-' or '.', and must start and end with an alphanumeric \
             character"
        ),
    };
    causes.push(Cause {
        field: "metadata.name".into(),
        message,
    });
}

pub fn is_dns1123_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

const ROOT_FIELDS: [&str; 3] = ["apiVersion", "kind", "metadata"];

/// Finds, and with `prune` removes, the fields the schema does not declare.
/// Returns their dotted paths.
fn unknown_fields(
    schema: &Value,
    value: &mut Value,
    path: &str,
    prune: bool,
    found: &mut Vec<String>,
) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    match value {
        Value::Object(fields) => {
            let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
                return;
            };
            let mut unknown = Vec::new();
            for (key, child) in fields.iter_mut() {
                // Every object has these; a CRD schema does not list them.
                if path.is_empty() && ROOT_FIELDS.contains(&key.as_str()) {
                    continue;
                }
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match properties.get(key) {
                    Some(child_schema) => {
                        unknown_fields(child_schema, child, &child_path, prune, found)
                    }
                    None => {
                        unknown.push(key.clone());
                        found.push(child_path);
                    }
                }
            }
            if prune {
                for key in unknown {
                    fields.remove(&key);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    unknown_fields(item_schema, item, &format!("{path}[{i}]"), prune, found);
                }
            }
        }
        _ => {}
    }
}

/// A schema violation worded as the API server words it, so kubectl users
/// read the same sentence from the local endpoint as from a cluster.
fn schema_cause(error: &jsonschema::ValidationError<'_>) -> Cause {
    use jsonschema::error::{TypeKind, ValidationErrorKind as Kind};
    let field = dotted(error.instance_path().as_str());
    let value = error.instance();
    let number = |limit: &Value| match limit.as_f64() {
        Some(n) if n.fract() == 0.0 => format!("{}", n as i64),
        _ => limit.to_string(),
    };
    let message = match error.kind() {
        Kind::Minimum { limit } => format!(
            "Invalid value: {value}: {field} in body should be greater than or equal to {}",
            number(limit)
        ),
        Kind::Maximum { limit } => format!(
            "Invalid value: {value}: {field} in body should be less than or equal to {}",
            number(limit)
        ),
        Kind::Pattern { pattern } => {
            format!("Invalid value: {value}: {field} in body should match '{pattern}'")
        }
        Kind::MaxLength { limit } => format!("Too long: may not be more than {limit} bytes"),
        Kind::MinLength { limit } => {
            format!("Invalid value: {value}: {field} in body should be at least {limit} chars long")
        }
        Kind::Enum { options } => {
            let supported: Vec<String> = options
                .as_array()
                .map(|o| o.iter().map(Value::to_string).collect())
                .unwrap_or_default();
            format!(
                "Unsupported value: {value}: supported values: {}",
                supported.join(", ")
            )
        }
        Kind::Type { kind } => {
            let wanted = match kind {
                TypeKind::Single(t) => t.to_string(),
                TypeKind::Multiple(ts) => ts
                    .into_iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(" or "),
            };
            format!("Invalid value: {value}: {field} in body must be of type {wanted}: {value}")
        }
        Kind::Format { format } => {
            format!("Invalid value: {value}: {field} in body must be of type {format}: {value}")
        }
        Kind::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            let field = if field.is_empty() {
                name.to_owned()
            } else {
                format!("{field}.{name}")
            };
            return Cause {
                field,
                message: "Required value".into(),
            };
        }
        _ => error.to_string(),
    };
    Cause { field, message }
}

/// `/spec/creditOMR` → `spec.creditOMR`.
fn dotted(pointer: &str) -> String {
    pointer.trim_start_matches('/').replace('/', ".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        assert!(is_dns1123_subdomain("launch-2026.sales"));
        assert!(!is_dns1123_subdomain("Launch"));
        assert!(!is_dns1123_subdomain("-a"));
        assert!(!is_dns1123_subdomain("a..b"));
    }

    #[test]
    fn messages_read_like_the_api_server() {
        let invalid = Invalid {
            kind: "Voucher.catalyst.openova.io".into(),
            name: "x".into(),
            causes: vec![Cause {
                field: "spec.creditOMR".into(),
                message: "0 is less than the minimum of 1".into(),
            }],
        };
        assert_eq!(
            invalid.to_string(),
            "Voucher.catalyst.openova.io \"x\" is invalid: spec.creditOMR: 0 is less than the minimum of 1"
        );
    }
}
