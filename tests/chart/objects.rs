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
        // The campaigns' key namespace, kept on uninstall.
        "Namespace",
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

    // Two Deployments, each with its own ServiceAccount: the internet-facing server does not
    // carry the controller's rights.
    assert_eq!(rendered.all("Deployment").len(), 2);
    let mut accounts = BTreeSet::new();
    for (component, init) in [("controller", Some("migrate")), ("server", None)] {
        let deployment = rendered.deployment(component);
        assert_eq!(deployment["spec"]["replicas"], 2, "{component}");
        let pod = &deployment["spec"]["template"]["spec"];
        let names: Vec<&str> = pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [component], "one container a pod");
        assert_eq!(container(deployment, component)["args"], json!([component]));
        assert_eq!(
            pod["initContainers"][0]["name"].as_str(),
            init,
            "{component}: the controller's pod migrates, the server's waits for the schema"
        );
        accounts.insert(pod["serviceAccountName"].as_str().unwrap().to_owned());
        for (k, v) in deployment["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
        {
            assert_eq!(&deployment["spec"]["template"]["metadata"]["labels"][k], v);
        }
    }
    assert_eq!(
        accounts,
        BTreeSet::from([
            "vo-voucher-operator-controller".into(),
            "vo-voucher-operator-server".into()
        ])
    );
    let created: BTreeSet<String> = rendered
        .all("ServiceAccount")
        .iter()
        .map(|a| a["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(created, accounts);
    for c in rendered.all("Deployment").into_iter().flat_map(containers) {
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
    for deployment in rendered.all("Deployment") {
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
    }
    for c in rendered.all("Deployment").into_iter().flat_map(containers) {
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
        let c = rendered.container(name);
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{name}");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{name}");
        assert_eq!(c["livenessProbe"]["httpGet"]["port"], port, "{name}");
        assert_eq!(c["readinessProbe"]["httpGet"]["port"], port, "{name}");
    }
}

/// Named ports of a Deployment's containers → their numbers.
fn ports_of(deployment: &Value) -> BTreeMap<String, u64> {
    containers(deployment)
        .into_iter()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Whether `selector` (matchLabels) selects the pods of `deployment`.
fn selects(selector: &Value, deployment: &Value) -> bool {
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    selector
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| &labels[k] == v)
}

#[test]
fn the_ports_the_probes_services_and_network_policy_name_exist() {
    let rendered = render(with(json!({"serviceMonitor": {"enabled": true}})));
    let (controller, server) = (
        rendered.deployment("controller"),
        rendered.deployment("server"),
    );
    let (controller_ports, server_ports) = (ports_of(controller), ports_of(server));
    assert_eq!(controller_ports, BTreeMap::from([("metrics".into(), 9090)]));
    assert_eq!(
        server_ports,
        BTreeMap::from([
            ("http".into(), 8080),
            ("admin".into(), 8081),
            ("metrics".into(), 9091)
        ])
    );
    // The addresses the containers listen on are the ports they declare.
    assert_eq!(
        env_value(rendered.container("server"), "LISTEN_ADDRESS"),
        Some("0.0.0.0:8080")
    );
    assert_eq!(
        env_value(rendered.container("server"), "ADMIN_ADDRESS"),
        Some("0.0.0.0:8081")
    );
    assert_eq!(
        env_value(rendered.container("server"), "SERVER_METRICS_ADDRESS"),
        Some("0.0.0.0:9091")
    );
    assert_eq!(
        env_value(rendered.container("controller"), "METRICS_ADDRESS"),
        Some("0.0.0.0:9090")
    );
    // The public Service exposes the customers' port of the servers only; the admin port has its
    // own, internal one.
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
    assert!(selects(&public["spec"]["selector"], server));
    assert!(!selects(&public["spec"]["selector"], controller));
    // Every port of every Service is a port of a pod it selects.
    for service in rendered.all("Service") {
        let selected: Vec<&Value> = [controller, server]
            .into_iter()
            .filter(|d| selects(&service["spec"]["selector"], d))
            .collect();
        assert!(
            !selected.is_empty(),
            "{} selects no pod",
            service["metadata"]["name"]
        );
        for p in service["spec"]["ports"].as_array().unwrap() {
            let target = p["targetPort"].as_str().unwrap();
            assert!(
                selected.iter().any(|d| ports_of(d).contains_key(target)),
                "targetPort {target}"
            );
        }
    }
    // One NetworkPolicy per Deployment, for its ports; egress only to named destinations, and
    // no route from the server to NATS.
    for (deployment, needed, never) in [
        (controller, vec![53, 5432, 4222, 443, 6443], vec![]),
        (server, vec![53, 5432, 443, 6443], vec![4222]),
    ] {
        let policies: Vec<&Value> = rendered
            .all("NetworkPolicy")
            .into_iter()
            .filter(|p| {
                p["spec"]["podSelector"]["matchLabels"]
                    == deployment["spec"]["selector"]["matchLabels"]
            })
            .collect();
        assert_eq!(policies.len(), 1);
        let policy = policies[0];
        let ports = ports_of(deployment);
        for rule in policy["spec"]["ingress"].as_array().unwrap() {
            for p in rule["ports"].as_array().unwrap() {
                let port = p["port"].as_str().unwrap();
                assert!(ports.contains_key(port), "NetworkPolicy port {port}");
            }
        }
        let rules = policy["spec"]["egress"].as_array().unwrap();
        let egress_ports: BTreeSet<u64> = rules
            .iter()
            .flat_map(|r| r["ports"].as_array().unwrap())
            .map(|p| p["port"].as_u64().unwrap())
            .collect();
        assert_eq!(
            egress_ports,
            needed.into_iter().collect(),
            "{}",
            policy["metadata"]["name"]
        );
        assert!(never.iter().all(|p| !egress_ports.contains(p)));
        for rule in rules {
            let dns = rule["ports"][0]["port"] == 53;
            assert!(
                dns || rule["to"].as_array().is_some_and(|to| !to.is_empty()),
                "egress only to named destinations: {rule}"
            );
        }
    }
    let monitor = rendered.one("ServiceMonitor");
    let metrics_service = rendered
        .all("Service")
        .into_iter()
        .find(|s| s["metadata"]["labels"]["app.kubernetes.io/component"] == "metrics")
        .expect("a metrics Service");
    assert!(selects(&metrics_service["spec"]["selector"], controller));
    assert!(selects(&metrics_service["spec"]["selector"], server));
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
    // Scraping reaches the metrics ports alone, never the server's admin endpoints.
    assert_eq!(scraped, ["metrics"]);
    assert_eq!(service_ports, ["metrics"]);
}

#[test]
fn the_admin_port_is_open_only_to_the_admin_page() {
    let ingress_of = |rendered: &Rendered| {
        let policy = rendered
            .all("NetworkPolicy")
            .into_iter()
            .find(|p| p["metadata"]["labels"]["app.kubernetes.io/component"] == "server")
            .unwrap()
            .clone();
        policy["spec"]["ingress"].as_array().unwrap().clone()
    };
    let reaching = |ingress: &[Value], port: &str| -> Vec<Value> {
        ingress
            .iter()
            .filter(|r| r["ports"][0]["port"] == port)
            .cloned()
            .collect()
    };
    // By default no one: the monitoring namespace reaches the metrics port, nothing else.
    let ingress = ingress_of(&render(required()));
    assert!(reaching(&ingress, "admin").is_empty(), "{ingress:?}");
    assert_eq!(
        reaching(&ingress, "metrics")[0]["from"],
        json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}])
    );
    let page =
        json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "billing"}}}]);
    let ingress = ingress_of(&render(with(
        json!({"networkPolicy": {"adminFrom": page.clone()}}),
    )));
    assert_eq!(reaching(&ingress, "admin")[0]["from"], page);
}

