//! The hub's allotment service against a real nats-server (JetStream KV):
//! replicas racing on one record never grant past the cap, a duplicated or
//! replayed request applies at most once, and a cap lowered while grants are
//! in flight bounds them (docs/federation.md; the rules are checked
//! exhaustively by crates/voucher-model, here they meet real processes).

mod support;

use std::time::Duration;

use futures::StreamExt as _;

use async_nats::jetstream::{self, kv};
use sqlx::types::Json;
use tokio_util::sync::CancellationToken;
use voucher_operator::domain::Code;
use voucher_operator::domain::allotment::{Applied, Local, Record, Refusal, Reply, Request};
use voucher_operator::federation::allotment::{self, Ask};
use voucher_operator::federation::sovereign::{self, Refill};
use voucher_operator::store::Store;

const TIMEOUT: Duration = Duration::from_secs(5);

async fn client() -> async_nats::Client {
    async_nats::connect(&support::nats().url)
        .await
        .expect("nats-server answers")
}

/// The hub's bucket (one for every test; each test its own codes).
async fn bucket() -> kv::Store {
    let js = jetstream::new(client().await);
    allotment::bucket(&js, 1).await.expect("the bucket")
}

/// `n` replicas of the allotment service on the test's own subjects, each
/// with its own connection; answering when this returns.
async fn replicas(prefix: &str, n: usize) -> CancellationToken {
    let stop = CancellationToken::new();
    for _ in 0..n {
        allotment::start(client().await, bucket().await, prefix, stop.clone())
            .await
            .expect("started");
    }
    stop
}

/// A Sovereign as far as its allotment goes: its share and version, moved
/// only by a reply newer than what it holds.
struct Sovereign {
    prefix: String,
    name: String,
    share: u64,
    version: u64,
}

impl Sovereign {
    fn new(prefix: &str, name: &str) -> Self {
        Self {
            prefix: prefix.into(),
            name: name.into(),
            share: 0,
            version: 0,
        }
    }

    fn set(&self, uid: &str, share: u64) -> Request {
        Request::Set {
            uid: uid.into(),
            epoch: 0,
            version: self.version,
            share,
            used: 0,
        }
    }

    async fn ask(&mut self, client: &async_nats::Client, code: &str, request: Request) -> Reply {
        let ask = Ask {
            code: code.into(),
            request,
        };
        // Unanswered (a replica lost its compare-and-sets, or crashed): re-sent
        // as it is, which the hub applies at most once.
        let mut attempts = 0;
        let reply = loop {
            match allotment::ask(client, &self.prefix, &self.name, &ask, TIMEOUT).await {
                Ok(reply) => break reply,
                Err(e) if attempts < 3 => {
                    attempts += 1;
                    println!("{}: {e}; re-sent", self.name);
                }
                Err(e) => panic!("{}: {e}", self.name),
            }
        };
        if let Reply::Ok { share, version, .. } | Reply::Refused { share, version, .. } = reply
            && version > self.version
        {
            (self.share, self.version) = (share, version);
        }
        reply
    }

    /// Asks for `step` more at a time until the hub refuses for the cap.
    async fn fill(mut self, code: &str, uid: &str, step: u64) -> Self {
        let client = client().await;
        // Each request moves the share or is a refusal for the cap: a Sovereign
        // still asking after this many has been answered out of turn.
        for _ in 0..1000 {
            let request = self.set(uid, self.share + step);
            match self.ask(&client, code, request).await {
                Reply::Ok { .. }
                | Reply::Refused {
                    reason: Refusal::StaleVersion,
                    ..
                } => {}
                Reply::Refused {
                    reason: Refusal::Cap,
                    ..
                } => return self,
                other => panic!("{}: {other:?}", self.name),
            }
        }
        panic!("{} never settled: stale answers over and over", self.name)
    }
}

async fn define(code: &str, cap: u64, ceiling: u64, per_request: u64) -> Record {
    let terms = Record::new(format!("uid-{code}"), cap, ceiling, per_request);
    allotment::define(&bucket().await, code, &terms)
        .await
        .expect("defined")
}

