//! Command-line wiring: flags with environment fallbacks, and the subcommands.
//! Subcommands appear here only once they work; `commands` runs them.

/// A line for the person at the terminal, on stderr; dropped when stderr is
/// a closed pipe (eprintln! would panic).
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod commands;
mod events;

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

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CustomResourceDefinitions generated from the code, as YAML: Voucher and
    /// VoucherCampaign (the content of crds/), to pipe to `kubectl apply -f -`.
    Crd {
        /// Only this kind's CRD (voucher: crds/voucher.yaml; campaign: crds/vouchercampaign.yaml).
        #[arg(long, value_enum)]
        kind: Option<CrdKind>,
    },
    /// Create or update the database schema, then exit: the billing tables when absent
    /// and the operator's own tables. Idempotent and safe on a live billing database.
    Migrate(ConnectOptions),
    /// Run the controller: reconcile Voucher resources into the billing database and keep
    /// their status live. Uses KUBECONFIG, or the in-cluster service account.
    Controller {
        #[command(flatten)]
        database: DatabaseOptions,
        #[command(flatten)]
        controller: ControllerOptions,
        #[command(flatten)]
        billing: BillingOptions,
        #[command(flatten)]
        audit: AuditOptions,
        #[command(flatten)]
        join: JoinOptions,
    },
    /// Run the HTTP server: the public redeem-preview, the checkout redemption, the admin
    /// compatibility endpoints, /healthz, /readyz, /metrics and /openapi.json.
    Server {
        #[command(flatten)]
        database: DatabaseOptions,
        #[command(flatten)]
        server: ServerOptions,
        #[command(flatten)]
        billing: BillingOptions,
        #[command(flatten)]
        join: JoinOptions,
        #[command(flatten)]
        stream: StreamOptions,
    },
    /// Print audit events from JetStream: a table, or JSON lines with --json.
    Events(EventsOptions),
    /// Write the codes of an existing billing database as Voucher manifests (multi-document
    /// YAML), to commit to Git and let the controller adopt them with their redemptions kept.
    /// Only reads the database.
    Export(ExportOptions),
    /// VoucherCampaign tools.
    #[command(subcommand)]
    Campaign(CampaignCommand),
    /// The finance report of a period, as CSV per code: redemptions, credit granted (whole
    /// OMR), discount given by committed orders (minor units of the currency, reversed orders
    /// excluded), reversed redemptions. Only reads the database.
    Report(ReportOptions),
    /// Run the vendor's hub of global vouchers (no billing database): defines each
    /// `scope: Global` Voucher of the global namespace in the hub's JetStream bucket, shows the
    /// units granted in its status, and serves the Sovereigns' allotment requests.
    Hub {
        #[command(flatten)]
        hub: HubOptions,
        #[command(flatten)]
        stream: StreamOptions,
    },
    /// Run the controller and the server in one process (development, small installations).
    Run {
        #[command(flatten)]
        database: DatabaseOptions,
        #[command(flatten)]
        controller: ControllerOptions,
        #[command(flatten)]
        audit: AuditOptions,
        #[command(flatten)]
        server: ServerOptions,
        #[command(flatten)]
        billing: BillingOptions,
        #[command(flatten)]
        join: JoinOptions,
    },
}

/// A kind whose CRD `crd` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CrdKind {
    Voucher,
    Campaign,
}

#[derive(Clone, Debug, Args)]
pub struct LogOptions {
    /// Log line format. The log level is set with RUST_LOG (default: info).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub(crate) log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The database of the roles that run (controller, server, run): where it
/// is, and whether to bring its schema up to date at start-up.
#[derive(Debug, Args)]
pub struct DatabaseOptions {
    #[command(flatten)]
    pub connect: ConnectOptions,

    /// Do not create or update the database schema at start-up (controller, server, run).
    #[arg(long, env = "SKIP_MIGRATIONS")]
    pub(crate) skip_migrations: bool,
}

/// Where the billing database is.
#[derive(Debug, Args)]
pub struct ConnectOptions {
    /// Postgres URL of the billing database, e.g. postgres://billing:secret@db:5432/billing.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Largest number of pooled connections to the database.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = DatabaseSettings::default().max_connections,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(crate) database_max_connections: u32,

