//! The audit relay against a real nats-server (JetStream) and a real Postgres:
//! every event type arrives once as a CloudEvent, nothing is lost while NATS
//! is down, nothing is doubled by a crash or a second relay, order per code
//! holds, and `voucher-operator events` filters by code.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use voucher_operator::domain::{Actor, Code, DeletionPolicy, Owner, Request, Terms};
use voucher_operator::relay::{self, RelayMetrics, RelaySettings};
use voucher_operator::store::redeem::Redemption;
use voucher_operator::store::sync::Wanted;
use voucher_operator::store::{Store, outbox};

/// The tests stop and start the shared nats-server: one at a time.
static NATS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn settings(name: &str) -> RelaySettings {
    RelaySettings {
        nats_url: support::nats().url.clone(),
        stream: format!("AUDIT_{name}"),
        subject_prefix: format!("test.{name}"),
        source: "/test/voucher-operator".into(),
        poll_interval: Duration::from_millis(200),
        ..Default::default()
    }
}

async fn store() -> Store {
    let url = support::fresh_database("relay").await;
    let store = Store::from_pool(support::pool(&url).await);
    store.migrate().await.unwrap();
    store
}

fn start_relay(
    store: &Store,
    settings: &RelaySettings,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let stop = CancellationToken::new();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(RelayMetrics::register(&mut registry));
    let task = tokio::spawn(relay::run(
        store.clone(),
        settings.clone(),
        metrics,
        stop.clone(),
    ));
    (stop, task)
}

async fn unpublished(store: &Store) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM voucher_audit_outbox WHERE published_at IS NULL")
        .fetch_one(store.pool())
        .await
        .unwrap()
}

async fn drained(store: &Store) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while unpublished(store).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox did not drain"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every message of the stream: (subject, Nats-Msg-Id, envelope).
async fn stream_messages(settings: &RelaySettings) -> Vec<(String, String, Value)> {
    let client = async_nats::connect(&settings.nats_url).await.unwrap();
    let js = jetstream::new(client);
    let mut stream = js.get_stream(&settings.stream).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut messages = Vec::new();
    for seq in 1..=last {
        let Ok(message) = stream.get_raw_message(seq).await else {
            continue;
        };
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        messages.push((
            message.subject.to_string(),
            id,
            serde_json::from_slice(&message.payload).unwrap(),
        ));
    }
    messages
}

fn terms(credit: i32) -> Terms {
    Terms {
        credit_omr: credit,
        discount: None,
        description: String::new(),
        active: true,
        max_redemptions: 0,
        valid_from: None,
        expires_at: None,
    }
}

fn owner(name: &str) -> Owner {
    Owner {
        namespace: "audit".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    }
}

async fn sync(store: &Store, code: &str, who: &Owner, generation: i64, terms: Terms) {
    let code = Code::parse(code).unwrap();
    let revoked = store.find(&code).await.unwrap().and_then(|r| r.deleted_at);
    store
        .sync_voucher(&Wanted {
            code: &code,
            owner: who,
            generation,
            terms: &terms,
            // Adopt and reissue when there is something to take.
            request: Request {
                adopt: true,
                reissue: revoked,
            },
            deletion_policy: DeletionPolicy::Revoke,
            suspended: false,
            now: Utc::now(),
            global: None,
        })
        .await
        .unwrap();
}

