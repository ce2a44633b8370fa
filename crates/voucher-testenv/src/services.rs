//! Postgres (from the machine's packages) and nats-server (built: see
//! [`crate::built`]) on loopback: how to find Postgres, install it, and the
//! commands that start them (supervised:
//! see [`crate::supervisor`]). Shared by `voucher-dev local` and the tests.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::supervisor::{self, Signal};

/// The uid/gid Postgres runs as when we are root (it refuses to run as root).
pub const UNPRIVILEGED: u32 = 65534;

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// Where the Postgres server binaries are: `$PG_BIN`, then `pg_config
/// --bindir`, then the newest /usr/lib/postgresql/*/bin, then $PATH.
pub fn postgres_bin_dir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").exists() && dir.join("postgres").exists();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(dir) = std::env::var("PG_BIN") {
        candidates.push(dir.into());
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        candidates.push(String::from_utf8_lossy(&out.stdout).trim().into());
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse().ok()?;
                Some((version, e.path().join("bin")))
            })
            .collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev().map(|(_, p)| p));
    }
    if let Some(initdb) = find_on_path("initdb") {
        candidates.push(initdb.parent()?.to_path_buf());
    }
    candidates.into_iter().find(|dir| has_server(dir))
}

/// Installs the Debian packages that provide what is missing, when we may;
/// otherwise says exactly what to install.
pub fn ensure_packages() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    if postgres_bin_dir().is_none() {
        missing.push("postgresql");
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() || find_on_path("apt-get").is_none() {
        anyhow::bail!(
            "missing: {}; install with: sudo apt-get install -y {}",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("installing {} (apt-get)", missing.join(", "));
    let update = Command::new("apt-get").args(["update", "-qq"]).status()?;
    let install = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()?;
    if !update.success() || !install.success() {
        anyhow::bail!("apt-get could not install {}", missing.join(" "));
    }
    Ok(())
}

/// Prepares `dir` for a process that drops to the unprivileged user.
pub fn own_for_unprivileged(dir: &Path) -> std::io::Result<()> {
    if is_root() {
        std::os::unix::fs::chown(dir, Some(UNPRIVILEGED), Some(UNPRIVILEGED))?;
    }
    Ok(())
}

fn unprivileged(cmd: &mut Command) {
    if is_root() {
        cmd.uid(UNPRIVILEGED).gid(UNPRIVILEGED);
    }
}

/// `initdb` of a throwaway cluster with trust authentication for `postgres`.
pub fn initdb_command(bin: &Path, data: &Path) -> Command {
    let mut cmd = Command::new(bin.join("initdb"));
    cmd.args([
        "-A",
        "trust",
        "-U",
        "postgres",
        "-E",
        "UTF8",
        "--no-locale",
        "--no-sync",
        "-D",
    ])
    .arg(data)
    .stdout(Stdio::null());
    unprivileged(&mut cmd);
    cmd
}

/// `postgres` on 127.0.0.1:`port`, socket in `socket_dir`. No fsync (the data
/// is throwaway), but synchronous commits, so an acknowledged commit
/// survives a crash of the server process.
pub fn postgres_command(bin: &Path, data: &Path, port: u16, socket_dir: &Path) -> Command {
    // SIGINT: Postgres's fast shutdown.
    let mut cmd = supervisor::command(bin.join("postgres"), Signal::INT);
    cmd.arg("-D")
        .arg(data)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
        .arg(socket_dir)
        .args([
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=400",
        ])
        .stdout(Stdio::null());
    // What each statement costs (the benchmarks print it), where the package has it.
    if bin.join("../lib/pg_stat_statements.so").exists() {
        cmd.args([
            "-c",
            "shared_preload_libraries=pg_stat_statements",
            "-c",
            "pg_stat_statements.track=all",
        ]);
    }
    unprivileged(&mut cmd);
    cmd
}

/// `nats-server` with JetStream on 127.0.0.1:`port`, storing in `store_dir`.
pub fn nats_command(binary: &Path, store_dir: &Path, port: u16) -> Command {
    let mut cmd = supervisor::command(binary, Signal::TERM);
    cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store_dir)
        .stdout(Stdio::null());
    cmd
}

/// Where a nats-server stands in the topology of DESIGN §11: the vendor's hub
/// (JetStream domain `hub`, accepting leaf nodes), or a Sovereign's leaf node
/// (a JetStream domain of its own, connected to the hub's leaf port).
#[derive(Clone, Debug)]
pub enum NatsRole {
    /// The hub, with its accounts (`accounts`: configuration text, e.g.
    /// [`hub_accounts`] or the chart's; each leaf node's credentials bind it
    /// to its own account).
    Hub {
        leaf_port: u16,
        accounts: String,
    },
    Leaf {
        hub_leaf_port: u16,
    },
    /// A server configured by `config` (appended to its name, port and JetStream store),
    /// e.g. the chart's leaf node snippet.
    Configured {
        config: String,
    },
}

/// The password of Sovereign `name`'s leaf node at the hub — for the
/// development stack and the tests only (a real hub's come from Secrets).
pub fn leaf_password(name: &str) -> String {
    format!("{name}-leaf-node-password")
}

/// The user a Sovereign's HTTP server connects to its leaf node as: it may
/// only claim customers at the hub (`voucher.claim.<sovereign>`) and hear the
/// answers — not ask for allotments, not publish audit events.
pub const SERVER_USER: &str = "server";

/// The password of [`SERVER_USER`] — development and tests only.
pub fn server_password(sovereign: &str) -> String {
    format!("{sovereign}-server-password")
}

/// A Sovereign's leaf node users: the operator's controller (anything in the
/// Sovereign's own account; `no_auth_user`, development and tests) and its HTTP
/// server, which may only claim (docs/federation.md, "NATS accounts and
/// permissions").
pub fn leaf_users(sovereign: &str) -> String {
    let password = server_password(sovereign);
    format!(
        "no_auth_user: operator\n\
         authorization {{\n\
         \x20 users: [\n\
         \x20   {{ user: operator, password: \"operator-development-password\" }}\n\
         \x20   {{ user: {SERVER_USER}, password: \"{password}\",\n\
         \x20     permissions: {{ publish: {{ allow: [\"voucher.claim.{sovereign}\"] }}, subscribe: {{ allow: [\"_INBOX.>\"] }} }} }}\n\
         \x20 ]\n\
         }}\n"
    )
}

/// The hub's accounts (DESIGN §11 rule 11, docs/federation.md "NATS
/// accounts"): `HUB` runs the hub's JetStream and services and exports them
/// with the requester's account as the subject's last token
/// (`account_token_position`), so a Sovereign can ask only in its own name;
/// each Sovereign's account imports exactly those three services — never the
/// hub's JetStream API, which would reach the claim bucket — and exports to
/// `HUB` only what the hub's audit stream needs to source its events of
/// global vouchers: a consumer create filtered to `<prefix>.global.>`, the
/// delivery subjects and flow control. Local connections without
/// credentials are the hub's own (`no_auth_user`: development and tests).
pub fn hub_accounts(sovereigns: &[String], stream: &str, prefix: &str) -> String {
    let mut hub_imports = String::new();
    let mut accounts = String::new();
    for name in sovereigns {
        let consumer = format!("$JS.{name}.API.CONSUMER.CREATE.{stream}.*.{prefix}.global.>");
        let deliver = format!("voucher.audit.deliver.{name}.>");
        hub_imports.push_str(&format!(
            "      {{ service: {{ account: \"{name}\", subject: \"{consumer}\" }} }}\n\
             \x20     {{ stream: {{ account: \"{name}\", subject: \"{deliver}\" }} }}\n\
             \x20     {{ service: {{ account: \"{name}\", subject: \"$JS.FC.>\" }} }}\n"
        ));
        let password = leaf_password(name);
        accounts.push_str(&format!(
            "  \"{name}\": {{\n\
             \x20   users: [ {{ user: \"{name}\", password: \"{password}\" }} ]\n\
             \x20   imports: [\n\
             \x20     {{ service: {{ account: HUB, subject: \"voucher.allotment.{name}\" }} }}\n\
             \x20     {{ service: {{ account: HUB, subject: \"voucher.definition.{name}\" }} }}\n\
             \x20     {{ service: {{ account: HUB, subject: \"voucher.claim.{name}\" }} }}\n\
             \x20   ]\n\
             \x20   exports: [\n\
             \x20     {{ service: \"{consumer}\", accounts: [HUB] }}\n\
             \x20     {{ stream: \"{deliver}\", accounts: [HUB] }}\n\
             \x20     {{ service: \"$JS.FC.>\", accounts: [HUB] }}\n\
             \x20   ]\n\
             \x20 }}\n"
        ));
    }
    format!(
        "no_auth_user: hub\n\
         system_account: SYS\n\
         accounts {{\n\
         \x20 HUB: {{\n\
         \x20   jetstream: enabled\n\
         \x20   users: [ {{ user: hub, password: \"hub-development-password\" }} ]\n\
         \x20   exports: [\n\
         \x20     {{ service: \"voucher.allotment.*\", account_token_position: 3 }}\n\
         \x20     {{ service: \"voucher.definition.*\", account_token_position: 3 }}\n\
         \x20     {{ service: \"voucher.claim.*\", account_token_position: 3 }}\n\
         \x20   ]\n\
         \x20   imports: [\n{hub_imports}    ]\n\
         \x20 }}\n\
         {accounts}\
         \x20 SYS: {{ users: [ {{ user: sys, password: \"sys-development-password\" }} ] }}\n\
         }}\n"
    )
}

/// The audit stream and subject prefix every Sovereign uses (the operator's defaults).
pub const AUDIT_STREAM: &str = "VOUCHER_AUDIT";
pub const AUDIT_PREFIX: &str = "catalyst.vouchers";

/// The command that runs a nats-server named `name` (its JetStream domain
/// too) on `port`, as `role` says: its configuration file written in `dir`,
/// its JetStream store under it.
pub fn nats_node_command(
    binary: &Path,
    dir: &Path,
    name: &str,
    port: u16,
    role: &NatsRole,
) -> std::io::Result<Command> {
    let leafnodes = match role {
        // Not advertised: a leaf reconnects only to the URL it was given (a WAN link, or a
        // test's proxy standing for one), never around it.
        NatsRole::Hub {
            leaf_port,
            accounts,
        } => format!(
            "leafnodes {{ listen: \"127.0.0.1:{leaf_port}\", no_advertise: true }}\n{accounts}"
        ),
        // The leaf node's credentials bind it to its own account at the hub.
        NatsRole::Leaf { hub_leaf_port } => format!(
            "leafnodes {{ remotes: [ {{ url: \"nats-leaf://{name}:{}@127.0.0.1:{hub_leaf_port}\" }} ] }}\n{}",
            leaf_password(name),
            leaf_users(name)
        ),
        NatsRole::Configured { config } => config.clone(),
    };
    let store = dir.join("jetstream");
    let config = format!(
        "server_name: \"{name}\"\nlisten: \"127.0.0.1:{port}\"\n\
         jetstream {{ store_dir: {store:?}, domain: \"{name}\" }}\n{leafnodes}\n"
    );
    let file = dir.join("nats.conf");
    std::fs::create_dir_all(dir)?;
    std::fs::write(&file, config)?;
    let mut cmd = supervisor::command(binary, Signal::TERM);
    cmd.arg("-c").arg(file).stdout(Stdio::null());
    Ok(cmd)
}

/// `pg_basebackup` of the server on 127.0.0.1:`port` into `target` (a
/// physical copy, WAL included, that a `postgres` started on it restores).
pub fn pg_basebackup_command(bin: &Path, port: u16, target: &Path) -> Command {
    let mut cmd = Command::new(bin.join("pg_basebackup"));
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
        "-X",
        "stream",
        "-D",
    ])
    .arg(target)
    .stdout(Stdio::null());
    unprivileged(&mut cmd);
    cmd
}