    /// How long to wait for a database connection before giving up (e.g. 10s, 1m).
    #[arg(long, env = "DATABASE_CONNECT_TIMEOUT", default_value = text(DatabaseSettings::default().connect_timeout),
          value_parser = humantime::parse_duration)]
    pub(crate) database_connect_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct ControllerOptions {
    /// Compare every Voucher with its row at least this often; reverts out-of-band edits.
    #[arg(long, env = "RESYNC_INTERVAL", default_value = text(crate::controller::Settings::default().resync_interval), value_parser = humantime::parse_duration)]
    pub resync_interval: Duration,

    /// Smallest interval between two status writes of one Voucher when only its
    /// redemption counters changed (protects the API server from a hot code).
    #[arg(long, env = "STATUS_MIN_INTERVAL", default_value = text(crate::controller::Settings::default().status_min_interval), value_parser = humantime::parse_duration)]
    pub status_min_interval: Duration,

    /// Reconcile the Vouchers of this namespace only (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub(crate) watch_namespace: Option<String>,

    /// Comma-separated namespaces whose Vouchers may claim codes (creating a Voucher mints
    /// credit); a Voucher elsewhere gets phase Forbidden and writes nothing. Include the
    /// server's --admin-namespace, where the admin endpoints issue.
    #[arg(
        long,
        env = "ISSUER_NAMESPACES",
        value_delimiter = ',',
        default_value = crate::controller::Settings::default().issuers.list().replace(", ", ",")
    )]
    pub(crate) issuer_namespaces: Vec<String>,

    /// Namespace of the Secrets holding campaigns' generator keys (spec.keySecretRef names one
    /// there): the controller reads Secrets there only, so keep it for keys alone — never the
    /// operator's own namespace, whose Secrets hold its credentials.
    #[arg(long, env = "CAMPAIGN_KEY_NAMESPACE", default_value = crate::controller::DEFAULT_KEY_NAMESPACE)]
    pub(crate) campaign_key_namespace: String,

    /// How many Vouchers are reconciled at once.
    #[arg(long, env = "CONTROLLER_CONCURRENCY", default_value_t = crate::controller::Settings::default().concurrency,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,

    /// Address of the metrics and probe endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = "METRICS_ADDRESS", default_value = "0.0.0.0:9090")]
    pub(crate) metrics_address: std::net::SocketAddr,

    /// Elect a leader through a coordination.k8s.io Lease so that only one replica
    /// reconciles (disable only for a single replica outside Kubernetes).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) leader_election: bool,

    /// Name of the leader-election Lease.
    #[arg(long, env = "LEASE_NAME", default_value = crate::controller::leader::LeaseSettings::default().name)]
    pub lease_name: String,

    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = crate::controller::leader::LeaseSettings::default().namespace)]
    pub(crate) lease_namespace: String,

    /// How long a leader holds the Lease without renewing it.
    #[arg(long, env = "LEASE_DURATION", default_value = text(crate::controller::leader::LeaseSettings::default().duration), value_parser = humantime::parse_duration)]
    pub(crate) lease_duration: Duration,

    /// Name of this replica in the Lease and in Events (default: host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    #[command(flatten)]
    pub federation: FederationOptions,
}

/// A Sovereign's part in global vouchers (DESIGN §11, docs/federation.md).
#[derive(Debug, Args)]
pub struct FederationOptions {
    /// The namespace of the vendor's global vouchers (spec.scope: Global), and only theirs.
    #[arg(long, env = "GLOBAL_NAMESPACE", default_value = crate::federation::DEFAULT_GLOBAL_NAMESPACE)]
    pub global_namespace: String,

    /// Units asked for at a time, once fewer than --allotment-low-water are left unspent.
    #[arg(long, env = "ALLOTMENT_STEP", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub allotment_step: u64,

    /// Ask the hub for more once fewer units than this are left unspent here.
    #[arg(long, env = "ALLOTMENT_LOW_WATER", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub allotment_low_water: u64,

    /// One allotment round for every global code this often (on the leader).
    #[arg(long, env = "ALLOTMENT_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub allotment_interval: Duration,
}

/// A Sovereign joined to the vendor's hub (controller, server, run).
#[derive(Debug, Args)]
pub struct JoinOptions {
    /// This Sovereign's name (its NATS account's): joins the vendor's hub over --nats-url, so
    /// that its global vouchers are offered here. Without it, a global voucher's copy says NoHub.
    #[arg(long, env = "SOVEREIGN")]
    pub sovereign: Option<String>,

    /// The vendor's claim key (a file of at least 32 bytes, the same on every Sovereign): the
    /// server redeems once-per-customer-anywhere vouchers (spec.perCustomer: Global) holding the
    /// hub's claim for the customer, known to the hub only by an HMAC of the token subject under
    /// this key. Without it (or --sovereign) such vouchers answer 503 here.
    #[arg(long, env = "CLAIM_KEY_FILE")]
    pub claim_key_file: Option<std::path::PathBuf>,

    /// A once-per-customer-anywhere redemption left unfinished this long (a process killed
    /// between the hub's claim and its commit) is recovered: aborted, and its claim deleted so
    /// the customer can redeem anywhere.
    #[arg(long, env = "CLAIM_RECOVERY_AFTER", default_value = "30s", value_parser = humantime::parse_duration)]
    pub claim_recovery_after: Duration,
}

/// The hub (`voucher-operator hub`, in the vendor's cluster).
#[derive(Debug, Args)]
pub struct HubOptions {
    /// The namespace of the vendor's global vouchers (spec.scope: Global).
    #[arg(long, env = "GLOBAL_NAMESPACE", default_value = crate::federation::DEFAULT_GLOBAL_NAMESPACE)]
    pub global_namespace: String,

    /// Replicas of the hub's KV bucket of allotments (3 on a JetStream cluster).
    #[arg(long, env = "ALLOTMENT_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub allotment_replicas: u8,

    /// The most one Sovereign may hold, in percent of the cap: no Sovereign hoards it.
    #[arg(long, env = "SHARE_CEILING_PERCENT", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub share_ceiling_percent: u64,

    /// The most one allotment request may add.
    #[arg(long, env = "MAX_GRANT", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_grant: u64,

    /// Each global voucher's status (units granted, redemptions reported) is refreshed this often.
    #[arg(long, env = "STATUS_REFRESH", default_value = "5s", value_parser = humantime::parse_duration)]
    pub status_refresh: Duration,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "METRICS_ADDRESS", default_value = "0.0.0.0:9090")]
    pub metrics_address: std::net::SocketAddr,

    /// Comma-separated Sovereigns (each its JetStream domain and NATS account): the hub's
    /// --audit-stream gathers the audit events of global vouchers from each one's own stream of
    /// that name (JetStream sources: nothing lost while a link is down). None: nothing gathered.
    #[arg(long, env = "SOVEREIGNS", value_delimiter = ',')]
    pub sovereigns: Vec<String>,
}