/// Every kind of a campaign's own audit record, through the store as the controller and the
/// download write them.
async fn campaign_records(store: &Store) {
    use voucher_operator::domain::campaign::{CodeRange, Generator};
    use voucher_operator::store::campaigns::{Batch, Chunk, Release, TermsPass};
    for (name, policy) in [
        ("camp", DeletionPolicy::Revoke),
        ("kept", DeletionPolicy::Orphan),
    ] {
        let campaign = owner(name);
        let generator = Generator::new(&[9; 32], "audit", name, name, 8).unwrap();
        let codes: Vec<Code> = (0..3).map(|i| generator.code(i)).collect();
        store.register_campaign(&campaign, policy).await.unwrap();
        let first = TermsPass::Change {
            before: None,
            codes: 0,
        };
        store
            .apply_campaign_terms(&campaign, (0, 0), &terms(5), 1, &first)
            .await
            .unwrap();
        let batch = Batch {
            from: 0,
            codes: &codes,
            terms: &terms(5),
            of: 3,
            generation: 1,
            key_fingerprint: generator.fingerprint(),
        };
        assert_eq!(
            store
                .generate_campaign_codes(&campaign, &batch)
                .await
                .unwrap(),
            Chunk::Generated { generated: 3 }
        );
        let change = TermsPass::Change {
            before: Some(&terms(5)),
            codes: 3,
        };
        store
            .apply_campaign_terms(&campaign, (0, 3), &terms(6), 2, &change)
            .await
            .unwrap();
        sqlx::query("UPDATE promo_codes SET credit_omr = 99 WHERE code = $1")
            .bind(codes[1].as_str())
            .execute(store.pool())
            .await
            .unwrap();
        let reverted = store
            .apply_campaign_terms(&campaign, (0, 3), &terms(6), 2, &TermsPass::Drift)
            .await
            .unwrap();
        assert_eq!(reverted, 1);
        store
            .audit_campaign_download(&campaign, "printer", CodeRange::new(0, 3))
            .await
            .unwrap();
        for on in [true, false] {
            store
                .suspend_campaign("audit", name, on, "root")
                .await
                .unwrap()
                .unwrap();
        }
        while store.release_campaign(&campaign, None).await.unwrap() == Release::More {}
    }
}

