//! End to end with the real `kubectl` (built with the API server, of the same
//! version): the real Kubernetes API server, the controller and the HTTP
//! server (in this process), a real Postgres. What a platform engineer
//! types, and what they should see.

mod support;

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use voucher_operator::controller::metrics::Metrics;
use voucher_operator::controller::{self, Context, Settings};
use voucher_operator::server::auth::AuthSettings;
use voucher_operator::store::Store;

struct Stack {
    kubeconfig: std::path::PathBuf,
    /// The `kubectl` built with the test API server (the same version).
    kubectl: std::path::PathBuf,
    _dir: Option<tempfile::TempDir>,
    http: String,
    jwt_secret: String,
    pool: sqlx::PgPool,
    stops: Vec<CancellationToken>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stops.iter().for_each(CancellationToken::cancel);
    }
}

/// A real cluster with the operator deployed, when VOUCHER_E2E_KUBECONFIG is
/// set: the same test then runs against it instead of the local stack.
async fn real_cluster() -> Option<Stack> {
    let kubeconfig = std::env::var_os("VOUCHER_E2E_KUBECONFIG")?;
    let need = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("VOUCHER_E2E_KUBECONFIG is set, so {name} must be too (see the README)")
        })
    };
    let pool = support::pool(&need("VOUCHER_E2E_DATABASE_URL")).await;
    // The cluster's own kubectl when there is one on PATH (within its version skew), else
    // the one built with the test API server.
    let kubectl = voucher_testenv::services::find_on_path("kubectl").unwrap_or_else(|| {
        voucher_testenv::control_plane::Binaries::find_or_build()
            .unwrap_or_else(|e| panic!("{e:#}"))
            .kubectl()
    });
    Some(Stack {
        kubeconfig: kubeconfig.into(),
        kubectl,
        _dir: None,
        http: need("VOUCHER_E2E_HTTP_URL"),
        jwt_secret: need("VOUCHER_E2E_JWT_SECRET"),
        pool,
        stops: Vec::new(),
    })
}

async fn stack() -> Stack {
    support::init_tracing();
    if let Some(cluster) = real_cluster().await {
        return cluster;
    }
    let url = support::fresh_database("kubectl").await;
    let pool = support::pool(&url).await;
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    let (client, ns) = support::cluster::setup("e2e").await;
    let mut registry = prometheus_client::registry::Registry::default();
    let settings = Settings {
        status_min_interval: Duration::from_millis(200),
        identity: "e2e".into(),
        concurrency: 4,
        ..support::controller_settings(&ns)
    };
    let ctx = Context::new(
        client.clone(),
        store.clone(),
        Arc::new(Metrics::register(&mut registry)),
        settings,
    );
    let stop = CancellationToken::new();
    tokio::spawn(controller::voucher::run(ctx, stop.clone()));
    let auth = AuthSettings {
        hs256_secret: Some("e2e-shared-secret-of-at-least-32-bytes".into()),
        ..Default::default()
    };
    let (http, http_stop) =
        support::serve_http(store, support::server_settings(), auth, Some(client)).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = support::cluster::cluster().kubeconfig(dir.path(), &ns);
    Stack {
        kubeconfig,
        kubectl: support::cluster::cluster().binaries.kubectl(),
        _dir: Some(dir),
        http,
        jwt_secret: "e2e-shared-secret-of-at-least-32-bytes".into(),
        pool,
        stops: vec![stop, http_stop],
    }
}

