//! Real services for the integration tests: a throwaway Postgres cluster, a
//! nats-server with JetStream and a Kubernetes API server (`cluster`), each
//! started once per test binary on a free loopback port in a temporary
//! directory, and stopped and removed when the test binary exits (or dies:
//! each then gets its stop signal).
//!
//! A missing server binary is a test failure with the command that installs
//! it, never a skip.

#![allow(dead_code)] // each test binary uses its own part of the support code

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use voucher_testenv::services;
use voucher_testenv::supervisor::{self, Signal};

pub mod cluster;
pub mod faults;
pub mod flux;
pub mod gitops;
pub mod pg_faults;
pub mod prometheus;
pub mod tcp_cut;

pub struct Postgres {
    pub port: u16,
    pub bin: PathBuf,
    dir: PathBuf,
}

pub struct Nats {
    pub port: u16,
    pub url: String,
    binary: PathBuf,
    dir: PathBuf,
    /// A hub or a leaf node (its name, the JetStream domain): `None`, a plain server.
    node: Option<(String, services::NatsRole)>,
    /// The server's environment (the passwords a configuration names).
    env: Vec<(String, String)>,
}

impl Postgres {
    pub fn admin_url(&self) -> String {
        self.url_for("postgres")
    }

    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The server's data directory (its configuration files).
    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Turns TLS on with the serving certificate of `pki` (localhost, 127.0.0.1); with
    /// `plain_refused`, every connection without TLS is refused from then on. Returns once a
    /// new connection sees it (a reload takes a moment).
    pub async fn serve_tls(&self, pki: &voucher_testenv::control_plane::Pki, plain_refused: bool) {
        use std::os::unix::fs::MetadataExt;
        voucher_operator::install_tls_provider();
        let data = self.data_dir();
        let owner = std::fs::metadata(&data).unwrap();
        for (from, to) in [
            ("apiserver.crt", "server.crt"),
            ("apiserver.key", "server.key"),
        ] {
            let target = data.join(to);
            std::fs::copy(pki.dir.join(from), &target).unwrap();
            // Postgres reads its key only when its own user owns it, readable by no one else.
            std::os::unix::fs::chown(&target, Some(owner.uid()), Some(owner.gid())).unwrap();
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        if plain_refused {
            let hba =
                "local all all trust\nhostnossl all all all reject\nhostssl all all all trust\n";
            std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        }
        let admin = pool(&self.admin_url()).await;
        for statement in ["ALTER SYSTEM SET ssl = on", "SELECT pg_reload_conf()"] {
            sqlx::query(statement).execute(&admin).await.unwrap();
        }
        admin.close().await;
        // Seen when a new connection without TLS is refused, or one that requires TLS works.
        let (probe, works) = if plain_refused {
            ("sslmode=disable", false)
        } else {
            ("sslmode=require", true)
        };
        let url = format!("{}?{probe}", self.admin_url());
        for _ in 0..50 {
            let connected = PgPoolOptions::new().max_connections(1).connect(&url).await;
            if connected.is_ok() == works {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("Postgres did not take TLS on after its reload ({probe})");
    }
}

/// The Postgres server of this test binary, started on first use.
pub fn postgres() -> &'static Postgres {
    static SERVER: OnceLock<Postgres> = OnceLock::new();
    SERVER.get_or_init(start_postgres)
}

/// The nats-server (JetStream enabled) of this test binary, started on first use.
pub fn nats() -> &'static Nats {
    static SERVER: OnceLock<Nats> = OnceLock::new();
    SERVER.get_or_init(start_nats)
}

/// A new, empty database on the shared server; its URL.
pub async fn fresh_database(prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let server = postgres();
    let name = format!(
        "{prefix}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&server.admin_url())
        .await
        .expect("connect to the test Postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .expect("create test database");
    admin.close().await;
    server.url_for(&name)
}

/// The billing service's checkout, as the seed runs it: the customer (found or created), then
/// five statements under the code's row lock — lock the code and check it as it knows
/// codes (live, active, under its cap), refuse a second redemption by the customer, then the
/// redemption, the counter and the ledger grant — knowing nothing of windows, campaigns or
/// suspensions. The database's error message, as the checkout would show it, on a refusal.
pub async fn seed_checkout(pool: &PgPool, code: &str, user: &str) -> Result<(), String> {
    let run = async {
        let mut tx = pool.begin().await?;
        let customer: uuid::Uuid = sqlx::query_scalar(
            "INSERT INTO customers (user_id, tenant_id, email) VALUES ($1, 't', '') \
             ON CONFLICT (user_id) DO UPDATE SET email = EXCLUDED.email RETURNING id",
        )
        .bind(user)
        .fetch_one(&mut *tx)
        .await?;
        let (credit, usable): (i32, bool) = sqlx::query_as(
            "SELECT credit_omr, deleted_at IS NULL AND active \
               AND (max_redemptions = 0 OR times_redeemed < max_redemptions) \
             FROM promo_codes WHERE code = $1 FOR UPDATE",
        )
        .bind(code)
        .fetch_one(&mut *tx)
        .await?;
        let again: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM promo_redemptions WHERE customer_id = $1 AND code = $2)",
        )
        .bind(customer)
        .bind(code)
        .fetch_one(&mut *tx)
        .await?;
        if !usable || again {
            return Ok::<_, sqlx::Error>(Err("the checkout's own checks refused it".to_owned()));
        }
        sqlx::query("INSERT INTO promo_redemptions (customer_id, code) VALUES ($1, $2)")
            .bind(customer)
            .bind(code)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE promo_codes SET times_redeemed = times_redeemed + 1 WHERE code = $1")
            .bind(code)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO credit_ledger (customer_id, amount_omr, reason) VALUES ($1, $2, 'promo:' || $3)",
        )
        .bind(customer)
        .bind(credit)
        .bind(code)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Ok(()))
    };
    match run.await {
        Ok(outcome) => outcome,
        Err(sqlx::Error::Database(error)) => Err(error.message().to_owned()),
        Err(other) => panic!("{other}"),
    }
}

