//! `voucher-dev local --sovereigns N`: the vendor's hub and N Sovereigns on
//! one machine, as DESIGN §11 draws them — each its own kube-apiserver and
//! etcd, the hub's nats-server (JetStream domain `hub`) and one leaf node per
//! Sovereign (a domain of its own), a billing database per Sovereign (one
//! Postgres server), the hub role and each Sovereign's operator (controller,
//! allotment loop, audit relay, HTTP server) in this process. What each one
//! is reached by goes to `sovereigns.json` in the state directory.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use voucher_operator::controller::{Config, Role, Settings};
use voucher_operator::domain::{Billing, Currency};
use voucher_operator::federation::claimer::Claimer;
use voucher_operator::federation::sovereign::Refill;
use voucher_operator::federation::{DEFAULT_GLOBAL_NAMESPACE, Joined, allotment, claims, hub};
use voucher_operator::relay::RelaySettings;
use voucher_operator::server::auth::AuthSettings;
use voucher_operator::server::{self, ServerSettings};
use voucher_operator::store::{DatabaseSettings, Store};
use voucher_testenv::control_plane::{self, Binaries};
use voucher_testenv::services::{self, NatsRole};
use voucher_testenv::supervisor::Signal;

use crate::stack::{self, Cluster, Process, StackSettings};

/// The global voucher every part of the federation applies.
const EXAMPLE: &str = include_str!("../../../examples/global/world-launch.yaml");
const EXAMPLE_CODE: &str = "WORLD-LAUNCH-50";
const EXAMPLE_NAME: &str = "world-launch-50";
/// The example that is once per customer on any Sovereign.
const ONCE_CODE: &str = "WORLD-ONCE-20";
const ONCE_NAME: &str = "world-once-20";

/// One part of the federation: its name, ports and state directory. The hub
/// takes the stack's ports; Sovereign `i` the next ones (`--api-port` + i, …).
struct Part {
    name: String,
    dir: PathBuf,
    settings: StackSettings,
    /// A Sovereign's currency (`--currencies`, in turn); the hub's is unused.
    currency: Currency,
}

fn part(settings: &StackSettings, i: u16, currencies: &[Currency]) -> Part {
    let currency = match i {
        0 => Currency::default(),
        i => currencies[usize::from(i - 1) % currencies.len()].clone(),
    };
    let name = if i == 0 {
        "hub".to_owned()
    } else {
        format!("sov{i}")
    };
    let dir = settings.state_dir.join(&name);
    Part {
        settings: StackSettings {
            state_dir: dir.clone(),
            api_port: settings.api_port + i,
            etcd_port: settings.etcd_port + i,
            // The hub's leaf port is the one after its client port.
            nats_port: settings.nats_port + if i == 0 { 0 } else { 1 + i },
            http_port: settings.http_port + i,
            ..settings.clone()
        },
        name,
        dir,
        currency,
    }
}

/// Runs the federation until Ctrl-C (or, with `smoke`, one global voucher
/// redeemed on two Sovereigns, then stops).
pub async fn run(
    settings: StackSettings,
    sovereigns: u16,
    currencies: &[Currency],
    smoke: bool,
) -> anyhow::Result<()> {
    if settings.kubeconfig.is_some() {
        anyhow::bail!("--sovereigns starts a cluster per Sovereign: it cannot use --kubeconfig");
    }
    services::ensure_packages()?;
    let binaries = Binaries::find_or_build()?;
    std::fs::create_dir_all(&settings.state_dir)?;
    if services::is_root() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&settings.state_dir, std::fs::Permissions::from_mode(0o711))?;
    }
    let stop = voucher_operator::telemetry::shutdown_signal();
    let mut processes = vec![stack::start_postgres(&settings).await?];
    let outcome = async {
        let parts: Vec<Part> = (0..=sovereigns)
            .map(|i| part(&settings, i, currencies))
            .collect();
        let hub_leaf_port = settings.nats_port + 1;
        let mut clusters = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let role = match i {
                0 => NatsRole::Hub {
                    leaf_port: hub_leaf_port,
                    accounts: services::hub_accounts(
                        &parts[1..]
                            .iter()
                            .map(|p| p.name.clone())
                            .collect::<Vec<_>>(),
                        services::AUDIT_STREAM,
                        services::AUDIT_PREFIX,
                    ),
                },
                _ => NatsRole::Leaf { hub_leaf_port },
            };
            processes.push(start_nats(part, &role).await?);
            let (started, cluster) = stack::start_control_plane(&part.settings, &binaries).await?;
            processes.extend(started);
            install(&cluster).await?;
            clusters.push(cluster);
        }
        eprintln!("the hub and {sovereigns} Sovereign(s) are up; starting their operators");
        run_parts(&settings, &parts, &clusters, smoke, stop.clone()).await
    }
    .await;
    stop.cancel();
    for process in processes.into_iter().rev() {
        process.stop().await;
    }
    outcome
}

