//! `voucher-dev local`: the whole product on loopback, for a person or
//! for CI (`--smoke`). Postgres and nats-server from the machine's packages,
//! a real kube-apiserver and etcd built from their upstream modules (or an
//! existing cluster), the kubectl of the same build, and the operator
//! (controller, audit relay, HTTP server) in this process.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use voucher_operator::controller::leader::LeaseSettings;
use voucher_operator::controller::{Config, Role, Settings};
use voucher_operator::events::{self, EventQuery};
use voucher_operator::relay::RelaySettings;
use voucher_operator::server::auth::AuthSettings;
use voucher_operator::server::{self, ServerSettings};
use voucher_operator::store::{DatabaseSettings, Store};
use voucher_testenv::control_plane::{self, Binaries, Pki};
use voucher_testenv::services;
use voucher_testenv::supervisor::{self, Signal};

/// Where the stack keeps its state and which loopback ports it uses.
#[derive(Clone, Debug)]
pub struct StackSettings {
    pub state_dir: PathBuf,
    pub postgres_port: u16,
    pub nats_port: u16,
    pub api_port: u16,
    pub etcd_port: u16,
    pub http_port: u16,
    /// An existing cluster to use instead of starting one.
    pub kubeconfig: Option<PathBuf>,
    /// The examples from Git through Flux (`--gitops`) instead of `kubectl apply`.
    pub gitops: bool,
    /// The Git server's port with `--gitops`; the three after it are Flux's.
    pub git_port: u16,
    /// Namespaces whose Vouchers and campaigns may issue codes (created on the stack's own
    /// cluster).
    pub issuer_namespaces: Vec<String>,
    /// Prometheus scraping the stack (`--prometheus`), on `prometheus_port`.
    pub prometheus: bool,
    pub prometheus_port: u16,
}

/// The example Vouchers the stack applies, embedded so that it runs from anywhere.
pub(crate) const EXAMPLES: [(&str, &str); 5] = [
    (
        "launch-campaign.yaml",
        include_str!("../../../examples/vouchers/launch-campaign.yaml"),
    ),
    (
        "unlimited.yaml",
        include_str!("../../../examples/vouchers/unlimited.yaml"),
    ),
    (
        "scheduled-window.yaml",
        include_str!("../../../examples/vouchers/scheduled-window.yaml"),
    ),
    (
        "orphan-on-delete.yaml",
        include_str!("../../../examples/vouchers/orphan-on-delete.yaml"),
    ),
    (
        "installs-discount.yaml",
        include_str!("../../../examples/vouchers/installs-discount.yaml"),
    ),
];

/// A service of the stack (started under `voucher_testenv`'s supervisor, so
/// it ends with this process whatever happens), stopped with `signal` when
/// the stack ends.
pub(crate) struct Process {
    name: &'static str,
    child: std::process::Child,
    signal: Signal,
}

impl Process {
    pub(crate) async fn stop(self) {
        let Process {
            name,
            mut child,
            signal,
        } = self;
        let _ = tokio::task::spawn_blocking(move || {
            supervisor::stop(&mut child, signal, Duration::from_secs(10));
        })
        .await;
        eprintln!("stopped {name}");
    }
}