impl HubOptions {
    pub fn settings(&self, stream: &StreamOptions) -> crate::federation::hub::Settings {
        let audit = (!self.sovereigns.is_empty()).then(|| crate::federation::audit::Gather {
            stream: stream.audit_stream.clone(),
            sovereign_stream: stream.audit_stream.clone(),
            prefix: stream.audit_subject_prefix.clone(),
            sovereigns: self.sovereigns.clone(),
            replicas: usize::from(self.allotment_replicas),
        });
        crate::federation::hub::Settings {
            audit,
            global_namespace: self.global_namespace.clone(),
            prefix: crate::federation::allotment::SUBJECT_PREFIX.to_owned(),
            replicas: usize::from(self.allotment_replicas),
            ceiling_percent: self.share_ceiling_percent,
            max_grant: self.max_grant,
            refresh: self.status_refresh,
        }
    }
}

/// The Sovereign's billing as discounts see it (controller, server, run).
#[derive(Debug, Args)]
pub struct BillingOptions {
    /// The currency of the billing database's charges (ISO 4217): discounts' amountOff and the
    /// checkout's amounts are its minor units (baisa for OMR, cents for USD).
    #[arg(long, env = "CURRENCY", default_value = crate::domain::Billing::default().currency.as_str().to_owned(),
          value_parser = crate::domain::Currency::parse)]
    pub currency: crate::domain::Currency,

    /// Comma-separated charge categories a discount's appliesTo may name; a Voucher naming
    /// another is refused (a typo never becomes a discount that applies to nothing).
    #[arg(long, env = "CHARGE_CATEGORIES", default_value = crate::domain::Billing::default().categories.joined(),
          value_parser = crate::domain::Categories::parse)]
    pub charge_categories: crate::domain::Categories,
}

impl BillingOptions {
    pub fn settings(&self) -> crate::domain::Billing {
        crate::domain::Billing {
            currency: self.currency.clone(),
            categories: self.charge_categories.clone(),
        }
    }
}

/// Where audit events go (NATS JetStream); used by the relay (controller, run) and `events`.
#[derive(Debug, Args)]
pub struct StreamOptions {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "NATS_URL", default_value = crate::relay::RelaySettings::default().nats_url)]
    pub nats_url: String,

    /// JetStream stream of the audit events.
    #[arg(long, env = "AUDIT_STREAM", default_value = crate::relay::RelaySettings::default().stream)]
    pub(crate) audit_stream: String,

    /// Subject prefix: events are published on <prefix>.<CODE>.<kind>.
    #[arg(
        long,
        env = "AUDIT_SUBJECT_PREFIX",
        default_value = crate::relay::RelaySettings::default().subject_prefix
    )]
    pub(crate) audit_subject_prefix: String,

    /// NATS credentials file (user JWT and NKey seed, as `nsc` writes it).
    #[arg(long, env = "NATS_CREDS_FILE")]
    pub(crate) nats_creds_file: Option<std::path::PathBuf>,

    /// NATS user, with --nats-password.
    #[arg(long, env = "NATS_USER")]
    pub(crate) nats_user: Option<String>,

    /// NATS password of --nats-user.
    #[arg(
        long,
        env = "NATS_PASSWORD",
        hide_env_values = true,
        requires = "nats_user"
    )]
    pub(crate) nats_password: Option<String>,

    /// CA certificates (PEM file) the NATS server's certificate must chain to; implies TLS.
    #[arg(long, env = "NATS_TLS_CA")]
    pub(crate) nats_tls_ca: Option<std::path::PathBuf>,

    /// Refuse a NATS connection without TLS.
    #[arg(long, env = "NATS_TLS_REQUIRED", default_value_t = crate::relay::RelaySettings::default().nats_auth.tls_required, action = clap::ArgAction::Set)]
    pub(crate) nats_tls_required: bool,
}

impl StreamOptions {
    pub fn auth(&self) -> crate::relay::NatsAuth {
        crate::relay::NatsAuth {
            creds_file: self.nats_creds_file.clone(),
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_required: self.nats_tls_required,
        }
    }
}

#[derive(Debug, Args)]
pub struct ExportOptions {
    /// Postgres URL of the billing database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Namespace of the exported Vouchers.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,

    /// Also export soft-deleted codes (as active: false). Applying them brings the row back,
    /// inactive, with its redemption history.
    #[arg(long)]
    pub(crate) include_deleted: bool,

    /// Write to this file instead of standard output (always YAML).
    #[arg(long, short = 'o', value_parser = parse_output_path)]
    pub output: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReportOptions {
    /// Postgres URL of the billing database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Start of the period, included: a date (2027-01-01, midnight UTC) or an RFC 3339 time.
    #[arg(long, value_parser = parse_instant)]
    pub from: chrono::DateTime<chrono::Utc>,

    /// End of the period, excluded, as --from.
    #[arg(long, value_parser = parse_instant)]
    pub to: chrono::DateTime<chrono::Utc>,

    /// Only the codes of the Vouchers and campaigns of this namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,

    /// The currency of the discounts, as the server's --currency (named in each row).
    #[arg(long, env = "CURRENCY", default_value = crate::domain::Billing::default().currency.as_str().to_owned(),
          value_parser = crate::domain::Currency::parse)]
    pub currency: crate::domain::Currency,
}

