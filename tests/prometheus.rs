//! The alerts and the dashboard against Prometheus itself (built from its
//! upstream module, `tools/prometheus`): promtool checks the chart's rules and
//! runs their unit tests (each alert firing and staying quiet), and a real
//! Prometheus scraping the running operator evaluates every alert and panel
//! expression after a redemption, a conflict, a campaign and a failed preview —
//! so that a renamed metric cannot silently blind them.

mod support;

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use voucher_operator::api::Voucher;
use voucher_operator::api::campaign::VoucherCampaign;
use voucher_operator::controller;
use voucher_operator::relay::RelaySettings;
use voucher_operator::server::{self, auth::AuthSettings};
use voucher_operator::store::Store;
use voucher_testenv::prometheus::{Prometheus, RULES, panel_queries, rule_expressions};

const UNIT_TESTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/prometheus/alerts.test.yaml"
);
const JWT_SECRET: &str = "prometheus-test-secret-of-32-bytes!";

fn run(program: &std::path::Path, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool {}:\n{text}",
        args.join(" ")
    );
    text
}

#[test]
fn the_alert_rules_pass_promtool_and_each_fires_and_stays_quiet_as_its_unit_tests_say() {
    let prometheus = Prometheus::find_or_build().unwrap_or_else(|e| panic!("{e:#}"));
    let checked = run(
        &prometheus.promtool(),
        &["check", "rules", "--lint-fatal", RULES],
    );
    assert!(checked.contains("SUCCESS"), "{checked}");
    run(&prometheus.promtool(), &["test", "rules", UNIT_TESTS]);
    // Every alert of the chart has its unit tests.
    let tests = std::fs::read_to_string(UNIT_TESTS).unwrap();
    for (alert, _) in rule_expressions().unwrap() {
        assert!(
            tests.matches(&format!("alertname: {alert}\n")).count() >= 2,
            "{alert} has no unit test of it firing and of it quiet"
        );
    }
}

/// The metric names an expression reads (every one of ours starts so).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("voucher_operator_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

fn token(subject: &str) -> String {
    support::customer_token(JWT_SECRET, subject)
}