pub async fn pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(20)
        .connect(url)
        .await
        .expect("connect to the test database")
}

fn start_postgres() -> Postgres {
    let bin = services::postgres_bin_dir().unwrap_or_else(|| {
        panic!(
            "the Postgres server binaries (initdb, postgres) were not found: install them with \
             `apt-get install -y postgresql` or set PG_BIN (bash .ci/test does this)"
        )
    });
    let dir = scratch_dir("pg");
    let output = services::initdb_command(&bin, &dir.join("data"))
        .output()
        .expect("run initdb");
    assert!(
        output.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let server = Postgres {
        port: free_port(),
        bin,
        dir,
    };
    server.launch();
    server
}

fn log_file(path: PathBuf) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

/// A Postgres server of the caller's own (to back up, restore or stop without
/// disturbing the other tests).
pub fn postgres_of_its_own() -> Postgres {
    start_postgres()
}

impl Postgres {
    /// A physical backup of this server (`pg_basebackup`), started as it is on
    /// a port of its own: a restore from that backup, as an operator of the
    /// database would do it by copying a base backup back.
    pub fn restored_copy(&self) -> Postgres {
        let dir = scratch_dir("pg-restored");
        let output = services::pg_basebackup_command(&self.bin, self.port, &dir.join("data"))
            .output()
            .expect("run pg_basebackup");
        assert!(
            output.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let copy = Postgres {
            port: free_port(),
            bin: self.bin.clone(),
            dir,
        };
        copy.launch();
        copy
    }

    /// Stops this server (a fast shutdown).
    pub fn stop(&self) {
        stop_service(&self.dir, None);
    }

    fn launch(&self) {
        let mut postgres =
            services::postgres_command(&self.bin, &self.dir.join("data"), self.port, &self.dir);
        postgres.stderr(log_file(self.dir.join("postgres.log")));
        supervise(postgres, Signal::INT, self.dir.clone());
        wait_for_port(self.port, "postgres", &self.dir.join("postgres.log"));
    }

    /// Stops the server the hard way (immediate shutdown: every connection
    /// is cut, open transactions are lost) and starts it again on the same
    /// data and port, like a crash and restart of the database.
    pub fn restart(&self) {
        self.restart_after(Duration::ZERO);
    }

    /// [`Self::restart`], the server staying down for `down` first.
    pub fn restart_after(&self, down: Duration) {
        // SIGQUIT: Postgres's immediate shutdown.
        stop_service(&self.dir, Some(Signal::QUIT));
        std::thread::sleep(down);
        self.launch();
    }
}

/// The nats-server of `tools/nats`, built once per machine (bash .ci/test
/// builds it first; a test builds it when it is missing).
fn nats_server() -> PathBuf {
    voucher_testenv::built::nats_server().unwrap_or_else(|e| panic!("{e:#}"))
}

fn start_nats() -> Nats {
    let binary = nats_server();
    let port = free_port();
    let nats = Nats {
        port,
        url: format!("nats://127.0.0.1:{port}"),
        binary,
        dir: scratch_dir("nats"),
        node: None,
        env: Vec::new(),
    };
    nats.start();
    nats
}

/// The vendor's hub (JetStream domain `hub`) accepting leaf nodes on `leaf_port`, with an
/// account for each of `sovereigns` (`voucher_testenv::services::hub_accounts`).
pub fn nats_hub(leaf_port: u16, sovereigns: &[&str]) -> Nats {
    let sovereigns: Vec<String> = sovereigns.iter().map(|s| s.to_string()).collect();
    let accounts =
        services::hub_accounts(&sovereigns, services::AUDIT_STREAM, services::AUDIT_PREFIX);
    nats_hub_with(leaf_port, accounts, &[])
}

/// The vendor's hub with the accounts configuration `accounts` (e.g. the chart's), the
/// nats-server's environment `env` holding the passwords it names.
pub fn nats_hub_with(leaf_port: u16, accounts: String, env: &[(&str, &str)]) -> Nats {
    let role = services::NatsRole::Hub {
        leaf_port,
        accounts,
    };
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    nats_node_with("hub", role, env)
}

/// A Sovereign's leaf node named `name` (its own JetStream domain), connected
/// to a hub's leaf port — directly, or through a proxy the test can cut.
/// A nats-server named `name` (its JetStream domain too) configured by `config`, with the
/// environment `env` holding the passwords it names.
pub fn nats_configured(name: &str, config: String, env: &[(&str, &str)]) -> Nats {
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    nats_node_with(name, services::NatsRole::Configured { config }, env)
}

pub fn nats_leaf(name: &str, hub_leaf_port: u16) -> Nats {
    nats_node(name, services::NatsRole::Leaf { hub_leaf_port })
}

fn nats_node(name: &str, role: services::NatsRole) -> Nats {
    nats_node_with(name, role, Vec::new())
}

fn nats_node_with(name: &str, role: services::NatsRole, env: Vec<(String, String)>) -> Nats {
    let port = free_port();
    let nats = Nats {
        port,
        url: format!("nats://127.0.0.1:{port}"),
        binary: nats_server(),
        dir: scratch_dir(&format!("nats-{name}")),
        node: Some((name.to_owned(), role)),
        env,
    };
    nats.start();
    nats
}

/// A nats-server (JetStream enabled) of the caller's own, to stop and start
/// without disturbing the other tests.
pub fn nats_of_its_own() -> Nats {
    start_nats()
}

/// Another nats-server (JetStream enabled) that admits only `user` with `password`.
pub fn nats_with_password(user: &str, password: &str) -> Nats {
    let binary = nats_server();
    let port = free_port();
    let nats = Nats {
        port,
        url: format!("nats://127.0.0.1:{port}"),
        binary,
        dir: scratch_dir("nats-auth"),
        node: None,
        env: Vec::new(),
    };
    let mut cmd = services::nats_command(&nats.binary, &nats.dir.join("jetstream"), port);
    cmd.args(["--user", user, "--pass", password]);
    cmd.stderr(log_file(nats.dir.join("nats.log")));
    supervise(cmd, Signal::TERM, nats.dir.clone());
    wait_for_port(port, "nats-server", &nats.dir.join("nats.log"));
    nats
}

impl Nats {
    /// Starts the server (again) on the same port and JetStream store.
    pub fn start(&self) {
        let mut nats = match &self.node {
            None => services::nats_command(&self.binary, &self.dir.join("jetstream"), self.port),
            Some((name, role)) => {
                services::nats_node_command(&self.binary, &self.dir, name, self.port, role)
                    .expect("the nats-server configuration")
            }
        };
        nats.stderr(log_file(self.dir.join("nats.log")));
        nats.envs(self.env.iter().map(|(k, v)| (k, v)));
        supervise(nats, Signal::TERM, self.dir.clone());
        wait_for_port(self.port, "nats-server", &self.dir.join("nats.log"));
    }

    /// Stops the server; its JetStream data stays for `start`.
    pub fn stop(&self) {
        stop_service(&self.dir, None);
    }
}

/// A directory of this test binary's own, removed by the first test binary
/// that starts after this one ended (its services end with it).
fn scratch_dir(what: &str) -> PathBuf {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(remove_stale_scratch_dirs);
    let dir = tempfile::Builder::new()
        .prefix(&format!(
            "voucher-operator-test-{}-{what}-",
            std::process::id()
        ))
        .tempdir()
        .expect("create a temporary directory")
        .keep();
    services::own_for_unprivileged(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// Removes the scratch directories of test binaries that are no longer running.
fn remove_stale_scratch_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = name
            .strip_prefix("voucher-operator-test-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = owner
            && pid != std::process::id()
            && !supervisor::is_running(pid)
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs `cmd` with `input` on its standard input; its output, captured.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> std::process::Output {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}

fn wait_for_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{what} did not start listening on port {port} within 30 s; its log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

struct Supervised {
    child: Child,
    stop_signal: Signal,
    dir: PathBuf,
}

static SUPERVISED: Mutex<Vec<Supervised>> = Mutex::new(Vec::new());

/// Starts `cmd` (a service command of `voucher_testenv`) under the one
/// supervisor: it cannot outlive this test binary, however the binary ends.
/// Its directory goes with the next test binary's start (see `scratch_dir`).
fn supervise(cmd: Command, stop_signal: Signal, dir: PathBuf) -> u32 {
    let child = supervisor::start(cmd).expect("start test service");
    let pid = child.id();
    SUPERVISED.lock().unwrap().push(Supervised {
        child,
        stop_signal,
        dir,
    });
    pid
}

/// Stops the supervised service whose directory is `dir` with `signal`
/// (its own stop signal unless told otherwise), and waits for it.
fn stop_service(dir: &Path, signal: Option<Signal>) {
    let mut running = SUPERVISED.lock().unwrap();
    if let Some(i) = running.iter().position(|s| s.dir == dir) {
        let mut old = running.remove(i);
        let signal = signal.unwrap_or(old.stop_signal);
        supervisor::stop(&mut old.child, signal, Duration::from_secs(10));
    }
}

/// Whether our child `pid` still runs (an exited child stays a zombie until waited for).
fn is_running(pid: u32) -> bool {
    supervisor::is_running(pid)
}

/// Logs of the code under test, shown for failing tests; RUST_LOG filters them.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,voucher_operator=info")
            }),
        )
        .with_test_writer()
        .try_init();
}

/// A plain HTTP/1.0 GET on loopback, for probe and metrics endpoints.
pub async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body).await;
    body
}

