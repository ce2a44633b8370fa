//! The real Kubernetes control plane on loopback, started the way
//! controller-runtime's envtest starts it: `etcd` and `kube-apiserver` built
//! from their upstream Go modules (`tools/kubernetes`), certificates made
//! here, RBAC authorization, no kubelet and no controller-manager (a CRD
//! operator needs neither). Shared by `voucher-dev local` and the test
//! tooling, which supervise the processes each their way.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::supervisor::{self, Signal};

use anyhow::Context as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Where `tools/kubernetes/build.sh` is: the binaries are built from this
/// checkout's pinned Go module.
const BUILD_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tools/kubernetes/build.sh"
);

/// The directory holding `etcd`, `kube-apiserver` and `kubectl`.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub dir: PathBuf,
}

impl Binaries {
    /// `$VOUCHER_KUBE_BIN` when set (CI builds once before the tests), else the
    /// build script's cache under `target/`, building what is missing (the
    /// first build takes a while and shows its progress on standard error).
    pub fn find_or_build() -> anyhow::Result<Self> {
        if let Some(dir) = std::env::var_os("VOUCHER_KUBE_BIN") {
            let binaries = Self { dir: dir.into() };
            binaries.check()?;
            return Ok(binaries);
        }
        let dir = crate::built::run_build_script(BUILD_SCRIPT, "kube-apiserver, etcd and kubectl")?;
        let binaries = Self { dir };
        binaries.check()?;
        Ok(binaries)
    }

    fn check(&self) -> anyhow::Result<()> {
        for binary in [self.etcd(), self.kube_apiserver(), self.kubectl()] {
            if !binary.is_file() {
                anyhow::bail!(
                    "{} is missing: build it with `bash tools/kubernetes/build.sh`",
                    binary.display()
                );
            }
        }
        Ok(())
    }

    pub fn etcd(&self) -> PathBuf {
        self.dir.join("etcd")
    }

    pub fn kube_apiserver(&self) -> PathBuf {
        self.dir.join("kube-apiserver")
    }

    pub fn kubectl(&self) -> PathBuf {
        self.dir.join("kubectl")
    }
}

/// The files of a control plane's PKI, in one directory.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// Makes a CA, the API server's serving certificate (localhost,
    /// 127.0.0.1), an admin client certificate (group `system:masters`) and
    /// the service-account signing key, unless `dir` has them already.
    pub fn ensure(dir: &Path) -> anyhow::Result<Self> {
        let pki = Self {
            dir: dir.to_path_buf(),
        };
        if pki.sa_key().exists() {
            return Ok(pki);
        }
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "voucher-operator-local-ca");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let serving_key = KeyPair::generate()?;
        let mut serving =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving.signed_by(&serving_key, &issuer)?;

        let admin_key = KeyPair::generate()?;
        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin
            .distinguished_name
            .push(DnType::CommonName, "voucher-operator-admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert = admin.signed_by(&admin_key, &issuer)?;

        let sa_key = KeyPair::generate()?;
        std::fs::write(
            pki.dir.join("service-accounts.pub"),
            sa_key.public_key_pem(),
        )?;
        write_private(&pki.dir.join("apiserver.key"), &serving_key.serialize_pem())?;
        write_private(&pki.dir.join("admin.key"), &admin_key.serialize_pem())?;
        std::fs::write(pki.dir.join("ca.crt"), ca_cert.pem())?;
        std::fs::write(pki.dir.join("apiserver.crt"), serving_cert.pem())?;
        std::fs::write(pki.dir.join("admin.crt"), admin_cert.pem())?;
        // Written last: its presence means the set is complete.
        write_private(&pki.sa_key(), &sa_key.serialize_pem())?;
        Ok(pki)
    }

    fn sa_key(&self) -> PathBuf {
        self.dir.join("service-accounts.key")
    }

    /// A kubeconfig for the API server at `server` that authenticates with
    /// the admin certificate (group `system:masters`), certificates embedded.
    pub fn admin_kubeconfig(&self, server: &str, namespace: &str) -> anyhow::Result<String> {
        let user = format!(
            "client-certificate-data: {}\n    client-key-data: {}",
            self.base64("admin.crt")?,
            self.base64("admin.key")?
        );
        self.kubeconfig(server, namespace, "admin", &user)
    }

    /// A kubeconfig that authenticates with a bearer token (e.g. a service
    /// account's, from the TokenRequest API).
    pub fn token_kubeconfig(
        &self,
        server: &str,
        namespace: &str,
        token: &str,
    ) -> anyhow::Result<String> {
        self.kubeconfig(server, namespace, "token", &format!("token: {token}"))
    }

    fn kubeconfig(
        &self,
        server: &str,
        namespace: &str,
        user_name: &str,
        user: &str,
    ) -> anyhow::Result<String> {
        Ok(format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: voucher-operator-local\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
             users:\n- name: {user_name}\n  user:\n    {user}\n\
             contexts:\n- name: voucher-operator-local\n  context:\n    cluster: voucher-operator-local\n    namespace: {namespace}\n    user: {user_name}\n\
             current-context: voucher-operator-local\n",
            ca = self.base64("ca.crt")?,
        ))
    }

    fn base64(&self, name: &str) -> anyhow::Result<String> {
        use base64::Engine as _;
        let bytes = std::fs::read(self.dir.join(name))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?
        .write_all(text.as_bytes())
}