/// A date (midnight UTC) or an RFC 3339 time.
fn parse_instant(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(time) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&chrono::Utc));
    }
    chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map(|day| day.and_time(chrono::NaiveTime::MIN).and_utc())
        .map_err(|_| format!("\"{text}\" is neither a date (2027-01-01) nor an RFC 3339 time"))
}

#[derive(Debug, Subcommand)]
pub enum CampaignCommand {
    /// Print a campaign's codes as CSV (the header `code`, then one code a line in index
    /// order), derived from its Secret's key and each checked against the billing database:
    /// only live codes of the campaign are printed; any other makes the exit status 1, naming
    /// its index. Audited like a download. Uses KUBECONFIG (get the campaign and its Secret).
    Codes(CampaignCodesOptions),
}

#[derive(Debug, Args)]
pub struct CampaignCodesOptions {
    /// Postgres URL of the billing database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Namespace of the campaign (default: the kubeconfig's).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,

    /// Namespace of the generator key's Secret, as the controller's --campaign-key-namespace.
    #[arg(long, env = "CAMPAIGN_KEY_NAMESPACE", default_value = crate::controller::DEFAULT_KEY_NAMESPACE)]
    pub key_namespace: String,

    /// Index of the first code to print (codes are numbered from 0).
    #[arg(long, default_value_t = 0)]
    pub from: u32,

    /// How many codes to print (default: all from --from).
    #[arg(long)]
    pub limit: Option<u32>,

    /// The VoucherCampaign's name.
    pub name: String,
}

/// `export -o`: a file path, not a format word (kubectl's `-o yaml` habit).
fn parse_output_path(value: &str) -> Result<std::path::PathBuf, String> {
    if matches!(value, "yaml" | "yml" | "json" | "wide" | "name") {
        return Err(
            "-o takes the path of the file to write (e.g. -o vouchers.yaml), not a format: the \
             output is always YAML; leave -o out to write to standard output"
                .to_owned(),
        );
    }
    Ok(value.into())
}

#[derive(Debug, Args)]
pub struct EventsOptions {
    #[command(flatten)]
    pub stream: StreamOptions,

    /// Only the events of this code (trimmed, upper-cased).
    #[arg(long)]
    pub code: Option<String>,

    /// Only events of this kind (every kind of audit record, listed below; docs/reference.md
    /// says what each means).
    #[arg(long = "type", value_parser = crate::domain::AuditKind::ALL.map(|k| k.as_str()))]
    pub kind: Option<String>,

    /// Only events of the last DURATION (e.g. 15m, 2h, 7days).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,

    /// Keep printing new events as they arrive (Ctrl-C to stop).
    #[arg(long, short = 'f')]
    pub follow: bool,

    /// How many of the matching events to print (the last ones): a number, or `all`.
    #[arg(long, default_value = "50", value_parser = parse_tail)]
    pub tail: usize,

    /// Times in UTC (`Z`) rather than the local time zone.
    #[arg(long)]
    pub(crate) utc: bool,

    /// Print each event as one JSON line (the CloudEvents envelope).
    #[arg(long)]
    pub json: bool,
}

/// An http(s) URL.
fn parse_http_url(value: &str) -> Result<String, String> {
    match reqwest::Url::parse(value) {
        Ok(url) if matches!(url.scheme(), "https" | "http") && url.host().is_some() => {
            Ok(value.to_owned())
        }
        _ => Err(format!(
            "{value:?} is not an http(s) URL, e.g. https://keycloak.example/realms/catalyst/protocol/openid-connect/certs"
        )),
    }
}

/// A CIDR; a bare address gets a hint.
fn parse_cidr(value: &str) -> Result<ipnet::IpNet, String> {
    let value = value.trim();
    value
        .parse::<ipnet::IpNet>()
        .map_err(|_| match value.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(_)) => {
                format!("{value} is an address, not a CIDR: write {value}/32 for it alone")
            }
            Ok(std::net::IpAddr::V6(_)) => {
                format!("{value} is an address, not a CIDR: write {value}/128 for it alone")
            }
            Err(_) => format!("{value:?} is not a CIDR such as 10.0.0.0/8 or 10.0.0.5/32"),
        })
}

/// `--tail`: a positive number, or `all`.
fn parse_tail(value: &str) -> Result<usize, String> {
    match value {
        "all" => Ok(usize::MAX),
        n => match n.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{value:?} is not a positive number or `all`")),
        },
    }
}

/// The audit relay of the controller role.
#[derive(Debug, Args)]
pub struct AuditOptions {
    #[command(flatten)]
    pub stream: StreamOptions,

    /// Publish the audit outbox to JetStream (leader only). Disable only where no NATS exists;
    /// records then accumulate in the outbox.
    #[arg(long, env = "AUDIT_RELAY", default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) audit_relay: bool,

