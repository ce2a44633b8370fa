//! `voucher-dev`: development tools that never ship in the production binary
//! or image. `voucher-dev local` runs the whole product on loopback.

#![forbid(unsafe_code)]

mod stack;

use clap::{Args, Parser, Subcommand};
use voucher_operator::cli::{self, LogOptions};

#[derive(Debug, Parser)]
#[command(
    name = "voucher-dev",
    version,
    about = "Development tools for voucher-operator"
)]
struct Cli {
    #[command(flatten)]
    logging: LogOptions,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole product on loopback for development: Postgres and nats-server (installed from
    /// Debian packages when missing), a real kube-apiserver and etcd (built from source on
    /// first use) or an existing cluster (--kubeconfig), and the operator (controller, audit
    /// relay, HTTP server). Ctrl-C stops everything.
    Local(LocalOptions),
}

#[derive(Debug, Args)]
struct LocalOptions {
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

    /// Run the main flow once (examples Ready, a redemption, REDEEMED 1 in kubectl, the
    /// event in JetStream) in a fresh state directory, then stop; non-zero exit on any failure.
    #[arg(long)]
    smoke: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    voucher_operator::install_tls_provider();
    cli::init_logging(&cli.logging);
    match run(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", voucher_operator::telemetry::describe(&*error));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Local(options) => {
            let fresh = options.smoke.then(tempfile::TempDir::new).transpose()?;
            let state_dir = fresh
                .as_ref()
                .map(|d| d.path().to_path_buf())
                .unwrap_or(options.state_dir);
            let settings = stack::StackSettings {
                state_dir,
                postgres_port: options.postgres_port,
                nats_port: options.nats_port,
                api_port: options.api_port,
                etcd_port: options.etcd_port,
                http_port: options.http_port,
                kubeconfig: options.kubeconfig,
            };
            stack::run(settings, options.smoke).await
        }
    }
}