async fn record(code: &str) -> Record {
    allotment::read(&bucket().await, code)
        .await
        .expect("read")
        .expect("a record")
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_granting_at_once_never_grant_past_the_cap() {
    let stop = replicas("test.race", 2).await;
    define("GLOBAL-RACE", 1000, 1000, 10).await;
    let fills = (0..6).map(|i| {
        tokio::spawn(Sovereign::new("test.race", &format!("sov{i}")).fill(
            "GLOBAL-RACE",
            "uid-GLOBAL-RACE",
            10,
        ))
    });
    let sovereigns: Vec<Sovereign> = futures::future::try_join_all(fills).await.expect("joined");
    let hub = record("GLOBAL-RACE").await;
    let held: u64 = sovereigns.iter().map(|s| s.share).sum();
    assert_eq!(
        hub.granted(),
        1000,
        "every unit granted, none twice: {hub:?}"
    );
    assert_eq!(held, 1000, "the Sovereigns hold what the hub granted");
    for sovereign in &sovereigns {
        let entry = &hub.sovereigns[&sovereign.name];
        assert_eq!(
            (sovereign.share, sovereign.version),
            (entry.share, entry.version),
            "{}",
            sovereign.name
        );
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicated_or_replayed_request_applies_at_most_once_and_never_undoes_a_later_change() {
    let stop = replicas("test.dup", 2).await;
    define("GLOBAL-DUP", 100, 100, 50).await;
    let client = client().await;
    let uid = "uid-GLOBAL-DUP";
    let ask = Ask {
        code: "GLOBAL-DUP".into(),
        request: Request::Set {
            uid: uid.into(),
            epoch: 0,
            version: 0,
            share: 30,
            used: 0,
        },
    };
    // The same request twice at once (a re-send racing the first, on two replicas).
    let (first, second) = tokio::join!(
        allotment::ask(&client, "test.dup", "sov1", &ask, TIMEOUT),
        allotment::ask(&client, "test.dup", "sov1", &ask, TIMEOUT)
    );
    let oks = [first.expect("answered"), second.expect("answered")]
        .into_iter()
        .filter(|r| matches!(r, Reply::Ok { .. }))
        .count();
    assert_eq!(oks, 1, "one of the two copies applies");
    assert_eq!(record("GLOBAL-DUP").await.sovereigns["sov1"].share, 30);
    // A return at version 1, then the old raise replayed: refused, the return stands.
    let mut sov1 = Sovereign {
        prefix: "test.dup".into(),
        name: "sov1".into(),
        share: 30,
        version: 1,
    };
    let returned = sov1.ask(&client, "GLOBAL-DUP", sov1.set(uid, 10)).await;
    assert!(
        matches!(
            returned,
            Reply::Ok {
                share: 10,
                version: 2,
                ..
            }
        ),
        "{returned:?}"
    );
    let replayed = allotment::ask(&client, "test.dup", "sov1", &ask, TIMEOUT)
        .await
        .expect("answered");
    assert!(
        matches!(
            replayed,
            Reply::Refused {
                reason: Refusal::StaleVersion,
                share: 10,
                version: 2,
                ..
            }
        ),
        "{replayed:?}"
    );
    assert_eq!(record("GLOBAL-DUP").await.sovereigns["sov1"].share, 10);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cap_lowered_while_grants_are_in_flight_bounds_them() {
    let stop = replicas("test.lower", 2).await;
    define("GLOBAL-LOWER", 600, 600, 5).await;
    let fills: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(Sovereign::new("test.lower", &format!("low{i}")).fill(
                "GLOBAL-LOWER",
                "uid-GLOBAL-LOWER",
                5,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The vendor lowers the cap mid-grant: a compare-and-set on the same record.
    let lowered = define("GLOBAL-LOWER", 100, 600, 5).await;
    let at_lowering = lowered.granted();
    futures::future::try_join_all(fills).await.expect("joined");
    let hub = record("GLOBAL-LOWER").await;
    println!(
        "granted {at_lowering} when the cap was lowered to 100; {} at the end",
        hub.granted()
    );
    assert_eq!(hub.cap, 100);
    assert!(
        hub.granted() <= at_lowering.max(100),
        "Σ shares {} above max(new cap, Σ at the lowering = {at_lowering})",
        hub.granted()
    );
    stop.cancel();
}

#[tokio::test]
async fn a_request_for_no_global_voucher_is_answered_unknown() {
    let stop = replicas("test.unknown", 1).await;
    let client = client().await;
    let ask = Ask {
        code: "GLOBAL-NONE".into(),
        request: Request::Set {
            uid: "u".into(),
            epoch: 0,
            version: 0,
            share: 1,
            used: 0,
        },
    };
    let reply = allotment::ask(&client, "test.unknown", "sov1", &ask, TIMEOUT)
        .await
        .expect("answered");
    assert_eq!(reply, Reply::Unknown);
    stop.cancel();
}

/// A Sovereign's billing database, migrated, with `code`'s row as a Voucher
/// would create it, registered as a global code.
async fn sovereign_database(code: &Code) -> (Store, sqlx::PgPool) {
    let url = support::fresh_database("federation").await;
    let pool = support::pool(&url).await;
    let store = Store::from_pool(pool.clone());
    store.migrate().await.expect("migrated");
    sqlx::query(
        "INSERT INTO promo_codes (code, credit_omr, description, active, max_redemptions) \
         VALUES ($1, 50, 'global', true, 0)",
    )
    .bind(code.as_str())
    .execute(&pool)
    .await
    .expect("the billing row");
    store
        .register_global(code, &format!("uid-{code}"))
        .await
        .expect("registered");
    (store, pool)
}

/// A Sovereign as far as its allotment goes: its own billing database (the global row
/// registered) and its leader's allotment loop on `client`, every 10 ms, until `stop`.
async fn running_sovereign(
    code: &Code,
    client: async_nats::Client,
    refill: Refill,
    stop: &CancellationToken,
) -> (Store, sqlx::PgPool) {
    let (store, pool) = sovereign_database(code).await;
    tokio::spawn(sovereign::run(
        store.clone(),
        client,
        refill,
        Duration::from_millis(10),
        stop.clone(),
    ));
    (store, pool)
}

async fn billing_row(pool: &sqlx::PgPool, code: &Code) -> (bool, i32, i32) {
    sqlx::query_as(
        "SELECT active, max_redemptions, times_redeemed FROM promo_codes WHERE code = $1",
    )
    .bind(code.as_str())
    .fetch_one(pool)
    .await
    .expect("the billing row")
}

fn refill_settings(prefix: &str, step: u64) -> Refill {
    Refill {
        sovereign: "sov1".into(),
        prefix: prefix.into(),
        low_water: 1,
        step,
        timeout: Duration::from_secs(2),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_writer_of_a_sovereign_database_is_held_to_its_allotment() {
    let stop = replicas("test.sov", 1).await;
    let code = Code::parse("GLOBAL-SOV").expect("a code");
    define(code.as_str(), 6, 6, 3).await;
    let (store, pool) = sovereign_database(&code).await;
    let client = client().await;
    let refill = refill_settings("test.sov", 3);
    let uid = format!("uid-{code}");
    // No share yet: an inactive row (never max_redemptions = 0, "unlimited" to the legacy checkout).
    assert_eq!(billing_row(&pool, &code).await, (false, 1, 0));
    assert!(
        support::seed_checkout(&pool, code.as_str(), "early")
            .await
            .is_err()
    );
    // The first round syncs (a new state), the second is granted 3.
    let synced = sovereign::refill(&store, &client, &refill, &code, &uid)
        .await
        .expect("synced");
    assert_eq!(synced, Some(Applied::Moved { share: 0 }));
    let granted = sovereign::refill(&store, &client, &refill, &code, &uid)
        .await
        .expect("granted");
    assert_eq!(granted, Some(Applied::Moved { share: 3 }));
    assert_eq!(billing_row(&pool, &code).await, (true, 3, 0));
    for customer in ["c1", "c2", "c3"] {
        support::seed_checkout(&pool, code.as_str(), customer)
            .await
            .expect("within the share");
    }
    // The admin page raises the cap: the guard keeps the share.
    sqlx::query("UPDATE promo_codes SET max_redemptions = 100, active = true WHERE code = $1")
        .bind(code.as_str())
        .execute(&pool)
        .await
        .expect("the statement runs");
    assert_eq!(billing_row(&pool, &code).await, (true, 3, 3));
    let refused = support::seed_checkout(&pool, code.as_str(), "c4")
        .await
        .expect_err("past the share");
    println!("the legacy checkout past the share: {refused}");
    // A writer that skips the checks: its counter update is refused by the guard.
    let skipped =
        sqlx::query("UPDATE promo_codes SET times_redeemed = times_redeemed + 1 WHERE code = $1")
            .bind(code.as_str())
            .execute(&pool)
            .await
            .expect_err("refused");
    assert!(skipped.to_string().contains("allotment"), "{skipped}");
    // Refilled to the cap of 6, then 3 more; the hub's record and the counter agree.
    let more = sovereign::refill(&store, &client, &refill, &code, &uid)
        .await
        .expect("granted");
    assert_eq!(more, Some(Applied::Moved { share: 6 }));
    for customer in ["c4", "c5", "c6"] {
        support::seed_checkout(&pool, code.as_str(), customer)
            .await
            .expect("within the share");
    }
    assert!(
        support::seed_checkout(&pool, code.as_str(), "c7")
            .await
            .is_err()
    );
    let hub = record(code.as_str()).await;
    assert_eq!((hub.granted(), billing_row(&pool, &code).await.2), (6, 6));
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_that_dies_after_the_hubs_grant_creates_no_unit_and_its_next_round_adopts_it() {
    let code = Code::parse("GLOBAL-CRASH").expect("a code");
    define(code.as_str(), 10, 10, 5).await;
    let (store, pool) = sovereign_database(&code).await;
    let client = client().await;
    let refill = refill_settings("test.crash", 5);
    let uid = format!("uid-{code}");
    let stop = replicas("test.crash", 1).await;
    sovereign::refill(&store, &client, &refill, &code, &uid)
        .await
        .expect("synced");
    stop.cancel();
    // The hub is out of reach: the round records its request, sends it, hears nothing.
    let lost = sovereign::refill(&store, &client, &refill, &code, &uid).await;
    assert!(lost.is_err(), "no answer: {lost:?}");
    let state: Json<Local> =
        sqlx::query_scalar("SELECT state FROM voucher_global_allotments WHERE code = $1")
            .bind(code.as_str())
            .fetch_one(&pool)
            .await
            .expect("the state");
    let outstanding = state
        .0
        .outstanding
        .clone()
        .expect("recorded before it was sent");
    // That request reached the hub and was granted; the operator died before the answer.
    let stop = replicas("test.crash", 1).await;
    let ask = Ask {
        code: code.to_string(),
        request: outstanding,
    };
    let granted = allotment::ask(&client, "test.crash", "sov1", &ask, TIMEOUT)
        .await
        .expect("answered");
    assert!(matches!(granted, Reply::Ok { share: 5, .. }), "{granted:?}");
    assert_eq!(
        billing_row(&pool, &code).await.1,
        1,
        "no unit here before the answer is applied"
    );
    // The next leader's round re-sends it: refused as stale, with the share it missed — adopted.
    let adopted = sovereign::refill(&store, &client, &refill, &code, &uid)
        .await
        .expect("answered");
    assert_eq!(adopted, Some(Applied::Moved { share: 5 }));
    assert_eq!(billing_row(&pool, &code).await, (true, 5, 0));
    assert_eq!(record(code.as_str()).await.granted(), 5, "granted once");
    stop.cancel();
}

const SECRET: &str = "federation-test-secret-of-at-least-32-bytes";

/// (status, Retry-After, body) of a preview, or of a redemption by `customer`.
async fn ask_http(
    http: &reqwest::Client,
    base: &str,
    code: &Code,
    customer: Option<&str>,
) -> (u16, Option<String>, serde_json::Value) {
    let request = match customer {
        None => http
            .post(format!("{base}/billing/vouchers/redeem-preview"))
            .json(&serde_json::json!({"code": code.as_str()})),
        Some(customer) => http
            .post(format!("{base}/billing/vouchers/redeem"))
            .bearer_auth(support::customer_token(SECRET, customer))
            .json(&serde_json::json!({"code": code.as_str(), "tenant_id": "t1"})),
    };
    let response = request.send().await.expect("answered");
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    (
        response.status().as_u16(),
        retry_after,
        response.json().await.expect("a JSON body"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_up_share_answers_try_again_and_only_every_unit_spent_everywhere_answers_gone() {
    let stop_hub = replicas("test.answers", 1).await;
    let code = Code::parse("GLOBAL-ANSWERS").expect("a code");
    let uid = format!("uid-{code}");
    define(code.as_str(), 4, 4, 2).await;
    let (store, _pool) = sovereign_database(&code).await;
    let client = client().await;
    let refill = refill_settings("test.answers", 2);
    sovereign::refill(&store, &client, &refill, &code, &uid)
        .await
        .expect("synced");
    sovereign::refill(&store, &client, &refill, &code, &uid)
        .await
        .expect("granted 2");
    let auth = voucher_operator::server::auth::AuthSettings {
        hs256_secret: Some(SECRET.into()),
        ..Default::default()
    };
    let (base, stop_http) =
        support::serve_http(store.clone(), support::server_settings(), auth, None).await;
    let http = reqwest::Client::new();
    assert_eq!(ask_http(&http, &base, &code, None).await.0, 200);
    for customer in ["a", "b"] {
        let (status, _, body) = ask_http(&http, &base, &code, Some(customer)).await;
        assert_eq!(status, 200, "{body}");
    }
    // This Sovereign's share is spent; another holds the rest: try again, on preview and redeem.
    let other = Ask {
        code: code.to_string(),
        request: Request::Set {
            uid: uid.clone(),
            epoch: 0,
            version: 0,
            share: 2,
            used: 0,
        },
    };
    allotment::ask(&client, "test.answers", "sov2", &other, TIMEOUT)
        .await
        .expect("granted to sov2");
    sovereign::refill(&store, &client, &refill, &code, &uid)
        .await
        .expect("refused for the cap");
    let (status, retry, _) = ask_http(&http, &base, &code, None).await;
    assert_eq!(
        (status, retry.as_deref()),
        (503, Some("2")),
        "the preview: try again"
    );
    let (status, retry, body) = ask_http(&http, &base, &code, Some("c")).await;
    assert_eq!(
        (status, retry.as_deref()),
        (503, Some("2")),
        "the redemption: {body}"
    );
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("try again"),
        "{body}"
    );
    // The other Sovereign reports its units spent: now every unit is granted and spent.
    let spent = Ask {
        code: code.to_string(),
        request: Request::Set {
            uid: uid.clone(),
            epoch: 0,
            version: 1,
            share: 2,
            used: 2,
        },
    };
    allotment::ask(&client, "test.answers", "sov2", &spent, TIMEOUT)
        .await
        .expect("reported");
    sovereign::refill(&store, &client, &refill, &code, &uid)
        .await
        .expect("refused: all spent");
    let (status, retry, body) = ask_http(&http, &base, &code, Some("c")).await;
    assert_eq!((status, retry), (410, None), "{body}");
    assert_eq!(ask_http(&http, &base, &code, None).await.0, 410);
    stop_http.cancel();
    stop_hub.cancel();
}

/// One customer's tries at `store` until granted or told every unit is gone:
/// a 503-like "share used up" is asked again shortly, as a client would.
async fn redeem_until_answered(store: &Store, code: &Code, customer: String) -> bool {
    support::redeem_within(store, code, &customer, 2000)
        .await
        .unwrap_or_else(|| panic!("{customer} was told to try again for 40 s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_sovereigns_grant_exactly_the_global_cap_to_three_times_as_many_customers() {
    let code = Code::parse("GLOBAL-THREE").expect("a code");
    define(code.as_str(), 1000, 1000, 50).await;
    let stop = replicas("test.three", 2).await;
    let mut sovereigns = Vec::new();
    for i in 0..3 {
        let refill = Refill {
            sovereign: format!("three{i}"),
            low_water: 20,
            ..refill_settings("test.three", 50)
        };
        sovereigns.push(running_sovereign(&code, client().await, refill, &stop).await);
    }
    // 3,000 distinct customers at once, a thousand at each Sovereign, 25 at a time each.
    let started = std::time::Instant::now();
    let tries = sovereigns.iter().enumerate().map(|(i, (store, _))| {
        let (store, code) = (store.clone(), code.clone());
        tokio::spawn(async move {
            futures::stream::iter(0..1000)
                .map(|n| redeem_until_answered(&store, &code, format!("s{i}-customer-{n}")))
                .buffer_unordered(25)
                .filter(|granted| std::future::ready(*granted))
                .count()
                .await
        })
    });
    let granted: Vec<usize> = futures::future::try_join_all(tries).await.expect("joined");
    let counters =
        futures::future::join_all(sovereigns.iter().map(|(_, pool)| billing_row(pool, &code)))
            .await;
    let hub = record(code.as_str()).await;
    println!(
        "granted per Sovereign {granted:?} in {:?}; counters {:?}; the hub's shares {:?}",
        started.elapsed(),
        counters.iter().map(|c| c.2).collect::<Vec<_>>(),
        hub.sovereigns.values().map(|e| e.share).collect::<Vec<_>>()
    );
    assert_eq!(
        granted.iter().sum::<usize>(),
        1000,
        "exactly the cap, to distinct customers"
    );
    assert_eq!(
        counters.iter().map(|c| c.2 as u64).sum::<u64>(),
        1000,
        "Σ local counters"
    );
    assert_eq!(hub.granted(), 1000, "the hub's total");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_hubs_nats_server_killed_mid_load_sovereigns_redeem_within_their_shares_and_resume_after()
 {
    let nats = std::sync::Arc::new(support::nats_of_its_own());
    let connect = || async {
        async_nats::connect(&nats.url)
            .await
            .expect("nats-server answers")
    };
    let kv = allotment::bucket(&jetstream::new(connect().await), 1)
        .await
        .expect("the bucket");
    let code = Code::parse("GLOBAL-KILLED").expect("a code");
    let terms = Record::new(format!("uid-{code}"), 600, 600, 30);
    allotment::define(&kv, code.as_str(), &terms)
        .await
        .expect("defined");
    let stop = CancellationToken::new();
    for _ in 0..2 {
        allotment::start(connect().await, kv.clone(), "test.killed", stop.clone())
            .await
            .expect("started");
    }
    let mut sovereigns = Vec::new();
    for i in 0..3 {
        let refill = Refill {
            sovereign: format!("killed{i}"),
            low_water: 10,
            ..refill_settings("test.killed", 30)
        };
        sovereigns.push(running_sovereign(&code, connect().await, refill, &stop).await);
    }
    let pools: Vec<sqlx::PgPool> = sovereigns.iter().map(|(_, pool)| pool.clone()).collect();
    let counted = |pools: Vec<sqlx::PgPool>, code: Code| async move {
        let rows =
            futures::future::join_all(pools.iter().map(|pool| billing_row(pool, &code))).await;
        rows.iter()
            .map(|row| (row.2 as u64, row.1 as u64))
            .fold((0, 0), |(r, c), (ri, ci)| (r + ri, c + ci))
    };
    // The hub's nats-server killed once 150 are redeemed, for 3 s, then back on the same store.
    let killer = {
        let (nats, pools, code) = (nats.clone(), pools.clone(), code.clone());
        tokio::spawn(async move {
            while counted(pools.clone(), code.clone()).await.0 < 150 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let stopping = nats.clone();
            tokio::task::spawn_blocking(move || stopping.stop())
                .await
                .expect("stopped");
            let at_kill = counted(pools.clone(), code.clone()).await.0;
            // A grant the hub answered just before it died is still a grant: the Sovereign
            // writes it under its row lock a moment after the answer arrives. What is held
            // is read once those in-flight answers are written; from then on nothing may grow.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let held = counted(pools.clone(), code.clone()).await.1;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (during, held_after) = counted(pools.clone(), code.clone()).await;
            let starting = nats.clone();
            tokio::task::spawn_blocking(move || starting.start())
                .await
                .expect("started");
            (at_kill, held, during, held_after)
        })
    };
    let tries = sovereigns.iter().enumerate().map(|(i, (store, _))| {
        let (store, code) = (store.clone(), code.clone());
        tokio::spawn(async move {
            futures::stream::iter(0..600)
                .map(|n| redeem_until_answered(&store, &code, format!("k{i}-customer-{n}")))
                .buffer_unordered(20)
                .filter(|granted| std::future::ready(*granted))
                .count()
                .await
        })
    });
    let granted: Vec<usize> = futures::future::try_join_all(tries).await.expect("joined");
    let (at_kill, held, during, held_after) = killer.await.expect("the kill");
    println!(
        "killed at {at_kill} redeemed ({held} held); {during} redeemed while the hub was down ({held_after} held); granted {granted:?}"
    );
    assert!(
        during <= held,
        "while the hub is down, each Sovereign redeems only within its share"
    );
    assert_eq!(held_after, held, "no share grows while the hub is down");
    let hub = allotment::read(&kv, code.as_str())
        .await
        .expect("read")
        .expect("a record")
        .0;
    assert_eq!(
        granted.iter().sum::<usize>(),
        600,
        "every unit granted once the hub is back, never more"
    );
    assert_eq!(counted(pools, code.clone()).await.0, 600);
    assert_eq!(hub.granted(), 600, "the hub's total");
    stop.cancel();
}

/// The topology of DESIGN §11: the hub's nats-server (JetStream domain `hub`)
/// and one leaf node per Sovereign (a domain of its own), each leaf link
/// through a proxy the test can cut like a WAN link.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sovereigns_leaf_link_cut_leaves_the_others_what_the_hub_had_left() {
    use support::tcp_cut::{self, Link};
    let hub_leaf_port = support::free_port();
    let hub = support::nats_hub(hub_leaf_port, &["sov0", "sov1", "sov2"]);
    let connect = |url: String| async move { async_nats::connect(url).await.expect("nats") };
    let kv = allotment::bucket(&jetstream::new(connect(hub.url.clone()).await), 1)
        .await
        .expect("the bucket");
    let code = Code::parse("GLOBAL-LEAF").expect("a code");
    allotment::define(
        &kv,
        code.as_str(),
        &Record::new(format!("uid-{code}"), 300, 300, 30),
    )
    .await
    .expect("defined");
    let stop = CancellationToken::new();
    // The services a Sovereign's NATS account imports (on the shipped subjects).
    for _ in 0..2 {
        allotment::start(
            connect(hub.url.clone()).await,
            kv.clone(),
            allotment::SUBJECT_PREFIX,
            stop.clone(),
        )
        .await
        .expect("started");
    }
    allotment::start_definitions(
        connect(hub.url.clone()).await,
        kv.clone(),
        allotment::DEFINITION_PREFIX,
        stop.clone(),
    )
    .await
    .expect("started");
    let (mut leaves, mut sovereigns) = (Vec::new(), Vec::new());
    for i in 0..3 {
        let link = Link::default();
        let port = tcp_cut::proxy(hub_leaf_port, link.clone()).await;
        let leaf = support::nats_leaf(&format!("sov{i}"), port);
        let client = connect(leaf.url.clone()).await;
        // The hub's definition, read from the leaf through the service its account imports
        // (what a Sovereign's controller reads: terms only, never a share).
        let name = format!("sov{i}");
        let read =
            support::eventually_within(Duration::from_secs(20), "the hub seen from a leaf", || {
                let (client, code, name) = (client.clone(), code.clone(), name.clone());
                async move {
                    let prefix = allotment::DEFINITION_PREFIX;
                    allotment::definition(&client, prefix, &name, code.as_str(), TIMEOUT)
                        .await
                        .ok()
                        .flatten()
                }
            })
            .await;
        assert_eq!(read.cap, 300);
        let refill = Refill {
            sovereign: format!("sov{i}"),
            low_water: 5,
            ..refill_settings(allotment::SUBJECT_PREFIX, 20)
        };
        sovereigns.push(running_sovereign(&code, client, refill, &stop).await);
        leaves.push((leaf, link));
    }
    let redeem = |i: usize, from: usize, n: usize, tries: usize| {
        let (store, code) = (sovereigns[i].0.clone(), code.clone());
        tokio::spawn(async move {
            let mut granted = 0;
            for n in from..from + n {
                let customer = format!("leaf{i}-customer-{n}");
                match support::redeem_within(&store, &code, &customer, tries).await {
                    Some(true) => granted += 1,
                    // Still "try again" after `tries`: nothing more comes (its share is spent
                    // and the hub has none left for it).
                    None => break,
                    Some(false) => {}
                }
            }
            granted
        })
    };
    for i in 0..3 {
        assert_eq!(redeem(i, 0, 30, 2000).await.unwrap(), 30, "before the cut");
    }
    // Sovereign 0's link cut; what it holds is read once the answers in flight are written.
    leaves[0].1.cut();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = billing_row(&sovereigns[0].1, &code).await.1 as usize;
    let (others, cut_off) = tokio::join!(
        async {
            let (a, b) = (redeem(1, 30, 200, 50), redeem(2, 30, 200, 50));
            a.await.unwrap() + b.await.unwrap()
        },
        redeem(0, 30, 60, 5)
    );
    let cut_off = cut_off.unwrap();
    println!(
        "sov0 held {held} when cut and redeemed {cut_off} more; the others redeemed {others} more"
    );
    assert!(
        30 + cut_off <= held,
        "the cut-off Sovereign redeems within its share"
    );
    assert_eq!(
        billing_row(&sovereigns[0].1, &code).await.1 as usize,
        held,
        "its share does not grow while its link is down"
    );
    assert_eq!(
        60 + others,
        300 - held,
        "the others received everything the hub had left"
    );
    // The link mended: sov0 reports again, and every unit is granted, none twice.
    leaves[0].1.mend();
    let record = support::eventually_within(Duration::from_secs(20), "sov0 heard again", || {
        let kv = kv.clone();
        let code = code.clone();
        async move {
            let record = allotment::read(&kv, code.as_str()).await.ok()??.0;
            (record.sovereigns["sov0"].reported as usize == 30 + cut_off).then_some(record)
        }
    })
    .await;
    assert_eq!(record.granted(), 300, "the hub's total is the cap");
    let mut spent = 0;
    for (_, pool) in &sovereigns {
        spent += billing_row(pool, &code).await.2 as usize;
    }
    assert_eq!(spent, 60 + others + 30 + cut_off, "Σ local counters");
    assert!(spent <= 300);
    stop.cancel();
}

/// A refill is no change of a voucher's terms: a redemption that read the row
/// before the share moved counts on that read — it is not undone and tried
/// again, as it is when an administrator changes the terms under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redemption_racing_a_refill_counts_on_its_first_read() {
    let stop = replicas("test.race", 1).await;
    let code = Code::parse("GLOBAL-RACE").expect("a code");
    define(code.as_str(), 100, 100, 10).await;
    let (store, pool) = sovereign_database(&code).await;
    let client = client().await;
    let refill = refill_settings("test.race", 5);
    let uid = format!("uid-{code}");
    for _ in 0..2 {
        sovereign::refill(&store, &client, &refill, &code, &uid)
            .await
            .expect("synced, then granted 5");
    }
    assert_eq!(billing_row(&pool, &code).await, (true, 5, 0));
    // The refill's write (the next share, and the row's cap the guard derives from it)
    // holds the row's lock while a redemption, past its read, waits for it.
    let mut refilling = pool.begin().await.unwrap();
    sqlx::query("UPDATE voucher_global_allotments SET local_cap = 10 WHERE code = $1")
        .bind(code.as_str())
        .execute(&mut *refilling)
        .await
        .unwrap();
    sqlx::query("UPDATE promo_codes SET active = true WHERE code = $1")
        .bind(code.as_str())
        .execute(&mut *refilling)
        .await
        .unwrap();
    let redemption = {
        let (store, code) = (store.clone(), code.clone());
        tokio::spawn(async move { support::redeem_within(&store, &code, "racer", 1).await })
    };
    support::eventually_within(
        Duration::from_secs(10),
        "the redemption waiting",
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (waiting > 0).then_some(())
        },
    )
    .await;
    refilling.commit().await.unwrap();
    assert_eq!(redemption.await.unwrap(), Some(true), "granted");
    // Counted on the row it first read (cap 5): its audit record carries that read.
    let before: serde_json::Value = sqlx::query_scalar(
        "SELECT payload->'before' FROM voucher_audit_outbox WHERE code = $1 AND kind = 'redeemed'",
    )
    .bind(code.as_str())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        before["terms"]["max_redemptions"], 5,
        "not undone and read again: {before}"
    );
    assert_eq!(billing_row(&pool, &code).await, (true, 10, 1));
    stop.cancel();
}

/// Rule 5 against a real restore: a Sovereign database copied back from a
/// base backup taken before a return (same system identifier, same timeline:
/// only the unlogged incarnation token is gone) serves none of the returned
/// units — to any writer — and after the leader's sync only what the hub holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restored_from_before_a_return_serves_nothing_until_its_sync() {
    let stop = replicas("test.restore", 1).await;
    let code = Code::parse("GLOBAL-RESTORE").expect("a code");
    define(code.as_str(), 10, 10, 10).await;
    let server = support::postgres_of_its_own();
    let open = |port: u16| async move {
        let pool = support::pool(&format!("postgres://postgres@127.0.0.1:{port}/postgres")).await;
        (Store::from_pool(pool.clone()), pool)
    };
    let (store, pool) = open(server.port).await;
    store.migrate().await.expect("migrated");
    sqlx::query(
        "INSERT INTO promo_codes (code, credit_omr, description, active, max_redemptions) \
         VALUES ($1, 50, 'global', true, 0)",
    )
    .bind(code.as_str())
    .execute(&pool)
    .await
    .unwrap();
    let uid = format!("uid-{code}");
    store.register_global(&code, &uid).await.unwrap();
    let client = client().await;
    let refill = Refill {
        sovereign: "restored".into(),
        ..refill_settings("test.restore", 10)
    };
    for _ in 0..2 {
        sovereign::refill(&store, &client, &refill, &code, &uid)
            .await
            .expect("synced, then granted 10");
    }
    for customer in ["a", "b"] {
        assert_eq!(
            support::redeem_within(&store, &code, customer, 1).await,
            Some(true)
        );
    }
    // The backup holds a share of 10 (2 spent). Then 8 go back, and another Sovereign gets them.
    pool.close().await;
    let restored = server.restored_copy();
    let (store, pool) = open(server.port).await;
    sqlx::query("UPDATE voucher_global_allotments SET offered = false WHERE code = $1")
        .bind(code.as_str())
        .execute(&pool)
        .await
        .unwrap();
    sovereign::refill(&store, &client, &refill, &code, &uid)
        .await
        .expect("returned to 2");
    let other = Ask {
        code: code.to_string(),
        request: Request::Set {
            uid: uid.clone(),
            epoch: 0,
            version: 0,
            share: 8,
            used: 0,
        },
    };
    let granted = allotment::ask(&client, "test.restore", "other", &other, TIMEOUT)
        .await
        .expect("answered");
    assert!(matches!(granted, Reply::Ok { share: 8, .. }), "{granted:?}");
    server.stop();
    // The restore: the copy of the backup, started as it is.
    let (store, pool) = open(restored.port).await;
    assert_eq!(billing_row(&pool, &code).await.1, 10, "the backup's cap");
    let legacy = support::seed_checkout(&pool, code.as_str(), "legacy-customer").await;
    assert!(
        legacy.is_err(),
        "the legacy checkout is refused: {legacy:?}"
    );
    assert_eq!(
        support::redeem_within(&store, &code, "c", 1).await,
        None,
        "the server answers try again: no returned unit is served"
    );
    // The leader's sync keeps only what was spent (the hub holds 2 for it); nothing more fits.
    sovereign::refill(&store, &client, &refill, &code, &uid)
        .await
        .expect("synced");
    assert_eq!(
        billing_row(&pool, &code).await.1,
        2,
        "clamped to what was spent"
    );
    assert_eq!(support::redeem_within(&store, &code, "d", 5).await, None);
    let hub = allotment::read(&bucket().await, code.as_str())
        .await
        .unwrap()
        .unwrap()
        .0;
    assert_eq!(hub.granted(), 10, "the cap, never more");
    assert_eq!(
        billing_row(&pool, &code).await.2,
        2,
        "no redemption past the share"
    );
    restored.stop();
    stop.cancel();
}