async fn start_nats(part: &Part, role: &NatsRole) -> anyhow::Result<Process> {
    let binary = voucher_testenv::built::nats_server()?;
    let dir = part.dir.join("nats");
    let log = dir.join("nats.log");
    let cmd =
        services::nats_node_command(&binary, &dir, &part.name, part.settings.nats_port, role)?;
    let mut process = stack::spawn(cmd, &log, "nats-server", Signal::TERM)?;
    stack::wait_for_port(&mut process, part.settings.nats_port, &log).await?;
    Ok(process)
}

/// The CRDs, the global namespace and the global voucher, in one cluster.
async fn install(cluster: &Cluster) -> anyhow::Result<()> {
    for crd in voucher_operator::api::crds() {
        control_plane::install_crd(&cluster.client, &crd).await?;
    }
    let namespaces = cluster
        .kubectl(&["get", "namespaces", "-o", "name"])
        .await?;
    if !namespaces.contains(&format!("namespace/{DEFAULT_GLOBAL_NAMESPACE}")) {
        cluster
            .kubectl(&["create", "namespace", DEFAULT_GLOBAL_NAMESPACE])
            .await?;
    }
    let file = cluster.kubeconfig.with_file_name("world-launch.yaml");
    std::fs::write(&file, EXAMPLE)?;
    print!(
        "{}",
        cluster
            .kubectl(&["apply", "-f", &file.to_string_lossy()])
            .await?
    );
    Ok(())
}

/// The hub role, then each Sovereign's operator; `sovereigns.json`; the banner
/// (or the smoke check).
async fn run_parts(
    settings: &StackSettings,
    parts: &[Part],
    clusters: &[Cluster],
    smoke: bool,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let hub_url = format!("nats://127.0.0.1:{}", parts[0].settings.nats_port);
    let hub_settings = hub::Settings {
        global_namespace: DEFAULT_GLOBAL_NAMESPACE.into(),
        prefix: allotment::SUBJECT_PREFIX.into(),
        replicas: 1,
        ceiling_percent: 100,
        max_grant: 1000,
        refresh: Duration::from_secs(2),
        // The vendor's one audit stream: every Sovereign's events of global vouchers.
        audit: Some(voucher_operator::federation::audit::Gather {
            stream: RelaySettings::default().stream,
            sovereign_stream: RelaySettings::default().stream,
            prefix: RelaySettings::default().subject_prefix,
            sovereigns: parts[1..].iter().map(|p| p.name.clone()).collect(),
            replicas: 1,
        }),
    };
    let hub_nats = async_nats::connect(&hub_url).await?;
    let hub_client = clusters[0].client.clone();
    let hub_stop = stop.clone();
    let mut tasks = vec![tokio::spawn(async move {
        if let Err(error) = hub::run(hub_client, hub_nats, hub_settings, hub_stop).await {
            tracing::error!(%error, "the hub stopped");
        }
    })];
    let secret = stack::jwt_secret(&settings.state_dir)?;
    // The vendor's claim key, one for every Sovereign (once per customer anywhere).
    let claim_key = stack::state_secret(&settings.state_dir, "claim-key")?;
    let mut described = Vec::new();
    for (part, cluster) in parts.iter().zip(clusters).skip(1) {
        let database = format!("billing_{}", part.name);
        let database_url = stack::ensure_database(settings, &database).await?;
        let started = start_sovereign(
            part,
            cluster,
            &database_url,
            (&secret, &claim_key),
            stop.clone(),
        )
        .await?;
        tasks.extend(started);
        described.push(json!({
            "name": part.name,
            "currency": part.currency.as_str(),
            "kubeconfig": cluster.kubeconfig,
            "http": format!("http://127.0.0.1:{}", part.settings.http_port),
            "database_url": database_url,
            "nats_url": format!("nats://127.0.0.1:{}", part.settings.nats_port),
            "token": format!("cargo local token --state-dir {} --sub alice", settings.state_dir.display()),
        }));
    }
    let map = json!({
        "hub": {"kubeconfig": clusters[0].kubeconfig, "nats_url": hub_url, "jetstream_domain": "hub"},
        "sovereigns": described,
    });
    let file = settings.state_dir.join("sovereigns.json");
    std::fs::write(&file, serde_json::to_string_pretty(&map)?)?;
    let token = stack::dev_token(
        &secret,
        "local-developer",
        Some("superadmin"),
        Duration::from_secs(86_400),
    )?;
    let outcome = match smoke {
        true => smoke_check(parts, clusters, &token).await,
        false => {
            print_try(settings, parts, clusters, &file);
            stop.cancelled().await;
            Ok(())
        }
    };
    // The operators end (and close their database connections) before their services stop.
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), futures::future::join_all(tasks)).await;
    outcome
}

