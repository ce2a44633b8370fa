//! `voucher-operator migrate` against a real Postgres: on an empty database,
//! and on a database the billing service already created and filled, twice
//! each, leaving every pre-existing row and column exactly as it was.

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Output};

use serde_json::Value;
use sqlx::PgPool;

fn migrate(database_url: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
        .arg("migrate")
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run voucher-operator migrate")
}

#[track_caller]
fn assert_migrated(output: &Output) {
    assert!(
        output.status.success(),
        "migrate failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The billing service's schema exactly as that service defines it (the README's "The billing
/// database" names the tables), written the way that service writes it (not with the
/// operator's migration).
const BILLING_SCHEMA: &str = r#"
CREATE TABLE customers (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), user_id TEXT UNIQUE NOT NULL,
  tenant_id TEXT NOT NULL, stripe_customer_id TEXT UNIQUE, email TEXT NOT NULL,
  created_at TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE TABLE promo_codes (code TEXT PRIMARY KEY, credit_omr INT NOT NULL, description TEXT NOT NULL DEFAULT '',
  active BOOLEAN NOT NULL DEFAULT true, max_redemptions INT NOT NULL DEFAULT 0,
  times_redeemed INT NOT NULL DEFAULT 0, created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  deleted_at TIMESTAMPTZ NULL);
CREATE TABLE promo_redemptions (customer_id UUID NOT NULL REFERENCES customers(id),
  code TEXT NOT NULL REFERENCES promo_codes(code), created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (customer_id, code));
CREATE TABLE credit_ledger (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), customer_id UUID NOT NULL REFERENCES customers(id),
  amount_omr INT NOT NULL, reason TEXT NOT NULL, order_id TEXT, created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  status TEXT NOT NULL DEFAULT 'active');
CREATE TABLE orders (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), customer_id UUID NOT NULL REFERENCES customers(id),
  total_omr INT NOT NULL, promo_code TEXT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now());
-- The billing service's own sqlx bookkeeping must not confuse the operator's.
CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL,
  installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), success BOOLEAN NOT NULL,
  checksum BYTEA NOT NULL, execution_time BIGINT NOT NULL);
INSERT INTO _sqlx_migrations VALUES (20240101000000, 'billing init', now(), true, '\x00', 1);

INSERT INTO customers (id, user_id, tenant_id, stripe_customer_id, email, created_at) VALUES
  ('11111111-1111-1111-1111-111111111111', 'user-a', 'tenant-1', 'cus_A', 'a@example.om', '2025-01-01T10:00:00Z'),
  ('22222222-2222-2222-2222-222222222222', 'user-b', 'tenant-2', NULL, 'b@example.om', '2025-02-01T10:00:00Z');
INSERT INTO promo_codes (code, credit_omr, description, active, max_redemptions, times_redeemed, created_at, deleted_at) VALUES
  ('OMANTEL-MUSCAT-200', 200, 'launch', true, 200, 2, '2025-03-01T00:00:00Z', NULL),
  ('OLD-PROMO', 5, '', false, 0, 1, '2024-06-01T00:00:00Z', '2025-01-15T00:00:00Z'),
  ('UNLIMITED', 10, 'always', true, 0, 0, '2025-04-01T00:00:00Z', NULL);
INSERT INTO promo_redemptions (customer_id, code, created_at) VALUES
  ('11111111-1111-1111-1111-111111111111', 'OMANTEL-MUSCAT-200', '2025-03-02T00:00:00Z'),
  ('22222222-2222-2222-2222-222222222222', 'OMANTEL-MUSCAT-200', '2025-03-03T00:00:00Z'),
  ('11111111-1111-1111-1111-111111111111', 'OLD-PROMO', '2024-07-01T00:00:00Z');
INSERT INTO credit_ledger (customer_id, amount_omr, reason, order_id, created_at, status) VALUES
  ('11111111-1111-1111-1111-111111111111', 200, 'promo:OMANTEL-MUSCAT-200', NULL, '2025-03-02T00:00:00Z', 'active'),
  ('22222222-2222-2222-2222-222222222222', 200, 'promo:OMANTEL-MUSCAT-200', NULL, '2025-03-03T00:00:00Z', 'active'),
  ('11111111-1111-1111-1111-111111111111', 5, 'promo:OLD-PROMO', NULL, '2024-07-01T00:00:00Z', 'active'),
  ('11111111-1111-1111-1111-111111111111', -150, 'order', 'ord-1', '2025-03-05T00:00:00Z', 'active');