/// `etcd` serving clients on 127.0.0.1:`port`, storing in `data_dir`. The
/// peer port is left to the kernel (one member, nobody connects to it) and
/// fsync is off: the data is throwaway or a developer's.
pub fn etcd_command(binaries: &Binaries, data_dir: &Path, port: u16) -> Command {
    let client_url = format!("http://127.0.0.1:{port}");
    let mut cmd = supervisor::command(binaries.etcd(), Signal::TERM);
    cmd.arg(format!("--data-dir={}", data_dir.display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg("--listen-peer-urls=http://127.0.0.1:0")
        .arg("--unsafe-no-fsync=true")
        .arg("--log-level=warn")
        .stdout(Stdio::null());
    cmd
}

/// Where the API server writes an audit log of what service accounts do,
/// with the policy file that selects them.
pub struct Audit {
    pub policy: PathBuf,
    pub log: PathBuf,
}

impl Audit {
    /// Records every request of a service account (who, verb, resource,
    /// response code) and nothing of anyone else's.
    pub fn service_accounts(dir: &Path) -> std::io::Result<Self> {
        let policy = dir.join("audit-policy.yaml");
        std::fs::write(
            &policy,
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n\
             - level: Metadata\n  userGroups: [\"system:serviceaccounts\"]\n\
             - level: None\n",
        )?;
        Ok(Self {
            policy,
            log: dir.join("audit.log"),
        })
    }
}

/// `kube-apiserver` on 127.0.0.1:`port` (HTTPS), storing in the etcd on
/// `etcd_port`: client certificates signed by the PKI's CA authenticate,
/// service-account tokens are signed with its key, RBAC authorizes.
pub fn apiserver_command(
    binaries: &Binaries,
    pki: &Pki,
    etcd_port: u16,
    port: u16,
    audit: Option<&Audit>,
) -> Command {
    let file = |name: &str| pki.dir.join(name).display().to_string();
    // Killed outright should its starter die: a throwaway API server needs no
    // graceful shutdown, and one that outlives its etcd retries it for minutes.
    let mut cmd = supervisor::command(binaries.kube_apiserver(), Signal::KILL);
    cmd.arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={port}"))
        .arg(format!("--cert-dir={}", pki.dir.display()))
        .arg(format!("--tls-cert-file={}", file("apiserver.crt")))
        .arg(format!("--tls-private-key-file={}", file("apiserver.key")))
        .arg(format!("--client-ca-file={}", file("ca.crt")))
        .arg(format!(
            "--service-account-key-file={}",
            file("service-accounts.pub")
        ))
        .arg(format!(
            "--service-account-signing-key-file={}",
            file("service-accounts.key")
        ))
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg("--authorization-mode=RBAC")
        .arg("--service-cluster-ip-range=10.0.0.0/24")
        .arg("--allow-privileged=true")
        .stdout(Stdio::null());
    if let Some(audit) = audit {
        cmd.arg(format!("--audit-policy-file={}", audit.policy.display()))
            .arg(format!("--audit-log-path={}", audit.log.display()))
            .arg("--audit-log-mode=blocking");
    }
    cmd
}

/// A kube client for a kubeconfig's text.
pub async fn client_for(kubeconfig: &str) -> anyhow::Result<kube::Client> {
    let parsed = kube::config::Kubeconfig::from_yaml(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(parsed, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// Waits until the API server reports ready (`/readyz`: etcd reachable,
/// RBAC's bootstrap roles in place), asking with kubectl (quietly: a kube
/// client would log every refused attempt); `log` is shown when it does not
/// become ready, or when `running` says the process has exited.
pub async fn wait_ready(
    binaries: &Binaries,
    kubeconfig: &Path,
    within: Duration,
    log: &Path,
    mut running: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        if !running() {
            last = "it exited".into();
            break;
        }
        let output = tokio::process::Command::new(binaries.kubectl())
            .args(["get", "--raw", "/readyz", "--request-timeout=2s"])
            .env("KUBECONFIG", kubeconfig)
            .output()
            .await?;
        if output.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let tail: String = {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    anyhow::bail!(
        "kube-apiserver did not become ready ({last}); the end of its log ({}):\n{tail}",
        log.display()
    )
}

/// Creates or updates a CRD (server-side apply) and waits until the API
/// server serves its kind.
pub async fn install_crd(
    client: &kube::Client,
    crd: &CustomResourceDefinition,
) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.metadata.name.clone().unwrap_or_default();
    crds.patch(
        &name,
        &PatchParams::apply("voucher-operator-local").force(),
        &Patch::Apply(crd),
    )
    .await
    .with_context(|| format!("cannot apply the CRD {name}"))?;
    let established = kube::runtime::wait::await_condition(
        crds,
        &name,
        kube::runtime::wait::conditions::is_crd_established(),
    );
    tokio::time::timeout(Duration::from_secs(30), established)
        .await
        .map_err(|_| anyhow::anyhow!("the CRD {name} was not established within 30 s"))??;
    Ok(())
}

/// The API server's version, e.g. `v1.37.2`.
pub async fn version(client: &kube::Client) -> String {
    match client.apiserver_version().await {
        Ok(info) => info.git_version,
        Err(error) => format!("(version unknown: {error})"),
    }
}