/// The controller's settings for the one namespace `ns`, which is also the issuer
/// namespace and the campaign keys' (a test changes what it needs with `..`).
pub fn controller_settings(ns: &str) -> voucher_operator::controller::Settings {
    voucher_operator::controller::Settings {
        resync_interval: Duration::from_secs(3600),
        status_min_interval: Duration::from_millis(200),
        namespace: Some(ns.to_owned()),
        identity: "test".into(),
        concurrency: 4,
        issuers: voucher_operator::domain::Issuers::new([ns.to_owned()]),
        key_namespace: ns.to_owned(),
        global_namespace: "catalyst-global".into(),
        joined: None,
        billing: Default::default(),
    }
}

/// A redemption of `code` by `customer` now, as the checkout asks for it.
pub fn redemption(
    code: &voucher_operator::domain::Code,
    customer: &str,
) -> voucher_operator::store::redeem::Redemption {
    voucher_operator::store::redeem::Redemption {
        code: code.clone(),
        subject: customer.to_owned(),
        tenant: Some("t".into()),
        email: String::new(),
        idempotency: None,
        now: chrono::Utc::now(),
        currency: Default::default(),
        intent: None,
    }
}

/// Server settings for tests: a rate limit no test reaches unless it lowers
/// it, small bodies, a generous timeout.
pub fn server_settings() -> voucher_operator::server::ServerSettings {
    voucher_operator::server::ServerSettings {
        billing: Default::default(),
        rate_limit_per_minute: 1_000_000,
        rate_limit_burst: 100_000,
        rate_limit_per_subject: 1_000_000,
        auth_failures_per_minute: 1_000_000,
        guesses_per_minute: 1_000_000,
        trusted_proxies: Vec::new(),
        admin_namespace: "default".into(),
        body_limit: 4096,
        request_timeout: Duration::from_secs(10),
        idempotency_retention: Duration::from_secs(24 * 3600),
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_connections: 4096,
        max_connections_per_client: 4096,
    }
}