INSERT INTO orders (customer_id, total_omr, promo_code) VALUES
  ('11111111-1111-1111-1111-111111111111', 150, 'OMANTEL-MUSCAT-200');
"#;

const BILLING_TABLES: [&str; 6] = [
    "customers",
    "promo_codes",
    "promo_redemptions",
    "credit_ledger",
    "orders",
    "_sqlx_migrations",
];

/// Every column of `table`: name → (type, nullable, default).
async fn columns(pool: &PgPool, table: &str) -> BTreeMap<String, (String, String, Option<String>)> {
    let rows: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text, is_nullable::text, column_default::text \
         FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(name, ty, nullable, default)| (name, (ty, nullable, default)))
        .collect()
}

/// Every constraint of `table` (primary keys, uniques, foreign keys).
async fn constraints(pool: &PgPool, table: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint \
         WHERE conrelid = $1::regclass ORDER BY conname",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Every row of `table` as JSON, limited to `keep` columns, in a stable order.
async fn rows(pool: &PgPool, table: &str, keep: &[String]) -> Vec<Value> {
    let sql = format!("SELECT to_jsonb(t) FROM {table} t");
    let mut rows: Vec<Value> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await
        .unwrap();
    for row in &mut rows {
        row.as_object_mut().unwrap().retain(|k, _| keep.contains(k));
    }
    rows.sort_by_key(|r| r.to_string());
    rows
}

#[tokio::test]
async fn migrate_on_an_empty_database_twice() {
    let url = support::fresh_database("empty").await;
    assert_migrated(&migrate(&url));
    let second = migrate(&url);
    assert_migrated(&second);
    assert!(
        String::from_utf8_lossy(&second.stdout).contains("0 migration(s) applied now"),
        "the second run must apply nothing: {}",
        String::from_utf8_lossy(&second.stdout)
    );

    let pool = support::pool(&url).await;
    for table in [
        "customers",
        "promo_codes",
        "promo_redemptions",
        "credit_ledger",
        "voucher_bindings",
        "voucher_audit_outbox",
        "voucher_idempotency_keys",
        "voucher_orphan_releases",
    ] {
        assert!(
            !columns(&pool, table).await.is_empty(),
            "{table} was not created"
        );
    }
    let promo = columns(&pool, "promo_codes").await;
    assert!(promo.contains_key("valid_from") && promo.contains_key("expires_at"));
}

#[tokio::test]
async fn migrate_keeps_a_billing_service_database_intact() {
    let url = support::fresh_database("billing").await;
    let pool = support::pool(&url).await;
    sqlx::raw_sql(BILLING_SCHEMA).execute(&pool).await.unwrap();

    let mut before = Vec::new();
    for table in BILLING_TABLES {
        let cols = columns(&pool, table).await;
        let names: Vec<String> = cols.keys().cloned().collect();
        let data = rows(&pool, table, &names).await;
        assert!(!data.is_empty(), "fixture table {table} is empty");
        before.push((table, cols, constraints(&pool, table).await, names, data));
    }

    assert_migrated(&migrate(&url));
    assert_migrated(&migrate(&url));

    for (table, cols, cons, names, data) in before {
        let after_cols = columns(&pool, table).await;
        for (name, definition) in &cols {
            assert_eq!(
                after_cols.get(name),
                Some(definition),
                "{table}.{name} was dropped or changed"
            );
        }
        let after_cons = constraints(&pool, table).await;
        for constraint in &cons {
            assert!(
                after_cons.contains(constraint),
                "{table}: {constraint} is gone"
            );
        }
        assert_eq!(
            rows(&pool, table, &names).await,
            data,
            "rows of {table} changed"
        );
    }

    // The only additions to the billing tables are the two window columns.
    let added: Vec<String> = columns(&pool, "promo_codes")
        .await
        .into_keys()
        .filter(|c| {
            ![
                "code",
                "credit_omr",
                "description",
                "active",
                "max_redemptions",
                "times_redeemed",
                "created_at",
                "deleted_at",
            ]
            .contains(&c.as_str())
        })
        .collect();
    assert_eq!(
        added,
        ["discount", "expires_at", "global_allotment", "valid_from"]
    );
}

#[test]
fn migrate_reports_an_unreachable_database_clearly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
        .args(["migrate", "--database-connect-timeout", "2s"])
        .env(
            "DATABASE_URL",
            format!("postgres://billing:s3cret@127.0.0.1:{port}/billing"),
        )
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot connect to the database at 127.0.0.1:"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "the password leaked: {stderr}");
}

