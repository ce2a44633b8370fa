//! VoucherCampaigns end to end: the campaign loop against the real Kubernetes API server
//! (manifests through the real kubectl), a real Postgres, and the HTTP server for the CSV
//! download, the preview and the redemption. Each rule of a campaign has a test that fails
//! without it.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use support::eventually_within;
use tokio_util::sync::CancellationToken;
use voucher_operator::api::campaign::VoucherCampaign;
use voucher_operator::controller::{self, Settings, campaign};
use voucher_operator::domain::campaign::{CampaignPhase, Generator};
use voucher_operator::domain::{Issuers, Phase};
use voucher_operator::server::auth::AuthSettings;
use voucher_operator::store::Store;

const JWT_SECRET: &str = "campaign-test-secret-of-32-bytes!";
/// The generator key the tests' Secrets hold (64 characters, as `openssl rand -hex 32` gives).
const KEY: &str = "4f6d616e74656c2d62696c6c2d323032372d6b65792d666f722d7465737473";
const WAIT: Duration = Duration::from_secs(60);

struct Harness {
    client: kube::Client,
    ns: String,
    url: String,
    pool: PgPool,
    store: Store,
    base: String,
    http: reqwest::Client,
    kubeconfig: std::path::PathBuf,
    _dir: tempfile::TempDir,
    stop: CancellationToken,
    /// The campaign loop, to kill mid-generation.
    task: tokio::task::JoinHandle<()>,
    settings: Settings,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
        self.stop.cancel();
    }
}

fn settings(ns: &str, issuers: &[&str]) -> Settings {
    Settings {
        issuers: Issuers::new(issuers.iter().copied()),
        // The keys of these tests live beside their campaigns.
        ..support::controller_settings(ns)
    }
}

/// A campaign loop on a namespace of its own (an issuer namespace unless
/// `issuer` is false) and a fresh database, with the HTTP server on it.
async fn harness_with(issuer: bool) -> Harness {
    support::init_tracing();
    let (client, ns) = support::cluster::setup("campaign").await;
    harness_on(client, ns, issuer).await
}

async fn harness() -> Harness {
    harness_with(true).await
}

async fn harness_on(client: kube::Client, ns: String, issuer: bool) -> Harness {
    let url = support::fresh_database("campaign").await;
    let pool = support::pool(&url).await;
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    let issuers = if issuer { ns.as_str() } else { "elsewhere" };
    let settings = settings(&ns, &[issuers]);
    let stop = CancellationToken::new();
    let task = start_loop(&client, &store, &settings, &stop);
    let auth = AuthSettings {
        hs256_secret: Some(JWT_SECRET.into()),
        leeway: Duration::from_secs(5),
        ..Default::default()
    };
    let (base, server_stop) = support::serve_http(
        store.clone(),
        support::server_settings(),
        auth,
        Some(client.clone()),
    )
    .await;
    let child = stop.child_token();
    tokio::spawn(async move {
        child.cancelled().await;
        server_stop.cancel();
    });
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = support::cluster::cluster().kubeconfig(dir.path(), &ns);
    Harness {
        client,
        ns,
        url,
        pool,
        store,
        base,
        http: reqwest::Client::new(),
        kubeconfig,
        _dir: dir,
        stop,
        task,
        settings,
    }
}

fn start_loop(
    client: &kube::Client,
    store: &Store,
    settings: &Settings,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(controller::metrics::Metrics::register(&mut registry));
    let ctx = controller::Context::new(client.clone(), store.clone(), metrics, settings.clone());
    tokio::spawn(campaign::run(ctx, stop.clone()))
}

