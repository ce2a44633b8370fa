//! Once per customer on any Sovereign (`perCustomer: Global`, DESIGN §11
//! rule 8, docs/federation.md) against real processes: a hub nats-server
//! (JetStream domain `hub`) with the claim and allotment services, two
//! Sovereigns each on its own leaf node with its own billing database and
//! HTTP server. The protocol is checked exhaustively by
//! crates/voucher-model/src/claims.rs; here it meets real faults.

mod support;

use std::time::Duration;

use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use voucher_operator::domain::Code;
use voucher_operator::domain::allotment::{Applied, Record};
use voucher_operator::domain::claims::{ClaimAnswer, ClaimAsk, claimant};
use voucher_operator::federation::claimer::Claimer;
use voucher_operator::federation::sovereign::{self, Refill};
use voucher_operator::federation::{allotment, claims};
use voucher_operator::store::Store;
use voucher_operator::store::redeem::Redemption;
use voucher_testenv::services::{SERVER_USER, server_password};

const SECRET: &str = "claims-test-secret-of-at-least-32-bytes!";
const CLAIM_KEY: &[u8] = b"the vendor's claim key, 32 bytes or more";
const CAP: u64 = 100;

struct Sovereign {
    name: &'static str,
    store: Store,
    pool: sqlx::PgPool,
    base: String,
    claimer: Claimer,
    leaf: support::Nats,
}

struct World {
    code: Code,
    hub: support::Nats,
    sovereigns: Vec<Sovereign>,
    stop: CancellationToken,
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn connect(url: &str) -> async_nats::Client {
    async_nats::connect(url).await.expect("nats-server answers")
}

/// The hub's services on the hub's own nats-server, answering when this returns.
async fn hub_services(hub: &support::Nats, code: &Code, stop: &CancellationToken) {
    let js = async_nats::jetstream::new(connect(&hub.url).await);
    let kv = allotment::bucket(&js, 1)
        .await
        .expect("the allotment bucket");
    let uid = format!("uid-{code}");
    let record = Record::new(uid, CAP, CAP, CAP).offering(Default::default(), true);
    allotment::define(&kv, code.as_str(), &record)
        .await
        .expect("defined");
    let prefix = allotment::SUBJECT_PREFIX;
    allotment::start(connect(&hub.url).await, kv, prefix, stop.clone())
        .await
        .expect("the allotment service");
    let claimed = claims::bucket(&js, 1).await.expect("the claim bucket");
    claims::start(
        connect(&hub.url).await,
        claimed,
        claims::SUBJECT_PREFIX,
        stop.clone(),
    )
    .await
    .expect("the claim service");
}

/// A Sovereign: its leaf node, its billing database with the global code's row
/// registered as once per customer anywhere and a share granted by the hub,
/// and its HTTP server joined to the hub (recovering after `recover_after`).
async fn sovereign(
    name: &'static str,
    hub_leaf_port: u16,
    code: &Code,
    recover_after: Duration,
    stop: &CancellationToken,
) -> Sovereign {
    let leaf = support::nats_leaf(name, hub_leaf_port);
    let client = connect(&leaf.url).await;
    let url = support::fresh_database("claims").await;
    let pool = support::pool(&url).await;
    let store = Store::from_pool(pool.clone());
    store.migrate().await.expect("migrated");
    for (row, once) in [(code.as_str(), true), ("LOCAL-FIVE", false)] {
        sqlx::query(
            "INSERT INTO promo_codes (code, credit_omr, description, active, max_redemptions) \
             VALUES ($1, 5, '', true, 0)",
        )
        .bind(row)
        .execute(&pool)
        .await
        .expect("the billing row");
        if once {
            let uid = format!("uid-{code}");
            store
                .register_global_as(code, &uid, true)
                .await
                .expect("registered");
        }
    }
    let refill = Refill {
        sovereign: name.into(),
        prefix: allotment::SUBJECT_PREFIX.into(),
        low_water: 1,
        step: 40,
        timeout: Duration::from_secs(2),
    };
    // A sync, then a grant; the leaf link takes a moment after start-up.
    let uid = format!("uid-{code}");
    support::eventually_within(Duration::from_secs(30), "a share from the hub", || async {
        match sovereign::refill(&store, &client, &refill, code, &uid).await {
            Ok(Some(Applied::Moved { share })) if share > 0 => Some(()),
            _ => None,
        }
    })
    .await;
    // The server's own credentials on its leaf node: it may only claim.
    let server = async_nats::ConnectOptions::with_user_and_password(
        SERVER_USER.into(),
        server_password(name),
    )
    .connect(&leaf.url)
    .await
    .expect("the server's credentials");
    let claimer = Claimer {
        client: server,
        sovereign: name.into(),
        prefix: claims::SUBJECT_PREFIX.into(),
        key: CLAIM_KEY.to_vec(),
        timeout: Duration::from_secs(2),
        recover_after,
    };
    let auth = voucher_operator::server::auth::AuthSettings {
        hs256_secret: Some(SECRET.into()),
        ..Default::default()
    };
    let settings = support::server_settings();
    let (base, server_stop) =
        support::serve_http_joined(store.clone(), settings, auth, None, Some(claimer.clone()))
            .await;
    let stopping = stop.clone();
    tokio::spawn(async move {
        stopping.cancelled().await;
        server_stop.cancel();
    });
    Sovereign {
        name,
        store,
        pool,
        base,
        claimer,
        leaf,
    }
}

async fn world(code: &str, recover_after: Duration) -> World {
    support::init_tracing();
    let code = Code::parse(code).expect("a code");
    let leaf_port = support::free_port();
    let hub = support::nats_hub(leaf_port, &["sov1", "sov2"]);
    let stop = CancellationToken::new();
    hub_services(&hub, &code, &stop).await;
    let mut sovereigns = Vec::new();
    for name in ["sov1", "sov2"] {
        sovereigns.push(sovereign(name, leaf_port, &code, recover_after, &stop).await);
    }
    World {
        code,
        hub,
        sovereigns,
        stop,
    }
}

/// (status, body) of `customer`'s redemption of `code` on `sovereign`.
async fn redeem(sovereign: &Sovereign, code: &str, customer: &str) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/billing/vouchers/redeem", sovereign.base))
        .bearer_auth(support::customer_token(SECRET, customer))
        .json(&serde_json::json!({"code": code, "tenant_id": "t1"}))
        .send()
        .await
        .expect("answered");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON body"))
}