/// Waits until `process` listens on `port`. A port that answers while our
/// process has exited belongs to someone else (e.g. a leftover of an earlier
/// run): that is an error, not a ready service.
pub(crate) async fn wait_for_port(
    process: &mut Process,
    port: u16,
    log: &Path,
) -> anyhow::Result<()> {
    let what = process.name;
    let deadline = Instant::now() + Duration::from_secs(30);
    let exited = |process: &mut Process| !matches!(process.child.try_wait(), Ok(None));
    while Instant::now() < deadline && !exited(process) {
        if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .is_ok()
        {
            // A server that cannot bind exits promptly: give it that moment.
            tokio::time::sleep(Duration::from_millis(300)).await;
            if !exited(process) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tail = log_tail(log, 12);
    let log = log.display();
    if exited(process) {
        anyhow::bail!(
            "{what} exited at start (is something else using port {port}, e.g. a stack left \
             running?); the end of {log}:\n{tail}"
        )
    }
    anyhow::bail!("{what} did not start on port {port} within 30 s; the end of {log}:\n{tail}")
}

/// The last `lines` lines of a log: the cause, without a whole earlier run's history.
pub(crate) fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Holds the state directory for this run: a second `local` on it is refused at once, with
/// the way out, instead of failing inside Postgres.
pub(crate) fn lock_state_dir(state_dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = state_dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another `cargo local` is running on {}: stop it (Ctrl-C in its terminal), or give \
             this one its own --state-dir and ports",
            state_dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

pub(crate) fn spawn(
    mut cmd: std::process::Command,
    log: &Path,
    name: &'static str,
    signal: Signal,
) -> anyhow::Result<Process> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stderr(file);
    let child = supervisor::start(cmd).map_err(|e| anyhow::anyhow!("cannot start {name}: {e}"))?;
    Ok(Process {
        name,
        child,
        signal,
    })
}

pub(crate) async fn start_postgres(settings: &StackSettings) -> anyhow::Result<Process> {
    let bin = services::postgres_bin_dir()
        .ok_or_else(|| anyhow::anyhow!("the Postgres server binaries were not found"))?;
    let dir = settings.state_dir.join("postgres");
    std::fs::create_dir_all(&dir)?;
    services::own_for_unprivileged(&dir)?;
    let data = dir.join("data");
    if !data.exists() {
        let output = services::initdb_command(&bin, &data).output()?;
        if !output.status.success() {
            anyhow::bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr));
        }
    }
    let log = dir.join("postgres.log");
    let mut process = spawn(
        services::postgres_command(&bin, &data, settings.postgres_port, &dir),
        &log,
        "postgres",
        Signal::INT,
    )?;
    wait_for_port(&mut process, settings.postgres_port, &log).await?;
    Ok(process)
}

async fn start_nats(settings: &StackSettings) -> anyhow::Result<Process> {
    let binary = voucher_testenv::built::nats_server()?;
    let dir = settings.state_dir.join("nats");
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("nats.log");
    let mut process = spawn(
        services::nats_command(&binary, &dir.join("jetstream"), settings.nats_port),
        &log,
        "nats-server",
        Signal::TERM,
    )?;
    wait_for_port(&mut process, settings.nats_port, &log).await?;
    Ok(process)
}

/// The cluster the stack uses: how to reach it, and which kubectl to run.
pub(crate) struct Cluster {
    pub(crate) kubeconfig: PathBuf,
    pub(crate) kubectl: PathBuf,
    pub(crate) client: kube::Client,
    /// The kubeconfig's namespace: where the examples and admin-issued Vouchers go.
    pub(crate) namespace: String,
    /// Someone else's cluster (`--kubeconfig`): the controller watches only
    /// `namespace`, and an installed CRD is left as it is.
    existing: bool,
}

impl Cluster {
    /// Runs kubectl against the stack's cluster; its stdout, or an error with its stderr.
    pub(crate) async fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        kubectl(&self.kubectl, &self.kubeconfig, args).await
    }
}