    /// The CloudEvents `source` of every event (e.g. /sovereigns/<name>/voucher-operator).
    #[arg(
        long,
        env = "AUDIT_SOURCE",
        default_value = crate::relay::RelaySettings::default().source
    )]
    pub(crate) audit_source: String,

    /// Stream storage: file or memory.
    #[arg(long, env = "AUDIT_STORAGE", default_value = storage_name(crate::relay::RelaySettings::default().storage), value_parser = ["file", "memory"])]
    pub(crate) audit_storage: String,

    /// Stream replicas (1 to 5).
    #[arg(long, env = "AUDIT_REPLICAS", default_value_t = u8::try_from(crate::relay::RelaySettings::default().replicas).unwrap_or(1), value_parser = clap::value_parser!(u8).range(1..=5))]
    pub(crate) audit_replicas: u8,

    /// How long the stream keeps events.
    #[arg(long, env = "AUDIT_MAX_AGE", default_value = text(crate::relay::RelaySettings::default().max_age), value_parser = humantime::parse_duration)]
    pub(crate) audit_max_age: Duration,

    /// JetStream drops an event id seen again within this window; keep it longer than any
    /// outage the relay retries through.
    #[arg(long, env = "AUDIT_DUPLICATE_WINDOW", default_value = text(crate::relay::RelaySettings::default().duplicate_window), value_parser = humantime::parse_duration)]
    pub(crate) audit_duplicate_window: Duration,

    /// Published records are deleted from the outbox after this long.
    #[arg(long, env = "AUDIT_RETENTION", default_value = text(crate::relay::RelaySettings::default().retention), value_parser = humantime::parse_duration)]
    pub(crate) audit_retention: Duration,

    /// The relay also looks at the outbox this often, in case a notification was missed.
    #[arg(long, env = "AUDIT_POLL_INTERVAL", default_value = text(crate::relay::RelaySettings::default().poll_interval), value_parser = humantime::parse_duration)]
    pub(crate) audit_poll_interval: Duration,

    /// Bring an existing stream's settings (max age, storage, replicas, duplicate window) to
    /// these flags. Off, the relay creates a missing stream and leaves an existing one as it is,
    /// warning about each difference: a stream kept longer elsewhere is never purged by it.
    #[arg(long, env = "AUDIT_MANAGE_STREAM", default_value_t = crate::relay::RelaySettings::default().manage_stream, action = clap::ArgAction::Set)]
    pub(crate) audit_manage_stream: bool,
}

impl AuditOptions {
    pub fn settings(&self) -> crate::relay::RelaySettings {
        crate::relay::RelaySettings {
            nats_url: self.stream.nats_url.clone(),
            nats_auth: self.stream.auth(),
            stream: self.stream.audit_stream.clone(),
            subject_prefix: self.stream.audit_subject_prefix.clone(),
            source: self.audit_source.clone(),
            storage: if self.audit_storage == "memory" {
                async_nats::jetstream::stream::StorageType::Memory
            } else {
                async_nats::jetstream::stream::StorageType::File
            },
            replicas: usize::from(self.audit_replicas),
            max_age: self.audit_max_age,
            duplicate_window: self.audit_duplicate_window,
            retention: self.audit_retention,
            poll_interval: self.audit_poll_interval,
            batch_size: crate::relay::BATCH_SIZE,
            manage_stream: self.audit_manage_stream,
        }
    }
}

/// A default duration as its flag shows and parses it (`5m`, `90days`): in
/// its largest whole unit from two of them on (days from a week on).
fn text(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        _ if duration.subsec_nanos() != 0 || secs == 0 => format!("{}ms", duration.as_millis()),
        _ if secs >= 7 * 86_400 && secs.is_multiple_of(86_400) => format!("{}days", secs / 86_400),
        _ if secs >= 2 * 3_600 && secs.is_multiple_of(3_600) => format!("{}h", secs / 3_600),
        _ if secs >= 2 * 60 && secs.is_multiple_of(60) => format!("{}m", secs / 60),
        _ => format!("{secs}s"),
    }
}

/// The `--audit-storage` value of `storage`.
fn storage_name(storage: async_nats::jetstream::stream::StorageType) -> &'static str {
    match storage {
        async_nats::jetstream::stream::StorageType::Memory => "memory",
        async_nats::jetstream::stream::StorageType::File => "file",
    }
}

#[derive(Debug, Args)]
pub struct ServerOptions {
    /// Address the HTTP API listens on.
    #[arg(long, env = "LISTEN_ADDRESS", default_value = "0.0.0.0:8080")]
    pub(crate) listen_address: std::net::SocketAddr,

    /// A second address for the admin endpoints, /metrics and /openapi.json, which the first
    /// then no longer serves (so a public Service exposes only preview and redeem). Unset: one
    /// address serves everything.
    #[arg(long, env = "ADMIN_ADDRESS")]
    pub(crate) admin_address: Option<std::net::SocketAddr>,

    /// A third address for /metrics (and /healthz), which the others then no longer serve: a
    /// Prometheus that may scrape the server need not reach its admin endpoints. Needs
    /// --admin-address.
    #[arg(long, env = "SERVER_METRICS_ADDRESS", requires = "admin_address")]
    pub(crate) server_metrics_address: Option<std::net::SocketAddr>,

    /// Shared secret of HS256 bearer tokens (what the billing service signs with today).
    #[arg(long, env = "JWT_HS256_SECRET", hide_env_values = true)]
    pub(crate) jwt_hs256_secret: Option<String>,

    /// The HS256 secret before --jwt-hs256-secret, accepted too while a rotation is under way
    /// (same strength rule); remove it once every signer uses the new one.
    #[arg(long, env = "JWT_HS256_PREVIOUS_SECRET", hide_env_values = true)]
    pub(crate) jwt_hs256_previous_secret: Option<String>,

    /// JWKS URL whose keys verify RS256/ES256 bearer tokens (Keycloak:
    /// https://<host>/realms/<realm>/protocol/openid-connect/certs).
    #[arg(long, env = "JWKS_URL", value_parser = parse_http_url)]
    pub jwks_url: Option<String>,

