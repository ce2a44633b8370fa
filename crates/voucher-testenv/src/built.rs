//! What the tests and `voucher-dev local` build from upstream Go modules
//! pinned in `tools/`: the Kubernetes control plane (`tools/kubernetes`) and
//! nats-server (`tools/nats`). Each build script builds once per machine into
//! `target/` and prints the directory of its binaries on its last line.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::Context as _;

/// `tools/nats/build.sh` of this checkout.
const NATS_BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tools/nats/build.sh");

/// Runs a build script (its progress on standard error) and returns the
/// directory it printed last.
pub(crate) fn run_build_script(script: &str, what: &str) -> anyhow::Result<PathBuf> {
    let output = Command::new("bash")
        .arg(script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run bash {script}"))?;
    if !output.status.success() {
        anyhow::bail!("building {what} failed (bash {script}; its output is above)");
    }
    let dir = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned();
    Ok(dir.into())
}

/// The nats-server the tests and `local` run: `$VOUCHER_NATS_BIN/nats-server`
/// when set (CI builds once before the tests), else the build script's,
/// building it when missing. A current release (JetStream domains, leaf nodes
/// and KV compare-and-set as cross-Sovereign vouchers use them), never the
/// distribution's older package.
pub fn nats_server() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("VOUCHER_NATS_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => run_build_script(NATS_BUILD_SCRIPT, "nats-server")?,
    };
    let binary = dir.join("nats-server");
    if !binary.is_file() {
        anyhow::bail!(
            "{} is missing: build it with `bash tools/nats/build.sh`",
            binary.display()
        );
    }
    Ok(binary)
}
