//! `voucher-dev`: development tools that never ship in the production binary
//! or image. `voucher-dev local` runs the whole product on loopback.

#![forbid(unsafe_code)]

mod admission;
mod banner;
mod federation;
mod gitops;
mod prometheus;
mod stack;
mod walkthrough;

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "voucher-dev",
    version,
    about = "Development tools for voucher-operator"
)]
struct DevCli {
    #[command(subcommand)]
    command: DevCommand,
}

#[derive(Debug, Subcommand)]
enum DevCommand {
    /// The whole product on loopback for development: Postgres and nats-server (installed from
    /// Debian packages when missing), a real kube-apiserver and etcd (built from source on
    /// first use) or an existing cluster (--kubeconfig), and the operator (controller, audit
    /// relay, HTTP server). Ctrl-C stops everything.
    Local(Local),
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
struct Local {
    #[command(subcommand)]
    action: Option<LocalAction>,
    #[command(flatten)]
    options: LocalOptions,
}

#[derive(Debug, Subcommand)]
enum LocalAction {
    /// Print a development bearer token that the running stack accepts (signed with the
    /// secret in its state directory), to try the redemption rules as several customers.
    Token(TokenOptions),
}

#[derive(Debug, Args)]
struct TokenOptions {
    /// The token's subject: the customer (billing's customers.user_id) or the admin.
    #[arg(long)]
    sub: String,

    /// What the subject may do: redeem as a customer, administer, or commit orders as the
    /// billing service's checkout.
    #[arg(long, value_enum, default_value_t = TokenRole::Customer)]
    role: TokenRole,

    /// How long the token is valid (e.g. 1h, 30m).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    expires_in: Duration,

    /// The state directory of the running stack.
    #[arg(long, env = "LOCAL_STATE_DIR", default_value_os_t = std::env::temp_dir().join("voucher-operator-local"))]
    state_dir: std::path::PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TokenRole {
    Customer,
    SovereignAdmin,
    Superadmin,
    /// The billing service's checkout: quotes, commits and reverses orders.
    BillingService,
}

#[derive(Debug, Args)]
struct LocalOptions {
    /// Print the operator's log here too (-v info, -vv debug); it is always written to
    /// operator.log in the state directory.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Where the stack keeps its databases, kubeconfig and logs (kept between runs).
    #[arg(long, env = "LOCAL_STATE_DIR", default_value_os_t = std::env::temp_dir().join("voucher-operator-local"))]
    state_dir: std::path::PathBuf,

    /// Postgres port on 127.0.0.1.
    #[arg(long, default_value_t = 25432)]
    postgres_port: u16,

    /// nats-server port on 127.0.0.1.
    #[arg(long, default_value_t = 24222)]
    nats_port: u16,

    /// Port of the local kube-apiserver (HTTPS; kubectl and the operator talk to it).
    #[arg(long, default_value_t = 26443)]
    api_port: u16,

    /// Client port of the local etcd (the API server's storage).
    #[arg(long, default_value_t = 22379)]
    etcd_port: u16,

    /// Use this existing cluster (kind, k3d, minikube or a real one) instead of starting
    /// kube-apiserver and etcd: the CRD and the examples are applied there, in the
    /// kubeconfig's namespace. A KUBECONFIG of the environment is not used unless given here.
    #[arg(long, env = "LOCAL_KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,

    /// Port of the HTTP API (preview, redeem, admin).
    #[arg(long, default_value_t = 28080)]
    http_port: u16,

    /// Run the main flow once in a fresh state directory, then stop; non-zero exit on any
    /// failure: examples Ready, redemptions, REDEEMED 1 in kubectl, the events in JetStream, the
    /// banner's commands as printed, jane's adopt refused by the admission policy, and the
    /// README's "Try it" and "Campaigns" blocks as written (on the stack's own cluster, without
    /// --gitops). With --sovereigns: the global voucher redeemed on two Sovereigns.
    #[arg(long)]
    smoke: bool,

    /// The example Vouchers from Git through Flux instead of kubectl: a Git server on
    /// --git-port, Flux's source-controller and kustomize-controller (built from their
    /// upstream modules on first use), a repository seeded once with the examples; the banner
    /// prints how to clone, edit and push. With --smoke: an edit pushed as printed, followed.
    #[arg(long, conflicts_with = "sovereigns")]
    gitops: bool,

    /// With --gitops: the Git server's port on 127.0.0.1; Flux's artifact server and the two
    /// controllers' health endpoints take the three after it.
    #[arg(long, default_value_t = gitops::DEFAULT_GIT_PORT)]
    git_port: u16,

    /// Namespaces whose Vouchers and campaigns may issue codes, comma-separated; created on
    /// the stack's own cluster, with the campaign keys' namespace (voucher-campaign-keys).
    #[arg(long, value_delimiter = ',', default_value = "default,billing")]
    issuer_namespaces: Vec<String>,

    /// Prometheus (built from its upstream module on first use) scraping the stack every
    /// second, with the chart's alert rules; the banner prints its URL and the dashboard's
    /// queries.
    #[arg(long, conflicts_with = "sovereigns")]
    prometheus: bool,

