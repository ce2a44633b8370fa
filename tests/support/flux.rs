//! Flux of this test binary: source-controller and kustomize-controller built
//! from their upstream modules (`tools/flux/build.sh`, once per machine) and
//! the loopback Git server, started on first use against the test binary's
//! API server ([`super::cluster`]) with Flux's CRDs installed. A test pushes
//! commits to a repository of its own ([`Repo`]) and reads what Flux made of
//! them ([`Kustomization`]); nothing is applied by hand.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::json;
use voucher_testenv::flux::{Flux, Sync};

use super::Signal;

pub struct FluxEnv {
    /// The Git server the tests share.
    pub git: GitServer,
    flux: Flux,
}

/// Flux of this test binary, started on first use.
pub fn flux() -> &'static FluxEnv {
    static FLUX: OnceLock<FluxEnv> = OnceLock::new();
    FLUX.get_or_init(start)
}

fn start() -> FluxEnv {
    let cluster = super::cluster::cluster();
    let flux = Flux::find_or_build().unwrap_or_else(|e| panic!("{e:#}"));
    let dir = super::scratch_dir("flux");
    let kubeconfig = cluster.kubeconfig(&dir, "default");
    flux.install_crds(&cluster.binaries.kubectl(), &kubeconfig)
        .unwrap_or_else(|e| panic!("Flux's CRDs: {e:#}"));

    let storage = dir.join("artifacts");
    std::fs::create_dir_all(&storage).unwrap();
    let (storage_port, source_health) = (super::free_port(), super::free_port());
    let mut source =
        flux.source_controller_command(&kubeconfig, &storage, storage_port, source_health);
    source.stderr(super::log_file(dir.join("source-controller.log")));
    super::supervise(source, Signal::TERM, dir.join("source-controller"));
    let kustomize_health = super::free_port();
    let mut kustomize = flux.kustomize_controller_command(&kubeconfig, kustomize_health);
    kustomize.stderr(super::log_file(dir.join("kustomize-controller.log")));
    super::supervise(kustomize, Signal::TERM, dir.join("kustomize-controller"));
    super::wait_for_port(
        source_health,
        "source-controller",
        &dir.join("source-controller.log"),
    );
    super::wait_for_port(
        kustomize_health,
        "kustomize-controller",
        &dir.join("kustomize-controller.log"),
    );
    FluxEnv {
        git: GitServer::start_with(&flux),
        flux,
    }
}

impl FluxEnv {
    /// A Git server of the caller's own (to stop without disturbing the other tests).
    pub fn git_server_of_its_own(&self) -> GitServer {
        GitServer::start_with(&self.flux)
    }
}

/// The loopback Git server: repositories created on their first push.
pub struct GitServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    flux: Flux,
}

impl GitServer {
    fn start_with(flux: &Flux) -> Self {
        let server = Self {
            port: super::free_port(),
            dir: super::scratch_dir("git"),
            flux: flux.clone(),
        };
        server.start();
        server
    }

    /// Starts the server (again), on the same port and repositories.
    pub fn start(&self) {
        let mut git = self
            .flux
            .git_server_command(&self.dir.join("repositories"), self.port);
        git.stderr(super::log_file(self.dir.join("git-server.log")));
        super::supervise(git, Signal::TERM, self.dir.clone());
        super::wait_for_port(
            self.port,
            "the Git server",
            &self.dir.join("git-server.log"),
        );
    }

    /// Stops the server; its repositories stay for `start`.
    pub fn stop(&self) {
        super::stop_service(&self.dir, None);
    }

    /// The clone URL of repository `name`, as a GitRepository names it.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/voucher/{name}.git", self.port)
    }
}

/// A working copy of a repository of the test's own on the Git server,
/// branch `main`: files written, committed and pushed as a person would.
pub struct Repo {
    pub url: String,
    dir: tempfile::TempDir,
}

