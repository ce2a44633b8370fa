//! Server-side apply and field ownership (`metadata.managedFields`).
//!
//! Fields are tracked down to leaves; lists are atomic (owned whole), which
//! is what the Voucher, Lease and Event shapes need. An apply conflicts when
//! it sets a field to a different value than another manager left there.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

pub type FieldPath = Vec<String>;

/// One `managedFields` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct ManagedEntry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: Option<String>,
    pub fields: BTreeSet<FieldPath>,
}

/// Another manager owns a field this apply would change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub manager: String,
    pub path: FieldPath,
}

impl Conflict {
    pub fn field(&self) -> String {
        format!(".{}", self.path.join("."))
    }
}

/// Metadata fields a manager can own; the rest is the server's.
const OWNABLE_METADATA: [&str; 4] = ["labels", "annotations", "finalizers", "ownerReferences"];

/// The leaves of `value` that a manager owns by setting them.
pub fn owned_leaves(value: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    if let Value::Object(map) = value {
        for (key, child) in map {
            match key.as_str() {
                "apiVersion" | "kind" => {}
                "metadata" => {
                    if let Value::Object(meta) = child {
                        for field in OWNABLE_METADATA {
                            if let Some(v) = meta.get(field) {
                                collect(v, vec!["metadata".into(), field.into()], &mut out);
                            }
                        }
                    }
                }
                _ => collect(child, vec![key.clone()], &mut out),
            }
        }
    }
    out
}

fn collect(value: &Value, path: FieldPath, out: &mut BTreeSet<FieldPath>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                let mut child_path = path.clone();
                child_path.push(key.clone());
                collect(child, child_path, out);
            }
        }
        _ => {
            out.insert(path);
        }
    }
}

pub fn get_path<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(key))
}

fn remove_path(value: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = value;
    for key in parents {
        match node.get_mut(key) {
            Some(next) => node = next,
            None => return,
        }
    }
    if let Value::Object(map) = node {
        map.remove(last);
    }
}

/// Deep merge for apply: objects merge key by key, everything else replaces,
/// and `null` removes.
pub fn merge(target: &mut Value, config: &Value) {
    match (target, config) {
        (Value::Object(t), Value::Object(c)) => {
            for (key, value) in c {
                if value.is_null() {
                    t.remove(key);
                } else {
                    merge(t.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (t, c) => *t = c.clone(),
    }
}

fn related(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

pub fn read_managed(object: &Value) -> Vec<ManagedEntry> {
    let Some(entries) = object["metadata"]["managedFields"].as_array() else {
        return Vec::new();
    };
    entries
        .iter()
        .map(|e| {
            let mut fields = BTreeSet::new();
            parse_fields(&e["fieldsV1"], Vec::new(), &mut fields);
            ManagedEntry {
                manager: e["manager"].as_str().unwrap_or_default().into(),
                operation: e["operation"].as_str().unwrap_or("Update").into(),
                api_version: e["apiVersion"].as_str().unwrap_or_default().into(),
                time: e["time"].as_str().unwrap_or_default().into(),
                subresource: e["subresource"].as_str().map(Into::into),
                fields,
            }
        })
        .collect()
}

fn parse_fields(node: &Value, path: FieldPath, out: &mut BTreeSet<FieldPath>) {
    let Some(map) = node.as_object() else {
        return;
    };
    let is_leaf = map.is_empty()
        || map.contains_key(".")
        // List items (k:/v:/i:) are not modelled: the list is owned whole.
        || map.keys().any(|k| !k.starts_with("f:") && k != ".");
    if is_leaf && !path.is_empty() {
        out.insert(path.clone());
    }
    for (key, child) in map {
        if let Some(name) = key.strip_prefix("f:") {
            let mut child_path = path.clone();
            child_path.push(name.to_owned());
            parse_fields(child, child_path, out);
        }
    }
}

fn render_fields(fields: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for path in fields {
        let mut node = &mut root;
        for key in path {
            node = node
                .entry(format!("f:{key}"))
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("field nodes are objects");
        }
    }
    // A node that is owned itself and also has owned children gets ".".
    for path in fields {
        let mut node = &mut root;
        for key in path {
            node = node
                .get_mut(&format!("f:{key}"))
                .unwrap()
                .as_object_mut()
                .unwrap();
        }
        if !node.is_empty() {
            node.insert(".".into(), json!({}));
        }
    }
    Value::Object(root)
}

pub fn write_managed(object: &mut Value, entries: &[ManagedEntry]) {
    let rendered: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut entry = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": render_fields(&e.fields),
            });
            if let Some(sub) = &e.subresource {
                entry["subresource"] = json!(sub);
            }
            entry
        })
        .collect();
    if rendered.is_empty() {
        if let Some(meta) = object["metadata"].as_object_mut() {
            meta.remove("managedFields");
        }
    } else {
        object["metadata"]["managedFields"] = Value::Array(rendered);
    }
}

/// Who is applying, and to what.
pub struct Applier<'a> {
    pub manager: &'a str,
    pub subresource: Option<&'a str>,
    pub api_version: &'a str,
    pub now: &'a str,
    pub force: bool,
}