    /// Required `iss` of bearer tokens: of the JWKS's (required with --jwks-url), and of HS256
    /// tokens unless --jwt-hs256-issuer is set (not checked for them when neither is).
    #[arg(long, env = "JWT_ISSUER")]
    pub(crate) jwt_issuer: Option<String>,

    /// Required `aud` of bearer tokens, as --jwt-issuer.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub(crate) jwt_audience: Option<String>,

    /// Required `iss` of HS256 tokens, when the billing service's differs from the identity
    /// provider's (--jwt-issuer).
    #[arg(long, env = "JWT_HS256_ISSUER")]
    pub(crate) jwt_hs256_issuer: Option<String>,

    /// Required `aud` of HS256 tokens, when it differs from --jwt-audience.
    #[arg(long, env = "JWT_HS256_AUDIENCE")]
    pub(crate) jwt_hs256_audience: Option<String>,

    /// Clock skew allowed when checking `exp` and `nbf` (at most 5m).
    #[arg(long, env = "JWT_LEEWAY", default_value = text(crate::server::auth::AuthSettings::default().leeway), value_parser = humantime::parse_duration)]
    pub(crate) jwt_leeway: Duration,

    /// The token claim that names the customer's tenant (e.g. tenant_id); when a token has it,
    /// it wins over the request's tenant_id.
    #[arg(long, env = "JWT_TENANT_CLAIM")]
    pub(crate) jwt_tenant_claim: Option<String>,

    /// Requests per minute per client on redeem-preview and redeem.
    #[arg(long, env = "RATE_LIMIT_PER_MINUTE", default_value_t = crate::server::ServerSettings::default().rate_limit_per_minute,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_per_minute: u32,

    /// Requests a client may send in a burst before the per-minute rate applies.
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = crate::server::ServerSettings::default().rate_limit_burst,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_burst: u32,

    /// Requests per minute per token subject on redeem and the admin endpoints (one customer
    /// behind a shared address cannot spend everybody's budget, nor one token many addresses').
    #[arg(long, env = "RATE_LIMIT_PER_SUBJECT", default_value_t = crate::server::ServerSettings::default().rate_limit_per_subject,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_per_subject: u32,

    /// Failed authentications per minute per client; beyond, the client is refused (429) until
    /// its budget refills.
    #[arg(long, env = "AUTH_FAILURES_PER_MINUTE", default_value_t = crate::server::ServerSettings::default().auth_failures_per_minute,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub auth_failures_per_minute: u32,

    /// Unknown codes per minute under one code prefix (the code up to its last '-' or '_', e.g. a
    /// campaign's), from all clients together, on the preview and redeem; beyond, codes under
    /// that prefix are refused (429) until the budget refills — a guesser spread over many
    /// addresses still finds a campaign's code at most this often per minute.
    #[arg(long, env = "GUESSES_PER_MINUTE", default_value_t = crate::server::ServerSettings::default().guesses_per_minute,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub guesses_per_minute: u32,

    /// Comma-separated CIDRs (10.0.0.0/8; 10.0.0.5/32 for one address) of proxies whose
    /// X-Forwarded-For is trusted to name the client (e.g. the ingress controller's pod network).
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_cidr)]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Namespace of the Vouchers that the admin endpoints issue.
    #[arg(long, env = "ADMIN_NAMESPACE", default_value = crate::server::ServerSettings::default().admin_namespace)]
    pub admin_namespace: String,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "BODY_LIMIT", default_value_t = crate::server::ServerSettings::default().body_limit)]
    pub body_limit: usize,

    /// Longest a request may take before it is answered with 503.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = text(crate::server::ServerSettings::default().request_timeout), value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// How long an Idempotency-Key and its answer are kept (a retry later than this is a new
    /// request; 24h as Stripe keeps them).
    #[arg(long, env = "IDEMPOTENCY_RETENTION", default_value = text(crate::server::ServerSettings::default().idempotency_retention), value_parser = humantime::parse_duration)]
    pub idempotency_retention: Duration,

    /// A client must send a request's headers within this time, or its connection is closed
    /// (a slow client cannot hold a connection open by trickling them).
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = text(crate::server::ServerSettings::default().header_read_timeout), value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// A connection that carries nothing for this long is closed.
    #[arg(long, env = "IDLE_TIMEOUT", default_value = text(crate::server::ServerSettings::default().idle_timeout), value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Connections served at once; more are closed as they arrive.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = u32::try_from(crate::server::ServerSettings::default().max_connections).unwrap_or(u32::MAX),
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Connections of one client address at once (an IPv6 client by its /64); the
    /// --trusted-proxies are exempt, since every customer behind them shares their addresses.
    #[arg(long, env = "MAX_CONNECTIONS_PER_CLIENT", default_value_t = u32::try_from(crate::server::ServerSettings::default().max_connections_per_client).unwrap_or(u32::MAX),
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections_per_client: u32,
}

impl ControllerOptions {
    /// How the controller behaves, from these flags.
    pub(crate) fn settings(&self, billing: crate::domain::Billing) -> crate::controller::Settings {
        crate::controller::Settings {
            billing,
            resync_interval: self.resync_interval,
            status_min_interval: self.status_min_interval,
            namespace: self.watch_namespace.clone(),
            identity: self.identity(),
            concurrency: self.concurrency,
            issuers: crate::domain::Issuers::new(&self.issuer_namespaces),
            key_namespace: self.campaign_key_namespace.clone(),
            global_namespace: self.federation.global_namespace.clone(),
            // Joined once connected (`commands::join_hub`).
            joined: None,
        }
    }