#[test]
fn migrate_without_a_database_url_says_what_is_missing() {
    let output = Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
        .arg("migrate")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--database-url"), "{stderr}");
}

/// The runtime's least privilege, as the README gives it: with exactly these grants a role
/// runs every query of the controller, the relay and the server, and can change no schema.
#[tokio::test]
async fn the_runtime_works_with_exactly_the_documented_grants() {
    use chrono::Utc;
    use voucher_operator::domain::{Actor, AuditKind, Code, DeletionPolicy, Owner, Request, Terms};
    use voucher_operator::store::campaigns::{Batch, Chunk, Release, TermsPass};
    use voucher_operator::store::redeem::Redemption;
    use voucher_operator::store::sync::{Released, Synced, Wanted};
    use voucher_operator::store::{DatabaseSettings, Store, outbox};

    let grants = include_str!("../src/store/runtime-grants.sql");
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/deploy.md")).unwrap();
    assert!(
        readme.contains(grants.trim()),
        "docs/deploy.md gives the grants as committed"
    );

    let url = support::fresh_database("grants");
    let url = url.await;
    assert_migrated(&migrate(&url));
    let owner = support::pool(&url).await;
    let role = format!("runtime_{}", std::process::id());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN; {}",
        grants.replace("voucher_runtime", &role)
    )))
    .execute(&owner)
    .await
    .unwrap();
    let runtime_url = url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let store = Store::connect(&DatabaseSettings {
        url: runtime_url,
        max_connections: 4,
        ..Default::default()
    })
    .await
    .unwrap();

    // The server's readiness: the schema is current.
    assert_eq!(
        store.missing_migrations().await.unwrap(),
        Vec::<String>::new()
    );

    // The controller: create, change, conflict, release; the sweep's and the admin's queries.
    let code = Code::parse("GRANTED-1").unwrap();
    let me = Owner {
        namespace: "billing".into(),
        name: "granted-1".into(),
        uid: "uid-1".into(),
    };
    let terms = Terms::granting(5);
    let wanted = |generation, terms| Wanted {
        code: &code,
        owner: &me,
        generation,
        terms,
        request: Request::default(),
        deletion_policy: DeletionPolicy::Revoke,
        suspended: false,
        now: Utc::now(),
        global: None,
    };
    assert!(matches!(
        store.sync_voucher(&wanted(1, &terms)).await.unwrap(),
        Synced::Applied { .. }
    ));
    let more = Terms::granting(6);
    store.sync_voucher(&wanted(2, &more)).await.unwrap();
    let other = Owner {
        uid: "uid-2".into(),
        ..me.clone()
    };
    store.audit_conflict(&code, &other, &me).await.unwrap();
    assert_eq!(store.owner_of(&code).await.unwrap(), Some(me.clone()));
    assert_eq!(store.bindings(None).await.unwrap().len(), 1);
    assert_eq!(store.list_live().await.unwrap().len(), 1);
    assert_eq!(store.export_rows(true).await.unwrap().len(), 1);

    // The server: a redemption (new customer, ledger), its replay, a repeat, the pruning.
    let redeem = |key: Option<(&'static str, Vec<u8>)>| Redemption {
        code: code.clone(),
        subject: "alice".into(),
        tenant: Some("t1".into()),
        email: "alice@example.om".into(),
        idempotency: key.map(|(key, hash)| (key.to_owned(), hash)),
        now: Utc::now(),
        currency: Default::default(),
        intent: None,
    };
    store.redeem(&redeem(Some(("k1", vec![1])))).await.unwrap();
    store.redeem(&redeem(Some(("k1", vec![1])))).await.unwrap();
    store.redeem(&redeem(None)).await.unwrap();
    store
        .prune_idempotency_keys(std::time::Duration::ZERO)
        .await
        .unwrap();

    // A discount code redeemed; the checkout's quote, commit and reversal; both kinds of
    // redemption reversed; the finance report.
    let discounted = Code::parse("GRANTED-D").unwrap();
    let discount = Terms {
        credit_omr: 0,
        discount: Some(voucher_operator::domain::Discount {
            off: voucher_operator::domain::Off::PercentOff(10),
            applies_to: Vec::new(),
            duration_months: None,
        }),
        ..Terms::granting(1)
    };
    let d_owner = Owner {
        name: "granted-d".into(),
        uid: "uid-d".into(),
        ..me.clone()
    };
    store
        .sync_voucher(&Wanted {
            code: &discounted,
            owner: &d_owner,
            ..wanted(1, &discount)
        })
        .await
        .unwrap();
    store
        .redeem(&Redemption {
            code: discounted.clone(),
            ..redeem(None)
        })
        .await
        .unwrap();
    let lines = [voucher_operator::domain::checkout::Line {
        id: "1".into(),
        category: "install".into(),
        amount: 1000,
    }];
    let service = Actor::Subject {
        subject: "billing-service".into(),
    };
    let currency = voucher_operator::domain::Currency::default();
    let quote = store.quote("alice", &lines, Utc::now()).await.unwrap();
    assert_eq!(quote.discount, 100);
    let order = voucher_operator::store::checkout::Order {
        user_id: "alice",
        order_id: "O-1",
        lines: &lines,
        actor: &service,
        currency: &currency,
        now: Utc::now(),
    };
    store.commit(&order).await.unwrap();
    store
        .reverse_order(("alice", "O-1"), "refunded", &service, &currency)
        .await
        .unwrap();
    for reversed in [&discounted, &code] {
        let outcome = store
            .reverse_redemption(reversed, "alice", "a test", &service)
            .await
            .unwrap();
        assert!(
            matches!(
                outcome,
                voucher_operator::store::reversal::RedemptionReversal::Reversed(_)
            ),
            "{reversed}: {outcome:?}"
        );
    }
    let day = chrono::Duration::days(1);
    store
        .report((Utc::now() - day, Utc::now() + day), None)
        .await
        .unwrap();

    // The relay: read, publish, dead-letter, prune.
    let mut conn = store.pool().acquire().await.unwrap();
    let pending = outbox::pending(&mut conn, 100).await.unwrap();
    assert!(pending.len() >= 4, "{pending:?}");
    outbox::dead_letter(&mut conn, pending[0].seq, "a test")
        .await
        .unwrap();
    let seqs: Vec<i64> = pending[1..].iter().map(|r| r.seq).collect();
    outbox::mark_published(&mut conn, &seqs).await.unwrap();
    outbox::prune(&mut conn, std::time::Duration::ZERO)
        .await
        .unwrap();
    outbox::backlog(&mut conn).await.unwrap();
    let actor = Actor::Subject {
        subject: "root".into(),
    };
    let data = voucher_operator::domain::AuditData::of(
        AuditKind::Revoked,
        &voucher_operator::domain::Facts::new("GRANTED-1", &actor),
        None,
        None,
    );
    outbox::append_audit(&mut conn, AuditKind::Revoked, &data)
        .await
        .unwrap();
    drop(conn);

    // Deletion and the admin revoke.
    let revoked = store.release_voucher(&code, &me, None).await.unwrap();
    let Released::Revoked(Some(tomb)) = revoked else {
        panic!("revoked: {revoked:?}")
    };
    store
        .sync_voucher(&Wanted {
            request: Request {
                adopt: false,
                reissue: tomb.deleted_at,
            },
            // Released below with the Orphan it chose: kept for export, then revoked.
            deletion_policy: DeletionPolicy::Orphan,
            ..wanted(3, &more)
        })
        .await
        .unwrap();
    let orphaned = store.release_vanished(&code, &me).await.unwrap();
    assert!(
        matches!(orphaned, Released::Orphaned(Some(_))),
        "{orphaned:?}"
    );
    store.revoke(&code, "root").await.unwrap();

    // A campaign: generated, its terms changed, counted, downloaded, redeemed, released.
    let campaign = Owner {
        namespace: "billing".into(),
        name: "bill".into(),
        uid: "uid-c".into(),
    };
    let generator = voucher_operator::domain::campaign::Generator::new(
        &[7; 32], "billing", "bill", "GRANT-", 10,
    )
    .unwrap();
    let codes: Vec<Code> = (0..3).map(|i| generator.code(i)).collect();
    let progress = store
        .register_campaign(&campaign, DeletionPolicy::Revoke)
        .await
        .unwrap();
    assert_eq!(progress.generated, 0);
    let batch = Batch {
        from: 0,
        codes: &codes,
        terms: &terms,
        of: 3,
        generation: 0,
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
        before: Some(&terms),
        codes: 3,
    };
    store
        .apply_campaign_terms(&campaign, (0, 3), &more, 2, &change)
        .await
        .unwrap();
    assert_eq!(store.campaign_counts(&campaign).await.unwrap().codes, 3);
    let found = store
        .find_campaign("billing", "bill")
        .await
        .unwrap()
        .unwrap();
    let range = voucher_operator::domain::campaign::CodeRange::new(0, 3);
    store
        .audit_campaign_download(&found.owner, "root", range)
        .await
        .unwrap();
    let pages: Vec<_> =
        futures::StreamExt::collect::<Vec<_>>(store.campaign_codes(&campaign, range)).await;
    assert_eq!(pages.len(), 1);
    assert_eq!(
        store.campaign_holds(&campaign, &codes).await.unwrap(),
        [true; 3]
    );
    assert_eq!(
        store.campaign_of(&codes[0]).await.unwrap(),
        Some(campaign.clone())
    );
    store
        .redeem(&Redemption {
            code: codes[0].clone(),
            ..redeem(None)
        })
        .await
        .unwrap();
    while store.release_campaign(&campaign, None).await.unwrap() == Release::More {}

    // A Sovereign's leader: a global code registered, its database's identity, its allotment kept.
    let global = Code::parse("GRANTED-G").unwrap();
    sqlx::query("INSERT INTO promo_codes (code, credit_omr, description) VALUES ($1, 5, 'g')")
        .bind(global.as_str())
        .execute(&owner)
        .await
        .unwrap();
    store.register_global(&global, "hub-uid").await.unwrap();
    let identity = store.database_identity().await.unwrap();
    let mut tx = store.pool().begin().await.unwrap();
    let local = voucher_operator::store::allotments::lock(&mut tx, &global)
        .await
        .unwrap()
        .unwrap()
        .local;
    voucher_operator::store::allotments::save(&mut tx, &global, &local, &identity)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // And nothing of the schema.
    let refused = sqlx::query("ALTER TABLE promo_codes ADD COLUMN evil TEXT")
        .execute(store.pool())
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("must be owner"), "{refused}");
    assert!(
        store.migrate().await.is_err(),
        "migrate needs the owner's credentials"
    );
}