impl Repo {
    /// A new, empty repository on `server` (created there by the first push).
    pub fn new(server: &GitServer, prefix: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!("{prefix}-{}", COUNTER.fetch_add(1, Ordering::Relaxed));
        let repo = Self {
            url: server.url(&name),
            dir: tempfile::tempdir().unwrap(),
        };
        repo.git(&["init", "--quiet", "--initial-branch=main"]);
        repo.git(&["remote", "add", "origin", &repo.url]);
        repo
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Writes `text` to `file` (directories made as needed).
    pub fn write(&self, file: &str, text: &str) {
        let path = self.path(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// Copies the files of `dir` (relative to the crate root) to `to`.
    pub fn copy_dir(&self, dir: &str, to: &str) {
        let from = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        for entry in std::fs::read_dir(&from).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            self.write(
                &format!("{to}/{name}"),
                &std::fs::read_to_string(entry.path()).unwrap(),
            );
        }
    }

    pub fn remove(&self, file: &str) {
        let path = self.path(file);
        if path.is_dir() {
            std::fs::remove_dir_all(path).unwrap();
        } else {
            std::fs::remove_file(path).unwrap();
        }
    }

    /// `git add -A && git commit && git push`: the new commit's hash.
    pub fn commit_and_push(&self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "--quiet", "-m", message]);
        self.git(&["push", "--quiet", "origin", "main"]);
        self.git(&["rev-parse", "HEAD"]).trim().to_owned()
    }

    fn git(&self, args: &[&str]) -> String {
        let output = Command::new("git")
            .args(["-c", "user.name=Test", "-c", "user.email=test@example.om"])
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("git runs");
        assert!(
            output.status.success(),
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }
}

fn resource(group: &str, kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(group, "v1", kind))
}

/// A Flux `GitRepository` + `Kustomization` pair in `ns`, both named `name`.
pub struct Kustomization {
    client: kube::Client,
    pub ns: String,
    pub name: String,
}

impl Kustomization {
    /// Applies `sync`'s GitRepository and Kustomization (server-side).
    pub async fn apply(client: &kube::Client, sync: &Sync<'_>) -> Self {
        let apply = PatchParams::apply("voucher-operator-test").force();
        for manifest in sync.manifests().unwrap() {
            let kind = manifest["kind"].as_str().unwrap();
            let group = manifest["apiVersion"]
                .as_str()
                .unwrap()
                .split('/')
                .next()
                .unwrap();
            Api::<DynamicObject>::namespaced_with(
                client.clone(),
                sync.namespace,
                &resource(group, kind),
            )
            .patch(sync.name, &apply, &Patch::Apply(&manifest))
            .await
            .unwrap_or_else(|e| panic!("apply the {kind}: {e}"));
        }
        Self {
            client: client.clone(),
            ns: sync.namespace.to_owned(),
            name: sync.name.to_owned(),
        }
    }

    fn api(&self, group: &str, kind: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.ns, &resource(group, kind))
    }

    /// Asks both to reconcile now (Flux's `reconcile.fluxcd.io/requestedAt`),
    /// as `flux reconcile kustomization --with-source` does.
    pub async fn sync(&self) {
        let now = chrono::Utc::now().to_rfc3339();
        let annotate =
            json!({"metadata": {"annotations": {"reconcile.fluxcd.io/requestedAt": now}}});
        for (group, kind) in [
            ("source.toolkit.fluxcd.io", "GitRepository"),
            ("kustomize.toolkit.fluxcd.io", "Kustomization"),
        ] {
            self.api(group, kind)
                .patch(
                    &self.name,
                    &PatchParams::default(),
                    &Patch::Merge(&annotate),
                )
                .await
                .unwrap();
        }
    }

    /// The Kustomization's condition `type`: (status, reason, message).
    pub async fn condition(&self, type_: &str) -> Option<(String, String, String)> {
        self.condition_of("kustomize.toolkit.fluxcd.io", "Kustomization", type_)
            .await
    }

    /// The GitRepository's condition `type`: (status, reason, message).
    pub async fn source_condition(&self, type_: &str) -> Option<(String, String, String)> {
        self.condition_of("source.toolkit.fluxcd.io", "GitRepository", type_)
            .await
    }

    async fn condition_of(
        &self,
        group: &str,
        kind: &str,
        type_: &str,
    ) -> Option<(String, String, String)> {
        let object = self.api(group, kind).get(&self.name).await.ok()?;
        let conditions = object.data["status"]["conditions"].as_array()?.clone();
        conditions.iter().find(|c| c["type"] == type_).map(|c| {
            let text = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (text("status"), text("reason"), text("message"))
        })
    }

    /// The revision the Kustomization last applied (`main@sha1:<hash>`).
    pub async fn last_applied(&self) -> Option<String> {
        let object = self
            .api("kustomize.toolkit.fluxcd.io", "Kustomization")
            .get(&self.name)
            .await
            .ok()?;
        object.data["status"]["lastAppliedRevision"]
            .as_str()
            .map(str::to_owned)
    }
}