impl Stack {
    /// Runs kubectl; (success, stdout, stderr).
    async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(&self.kubectl)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input
            .write_all(stdin.unwrap_or("").as_bytes())
            .await
            .unwrap();
        drop(input);
        let output = child.wait_with_output().await.unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    async fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.kubectl(args, None).await;
        assert!(ok, "kubectl {args:?} failed: {err}");
        out
    }

    async fn until(&self, args: &[&str], what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (_, out, _) = self.kubectl(args, None).await;
            if check(&out) {
                return out;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; last output:\n{out}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The cells of the row `name`, cut where the header's columns start (a cell may hold spaces:
/// the grant `20% install 3mo`).
fn row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    let header = table.lines().next().unwrap_or_default();
    let starts: Vec<usize> = header
        .char_indices()
        .filter(|&(i, c)| c != ' ' && (i == 0 || header.as_bytes()[i - 1] == b' '))
        .map(|(i, _)| i)
        .collect();
    let line = table
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no row {name} in\n{table}"));
    let cell = |from: usize, to: usize| line.get(from.min(line.len())..to.min(line.len()));
    starts
        .iter()
        .enumerate()
        .map(|(k, &from)| {
            let to = starts.get(k + 1).copied().unwrap_or(line.len());
            cell(from, to).unwrap_or_default().trim()
        })
        .collect()
}

#[tokio::test]
async fn a_platform_engineers_day_with_kubectl() {
    let s = stack().await;

    // Client-side apply of the examples through their kustomization; every Voucher becomes Ready.
    let applied = s.ok(&["apply", "-k", "examples/vouchers"]).await;
    assert_eq!(applied.matches("created").count(), 5, "{applied}");
    s.ok(&[
        "wait",
        "--for=condition=Ready",
        "voucher/omantel-muscat-200",
        "--timeout=20s",
    ])
    .await;
    let table = s
        .until(&["get", "vouchers"], "every phase", |t| {
            t.lines().skip(1).count() == 5
                && !t.contains("<none>")
                && t.lines()
                    .skip(1)
                    .all(|l| l.split_whitespace().count() >= 10)
        })
        .await;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "CODE", "GRANT", "ACTIVE", "REDEEMED", "MAX", "PHASE", "READY", "REASON", "AGE"
        ]
    );
    assert_eq!(
        &row(&table, "omantel-muscat-200")[1..9],
        [
            "OMANTEL-MUSCAT-200",
            "200 OMR",
            "true",
            "0",
            "200",
            "Active",
            "True",
            "Reconciled"
        ]
    );
    // -o wide: what is left under the cap, and the window.
    let wide = s.ok(&["get", "vouchers", "-o", "wide"]).await;
    let wide_header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    for column in ["REMAINING", "VALID-FROM", "EXPIRES"] {
        assert!(wide_header.contains(&column), "{wide}");
    }
    let remaining = wide_header.iter().position(|c| *c == "REMAINING").unwrap();
    assert_eq!(row(&wide, "omantel-muscat-200")[remaining], "200", "{wide}");
    assert_eq!(row(&table, "eid-al-fitr-2027")[6], "Scheduled");
    // A discount in the same column, as terms a person reads.
    assert_eq!(
        &row(&table, "installs-20-3m")[1..3],
        ["INSTALLS-20-3M", "20% install 3mo"],
        "{table}"
    );
    assert_eq!(row(&table, "franchise-sohar-50")[6], "Inactive");
    assert!(
        s.ok(&["get", "vch"]).await.contains("partner-welcome"),
        "short name"
    );
    assert!(
        s.ok(&["get", "catalyst"]).await.contains("partner-welcome"),
        "category"
    );

    // A redemption over HTTP shows in REDEEMED.
    let token = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "e2e-user", "exp": chrono::Utc::now().timestamp() + 300}),
        &EncodingKey::from_secret(s.jwt_secret.as_bytes()),
    )
    .unwrap();
    let response = reqwest::Client::new()
        .post(format!("{}/billing/vouchers/redeem", s.http))
        .bearer_auth(token)
        .json(&json!({"code": "omantel-muscat-200", "tenant_id": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let table = s
        .until(&["get", "vouchers"], "REDEEMED 1", |t| {
            t.lines().any(|l| {
                l.starts_with("omantel-muscat-200") && row(t, "omantel-muscat-200")[4] == "1"
            })
        })
        .await;
    assert_eq!(row(&table, "omantel-muscat-200")[4], "1");

    // describe shows the events.
    let described = s.ok(&["describe", "voucher", "omantel-muscat-200"]).await;
    assert!(
        described.contains("Created") && described.contains("voucher-operator"),
        "{described}"
    );

    // An edit through server-side apply bumps generation, and the row follows.
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/vouchers/launch-campaign.yaml"
    ))
    .unwrap()
    .replace("creditOMR: 200", "creditOMR: 250");
    let (ok, out, err) = s
        .kubectl(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(&manifest),
        )
        .await;
    assert!(ok, "{out}{err}");
    assert_eq!(
        s.ok(&[
            "get",
            "voucher",
            "omantel-muscat-200",
            "-o",
            "jsonpath={.metadata.generation}"
        ])
        .await,
        "2"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let credit: i32 = sqlx::query_scalar(
            "SELECT credit_omr FROM promo_codes WHERE code = 'OMANTEL-MUSCAT-200'",
        )
        .fetch_one(&s.pool)
        .await
        .unwrap();
        if credit == 250 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the row did not follow the edit"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An invalid manifest is refused with a reason a person understands.
    let invalid = manifest
        .replace("creditOMR: 250", "creditOMR: 0")
        .replace("omantel-muscat-200", "broken-voucher");
    let (ok, _, err) = s.kubectl(&["apply", "-f", "-"], Some(&invalid)).await;
    assert!(!ok);
    assert!(
        err.contains("spec.creditOMR") && err.contains("greater than or equal to 1"),
        "{err}"
    );

    // delete: the finalizer revokes the row before the resource goes.
    s.ok(&["delete", "voucher", "partner-welcome", "--timeout=20s"])
        .await;
    let (active, deleted): (bool, bool) = sqlx::query_as(
        "SELECT active, deleted_at IS NOT NULL FROM promo_codes WHERE code = 'PARTNER_WELCOME_10'",
    )
    .fetch_one(&s.pool)
    .await
    .unwrap();
    assert!(!active && deleted, "the row was not tombstoned");
}