fn token(subject: &str, role: Option<&str>) -> String {
    let now = chrono::Utc::now().timestamp();
    let mut claims = json!({"sub": subject, "exp": now + 600, "iat": now});
    if let Some(role) = role {
        claims["role"] = json!(role);
    }
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

fn manifest(name: &str, spec: Value) -> Value {
    let mut base = json!({
        "apiVersion": "catalyst.openova.io/v1alpha1",
        "kind": "VoucherCampaign",
        "metadata": {"name": name},
        "spec": {"prefix": "BILL-", "count": 2000, "codeLength": 12, "creditOMR": 5,
                 "description": "bill insert", "keySecretRef": {"name": "bill-key"}},
    });
    for (k, v) in spec.as_object().unwrap() {
        base["spec"][k] = v.clone();
    }
    base
}

impl Harness {
    fn campaigns(&self) -> Api<VoucherCampaign> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn secret(&self, name: &str) {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": name},
            "stringData": {"key": KEY},
        }))
        .unwrap();
        Api::<Secret>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }

    /// `kubectl apply` of a campaign manifest: Ok, or kubectl's message.
    fn apply(&self, manifest: &Value) -> Result<(), String> {
        support::cluster::cluster().apply(&self.kubeconfig, manifest)
    }

    async fn until(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&VoucherCampaign) -> bool,
    ) -> VoucherCampaign {
        let api = self.campaigns();
        eventually_within(WAIT, what, || async {
            api.get_opt(name).await.unwrap().filter(|c| check(c))
        })
        .await
    }

    async fn ready(&self, name: &str, codes: i32) -> VoucherCampaign {
        self.until(name, &format!("{name} Ready with {codes} codes"), |c| {
            ready(c).as_deref() == Some("True") && status(c).generated == Some(codes)
        })
        .await
    }

    /// The CSV download, as an administrator: its status and body.
    async fn csv(&self, name: &str, query: &str) -> (StatusCode, String) {
        self.csv_as(
            name,
            query,
            Some(&token("printer", Some("sovereign-admin"))),
        )
        .await
    }

    async fn csv_as(&self, name: &str, query: &str, token: Option<&str>) -> (StatusCode, String) {
        let url = format!(
            "{}/billing/vouchers/campaigns/{}/{name}/codes{query}",
            self.base, self.ns
        );
        let mut request = self.http.get(url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        (response.status(), response.text().await.unwrap())
    }

    async fn codes(&self, name: &str) -> Vec<String> {
        let (status, body) = self.csv(name, "").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let mut lines = body.lines();
        assert_eq!(lines.next(), Some("code"));
        lines.map(str::to_owned).collect()
    }

    async fn preview(&self, code: &str) -> StatusCode {
        self.http
            .post(format!("{}/billing/vouchers/redeem-preview", self.base))
            .json(&json!({"code": code}))
            .send()
            .await
            .unwrap()
            .status()
    }

    async fn redeem(&self, customer: String, code: &str) -> StatusCode {
        self.redeem_keyed(&customer, code, None).await.0
    }

    /// A redemption by `customer`, with an Idempotency-Key or without: its status and body.
    async fn redeem_keyed(
        &self,
        customer: &str,
        code: &str,
        key: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .http
            .post(format!("{}/billing/vouchers/redeem", self.base))
            .bearer_auth(token(customer, None))
            .json(&json!({"code": code, "tenant_id": "t1"}));
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Asserts that `customer`'s redemption of `code` is answered as a repeat (409 with the
    /// grant they got: what a checkout retrying without its key reconciles with).
    async fn assert_repeat(&self, customer: &str, code: &str, key: Option<&str>, credit: i32) {
        let (status, body) = self.redeem_keyed(customer, code, key).await;
        assert_eq!(status, StatusCode::CONFLICT, "{code} {key:?}: {body}");
        assert_eq!(
            (&body["code"], &body["credit_omr"]),
            (&json!(code), &json!(credit)),
            "{body}"
        );
        assert!(body["redeemed_at"].is_string(), "{body}");
    }

    /// Statuses of previewing every code, 16 at a time: how many of each.
    async fn previews(&self, codes: &[String]) -> std::collections::BTreeMap<u16, usize> {
        let statuses: Vec<StatusCode> = futures::stream::iter(codes)
            .map(|c| self.preview(c))
            .buffer_unordered(16)
            .collect()
            .await;
        let mut counted = std::collections::BTreeMap::new();
        for s in statuses {
            *counted.entry(s.as_u16()).or_insert(0) += 1;
        }
        counted
    }

    fn generator(&self, name: &str, prefix: &str) -> Generator {
        // The manifests' codeLength.
        Generator::new(KEY.as_bytes(), &self.ns, name, prefix, 12).unwrap()
    }
}

fn status(c: &VoucherCampaign) -> voucher_operator::api::campaign::VoucherCampaignStatus {
    c.status.clone().unwrap_or_default()
}

fn ready(c: &VoucherCampaign) -> Option<String> {
    condition(c, "Ready").map(|(status, _, _)| status)
}

fn condition(c: &VoucherCampaign, type_: &str) -> Option<(String, String, String)> {
    c.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    })
}

fn counts(map: &std::collections::BTreeMap<u16, usize>, status: u16) -> usize {
    map.get(&status).copied().unwrap_or_default()
}

#[tokio::test]
async fn a_campaign_applied_with_kubectl_issues_codes_each_redeemable_once() {
    let h = harness().await;
    h.secret("bill-key").await;
    h.apply(&manifest("bill-2027", json!({}))).unwrap();
    let c = h.ready("bill-2027", 2000).await;
    assert_eq!(status(&c).phase, Some(CampaignPhase::Active));
    assert_eq!(status(&c).observed_generation, c.metadata.generation);

    let codes = h.codes("bill-2027").await;
    assert_eq!(codes.len(), 2000);
    assert_eq!(codes.iter().collect::<HashSet<_>>().len(), 2000, "unique");
    // In index order, and what the key derives: the printer's list is reproducible.
    let generator = h.generator("bill-2027", "BILL-");
    for (i, code) in codes.iter().enumerate() {
        assert_eq!(code, generator.code(i as u32).as_str());
    }
    // Never written down: not in the status, the resource, or an Event.
    let resource = serde_json::to_string(&c).unwrap();
    let events = serde_json::to_string(
        &Api::<k8s_openapi::api::events::v1::Event>::namespaced(h.client.clone(), &h.ns)
            .list(&Default::default())
            .await
            .unwrap()
            .items,
    )
    .unwrap();
    for code in codes.iter().take(50) {
        assert!(!resource.contains(code.as_str()) && !events.contains(code.as_str()));
    }

    // Every code previews 200, redeems once, then answers 410.
    assert_eq!(counts(&h.previews(&codes).await, 200), 2000);
    let redeemed: Vec<StatusCode> = futures::stream::iter(codes.iter().enumerate())
        .map(|(i, c)| h.redeem(format!("customer-{i}"), c))
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(
        redeemed.iter().all(|s| *s == StatusCode::OK),
        "{redeemed:?}"
    );
    let again = h.redeem("customer-x".into(), &codes[0]).await;
    assert_eq!(again, StatusCode::GONE, "single use");
    assert_eq!(counts(&h.previews(&codes).await, 410), 2000);

    // The status counts them, from the aggregate.
    h.until("bill-2027", "2000 redemptions counted", |c| {
        status(c).redeemed == Some(2000) && status(c).exhausted_codes == Some(2000)
    })
    .await;
    // Each redemption's audit record names the campaign.
    let named: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM voucher_audit_outbox WHERE kind = 'redeemed' \
         AND payload->'campaign'->>'name' = 'bill-2027' AND payload->'campaign'->>'namespace' = $1",
    )
    .bind(&h.ns)
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert_eq!(named, 2000);
    // Generation is audited once for the campaign, not once per code.
    let generated: Vec<Value> = sqlx::query_scalar(
        "SELECT payload FROM voucher_audit_outbox WHERE kind = 'campaign_generated'",
    )
    .fetch_all(&h.pool)
    .await
    .unwrap();
    assert_eq!(generated.len(), 1);
    assert_eq!(
        generated[0]["codes"],
        json!({"from": 0, "to": 2000, "count": 2000})
    );
}

