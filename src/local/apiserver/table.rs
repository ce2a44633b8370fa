//! `Table` responses (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`),
//! which `kubectl get` prints, built from the printer columns.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::resources::Column;

pub fn table(
    printer_columns: &[Column],
    objects: &[Value],
    metadata: Value,
    include_object: &str,
    now: DateTime<Utc>,
) -> Value {
    let mut columns = vec![json!({
        "name": "Name",
        "type": "string",
        "format": "name",
        "description": "Name must be unique within a namespace.",
        "priority": 0,
    })];
    columns.extend(printer_columns.iter().map(|c| {
        json!({
            "name": c.name,
            "type": c.type_,
            "format": c.format,
            "description": c.description,
            "priority": c.priority,
        })
    }));
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let mut cells = vec![object["metadata"]["name"].clone()];
            cells.extend(printer_columns.iter().map(|c| {
                let value = json_path(object, &c.json_path)
                    .cloned()
                    .unwrap_or(Value::Null);
                if c.type_ == "date" {
                    date_cell(&value, now)
                } else {
                    value
                }
            }));
            let row_object = match include_object {
                "Object" => object.clone(),
                "None" => Value::Null,
                _ => json!({
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": object["metadata"],
                }),
            };
            json!({"cells": cells, "object": row_object})
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": columns,
        "rows": rows,
    })
}

/// The simple JSONPath of printer columns: `.a.b.c`.
pub fn json_path<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    path.trim_start_matches('.')
        .split('.')
        .filter(|k| !k.is_empty())
        .try_fold(object, |v, key| v.get(key))
}

fn date_cell(value: &Value, now: DateTime<Utc>) -> Value {
    let Some(at) = value
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
    else {
        return json!("<unknown>");
    };
    let seconds = (now - at.with_timezone(&Utc)).num_seconds().max(0);
    json!(human_duration(seconds))
}

/// The API server's `HumanDuration`: `42s`, `5m10s`, `3h`, `2d4h`, `400d`, `2y`.
pub fn human_duration(seconds: i64) -> String {
    let (minutes, hours, days) = (seconds / 60, seconds / 3600, seconds / 86_400);
    let years = days / 365;
    if seconds < 120 {
        format!("{seconds}s")
    } else if minutes < 10 {
        let s = seconds % 60;
        if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        }
    } else if minutes < 180 {
        format!("{minutes}m")
    } else if hours < 8 {
        let m = minutes % 60;
        if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        }
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 192 {
        let h = hours % 24;
        if h == 0 {
            format!("{days}d")
        } else {
            format!("{days}d{h}h")
        }
    } else if years < 2 {
        format!("{days}d")
    } else if years < 8 {
        let d = days % 365;
        if d == 0 {
            format!("{years}y")
        } else {
            format!("{years}y{d}d")
        }
    } else {
        format!("{years}y")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human_duration(42), "42s");
        assert_eq!(human_duration(310), "5m10s");
        assert_eq!(human_duration(3 * 3600), "3h");
        assert_eq!(human_duration(50 * 3600), "2d2h");
        assert_eq!(human_duration(400 * 86_400), "400d");
        assert_eq!(human_duration(3 * 365 * 86_400), "3y");
    }

    #[test]
    fn json_paths() {
        let o = json!({"spec": {"creditOMR": 5}});
        assert_eq!(json_path(&o, ".spec.creditOMR"), Some(&json!(5)));
        assert_eq!(json_path(&o, ".status.phase"), None);
    }
}
