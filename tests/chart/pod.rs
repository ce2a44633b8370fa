//! The pods the chart renders (the controller's and the server's), run: each container's args and
//! environment exactly as rendered, with a cleared environment, against real Postgres, a real
//! nats-server and the real Kubernetes API server, each as its Deployment's ServiceAccount with
//! the chart's RBAC applied. Only what a cluster supplies is filled in: Secret values, the
//! downward API, loopback ports for the declared container ports, and KUBECONFIG (with the
//! ServiceAccount's token from the TokenRequest API) in place of the in-cluster token mount.
//!
//! Least privilege is checked both ways from the API server's audit log, for each ServiceAccount:
//! nothing its pod does is refused, and every rule the chart grants it was used (an unused grant
//! fails the test: remove it, or exercise it here).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use k8s_openapi::api::coordination::v1::Lease;

use super::*;

const JWT_SECRET: &str = "chart-pod-test-secret-of-32-bytes-at-least";
const POD_NAME: &str = "vo-voucher-operator-7d9c-abcde";

struct Pod {
    dir: tempfile::TempDir,
    namespace: String,
    /// ServiceAccount name → a kubeconfig with its token.
    kubeconfigs: BTreeMap<String, std::path::PathBuf>,
    database: String,
    /// Declared container port → the loopback port standing in for it.
    ports: BTreeMap<u64, u16>,
}

impl Pod {
    /// The container's command line and environment, as the kubelet would start it in a pod of
    /// `deployment`.
    fn command(&self, deployment: &Value, container: &Value) -> Command {
        let account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_voucher-operator"));
        cmd.env_clear()
            .env("KUBECONFIG", &self.kubeconfigs[account]);
        for arg in container["args"].as_array().unwrap() {
            cmd.arg(arg.as_str().unwrap());
        }
        for variable in container["env"].as_array().unwrap() {
            let name = variable["name"].as_str().unwrap();
            let value = match (&variable["value"], &variable["valueFrom"]) {
                (Value::String(v), _) => self.loopback(v),
                (_, from) if from["secretKeyRef"]["name"] == "billing-db" => self.database.clone(),
                (_, from) if from["secretKeyRef"]["name"] == "billing-jwt" => JWT_SECRET.into(),
                (_, from) if from["fieldRef"]["fieldPath"] == "metadata.namespace" => {
                    self.namespace.clone()
                }
                (_, from) if from["fieldRef"]["fieldPath"] == "metadata.name" => POD_NAME.into(),
                (_, from) => panic!("{name}: nothing supplies {from}"),
            };
            cmd.env(name, value);
        }
        let log = std::fs::File::create(self.log_path(container)).unwrap();
        cmd.stdout(Stdio::null()).stderr(log);
        cmd
    }

    /// A listen address on a declared container port becomes a free loopback port.
    fn loopback(&self, value: &str) -> String {
        match value
            .strip_prefix("0.0.0.0:")
            .and_then(|p| p.parse::<u64>().ok())
        {
            Some(port) => format!("127.0.0.1:{}", self.ports[&port]),
            None => value.to_owned(),
        }
    }

    fn log_path(&self, container: &Value) -> std::path::PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", container["name"].as_str().unwrap()))
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "log") {
                all += &format!("--- {}\n", path.display());
                all += &std::fs::read_to_string(&path).unwrap_or_default();
            }
        }
        all
    }

    /// The loopback port behind a container's named port (what a probe names).
    fn port(&self, container: &Value, name: &str) -> u16 {
        let declared = container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["containerPort"]
            .as_u64()
            .unwrap();
        self.ports[&declared]
    }
}

/// The running containers; killed if the test fails before it stops them.
struct Containers(Vec<Child>);