#[tokio::test]
async fn the_same_key_and_campaign_give_the_same_codes_in_a_fresh_database() {
    let h = harness().await;
    h.secret("bill-key").await;
    h.apply(&manifest("restore", json!({"count": 300})))
        .unwrap();
    h.ready("restore", 300).await;
    let before = h.codes("restore").await;

    // The cluster is rebuilt from Git onto a new, empty billing database: the resource is
    // re-created (a new uid) with the same name, namespace and key.
    h.stop.cancel();
    h.task.abort();
    h.campaigns()
        .patch(
            "restore",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    h.campaigns()
        .delete("restore", &Default::default())
        .await
        .unwrap();
    eventually_within(WAIT, "the campaign gone", || async {
        h.campaigns()
            .get_opt("restore")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let restored = harness_on(h.client.clone(), h.ns.clone(), true).await;
    restored
        .apply(&manifest("restore", json!({"count": 300})))
        .unwrap();
    restored.ready("restore", 300).await;
    assert_eq!(restored.codes("restore").await, before);
    assert_ne!(restored.url, h.url, "another database");
}

#[tokio::test]
async fn count_grows_the_codes_issued_stay() {
    let h = harness().await;
    h.secret("bill-key").await;
    h.apply(&manifest("grows", json!({"count": 100}))).unwrap();
    h.ready("grows", 100).await;
    let first = h.codes("grows").await;
    h.apply(&manifest("grows", json!({"count": 250}))).unwrap();
    h.ready("grows", 250).await;
    let all = h.codes("grows").await;
    assert_eq!(all.len(), 250);
    assert_eq!(&all[..100], &first[..]);
    // Shrinking is refused by the API server, with its rule's message.
    let refused = h
        .apply(&manifest("grows", json!({"count": 99})))
        .unwrap_err();
    assert!(
        refused.contains("spec.count can grow but never shrink"),
        "{refused}"
    );
    // Paging: from and limit.
    let (_, page) = h.csv("grows", "?from=100&limit=3").await;
    assert_eq!(page, format!("code\n{}\n", all[100..103].join("\n")));
    let generated: Vec<Value> = sqlx::query_scalar(
        "SELECT payload->'codes' FROM voucher_audit_outbox WHERE kind = 'campaign_generated' \
         ORDER BY seq",
    )
    .fetch_all(&h.pool)
    .await
    .unwrap();
    assert_eq!(
        generated,
        [
            json!({"from": 0, "to": 100, "count": 100}),
            json!({"from": 100, "to": 250, "count": 150})
        ]
    );
}

#[tokio::test]
async fn deactivating_a_campaign_switches_every_code_off_at_once_with_one_audit_record() {
    let h = harness().await;
    h.secret("bill-key").await;
    h.apply(&manifest("leaked", json!({"count": 300}))).unwrap();
    h.ready("leaked", 300).await;
    let codes = h.codes("leaked").await;
    assert_eq!(counts(&h.previews(&codes).await, 200), 300);

    h.apply(&manifest("leaked", json!({"count": 300, "active": false})))
        .unwrap();
    h.until("leaked", "Inactive", |c| {
        status(c).phase == Some(CampaignPhase::Inactive)
    })
    .await;
    // The preview cache heard of it too: every code answers at once as a code that never
    // existed would (a switched-off campaign's codes are no oracle).
    assert_eq!(counts(&h.previews(&codes).await, 404), 300);
    assert_eq!(
        h.redeem("someone".into(), &codes[7]).await,
        StatusCode::NOT_FOUND
    );
    let updated: Vec<Value> = sqlx::query_scalar(
        "SELECT payload FROM voucher_audit_outbox WHERE kind = 'campaign_updated'",
    )
    .fetch_all(&h.pool)
    .await
    .unwrap();
    assert_eq!(updated.len(), 1, "once per campaign change, not per code");
    assert_eq!(updated[0]["changed"], json!(["active"]));
    assert_eq!(updated[0]["codes"]["count"], 300);

    // An out-of-band edit of one code is reverted at the next full pass (a restart here).
    sqlx::query("UPDATE promo_codes SET credit_omr = 999 WHERE code = $1")
        .bind(&codes[3])
        .execute(&h.pool)
        .await
        .unwrap();
    h.task.abort();
    let _again = start_loop(&h.client, &h.store, &h.settings, &h.stop);
    eventually_within(WAIT, "the edit reverted", || async {
        let credit: i32 = sqlx::query_scalar("SELECT credit_omr FROM promo_codes WHERE code = $1")
            .bind(&codes[3])
            .fetch_one(&h.pool)
            .await
            .unwrap();
        (credit == 5).then_some(())
    })
    .await;
    let corrected: Value = sqlx::query_scalar(
        "SELECT payload FROM voucher_audit_outbox WHERE kind = 'campaign_drift_corrected'",
    )
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert_eq!(corrected["codes"]["count"], 1, "{corrected}");
}

#[tokio::test]
async fn a_campaign_code_before_launch_answers_exactly_like_an_unknown_code() {
    let h = harness().await;
    h.secret("bill-key").await;
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    h.apply(&manifest(
        "scheduled",
        json!({"count": 20, "validFrom": tomorrow}),
    ))
    .unwrap();
    h.until("scheduled", "generated", |c| {
        status(c).generated == Some(20)
    })
    .await;
    let codes = h.codes("scheduled").await;
    let answer = |path: &'static str, code: String, auth: bool| {
        let mut request = h
            .http
            .post(format!("{}/billing/vouchers/{path}", h.base))
            .json(&json!({"code": code, "tenant_id": "t1"}));
        if auth {
            request = request.bearer_auth(token("guesser", None));
        }
        async move {
            let response = request.send().await.unwrap();
            (response.status(), response.text().await.unwrap())
        }
    };
    let unknown = h.generator("never-made", "BILL-").code(0).to_string();
    for (path, auth) in [("redeem-preview", false), ("redeem", true)] {
        let guessed = answer(path, unknown.clone(), auth).await;
        assert_eq!(guessed.0, StatusCode::NOT_FOUND, "{path}: {guessed:?}");
        for code in &codes[..3] {
            assert_eq!(
                answer(path, code.clone(), auth).await,
                guessed,
                "{path}: a scheduled campaign code tells itself apart from a guess"
            );
        }
    }
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM promo_redemptions")
            .fetch_one(&h.pool)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn a_repeat_of_a_campaign_code_is_answered_as_a_repeat_whatever_the_campaign_says_now() {
    let h = harness().await;
    h.secret("bill-key").await;
    h.apply(&manifest("repeat", json!({"count": 3}))).unwrap();
    h.ready("repeat", 3).await;
    let codes = h.codes("repeat").await;
    let (first, body) = h.redeem_keyed("alice", &codes[0], None).await;
    assert_eq!(first, StatusCode::OK, "{body}");
    // Used up (single use) by alice herself: to her, her own redemption, never "fully
    // redeemed"; to anyone else, used up.
    h.assert_repeat("alice", &codes[0], None, 5).await;
    h.assert_repeat("alice", &codes[0], Some("retry-1"), 5)
        .await;
    assert_eq!(h.redeem("bob".into(), &codes[0]).await, StatusCode::GONE);
    // Switched off since: still her redemption, while to anyone else it is a guess.
    h.apply(&manifest("repeat", json!({"count": 3, "active": false})))
        .unwrap();
    h.until("repeat", "Inactive", |c| {
        status(c).phase == Some(CampaignPhase::Inactive)
    })
    .await;
    h.assert_repeat("alice", &codes[0], None, 5).await;
    h.assert_repeat("alice", &codes[0], Some("retry-2"), 5)
        .await;
    assert_eq!(
        h.redeem("bob".into(), &codes[0]).await,
        StatusCode::NOT_FOUND
    );
    let (redemptions, grants): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM promo_redemptions), (SELECT count(*) FROM credit_ledger)",
    )
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert_eq!((redemptions, grants), (1, 1), "one redemption, one grant");
}

#[tokio::test]
async fn a_controller_killed_mid_generation_resumes_with_no_duplicate_or_gap() {
    const COUNT: u32 = 100_000;
    let mut h = harness().await;
    h.secret("bill-key").await;
    h.apply(&manifest("big", json!({"count": COUNT}))).unwrap();
    // Killed (its task dropped mid-statement) once some chunks are in.
    let generated = || async {
        sqlx::query_scalar::<_, i32>("SELECT generated FROM voucher_campaigns")
            .fetch_optional(&h.pool)
            .await
            .unwrap()
    };
    eventually_within(WAIT, "some codes generated", || async {
        generated().await.filter(|g| *g > 0)
    })
    .await;
    h.task.abort();
    let at_kill = generated().await.unwrap();
    assert!(
        (at_kill as u32) < COUNT,
        "the kill came too late to test anything: {at_kill}"
    );
    h.task = start_loop(&h.client, &h.store, &h.settings, &h.stop);
    h.until("big", "Ready after the restart", |c| {
        ready(c).as_deref() == Some("True")
    })
    .await;

    let (rows, distinct, low, high): (i64, i64, i32, i32) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT code_index), min(code_index), max(code_index) \
         FROM voucher_campaign_codes",
    )
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert_eq!(
        (rows, distinct, low, high),
        (i64::from(COUNT), i64::from(COUNT), 0, COUNT as i32 - 1)
    );
    let codes: i64 =
        sqlx::query_scalar("SELECT count(*) FROM promo_codes WHERE code LIKE 'BILL-%'")
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert_eq!(codes, i64::from(COUNT));
    // Each index holds the code the key derives for it.
    let generator = h.generator("big", "BILL-");
    let stored: Vec<(i32, String)> =
        sqlx::query_as("SELECT code_index, code FROM voucher_campaign_codes")
            .fetch_all(&h.pool)
            .await
            .unwrap();
    for (i, code) in stored {
        assert_eq!(code, generator.code(i as u32).as_str(), "index {i}");
    }
}