/// One Sovereign's operator: the controller joined to the hub through its
/// leaf node (the hub's bucket read in the hub's domain), the audit relay to
/// its own domain, and the HTTP server; their tasks, which end on `stop`.
async fn start_sovereign(
    part: &Part,
    cluster: &Cluster,
    database_url: &str,
    (secret, claim_key): (&str, &str),
    stop: CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let store = Store::connect(&DatabaseSettings {
        url: database_url.to_owned(),
        max_connections: 10,
        ..Default::default()
    })
    .await?;
    store.migrate().await?;
    let nats_url = format!("nats://127.0.0.1:{}", part.settings.nats_port);
    let client = async_nats::connect(&nats_url).await?;
    let joined = Joined {
        client: client.clone(),
        refill: Refill {
            sovereign: part.name.clone(),
            prefix: allotment::SUBJECT_PREFIX.into(),
            low_water: 20,
            step: 100,
            timeout: Duration::from_secs(2),
        },
        every: Duration::from_secs(1),
    };
    let config = Config {
        settings: Settings {
            resync_interval: Duration::from_secs(300),
            status_min_interval: Duration::from_secs(1),
            namespace: None,
            identity: format!("local-{}", part.name),
            concurrency: 4,
            issuers: voucher_operator::domain::Issuers::new(["default"]),
            key_namespace: "default".into(),
            global_namespace: DEFAULT_GLOBAL_NAMESPACE.into(),
            joined: Some(joined),
            billing: Billing {
                currency: part.currency.clone(),
                ..Default::default()
            },
        },
        relay: Some(RelaySettings {
            nats_url,
            ..Default::default()
        }),
        lease: None,
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let role = Role::new(cluster.client.clone(), store.clone(), config, &mut registry);
    let role_stop = stop.clone();
    let name = part.name.clone();
    let controller = tokio::spawn(async move {
        if let Err(error) = role.run(role_stop).await {
            tracing::error!(sovereign = %name, %error, "the controller stopped");
        }
    });
    let config = server::Config {
        auth: AuthSettings {
            hs256_secret: Some(secret.to_owned()),
            ..Default::default()
        },
        settings: ServerSettings {
            billing: Billing {
                currency: part.currency.clone(),
                ..Default::default()
            },
            rate_limit_per_minute: 600,
            rate_limit_burst: 100,
            ..Default::default()
        },
        listen: (Ipv4Addr::LOCALHOST, part.settings.http_port).into(),
        admin: None,
        metrics: None,
        claimer: Some(Claimer {
            client: client.clone(),
            sovereign: part.name.clone(),
            prefix: claims::SUBJECT_PREFIX.into(),
            key: claim_key.as_bytes().to_vec(),
            timeout: Duration::from_secs(2),
            recover_after: Duration::from_secs(30),
        }),
    };
    let http = server::Role::new(store, Some(cluster.client.clone()), config, registry).await?;
    let server = tokio::spawn(async move {
        if let Err(error) = http.run(stop).await {
            tracing::error!(%error, "the server stopped");
        }
    });
    Ok(vec![controller, server])
}

fn print_try(settings: &StackSettings, parts: &[Part], clusters: &[Cluster], file: &Path) {
    let kubectl_dir = clusters[0]
        .kubectl
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let mut text = format!(
        "\nThe hub and {} Sovereign(s) are running locally (state in {}; every address in {}).\n\
         The global vouchers {EXAMPLE_CODE} and {ONCE_CODE} (once per customer anywhere; \
         examples/global/world-launch.yaml) are applied on each. Try:\n\n\
         export PATH={kubectl_dir}:$PATH\n\
         export TOKEN=$(cargo local token --state-dir {} --sub alice)\n",
        parts.len() - 1,
        settings.state_dir.display(),
        file.display(),
        settings.state_dir.display(),
    );
    for (part, cluster) in parts.iter().zip(clusters).skip(1) {
        let (port, name, currency) = (part.settings.http_port, &part.name, part.currency.as_str());
        text += &format!(
            "curl -s http://127.0.0.1:{port}/billing/vouchers/redeem -H \"Authorization: Bearer $TOKEN\" -d '{{\"code\":\"{EXAMPLE_CODE}\",\"tenant_id\":\"acme\"}}'   # on {name} ({currency})\n\
             curl -s http://127.0.0.1:{port}/billing/vouchers/redeem -H \"Authorization: Bearer $TOKEN\" -d '{{\"code\":\"{ONCE_CODE}\",\"tenant_id\":\"acme\"}}'   # 409 after the first Sovereign\n\
             KUBECONFIG={} kubectl get vouchers -n {DEFAULT_GLOBAL_NAMESPACE} -o wide   # its share there\n",
            cluster.kubeconfig.display(),
        );
    }
    text += &format!(
        "KUBECONFIG={} kubectl get vouchers -n {DEFAULT_GLOBAL_NAMESPACE} -o wide   # at the hub: units granted per Sovereign\n\
         cargo run -q -- events --nats-url nats://127.0.0.1:{}   # at the hub: every Sovereign's events of global vouchers\n\n\
         Ctrl-C stops everything.",
        clusters[0].kubeconfig.display(),
        parts[0].settings.nats_port,
    );
    println!("{text}");
}

/// The once-per-customer-anywhere example: granted to the customer on sov1, then 409 on sov2.
async fn once_anywhere(
    parts: &[Part],
    clusters: &[Cluster],
    token: &str,
    deadline: Instant,
) -> anyhow::Result<()> {
    let share = ["get", "voucher", ONCE_NAME, "-n", DEFAULT_GLOBAL_NAMESPACE];
    let jsonpath = ["-o", "jsonpath={.status.allotment.share}"];
    let args: Vec<&str> = share.iter().chain(&jsonpath).copied().collect();
    while clusters[1]
        .kubectl(&args)
        .await?
        .trim()
        .parse::<u64>()
        .unwrap_or(0)
        == 0
    {
        stack::wait_until(deadline, "a share of the once-anywhere voucher on sov1").await?;
    }
    let base = |part: &Part| format!("http://127.0.0.1:{}", part.settings.http_port);
    let body = stack::smoke_redeem(&base(&parts[1]), token, ONCE_CODE).await?;
    println!("smoke: redeemed {ONCE_CODE} on {}: {body}", parts[1].name);
    let again = reqwest::Client::new()
        .post(format!("{}/billing/vouchers/redeem", base(&parts[2])))
        .bearer_auth(token)
        .json(&json!({"code": ONCE_CODE, "tenant_id": "smoke"}))
        .send()
        .await?;
    let (status, body) = (again.status(), again.text().await?);
    if status != 409 {
        anyhow::bail!(
            "smoke: {ONCE_CODE} on {} answered {status}, not 409: {body}",
            parts[2].name
        );
    }
    println!(
        "smoke: {ONCE_CODE} again on {}: {status} {body}",
        parts[2].name
    );
    Ok(())
}

/// The global voucher redeemed on two Sovereigns, each within a share the hub
/// granted, the once-anywhere one refused on the second, both redemptions in
/// the hub's audit stream, and the hub's status showing both allotments.
async fn smoke_check(parts: &[Part], clusters: &[Cluster], token: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let jsonpath = "jsonpath={.status.allotment.share}";
    let share = [
        "get",
        "voucher",
        EXAMPLE_NAME,
        "-n",
        DEFAULT_GLOBAL_NAMESPACE,
        "-o",
        jsonpath,
    ];
    for (part, cluster) in parts.iter().zip(clusters).skip(1).take(2) {
        while cluster
            .kubectl(&share)
            .await?
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
            == 0
        {
            stack::wait_until(deadline, "a share of the global voucher on every Sovereign").await?;
        }
        let base = format!("http://127.0.0.1:{}", part.settings.http_port);
        let body = stack::smoke_redeem(&base, token, EXAMPLE_CODE).await?;
        println!("smoke: redeemed {EXAMPLE_CODE} on {}: {body}", part.name);
    }
    once_anywhere(parts, clusters, token, deadline).await?;
    // The vendor's one audit stream at the hub: both Sovereigns' redemptions of the global voucher.
    let hub = RelaySettings {
        nats_url: format!("nats://127.0.0.1:{}", parts[0].settings.nats_port),
        ..Default::default()
    };
    stack::smoke_event(&hub, deadline, (EXAMPLE_CODE, "redeemed"), 2).await?;
    loop {
        let allotments = clusters[0]
            .kubectl(&[
                "get",
                "voucher",
                EXAMPLE_NAME,
                "-n",
                DEFAULT_GLOBAL_NAMESPACE,
                "-o",
                "jsonpath={.status.allotment.sovereigns}",
            ])
            .await?;
        // Each Sovereign's entry `name=share/redeemed`, with a share.
        let held = |name: &str| {
            allotments
                .split_whitespace()
                .filter_map(|entry| entry.strip_prefix(&format!("{name}=")))
                .any(|rest| rest.split('/').next().is_some_and(|share| share != "0"))
        };
        if held("sov1") && held("sov2") {
            println!("smoke: the hub's allotments: {allotments}");
            break;
        }
        stack::wait_until(deadline, "both allotments in the hub's status").await?;
    }
    print!(
        "{}",
        clusters[0]
            .kubectl(&[
                "get",
                "vouchers",
                "-n",
                DEFAULT_GLOBAL_NAMESPACE,
                "-o",
                "wide"
            ])
            .await?
    );
    Ok(())
}