#[tokio::test]
async fn every_alert_and_panel_expression_reads_metrics_the_running_operator_exports() {
    support::init_tracing();
    let url = support::fresh_database("prometheus").await;
    let store = Store::from_pool(support::pool(&url).await);
    store.migrate().await.unwrap();
    let (client, ns) = support::cluster::setup("prometheus").await;
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();

    // The operator as a deployment runs it: the controller (its census, the audit relay) and
    // the server, one /metrics for both, as `voucher-dev local` serves them.
    let mut registry = prometheus_client::registry::Registry::default();
    let config = controller::Config {
        settings: support::controller_settings(&ns),
        relay: Some(RelaySettings {
            nats_url: support::nats().url.clone(),
            ..Default::default()
        }),
        lease: None,
    };
    let role = controller::Role::new(client.clone(), store.clone(), config, &mut registry);
    let role_stop = stop.clone();
    tokio::spawn(async move { role.run(role_stop).await });
    let port = support::free_port();
    let http = server::Role::new(
        store.clone(),
        Some(client.clone()),
        server::Config {
            settings: support::server_settings(),
            auth: AuthSettings {
                hs256_secret: Some(JWT_SECRET.into()),
                ..Default::default()
            },
            listen: (Ipv4Addr::LOCALHOST, port).into(),
            admin: None,
            metrics: None,
            claimer: None,
        },
        registry,
    )
    .await
    .unwrap();
    tokio::spawn(http.run(stop.clone()));
    let prometheus = support::prometheus::start(&format!("127.0.0.1:{port}"));

    // What an on-call engineer's day has: a capped Voucher, a second claim on its code (a
    // conflict, Stalled), a campaign, a redemption, previews that find a code and one that
    // does not.
    let vouchers: Api<Voucher> = Api::namespaced(client.clone(), &ns);
    for (name, spec) in [
        ("launch", json!({"creditOMR": 5, "maxRedemptions": 10})),
        ("second", json!({"code": "LAUNCH", "creditOMR": 7})),
    ] {
        let voucher = Voucher::new(name, serde_json::from_value(spec).unwrap());
        vouchers
            .create(&PostParams::default(), &voucher)
            .await
            .unwrap();
    }
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "bill-key"},
        "stringData": {"key": "4f6d616e74656c2d62696c6c2d323032372d6b65792d666f722d7465737473"},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let campaign: VoucherCampaign = serde_json::from_value(json!({
        "apiVersion": "catalyst.openova.io/v1alpha1", "kind": "VoucherCampaign",
        "metadata": {"name": "bill"},
        "spec": {"prefix": "BILL-", "count": 50, "codeLength": 12, "creditOMR": 5,
                 "description": "bill insert", "keySecretRef": {"name": "bill-key"}},
    }))
    .unwrap();
    Api::<VoucherCampaign>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &campaign)
        .await
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    support::eventually_within(
        Duration::from_secs(30),
        "a redemption of LAUNCH",
        || async {
            let response = http
                .post(format!("{base}/billing/vouchers/redeem"))
                .bearer_auth(token("alice"))
                .json(&json!({"code": "LAUNCH", "tenant_id": "acme"}))
                .send()
                .await
                .ok()?;
            (response.status() == 200).then_some(())
        },
    )
    .await;
    for code in ["LAUNCH", "LAUNCH", "NO-SUCH-CODE"] {
        http.post(format!("{base}/billing/vouchers/redeem-preview"))
            .json(&json!({"code": code}))
            .send()
            .await
            .unwrap();
    }

    // Every metric an expression names exists in Prometheus (scraped, after the census).
    let expressions: Vec<(String, String)> = rule_expressions()
        .unwrap()
        .into_iter()
        .chain(panel_queries("1m", "5m").unwrap())
        .collect();
    let mut names: Vec<String> = expressions
        .iter()
        .flat_map(|(_, e)| metric_names(e))
        .collect();
    names.sort();
    names.dedup();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut missing = names.clone();
    while !missing.is_empty() && tokio::time::Instant::now() < deadline {
        let mut still = Vec::new();
        for name in &missing {
            if prometheus
                .series(&format!("count({{__name__=\"{name}\"}})"))
                .await
                .is_empty()
            {
                still.push(name.clone());
            }
        }
        missing = still;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        missing.is_empty(),
        "named by an alert or a panel, exported by nobody: {missing:?}"
    );
    // A few more scrapes, for the rates over them.
    tokio::time::sleep(Duration::from_secs(5)).await;

    for (what, expr) in &expressions {
        let answer = prometheus.query(expr).await;
        assert_eq!(answer["status"], "success", "{what}: {expr}\n{answer}");
        for note in ["warnings", "infos"] {
            assert!(
                answer[note].is_null(),
                "{what}: {expr}\nPrometheus {note}: {}",
                answer[note]
            );
        }
    }
    for (panel, expr) in panel_queries("1m", "5m").unwrap() {
        assert!(
            !prometheus.series(&expr).await.is_empty(),
            "the panel {panel:?} shows nothing: {expr}"
        );
    }
    // The conflict is counted as stalled.
    assert!(
        !prometheus
            .series("voucher_operator_stalled{kind=\"Voucher\"} == 1")
            .await
            .is_empty()
    );
    // And Prometheus evaluates every rule of the chart without an error.
    let answer: Value = http
        .get(format!("{}/api/v1/rules", prometheus.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rules: Vec<&Value> = answer["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .collect();
    assert_eq!(rules.len(), rule_expressions().unwrap().len(), "{answer}");
    for rule in rules {
        assert_ne!(
            rule["health"], "err",
            "{}: {}",
            rule["name"], rule["lastError"]
        );
    }
}
