//! The real Kubernetes API server of this test binary: `etcd` and
//! `kube-apiserver` built from their upstream Go modules
//! (`tools/kubernetes/build.sh`, once per machine), started on first use on
//! free loopback ports with a fresh PKI and RBAC, the Voucher and VoucherCampaign CRDs installed,
//! and stopped with the other services when the test binary exits. Tests
//! share it and isolate themselves by namespace.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use voucher_testenv::control_plane::{self, Audit, Binaries, Pki};

pub struct Cluster {
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// The binaries it runs, and the `kubectl` of the same version.
    pub binaries: Binaries,
    /// Requests made by service accounts (user, verb, resource, response code).
    pub audit_log: PathBuf,
    /// The kube-apiserver process (benchmarks read its CPU time).
    pub apiserver_pid: u32,
    pki: Pki,
    dir: PathBuf,
}

/// The API server of this test binary, started on first use.
pub fn cluster() -> &'static Cluster {
    // A start that failed fails every test that asks again, at once.
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    match CLUSTER.get_or_init(|| {
        std::panic::catch_unwind(start).map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
    }) {
        Ok(cluster) => cluster,
        Err(why) => panic!("the test Kubernetes API server could not be started: {why}"),
    }
}

fn start() -> Cluster {
    let binaries = Binaries::find_or_build().unwrap_or_else(|e| panic!("{e:#}"));
    let dir = super::scratch_dir("kube");
    let pki = Pki::ensure(&dir.join("pki")).expect("make the control plane's certificates");
    let audit = Audit::service_accounts(&dir).expect("write the audit policy");

    let etcd_port = super::free_port();
    let mut etcd = control_plane::etcd_command(&binaries, &dir.join("etcd"), etcd_port);
    etcd.stderr(super::log_file(dir.join("etcd.log")));
    super::supervise(etcd, super::Signal::TERM, dir.clone());
    super::wait_for_port(etcd_port, "etcd", &dir.join("etcd.log"));

    let port = super::free_port();
    let mut apiserver =
        control_plane::apiserver_command(&binaries, &pki, etcd_port, port, Some(&audit));
    apiserver.stderr(super::log_file(dir.join("kube-apiserver.log")));
    // Killed outright: a throwaway API server needs no graceful shutdown, and
    // one that outlives its etcd retries it for minutes.
    let pid = super::supervise(apiserver, super::Signal::KILL, dir.clone());

    let cluster = Cluster {
        url: format!("https://127.0.0.1:{port}"),
        binaries,
        audit_log: audit.log,
        apiserver_pid: pid,
        pki,
        dir,
    };
    // Readiness and the CRD, on a runtime of their own: each test has its own.
    let kubeconfig = cluster.kubeconfig_text("default");
    let kubeconfig_path = cluster.kubeconfig(&cluster.dir, "default");
    let binaries = cluster.binaries.clone();
    let log = cluster.dir.join("kube-apiserver.log");
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                voucher_operator::install_tls_provider();
                control_plane::wait_ready(
                    &binaries,
                    &kubeconfig_path,
                    Duration::from_secs(90),
                    &log,
                    || super::is_running(pid),
                )
                .await?;
                let client = control_plane::client_for(&kubeconfig).await?;
                for crd in voucher_operator::api::crds() {
                    control_plane::install_crd(&client, &crd).await?;
                }
                anyhow::Ok(())
            })
    })
    .join()
    .unwrap()
    .unwrap_or_else(|e| panic!("the test Kubernetes API server did not come up: {e:#}"));
    cluster
}

impl Cluster {
    /// An admin kubeconfig (group `system:masters`) whose default namespace is `namespace`.
    pub fn kubeconfig_text(&self, namespace: &str) -> String {
        self.pki
            .admin_kubeconfig(&self.url, namespace)
            .expect("read the control plane's certificates")
    }