#[tokio::test]
async fn every_event_type_arrives_once_as_a_valid_cloudevent() {
    let _serial = NATS.lock().await;
    let store = store().await;
    let (a, b, c) = (owner("a"), owner("b"), owner("c"));
    // created, updated, deactivated, activated, drift_corrected
    sync(&store, "ALPHA-1", &a, 1, terms(5)).await;
    sync(&store, "ALPHA-1", &a, 2, terms(6)).await;
    sync(
        &store,
        "ALPHA-1",
        &a,
        3,
        Terms {
            active: false,
            ..terms(6)
        },
    )
    .await;
    sync(&store, "ALPHA-1", &a, 4, terms(6)).await;
    sqlx::query("UPDATE promo_codes SET credit_omr = 99 WHERE code = 'ALPHA-1'")
        .execute(store.pool())
        .await
        .unwrap();
    sync(&store, "ALPHA-1", &a, 4, terms(6)).await;
    // adopted, then conflict
    sqlx::query("INSERT INTO promo_codes (code, credit_omr) VALUES ('BETA-1', 3)")
        .execute(store.pool())
        .await
        .unwrap();
    sync(&store, "BETA-1", &b, 1, terms(3)).await;
    store
        .audit_conflict(&Code::parse("BETA-1").unwrap(), &c, &b)
        .await
        .unwrap();
    // created and expired
    let past = Terms {
        expires_at: Some(Utc::now() - chrono::Duration::hours(1)),
        ..terms(2)
    };
    sync(&store, "GAMMA-1", &c, 1, past).await;
    // redeemed and exhausted
    sync(
        &store,
        "DELTA-1",
        &owner("d"),
        1,
        Terms {
            max_redemptions: 1,
            ..terms(1)
        },
    )
    .await;
    let delta = Code::parse("DELTA-1").unwrap();
    store
        .redeem(&Redemption {
            code: delta.clone(),
            subject: "user-1".into(),
            tenant: Some("t".into()),
            email: String::new(),
            idempotency: None,
            now: Utc::now(),
            currency: Default::default(),
            intent: None,
        })
        .await
        .unwrap();
    // discount_granted: a discount code redeemed
    let discount = Terms {
        credit_omr: 0,
        discount: Some(voucher_operator::domain::Discount {
            off: voucher_operator::domain::Off::PercentOff(20),
            applies_to: vec!["install".into()],
            duration_months: Some(3),
        }),
        ..terms(1)
    };
    sync(&store, "EPSILON-1", &owner("eps"), 1, discount).await;
    store
        .redeem(&Redemption {
            code: Code::parse("EPSILON-1").unwrap(),
            subject: "user-1".into(),
            tenant: Some("t".into()),
            email: String::new(),
            idempotency: None,
            now: Utc::now(),
            currency: Default::default(),
            intent: None,
        })
        .await
        .unwrap();
    // discount_applied, discount_reversed: an order committed with the grant, then reversed;
    // redemption_reversed: then the redemption itself
    let service = Actor::Subject {
        subject: "billing-service".into(),
    };
    let lines = [voucher_operator::domain::checkout::Line {
        id: "1".into(),
        category: "install".into(),
        amount: 1000,
    }];
    let currency = voucher_operator::domain::Currency::default();
    let order = voucher_operator::store::checkout::Order {
        user_id: "user-1",
        order_id: "ORDER-1",
        lines: &lines,
        actor: &service,
        currency: &currency,
        now: Utc::now(),
    };
    store.commit(&order).await.unwrap();
    store
        .reverse_order(("user-1", "ORDER-1"), "refunded", &service, &currency)
        .await
        .unwrap();
    store
        .reverse_redemption(
            &Code::parse("EPSILON-1").unwrap(),
            "user-1",
            "mistake",
            &service,
        )
        .await
        .unwrap();
    // revoked, orphaned
    store
        .release_voucher(
            &Code::parse("ALPHA-1").unwrap(),
            &a,
            Some(DeletionPolicy::Revoke),
        )
        .await
        .unwrap();
    store
        .release_voucher(
            &Code::parse("BETA-1").unwrap(),
            &b,
            Some(DeletionPolicy::Orphan),
        )
        .await
        .unwrap();
    // reissued: the revoked code, asked for by another resource
    sync(&store, "ALPHA-1", &owner("e"), 1, terms(6)).await;
    // suspended and lifted, through the admin endpoint's store call
    for on in [true, false] {
        store
            .suspend_code(&delta, on, "root")
            .await
            .unwrap()
            .unwrap();
    }
    // A campaign's own records: generated, updated, drift corrected, downloaded, suspended and
    // lifted, revoked; and another's orphaned.
    campaign_records(&store).await;

    let settings = settings("types");
    let (stop, task) = start_relay(&store, &settings);
    drained(&store).await;
    stop.cancel();
    task.await.unwrap().unwrap();

    let records: Vec<(String, String)> =
        sqlx::query_as("SELECT event_id::text, kind FROM voucher_audit_outbox ORDER BY seq")
            .fetch_all(store.pool())
            .await
            .unwrap();
    let kinds: HashSet<&str> = records.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(
        kinds.len(),
        voucher_operator::domain::AuditKind::ALL.len(),
        "every event type has a cause here: {kinds:?}"
    );

    let messages = stream_messages(&settings).await;
    assert_eq!(messages.len(), records.len(), "each record exactly once");
    for ((subject, msg_id, envelope), (event_id, kind)) in messages.iter().zip(&records) {
        let event: cloudevents::Event = serde_json::from_value(envelope.clone())
            .unwrap_or_else(|e| panic!("not a valid CloudEvent ({e}): {envelope}"));
        use cloudevents::AttributesReader;
        assert_eq!(event.id(), event_id);
        assert_eq!(msg_id, event_id, "Nats-Msg-Id is the event id");
        assert_eq!(event.ty(), format!("io.openova.catalyst.voucher.{kind}.v1"));
        assert_eq!(event.source().to_string(), "/test/voucher-operator");
        assert_eq!(event.datacontenttype(), Some("application/json"));
        let code = event.subject().unwrap().to_owned();
        assert_eq!(subject, &format!("test.types.{code}.{kind}"));
        assert!(envelope["data"]["actor"]["type"].is_string(), "{envelope}");
        assert!(envelope["data"]["reason"].is_string());
    }
}