pub(crate) async fn kubectl(
    binary: &Path,
    kubeconfig: &Path,
    args: &[&str],
) -> anyhow::Result<String> {
    let output = Command::new(binary)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .await?;
    if !output.status.success() {
        anyhow::bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// etcd and kube-apiserver on loopback, state and certificates kept in the
/// state directory (so a second run finds its Vouchers again).
pub(crate) async fn start_control_plane(
    settings: &StackSettings,
    binaries: &Binaries,
) -> anyhow::Result<(Vec<Process>, Cluster)> {
    let dir = settings.state_dir.join("kubernetes");
    std::fs::create_dir_all(&dir)?;
    let pki = Pki::ensure(&dir.join("pki"))?;
    let etcd_log = dir.join("etcd.log");
    let mut etcd = spawn(
        control_plane::etcd_command(binaries, &dir.join("etcd"), settings.etcd_port),
        &etcd_log,
        "etcd",
        Signal::TERM,
    )?;
    wait_for_port(&mut etcd, settings.etcd_port, &etcd_log).await?;
    let api_log = dir.join("kube-apiserver.log");
    let mut apiserver = spawn(
        control_plane::apiserver_command(
            binaries,
            &pki,
            settings.etcd_port,
            settings.api_port,
            None,
        ),
        &api_log,
        "kube-apiserver",
        Signal::TERM,
    )?;
    let kubeconfig = settings.state_dir.join("kubeconfig");
    let text = pki.admin_kubeconfig(
        &format!("https://127.0.0.1:{}", settings.api_port),
        "default",
    )?;
    std::fs::write(&kubeconfig, &text)?;
    control_plane::wait_ready(
        binaries,
        &kubeconfig,
        Duration::from_secs(90),
        &api_log,
        || matches!(apiserver.child.try_wait(), Ok(None)),
    )
    .await?;
    let client = control_plane::client_for(&text).await?;
    let cluster = Cluster {
        kubeconfig,
        kubectl: binaries.kubectl(),
        client,
        namespace: "default".into(),
        existing: false,
    };
    // Stopped in reverse order: the API server before its storage.
    Ok((vec![etcd, apiserver], cluster))
}

/// An existing cluster, from its kubeconfig; kubectl from PATH, else the one built here.
async fn existing_cluster(kubeconfig: &Path) -> anyhow::Result<Cluster> {
    let text = std::fs::read_to_string(kubeconfig)
        .map_err(|e| anyhow::anyhow!("cannot read the kubeconfig {}: {e}", kubeconfig.display()))?;
    let parsed = kube::config::Kubeconfig::from_yaml(&text)?;
    let config = kube::Config::from_custom_kubeconfig(parsed, &Default::default()).await?;
    let namespace = config.default_namespace.clone();
    eprintln!(
        "using the existing cluster at {} (kubeconfig {}, namespace {namespace})",
        config.cluster_url,
        kubeconfig.display()
    );
    let kubectl = match services::find_on_path("kubectl") {
        Some(path) => path,
        None => Binaries::find_or_build()?.kubectl(),
    };
    Ok(Cluster {
        kubeconfig: kubeconfig.to_path_buf(),
        kubectl,
        client: kube::Client::try_from(config)?,
        namespace,
        existing: true,
    })
}

/// A development token: HS256 with this run's secret, an admin, valid one day.
/// The stack's HS256 secret, kept in the state directory: made on the first
/// run, so that `local token` mints tokens the running stack accepts.
pub fn jwt_secret(state_dir: &std::path::Path) -> anyhow::Result<String> {
    state_secret(state_dir, "jwt-secret")
}

/// A secret of the stack kept in the file `name` of its state directory,
/// made on first use (64 hex characters): the same across restarts.
pub fn state_secret(state_dir: &std::path::Path, name: &str) -> anyhow::Result<String> {
    let path = state_dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(secret) if secret.trim().len() >= 32 => Ok(secret.trim().to_owned()),
        _ => {
            std::fs::create_dir_all(state_dir)?;
            let secret = format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            );
            std::fs::write(&path, &secret)?;
            Ok(secret)
        }
    }
}

/// A development token for the stack: `subject`, with `role` (none for a
/// customer), valid for `valid_for`.
pub fn dev_token(
    secret: &str,
    subject: &str,
    role: Option<&str>,
    valid_for: Duration,
) -> anyhow::Result<String> {
    let mut claims = serde_json::json!({
        "sub": subject,
        "email": format!("{subject}@localhost"),
        "exp": chrono::Utc::now().timestamp() + valid_for.as_secs() as i64,
    });
    if let Some(role) = role {
        claims["role"] = serde_json::json!(role);
    }
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// The database `name` on the stack's Postgres (created when missing): its URL.
pub(crate) async fn ensure_database(
    settings: &StackSettings,
    name: &str,
) -> anyhow::Result<String> {
    let admin = Store::connect(&DatabaseSettings {
        url: format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            settings.postgres_port
        ),
        max_connections: 1,
        ..Default::default()
    })
    .await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(admin.pool())
            .await?;
    if !exists {
        // A name of our own making (billing, billing_sov1, …): nothing to quote.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(admin.pool())
            .await?;
    }
    Ok(format!(
        "postgres://postgres@127.0.0.1:{}/{name}",
        settings.postgres_port
    ))
}