    /// The Lease to lead through, when leader election is on.
    pub(crate) fn lease(&self) -> Option<crate::controller::leader::LeaseSettings> {
        self.leader_election
            .then(|| crate::controller::leader::LeaseSettings {
                name: self.lease_name.clone(),
                namespace: self.lease_namespace.clone(),
                identity: self.identity(),
                duration: self.lease_duration,
            })
    }

    pub fn identity(&self) -> String {
        self.identity
            .clone()
            .unwrap_or_else(|| crate::controller::Settings::default().identity)
    }
}

impl ServerOptions {
    /// Whose bearer tokens the server trusts.
    pub(crate) fn auth(&self) -> crate::server::auth::AuthSettings {
        crate::server::auth::AuthSettings {
            hs256_secret: self.jwt_hs256_secret.clone(),
            hs256_previous_secret: self.jwt_hs256_previous_secret.clone(),
            jwks_url: self.jwks_url.clone(),
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            hs256_issuer: self.jwt_hs256_issuer.clone(),
            hs256_audience: self.jwt_hs256_audience.clone(),
            leeway: self.jwt_leeway,
            tenant_claim: self.jwt_tenant_claim.clone(),
        }
    }

    pub fn settings(&self, billing: crate::domain::Billing) -> crate::server::ServerSettings {
        crate::server::ServerSettings {
            billing,
            rate_limit_per_minute: self.rate_limit_per_minute,
            rate_limit_burst: self.rate_limit_burst,
            rate_limit_per_subject: self.rate_limit_per_subject,
            auth_failures_per_minute: self.auth_failures_per_minute,
            guesses_per_minute: self.guesses_per_minute,
            trusted_proxies: self.trusted_proxies.clone(),
            admin_namespace: self.admin_namespace.clone(),
            body_limit: self.body_limit,
            request_timeout: self.request_timeout,
            idempotency_retention: self.idempotency_retention,
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections as usize,
            max_connections_per_client: self.max_connections_per_client as usize,
        }
    }
}

impl DatabaseOptions {
    pub fn settings(&self) -> DatabaseSettings {
        self.connect.settings()
    }
}

impl ConnectOptions {
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
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,async_nats=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal, never into a file or a collector.
        .with_ansi(std::io::stderr().is_terminal())
        // A log line that cannot be written (the reader of a pipe went away) is
        // dropped: reporting it on stderr would panic the process.
        .log_internal_errors(false);
    match options.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Says why the process stops: a line on stderr, or with `--log-format json`
/// a JSON log record like every other line.
pub fn report_fatal(options: &LogOptions, error: &(dyn std::error::Error + 'static)) {
    let message = crate::telemetry::describe(error);
    match options.log_format {
        LogFormat::Json => tracing::error!(error = %message, "stopped"),
        LogFormat::Text => note!("error: {message}"),
    }
}

/// Runs the chosen subcommand.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd { kind } => {
            print_crds(kind);
            Ok(())
        }
        Command::Controller {
            database,
            controller,
            billing,
            audit,
            join,
        } => {
            let store = commands::open_store(&database).await?;
            let settings = controller.settings(billing.settings());
            let shutdown = crate::telemetry::shutdown_signal();
            commands::run_controller(store, settings, &controller, &join, audit, shutdown).await
        }
        Command::Server {
            database,
            server,
            billing,
            join,
            stream,
        } => {
            let store = commands::open_store(&database).await?;
            let settings = server.settings(billing.settings());
            let shutdown = crate::telemetry::shutdown_signal();
            let claimer = commands::join_claims(&join, &stream).await?;
            commands::run_server(store, settings, &server, claimer, shutdown).await
        }
        Command::Run {
            database,
            controller,
            audit,
            server,
            billing,
            join,
        } => run_both(&database, &controller, audit, &server, &billing, &join).await,
        Command::Hub { hub, stream } => commands::run_hub(&hub, &stream).await,
        Command::Events(options) => commands::print_events(options).await,
        Command::Export(options) => commands::export(options).await,
        Command::Report(options) => commands::report(options).await,
        Command::Campaign(CampaignCommand::Codes(options)) => {
            commands::campaign_codes(options).await
        }
        Command::Migrate(db) => migrate(&db).await,
    }
}

/// `crd`: the CRD of `kind`, or both.
fn print_crds(kind: Option<CrdKind>) {
    match kind {
        Some(CrdKind::Voucher) => print!("{}", api::crd_yaml()),
        Some(CrdKind::Campaign) => print!("{}", api::campaign::crd_yaml()),
        None => print!("{}---\n{}", api::crd_yaml(), api::campaign::crd_yaml()),
    }
}

/// `run`: the controller and the server in one process, on one store; either
/// one failing stops the other.
async fn run_both(
    database: &DatabaseOptions,
    controller: &ControllerOptions,
    audit: AuditOptions,
    server: &ServerOptions,
    billing: &BillingOptions,
    join: &JoinOptions,
) -> anyhow::Result<()> {
    let store = commands::open_store(database).await?;
    let claimer = commands::join_claims(join, &audit.stream).await?;
    let shutdown = crate::telemetry::shutdown_signal();
    let (settings, server_settings) = (
        controller.settings(billing.settings()),
        server.settings(billing.settings()),
    );
    let (controller, server) = tokio::join!(
        commands::run_controller(
            store.clone(),
            settings,
            controller,
            join,
            audit,
            shutdown.clone()
        ),
        commands::run_server(store, server_settings, server, claimer, shutdown.clone()),
    );
    shutdown.cancel();
    controller.and(server)
}