#[tokio::test]
async fn changes_made_while_nats_is_down_all_arrive_once_in_order() {
    let _serial = NATS.lock().await;
    let store = store().await;
    let settings = settings("outage");
    let (stop, task) = start_relay(&store, &settings);
    // Let the relay create the stream, then take NATS away.
    sync(&store, "WARMUP-1", &owner("w"), 1, terms(1)).await;
    drained(&store).await;
    tokio::task::spawn_blocking(|| support::nats().stop())
        .await
        .unwrap();

    let codes = ["ONE-1", "TWO-2", "THREE-3", "FOUR-4", "FIVE-5"];
    for round in 0..100 {
        for (i, code) in codes.iter().enumerate() {
            sync(
                &store,
                code,
                &owner(&format!("o{i}")),
                round + 1,
                terms(round as i32 + 1),
            )
            .await;
        }
    }
    assert_eq!(
        unpublished(&store).await,
        500,
        "nothing can be published while NATS is down"
    );
    tokio::task::spawn_blocking(|| support::nats().start())
        .await
        .unwrap();
    drained(&store).await;
    stop.cancel();
    task.await.unwrap().unwrap();

    let messages = stream_messages(&settings).await;
    assert_eq!(messages.len(), 501);
    let ids: HashSet<&str> = messages.iter().map(|(_, id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), 501, "no duplicates");
    // Order per code: the credits of each code's events count up.
    let mut credits: HashMap<String, Vec<i64>> = HashMap::new();
    for (_, _, envelope) in &messages {
        let code = envelope["subject"].as_str().unwrap().to_owned();
        credits.entry(code).or_default().push(
            envelope["data"]["after"]["terms"]["credit_omr"]
                .as_i64()
                .unwrap(),
        );
    }
    for code in codes {
        let seen = &credits[code];
        assert_eq!(
            seen,
            &(1..=100).collect::<Vec<i64>>(),
            "{code} out of order"
        );
    }
}

#[tokio::test]
async fn a_relay_that_died_after_publishing_causes_no_duplicate() {
    let _serial = NATS.lock().await;
    let store = store().await;
    let settings = settings("crash");
    for i in 0..3 {
        sync(
            &store,
            &format!("CRASH-{i}"),
            &owner(&format!("c{i}")),
            1,
            terms(1),
        )
        .await;
    }
    // The first record was published by a relay that died before marking it.
    let client = async_nats::connect(&settings.nats_url).await.unwrap();
    let js = jetstream::new(client);
    js.create_or_update_stream(relay::stream_config(&settings))
        .await
        .unwrap();
    let mut conn = store.pool().acquire().await.unwrap();
    let first = outbox::pending(&mut conn, 1).await.unwrap().remove(0);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", first.event_id.to_string().as_str());
    let body = serde_json::to_vec(&relay::envelope(&first, &settings.source)).unwrap();
    js.publish_with_headers(
        relay::subject(&settings.subject_prefix, &first.code, &first.kind),
        headers,
        body.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let (stop, task) = start_relay(&store, &settings);
    drained(&store).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let messages = stream_messages(&settings).await;
    assert_eq!(
        messages.len(),
        3,
        "JetStream dropped the re-sent first event by its Nats-Msg-Id"
    );
}

#[tokio::test]
async fn two_relays_at_once_publish_each_event_once() {
    // Leader election normally keeps a second relay away. Without it, both
    // read the same unpublished rows and both publish them; every copy after
    // the first carries an already-seen Nats-Msg-Id and JetStream drops it
    // within the duplicate window. So the stream still holds each event once.
    let _serial = NATS.lock().await;
    let store = store().await;
    let settings = settings("pair");
    for i in 0..300 {
        sync(
            &store,
            &format!("PAIR-{}", i % 7),
            &owner(&format!("p{}", i % 7)),
            i / 7 + 1,
            terms(i as i32 + 1),
        )
        .await;
    }
    let (stop_a, task_a) = start_relay(&store, &settings);
    let (stop_b, task_b) = start_relay(&store, &settings);
    drained(&store).await;
    stop_a.cancel();
    stop_b.cancel();
    task_a.await.unwrap().unwrap();
    task_b.await.unwrap().unwrap();
    let messages = stream_messages(&settings).await;
    let records: i64 = sqlx::query_scalar("SELECT count(*) FROM voucher_audit_outbox")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(messages.len() as i64, records);
    let ids: HashSet<&str> = messages.iter().map(|(_, id, _)| id.as_str()).collect();
    assert_eq!(ids.len() as i64, records);
}

/// `voucher-operator events` reading the stream of `settings`.
fn events_command(settings: &RelaySettings) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_voucher-operator"));
    command.args([
        "events",
        "--nats-url",
        &settings.nats_url,
        "--audit-stream",
        &settings.stream,
        "--audit-subject-prefix",
        &settings.subject_prefix,
    ]);
    command
}

