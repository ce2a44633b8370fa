//! What the chart renders: the objects, their security, ports, secrets and RBAC.

use std::collections::BTreeSet;

use super::*;

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
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    .map(String::from)
    .into();
    assert_eq!(kinds, expected);
    assert!(
        rendered.all("ServiceMonitor").is_empty() && rendered.all("PrometheusRule").is_empty(),
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
    // Without trusted proxies, everyone behind an ingress shares one budget: said loudly.
    assert!(
        rendered
            .notes
            .contains("WARNING: server.trustedProxies is empty")
    );
    let behind = render(with(json!({"server": {"trustedProxies": ["10.0.0.0/8"]}})));
    assert!(!behind.notes.contains("WARNING"), "{}", behind.notes);
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
    // The server is probed on its admin port: a flood of the public one must not fail it.
    for (name, port) in [("controller", "metrics"), ("server", "admin")] {
        let c = container(deployment, name);
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{name}");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{name}");
        assert_eq!(c["livenessProbe"]["httpGet"]["port"], port, "{name}");
        assert_eq!(c["readinessProbe"]["httpGet"]["port"], port, "{name}");
    }
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
    assert_eq!(ports["admin"], 8081);
    assert_eq!(ports["metrics"], 9090);
    // The addresses the containers listen on are the ports they declare.
    assert_eq!(
        env_value(container(deployment, "server"), "LISTEN_ADDRESS"),
        Some("0.0.0.0:8080")
    );
    assert_eq!(
        env_value(container(deployment, "server"), "ADMIN_ADDRESS"),
        Some("0.0.0.0:8081")
    );
    assert_eq!(
        env_value(container(deployment, "controller"), "METRICS_ADDRESS"),
        Some("0.0.0.0:9090")
    );
    // The public Service exposes the customers' port only; the admin port has its own, internal one.
    let public = rendered
        .all("Service")
        .into_iter()
        .find(|s| s["metadata"]["labels"]["app.kubernetes.io/component"].is_null())
        .expect("the public Service");
    let exposed: Vec<&str> = public["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["targetPort"].as_str().unwrap())
        .collect();
    assert_eq!(exposed, ["http"]);
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
    assert_eq!(scraped, ["metrics", "admin"]);
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
        // The controller, cluster-wide: Vouchers and their status, Events; and the
        // revoke endpoint's delete, wherever the Voucher of a code is.
        "ClusterRole/ catalyst.openova.io vouchers get",
        "ClusterRole/ catalyst.openova.io vouchers list",
        "ClusterRole/ catalyst.openova.io vouchers watch",
        "ClusterRole/ catalyst.openova.io vouchers patch",
        "ClusterRole/ catalyst.openova.io vouchers delete",
        "ClusterRole/ catalyst.openova.io vouchers/status patch",
        "ClusterRole/ events.k8s.io events create",
        "ClusterRole/ events.k8s.io events patch",
        // Leader election, in the release namespace.
        "Role/catalyst coordination.k8s.io leases create",
        "Role/catalyst coordination.k8s.io leases get",
        "Role/catalyst coordination.k8s.io leases patch",
        // The issue endpoint, in the admin namespace.
        "Role/catalyst catalyst.openova.io vouchers create",
        "Role/catalyst catalyst.openova.io vouchers patch",
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
fn the_migration_may_run_with_the_schema_owner_and_the_containers_without() {
    let url_of = |c: &Value| env(c, "DATABASE_URL").unwrap()["valueFrom"]["secretKeyRef"].clone();
    let rendered = render(required());
    let deployment = rendered.one("Deployment");
    let init = &deployment["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(
        url_of(init),
        url_of(container(deployment, "server")),
        "one URL by default"
    );

    let rendered = render(with(
        json!({"database": {"migrationSecret": "billing-db-owner"}}),
    ));
    rendered.assert_valid();
    let deployment = rendered.one("Deployment");
    let init = &deployment["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(
        url_of(init),
        json!({"name": "billing-db-owner", "key": "url"})
    );
    for name in ["controller", "server"] {
        assert_eq!(
            url_of(container(deployment, name))["name"],
            required()["database"]["existingSecret"],
            "{name} runs with the runtime role"
        );
    }
}

#[test]
fn one_watched_namespace_needs_nothing_cluster_wide() {
    let rendered = render(with(json!({
        "controller": {"watchNamespace": "billing"},
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
        "billing events.k8s.io events",
        "catalyst coordination.k8s.io leases",
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
        Some("billing"),
        "the admin endpoints create Vouchers where the controller looks"
    );
}