/// Redemptions of `code` by `customer` in a Sovereign's database.
async fn redemptions(sovereign: &Sovereign, code: &Code, customer: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM promo_redemptions r JOIN customers c ON c.id = r.customer_id \
          WHERE r.code = $1 AND c.user_id = $2",
    )
    .bind(code.as_str())
    .bind(customer)
    .fetch_one(&sovereign.pool)
    .await
    .expect("counted")
}

async fn everywhere(world: &World, customer: &str) -> i64 {
    let mut total = 0;
    for sovereign in &world.sovereigns {
        total += redemptions(sovereign, &world.code, customer).await;
    }
    total
}

/// What a redemption process killed after the hub's claim and before its
/// commit leaves behind: a pending intent here, and the claim at the hub.
async fn claimed_and_killed(sovereign: &Sovereign, code: &Code, customer: &str) -> Uuid {
    let intent = Uuid::new_v4();
    let claimant = claimant(CLAIM_KEY, customer);
    sovereign
        .store
        .open_intent(intent, code, customer, &claimant)
        .await
        .expect("the intent");
    let ask = ClaimAsk::Create {
        code: code.to_string(),
        claimant,
        intent: intent.to_string(),
    };
    let answer = claims::ask(
        &sovereign.claimer.client,
        claims::SUBJECT_PREFIX,
        sovereign.name,
        &ask,
        Duration::from_secs(5),
    )
    .await
    .expect("the hub answers");
    assert_eq!(answer, ClaimAnswer::Claimed);
    intent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_customer_redeeming_on_two_sovereigns_at_the_same_instant_is_granted_once() {
    let world = world("WORLD-ONCE", Duration::from_secs(30)).await;
    let code = world.code.as_str();
    let [sov1, sov2] = [&world.sovereigns[0], &world.sovereigns[1]];
    for i in 0..10 {
        let customer = format!("twice-{i}");
        let (a, b) = tokio::join!(redeem(sov1, code, &customer), redeem(sov2, code, &customer));
        let mut statuses = [a.0, b.0];
        statuses.sort_unstable();
        assert_eq!(statuses, [200, 409], "{customer}: {a:?} {b:?}");
        let refused = if a.0 == 409 { &a.1 } else { &b.1 };
        assert!(
            refused["error"]
                .as_str()
                .unwrap_or_default()
                .contains("once per customer anywhere"),
            "{refused}"
        );
        assert_eq!(everywhere(&world, &customer).await, 1, "{customer}");
    }
    // A repeat where it was granted: the local answer, with the grant.
    let (status, body) = redeem(sov1, code, "once-more").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = redeem(sov1, code, "once-more").await;
    assert_eq!(
        (status, body["credit_omr"].as_i64()),
        (409, Some(5)),
        "{body}"
    );
    let (status, body) = redeem(sov2, code, "once-more").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(everywhere(&world, "once-more").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_legacy_checkout_cannot_redeem_a_once_per_customer_anywhere_code() {
    let world = world("WORLD-LEGACY", Duration::from_secs(30)).await;
    let sov1 = &world.sovereigns[0];
    let refused = support::seed_checkout(&sov1.pool, world.code.as_str(), "mallory")
        .await
        .expect_err("the guard refuses a redemption without the hub's claim");
    assert!(
        refused.contains("once per customer on any Sovereign"),
        "{refused}"
    );
    // The code itself is live: the operator's redemption (holding the claim) is granted.
    let (status, body) = redeem(sov1, world.code.as_str(), "mallory").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(everywhere(&world, "mallory").await, 1);
    // And the legacy checkout still redeems a code of the Sovereign's own.
    support::seed_checkout(&sov1.pool, "LOCAL-FIVE", "mallory")
        .await
        .expect("a Sovereign's own code");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redemption_killed_after_the_hub_claim_is_recovered_and_the_customer_redeems_once_anywhere()
 {
    let world = world("WORLD-KILLED", Duration::from_secs(1)).await;
    let code = &world.code;
    let [sov1, sov2] = [&world.sovereigns[0], &world.sovereigns[1]];
    let killed = claimed_and_killed(sov1, code, "carol").await;
    // Until recovery, the customer is held by the killed redemption's claim.
    let (status, body) = redeem(sov2, code.as_str(), "carol").await;
    assert_eq!(status, 409, "{body}");
    // sov1's server recovers the intent (aborted, the claim deleted): carol redeems on sov2.
    support::eventually_within(
        Duration::from_secs(20),
        "carol free after recovery",
        || async {
            let (status, _) = redeem(sov2, code.as_str(), "carol").await;
            (status == 200).then_some(())
        },
    )
    .await;
    // The killed redemption, had it been only slow, finds its intent aborted: nothing granted.
    let late = Redemption {
        code: code.clone(),
        subject: "carol".into(),
        tenant: Some("t1".into()),
        email: String::new(),
        idempotency: None,
        now: chrono::Utc::now(),
        currency: Default::default(),
        intent: Some(killed),
    };
    let refused = sov1.store.redeem(&late).await;
    assert!(refused.is_err(), "{refused:?}");
    let (status, body) = redeem(sov1, code.as_str(), "carol").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(everywhere(&world, "carol").await, 1);

    // Slow redemptions racing recovery: each customer's claimed intent is both committed
    // (late) and recovered at once; whichever takes the intent's row lock first wins, and
    // the customer ends with exactly one redemption anywhere.
    let mut racers = Vec::new();
    for i in 0..12 {
        let customer = format!("racer-{i}");
        let intent = claimed_and_killed(sov1, code, &customer).await;
        racers.push((customer, intent));
    }
    let commits = racers.iter().map(|(customer, intent)| {
        let late = Redemption {
            subject: customer.clone(),
            intent: Some(*intent),
            ..late.clone()
        };
        let store = sov1.store.clone();
        async move { store.redeem(&late).await.is_ok() }
    });
    let recovering = async {
        sov1.store
            .abort_stale_intents(Duration::ZERO)
            .await
            .expect("recovered");
        sov1.claimer.recover(&sov1.store).await.expect("deleted");
    };
    let (committed, ()) = tokio::join!(futures::future::join_all(commits), recovering);
    println!(
        "late commits that won the race: {}",
        committed.iter().filter(|c| **c).count()
    );
    sov1.claimer.recover(&sov1.store).await.expect("deleted");
    for (customer, _) in &racers {
        let (status, body) = redeem(sov2, code.as_str(), customer).await;
        let here = redemptions(sov1, code, customer).await;
        match here {
            1 => assert_eq!(status, 409, "{customer} redeemed on sov1: {body}"),
            0 => assert_eq!(status, 200, "{customer} was recovered: {body}"),
            n => panic!("{customer}: {n} redemptions on sov1"),
        }
        assert_eq!(everywhere(&world, customer).await, 1, "{customer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_hub_out_of_reach_once_anywhere_redemptions_answer_503_and_the_sovereigns_own_go_on()
 {
    let world = world("WORLD-DOWN", Duration::from_secs(30)).await;
    let sov1 = &world.sovereigns[0];
    world.hub.stop();
    let (status, body) = redeem(sov1, world.code.as_str(), "dave").await;
    assert_eq!(status, 503, "fails closed: {body}");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("hub"),
        "{body}"
    );
    let (status, body) = redeem(sov1, "LOCAL-FIVE", "dave").await;
    assert_eq!(status, 200, "a Sovereign's own code: {body}");
    assert_eq!(redemptions(sov1, &world.code, "dave").await, 0);
    // The hub back: the customer redeems (the failed attempt's intent was aborted, its
    // claim — if the hub ever made one — deleted by recovery).
    world.hub.start();
    support::eventually_within(
        Duration::from_secs(30),
        "dave redeems with the hub back",
        || async {
            let (status, _) = redeem(sov1, world.code.as_str(), "dave").await;
            (status == 200).then_some(())
        },
    )
    .await;
    assert_eq!(everywhere(&world, "dave").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversed_redemption_frees_the_customer_on_every_sovereign() {
    let world = world("WORLD-REVERSED", Duration::from_secs(1)).await;
    let code = &world.code;
    let [sov1, sov2] = [&world.sovereigns[0], &world.sovereigns[1]];
    let (status, body) = redeem(sov1, code.as_str(), "erin").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = redeem(sov2, code.as_str(), "erin").await;
    assert_eq!(status, 409, "held by the redemption on sov1: {body}");
    let admin = voucher_operator::domain::Actor::Subject {
        subject: "support".into(),
    };
    let reversed = sov1
        .store
        .reverse_redemption(code, "erin", "refunded order", &admin)
        .await
        .expect("reversed");
    assert!(
        matches!(
            reversed,
            voucher_operator::store::reversal::RedemptionReversal::Reversed(_)
        ),
        "{reversed:?}"
    );
    // The claim is deleted by sov1's recovery: erin may redeem once again, anywhere.
    support::eventually_within(
        Duration::from_secs(20),
        "erin free after the reversal",
        || async {
            let (status, _) = redeem(sov2, code.as_str(), "erin").await;
            (status == 200).then_some(())
        },
    )
    .await;
    let (status, body) = redeem(sov1, code.as_str(), "erin").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(everywhere(&world, "erin").await, 1);
}

/// `voucher-operator events --json` against the hub's nats-server, with `args`: one event a line.
fn hub_events(world: &World, args: &[&str]) -> Vec<serde_json::Value> {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
        .args(["events", "--json", "--nats-url", &world.hub.url])
        .args(args)
        .output()
        .expect("voucher-operator runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON event"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_gathers_every_sovereigns_events_of_global_vouchers_and_none_of_their_own() {
    use voucher_operator::federation::audit::{self, Gather};
    use voucher_operator::relay::{self, RelayMetrics, RelaySettings};
    let world = world("WORLD-AUDIT", Duration::from_secs(30)).await;
    let code = world.code.as_str();
    for sovereign in &world.sovereigns {
        let (status, body) = redeem(sovereign, code, &format!("{}-customer", sovereign.name)).await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = redeem(sovereign, "LOCAL-FIVE", "local-customer").await;
        assert_eq!(status, 200, "{body}");
        let settings = RelaySettings {
            nats_url: sovereign.leaf.url.clone(),
            source: format!("/sovereigns/{}/voucher-operator", sovereign.name),
            poll_interval: Duration::from_millis(200),
            ..Default::default()
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = std::sync::Arc::new(RelayMetrics::register(&mut registry));
        tokio::spawn(relay::run(
            sovereign.store.clone(),
            settings,
            metrics,
            world.stop.clone(),
        ));
    }
    let gather = Gather {
        stream: RelaySettings::default().stream,
        sovereign_stream: RelaySettings::default().stream,
        prefix: RelaySettings::default().subject_prefix,
        sovereigns: vec!["sov1".into(), "sov2".into()],
        replicas: 1,
    };
    let js = async_nats::jetstream::new(connect(&world.hub.url).await);
    audit::gather(&js, &gather).await.expect("the hub's stream");
    let redeemed = support::eventually_within(
        Duration::from_secs(30),
        "both Sovereigns' redemptions at the hub",
        || async {
            let events = hub_events(&world, &["--code", code, "--type", "redeemed"]);
            (events.len() == 2).then_some(events)
        },
    )
    .await;
    let mut sources: Vec<&str> = redeemed
        .iter()
        .map(|e| e["source"].as_str().unwrap_or_default())
        .collect();
    sources.sort_unstable();
    assert_eq!(
        sources,
        [
            "/sovereigns/sov1/voucher-operator",
            "/sovereigns/sov2/voucher-operator"
        ]
    );
    let everything = hub_events(&world, &[]);
    assert!(
        everything.iter().all(|e| e["subject"] == code),
        "only global vouchers' events reach the vendor: {everything:?}"
    );
    // Each Sovereign's own stream still has its own code's events.
    let sov1_local = std::process::Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
        .args([
            "events",
            "--json",
            "--nats-url",
            &world.sovereigns[0].leaf.url,
        ])
        .args(["--code", "LOCAL-FIVE"])
        .output()
        .expect("voucher-operator runs");
    assert!(
        String::from_utf8_lossy(&sov1_local.stdout).contains("LOCAL-FIVE"),
        "{}",
        String::from_utf8_lossy(&sov1_local.stderr)
    );
}

/// Rule 11, against the shipped accounts (`voucher_testenv::services::hub_accounts`): a
/// Sovereign's credentials reach the three services in its own name and nothing else of the
/// hub's — not its JetStream (the allotment records, the claim bucket), not another's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sovereigns_credentials_reach_the_hubs_services_in_its_own_name_only() {
    use voucher_operator::domain::allotment::{Reply, Request};
    let world = world("WORLD-ACCOUNTS", Duration::from_secs(30)).await;
    let code = world.code.as_str();
    let sov1 = &world.sovereigns[0];
    // The operator's credentials on sov1's leaf node: everything the Sovereign's account holds.
    let operator = connect(&sov1.leaf.url).await;
    let client = &operator;
    let short = Duration::from_secs(2);
    let ask = |sovereign: &'static str| {
        let ask = allotment::Ask {
            code: code.into(),
            request: Request::Sync {
                uid: format!("uid-{code}"),
                epoch: 0,
                keep: 0,
                used: 0,
            },
        };
        async move { allotment::ask(client, allotment::SUBJECT_PREFIX, sovereign, &ask, short).await }
    };
    // The hub's JetStream: neither the records (to raise a share) nor the claim bucket (to
    // read another Sovereign's customers).
    let hub = async_nats::jetstream::with_domain(client.clone(), "hub");
    for bucket in [allotment::BUCKET, claims::BUCKET] {
        let opened = tokio::time::timeout(Duration::from_secs(5), hub.get_key_value(bucket)).await;
        assert!(
            !matches!(opened, Ok(Ok(_))),
            "the hub's bucket {bucket} opened with a Sovereign's credentials"
        );
    }
    let put = tokio::time::timeout(
        Duration::from_secs(5),
        hub.publish(format!("$KV.{}.{code}", allotment::BUCKET), "{}".into()),
    )
    .await;
    let stored = match put {
        Ok(Ok(ack)) => ack.await.is_ok(),
        _ => false,
    };
    assert!(!stored, "a write to the hub's records was acknowledged");
    // In its own name: answered (a sync that keeps nothing, as a fresh Sovereign's).
    let own = ask("sov1").await.expect("its own name is answered");
    assert!(
        matches!(own, Reply::Ok { .. } | Reply::Refused { .. }),
        "{own:?}"
    );
    // In another's name: nothing answers (the account imports only its own subject).
    let other = ask("sov2").await;
    assert!(other.is_err(), "asked in sov2's name: {other:?}");
    let claim = ClaimAsk::Delete {
        code: code.into(),
        claimant: claimant(CLAIM_KEY, "someone"),
        intent: Uuid::new_v4().to_string(),
    };
    let other = claims::ask(client, claims::SUBJECT_PREFIX, "sov2", &claim, short).await;
    assert!(other.is_err(), "a claim in sov2's name: {other:?}");
    let hub_kv = allotment::bucket(
        &async_nats::jetstream::new(connect(&world.hub.url).await),
        1,
    )
    .await
    .expect("the hub's own bucket");
    let record = allotment::read(&hub_kv, code)
        .await
        .expect("read")
        .expect("a record");
    assert_eq!(record.0.cap, CAP, "the record is as the hub wrote it");
}

/// A Sovereign's HTTP server connects as a user that may only claim: it cannot ask the hub for
/// allotments (its leader's business) or publish audit events (its relay's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sovereigns_server_may_only_claim() {
    use voucher_operator::domain::allotment::Request;
    let world = world("WORLD-SERVER", Duration::from_secs(30)).await;
    let sov1 = &world.sovereigns[0];
    let server = &sov1.claimer.client;
    let short = Duration::from_secs(2);
    let claim = ClaimAsk::Create {
        code: world.code.to_string(),
        claimant: claimant(CLAIM_KEY, "frank"),
        intent: Uuid::new_v4().to_string(),
    };
    let claimed = claims::ask(server, claims::SUBJECT_PREFIX, "sov1", &claim, short).await;
    assert_eq!(claimed.expect("a claim is answered"), ClaimAnswer::Claimed);
    let ask = allotment::Ask {
        code: world.code.to_string(),
        request: Request::Sync {
            uid: format!("uid-{}", world.code),
            epoch: 0,
            keep: 0,
            used: 0,
        },
    };
    let asked = allotment::ask(server, allotment::SUBJECT_PREFIX, "sov1", &ask, short).await;
    assert!(
        asked.is_err(),
        "the server asked for an allotment: {asked:?}"
    );
    let mut events = connect(&sov1.leaf.url)
        .await
        .subscribe("catalyst.vouchers.>")
        .await
        .expect("the operator subscribes");
    let published = server
        .publish("catalyst.vouchers.WORLD-SERVER.redeemed", "{}".into())
        .await;
    let _ = server.flush().await;
    let heard = tokio::time::timeout(Duration::from_secs(2), events.next()).await;
    assert!(
        heard.is_err(),
        "the server published an audit event ({published:?}): {heard:?}"
    );
}

/// Many customers at once on one Sovereign: their redemptions holding the hub's claims are
/// grouped like any others (one transaction for a group), and each is granted once, its intent
/// settled `done` — none left for recovery to take back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_customers_at_once_each_hold_their_own_claim() {
    let world = world("WORLD-CROWD", Duration::from_secs(30)).await;
    let code = world.code.as_str();
    let [sov1, sov2] = [&world.sovereigns[0], &world.sovereigns[1]];
    let customers: Vec<String> = (0..30).map(|i| format!("crowd-{i}")).collect();
    let answers = futures::future::join_all(customers.iter().map(|c| redeem(sov1, code, c))).await;
    for (customer, (status, body)) in customers.iter().zip(&answers) {
        assert_eq!(*status, 200, "{customer}: {body}");
    }
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM voucher_global_claims WHERE code = $1 AND state <> 'done'",
    )
    .bind(code)
    .fetch_one(&sov1.pool)
    .await
    .expect("counted");
    assert_eq!(open, 0, "every intent settled with its redemption");
    for customer in customers.iter().take(5) {
        let (status, body) = redeem(sov2, code, customer).await;
        assert_eq!(status, 409, "{customer} on sov2: {body}");
        assert_eq!(everywhere(&world, customer).await, 1, "{customer}");
    }
}