impl Drop for Containers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn wait_for(what: &str, pod: &Pod, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen\n{}",
            pod.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM, as the kubelet sends at the end of a pod; waits without blocking the test's runtime.
async fn stop(child: &mut Child, pod: &Pod) -> std::process::ExitStatus {
    voucher_testenv::supervisor::signal(child.id(), voucher_testenv::supervisor::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "no exit after SIGTERM\n{}",
            pod.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_rendered_pod_migrates_leads_serves_and_stops_under_its_cluster_wide_rbac() {
    run_rendered_pod(NAMESPACE, json!({})).await;
}

#[tokio::test]
async fn the_rendered_pod_watching_one_namespace_needs_only_that_namespace() {
    run_rendered_pod(
        "catalyst-ops",
        json!({"controller": {"watchNamespace": "billing-vouchers"}}),
    )
    .await;
}

/// Installs the release's RBAC in `namespace` as Helm would, then runs the pod there. One pod at
/// a time: a controller watching every namespace would also reconcile the other pod's Vouchers
/// (into its own database), as two installations in one cluster would.
async fn run_rendered_pod(namespace: &str, values: Value) {
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    let stream = format!("CHART_POD_{}", namespace.replace('-', "_").to_uppercase());
    let prefix = format!("chartpod.{namespace}");
    let mut values = with(values);
    merge(
        &mut values,
        json!({
            // A server list, as a cluster's NATS is usually given (here the same server twice).
            "nats": {"url": format!("{0},{0}", support::nats().url)},
            "audit": {"stream": stream, "subjectPrefix": prefix},
            // Each run's campaign keys apart (the Secret below is created in it).
            "controller": {"campaignKeyNamespace": format!("{namespace}-keys")},
        }),
    );
    let rendered = render_in(namespace, values);
    rendered.assert_valid();
    let (controller_pod, server_pod) = (
        rendered.deployment("controller"),
        rendered.deployment("server"),
    );
    let spec = &controller_pod["spec"]["template"]["spec"];
    let cluster = support::cluster::cluster();
    let client = cluster.client().await;
    let dir = tempfile::tempdir().unwrap();

    // The release's namespace and every namespace its RBAC names exist before the release does;
    // then its ServiceAccount, (Cluster)Roles and bindings are applied as rendered.
    // The admission policy too: the admin issue must pass it.
    let mut rbac = rendered.of_kinds(&[
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ]);
    rbac.extend(rendered.of_kinds(&ADMISSION));
    let mut namespaces: Vec<String> = rbac
        .iter()
        .filter_map(|o| o["metadata"]["namespace"].as_str().map(str::to_owned))
        .collect();
    namespaces.push(namespace.to_owned());
    namespaces.sort();
    namespaces.dedup();
    for ns in &namespaces {
        let _ = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
            .create(
                &Default::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
            )
            .await;
    }
    let admin = cluster.kubeconfig(dir.path(), namespace);
    let _policy = match apply_as_admin(&admin, rbac).await {
        Ok(guard) => guard,
        Err(refused) => panic!("kubectl apply of the chart's RBAC: {refused}"),
    };
    let accounts: Vec<String> = [controller_pod, server_pod]
        .iter()
        .map(|d| {
            d["spec"]["template"]["spec"]["serviceAccountName"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let kubeconfigs = accounts
        .iter()
        .map(|a| {
            (
                a.clone(),
                cluster.service_account_kubeconfig(dir.path(), namespace, a),
            )
        })
        .collect();

    let pod = Pod {
        kubeconfigs,
        namespace: namespace.to_owned(),
        database: support::fresh_database("chartpod").await,
        ports: [controller_pod, server_pod]
            .into_iter()
            .flat_map(containers)
            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
            .map(|p| (p["containerPort"].as_u64().unwrap(), support::free_port()))
            .collect(),
        dir,
    };

    let controller = container(controller_pod, "controller");
    let server = container(server_pod, "server");
    // The server's pod has no migration of its own: on an empty database it is not ready (its
    // readiness says the schema is missing), and turns ready once the controller's pod migrated.
    let mut running = Containers(vec![pod.command(server_pod, server).spawn().unwrap()]);
    let readiness = |c: &Value| {
        let probe = &c["readinessProbe"]["httpGet"];
        (
            pod.port(c, probe["port"].as_str().unwrap()),
            probe["path"].as_str().unwrap().to_owned(),
        )
    };
    let (port, path) = readiness(server);
    wait_for("the server's readiness to answer", &pod, async || {
        support::http_get(port, &path)
            .await
            .starts_with("HTTP/1.0 503")
    })
    .await;
    assert!(
        support::http_get(port, &path)
            .await
            .contains("voucher-operator migrate"),
        "the server says what it waits for"
    );

    // The init container migrates the empty billing database, then exits.
    let migrate = &spec["initContainers"][0];
    let status = pod.command(controller_pod, migrate).status().unwrap();
    assert!(status.success(), "migrate: {}", pod.logs());
    running
        .0
        .push(pod.command(controller_pod, controller).spawn().unwrap());

    // Both readiness probes pass, at the paths and ports the chart gives the kubelet.
    for c in [controller, server] {
        let probe = &c["readinessProbe"]["httpGet"];
        let port = pod.port(c, probe["port"].as_str().unwrap());
        let path = probe["path"].as_str().unwrap().to_owned();
        wait_for(&format!("{} ready", c["name"]), &pod, async || {
            support::http_get(port, &path)
                .await
                .starts_with("HTTP/1.0 200")
        })
        .await;
    }

    // The controller leads through the Lease the chart named, in the pod's namespace.
    let lease_name = env_value(controller, "LEASE_NAME").unwrap().to_owned();
    let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), namespace);
    wait_for("the Lease", &pod, async || {
        leases
            .get_opt(&lease_name)
            .await
            .unwrap()
            .and_then(|l| l.spec?.holder_identity)
            .as_deref()
            == Some(POD_NAME)
    })
    .await;

    // An admin issues a code through the server (token from the chart's Secret, Voucher in the
    // chart's admin namespace); the controller reconciles it; the public preview finds it.
    let admin_namespace = env_value(server, "ADMIN_NAMESPACE").unwrap().to_owned();
    let http = format!("http://127.0.0.1:{}", pod.port(server, "http"));
    let admin_port = format!("http://127.0.0.1:{}", pod.port(server, "admin"));
    let now = chrono::Utc::now().timestamp();
    let admin_token = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "root", "role": "superadmin", "exp": now + 300, "iat": now}),
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();
    let web = reqwest::Client::new();
    let issued = web
        .post(format!("{admin_port}/billing/vouchers/issue"))
        .bearer_auth(&admin_token)
        .json(
            &json!({"code": "CHART-POD-25", "credit_omr": 25, "description": "chart pod",
                      "max_redemptions": 10}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(issued.status(), 200, "{}", pod.logs());
    let vouchers: kube::Api<voucher_operator::api::Voucher> =
        kube::Api::namespaced(client.clone(), &admin_namespace);
    assert_eq!(
        vouchers
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    wait_for("the preview", &pod, async || {
        web.post(format!("{http}/billing/vouchers/redeem-preview"))
            .json(&json!({"code": "chart-pod-25"}))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;

    // Two out-of-band edits of the row: each is reverted and reported, the second as a repeat
    // of the first Event (the Event's series is patched).
    let database = support::pool(&pod.database).await;
    for credit in [999, 998] {
        sqlx::query("UPDATE promo_codes SET credit_omr = $1 WHERE code = 'CHART-POD-25'")
            .bind(credit)
            .execute(&database)
            .await
            .unwrap();
        wait_for("the edit reverted", &pod, async || {
            sqlx::query_scalar::<_, i32>(
                "SELECT credit_omr FROM promo_codes WHERE code = 'CHART-POD-25'",
            )
            .fetch_one(&database)
            .await
            .unwrap()
                == 25
        })
        .await;
    }

    // A second Voucher claiming the same code is a Conflict (the controller first looks up
    // whether the owner still exists) and changes nothing; deleted, it leaves the code alone.
    let copy: voucher_operator::api::Voucher = serde_json::from_value(json!({
        "apiVersion": "catalyst.openova.io/v1alpha1", "kind": "Voucher",
        "metadata": {"name": "chart-pod-25-copy"},
        "spec": {"code": "CHART-POD-25", "creditOMR": 500},
    }))
    .unwrap();
    vouchers.create(&Default::default(), &copy).await.unwrap();
    wait_for("the copy in Conflict", &pod, async || {
        vouchers
            .get("chart-pod-25-copy")
            .await
            .unwrap()
            .status
            .and_then(|s| s.phase)
            == Some(voucher_operator::domain::Phase::Conflict)
    })
    .await;
    vouchers
        .delete("chart-pod-25-copy", &Default::default())
        .await
        .unwrap();
    wait_for("the copy gone", &pod, async || {
        vouchers
            .get_opt("chart-pod-25-copy")
            .await
            .unwrap()
            .is_none()
    })
    .await;

    // Not on the public port, which a public Service exposes.
    let public = web
        .delete(format!("{http}/billing/vouchers/revoke/CHART-POD-25"))
        .bearer_auth(&admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404, "the admin endpoints are not public");
    // The admin revoke deletes the Voucher and revokes the row.
    let revoked = web
        .delete(format!("{admin_port}/billing/vouchers/revoke/CHART-POD-25"))
        .bearer_auth(&admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200, "{}", pod.logs());
    wait_for("the Voucher gone", &pod, async || {
        vouchers
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    })
    .await;

    // A campaign in the same namespace: its key read from its Secret (in the key namespace, the
    // only one whose Secrets the controller may read), its codes generated, its status written;
    // the printer's download on the admin port; deleted, its codes revoked.
    let key_namespace = env_value(controller, "CAMPAIGN_KEY_NAMESPACE").unwrap();
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), key_namespace);
    secrets
        .create(
            &Default::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "chart-pod-key"},
                "stringData": {"key": "0123456789abcdef0123456789abcdef"},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let campaigns: kube::Api<voucher_operator::api::campaign::VoucherCampaign> =
        kube::Api::namespaced(client.clone(), &admin_namespace);
    campaigns
        .create(
            &Default::default(),
            &serde_json::from_value(json!({
                "apiVersion": "catalyst.openova.io/v1alpha1", "kind": "VoucherCampaign",
                "metadata": {"name": "chart-pod"},
                "spec": {"prefix": "POD-", "count": 25, "creditOMR": 3,
                         "keySecretRef": {"name": "chart-pod-key"}},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    wait_for("the campaign Ready", &pod, async || {
        campaigns
            .get("chart-pod")
            .await
            .unwrap()
            .status
            .is_some_and(|s| {
                s.generated == Some(25)
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
            })
    })
    .await;
    let csv = web
        .get(format!(
            "{admin_port}/billing/vouchers/campaigns/{admin_namespace}/chart-pod/codes"
        ))
        .bearer_auth(&admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200, "{}", pod.logs());
    assert_eq!(
        csv.text().await.unwrap().lines().count(),
        26,
        "the header and 25 codes"
    );
    campaigns
        .delete("chart-pod", &Default::default())
        .await
        .unwrap();
    wait_for("the campaign gone", &pod, async || {
        campaigns.get_opt("chart-pod").await.unwrap().is_none()
    })
    .await;
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM promo_codes WHERE code LIKE 'POD-%' AND deleted_at IS NULL",
    )
    .fetch_one(&database)
    .await
    .unwrap();
    assert_eq!(live, 0, "revoked with the campaign");

    // The leader's relay publishes the audit events on the chart's stream and subjects.
    let jetstream =
        async_nats::jetstream::new(async_nats::connect(&support::nats().url).await.unwrap());
    wait_for(
        &format!("audit events on {stream}"),
        &pod,
        async || match jetstream.get_stream(&stream).await {
            Ok(mut s) => s.info().await.is_ok_and(|i| {
                i.state.messages >= 1 && i.config.subjects == [format!("{prefix}.>")]
            }),
            Err(_) => false,
        },
    )
    .await;

    // SIGTERM (a rollout, a drain): both stop cleanly within the grace period, the Lease is let go.
    let grace = Duration::from_secs(
        server_pod["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap(),
    );
    let started = Instant::now();
    for child in &mut running.0 {
        assert!(stop(child, &pod).await.success(), "{}", pod.logs());
    }
    assert!(started.elapsed() < grace, "{:?}", started.elapsed());
    let holder = leases
        .get(&lease_name)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(holder, None, "released on stop");

    for account in &accounts {
        assert_least_privilege(&rendered, namespace, account, &pod);
    }
}

/// From the API server's audit log: no request of a pod's ServiceAccount was refused, and
/// every rule the chart grants that account was used by one of them.
fn assert_least_privilege(rendered: &Rendered, namespace: &str, service_account: &str, pod: &Pod) {
    let user = format!("system:serviceaccount:{namespace}:{service_account}");
    let requests = support::cluster::cluster().requests_of(&user);
    assert!(!requests.is_empty(), "no request of {user} was audited");
    let refused: Vec<_> = requests.iter().filter(|r| r.code == 403).collect();
    assert!(
        refused.is_empty(),
        "the chart's RBAC refused {user}: {refused:#?}\n{}",
        pod.logs()
    );
    // The roles bound to this account.
    let bound: Vec<(&Value, Option<&str>)> = rendered
        .all("RoleBinding")
        .into_iter()
        .chain(rendered.all("ClusterRoleBinding"))
        .filter(|b| b["subjects"][0]["name"] == service_account)
        .map(|b| (&b["roleRef"]["name"], b["metadata"]["namespace"].as_str()))
        .collect();
    let roles = rendered
        .all("Role")
        .into_iter()
        .chain(rendered.all("ClusterRole"))
        .filter(|r| {
            bound.iter().any(|(name, ns)| {
                &&r["metadata"]["name"] == name && r["metadata"]["namespace"].as_str() == *ns
            })
        });
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let mut unused = Vec::new();
    for role in roles {
        let role_namespace = role["metadata"]["namespace"].as_str();
        for rule in role["rules"].as_array().unwrap() {
            let names = strings(&rule["resourceNames"]);
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        let used = requests.iter().any(|r| {
                            r.api_group == group
                                && r.resource == resource
                                // A server-side apply that creates the object is authorized as
                                // create too, and audited as a patch answered 201.
                                && (r.verb == verb
                                    || (verb == "create" && r.verb == "patch" && r.code == 201))
                                && role_namespace.is_none_or(|ns| r.namespace == ns)
                                && (names.is_empty() || names.contains(&r.name))
                        });
                        if !used {
                            unused.push(format!(
                                "{} {verb} {group}/{resource}{}",
                                role["metadata"]["name"].as_str().unwrap(),
                                if names.is_empty() {
                                    String::new()
                                } else {
                                    format!(" {names:?}")
                                }
                            ));
                        }
                    }
                }
            }
        }
    }
    let seen: std::collections::BTreeSet<String> = requests
        .iter()
        .map(|r| format!("{} {}/{} ({})", r.verb, r.api_group, r.resource, r.code))
        .collect();
    assert!(
        unused.is_empty(),
        "granted but never used (remove them from the chart, or exercise them here): {unused:#?}\n\
         what the pod asked: {seen:#?}"
    );
}

/// The server faces the internet: its ServiceAccount may create Vouchers in the admin namespace
/// and delete them in the issuer namespaces, and nothing more; the controller's may not delete.
/// Tried through the real `kubectl` against the real API server with the chart's RBAC applied.
#[tokio::test]
async fn the_servers_account_is_refused_everything_but_issue_and_revoke() {
    let cluster = support::cluster::cluster();
    let (_, release) = support::cluster::setup("sa-split").await;
    let (_, elsewhere) = support::cluster::setup("sa-other").await;
    let rendered = render_in(
        &release,
        with(json!({"controller": {"campaignKeyNamespace": format!("{release}-keys")}})),
    );
    let dir = tempfile::tempdir().unwrap();
    let admin = cluster.kubeconfig(dir.path(), &release);
    // Cluster-scoped objects get a name of this test's own, so that no other test's release
    // changes (or is changed by) them.
    // The key namespace first: the chart creates it, and a Role of the controller's is there.
    let mut rbac = rendered.of_kinds(&["Namespace", "ServiceAccount", "Role", "RoleBinding"]);
    for mut object in rendered.of_kinds(&["ClusterRole", "ClusterRoleBinding"]) {
        let renamed = format!("{}-{release}", object["metadata"]["name"].as_str().unwrap());
        object["metadata"]["name"] = json!(renamed);
        if object["roleRef"].is_object() {
            object["roleRef"]["name"] = json!(renamed);
        }
        rbac.push(object);
    }
    let list = json!({"apiVersion": "v1", "kind": "List", "items": rbac});
    cluster
        .apply_server_side(&admin, &list)
        .expect("the chart's RBAC");
    let account = |component: &str| {
        let name = rendered.deployment(component)["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap()
            .to_owned();
        cluster.service_account_kubeconfig(dir.path(), &release, &name)
    };
    let (server, controller) = (account("server"), account("controller"));
    let voucher = |name: &str| {
        json!({"apiVersion": "catalyst.openova.io/v1alpha1", "kind": "Voucher",
               "metadata": {"name": name}, "spec": {"code": name.to_uppercase(), "creditOMR": 5}})
    };
    for ns in [&release, &elsewhere] {
        let mut create = cluster.kubectl(&admin);
        create.args(["create", "-n", ns, "-f", "-"]);
        let output = support::run_with_input(&mut create, voucher("sa-v1").to_string().as_bytes());
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let kubectl = |kubeconfig: &std::path::Path, args: &[&str], input: Option<Value>| {
        let mut cmd = cluster.kubectl(kubeconfig);
        cmd.args(args);
        let output = support::run_with_input(
            &mut cmd,
            input.map(|v| v.to_string()).unwrap_or_default().as_bytes(),
        );
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let status = r#"{"status":{"phase":"Active"}}"#;
    let refused: [(&std::path::Path, Vec<&str>, Option<Value>, &str); 7] = [
        (
            &server,
            vec!["delete", "voucher", "sa-v1", "-n", &elsewhere],
            None,
            "delete a Voucher outside the issuer namespaces",
        ),
        (
            &server,
            vec!["create", "-n", &elsewhere, "-f", "-"],
            Some(voucher("sa-v2")),
            "create a Voucher outside the admin namespace",
        ),
        (
            &server,
            vec![
                "patch",
                "voucher",
                "sa-v1",
                "-n",
                &release,
                "--subresource=status",
                "--type=merge",
                "-p",
                status,
            ],
            None,
            "write a Voucher's status",
        ),
        (
            &server,
            vec!["get", "vouchers", "-A"],
            None,
            "list Vouchers everywhere",
        ),
        (
            &server,
            vec!["get", "secrets", "-n", &release],
            None,
            "read Secrets",
        ),
        (
            &controller,
            vec!["delete", "voucher", "sa-v1", "-n", &release],
            None,
            "the controller: delete a Voucher",
        ),
        (
            &controller,
            vec!["get", "secret", "billing-jwt", "-n", &release],
            None,
            "the controller: read the release namespace's Secrets (the signing secret)",
        ),
    ];
    for (who, args, input, what) in refused {
        let (ok, stderr) = kubectl(who, &args, input);
        assert!(
            !ok && stderr.contains("Forbidden"),
            "{what} was not refused: {stderr}"
        );
    }
    // What they may do (the refusals above are not a broken account).
    let (ok, stderr) = kubectl(
        &controller,
        &[
            "patch",
            "voucher",
            "sa-v1",
            "-n",
            &release,
            "--type=merge",
            "-p",
            r#"{"metadata":{"labels":{"patched":"yes"}}}"#,
        ],
        None,
    );
    assert!(ok, "the controller patches Vouchers: {stderr}");
    let (ok, stderr) = kubectl(
        &server,
        &["delete", "voucher", "sa-v1", "-n", &release],
        None,
    );
    assert!(ok, "the server revokes in an issuer namespace: {stderr}");
}

/// The chart in `mode: hub` (the vendor's cluster: no billing database) renders the hub alone,
/// and its pod, as rendered and as its ServiceAccount, defines a global Voucher of the global
/// namespace in the hub's bucket, writes its status and, once the Voucher is deleted, switches
/// the record off — with exactly the rights the chart grants it.
#[tokio::test]
async fn the_rendered_hub_defines_global_vouchers_under_exactly_its_rbac() {
    let (namespace, global_ns) = ("catalyst-hub", "vendor-global");
    let nats = support::nats_of_its_own();
    let values = with(json!({
        "mode": "hub",
        "nats": {"url": nats.url},
        "hub": {"allotmentReplicas": 1},
        "federation": {"globalNamespace": global_ns},
    }));
    let rendered = render_in(namespace, values);
    rendered.assert_valid();
    let deployments: Vec<&str> = rendered
        .all("Deployment")
        .into_iter()
        .map(|d| {
            d["metadata"]["labels"]["app.kubernetes.io/component"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        deployments,
        ["hub"],
        "the hub alone: no controller, no server, no database"
    );
    let hub_pod = rendered.deployment("hub");
    let account = hub_pod["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap()
        .to_owned();
    let cluster = support::cluster::cluster();
    let client = cluster.client().await;
    let dir = tempfile::tempdir().unwrap();
    for ns in [namespace, global_ns] {
        let _ = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
            .create(
                &Default::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
            )
            .await;
    }
    let admin = cluster.kubeconfig(dir.path(), namespace);
    // The admission policy as rendered too: it names this render's global namespace.
    let mut objects = rendered.of_kinds(&["ServiceAccount", "Role", "RoleBinding"]);
    objects.extend(rendered.of_kinds(&ADMISSION));
    let _rbac = apply_as_admin(&admin, objects)
        .await
        .expect("the hub's RBAC and the policy");
    let kubeconfig = cluster.service_account_kubeconfig(dir.path(), namespace, &account);
    let hub = container(hub_pod, "hub");
    let pod = Pod {
        kubeconfigs: [(account.clone(), kubeconfig)].into_iter().collect(),
        namespace: namespace.to_owned(),
        database: String::new(),
        ports: containers(hub_pod)
            .into_iter()
            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
            .map(|p| (p["containerPort"].as_u64().unwrap(), support::free_port()))
            .collect(),
        dir,
    };
    let mut running = Containers(vec![pod.command(hub_pod, hub).spawn().unwrap()]);
    let probe = &hub["readinessProbe"]["httpGet"];
    let (port, path) = (
        pod.port(hub, probe["port"].as_str().unwrap()),
        probe["path"].as_str().unwrap().to_owned(),
    );
    wait_for("the hub ready", &pod, async || {
        support::http_get(port, &path)
            .await
            .starts_with("HTTP/1.0 200")
    })
    .await;

    // The vendor applies a global voucher: the hub defines it and says so in its status.
    let vouchers: kube::Api<voucher_operator::api::Voucher> =
        kube::Api::namespaced(client.clone(), global_ns);
    let spec = json!({"scope": "Global", "creditOMR": 50, "maxRedemptions": 100});
    let world =
        voucher_operator::api::Voucher::new("world-hub", serde_json::from_value(spec).unwrap());
    // Admitted once the policy applied above (this render's global namespace) takes effect.
    wait_for("the global voucher admitted", &pod, async || {
        vouchers.create(&Default::default(), &world).await.is_ok()
    })
    .await;
    wait_for("the hub's status", &pod, async || {
        vouchers
            .get("world-hub")
            .await
            .unwrap()
            .status
            .is_some_and(|s| {
                s.phase == Some(voucher_operator::domain::Phase::Active) && s.allotment.is_some()
            })
    })
    .await;
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let kv = js
        .get_key_value(voucher_operator::federation::allotment::BUCKET)
        .await
        .unwrap();
    let record = || async {
        voucher_operator::federation::allotment::read(&kv, "WORLD-HUB")
            .await
            .unwrap()
            .expect("the record")
            .0
    };
    assert_eq!((record().await.cap, record().await.active), (100, true));
    // Deleted: its finalizer switches the record off, then lets it go.
    vouchers
        .delete("world-hub", &Default::default())
        .await
        .unwrap();
    wait_for("the Voucher gone", &pod, async || {
        vouchers.get_opt("world-hub").await.unwrap().is_none()
    })
    .await;
    assert!(
        !record().await.active,
        "switched off, its units still granted"
    );
    let status = stop(&mut running.0[0], &pod).await;
    assert!(
        status.success(),
        "the hub stops cleanly on SIGTERM\n{}",
        pod.logs()
    );
    assert_least_privilege(&rendered, namespace, &account, &pod);
}

/// The hub's NATS accounts as the chart ships them (`hub.sovereigns`: the ConfigMap
/// `<release>-nats-accounts`), run by a real nats-server with a leaf node per Sovereign: each
/// reaches the hub's services in its own name only, and never the hub's JetStream (rule 11,
/// docs/federation.md).
#[tokio::test]
async fn the_charts_hub_accounts_keep_each_sovereign_to_its_own_name() {
    use voucher_operator::federation::{allotment, claims};
    use voucher_testenv::services::leaf_password;
    let rendered = render(with(json!({
        "mode": "hub",
        "hub": {"sovereigns": ["sov1", "sov2"]},
    })));
    rendered.assert_valid();
    let config_map = rendered
        .all("ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == format!("{RELEASE}-voucher-operator-nats-accounts"))
        .expect("the accounts ConfigMap");
    let accounts = config_map["data"]["accounts.conf"].as_str().unwrap();
    let hub_env = rendered.deployment("hub");
    let sovereigns = env_value(container(hub_env, "hub"), "SOVEREIGNS");
    assert_eq!(sovereigns, Some("sov1,sov2"), "the hub gathers from them");
    // The hub's own services connect without credentials in this test (no_auth_user).
    let (sov1_password, sov2_password) = (leaf_password("sov1"), leaf_password("sov2"));
    let env = [
        ("HUB_PASSWORD", "0c1d2e3f4a5b6c7d8e9f"),
        ("SOV1_LEAF_PASSWORD", sov1_password.as_str()),
        ("SOV2_LEAF_PASSWORD", sov2_password.as_str()),
    ];
    let leaf_port = support::free_port();
    let hub = support::nats_hub_with(leaf_port, format!("no_auth_user: hub\n{accounts}"), &env);
    let hub_client = async_nats::connect(&hub.url)
        .await
        .expect("the hub's account");
    let js = async_nats::jetstream::new(hub_client.clone());
    let kv = allotment::bucket(&js, 1).await.expect("the hub's bucket");
    let stop = tokio_util::sync::CancellationToken::new();
    let prefix = allotment::DEFINITION_PREFIX;
    allotment::start_definitions(hub_client.clone(), kv, prefix, stop.clone())
        .await
        .expect("the definition service");
    let sov1 = support::nats_leaf("sov1", leaf_port);
    let client = async_nats::connect(&sov1.url)
        .await
        .expect("sov1's leaf node");
    let short = std::time::Duration::from_secs(2);
    let own = support::eventually_within(
        std::time::Duration::from_secs(20),
        "sov1's own name answered through its leaf link",
        || async {
            allotment::definition(&client, prefix, "sov1", "NO-SUCH-CODE", short)
                .await
                .ok()
        },
    )
    .await;
    assert_eq!(own, None, "answered: no such global voucher");
    let other = allotment::definition(&client, prefix, "sov2", "NO-SUCH-CODE", short).await;
    assert!(other.is_err(), "answered in sov2's name: {other:?}");
    let hub_js = async_nats::jetstream::with_domain(client.clone(), "hub");
    for bucket in [allotment::BUCKET, claims::BUCKET] {
        let opened = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            hub_js.get_key_value(bucket),
        )
        .await;
        assert!(
            !matches!(opened, Ok(Ok(_))),
            "{bucket} opened with sov1's credentials"
        );
    }
    stop.cancel();
}

/// A Sovereign's nats-server part as the chart ships it (`federation.sovereign`: the ConfigMap
/// `<release>-nats-leaf`), run by a real nats-server as a leaf node of a hub on the shipped
/// accounts: the operator reaches the hub's services, the HTTP server's user may only claim.
#[tokio::test]
async fn the_charts_leaf_node_lets_the_server_only_claim() {
    use voucher_operator::domain::allotment::Request;
    use voucher_operator::domain::claims::{ClaimAnswer, ClaimAsk};
    use voucher_operator::federation::{allotment, claims};
    use voucher_testenv::services::leaf_password;
    let rendered = render(with(json!({"federation": {"sovereign": "sov1"}})));
    rendered.assert_valid();
    let config_map = rendered
        .all("ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == format!("{RELEASE}-voucher-operator-nats-leaf"))
        .expect("the leaf ConfigMap");
    let leaf_conf = config_map["data"]["leaf.conf"].as_str().unwrap();
    let leaf_port = support::free_port();
    let hub = support::nats_hub(leaf_port, &["sov1"]);
    let hub_client = async_nats::connect(&hub.url).await.expect("the hub");
    let js = async_nats::jetstream::new(hub_client.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let kv = allotment::bucket(&js, 1)
        .await
        .expect("the allotment bucket");
    allotment::start(
        hub_client.clone(),
        kv,
        allotment::SUBJECT_PREFIX,
        stop.clone(),
    )
    .await
    .expect("the allotment service");
    let claimed = claims::bucket(&js, 1).await.expect("the claim bucket");
    claims::start(hub_client, claimed, claims::SUBJECT_PREFIX, stop.clone())
        .await
        .expect("the claim service");
    let url = format!(
        "\"nats-leaf://sov1:{}@127.0.0.1:{leaf_port}\"",
        leaf_password("sov1")
    );
    let env = [
        ("SOV1_LEAF_URL", url.as_str()),
        ("OPERATOR_PASSWORD", "a1b2c3d4e5f6"),
        ("SERVER_PASSWORD", "f6e5d4c3b2a1"),
    ];
    let leaf = support::nats_configured("sov1", leaf_conf.to_owned(), &env);
    let as_user = |user: &str, password: &str| {
        async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
            .connect(leaf.url.clone())
    };
    let operator = as_user("operator", "a1b2c3d4e5f6").await.expect("operator");
    let server = as_user("server", "f6e5d4c3b2a1").await.expect("server");
    let short = Duration::from_secs(2);
    let ask = allotment::Ask {
        code: "NO-SUCH-CODE".into(),
        request: Request::Sync {
            uid: "uid".into(),
            epoch: 0,
            keep: 0,
            used: 0,
        },
    };
    support::eventually_within(
        Duration::from_secs(20),
        "the operator reaches the hub",
        || async {
            allotment::ask(&operator, allotment::SUBJECT_PREFIX, "sov1", &ask, short)
                .await
                .ok()
        },
    )
    .await;
    let claim = ClaimAsk::Create {
        code: "NO-SUCH-CODE".into(),
        claimant: "ab".into(),
        intent: "intent-1".into(),
    };
    let claimed = claims::ask(&server, claims::SUBJECT_PREFIX, "sov1", &claim, short).await;
    assert_eq!(claimed.expect("the server claims"), ClaimAnswer::Claimed);
    let asked = allotment::ask(&server, allotment::SUBJECT_PREFIX, "sov1", &ask, short).await;
    assert!(
        asked.is_err(),
        "the server asked for an allotment: {asked:?}"
    );
    stop.cancel();
}