#[test]
fn egress_goes_only_to_destinations_the_values_name() {
    for (unset, key) in [
        (
            json!({"database": {"to": []}}),
            "networkPolicy.egress.database.to",
        ),
        (
            json!({"kubernetesApi": {"to": []}}),
            "networkPolicy.egress.kubernetesApi.to",
        ),
        (json!({"nats": {"to": []}}), "networkPolicy.egress.nats.to"),
        (json!({"dns": {"to": []}}), "networkPolicy.egress.dns.to"),
    ] {
        let rendered = render(with(json!({"networkPolicy": {"egress": unset}})));
        assert!(
            rendered.error().contains(&format!("set {key}")),
            "{key}: {}",
            rendered.error()
        );
    }
    // Without the relay, NATS is not needed (and not reachable).
    let rendered = render(with(
        json!({"audit": {"relay": false}, "networkPolicy": {"egress": {"nats": {"to": []}}}}),
    ));
    rendered.assert_valid();
    for policy in rendered.all("NetworkPolicy") {
        assert!(
            !policy["spec"]["egress"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["ports"][0]["port"] == 4222)
        );
    }
    // A JWKS needs its identity provider named; the server alone may reach it.
    let jwks = json!({"auth": {"jwksUrl": "https://keycloak.example/certs",
                               "issuer": "https://keycloak.example", "audience": "billing"}});
    let rendered = render(with(jwks.clone()));
    assert!(
        rendered
            .error()
            .contains("set networkPolicy.egress.identityProvider.to"),
        "{}",
        rendered.error()
    );
    let mut values = with(jwks);
    merge(
        &mut values,
        json!({"networkPolicy": {"egress": {"identityProvider": {"to": [{"ipBlock": {"cidr": "203.0.113.7/32"}}]}}}}),
    );
    let rendered = render(values);
    rendered.assert_valid();
    let reaches_idp = |component: &str| {
        rendered.all("NetworkPolicy").into_iter().any(|p| {
            p["metadata"]["labels"]["app.kubernetes.io/component"] == component
                && p["spec"]["egress"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["to"][0]["ipBlock"]["cidr"] == "203.0.113.7/32")
        })
    };
    assert!(reaches_idp("server"));
    assert!(!reaches_idp("controller"));
}

