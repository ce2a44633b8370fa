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
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
