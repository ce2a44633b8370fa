//! What the chart accepts and refuses: every variable it sets is one the binary reads, with a
//! value the binary accepts; variants render; wrong values are rejected by name.

use clap::{CommandFactory, Parser};
use voucher_operator::cli::Cli;

use super::*;

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
                     "audience": "billing", "leeway": "1m", "tenantClaim": "tenant_id",
                     "hs256Issuer": "billing-service", "hs256Audience": "vouchers"},
            "controller": {"watchNamespace": "billing", "concurrency": 16, "resyncInterval": "10m",
                           "statusMinInterval": "500ms", "leaseName": "vouchers", "leaseDuration": "20s"},
            "server": {"adminNamespace": "billing", "trustedProxies": ["10.0.0.0/8", "fd00::/8"],
                       "rateLimit": {"perMinute": 1_000_000, "burst": 1_000_000}, "bodyLimit": 16_777_216,
                       "requestTimeout": "1.5s", "headerReadTimeout": "5s", "idleTimeout": "2m",
                       "maxConnections": 100, "maxConnectionsPerClient": 10},
            "database": {"maxConnections": 1000, "connectTimeout": "1m 30s"},
            "audit": {"relay": false, "storage": "memory", "replicas": 3, "maxAge": "1year",
                      "duplicateWindow": "1h", "retention": "1day"},
            "nats": {"url": "nats://a:4222,nats://b:4222", "existingSecret": "nats-relay",
                     "credsKey": "relay.creds", "caKey": "ca.crt", "tlsRequired": true},
            "logging": {"format": "text", "level": "debug,sqlx=info"},
            "billing": {"currency": "BHD", "chargeCategories": ["install", "hosting"]},
            "networkPolicy": {"egress": {"identityProvider": {"to": [{"ipBlock": {"cidr": "203.0.113.7/32"}}]}}},
        })),
    ] {
        let rendered = render(values);
        rendered.assert_valid();
        for c in rendered.all("Deployment").into_iter().flat_map(containers) {
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
        json!({"grafanaDashboard": {"enabled": true, "namespace": "monitoring"}}),
        json!({"networkPolicy": {"enabled": false}, "podDisruptionBudget": {"enabled": false}}),
        json!({"controller": {"replicas": 1}, "server": {"replicas": 3},
               "podDisruptionBudget": {"maxUnavailable": "50%"}}),
        json!({"image": {"digest": format!("sha256:{}", "a".repeat(64))}}),
        json!({"database": {"migrate": false}}),
        json!({"serviceAccount": {"create": false, "controllerName": "billing-operator",
                                  "serverName": "billing-api"}}),
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
        let deployment = rendered.deployment("server");
        let pod = &deployment["spec"]["template"]["spec"];
        let kinds = rendered.kinds();
        match &variant {
            v if v["serviceMonitor"]["enabled"] == true => {
                // No Kubernetes schema covers prometheus-operator's kinds: checked by shape.
                let monitor = rendered.one("ServiceMonitor");
                assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
                assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
                assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "30s");
                // The alerts of rules/voucher-operator.yaml, as they are (promtool and a real
                // Prometheus test that file: tests/prometheus.rs), each with its runbook section.
                let rules = rendered.one("PrometheusRule");
                let file: Value = serde_yaml::from_str(
                    &std::fs::read_to_string(chart_dir().join("rules/voucher-operator.yaml"))
                        .unwrap(),
                )
                .unwrap();
                assert_eq!(rules["spec"], file);
                let runbook = std::fs::read_to_string(repo().join("docs/runbook.md")).unwrap();
                let alerts: Vec<&Value> = file["groups"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|g| g["rules"].as_array().unwrap())
                    .collect();
                assert!(alerts.len() >= 13, "{}", alerts.len());
                for alert in alerts {
                    let name = alert["alert"].as_str().unwrap();
                    let url = alert["annotations"]["runbook_url"].as_str().unwrap();
                    assert_eq!(
                        url.rsplit_once('#').map(|(_, anchor)| anchor),
                        Some(name.to_lowercase().as_str()),
                        "{name}: {url}"
                    );
                    assert!(
                        runbook.contains(&format!("\n### {name}\n")),
                        "{name} has no runbook section"
                    );
                }
            }
            v if v["grafanaDashboard"]["enabled"] == true => {
                let dashboard = rendered.one("ConfigMap");
                assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
                assert_eq!(dashboard["metadata"]["namespace"], "monitoring");
                let json: Value = serde_json::from_str(
                    dashboard["data"]["voucher-operator.json"].as_str().unwrap(),
                )
                .unwrap();
                let file: Value = serde_json::from_str(
                    &std::fs::read_to_string(chart_dir().join("dashboards/voucher-operator.json"))
                        .unwrap(),
                )
                .unwrap();
                assert_eq!(json, file);
            }
            v if v["networkPolicy"]["enabled"] == false => {
                assert!(!kinds.contains(&"NetworkPolicy".into()));
                assert!(!kinds.contains(&"PodDisruptionBudget".into()));
            }
            v if v["controller"]["replicas"] == 1 => {
                assert_eq!(rendered.deployment("controller")["spec"]["replicas"], 1);
                assert_eq!(deployment["spec"]["replicas"], 3);
                let budgets = rendered.all("PodDisruptionBudget");
                assert_eq!(budgets.len(), 2, "one a Deployment");
                for budget in budgets {
                    assert_eq!(budget["spec"]["maxUnavailable"], "50%");
                    let selected = rendered
                        .all("Deployment")
                        .into_iter()
                        .filter(|d| d["spec"]["selector"] == budget["spec"]["selector"])
                        .count();
                    assert_eq!(selected, 1, "a pod is covered by one budget");
                }
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
                for d in rendered.all("Deployment") {
                    assert!(d["spec"]["template"]["spec"]["initContainers"].is_null());
                }
                for c in rendered.all("Deployment").into_iter().flat_map(containers) {
                    assert_eq!(env_value(c, "SKIP_MIGRATIONS"), Some("true"));
                }
            }
            v if v["serviceAccount"]["create"] == false => {
                assert!(!kinds.contains(&"ServiceAccount".into()));
                assert_eq!(pod["serviceAccountName"], "billing-api");
                assert_eq!(
                    rendered.deployment("controller")["spec"]["template"]["spec"]["serviceAccountName"],
                    "billing-operator"
                );
            }
            v if v["fullnameOverride"].is_string() => {
                assert_eq!(deployment["metadata"]["name"], "vouchers-server");
                let service = &rendered.all("Service")[0];
                assert_eq!(service["spec"]["type"], "LoadBalancer");
                assert_eq!(service["spec"]["ports"][0]["port"], 8443);
            }
            v if v["networkPolicy"]["httpFrom"].is_array() => {
                let policy = rendered
                    .all("NetworkPolicy")
                    .into_iter()
                    .find(|p| p["metadata"]["labels"]["app.kubernetes.io/component"] == "server")
                    .unwrap();
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
        (json!({"server": {"replicas": "two"}}), "/server/replicas"),
        (
            json!({"controller": {"replicas": 0}}),
            "/controller/replicas",
        ),
        (json!({"replicaCount": 3}), "replicaCount"),
        (
            json!({"controller": {"issuerNamespaces": [""]}}),
            "/controller/issuerNamespaces/0",
        ),
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
            json!({"billing": {"currency": "rial"}}),
            "/billing/currency",
        ),
        (
            json!({"billing": {"chargeCategories": ["Install"]}}),
            "/billing/chargeCategories/0",
        ),
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

    // Vouchers issued by the admin endpoints must land where the controller looks.
    let rendered = render(with(json!({
        "controller": {"watchNamespace": "billing"},
        "server": {"adminNamespace": "billing-admin"},
    })));
    assert!(
        rendered.error().contains(
            "server.adminNamespace (billing-admin) must be controller.watchNamespace (billing)"
        ),
        "{}",
        rendered.error()
    );

    // A JWKS alone would accept the tokens of any realm, for any service.
    let rendered = render(with(
        json!({"auth": {"jwksUrl": "https://keycloak.example/certs"}}),
    ));
    assert!(
        rendered
            .error()
            .contains("auth.jwksUrl needs auth.issuer and auth.audience"),
        "{}",
        rendered.error()
    );

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
    let deployment = copy.join("templates/deployment-server.yaml");
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
        .find(|o| o.object["kind"] == "Deployment" && o.source.ends_with("deployment-server.yaml"))
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