/// Serves the HTTP API on a free loopback port until the token is cancelled;
/// returns its base URL.
pub async fn serve_http(
    store: voucher_operator::store::Store,
    settings: voucher_operator::server::ServerSettings,
    auth: voucher_operator::server::auth::AuthSettings,
    kube: Option<kube::Client>,
) -> (String, tokio_util::sync::CancellationToken) {
    serve_http_joined(store, settings, auth, kube, None).await
}

/// [`serve_http`] of a Sovereign's server joined to a hub for once-per-
/// customer-anywhere redemptions (its recovery running beside it).
pub async fn serve_http_joined(
    store: voucher_operator::store::Store,
    settings: voucher_operator::server::ServerSettings,
    auth: voucher_operator::server::auth::AuthSettings,
    kube: Option<kube::Client>,
    claimer: Option<voucher_operator::federation::claimer::Claimer>,
) -> (String, tokio_util::sync::CancellationToken) {
    use voucher_operator::server::{self, AppState, auth::Verifier};
    // As main does before anything uses TLS.
    voucher_operator::install_tls_provider();
    let state = AppState::joined(
        store,
        Verifier::new(auth).expect("valid token settings"),
        kube,
        settings,
        Default::default(),
        claimer,
    );
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(server::serve(
        listener,
        Default::default(),
        state,
        stop.clone(),
    ));
    (base, stop)
}