#[tokio::test]
async fn a_campaign_without_its_secret_stalls_naming_it_then_resumes() {
    let h = harness().await;
    h.apply(&manifest("no-key", json!({"count": 50}))).unwrap();
    let c = h
        .until("no-key", "Stalled", |c| {
            condition(c, "Stalled").is_some_and(|(s, _, _)| s == "True")
        })
        .await;
    let (_, reason, message) = condition(&c, "Stalled").unwrap();
    assert_eq!(reason, "KeyUnavailable");
    assert!(
        message.contains(&format!("Secret {}/bill-key", h.ns)) && message.contains("openssl rand"),
        "{message}"
    );
    assert_eq!(status(&c).phase, Some(CampaignPhase::Stalled));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM promo_codes")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    // A key too short to be safe is refused the same way.
    let weak: Secret = serde_json::from_value(json!({
        "metadata": {"name": "bill-key"}, "stringData": {"key": "short"},
    }))
    .unwrap();
    let secrets = Api::<Secret>::namespaced(h.client.clone(), &h.ns);
    secrets.create(&PostParams::default(), &weak).await.unwrap();
    let c = h
        .until("no-key", "the weak key refused", |c| {
            condition(c, "Stalled").is_some_and(|(_, _, m)| m.contains("shorter than 32 bytes"))
        })
        .await;
    // The Secret exists now: the fix writes the key into it, it does not create it again
    // (which kubectl would refuse, AlreadyExists).
    let (_, _, message) = condition(&c, "Stalled").unwrap();
    assert!(
        message.contains("write a key into it with:")
            && message.contains("--dry-run=client -o yaml | kubectl apply -f -")
            && !message.contains("create it with"),
        "{message}"
    );
    secrets
        .patch(
            "bill-key",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"key": KEY}})),
        )
        .await
        .unwrap();
    h.ready("no-key", 50).await;
}