    /// With --prometheus: its HTTP API's port on 127.0.0.1.
    #[arg(long, default_value_t = 29090)]
    prometheus_port: u16,

    /// Run the vendor's hub and this many Sovereigns instead (cross-Sovereign vouchers,
    /// docs/federation.md): each its own kube-apiserver and etcd, NATS leaf node (its own
    /// JetStream domain), billing database and operator, on the ports after the ones above.
    /// Their addresses go to sovereigns.json in the state directory.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=8))]
    sovereigns: u16,

    /// With --sovereigns: the Sovereigns' currencies, comma-separated, in turn (e.g. OMR,BHD:
    /// sov1 OMR, sov2 BHD). The example global vouchers state a credit in OMR and BHD.
    #[arg(long, value_delimiter = ',', default_value = "OMR", value_parser = voucher_operator::domain::Currency::parse)]
    currencies: Vec<voucher_operator::domain::Currency>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = DevCli::parse();
    voucher_operator::install_tls_provider();
    match run(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            use std::io::Write;
            let message = voucher_operator::telemetry::describe(&*error);
            let _ = writeln!(std::io::stderr(), "error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The operator's log: always into `operator.log` in the state directory, and
/// on the console at `-v` (warnings and errors always).
fn init_logging(state_dir: &std::path::Path, verbose: u8) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer, fmt};
    std::fs::create_dir_all(state_dir)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_dir.join("operator.log"))?;
    let to_file = fmt::layer()
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .with_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,async_nats=warn")),
        );
    let console_level = match verbose {
        0 => "warn",
        1 => "info,sqlx=warn,async_nats=warn",
        _ => "debug",
    };
    // Colour for a person at a terminal; a redirected log stays plain text.
    let to_console = fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .with_filter(EnvFilter::new(console_level));
    tracing_subscriber::registry()
        .with(to_file)
        .with(to_console)
        .try_init()?;
    Ok(())
}

async fn run(command: DevCommand) -> anyhow::Result<()> {
    match command {
        DevCommand::Local(Local {
            action: Some(LocalAction::Token(token)),
            ..
        }) => {
            let secret = stack::jwt_secret(&token.state_dir)?;
            let role = match token.role {
                TokenRole::Customer => None,
                TokenRole::SovereignAdmin => Some("sovereign-admin"),
                TokenRole::Superadmin => Some("superadmin"),
                TokenRole::BillingService => Some("billing-service"),
            };
            println!(
                "{}",
                stack::dev_token(&secret, &token.sub, role, token.expires_in)?
            );
            Ok(())
        }
        DevCommand::Local(Local { options, .. }) => {
            let fresh = options.smoke.then(tempfile::TempDir::new).transpose()?;
            let state_dir = fresh
                .as_ref()
                .map(|d| d.path().to_path_buf())
                .unwrap_or(options.state_dir);
            // Absolute: the banner's env file is sourced from anywhere.
            std::fs::create_dir_all(&state_dir)?;
            let state_dir = std::fs::canonicalize(&state_dir)?;
            // Held to the end, taken before anything is built, logged or started.
            let _lock = stack::lock_state_dir(&state_dir)?;
            let kubeconfig = options.kubeconfig.map(std::fs::canonicalize).transpose()?;
            init_logging(&state_dir, options.verbose)?;
            let settings = stack::StackSettings {
                state_dir,
                postgres_port: options.postgres_port,
                nats_port: options.nats_port,
                api_port: options.api_port,
                etcd_port: options.etcd_port,
                http_port: options.http_port,
                kubeconfig,
                gitops: options.gitops,
                git_port: options.git_port,
                issuer_namespaces: options.issuer_namespaces,
                prometheus: options.prometheus,
                prometheus_port: options.prometheus_port,
            };
            match options.sovereigns {
                0 => stack::run(settings, options.smoke).await,
                n => federation::run(settings, n, &options.currencies, options.smoke).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use voucher_operator::server::auth::{AuthSettings, Verifier};

    #[tokio::test]
    async fn local_token_mints_what_the_running_stack_accepts() {
        voucher_operator::install_tls_provider();
        let state = tempfile::tempdir().unwrap();
        // The stack made its secret on its first run; the token command reads the same.
        let secret = stack::jwt_secret(state.path()).unwrap();
        assert_eq!(stack::jwt_secret(state.path()).unwrap(), secret, "kept");
        let verifier = Verifier::new(AuthSettings {
            hs256_secret: Some(secret.clone()),
            ..Default::default()
        })
        .unwrap();
        let check = async |role| {
            let token = stack::dev_token(&secret, "alice", role, Duration::from_secs(60)).unwrap();
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {token}").parse().unwrap(),
            );
            verifier.verify(&headers).await.unwrap()
        };
        let customer = check(None).await;
        assert_eq!(customer.subject, "alice");
        assert!(!customer.is_admin());
        assert!(check(Some("sovereign-admin")).await.is_admin());
    }
}