/// A customer's balance must not read the whole ledger: the index is there, the planner uses it
/// on a ledger of size, and a build that was interrupted (an invalid index) is done again.
#[tokio::test]
async fn the_ledger_is_indexed_by_customer_and_an_interrupted_build_is_redone() {
    let url = support::fresh_database("ledger_index").await;
    assert_migrated(&migrate(&url));
    let pool = support::pool(&url).await;
    let valid = || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT indisvalid FROM pg_index \
             WHERE indexrelid = to_regclass('voucher_operator_credit_ledger_customer')",
        )
        .fetch_optional(&pool)
        .await
        .unwrap()
    };
    assert_eq!(valid().await, Some(true));

    sqlx::raw_sql(
        "INSERT INTO customers (user_id, tenant_id, email) \
           SELECT 'user-' || i, 't', '' FROM generate_series(1, 2000) i; \
         INSERT INTO credit_ledger (customer_id, amount_omr, reason) \
           SELECT c.id, 1, 'seed' FROM customers c, generate_series(1, 100); \
         ANALYZE credit_ledger;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT COALESCE(SUM(amount_omr), 0) FROM credit_ledger \
         WHERE customer_id = (SELECT id FROM customers LIMIT 1) AND status = 'active'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("voucher_operator_credit_ledger_customer"),
        "a balance reads the ledger by the index:\n{plan}"
    );

    // As if a build had been interrupted: the next migrate builds it again.
    sqlx::query(
        "UPDATE pg_index SET indisvalid = false \
         WHERE indexrelid = to_regclass('voucher_operator_credit_ledger_customer')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let again = migrate(&url);
    assert_migrated(&again);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("1 migration(s) applied now"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    assert_eq!(valid().await, Some(true));
}

#[test]
fn a_database_url_of_another_database_is_refused_without_repeating_it() {
    let output = Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
        .args([
            "migrate",
            "--database-url",
            "mysql://root:s3cret@127.0.0.1/billing",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not a mysql:// URL"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "the password leaked: {stderr}");
}