/// `migrate`: the schema brought up to date, and what was applied said.
async fn migrate(db: &ConnectOptions) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::RelaySettings;

    /// The options a command line without these flags (and without the
    /// environment) parses to; `args` supplies the flags that have no default.
    fn parsed<T: Args + clap::FromArgMatches>(args: &[&str]) -> T {
        let command = T::augment_args(clap::Command::new("defaults")).mut_args(|arg| arg.env(None));
        let matches =
            command.get_matches_from(std::iter::once("defaults").chain(args.iter().copied()));
        T::from_arg_matches(&matches).expect("the flags without a default are given")
    }

    #[test]
    fn every_settings_default_is_what_its_flags_default_to() {
        assert_eq!(
            parsed::<ServerOptions>(&[]).settings(parsed::<BillingOptions>(&[]).settings()),
            crate::server::ServerSettings::default()
        );
        assert_eq!(
            parsed::<AuditOptions>(&[]).settings(),
            RelaySettings::default()
        );
        assert_eq!(
            parsed::<ConnectOptions>(&["--database-url", "postgres://db/billing"]).settings(),
            DatabaseSettings {
                url: "postgres://db/billing".into(),
                ..DatabaseSettings::default()
            }
        );
        let controller = parsed::<ControllerOptions>(&["--identity", "me"]);
        let defaults = crate::controller::Settings::default();
        let settings = controller.settings(parsed::<BillingOptions>(&[]).settings());
        assert_eq!(
            (
                settings.billing,
                settings.resync_interval,
                settings.status_min_interval,
                settings.concurrency,
                settings.issuers.list(),
                settings.key_namespace,
            ),
            (
                defaults.billing,
                defaults.resync_interval,
                defaults.status_min_interval,
                defaults.concurrency,
                defaults.issuers.list(),
                defaults.key_namespace,
            )
        );
        let lease = controller
            .lease()
            .expect("leader election is on by default");
        assert_eq!(
            lease,
            crate::controller::leader::LeaseSettings {
                identity: "me".into(),
                ..Default::default()
            }
        );
        let jwt_leeway = parsed::<ServerOptions>(&[]).jwt_leeway;
        assert_eq!(
            jwt_leeway,
            crate::server::auth::AuthSettings::default().leeway
        );
    }

    #[test]
    fn the_events_help_lists_every_kind_of_audit_record() {
        use clap::CommandFactory;
        let mut command = Cli::command();
        let help = command
            .find_subcommand_mut("events")
            .unwrap()
            .render_long_help()
            .to_string();
        let missing: Vec<&str> = crate::domain::AuditKind::ALL
            .iter()
            .map(|k| k.as_str())
            .filter(|kind| !help.contains(kind))
            .collect();
        assert!(
            missing.is_empty(),
            "`events --help` omits {missing:?}:\n{help}"
        );
    }

    #[test]
    fn every_environment_fallback_is_the_one_the_reference_names() {
        use clap::CommandFactory;
        let readme = include_str!("../../docs/reference.md");
        let rows: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `--")).collect();
        let mut command = Cli::command();
        command.build();
        let mut missing = Vec::new();
        for sub in command.get_subcommands() {
            for arg in sub.get_arguments() {
                let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) else {
                    continue;
                };
                let (flag, env) = (
                    format!("`--{long}`"),
                    format!("`{}`", env.to_string_lossy()),
                );
                if !rows
                    .iter()
                    .any(|row| row.contains(&flag) && row.contains(&env))
                {
                    missing.push(format!("{} {flag} {env}", sub.get_name()));
                }
            }
        }
        missing.sort();
        missing.dedup();
        assert!(
            missing.is_empty(),
            "not in the table of docs/reference.md as such: {missing:#?}"
        );
    }

    #[test]
    fn bad_values_are_refused_with_what_to_write_instead() {
        use clap::Parser;
        let refused = |args: &[&str]| {
            let argv = [
                "voucher-operator",
                "server",
                "--database-url",
                "postgres://db/billing",
            ];
            match Cli::try_parse_from(argv.iter().chain(args)) {
                Ok(_) => panic!("{args:?} was accepted"),
                Err(error) => error.to_string(),
            }
        };
        assert!(refused(&["--trusted-proxies", "10.0.0.5"]).contains("10.0.0.5/32"));
        assert!(refused(&["--trusted-proxies", "fd00::5"]).contains("fd00::5/128"));
        assert!(refused(&["--jwks-url", "not-a-url"]).contains("https://"));
        assert!(refused(&["--rate-limit-per-minute", "0"]).contains("rate-limit-per-minute"));
        let zero = Cli::try_parse_from([
            "voucher-operator",
            "controller",
            "--database-url",
            "postgres://db/x",
            "--concurrency",
            "0",
        ])
        .unwrap_err()
        .to_string();
        assert!(zero.contains("concurrency"), "{zero}");
        // And the migration has no flag to skip itself.
        let skip = Cli::try_parse_from([
            "voucher-operator",
            "migrate",
            "--database-url",
            "postgres://db/x",
            "--skip-migrations",
        ]);
        assert!(skip.is_err());
    }
}