#[tokio::test]
async fn a_code_collision_stalls_naming_the_index_and_leaves_the_row_alone() {
    let h = harness().await;
    h.secret("bill-key").await;
    let taken = h.generator("collide", "BILL-").code(7);
    sqlx::query(
        "INSERT INTO promo_codes (code, credit_omr, description) VALUES ($1, 77, 'admin page')",
    )
    .bind(taken.as_str())
    .execute(&h.pool)
    .await
    .unwrap();
    h.apply(&manifest("collide", json!({"count": 20}))).unwrap();
    let c = h
        .until("collide", "Stalled on the collision", |c| {
            condition(c, "Stalled").is_some_and(|(_, r, _)| r == "CodeCollision")
        })
        .await;
    let (_, _, message) = condition(&c, "Stalled").unwrap();
    assert!(message.contains("code number 7 "), "{message}");
    assert!(!message.contains(taken.as_str()), "never the code itself");
    let row: (i32, String) =
        sqlx::query_as("SELECT credit_omr, description FROM promo_codes WHERE code = $1")
            .bind(taken.as_str())
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert_eq!(row, (77, "admin page".to_owned()));
    let owned: i64 = sqlx::query_scalar("SELECT count(*) FROM voucher_campaign_codes")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(owned, 0, "the chunk with the collision wrote nothing");
}

#[tokio::test]
async fn a_campaign_outside_the_issuer_namespaces_writes_nothing() {
    let h = harness_with(false).await;
    h.secret("bill-key").await;
    h.apply(&manifest("rogue", json!({"count": 10}))).unwrap();
    let c = h
        .until("rogue", "Forbidden", |c| {
            status(c).phase == Some(CampaignPhase::Forbidden)
        })
        .await;
    assert_eq!(
        condition(&c, "Ready").map(|(_, r, _)| r).as_deref(),
        Some("NotAnIssuerNamespace")
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM promo_codes")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    let (status, _) = h.csv("rogue", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_voucher_can_neither_claim_nor_adopt_a_campaign_code() {
    let h = harness().await;
    h.secret("bill-key").await;
    h.apply(&manifest("owned", json!({"count": 5}))).unwrap();
    h.ready("owned", 5).await;
    let code = h.codes("owned").await.remove(0);
    // The Voucher controller, on the same namespace and database.
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(controller::metrics::Metrics::register(&mut registry));
    let ctx = controller::Context::new(
        h.client.clone(),
        h.store.clone(),
        metrics,
        h.settings.clone(),
    );
    tokio::spawn(controller::voucher::run(ctx, h.stop.clone()));
    let vouchers: Api<voucher_operator::api::Voucher> = Api::namespaced(h.client.clone(), &h.ns);
    let voucher: voucher_operator::api::Voucher = serde_json::from_value(json!({
        "apiVersion": "catalyst.openova.io/v1alpha1", "kind": "Voucher",
        "metadata": {"name": "grab"},
        "spec": {"code": code, "creditOMR": 500, "adopt": true,
                 "reissue": {"revokedAt": "2026-12-01T00:00:00Z"}},
    }))
    .unwrap();
    vouchers
        .create(&PostParams::default(), &voucher)
        .await
        .unwrap();
    let found = eventually_within(WAIT, "the Voucher refused", || async {
        vouchers.get("grab").await.ok().filter(|v| {
            v.status
                .as_ref()
                .is_some_and(|s| s.phase == Some(Phase::Conflict))
        })
    })
    .await;
    let ready = found
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.reason, "CampaignCode");
    assert!(
        ready
            .message
            .contains(&format!("VoucherCampaign {}/owned", h.ns))
    );
    let credit: i32 = sqlx::query_scalar("SELECT credit_omr FROM promo_codes WHERE code = $1")
        .bind(&code)
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(credit, 5, "untouched");
}

