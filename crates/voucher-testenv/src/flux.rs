//! Flux on loopback, for the GitOps tests and `voucher-dev local --gitops`:
//! source-controller and kustomize-controller built from their upstream
//! modules (`tools/flux`), their CRDs of the same versions, and a Git server
//! (fluxcd/gitkit, smart HTTP). The controllers run outside a cluster against
//! the API server of a kubeconfig (the admin's: they need no RBAC of their
//! own), with every listening address on 127.0.0.1; leader election is off
//! (Flux's default), no notification-controller (events stay Kubernetes
//! Events). The callers supervise the processes each their way.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::supervisor::{self, Signal};

/// `tools/flux/build.sh` of this checkout.
const BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tools/flux/build.sh");

/// The directory holding `source-controller`, `kustomize-controller` and
/// `git-server`, beside the `crds` directory of the same Flux release.
#[derive(Clone, Debug)]
pub struct Flux {
    pub dir: PathBuf,
}

impl Flux {
    /// `$VOUCHER_FLUX_BIN` when set (CI builds once before the tests), else the
    /// build script's cache under `target/`, building what is missing.
    pub fn find_or_build() -> anyhow::Result<Self> {
        let dir = match std::env::var_os("VOUCHER_FLUX_BIN") {
            Some(dir) => PathBuf::from(dir),
            None => crate::built::run_build_script(
                BUILD_SCRIPT,
                "Flux's source-controller and kustomize-controller",
            )?,
        };
        let flux = Self { dir };
        for binary in [
            flux.binary("source-controller"),
            flux.binary("kustomize-controller"),
            flux.binary("git-server"),
        ] {
            if !binary.is_file() {
                anyhow::bail!(
                    "{} is missing: build it with `bash tools/flux/build.sh`",
                    binary.display()
                );
            }
        }
        Ok(flux)
    }

    fn binary(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Applies the controllers' CRDs (all of source-controller's kinds: it
    /// watches five and exits when one is missing) and waits until each is
    /// established.
    pub fn install_crds(&self, kubectl: &Path, kubeconfig: &Path) -> anyhow::Result<()> {
        let crds = self.dir.join("../crds");
        let kubectl = |args: &[&str]| -> anyhow::Result<()> {
            let output = Command::new(kubectl)
                .args(args)
                .env("KUBECONFIG", kubeconfig)
                .output()?;
            if !output.status.success() {
                anyhow::bail!(
                    "kubectl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            Ok(())
        };
        let dir = crds.display().to_string();
        kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &dir])?;
        kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            &dir,
        ])
    }

    /// The Git server: repositories under `root` (each created on its first
    /// push), smart HTTP on 127.0.0.1:`port`.
    pub fn git_server_command(&self, root: &Path, port: u16) -> Command {
        let mut cmd = supervisor::command(self.binary("git-server"), Signal::TERM);
        cmd.arg(format!("-root={}", root.display()))
            .arg(format!("-listen=127.0.0.1:{port}"))
            // The `git init --bare` of a repository's first push: HEAD on main, the branch the
            // GitRepositories follow, so that a plain `git clone` checks it out.
            .env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "init.defaultBranch")
            .env("GIT_CONFIG_VALUE_0", "main")
            .stdout(Stdio::null());
        cmd
    }

    /// source-controller: artifacts stored in `storage` and served on
    /// 127.0.0.1:`storage_port` (the address kustomize-controller downloads
    /// them from), health on `health_port`, no metrics server.
    pub fn source_controller_command(
        &self,
        kubeconfig: &Path,
        storage: &Path,
        storage_port: u16,
        health_port: u16,
    ) -> Command {
        let mut cmd = self.controller("source-controller", kubeconfig, health_port);
        cmd.arg(format!("--storage-path={}", storage.display()))
            .arg(format!("--storage-addr=127.0.0.1:{storage_port}"))
            .arg(format!("--storage-adv-addr=127.0.0.1:{storage_port}"));
        cmd
    }

    /// kustomize-controller, health on `health_port`, no metrics server.
    pub fn kustomize_controller_command(&self, kubeconfig: &Path, health_port: u16) -> Command {
        self.controller("kustomize-controller", kubeconfig, health_port)
    }

    fn controller(&self, name: &str, kubeconfig: &Path, health_port: u16) -> Command {
        let mut cmd = supervisor::command(self.binary(name), Signal::TERM);
        // No --kubeconfig flag: controller-runtime reads KUBECONFIG.
        cmd.env("KUBECONFIG", kubeconfig)
            .arg("--metrics-addr=0")
            .arg(format!("--health-addr=127.0.0.1:{health_port}"))
            .arg("--log-encoding=console")
            // Requeues exactly at the interval: the tests count on it.
            .arg("--interval-jitter-percentage=0")
            .stdout(Stdio::null());
        cmd
    }
}

/// `examples/flux/vouchers.yaml` as shipped: what the tests and `local
/// --gitops` apply, so that the example is what runs.
const VOUCHERS_KUSTOMIZATION: &str = include_str!("../../../examples/flux/vouchers.yaml");

/// A Git repository synced into a namespace: what a fleet repository
/// changes in `examples/flux/vouchers.yaml`.
pub struct Sync<'a> {
    /// The GitRepository's and the Kustomization's name.
    pub name: &'a str,
    /// Where both live.
    pub namespace: &'a str,
    /// The repository (branch `main`).
    pub url: &'a str,
    /// The directory of the repository to apply, e.g. `./vouchers`.
    pub path: &'a str,
    /// The namespace of the Vouchers.
    pub target_namespace: &'a str,
    /// How often source-controller looks for a new commit.
    pub poll: &'a str,
}

impl Sync<'_> {
    /// The GitRepository and the example's Kustomization (prune, wait, its
    /// health expressions and timeout as shipped) pointing at it.
    pub fn manifests(&self) -> anyhow::Result<[serde_json::Value; 2]> {
        let source = serde_json::json!({
            "apiVersion": "source.toolkit.fluxcd.io/v1",
            "kind": "GitRepository",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {"interval": self.poll, "url": self.url, "ref": {"branch": "main"}, "timeout": "20s"},
        });
        let mut kustomization: serde_json::Value = serde_yaml::from_str(VOUCHERS_KUSTOMIZATION)?;
        kustomization["metadata"] =
            serde_json::json!({"name": self.name, "namespace": self.namespace});
        let spec = &mut kustomization["spec"];
        spec["sourceRef"] = serde_json::json!({"kind": "GitRepository", "name": self.name});
        spec["path"] = self.path.into();
        spec["targetNamespace"] = self.target_namespace.into();
        Ok([source, kustomization])
    }
}