#[tokio::test]
async fn the_events_command_shows_one_codes_events() {
    let _serial = NATS.lock().await;
    let store = store().await;
    let settings = settings("cli");
    sync(&store, "SHOWN-1", &owner("s"), 1, terms(1)).await;
    sync(&store, "SHOWN-1", &owner("s"), 2, terms(2)).await;
    sync(&store, "HIDDEN-1", &owner("h"), 1, terms(1)).await;
    let (stop, task) = start_relay(&store, &settings);
    drained(&store).await;
    stop.cancel();
    task.await.unwrap().unwrap();

    let cli = settings.clone();
    let run = move |extra: &[&str]| {
        let settings = &cli;
        let output = events_command(settings).args(extra).output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let json = tokio::task::spawn_blocking(move || run(&["--code", "shown-1", "--json"]))
        .await
        .unwrap();
    let events: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{json}");
    assert!(events.iter().all(|e| e["subject"] == "SHOWN-1"));
    let settings2 = settings.clone();
    let table = tokio::task::spawn_blocking(move || {
        let output = events_command(&settings2)
            .args(["--type", "created"])
            .output()
            .unwrap();
        String::from_utf8(output.stdout).unwrap()
    })
    .await
    .unwrap();
    assert!(table.starts_with("TIME"), "{table}");
    assert!(
        table.contains("SHOWN-1") && table.contains("HIDDEN-1"),
        "{table}"
    );
    assert_eq!(
        table.lines().count(),
        3,
        "header and two created events: {table}"
    );
}

#[tokio::test]
async fn the_events_command_shows_a_campaigns_own_records_as_the_docs_say() {
    let _serial = NATS.lock().await;
    let store = store().await;
    let settings = settings("clicampaign");
    campaign_records(&store).await;
    sync(&store, "OTHER-1", &owner("o"), 1, terms(1)).await;
    let (stop, task) = start_relay(&store, &settings);
    drained(&store).await;
    stop.cancel();
    task.await.unwrap().unwrap();

    let cli = settings.clone();
    let json = tokio::task::spawn_blocking(move || {
        let output = events_command(&cli)
            .args(["--code", "campaign:audit/camp", "--json", "--tail", "all"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    })
    .await
    .unwrap();
    let events: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(
        events.iter().all(|e| e["subject"] == "CAMPAIGN:AUDIT/CAMP"),
        "{json}"
    );
    for kind in [
        "campaign_generated",
        "campaign_codes_downloaded",
        "campaign_revoked",
    ] {
        assert!(
            kinds.iter().any(|k| k.contains(kind)),
            "{kind} missing: {kinds:?}"
        );
    }
}

#[tokio::test]
async fn an_existing_stream_keeps_its_settings_unless_the_relay_manages_it() {
    let _serial = NATS.lock().await;
    let store = store().await;
    let settings = settings("kept");
    let client = async_nats::connect(&settings.nats_url).await.unwrap();
    let js = jetstream::new(client);
    // The stream's owner keeps history for a year.
    let year = Duration::from_secs(365 * 24 * 3600);
    js.create_stream(jetstream::stream::Config {
        max_age: year,
        ..voucher_operator::relay::stream_config(&settings)
    })
    .await
    .unwrap();
    let max_age = || async {
        js.get_stream(&settings.stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .config
            .max_age
    };

    sync(&store, "KEPT-1", &owner("k"), 1, terms(5)).await;
    let (stop, task) = start_relay(&store, &settings);
    drained(&store).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(max_age().await, year, "never shrunk, so never purged");
    let differences = voucher_operator::relay::stream_differences(
        &js.get_stream(&settings.stream)
            .await
            .unwrap()
            .cached_info()
            .config,
        &voucher_operator::relay::stream_config(&settings),
    );
    assert_eq!(differences.len(), 1, "{differences:?}");
    assert!(differences[0].starts_with("max_age"), "{differences:?}");

    // Told to manage it, the relay brings it to its settings.
    let managed = RelaySettings {
        manage_stream: true,
        ..settings.clone()
    };
    sync(&store, "KEPT-1", &owner("k"), 2, terms(6)).await;
    let (stop, task) = start_relay(&store, &managed);
    drained(&store).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(max_age().await, managed.max_age);
}

#[tokio::test]
async fn an_event_too_large_for_nats_is_shortened_or_dead_lettered_and_blocks_nothing() {
    let _serial = NATS.lock().await;
    let store = store().await;
    let settings = settings("large");
    // A description edited out of band to 200,000 characters: shortened, marked, published.
    sync(
        &store,
        "LARGE-1",
        &owner("l"),
        1,
        Terms {
            description: "d".repeat(200_000),
            ..terms(5)
        },
    )
    .await;
    // A record nothing can shorten enough: moved aside, with why.
    let mut conn = store.pool().acquire().await.unwrap();
    outbox::append(
        &mut conn,
        &outbox::NewAuditRecord::new(
            "HUGE-1",
            voucher_operator::domain::AuditKind::Updated,
            serde_json::json!({"code": "HUGE-1", "blob": "x".repeat(2_000_000)}),
        ),
    )
    .await
    .unwrap();
    drop(conn);
    // And what comes after them still goes out.
    sync(&store, "AFTER-1", &owner("a"), 1, terms(5)).await;

    let (stop, task) = start_relay(&store, &settings);
    drained(&store).await;
    stop.cancel();
    task.await.unwrap().unwrap();

    let messages = stream_messages(&settings).await;
    let codes: Vec<&str> = messages
        .iter()
        .map(|(_, _, e)| e["subject"].as_str().unwrap())
        .collect();
    assert_eq!(
        codes,
        ["LARGE-1", "AFTER-1"],
        "in order, the dead letter left out"
    );
    let large = &messages[0].2;
    assert_eq!(large["data"]["truncated"], true);
    let description = large["data"]["after"]["terms"]["description"]
        .as_str()
        .unwrap();
    assert!(
        description.ends_with("[truncated from 200000 characters]"),
        "{}",
        &description[description.len() - 60..]
    );
    assert!(large.to_string().len() <= 64 * 1024);
    let (code, error): (String, String) =
        sqlx::query_as("SELECT code, error FROM voucher_audit_dead_letters")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(code, "HUGE-1");
    assert!(
        error.contains("even with its free text shortened"),
        "{error}"
    );
}

#[tokio::test]
async fn the_relay_authenticates_to_nats_as_configured() {
    let store = store().await;
    let nats = support::nats_with_password("relay", "relay-secret");
    let settings = RelaySettings {
        nats_url: nats.url.clone(),
        nats_auth: relay::NatsAuth {
            user: Some("relay".into()),
            password: Some("relay-secret".into()),
            ..Default::default()
        },
        ..settings("auth")
    };
    sync(&store, "AUTH-1", &owner("a"), 1, terms(5)).await;
    let (stop, task) = start_relay(&store, &settings);
    drained(&store).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let client = relay::connect_options(&settings.nats_auth)
        .await
        .unwrap()
        .connect(nats.url.as_str())
        .await
        .unwrap();
    let mut stream = jetstream::new(client)
        .get_stream(&settings.stream)
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    // Without the password, the server says no.
    let refused = async_nats::ConnectOptions::new()
        .connect(nats.url.as_str())
        .await;
    assert!(refused.is_err(), "an anonymous client was admitted");
}

/// Caps the messages of `settings`' stream at `bytes`, creating it when missing.
async fn cap_messages(settings: &RelaySettings, bytes: i32) {
    let client = async_nats::connect(&settings.nats_url).await.unwrap();
    jetstream::new(client)
        .create_or_update_stream(jetstream::stream::Config {
            max_message_size: bytes,
            ..voucher_operator::relay::stream_config(settings)
        })
        .await
        .unwrap();
}

/// Terms whose audit event is larger than 4 KiB (and smaller than the relay's own limit).
fn wordy_terms() -> Terms {
    Terms {
        description: "w".repeat(6000),
        ..terms(5)
    }
}

#[tokio::test]
async fn an_event_the_stream_refuses_is_set_aside_and_the_rest_keep_their_order() {
    let _serial = NATS.lock().await;
    let store = store().await;
    let settings = settings("refused");
    sync(&store, "ORDER-1", &owner("o"), 1, terms(5)).await;
    let (stop, task) = start_relay(&store, &settings);
    drained(&store).await;
    // While the relay runs, the stream's owner caps its messages at 4 KiB: a larger event is
    // refused by the stream itself, for good.
    cap_messages(&settings, 4096).await;
    let wordy = wordy_terms();
    sync(&store, "WORDY-1", &owner("w"), 1, wordy).await;
    sync(&store, "ORDER-1", &owner("o"), 2, terms(7)).await;
    drained(&store).await;
    stop.cancel();
    task.await.unwrap().unwrap();

    let messages = stream_messages(&settings).await;
    let credits: Vec<i64> = messages
        .iter()
        .map(|(_, _, e)| e["data"]["after"]["terms"]["credit_omr"].as_i64().unwrap())
        .collect();
    assert_eq!(
        credits,
        [5, 7],
        "the refused one left out, the others in order"
    );
    let error: String = sqlx::query_scalar("SELECT error FROM voucher_audit_dead_letters")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(error.contains("maximum"), "{error}");
}

#[tokio::test]
async fn events_are_shortened_to_the_streams_own_limit() {
    let _serial = NATS.lock().await;
    let store = store().await;
    let settings = settings("capped");
    cap_messages(&settings, 4096).await;
    let wordy = wordy_terms();
    sync(&store, "WORDY-2", &owner("w"), 1, wordy).await;
    let (stop, task) = start_relay(&store, &settings);
    drained(&store).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let messages = stream_messages(&settings).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].2["data"]["truncated"], true);
}

/// Whether the stream holds a message on `subject`.
async fn has_subject(settings: &RelaySettings, subject: &str) -> bool {
    stream_messages(settings)
        .await
        .iter()
        .any(|(s, _, _)| s == subject)
}

#[tokio::test]
async fn a_code_whose_event_is_refused_sends_nothing_after_it_until_it_lands() {
    let _serial = NATS.lock().await;
    let store = store().await;
    // Batches of two: HOLD-1's waiting events fill a whole batch, and must not hold back the
    // other codes' behind them.
    let settings = RelaySettings {
        batch_size: 2,
        ..settings("percode")
    };
    let client = async_nats::connect(&settings.nats_url).await.unwrap();
    let js = jetstream::new(client);
    // One message a subject, new ones refused: the stream refuses HOLD-1's `created` event
    // while a message fills its subject (a transient refusal: it is retried, never set aside).
    let limited = jetstream::stream::Config {
        max_messages_per_subject: 1,
        discard: jetstream::stream::DiscardPolicy::New,
        discard_new_per_subject: true,
        ..relay::stream_config(&settings)
    };
    js.create_or_update_stream(limited.clone()).await.unwrap();
    let held = relay::subject(&settings.subject_prefix, "HOLD-1", "created");
    js.publish(held.clone(), r#"{"fills": "the subject"}"#.into())
        .await
        .unwrap()
        .await
        .unwrap();
    sync(&store, "HOLD-1", &owner("h"), 1, terms(1)).await;
    sync(&store, "HOLD-1", &owner("h"), 2, terms(2)).await;
    sync(&store, "HOLD-1", &owner("h"), 3, terms(3)).await;
    sync(&store, "OTHER-1", &owner("o"), 1, terms(1)).await;
    sync(&store, "OTHER-2", &owner("p"), 1, terms(1)).await;
    let (stop, task) = start_relay(&store, &settings);

    // The other codes' events go on, also those after HOLD-1's later one; that one waits for
    // its refused one, so it never lands ahead of it.
    for code in ["OTHER-1", "OTHER-2"] {
        let other = relay::subject(&settings.subject_prefix, code, "created");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !has_subject(&settings, &other).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{code} never arrived"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = relay::subject(&settings.subject_prefix, "HOLD-1", "updated");
    assert!(
        !has_subject(&settings, &later).await,
        "HOLD-1's update landed before its creation"
    );
    assert_eq!(
        unpublished(&store).await,
        3,
        "HOLD-1's three events wait, the others are done"
    );

    // The stream's owner lifts the limit: both arrive, in order.
    js.update_stream(jetstream::stream::Config {
        max_messages_per_subject: -1,
        discard_new_per_subject: false,
        discard: jetstream::stream::DiscardPolicy::Old,
        ..limited
    })
    .await
    .unwrap();
    drained(&store).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    // The relay's messages (the filler has no Nats-Msg-Id).
    let subjects: Vec<String> = stream_messages(&settings)
        .await
        .into_iter()
        .filter(|(s, id, _)| s.contains("HOLD-1") && !id.is_empty())
        .map(|(s, _, _)| s)
        .collect();
    assert_eq!(subjects, [held, later.clone(), later]);
}

#[tokio::test]
async fn events_piped_into_a_reader_that_goes_away_stops_quietly() {
    let _serial = NATS.lock().await;
    let store = store().await;
    let settings = settings("pipe");
    // More than a pipe holds (64 KiB), so that the reader's going is felt.
    for generation in 1..=300 {
        sync(
            &store,
            "PIPED-1",
            &owner("p"),
            generation,
            terms(generation as i32),
        )
        .await;
    }
    let (stop, task) = start_relay(&store, &settings);
    drained(&store).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let output = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut child = events_command(&settings)
            .args(["--json", "--tail", "all"])
            .env("RUST_BACKTRACE", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // `| head -1`
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        assert!(lines.next().unwrap().unwrap().starts_with('{'));
        drop(lines);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn events_refuses_a_bad_code_before_connecting_or_printing() {
    // No NATS at this address: the code is checked first.
    let output = tokio::task::spawn_blocking(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
            .args([
                "events",
                "--nats-url",
                "nats://127.0.0.1:1",
                "--code",
                "bad code",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    assert!(output.stdout.is_empty(), "nothing printed before the error");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--code") && !stderr.contains("JetStream"),
        "{stderr}"
    );
}