/// The `voucher-operator` binary of this tree, beside this one (same target directory and
/// profile): built first when this runs under cargo (`cargo local`), so that the banner's
/// `$VOUCHER_OPERATOR` is the code that runs here.
fn operator_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no directory", exe.display()))?;
    let binary = dir.join("voucher-operator");
    if let Some(cargo) = std::env::var_os("CARGO") {
        // target/debug is the profile `dev`; every other profile's directory is its name.
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(name) => name,
        };
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--bin",
                "voucher-operator",
                "--profile",
                profile,
            ])
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
            .status()?;
        if !status.success() {
            anyhow::bail!("cargo build --bin voucher-operator failed ({status})");
        }
    }
    if !binary.exists() {
        anyhow::bail!(
            "{} is missing: build it with `cargo build --bin voucher-operator` (or run `cargo local`)",
            binary.display()
        );
    }
    Ok(binary)
}

/// Starts everything, prints what to try (or runs the smoke check), and
/// stops everything on Ctrl-C / SIGTERM (or when the smoke check ends).
pub async fn run(settings: StackSettings, smoke: bool) -> anyhow::Result<()> {
    services::ensure_packages()?;
    // Built before anything starts: the first build takes a while.
    let binaries = match settings.kubeconfig {
        None => Some(Binaries::find_or_build()?),
        Some(_) => None,
    };
    let operator = operator_binary()?;
    std::fs::create_dir_all(&settings.state_dir)?;
    if services::is_root() {
        // Postgres runs unprivileged and must reach its directory inside.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&settings.state_dir, std::fs::Permissions::from_mode(0o711))?;
    }
    let stop = voucher_operator::telemetry::shutdown_signal();
    let postgres = start_postgres(&settings).await?;
    let result = async {
        let nats = start_nats(&settings).await?;
        let outcome = async {
            let (processes, cluster) = match (&settings.kubeconfig, &binaries) {
                (Some(kubeconfig), _) => (Vec::new(), existing_cluster(kubeconfig).await?),
                (None, Some(binaries)) => start_control_plane(&settings, binaries).await?,
                (None, None) => unreachable!("the binaries are built when no cluster is given"),
            };
            let outcome = run_operator(&settings, &cluster, &operator, smoke, stop.clone()).await;
            stop.cancel();
            for process in processes.into_iter().rev() {
                process.stop().await;
            }
            outcome
        }
        .await;
        stop.cancel();
        nats.stop().await;
        outcome
    }
    .await;
    stop.cancel();
    postgres.stop().await;
    result
}

async fn run_operator(
    settings: &StackSettings,
    cluster: &Cluster,
    operator: &Path,
    smoke: bool,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let database_url = ensure_database(settings, "billing").await?;
    let store = Store::connect(&DatabaseSettings {
        url: database_url.clone(),
        max_connections: 20,
        ..Default::default()
    })
    .await?;
    store.migrate().await?;

    install_crds(cluster).await?;
    ensure_namespaces(settings, cluster).await?;
    // Someone else's cluster keeps its own admission (the chart's, when it is installed).
    if !cluster.existing {
        crate::admission::install(settings, cluster).await?;
    }
    let flux = match settings.gitops {
        true => crate::gitops::start(settings, cluster).await?,
        false => {
            apply_examples(settings, cluster).await?;
            Vec::new()
        }
    };
    let outcome = serve(
        settings,
        cluster,
        store,
        database_url,
        operator,
        smoke,
        stop,
    )
    .await;
    for process in flux.into_iter().rev() {
        process.stop().await;
    }
    outcome
}

