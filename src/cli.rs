//! Command-line wiring: flags with environment fallbacks, and the subcommands.
//! Subcommands appear here only once they work.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::api;
use crate::store::{DatabaseSettings, Store};

#[derive(Debug, Parser)]
#[command(
    name = "voucher-operator",
    version,
    about = "Kubernetes operator for billing vouchers: Voucher resources <-> the billing database's promo codes",
    long_about = None,
)]
pub struct Cli {
    #[command(flatten)]
    pub logging: LogOptions,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the Voucher CustomResourceDefinition generated from the code, as YAML
    /// (the content of crds/voucher.yaml).
    Crd,
    /// Create or update the database schema, then exit: the billing tables when absent
    /// and the operator's own tables. Idempotent and safe on a live billing database.
    Migrate(DatabaseOptions),
    /// Run the controller: reconcile Voucher resources into the billing database and keep
    /// their status live. Uses KUBECONFIG, or the in-cluster service account.
    Controller(ControllerOptions),
}

#[derive(Debug, Args)]
pub struct LogOptions {
    /// Log line format. The log level is set with RUST_LOG (default: info).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Args)]
pub struct DatabaseOptions {
    /// Postgres URL of the billing database, e.g. postgres://billing:secret@db:5432/billing.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Largest number of pooled connections to the database.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub database_max_connections: u32,

    /// How long to wait for a database connection before giving up (e.g. 10s, 1m).
    #[arg(long, env = "DATABASE_CONNECT_TIMEOUT", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub database_connect_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct ControllerOptions {
    #[command(flatten)]
    pub database: DatabaseOptions,

    /// Compare every Voucher with its row at least this often; reverts out-of-band edits.
    #[arg(long, env = "RESYNC_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub resync_interval: Duration,

    /// Smallest interval between two status writes of one Voucher when only its
    /// redemption counters changed (protects the API server from a hot code).
    #[arg(long, env = "STATUS_MIN_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub status_min_interval: Duration,

    /// Reconcile the Vouchers of this namespace only (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// How many Vouchers are reconciled at once.
    #[arg(long, env = "CONTROLLER_CONCURRENCY", default_value_t = 8)]
    pub concurrency: u16,

    /// Address of the metrics and probe endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = "METRICS_ADDRESS", default_value = "0.0.0.0:9090")]
    pub metrics_address: std::net::SocketAddr,

    /// Elect a leader through a coordination.k8s.io Lease so that only one replica
    /// reconciles (disable only for a single replica outside Kubernetes).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Name of the leader-election Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "voucher-operator")]
    pub lease_name: String,

    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,

    /// How long a leader holds the Lease without renewing it.
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,

    /// Name of this replica in the Lease and in Events (default: host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Do not create or update the database schema at start-up.
    #[arg(long, env = "SKIP_MIGRATIONS")]
    pub skip_migrations: bool,
}

impl ControllerOptions {
    pub fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "voucher-operator".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

impl DatabaseOptions {
    pub fn settings(&self) -> DatabaseSettings {
        DatabaseSettings {
            url: self.database_url.clone(),
            max_connections: self.database_max_connections,
            connect_timeout: self.database_connect_timeout,
        }
    }
}

pub fn init_logging(options: &LogOptions) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match options.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the chosen subcommand.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd => {
            print!("{}", api::crd_yaml());
            Ok(())
        }
        Command::Controller(options) => run_controller(options).await,
        Command::Migrate(db) => {
            let store = Store::connect(&db.settings()).await?;
            let report = store.migrate().await?;
            for migration in &report.applied {
                tracing::info!(%migration, "applied migration");
            }
            println!(
                "database schema is up to date ({} migration(s) applied now, {} already applied)",
                report.applied.len(),
                report.already_applied
            );
            Ok(())
        }
    }
}

/// An error and its causes on one line, without repeating a cause that a
/// library already folded into the message above it.
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

async fn run_controller(options: ControllerOptions) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::controller::{self, Context, Settings, leader, metrics::Metrics};

    let store = Store::connect(&options.database.settings()).await?;
    if !options.skip_migrations {
        store.migrate().await?;
    }
    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot configure the Kubernetes client ({e}): set KUBECONFIG, or run in a cluster"
        )
    })?;
    controller::check_api(&client, options.watch_namespace.as_deref()).await?;

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let identity = options.identity();
    let ctx = Context::new(
        client.clone(),
        store,
        metrics,
        Settings {
            resync_interval: options.resync_interval,
            status_min_interval: options.status_min_interval,
            namespace: options.watch_namespace.clone(),
            identity: identity.clone(),
            concurrency: options.concurrency,
        },
    );
    let shutdown = crate::telemetry::shutdown_signal();
    let ready = Arc::new(AtomicBool::new(false));
    let telemetry = tokio::spawn(crate::telemetry::serve(
        options.metrics_address,
        Arc::new(registry),
        ready.clone(),
        shutdown.clone(),
    ));
    ready.store(true, Ordering::Relaxed);
    tracing::info!(%identity, "controller started");
    if options.leader_election {
        let lease = leader::LeaseSettings {
            name: options.lease_name.clone(),
            namespace: options.lease_namespace.clone(),
            identity,
            duration: options.lease_duration,
        };
        leader::run_while_leader(client, lease, shutdown.clone(), |term| {
            let ctx = ctx.clone();
            async move {
                controller::run(ctx, term).await;
                Ok(())
            }
        })
        .await?;
    } else {
        controller::run(ctx, shutdown.clone()).await;
    }
    shutdown.cancel();
    telemetry.await??;
    Ok(())
}
