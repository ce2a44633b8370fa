#![forbid(unsafe_code)]

use clap::Parser;
use voucher_operator::cli::{self, Cli};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    voucher_operator::install_tls_provider();
    cli::init_logging(&cli.logging);
    let logging = cli.logging.clone();
    match cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            cli::report_fatal(&logging, &*error);
            std::process::ExitCode::FAILURE
        }
    }
}