/// The controller, the audit relay and the HTTP server, until `stop` (or the smoke run ends).
async fn serve(
    settings: &StackSettings,
    cluster: &Cluster,
    store: Store,
    database_url: String,
    operator: &Path,
    smoke: bool,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let relay = RelaySettings {
        nats_url: format!("nats://127.0.0.1:{}", settings.nats_port),
        ..Default::default()
    };
    let secret = jwt_secret(&settings.state_dir)?;
    let roles = spawn_roles(settings, cluster, store, &relay, &secret, &stop).await?;
    let day = Duration::from_secs(24 * 3600);
    let token = dev_token(&secret, "local-developer", Some("superadmin"), day)?;
    let service = dev_token(&secret, "billing-service", Some("billing-service"), day)?;
    let base = format!("http://127.0.0.1:{}", settings.http_port);
    let exports = crate::banner::Exports::new(&crate::banner::Values {
        state_dir: &settings.state_dir,
        kubeconfig: &cluster.kubeconfig,
        kubectl_dir: cluster.kubectl.parent().unwrap_or(Path::new("")),
        base: &base,
        token: &token,
        service: &service,
        database_url: &database_url,
        nats_url: &relay.nats_url,
        operator,
    });
    let env_file = exports.write(&settings.state_dir)?;
    let prometheus = match settings.prometheus {
        true => Some(crate::prometheus::start(settings).await?),
        false => None,
    };
    let outcome = match smoke {
        true => {
            // The smoke's own customer: the banner's commands redeem as local-developer.
            let customer = dev_token(&secret, SMOKE_CUSTOMER, None, Duration::from_secs(3600))?;
            smoke_check(cluster, &base, (&customer, &service), &relay).await?;
            smoke_more(settings, cluster, &env_file, &base).await
        }
        false => {
            crate::banner::print_try(&settings.state_dir, &exports, &env_file, &base);
            print_more(settings, cluster).map(|()| println!("\nCtrl-C stops everything."))?;
            stop.cancelled().await;
            Ok(())
        }
    };
    // The controller and the server end (releasing the Lease, finishing a reconcile) before
    // the API server and the databases they talk to stop: a clean shutdown says nothing.
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        for role in roles {
            let _ = role.await;
        }
    })
    .await;
    if let Some(prometheus) = prometheus {
        prometheus.stop().await;
    }
    outcome
}

/// The controller (with the relay) and the HTTP server, as tasks that end with `stop`.
async fn spawn_roles(
    settings: &StackSettings,
    cluster: &Cluster,
    store: Store,
    relay: &RelaySettings,
    secret: &str,
    stop: &CancellationToken,
) -> anyhow::Result<[tokio::task::JoinHandle<()>; 2]> {
    let client = cluster.client.clone();
    let mut registry = prometheus_client::registry::Registry::default();
    let config = controller_config(settings, cluster, relay);
    let role = Role::new(client.clone(), store.clone(), config, &mut registry);
    let role_stop = stop.clone();
    let controller = tokio::spawn(async move {
        if let Err(error) = role.run(role_stop).await {
            tracing::error!(error = %error, "the controller stopped");
        }
    });
    let config = server::Config {
        auth: AuthSettings {
            hs256_secret: Some(secret.to_owned()),
            ..Default::default()
        },
        // Generous limits: a person trying the API by hand should not hit them.
        settings: ServerSettings {
            rate_limit_per_minute: 600,
            rate_limit_burst: 100,
            admin_namespace: cluster.namespace.clone(),
            ..Default::default()
        },
        listen: (Ipv4Addr::LOCALHOST, settings.http_port).into(),
        claimer: None,
        admin: None,
        metrics: None,
    };
    // The controller's metrics beside the server's, on its /metrics.
    let http = server::Role::new(store, Some(client), config, registry).await?;
    let http_stop = stop.clone();
    let server = tokio::spawn(async move {
        if let Err(error) = http.run(http_stop).await {
            tracing::error!(error = %error, "the server stopped");
        }
    });
    Ok([controller, server])
}