/// Polls `probe` every 50 ms until it finds something, failing the test
/// after `limit` with `what` it waited for.
pub async fn eventually_within<T, F, Fut>(limit: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Redeems for `customer`, asking again (every 20 ms, `tries` times) while
/// this Sovereign's share is used up: granted, gone (`false`), or still "try
/// again" (`None`).
pub async fn redeem_within(
    store: &voucher_operator::store::Store,
    code: &voucher_operator::domain::Code,
    customer: &str,
    tries: usize,
) -> Option<bool> {
    use voucher_operator::domain::Redeemability;
    use voucher_operator::store::redeem::{Answer, Redeemed};
    for _ in 0..tries {
        let redemption = redemption(code, customer);
        match store.redeem(&redemption).await.expect("answered") {
            Answer::Fresh(Redeemed::Granted { .. }) => return Some(true),
            Answer::Fresh(Redeemed::Gone(Redeemability::ShareUsedUp)) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Answer::Fresh(Redeemed::Gone(Redeemability::Capped { .. })) => return Some(false),
            other => panic!("{customer}: {other:?}"),
        }
    }
    None
}

/// A customer's HS256 token for `subject` (its email made from it), valid ten minutes, signed
/// with `secret`.
pub fn customer_token(secret: &str, subject: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = serde_json::json!({"sub": subject, "email": format!("{subject}@example.om"), "exp": now + 600, "iat": now});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("a token")
}
