#![forbid(unsafe_code)]

use clap::Parser;
use voucher_operator::cli::{self, Cli};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    voucher_operator::install_tls_provider();
    cli::init_logging(&cli.logging);
    match cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", voucher_operator::telemetry::describe(&*error));
            std::process::ExitCode::FAILURE
        }
    }
}