/// `--smoke` after the main flow: what the banner, the admission policy, the README, Flux and
/// Prometheus promise, each where it applies.
async fn smoke_more(
    settings: &StackSettings,
    cluster: &Cluster,
    env_file: &Path,
    base: &str,
) -> anyhow::Result<()> {
    crate::banner::smoke(&settings.state_dir, env_file, base).await?;
    if !cluster.existing {
        crate::admission::smoke(cluster).await?;
    }
    // The README's commands assume its own stack and examples from kubectl.
    if !cluster.existing && !settings.gitops {
        crate::walkthrough::run(&settings.state_dir).await?;
    }
    if settings.gitops {
        crate::gitops::smoke(settings, cluster).await?;
    }
    if settings.prometheus {
        crate::prometheus::smoke(settings).await?;
    }
    Ok(())
}

/// The banner's parts after its commands: the admission policy, Flux, Prometheus.
fn print_more(settings: &StackSettings, cluster: &Cluster) -> anyhow::Result<()> {
    if !cluster.existing {
        crate::admission::print_try(cluster);
    }
    if settings.gitops {
        crate::gitops::print_try(settings.git_port);
    }
    if settings.prometheus {
        crate::prometheus::print_try(settings)?;
    }
    Ok(())
}

/// The CRDs, established, before anything uses them.
async fn install_crds(cluster: &Cluster) -> anyhow::Result<()> {
    let crds: kube::Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    > = kube::Api::all(cluster.client.clone());
    for crd in voucher_operator::api::crds() {
        let crd_name = crd.metadata.name.clone().unwrap_or_default();
        if cluster.existing && crds.get_opt(&crd_name).await?.is_some() {
            // Installed by its owner (Helm, Flux): neither taken over nor changed.
            eprintln!("the CRD {crd_name} is installed already; left as it is");
        } else {
            control_plane::install_crd(&cluster.client, &crd).await?;
        }
    }
    Ok(())
}

/// The example Vouchers, created with kubectl when missing: a restart keeps what the user
/// changed (`kubectl apply -f examples/vouchers` restores them).
async fn apply_examples(settings: &StackSettings, cluster: &Cluster) -> anyhow::Result<()> {
    let manifests = settings.state_dir.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let mut kept = Vec::new();
    for (name, text) in EXAMPLES {
        let file = manifests.join(name);
        std::fs::write(&file, text)?;
        let output = Command::new(&cluster.kubectl)
            .args(["create", "-n", &cluster.namespace, "-f"])
            .arg(&file)
            .env("KUBECONFIG", &cluster.kubeconfig)
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        print!("{}", String::from_utf8_lossy(&output.stdout));
        if !output.status.success() {
            if !only_already_exists(&stderr) {
                anyhow::bail!("kubectl create -f {name} failed: {}", stderr.trim());
            }
            kept.push(name);
        }
    }
    if !kept.is_empty() {
        println!(
            "kept as they are (a restart never applies over your changes; kubectl apply -f \
             examples/vouchers restores them): {}",
            kept.join(", ")
        );
    }
    Ok(())
}

/// Whether every error kubectl printed is an object that exists already.
fn only_already_exists(stderr: &str) -> bool {
    let errors: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    !errors.is_empty() && errors.iter().all(|l| l.contains("(AlreadyExists)"))
}

/// The controller as a deployment runs it, under a Lease: a second
/// controller started by hand against this cluster waits instead of
/// reconciling too.
fn controller_config(settings: &StackSettings, cluster: &Cluster, relay: &RelaySettings) -> Config {
    // On someone else's cluster, only the kubeconfig's namespace: the examples, the admin
    // endpoints and the keys all go there.
    let (issuers, key_namespace) = match cluster.existing {
        true => (vec![cluster.namespace.clone()], cluster.namespace.clone()),
        false => (
            settings.issuer_namespaces.clone(),
            voucher_operator::controller::DEFAULT_KEY_NAMESPACE.to_owned(),
        ),
    };
    Config {
        settings: Settings {
            resync_interval: Duration::from_secs(300),
            status_min_interval: Duration::from_secs(1),
            namespace: cluster.existing.then(|| cluster.namespace.clone()),
            identity: "local".into(),
            concurrency: 4,
            issuers: voucher_operator::domain::Issuers::new(issuers),
            // As the chart keeps them: a namespace of their own, the only one whose Secrets the
            // controller reads.
            key_namespace,
            global_namespace: "catalyst-global".into(),
            joined: None,
            billing: Default::default(),
        },
        relay: Some(relay.clone()),
        lease: Some(LeaseSettings {
            name: "voucher-operator".into(),
            namespace: cluster.namespace.clone(),
            identity: "local".into(),
            duration: Duration::from_secs(15),
        }),
    }
}