#[tokio::test]
async fn only_administrators_download_codes_and_each_download_is_audited() {
    let h = harness().await;
    h.secret("bill-key").await;
    h.apply(&manifest("guarded", json!({"count": 10}))).unwrap();
    h.ready("guarded", 10).await;
    let (status, body) = h.csv_as("guarded", "", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = h
        .csv_as("guarded", "", Some(&token("customer", None)))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("superadmin or sovereign-admin"), "{body}");
    let (status, body) = h.csv("guarded", "?from=11").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("has 10 code(s)"), "{body}");
    let (status, body) = h.csv("guarded", "?limit=-1").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("limit must be a whole number"), "{body}");
    let (status, body) = h.csv("guarded", "?offset=2").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let error: Value = serde_json::from_str(&body).unwrap();
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .starts_with("unknown query parameter \"offset\""),
        "{body}"
    );
    let (status, _) = h.csv("guarded", "?from=2&limit=5").await;
    assert_eq!(status, StatusCode::OK);
    let downloads: Vec<Value> = sqlx::query_scalar(
        "SELECT payload FROM voucher_audit_outbox WHERE kind = 'campaign_codes_downloaded'",
    )
    .fetch_all(&h.pool)
    .await
    .unwrap();
    assert_eq!(downloads.len(), 1, "refused downloads leave nothing");
    assert_eq!(downloads[0]["actor"]["subject"], "printer");
    assert_eq!(
        downloads[0]["codes"],
        json!({"from": 2, "to": 7, "count": 5})
    );
}

#[tokio::test]
async fn a_campaign_suspended_by_annotation_shows_it_and_no_code_redeems_until_lifted() {
    let h = harness().await;
    h.secret("bill-key").await;
    h.apply(&manifest("incident", json!({"count": 30})))
        .unwrap();
    h.ready("incident", 30).await;
    let codes = h.codes("incident").await;
    let annotate = |value: Value| {
        let campaigns = h.campaigns();
        async move {
            campaigns
                .patch(
                    "incident",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(json!({"metadata": {"annotations":
                        {"catalyst.openova.io/suspended": value}}})),
                )
                .await
                .unwrap();
        }
    };
    annotate(json!("true")).await;
    let suspended = h
        .until("incident", "Suspended", |c| {
            status(c).phase == Some(CampaignPhase::Suspended)
        })
        .await;
    let (_, reason, message) = condition(&suspended, "Ready").unwrap();
    assert_eq!(reason, "Suspended");
    assert!(message.contains("suspend/campaigns"), "{message}");
    // Every code at once, answered like a guess; nothing redeemed.
    assert_eq!(counts(&h.previews(&codes).await, 404), 30);
    assert_eq!(
        h.redeem("someone".into(), &codes[3]).await,
        StatusCode::NOT_FOUND
    );
    let kinds: Vec<String> = sqlx::query_scalar(
        "SELECT kind FROM voucher_audit_outbox WHERE kind LIKE 'campaign_suspen%' ORDER BY seq",
    )
    .fetch_all(&h.pool)
    .await
    .unwrap();
    assert_eq!(kinds, ["campaign_suspended"], "audited once");
    annotate(Value::Null).await;
    h.until("incident", "Active again", |c| {
        status(c).phase == Some(CampaignPhase::Active)
    })
    .await;
    assert_eq!(counts(&h.previews(&codes).await, 200), 30);
    // The admin endpoint's suspension shows in the status too, at once (its notification wakes
    // the campaign), and is lifted the same way.
    let url = format!(
        "{}/billing/vouchers/suspend/campaigns/{}/incident",
        h.base, h.ns
    );
    let admin = token("incident-response", Some("sovereign-admin"));
    let suspended = h.http.post(&url).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(suspended.status(), StatusCode::OK);
    h.until("incident", "Suspended by the endpoint", |c| {
        status(c).phase == Some(CampaignPhase::Suspended)
    })
    .await;
    let lifted = h
        .http
        .delete(&url)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(lifted.status(), StatusCode::OK);
    h.until("incident", "Active once lifted", |c| {
        status(c).phase == Some(CampaignPhase::Active)
    })
    .await;
}