impl Applier<'_> {
    fn entry_index(&self, entries: &mut Vec<ManagedEntry>, operation: &str) -> usize {
        let found = entries.iter().position(|e| {
            e.manager == self.manager
                && e.operation == operation
                && e.subresource.as_deref() == self.subresource
        });
        found.unwrap_or_else(|| {
            entries.push(ManagedEntry {
                manager: self.manager.into(),
                operation: operation.into(),
                api_version: self.api_version.into(),
                time: self.now.into(),
                subresource: self.subresource.map(Into::into),
                fields: BTreeSet::new(),
            });
            entries.len() - 1
        })
    }

    /// Applies `config` over `current` (or a new object). `config` must hold
    /// only what this endpoint lets the manager set (spec or status).
    pub fn apply(&self, current: &Value, config: &Value) -> Result<Value, Vec<Conflict>> {
        let mut entries = read_managed(current);
        let applied = owned_leaves(config);

        let mut conflicts = Vec::new();
        for path in &applied {
            if get_path(current, path) == get_path(config, path) {
                continue;
            }
            for entry in &entries {
                if entry.manager != self.manager && entry.fields.iter().any(|p| related(p, path)) {
                    conflicts.push(Conflict {
                        manager: entry.manager.clone(),
                        path: path.clone(),
                    });
                }
            }
        }
        if !conflicts.is_empty() && !self.force {
            return Err(conflicts);
        }
        for conflict in &conflicts {
            for entry in entries.iter_mut().filter(|e| e.manager == conflict.manager) {
                entry.fields.retain(|p| !related(p, &conflict.path));
            }
        }

        let mut result = current.clone();
        let mine = self.entry_index(&mut entries, "Apply");
        let previous = std::mem::take(&mut entries[mine].fields);
        for path in previous.difference(&applied) {
            let owned_elsewhere = entries
                .iter()
                .any(|e| e.fields.iter().any(|p| related(p, path)));
            if !owned_elsewhere {
                remove_path(&mut result, path);
            }
        }
        merge(&mut result, config);
        entries[mine].fields = applied;
        entries[mine].time = self.now.into();
        entries[mine].api_version = self.api_version.into();
        write_managed(&mut result, &entries);
        Ok(result)
    }

    /// Records a non-apply write (create, update, patch): the writer takes
    /// the fields it changed from everybody else, removed fields lose owners.
    pub fn record_update(&self, old: &Value, new: &mut Value) {
        let mut entries = read_managed(old);
        let before = owned_leaves(old);
        let after = owned_leaves(new);
        let removed: Vec<&FieldPath> = before.difference(&after).collect();
        let changed: Vec<FieldPath> = after
            .iter()
            .filter(|p| get_path(old, p) != get_path(new, p))
            .cloned()
            .collect();
        for entry in entries.iter_mut() {
            entry
                .fields
                .retain(|p| !removed.iter().any(|r| related(p, r)));
            if entry.manager != self.manager {
                entry
                    .fields
                    .retain(|p| !changed.iter().any(|c| related(p, c)));
            }
        }
        if !changed.is_empty() {
            let mine = self.entry_index(&mut entries, "Update");
            entries[mine].fields.extend(changed);
            entries[mine].time = self.now.into();
        }
        write_managed(new, &entries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applier<'a>(manager: &'a str, force: bool) -> Applier<'a> {
        Applier {
            manager,
            subresource: None,
            api_version: "catalyst.openova.io/v1alpha1",
            now: "2026-11-25T12:00:00Z",
            force,
        }
    }

    fn base() -> Value {
        json!({"apiVersion": "v", "kind": "K", "metadata": {"name": "a"}, "spec": {}})
    }

    #[test]
    fn apply_sets_fields_and_records_ownership() {
        let config = json!({"spec": {"creditOMR": 5, "description": "x"}, "metadata": {"labels": {"a": "b"}}});
        let applied = applier("alice", false).apply(&base(), &config).unwrap();
        assert_eq!(applied["spec"]["creditOMR"], 5);
        let entries = read_managed(&applied);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].operation, "Apply");
        assert!(
            entries[0]
                .fields
                .contains(&vec!["spec".into(), "creditOMR".into()])
        );
        assert!(
            entries[0]
                .fields
                .contains(&vec!["metadata".into(), "labels".into(), "a".into()])
        );
    }

    #[test]
    fn fields_dropped_from_the_config_are_removed() {
        let first = applier("alice", false)
            .apply(
                &base(),
                &json!({"spec": {"creditOMR": 5, "description": "x"}}),
            )
            .unwrap();
        let second = applier("alice", false)
            .apply(&first, &json!({"spec": {"creditOMR": 5}}))
            .unwrap();
        assert!(second["spec"].get("description").is_none());
    }

    #[test]
    fn changing_another_managers_field_conflicts_unless_forced() {
        let first = applier("alice", false)
            .apply(&base(), &json!({"spec": {"creditOMR": 5}}))
            .unwrap();
        // Same value: shared ownership, no conflict.
        let shared = applier("bob", false)
            .apply(&first, &json!({"spec": {"creditOMR": 5}}))
            .unwrap();
        let conflicts = applier("bob", false)
            .apply(&shared, &json!({"spec": {"creditOMR": 6}}))
            .unwrap_err();
        assert_eq!(conflicts[0].manager, "alice");
        assert_eq!(conflicts[0].field(), ".spec.creditOMR");
        let forced = applier("bob", true)
            .apply(&shared, &json!({"spec": {"creditOMR": 6}}))
            .unwrap();
        assert_eq!(forced["spec"]["creditOMR"], 6);
        let alice = read_managed(&forced)
            .into_iter()
            .find(|e| e.manager == "alice");
        assert!(alice.is_none(), "alice lost her only field");
    }

    #[test]
    fn updates_take_ownership_and_removals_clear_it() {
        let applied = applier("alice", false)
            .apply(&base(), &json!({"spec": {"holder": "a", "renew": 1}}))
            .unwrap();
        let mut updated = applied.clone();
        updated["spec"]["renew"] = json!(2);
        updated["spec"].as_object_mut().unwrap().remove("holder");
        applier("bob", false).record_update(&applied, &mut updated);
        let entries = read_managed(&updated);
        let bob = entries.iter().find(|e| e.manager == "bob").unwrap();
        assert_eq!(
            bob.fields,
            BTreeSet::from([vec!["spec".to_string(), "renew".to_string()]])
        );
        assert!(entries.iter().all(|e| e.manager != "alice"));
        // Nobody owns `holder` any more, so a new applier takes it freely.
        let taken = applier("carol", false)
            .apply(&updated, &json!({"spec": {"holder": "c"}}))
            .unwrap();
        assert_eq!(taken["spec"]["holder"], "c");
    }

    #[test]
    fn managed_fields_round_trip() {
        let fields: BTreeSet<FieldPath> = BTreeSet::from([
            vec!["spec".into(), "a".into()],
            vec!["spec".into()],
            vec!["status".into(), "conditions".into()],
        ]);
        let rendered = render_fields(&fields);
        assert_eq!(rendered["f:spec"]["."], json!({}));
        let mut parsed = BTreeSet::new();
        parse_fields(&rendered, Vec::new(), &mut parsed);
        assert_eq!(parsed, fields);
    }
}