    /// The admin kubeconfig written to `dir`, with `namespace` as its default.
    pub fn kubeconfig(&self, dir: &Path, namespace: &str) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, self.kubeconfig_text(namespace)).unwrap();
        path
    }

    /// `kubectl apply -f -` of `manifest` (strict field validation, kubectl's default):
    /// Ok, or kubectl's error output.
    pub fn apply(&self, kubeconfig: &Path, manifest: &serde_json::Value) -> Result<(), String> {
        let mut apply = self.kubectl(kubeconfig);
        apply.args(["apply", "-f", "-"]);
        let output = super::run_with_input(&mut apply, manifest.to_string().as_bytes());
        if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// `kubectl apply --server-side` of `manifest`: one request per object that creates or
    /// updates it, for cluster-scoped objects that several tests apply to the one API server.
    pub fn apply_server_side(
        &self,
        kubeconfig: &Path,
        manifest: &serde_json::Value,
    ) -> Result<(), String> {
        let mut apply = self.kubectl(kubeconfig);
        apply.args(["apply", "--server-side", "--force-conflicts", "-f", "-"]);
        let output = super::run_with_input(&mut apply, manifest.to_string().as_bytes());
        if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// A kubeconfig in `dir` that acts as the service account `namespace/name`,
    /// with a token from the TokenRequest API (as a pod's projected token).
    pub fn service_account_kubeconfig(&self, dir: &Path, namespace: &str, name: &str) -> PathBuf {
        let admin = self.kubeconfig(dir, namespace);
        let output = self
            .kubectl(&admin)
            .args(["create", "token", name, "-n", namespace, "--duration=1h"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "kubectl create token {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let token = String::from_utf8(output.stdout).unwrap();
        let path = dir.join(format!("kubeconfig-{name}"));
        let text = self
            .pki
            .token_kubeconfig(&self.url, namespace, token.trim())
            .unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    /// What `user` asked the API server so far, from its audit log.
    pub fn requests_of(&self, user: &str) -> Vec<AuditedRequest> {
        std::fs::read_to_string(&self.audit_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|event| event["user"]["username"] == user)
            .map(|event| {
                let object = &event["objectRef"];
                let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
                AuditedRequest {
                    verb: text(&event["verb"]),
                    api_group: text(&object["apiGroup"]),
                    resource: match object["subresource"].as_str() {
                        Some(sub) => format!("{}/{sub}", text(&object["resource"])),
                        None => text(&object["resource"]),
                    },
                    namespace: text(&object["namespace"]),
                    name: text(&object["name"]),
                    code: event["responseStatus"]["code"].as_u64().unwrap_or_default() as u16,
                    uri: text(&event["requestURI"]),
                }
            })
            .collect()
    }

    /// An admin client, on the calling test's runtime.
    pub async fn client(&self) -> kube::Client {
        voucher_operator::install_tls_provider();
        control_plane::client_for(&self.kubeconfig_text("default"))
            .await
            .expect("a kube client for the test API server")
    }

    /// The `kubectl` built with the API server, for `kubeconfig`.
    pub fn kubectl(&self, kubeconfig: &Path) -> Command {
        let mut cmd = Command::new(self.binaries.kubectl());
        cmd.env("KUBECONFIG", kubeconfig);
        cmd
    }
}

/// One request in the API server's audit log.
#[derive(Clone, Debug)]
pub struct AuditedRequest {
    pub verb: String,
    /// "" for the core group.
    pub api_group: String,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub code: u16,
    pub uri: String,
}

/// A new namespace of its own for one test; its name.
pub async fn namespace(client: &kube::Client, prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let name = format!("{prefix}-{}", COUNTER.fetch_add(1, Ordering::Relaxed));
    let namespace: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name}
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create the test's namespace");
    name
}

/// A cluster, an admin client and a namespace for one test.
pub async fn setup(prefix: &str) -> (kube::Client, String) {
    let client = cluster().client().await;
    let ns = namespace(&client, prefix).await;
    (client, ns)
}