#[tokio::test]
async fn one_leaked_code_is_revoked_alone_and_stays_revoked() {
    let h = harness().await;
    h.secret("bill-key").await;
    h.apply(&manifest("partner", json!({"count": 20}))).unwrap();
    h.ready("partner", 20).await;
    let codes = h.codes("partner").await;
    let revoked = h
        .http
        .delete(format!("{}/billing/vouchers/revoke/{}", h.base, codes[4]))
        .bearer_auth(token("root", Some("superadmin")))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    let previews = h.previews(&codes).await;
    assert_eq!((counts(&previews, 200), counts(&previews, 404)), (19, 1));
    assert_eq!(h.preview(&codes[4]).await, StatusCode::NOT_FOUND);
    // Nor is it printed any more.
    let printed = h.codes("partner").await;
    assert_eq!(printed.len(), 19);
    assert!(!printed.contains(&codes[4]));
    // A change of the campaign's terms does not bring it back.
    h.apply(&manifest("partner", json!({"count": 20, "creditOMR": 6})))
        .unwrap();
    h.until("partner", "the new terms applied", |c| {
        status(c).observed_generation == c.metadata.generation
            && ready(c).as_deref() == Some("True")
    })
    .await;
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM promo_codes WHERE deleted_at IS NULL AND credit_omr = 6",
    )
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert_eq!(live, 19);
    assert_eq!(h.preview(&codes[4]).await, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn deleting_a_campaign_revokes_or_orphans_its_codes_as_its_policy_says() {
    let h = harness().await;
    h.secret("bill-key").await;
    h.apply(&manifest("revoked", json!({"count": 30}))).unwrap();
    h.apply(&manifest(
        "orphaned",
        json!({"count": 30, "prefix": "KEEP-", "deletionPolicy": "Orphan"}),
    ))
    .unwrap();
    h.ready("revoked", 30).await;
    h.ready("orphaned", 30).await;
    let (gone, kept) = (h.codes("revoked").await, h.codes("orphaned").await);
    for name in ["revoked", "orphaned"] {
        h.campaigns()
            .delete(name, &Default::default())
            .await
            .unwrap();
    }
    eventually_within(WAIT, "both campaigns gone", || async {
        let left = h.campaigns().list(&Default::default()).await.unwrap().items;
        left.is_empty().then_some(())
    })
    .await;
    assert_eq!(counts(&h.previews(&gone).await, 404), 30);
    assert_eq!(counts(&h.previews(&kept).await, 200), 30);
    let kinds: Vec<String> = sqlx::query_scalar(
        "SELECT kind FROM voucher_audit_outbox WHERE kind IN ('campaign_revoked', 'campaign_orphaned') \
         ORDER BY kind",
    )
    .fetch_all(&h.pool)
    .await
    .unwrap();
    assert_eq!(kinds, ["campaign_orphaned", "campaign_revoked"]);
    // They stay the campaigns' own: no download lists them, the admin list neither, and no
    // Voucher can take the orphans (see a_voucher_can_neither_claim_nor_adopt_a_campaign_code).
    let owned: i64 = sqlx::query_scalar("SELECT count(*) FROM voucher_campaign_codes")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(owned, 60);
    assert_eq!(h.csv("orphaned", "").await.0, StatusCode::NOT_FOUND);
    let listed: Value = h
        .http
        .get(format!("{}/billing/vouchers/list", h.base))
        .bearer_auth(token("root", Some("superadmin")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed,
        json!([]),
        "campaign codes are not in the admin list"
    );
}

#[tokio::test]
async fn deletion_applies_the_policy_of_the_last_apply_and_says_so() {
    let mut h = harness().await;
    h.secret("bill-key").await;
    h.apply(&manifest(
        "policy",
        json!({"count": 10, "deletionPolicy": "Orphan"}),
    ))
    .unwrap();
    h.ready("policy", 10).await;
    let codes = h.codes("policy").await;
    // Switched to Revoke (inactive, as the rule asks) and deleted while no controller runs.
    h.task.abort();
    h.apply(&manifest(
        "policy",
        json!({"count": 10, "active": false, "deletionPolicy": "Orphan"}),
    ))
    .unwrap();
    h.apply(&manifest(
        "policy",
        json!({"count": 10, "active": false, "deletionPolicy": "Revoke"}),
    ))
    .unwrap();
    h.campaigns()
        .delete("policy", &Default::default())
        .await
        .unwrap();
    h.task = start_loop(&h.client, &h.store, &h.settings, &h.stop);
    eventually_within(WAIT, "the campaign gone", || async {
        h.campaigns()
            .get_opt("policy")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    // The policy last applied was Orphan: the codes are left, and the Event says so.
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM promo_codes WHERE code = ANY($1) AND deleted_at IS NULL",
    )
    .bind(&codes)
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert_eq!(live, 10);
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(h.client.clone(), &h.ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    let reasons: Vec<String> = events
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("policy"))
        .filter_map(|e| e.reason.clone())
        .collect();
    assert!(reasons.contains(&"Orphaned".to_owned()), "{reasons:?}");
    assert!(!reasons.contains(&"Revoked".to_owned()), "{reasons:?}");
}

#[tokio::test]
async fn a_campaign_whose_secret_is_gone_can_still_be_switched_off() {
    let h = harness().await;
    h.secret("bill-key").await;
    h.apply(&manifest("keyless", json!({"count": 40}))).unwrap();
    h.ready("keyless", 40).await;
    let codes = h.codes("keyless").await;
    Api::<Secret>::namespaced(h.client.clone(), &h.ns)
        .delete("bill-key", &Default::default())
        .await
        .unwrap();
    h.apply(&manifest("keyless", json!({"count": 40, "active": false})))
        .unwrap();
    h.until("keyless", "Inactive without its key", |c| {
        status(c).phase == Some(CampaignPhase::Inactive)
    })
    .await;
    // Switched off: no oracle, as a guess would answer.
    assert_eq!(counts(&h.previews(&codes).await, 404), 40);
    // Growing it needs the key: it waits, saying to put the same key back.
    h.apply(&manifest("keyless", json!({"count": 50, "active": false})))
        .unwrap();
    let c = h
        .until("keyless", "Stalled for its key", |c| {
            condition(c, "Stalled").is_some_and(|(_, r, _)| r == "KeyUnavailable")
        })
        .await;
    let (_, _, message) = condition(&c, "Stalled").unwrap();
    assert!(
        message.contains("put back the key that generated its first 40 codes"),
        "{message}"
    );
}

#[tokio::test]
async fn another_key_never_extends_a_campaign() {
    let h = harness().await;
    h.secret("bill-key").await;
    h.apply(&manifest("rotated", json!({"count": 30}))).unwrap();
    h.ready("rotated", 30).await;
    Api::<Secret>::namespaced(h.client.clone(), &h.ns)
        .patch(
            "bill-key",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"stringData": {"key": "another-key-of-at-least-32-bytes-long!!"}}),
            ),
        )
        .await
        .unwrap();
    h.apply(&manifest("rotated", json!({"count": 60}))).unwrap();
    let c = h
        .until("rotated", "Stalled on the other key", |c| {
            condition(c, "Stalled").is_some_and(|(_, _, m)| m.contains("is not the one"))
        })
        .await;
    assert_eq!(status(&c).generated, Some(30));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM voucher_campaign_codes")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(rows, 30, "nothing made from the other key");
    // The subcommand, which derives codes from the key, says so too instead of printing others.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
        .args([
            "campaign",
            "codes",
            "-n",
            &h.ns,
            "--key-namespace",
            &h.ns,
            "rotated",
        ])
        .env("KUBECONFIG", &h.kubeconfig)
        .env("DATABASE_URL", &h.url)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is not the one that generated the codes"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_admin_issue_refuses_a_campaign_code() {
    let h = harness().await;
    h.secret("bill-key").await;
    h.apply(&manifest("issued", json!({"count": 3}))).unwrap();
    h.ready("issued", 3).await;
    let code = h.codes("issued").await.remove(0);
    let answer = h
        .http
        .post(format!("{}/billing/vouchers/issue", h.base))
        .bearer_auth(token("root", Some("superadmin")))
        .json(&json!({"code": code, "credit_omr": 500}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::CONFLICT);
    let body: Value = answer.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains(&format!("issued by VoucherCampaign {}/issued", h.ns)),
        "{body}"
    );
    let vouchers: Api<voucher_operator::api::Voucher> =
        Api::namespaced(h.client.clone(), "default");
    assert!(
        vouchers
            .get_opt(&code.to_lowercase())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn the_codes_subcommand_derives_the_codes_and_checks_each_against_the_database() {
    let h = harness().await;
    h.secret("bill-key").await;
    h.apply(&manifest("printer", json!({"count": 40}))).unwrap();
    h.ready("printer", 40).await;
    let csv = h.csv("printer", "").await.1;
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
            .args(["campaign", "codes", "-n", &h.ns, "--key-namespace", &h.ns])
            .args(args)
            .env("KUBECONFIG", &h.kubeconfig)
            .env("DATABASE_URL", &h.url)
            .output()
            .unwrap()
    };
    let output = run(&["printer"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8(output.stdout).unwrap(), csv);
    // Audited as the Kubernetes user who read the key (the test's admin certificate), whatever
    // the local account is called.
    let subject: String = sqlx::query_scalar(
        "SELECT payload->'actor'->>'subject' FROM voucher_audit_outbox \
         WHERE kind = 'campaign_codes_downloaded' ORDER BY seq DESC LIMIT 1",
    )
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert_eq!(
        subject,
        "voucher-operator campaign codes (Kubernetes user voucher-operator-admin)"
    );

    // A code revoked since is not printed, and the exit status says so, naming its index.
    let third = csv.lines().nth(3).unwrap().to_owned();
    sqlx::query("UPDATE promo_codes SET deleted_at = now() WHERE code = $1")
        .bind(&third)
        .execute(&h.pool)
        .await
        .unwrap();
    let output = run(&["printer"]);
    assert!(!output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(!stdout.contains(&third));
    assert_eq!(stdout.lines().count(), 40);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("1 of 40 code(s)") && stderr.contains("indices: 2"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(&third),
        "never a code in a message: {stderr}"
    );

    let output = run(&["missing"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("no VoucherCampaign {}/missing", h.ns)),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_discount_campaign_issues_codes_each_redeemed_into_one_grant() {
    let h = harness().await;
    h.secret("partner-key").await;
    let mut partner = manifest(
        "partner-5-off",
        json!({"prefix": "PARTNER-", "count": 200, "codeLength": 10,
               "discount": {"amountOff": 5000, "appliesTo": ["install", "support"]},
               "keySecretRef": {"name": "partner-key"}}),
    );
    partner["spec"].as_object_mut().unwrap().remove("creditOMR");
    h.apply(&partner).unwrap();
    let c = h.ready("partner-5-off", 200).await;
    assert_eq!(
        status(&c).grant.as_deref(),
        Some("5.000 OMR off install,support once")
    );
    let codes = h.codes("partner-5-off").await;
    assert_eq!(codes.len(), 200);
    // Every row carries the discount and no credit.
    let rows: Vec<(i32, Value)> = sqlx::query_as(
        "SELECT p.credit_omr, p.discount FROM promo_codes p \
         JOIN voucher_campaign_codes c ON c.code = p.code",
    )
    .fetch_all(&h.pool)
    .await
    .unwrap();
    let terms = json!({"amount_off": 5000, "applies_to": ["install", "support"]});
    assert_eq!(rows.len(), 200);
    assert!(
        rows.iter().all(|row| *row == (0, terms.clone())),
        "{rows:?}"
    );
    // Each code redeems once, into a grant and never the ledger.
    let redeemed: Vec<StatusCode> = futures::stream::iter(codes.iter().enumerate())
        .map(|(i, c)| h.redeem(format!("partner-{i}"), c))
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(
        redeemed.iter().all(|s| *s == StatusCode::OK),
        "{redeemed:?}"
    );
    let (grants, ledger, audited): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM voucher_discount_grants WHERE code LIKE 'PARTNER-%'), \
                (SELECT count(*) FROM credit_ledger), \
                (SELECT count(*) FROM voucher_audit_outbox WHERE kind = 'discount_granted' \
                  AND payload->'campaign'->>'name' = 'partner-5-off')",
    )
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert_eq!((grants, ledger, audited), (200, 0, 200));
    h.until("partner-5-off", "200 redemptions counted", |c| {
        status(c).redeemed == Some(200)
    })
    .await;
}
