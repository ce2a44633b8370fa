//! The `controller` subcommand as a process: clear start-up errors, probes
//! and metrics, and a graceful stop on SIGTERM that releases the Lease.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::free_port;

fn controller(kubeconfig: &std::path::Path, database: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_voucher-operator"));
    cmd.arg("controller")
        .env("KUBECONFIG", kubeconfig)
        .env("DATABASE_URL", database)
        .env("DATABASE_CONNECT_TIMEOUT", "2s")
        .env("RUST_LOG", "info");
    cmd
}

#[tokio::test]
async fn an_unreachable_api_server_is_a_clear_start_up_error() {
    let database = support::fresh_database("ctlcli").await;
    let dir = tempfile::tempdir().unwrap();
    // A kubeconfig that is valid but points at a port nothing listens on.
    let text = support::cluster::cluster()
        .kubeconfig_text("default")
        .replace(
            &support::cluster::cluster().url,
            &format!("https://127.0.0.1:{}", free_port()),
        );
    let config = dir.path().join("kubeconfig");
    std::fs::write(&config, text).unwrap();
    let output = controller(&config, &database).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach the Kubernetes API server at https://127.0.0.1:")
            && stderr.contains("onnection refused")
            && !stderr.contains("ServiceError"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_unreachable_database_is_a_clear_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::cluster::cluster().kubeconfig(dir.path(), "default");
    let database = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    let output =
        tokio::task::spawn_blocking(move || controller(&config, &database).output().unwrap())
            .await
            .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot connect to the database"),
        "{stderr}"
    );
}

#[tokio::test]
async fn sigterm_stops_the_controller_and_releases_the_lease() {
    let database = support::fresh_database("ctlcli").await;
    let (client, ns) = support::cluster::setup("ctlcli").await;
    let dir = tempfile::tempdir().unwrap();
    let config = support::cluster::cluster().kubeconfig(dir.path(), &ns);
    let port = free_port();
    let mut child = controller(&config, &database)
        .args([
            "--metrics-address",
            &format!("127.0.0.1:{port}"),
            "--identity",
            "replica-1",
            "--watch-namespace",
            &ns,
            "--lease-namespace",
            &ns,
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("controller.log")).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(dir.path().join("controller.log")).unwrap_or_default();

    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(client, &ns);
    let holder = || async {
        leases
            .get_opt("voucher-operator")
            .await
            .unwrap()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while holder().await.as_deref() != Some("replica-1") {
        assert!(
            Instant::now() < deadline,
            "the controller never took the lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = support::http_get(port, "/metrics").await;
    assert!(metrics.contains("voucher_operator_vouchers"), "{metrics}");
    assert!(support::http_get(port, "/readyz").await.contains("ready"));
    voucher_testenv::supervisor::signal(child.id(), voucher_testenv::supervisor::Signal::TERM);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no exit within 30 s of SIGTERM; its log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}; its log:\n{}", log());
    assert_eq!(holder().await, None, "the lease was not released");
}

#[tokio::test]
async fn a_taken_metrics_port_stops_the_controller_at_once_naming_the_address() {
    let database = support::fresh_database("ctlcli").await;
    let (_client, ns) = support::cluster::setup("ctlport").await;
    let dir = tempfile::tempdir().unwrap();
    let config = support::cluster::cluster().kubeconfig(dir.path(), &ns);
    // "At once": before it asks the Kubernetes API anything. Pointed at an API server that is
    // not there, a controller that asked first would fail (10 s later) naming that instead.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere_port = nowhere.local_addr().unwrap().port();
    drop(nowhere);
    let real = std::fs::read_to_string(&config).unwrap();
    let server = real
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .expect("the kubeconfig names its server")
        .to_owned();
    std::fs::write(
        &config,
        real.replace(&server, &format!("https://127.0.0.1:{nowhere_port}")),
    )
    .unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let args = [
        "--metrics-address",
        &address,
        "--watch-namespace",
        &ns,
        "--lease-namespace",
        &ns,
    ];
    let output = {
        let mut cmd = controller(&config, &database);
        cmd.args(args);
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {address} for metrics")),
        "{stderr}"
    );
    assert!(
        !stderr.contains("Kubernetes API"),
        "it asked the Kubernetes API before its port: {stderr}"
    );
}

/// A process whose log goes to a pipe its reader closes still stops on SIGTERM (the server
/// used to keep running, its shutdown lost to the closed pipe).
#[tokio::test]
async fn sigterm_stops_the_server_after_its_log_reader_went_away() {
    let database = support::fresh_database("ctlpipe").await;
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
        .args(["server", "--listen-address", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", &database)
        .env("JWT_HS256_SECRET", "x".repeat(32))
        .env("KUBECONFIG", "/nonexistent")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The readers read a little, then go, as `| head -2` does.
    let stderr = child.stderr.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stderr).lines();
        let _ = lines.next();
    }
    drop(stdout);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !support::http_get(port, "/healthz").await.contains("ok") {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the server stopped before it served: {status}");
        }
        assert!(Instant::now() < deadline, "the server never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It logs into the closed pipe meanwhile (requests at debug level).
    for _ in 0..5 {
        support::http_get(port, "/healthz").await;
    }
    voucher_testenv::supervisor::signal(child.id(), voucher_testenv::supervisor::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "SIGTERM was ignored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_missing_lease_namespace_is_named_without_a_status_dump() {
    let database = support::fresh_database("ctlcli").await;
    let (_, ns) = support::cluster::setup("ctllease").await;
    let dir = tempfile::tempdir().unwrap();
    let config = support::cluster::cluster().kubeconfig(dir.path(), &ns);
    let port = free_port();
    let mut cmd = controller(&config, &database);
    cmd.args([
        "--metrics-address",
        &format!("127.0.0.1:{port}"),
        "--watch-namespace",
        &ns,
        "--lease-namespace",
        "no-such-namespace",
    ]);
    let output = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the namespace no-such-namespace does not exist")
            && stderr.contains("--lease-namespace"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("ListMeta") && !stderr.contains("Status {"),
        "{stderr}"
    );
}