/// The issuer namespaces and the campaign keys' namespace, on the stack's own
/// cluster (another's namespaces are its owner's to make).
async fn ensure_namespaces(settings: &StackSettings, cluster: &Cluster) -> anyhow::Result<()> {
    if cluster.existing {
        return Ok(());
    }
    let namespaces = settings
        .issuer_namespaces
        .iter()
        .map(String::as_str)
        .chain([voucher_operator::controller::DEFAULT_KEY_NAMESPACE]);
    for namespace in namespaces {
        let manifest = format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{{\"name\":\"{namespace}\"}}}}"
        );
        let file = settings.state_dir.join("namespace.json");
        std::fs::write(&file, manifest)?;
        cluster
            .kubectl(&["apply", "--server-side", "-f", &file.to_string_lossy()])
            .await?;
    }
    Ok(())
}

/// The main flow once: every example Ready, a redemption of a credit and of
/// a discount, REDEEMED 1 in `kubectl get vouchers`, and both audit events
/// (`redeemed`, `discount_granted`) in JetStream.
async fn smoke_check(
    cluster: &Cluster,
    base: &str,
    (token, service): (&str, &str),
    relay: &RelaySettings,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let wait = |what: &'static str| wait_until(deadline, what);
    loop {
        let phases = cluster
            .kubectl(&[
                "get",
                "vouchers",
                "-n",
                &cluster.namespace,
                "-o",
                "jsonpath={.items[*].status.phase}",
            ])
            .await?;
        if phases.split_whitespace().count() == EXAMPLES.len() {
            println!("smoke: every example Voucher reconciled: {phases}");
            break;
        }
        wait("every Voucher to get a phase").await?;
    }
    // The controller leads through its Lease, as a deployment's does.
    let holder = cluster
        .kubectl(&[
            "get",
            "lease",
            "voucher-operator",
            "-n",
            &cluster.namespace,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .await?;
    if holder.trim() != "local" {
        anyhow::bail!("smoke: the Lease voucher-operator is held by {holder:?}, not local");
    }
    println!("smoke: the controller holds the Lease voucher-operator");
    for code in ["OMANTEL-MUSCAT-200", "INSTALLS-20-3M"] {
        let body = smoke_redeem(base, token, code).await?;
        println!("smoke: redeemed {code}: {body}");
    }
    let table = loop {
        let redeemed = cluster
            .kubectl(&[
                "get",
                "voucher",
                "omantel-muscat-200",
                "-n",
                &cluster.namespace,
                "-o",
                "jsonpath={.status.timesRedeemed}",
            ])
            .await?;
        if redeemed.trim() == "1" {
            break cluster
                .kubectl(&["get", "vouchers", "-n", &cluster.namespace])
                .await?;
        }
        wait("REDEEMED 1 in kubectl get vouchers").await?;
    };
    print!("{table}");
    smoke_commit(base, service).await?;
    smoke_event(relay, deadline, ("OMANTEL-MUSCAT-200", "redeemed"), 1).await?;
    smoke_event(relay, deadline, ("INSTALLS-20-3M", "discount_granted"), 1).await
}

/// The billing service commits an order of the smoke customer: its install line takes the
/// 20 % of the discount redeemed above.
async fn smoke_commit(base: &str, service: &str) -> anyhow::Result<()> {
    let order = serde_json::json!({"user_id": SMOKE_CUSTOMER, "order_id": "SMOKE-1",
        "lines": [{"id": "1", "category": "install", "amount": 50000},
                  {"id": "2", "category": "support", "amount": 8000}]});
    let response = reqwest::Client::new()
        .post(format!("{base}/billing/vouchers/checkout/commit"))
        .bearer_auth(service)
        .json(&order)
        .send()
        .await?;
    let status = response.status();
    let body: serde_json::Value = response.json().await?;
    if status != 200 || body["discount"] != 10_000 {
        anyhow::bail!("smoke: the commit answered {status}: {body} (expected 10000 off)");
    }
    println!("smoke: committed order SMOKE-1: {body}");
    Ok(())
}

/// The customer of `--smoke`'s own redemptions and order.
const SMOKE_CUSTOMER: &str = "smoke-customer";

/// Redeems `code` for the smoke customer: the answer, which must be a 200.
pub(crate) async fn smoke_redeem(base: &str, token: &str, code: &str) -> anyhow::Result<String> {
    let response = reqwest::Client::new()
        .post(format!("{base}/billing/vouchers/redeem"))
        .bearer_auth(token)
        .json(&serde_json::json!({"code": code, "tenant_id": "smoke"}))
        .send()
        .await?;
    let status = response.status();
    let body = response.text().await?;
    if status != 200 {
        anyhow::bail!("smoke: the redemption of {code} answered {status}: {body}");
    }
    Ok(body)
}

/// Sleeps a moment before looking again, unless `deadline` passed.
pub(crate) async fn wait_until(deadline: Instant, what: &'static str) -> anyhow::Result<()> {
    if Instant::now() > deadline {
        anyhow::bail!("smoke: timed out waiting for {what}");
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    Ok(())
}

/// Waits for `at_least` audit events (of `code`, of `kind`) in JetStream.
pub(crate) async fn smoke_event(
    relay: &RelaySettings,
    deadline: Instant,
    (code, kind): (&str, &'static str),
    at_least: usize,
) -> anyhow::Result<()> {
    let query = EventQuery {
        code: Some(code.into()),
        kind: Some(kind.into()),
        ..Default::default()
    };
    /// Counts the events it is handed.
    struct Count(usize);
    impl events::EventSink for Count {
        fn event(&mut self, _: &serde_json::Value) -> std::io::Result<()> {
            self.0 += 1;
            Ok(())
        }
        fn caught_up(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    loop {
        let mut found = Count(0);
        let read = events::follow_events(
            &relay.nats_url,
            &relay.nats_auth,
            &relay.stream,
            &relay.subject_prefix,
            &query,
            &mut found,
        )
        .await;
        if read.is_ok() && found.0 >= at_least {
            println!(
                "smoke: {} {kind} event(s) of {code} reached JetStream ({} at {})",
                found.0, relay.stream, relay.nats_url
            );
            return Ok(());
        }
        wait_until(deadline, "the redemptions' events in JetStream").await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_local_on_the_same_state_directory_is_refused_with_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_state_dir(dir.path()).unwrap();
        let error = lock_state_dir(dir.path()).unwrap_err().to_string();
        assert!(error.contains("another `cargo local`"), "{error}");
        assert!(error.contains("--state-dir"), "{error}");
        drop(first);
        lock_state_dir(dir.path()).expect("free once the first run ends");
    }

    #[test]
    fn a_restart_keeps_the_examples_the_user_changed_and_fails_on_anything_else() {
        let cases = [
            (
                "Error from server (AlreadyExists): error when creating \"a.yaml\": vouchers \"x\" already exists\n",
                true,
                "every object exists",
            ),
            (
                "Error from server (AlreadyExists): …\nError from server (Forbidden): …\n",
                false,
                "one refused",
            ),
            (
                "error: the server doesn't have a resource type \"vouchers\"\n",
                false,
                "no CRD",
            ),
            ("", false, "a failure without a message is not success"),
        ];
        for (stderr, kept, reason) in cases {
            assert_eq!(only_already_exists(stderr), kept, "{reason}");
        }
    }

    #[test]
    fn a_failed_start_shows_the_end_of_the_log_not_all_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("postgres.log");
        let text: Vec<String> = (0..500).map(|i| format!("line {i}")).collect();
        std::fs::write(&log, text.join("\n")).unwrap();
        let tail = log_tail(&log, 12);
        assert_eq!(tail.lines().count(), 12);
        assert!(
            tail.ends_with("line 499") && !tail.contains("line 487\n"),
            "{tail}"
        );
    }
}
