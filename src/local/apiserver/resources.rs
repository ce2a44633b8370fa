//! The kinds the local API endpoint serves, described the way discovery and
//! the handlers need them.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

use crate::validation::Validator;

/// A printer column: what `kubectl get` shows.
#[derive(Clone, Debug)]
pub struct Column {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub json_path: String,
    pub priority: i32,
}

/// One resource type (a group, version and plural).
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub status_subresource: bool,
    pub columns: Vec<Column>,
    /// Schema, defaults and CEL rules; `None` for kinds stored as sent.
    pub validator: Option<Validator>,
    /// Key of the storage this view reads and writes; two views of one
    /// storage (core/v1 and events.k8s.io/v1 Events) share it.
    pub storage: String,
    /// Whether this view is read-only (the core/v1 view of Events).
    pub read_only: bool,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `vouchers.catalyst.openova.io`, or `namespaces` for the core group.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// `Voucher.catalyst.openova.io`, as error messages name a kind.
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// The discovery entry of this resource (and its status subresource).
    pub fn discovery(&self) -> Vec<Value> {
        let verbs = if self.read_only {
            json!(["get", "list", "watch"])
        } else {
            json!([
                "create", "delete", "get", "list", "patch", "update", "watch"
            ])
        };
        let mut entries = vec![json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
            "shortNames": self.short_names,
            "categories": self.categories,
        })];
        if self.status_subresource {
            entries.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        entries
    }

    fn builtin(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        let storage = if group.is_empty() {
            plural.to_owned()
        } else {
            format!("{plural}.{group}")
        };
        Self {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            namespaced,
            short_names: Vec::new(),
            categories: Vec::new(),
            status_subresource: false,
            columns: vec![age_column()],
            validator: None,
            storage,
            read_only: false,
        }
    }

    /// A custom resource served from its CRD.
    pub fn from_crd(crd: &CustomResourceDefinition) -> Result<Self, String> {
        let version = crate::validation::storage_version(crd)?;
        let columns = match &version.additional_printer_columns {
            Some(columns) if !columns.is_empty() => columns
                .iter()
                .map(|c| Column {
                    name: c.name.clone(),
                    type_: c.type_.clone(),
                    format: c.format.clone().unwrap_or_default(),
                    description: c.description.clone().unwrap_or_default(),
                    json_path: c.json_path.clone(),
                    priority: c.priority.unwrap_or(0),
                })
                .collect(),
            _ => vec![age_column()],
        };
        let names = &crd.spec.names;
        Ok(Self {
            group: crd.spec.group.clone(),
            version: version.name.clone(),
            kind: names.kind.clone(),
            plural: names.plural.clone(),
            singular: names
                .singular
                .clone()
                .unwrap_or_else(|| names.kind.to_lowercase()),
            namespaced: crd.spec.scope == "Namespaced",
            short_names: names.short_names.clone().unwrap_or_default(),
            categories: names.categories.clone().unwrap_or_default(),
            status_subresource: version
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some()),
            columns,
            validator: Some(Validator::from_crd(crd)?),
            storage: format!("{}.{}", names.plural, crd.spec.group),
            read_only: false,
        })
    }
}

fn age_column() -> Column {
    Column {
        name: "Age".into(),
        type_: "date".into(),
        format: String::new(),
        description: "CreationTimestamp is a timestamp representing the server time when this object was created.".into(),
        json_path: ".metadata.creationTimestamp".into(),
        priority: 0,
    }
}

/// Every kind the endpoint serves.
pub struct Registry {
    pub types: Vec<ResourceType>,
}

/// Storage key of Events, shared by the core/v1 and events.k8s.io/v1 views.
pub const EVENTS_STORAGE: &str = "events.events.k8s.io";

impl Registry {
    /// The built-in kinds the operator and kubectl need, plus `crds`.
    pub fn new(crds: &[CustomResourceDefinition]) -> Result<Self, String> {
        let mut namespaces = ResourceType::builtin("", "v1", "Namespace", "namespaces", false);
        namespaces.short_names = vec!["ns".into()];
        let mut core_events = ResourceType::builtin("", "v1", "Event", "events", true);
        core_events.short_names = vec!["ev".into()];
        core_events.storage = EVENTS_STORAGE.into();
        core_events.read_only = true;
        let mut events = ResourceType::builtin("events.k8s.io", "v1", "Event", "events", true);
        events.short_names = vec!["ev".into()];
        let mut crd_type = ResourceType::builtin(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
        );
        crd_type.short_names = vec!["crd".into(), "crds".into()];
        crd_type.categories = vec!["api-extensions".into()];
        let mut types = vec![
            namespaces,
            core_events,
            events,
            ResourceType::builtin("coordination.k8s.io", "v1", "Lease", "leases", true),
            crd_type,
        ];
        for crd in crds {
            types.push(ResourceType::from_crd(crd)?);
        }
        Ok(Self { types })
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
    }

    /// Group names in a stable order, the core group excluded.
    pub fn groups(&self) -> Vec<&str> {
        let mut groups: Vec<&str> = Vec::new();
        for t in &self.types {
            if !t.group.is_empty() && !groups.contains(&t.group.as_str()) {
                groups.push(&t.group);
            }
        }
        groups
    }

    pub fn in_group_version<'a>(
        &'a self,
        group: &'a str,
        version: &'a str,
    ) -> impl Iterator<Item = &'a ResourceType> {
        self.types
            .iter()
            .filter(move |t| t.group == group && t.version == version)
    }
}