#[test]
fn dns_goes_only_to_the_clusters_resolver() {
    let rendered = render(required());
    for policy in rendered.all("NetworkPolicy") {
        let dns: Vec<&Value> = policy["spec"]["egress"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["ports"][0]["port"] == 53)
            .collect();
        assert_eq!(dns.len(), 1, "{policy}");
        assert_eq!(
            dns[0]["to"],
            json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]),
            "port 53 to any address would carry data out"
        );
    }
}

#[test]
fn the_controller_reads_secrets_in_the_key_namespace_only() {
    let rendered = render(required());
    let secrets: BTreeSet<String> = grants(&rendered)
        .into_iter()
        .filter(|(_, _, _, resource, _)| resource == "secrets")
        .map(|(kind, ns, _, _, verb)| format!("{kind}/{ns} {verb}"))
        .collect();
    assert_eq!(
        secrets,
        BTreeSet::from(["Role/voucher-campaign-keys get".to_owned()]),
        "no Secret of the release namespace ({NAMESPACE}), which holds the signing secret"
    );
    assert_eq!(
        env_value(rendered.container("controller"), "CAMPAIGN_KEY_NAMESPACE"),
        Some("voucher-campaign-keys")
    );
    let namespace = &rendered.all("Namespace")[0];
    assert_eq!(namespace["metadata"]["name"], "voucher-campaign-keys");
    assert_eq!(
        namespace["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "the keys derive every code: an uninstall keeps them"
    );
    // Values that would grant the operator's own Secrets are refused.
    for (values, what) in [
        (
            json!({"controller": {"campaignKeyNamespace": NAMESPACE}}),
            "the release namespace",
        ),
        // The release namespace even when the admin namespace is another: each half of the
        // rule refuses on its own.
        (
            json!({"controller": {"campaignKeyNamespace": NAMESPACE},
                   "server": {"adminNamespace": "billing"}}),
            "the release namespace, the admin namespace elsewhere",
        ),
        (
            json!({"controller": {"campaignKeyNamespace": "billing"},
                   "server": {"adminNamespace": "billing"}}),
            "the admin namespace",
        ),
    ] {
        let rendered = render(with(values));
        assert!(
            rendered.error().contains("controller.campaignKeyNamespace")
                && rendered.error().contains("must be a namespace of its own"),
            "{what}: {}",
            rendered.error()
        );
    }
    let rendered = render(with(
        json!({"controller": {"createCampaignKeyNamespace": false}}),
    ));
    rendered.assert_valid();
    assert!(rendered.all("Namespace").is_empty());
}

#[test]
fn secrets_are_read_from_existing_secrets() {
    let rendered = render(with(json!({
        "database": {"existingSecret": "pg-url", "urlKey": "dsn"},
        "auth": {"existingSecret": "tokens", "hs256SecretKey": "hs256"},
    })));
    rendered.assert_valid();
    for c in rendered.all("Deployment").into_iter().flat_map(containers) {
        let url = env(c, "DATABASE_URL").expect("DATABASE_URL");
        assert_eq!(
            url["valueFrom"]["secretKeyRef"],
            json!({"name": "pg-url", "key": "dsn"})
        );
    }
    let server = rendered.container("server");
    assert_eq!(
        env(server, "JWT_HS256_SECRET").unwrap()["valueFrom"]["secretKeyRef"],
        json!({"name": "tokens", "key": "hs256"})
    );
    assert!(
        env(rendered.container("controller"), "JWT_HS256_SECRET").is_none(),
        "only the server verifies tokens"
    );

    // JWKS only: no shared secret at all.
    let mut values = required();
    merge(
        &mut values,
        json!({
            "auth": {"existingSecret": "", "jwksUrl": "https://keycloak.example/realms/catalyst/protocol/openid-connect/certs",
                     "issuer": "https://keycloak.example/realms/catalyst", "audience": "billing"},
            "networkPolicy": {"egress": {"identityProvider": {"to": [{"ipBlock": {"cidr": "203.0.113.7/32"}}]}}},
        }),
    );
    let rendered = render(values);
    rendered.assert_valid();
    let server = rendered.container("server");
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
        // The controller, cluster-wide: Vouchers and their status, Events.
        "ClusterRole/ catalyst.openova.io vouchers get",
        "ClusterRole/ catalyst.openova.io vouchers list",
        "ClusterRole/ catalyst.openova.io vouchers watch",
        "ClusterRole/ catalyst.openova.io vouchers patch",
        "ClusterRole/ catalyst.openova.io vouchers/status patch",
        // The same for VoucherCampaigns, which nothing gets by name.
        "ClusterRole/ catalyst.openova.io vouchercampaigns list",
        "ClusterRole/ catalyst.openova.io vouchercampaigns watch",
        "ClusterRole/ catalyst.openova.io vouchercampaigns patch",
        "ClusterRole/ catalyst.openova.io vouchercampaigns/status patch",
        "ClusterRole/ events.k8s.io events create",
        "ClusterRole/ events.k8s.io events patch",
        // Whether the Voucher or VoucherCampaign CRD is being deleted (by name, below).
        "ClusterRole/ apiextensions.k8s.io customresourcedefinitions get",
        // Leader election, in the release namespace.
        "Role/catalyst coordination.k8s.io leases create",
        "Role/catalyst coordination.k8s.io leases get",
        "Role/catalyst coordination.k8s.io leases patch",
        // The server's issue endpoint, in the admin namespace, and its revoke endpoint in
        // the issuer namespaces (by default the admin namespace).
        "Role/catalyst catalyst.openova.io vouchers create",
        "Role/catalyst catalyst.openova.io vouchers patch",
        "Role/catalyst catalyst.openova.io vouchers get",
        "Role/catalyst catalyst.openova.io vouchers delete",
        // A campaign's generator key, in the key namespace only (never the release namespace).
        "Role/voucher-campaign-keys  secrets get",
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
        env_value(rendered.container("controller"), "LEASE_NAME"),
        Some("vo-voucher-operator")
    );

    // Every binding names a rendered role and the ServiceAccount of the one Deployment that
    // uses it: the server's account holds the admin endpoints' rights and nothing else.
    let account = |component: &str| {
        rendered.deployment(component)["spec"]["template"]["spec"]["serviceAccountName"].clone()
    };
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
        let name = binding["metadata"]["name"].as_str().unwrap();
        let component = if name.contains("-admin-") {
            "server"
        } else {
            "controller"
        };
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": account(component), "namespace": NAMESPACE}]),
            "{name}"
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
    assert_eq!(
        url_of(rendered.container("migrate")),
        url_of(rendered.container("server")),
        "one URL by default"
    );

    let rendered = render(with(
        json!({"database": {"migrationSecret": "billing-db-owner"}}),
    ));
    rendered.assert_valid();
    assert_eq!(
        url_of(rendered.container("migrate")),
        json!({"name": "billing-db-owner", "key": "url"})
    );
    for name in ["controller", "server"] {
        assert_eq!(
            url_of(rendered.container(name))["name"],
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
    // Cluster-wide, only: get of the two CRDs themselves, by name.
    let cluster_wide = rendered.all("ClusterRole");
    assert_eq!(cluster_wide.len(), 1);
    assert_eq!(
        cluster_wide[0]["rules"],
        json!([{"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
                "resourceNames": ["vouchers.catalyst.openova.io", "vouchercampaigns.catalyst.openova.io"],
                "verbs": ["get"]}])
    );
    assert_eq!(rendered.all("ClusterRoleBinding").len(), 1);
    let namespaces: BTreeSet<String> = grants(&rendered)
        .into_iter()
        .map(|(_, ns, g, r, _)| format!("{ns} {g} {r}"))
        .collect();
    let expected: BTreeSet<String> = [
        " apiextensions.k8s.io customresourcedefinitions",
        "billing catalyst.openova.io vouchers",
        "billing catalyst.openova.io vouchers/status",
        "billing catalyst.openova.io vouchercampaigns",
        "billing catalyst.openova.io vouchercampaigns/status",
        "billing events.k8s.io events",
        "voucher-campaign-keys  secrets",
        "catalyst coordination.k8s.io leases",
    ]
    .map(String::from)
    .into();
    assert_eq!(namespaces, expected);
    assert_eq!(
        env_value(rendered.container("controller"), "WATCH_NAMESPACE"),
        Some("billing")
    );
    assert_eq!(
        env_value(rendered.container("server"), "ADMIN_NAMESPACE"),
        Some("billing"),
        "the admin endpoints create Vouchers where the controller looks"
    );
}

#[test]
fn the_server_may_delete_vouchers_only_in_the_issuer_namespaces() {
    let rendered = render(with(json!({
        "controller": {"issuerNamespaces": ["billing", "partners"]},
        "server": {"adminNamespace": "billing"},
    })));
    rendered.assert_valid();
    let server_account =
        rendered.deployment("server")["spec"]["template"]["spec"]["serviceAccountName"].clone();
    let mut server_rights = BTreeSet::new();
    for binding in rendered
        .all("RoleBinding")
        .into_iter()
        .chain(rendered.all("ClusterRoleBinding"))
        .filter(|b| b["subjects"][0]["name"] == server_account)
    {
        assert_eq!(binding["kind"], "RoleBinding", "nothing cluster-wide");
        let role = rendered
            .all("Role")
            .into_iter()
            .find(|r| {
                r["metadata"]["name"] == binding["roleRef"]["name"]
                    && r["metadata"]["namespace"] == binding["metadata"]["namespace"]
            })
            .unwrap();
        for rule in role["rules"].as_array().unwrap() {
            for verb in rule["verbs"].as_array().unwrap() {
                server_rights.insert(format!(
                    "{} {} {}",
                    role["metadata"]["namespace"].as_str().unwrap(),
                    rule["resources"][0].as_str().unwrap(),
                    verb.as_str().unwrap()
                ));
            }
        }
    }
    let expected: BTreeSet<String> = [
        "billing vouchers create",
        "billing vouchers patch",
        "billing vouchers get",
        "billing vouchers delete",
        "partners vouchers get",
        "partners vouchers delete",
    ]
    .map(String::from)
    .into();
    assert_eq!(server_rights, expected);
}

/// A Sovereign joined to the hub with the vendor's claim key: the server claims customers of
/// once-per-customer-anywhere vouchers over NATS (its Sovereign, the key as a file, the NATS
/// settings, and a route to NATS); without the key it has neither the key nor a route to NATS.
#[test]
fn the_server_joins_the_hubs_claims_only_with_the_claim_key() {
    let joined = json!({"federation": {"sovereign": "oman",
        "claimKey": {"existingSecret": "vendor-claims", "key": "claim-key"}}});
    let rendered = render(with(joined));
    rendered.assert_valid();
    let server = rendered.container("server");
    assert_eq!(env_value(server, "SOVEREIGN"), Some("oman"));
    assert_eq!(
        env_value(server, "CLAIM_KEY_FILE"),
        Some("/etc/voucher-operator/claims/claim-key")
    );
    assert!(env_value(server, "NATS_URL").is_some());
    let pod = &rendered.deployment("server")["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "claim-key")
        .expect("the claim key's volume");
    assert_eq!(volume["secret"]["secretName"], "vendor-claims");
    let reaches_nats = |rendered: &Rendered| {
        rendered
            .all("NetworkPolicy")
            .into_iter()
            .filter(|p| p["metadata"]["name"] == format!("{RELEASE}-voucher-operator-server"))
            .flat_map(|p| p["spec"]["egress"].as_array().unwrap().clone())
            .any(|r| r["ports"][0]["port"] == 4222)
    };
    assert!(reaches_nats(&rendered), "the server's route to NATS");
    // Its own NATS user (the leaf's `server`, which may only claim), when given.
    let own = render(with(json!({"federation": {"sovereign": "oman",
        "claimKey": {"existingSecret": "vendor-claims", "serverNatsSecret": "server-nats"}}})));
    own.assert_valid();
    let server = own.container("server");
    let user = env(server, "NATS_USER").expect("the server's NATS user");
    assert_eq!(user["valueFrom"]["secretKeyRef"]["name"], "server-nats");
    let without_key = render(with(json!({"federation": {"sovereign": "oman"}})));
    without_key.assert_valid();
    let server = without_key.container("server");
    assert_eq!(env_value(server, "CLAIM_KEY_FILE"), None);
    assert_eq!(env_value(server, "NATS_URL"), None);
    assert!(
        !reaches_nats(&without_key),
        "no route to NATS without claims"
    );
}

/// docs/deploy.md's RBAC table names exactly what the chart grants: each `resource`: verbs of its
/// last column, against the rendered Roles and ClusterRoles.
#[test]
fn the_deploy_guides_rbac_table_is_what_the_chart_grants() {
    let guide = std::fs::read_to_string(repo().join("docs/deploy.md")).unwrap();
    let table = guide
        .split("| who | where | what |\n|---|---|---|\n")
        .nth(1)
        .expect("the RBAC table")
        .split("\n\n")
        .next()
        .unwrap();
    let mut documented = BTreeSet::new();
    for row in table.lines() {
        let what = row.trim_end_matches('|').rsplit(" | ").next().unwrap();
        // Without its remarks (in parentheses): `resource`: verb, verb; `resource`: verb …
        let mut bare = String::new();
        let mut depth = 0;
        for c in what.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ if depth == 0 => bare.push(c),
                _ => {}
            }
        }
        for part in bare.split(';') {
            let resource = part.split('`').nth(1).expect("a `resource`");
            let after = &part[part.find(resource).unwrap() + resource.len()..];
            let verbs = &after[after.find(':').expect("resource: verbs") + 1..];
            for verb in verbs.split(',') {
                documented.insert(format!("{resource} {}", verb.trim()));
            }
        }
    }
    let rendered = render(required());
    let granted: BTreeSet<String> = grants(&rendered)
        .iter()
        .map(|(_, _, _, resource, verb)| format!("{resource} {verb}"))
        .collect();
    assert_eq!(
        documented, granted,
        "docs/deploy.md's RBAC table against the chart"
    );
}

/// With `database.caSecret`, every container that opens the database (the migration, the
/// controller, the server) connects with `sslmode=verify-full` against that CA, mounted where
/// `PGSSLROOTCERT` says; without it, none is told to (the URL decides).
#[test]
fn a_database_ca_is_mounted_and_verified_by_every_container_that_opens_the_database() {
    for ca in [Some("billing-ca"), None] {
        let values = match ca {
            Some(name) => with(json!({"database": {"caSecret": name, "caKey": "tls.ca"}})),
            None => required(),
        };
        let rendered = render(values);
        rendered.assert_valid();
        let mut opening = Vec::new();
        for deployment in rendered.all("Deployment") {
            let spec = &deployment["spec"]["template"]["spec"];
            let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
            let containers = ["initContainers", "containers"]
                .iter()
                .flat_map(|list| spec[list].as_array().cloned().unwrap_or_default());
            for container in containers {
                let env = container["env"].as_array().cloned().unwrap_or_default();
                let var = |name: &str| env.iter().find(|e| e["name"] == name).cloned();
                if var("DATABASE_URL").is_none() {
                    continue;
                }
                let name = container["name"].as_str().unwrap().to_owned();
                let mode = var("PGSSLMODE").map(|e| e["value"].clone());
                let root = var("PGSSLROOTCERT").map(|e| e["value"].as_str().unwrap().to_owned());
                let Some(secret) = ca else {
                    assert_eq!((mode, root), (None, None), "{name}: the URL decides");
                    opening.push(name);
                    continue;
                };
                assert_eq!(mode, Some(json!("verify-full")), "{name}");
                let root = root.unwrap_or_else(|| panic!("{name}: PGSSLROOTCERT"));
                let (dir, file) = root.rsplit_once('/').unwrap();
                let mount = container["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|m| m["mountPath"] == dir)
                    .unwrap_or_else(|| panic!("{name}: nothing mounted at {dir}"));
                let volume = volumes
                    .iter()
                    .find(|v| v["name"] == mount["name"])
                    .unwrap_or_else(|| panic!("{name}: no volume {}", mount["name"]));
                assert_eq!(volume["secret"]["secretName"], secret, "{name}");
                assert_eq!(
                    volume["secret"]["items"],
                    json!([{"key": "tls.ca", "path": file}]),
                    "{name}: the CA's key, as the file PGSSLROOTCERT names"
                );
                opening.push(name);
            }
        }
        assert_eq!(opening, ["migrate", "controller", "server"], "{ca:?}");
    }
}
