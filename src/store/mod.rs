//! The billing database (Postgres, sqlx): migrations and typed queries.
//!
//! Each table's SQL lives in one module. Queries take a `&mut PgConnection` so
//! the caller decides the transaction: a change and its audit record always
//! commit together.

pub mod allotments;
pub mod bindings;
pub mod campaigns;
pub mod checkout;
pub mod claims;
mod customers;
pub mod discounts;
mod idempotency;
mod ledger;
pub(crate) mod notify;
pub mod outbox;
pub mod promo_codes;
pub mod redeem;
mod redemptions;
pub mod report;
pub mod reversal;
pub mod suspensions;
pub mod sync;

use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::domain::{Code, CodeRecord, Owner};

/// The operator records its migrations in a table of its own, so they never
/// mix with a `_sqlx_migrations` table the billing service may keep.
pub(crate) const MIGRATIONS_TABLE: &str = "voucher_operator_migrations";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to the database at {target}")]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot connect to the database at {target}: no answer within {after:?}")]
    ConnectTimeout { target: String, after: Duration },
    /// The URL names another database than Postgres (never repeated: it holds a password).
    #[error("a Postgres URL is needed (postgres://user:password@host:5432/database), not {}", if .scheme.is_empty() { "this one".to_owned() } else { format!("a {}:// URL", .scheme) })]
    NotPostgres { scheme: String },
    #[error("database migration failed")]
    Migrate(#[from] MigrateError),
    #[error("database query failed")]
    Query(#[from] sqlx::Error),
    #[error("the binding of code {code} is held by another resource")]
    BindingTaken { code: String },
    /// Too many redemptions of one code wait in this server: retry.
    #[error("{waiting} redemptions of this code are waiting already; try again shortly")]
    Busy { waiting: usize },
    /// A group of redemptions was sent to commit and no answer came back:
    /// each was committed with all the others, or none was.
    #[error("the outcome of the commit is unknown: {cause}")]
    CommitOutcomeUnknown { cause: String },
    /// A redemption found the code's terms changed under it on every attempt.
    #[error("the code's terms changed during each of {attempts} attempts")]
    Contended { attempts: usize },
    /// A once-per-customer-anywhere redemption found its intent aborted by
    /// recovery (it took too long): nothing granted; try again.
    #[error("the redemption's intent was aborted by recovery before it could hold the hub's claim")]
    ClaimWithdrawn,
    /// Another replica applied a newer spec of the resource meanwhile.
    #[error(
        "the resource's generation {stored} was applied already (by another replica); this one ({mine}) is older and was not"
    )]
    Superseded { stored: i64, mine: i64 },
    /// What the store was doing, and to which code, when a step failed.
    #[error("cannot {operation}{}", .code.as_ref().map_or(String::new(), |c| format!(" code {c}")))]
    Failed {
        operation: Operation,
        code: Option<String>,
        #[source]
        source: Box<StoreError>,
    },
}

/// An operation of the store, as its errors name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Sync,
    AuditConflict,
    ReleaseStaleBinding,
    Release,
    Redeem,
    Find,
    List,
    FindOwner,
    Export,
    Revoke,
    Sweep,
    PruneIdempotencyKeys,
    Campaign,
    Generate,
    Suspend,
    Checkout,
    ReverseRedemption,
    Report,
    Allotment,
    Claim,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sync => "sync",
            Self::AuditConflict => "audit the conflict over",
            Self::ReleaseStaleBinding => "release the stale binding of",
            Self::Release => "release",
            Self::Redeem => "redeem",
            Self::Find => "look up",
            Self::List => "list codes",
            Self::FindOwner => "find the owner of",
            Self::Export => "export codes",
            Self::Revoke => "revoke",
            Self::Sweep => "sweep the bindings",
            Self::PruneIdempotencyKeys => "prune old Idempotency-Keys",
            Self::Campaign => "update the campaign's codes",
            Self::Generate => "generate the campaign's codes",
            Self::Suspend => "suspend or resume",
            Self::Checkout => "price or record the order",
            Self::ReverseRedemption => "reverse the redemption of",
            Self::Report => "read the finance report",
            Self::Allotment => "keep the global allotment of",
            Self::Claim => "keep the once-per-customer-anywhere intent of",
        })
    }
}

impl StoreError {
    /// This error, said as a failure of `operation` on `code`.
    pub(crate) fn during(self, operation: Operation, code: Option<&Code>) -> Self {
        Self::Failed {
            operation,
            code: code.map(Code::to_string),
            source: Box::new(self),
        }
    }

    /// Whether the database's guard refused the statement (a redemption
    /// outside its window, of a switched-off campaign, of a suspended code:
    /// `promo_redemptions`' trigger, SQLSTATE [`GUARD_SQLSTATE`]).
    pub(crate) fn refused_by_guard(&self) -> bool {
        match self {
            Self::Query(sqlx::Error::Database(error)) => {
                error.code().as_deref() == Some(GUARD_SQLSTATE)
            }
            Self::Failed { source, .. } => source.refused_by_guard(),
            _ => false,
        }
    }

    /// Whether a newer generation of the resource was applied already: the
    /// older copy at hand has nothing to do.
    pub fn is_superseded(&self) -> bool {
        match self {
            Self::Superseded { .. } => true,
            Self::Failed { source, .. } => source.is_superseded(),
            _ => false,
        }
    }

    /// This error without the code it names: for a log of the public
    /// surfaces, where the code is the caller's input — a campaign's code not
    /// yet redeemed, perhaps, which must never reach a log.
    pub(crate) fn without_code(self) -> Self {
        match self {
            Self::Failed {
                operation, source, ..
            } => Self::Failed {
                operation,
                code: None,
                source,
            },
            other => other,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The SQLSTATE of the guard's refusals (migration `…_guard.sql`).
pub(crate) const GUARD_SQLSTATE: &str = "VG001";

/// How to reach the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseSettings {
    pub url: String,
    pub max_connections: u32,
    pub connect_timeout: Duration,
}

impl Default for DatabaseSettings {
    /// The flags' defaults, with an empty `url`, which every user of it sets.
    fn default() -> Self {
        Self {
            url: String::new(),
            max_connections: 10,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A pool of connections to the billing database.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
}

/// What `migrate` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationReport {
    pub applied: Vec<String>,
    pub(crate) already_applied: usize,
}

impl Store {
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self> {
        // sqlx takes any URL for Postgres (mysql://… would be tried on 5432).
        let scheme = settings.url.split_once("://").map(|(scheme, _)| scheme);
        if !matches!(scheme, Some("postgres" | "postgresql")) {
            return Err(StoreError::NotPostgres {
                scheme: scheme.unwrap_or("").to_owned(),
            });
        }
        let options: PgConnectOptions =
            settings
                .url
                .parse()
                .map_err(|source: sqlx::Error| StoreError::Connect {
                    target: redact(&settings.url),
                    source,
                })?;
        let target = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("")
        );
        // One direct connection first: a pool only reports "timed out", while
        // this names the cause (refused, unknown host, bad password...).
        let probe = tokio::time::timeout(
            settings.connect_timeout,
            PgConnection::connect_with(&options),
        )
        .await
        .map_err(|_| StoreError::ConnectTimeout {
            target: target.clone(),
            after: settings.connect_timeout,
        })?
        .map_err(|source| StoreError::Connect {
            target: target.clone(),
            source,
        })?;
        probe.close().await.ok();
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.connect_timeout)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Connect { target, source })?;
        Ok(Self { pool })
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The live row of `code`, if any.
    pub async fn find_live(&self, code: &Code) -> Result<Option<CodeRecord>> {
        Ok(self.find(code).await?.filter(|r| !r.is_tombstoned()))
    }

    /// The row of `code`, revoked or not.
    pub async fn find(&self, code: &Code) -> Result<Option<CodeRecord>> {
        let find = async {
            let mut conn = self.pool.acquire().await?;
            promo_codes::find(&mut conn, code).await
        };
        find.await
            .map_err(|e: StoreError| e.during(Operation::Find, Some(code)))
    }

    /// Forgets `Idempotency-Key` answers older than `retention`.
    pub async fn prune_idempotency_keys(&self, retention: Duration) -> Result<u64> {
        let prune = async {
            let mut conn = self.pool.acquire().await?;
            idempotency::prune(&mut conn, retention).await
        };
        prune
            .await
            .map_err(|e: StoreError| e.during(Operation::PruneIdempotencyKeys, None))
    }

    /// Every live row, by code, but campaign codes.
    pub async fn list_live(&self) -> Result<Vec<CodeRecord>> {
        let list = async {
            let mut conn = self.pool.acquire().await?;
            promo_codes::list_live(&mut conn).await
        };
        list.await
            .map_err(|e: StoreError| e.during(Operation::List, None))
    }

    /// Every row to export as a Voucher manifest, campaign codes aside (live ones, and with
    /// `include_deleted` the soft-deleted ones too).
    pub async fn export_rows(&self, include_deleted: bool) -> Result<Vec<CodeRecord>> {
        let export = async {
            let mut conn = self.pool.acquire().await?;
            promo_codes::export_rows(&mut conn, include_deleted).await
        };
        export
            .await
            .map_err(|e: StoreError| e.during(Operation::Export, None))
    }

    /// What export must know of every code: its binding, or the Voucher that let it go with
    /// Orphan. Nothing on a billing database the operator never migrated (export only reads,
    /// and works there too), no Orphan releases on one migrated before they were kept.
    pub(crate) async fn export_owners(&self) -> Result<ExportOwners> {
        let owners = async {
            let mut conn = self.pool.acquire().await?;
            let (bindings, orphans): (bool, bool) = sqlx::query_as(
                "SELECT to_regclass('voucher_bindings') IS NOT NULL, \
                 to_regclass('voucher_orphan_releases') IS NOT NULL",
            )
            .fetch_one(&mut *conn)
            .await?;
            let mut owners = ExportOwners::default();
            if bindings {
                owners.bound = bindings::list(&mut conn, None).await?.into_iter().collect();
            }
            if orphans {
                owners.orphaned = bindings::orphan_releases(&mut conn).await?;
            }
            Ok(owners)
        };
        owners
            .await
            .map_err(|e: StoreError| e.during(Operation::Export, None))
    }

    /// Every binding (in `namespace`, if given) with its code.
    pub async fn bindings(
        &self,
        namespace: Option<&str>,
    ) -> Result<Vec<(String, bindings::Binding)>> {
        let list = async {
            let mut conn = self.pool.acquire().await?;
            bindings::list(&mut conn, namespace).await
        };
        list.await
            .map_err(|e: StoreError| e.during(Operation::Sweep, None))
    }

    /// The resource `code` is bound to, if any.
    pub async fn owner_of(&self, code: &Code) -> Result<Option<Owner>> {
        let find = async {
            let mut conn = self.pool.acquire().await?;
            bindings::owner_of(&mut conn, code.as_str()).await
        };
        find.await
            .map_err(|e: StoreError| e.during(Operation::FindOwner, Some(code)))
    }

    /// The migrations this binary needs that the database has not applied
    /// (`version description`), for a readiness that waits for whoever
    /// migrates; empty when the schema is current.
    pub async fn missing_migrations(&self) -> Result<Vec<String>> {
        let mut conn = self.pool.acquire().await?;
        let applied = applied_versions(&mut conn).await?;
        Ok(migrator()
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .map(|m| format!("{} {}", m.version, m.description))
            .collect())
    }

    /// Brings the schema up to date. Idempotent, safe on a database the billing
    /// service created, and serialised between replicas by an advisory lock.
    pub async fn migrate(&self) -> Result<MigrationReport> {
        let migrator = migrator();
        let mut conn = self.pool.acquire().await?;
        let before = applied_versions(&mut conn).await?;
        migrator.run(&self.pool).await?;
        let mut applied: Vec<String> = migrator
            .iter()
            .filter(|m| !before.contains(&m.version))
            .map(|m| format!("{} {}", m.version, m.description))
            .collect();
        applied.extend(ensure_indexes(&mut conn).await?);
        Ok(MigrationReport {
            applied,
            already_applied: before.len(),
        })
    }
}

/// Indexes the request path needs on the billing service's tables (a
/// customer's balance sums its ledger rows: without this every redemption
/// would read the whole ledger). Built CONCURRENTLY, outside a transaction, so
/// writes go on meanwhile on a live billing database.
const INDEXES: [(&str, &str); 1] = [(
    "voucher_operator_credit_ledger_customer",
    "CREATE INDEX CONCURRENTLY IF NOT EXISTS voucher_operator_credit_ledger_customer \
     ON credit_ledger (customer_id)",
)];

/// Builds the missing [`INDEXES`]; one that an interrupted build left invalid
/// is dropped and built again. Replicas take turns (a session advisory
/// lock), waiting between tries rather than in a statement: a statement
/// waiting for the lock would hold a snapshot that the other's concurrent
/// build waits for, a deadlock. Returns what it built.
async fn ensure_indexes(conn: &mut PgConnection) -> Result<Vec<String>> {
    const LOCK: &str = "voucher_operator_indexes";
    loop {
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                .bind(LOCK)
                .fetch_one(&mut *conn)
                .await?;
        if locked {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let built = async {
        let mut built = Vec::new();
        for (name, create) in INDEXES {
            let valid: Option<bool> = sqlx::query_scalar(
                "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)",
            )
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?;
            match valid {
                Some(true) => continue,
                Some(false) => {
                    // The name is a constant of this module, not input.
                    let drop = format!("DROP INDEX CONCURRENTLY IF EXISTS {name}");
                    sqlx::query(sqlx::AssertSqlSafe(drop))
                        .execute(&mut *conn)
                        .await?;
                }
                None => {}
            }
            sqlx::query(create).execute(&mut *conn).await?;
            built.push(format!("index {name}"));
        }
        Ok::<_, StoreError>(built)
    }
    .await;
    sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
        .bind(LOCK)
        .execute(&mut *conn)
        .await?;
    built
}

fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("src/store/migrations");
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
}

async fn applied_versions(conn: &mut PgConnection) -> Result<Vec<i64>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(MIGRATIONS_TABLE)
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        return Ok(Vec::new());
    }
    // The table name is a constant of this module, not input.
    let query = format!("SELECT version FROM {MIGRATIONS_TABLE} WHERE success ORDER BY version");
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(query))
        .fetch_all(&mut *conn)
        .await?)
}

/// Serialises every change to one code (claim, apply, delete) for the rest of
/// the transaction, including for codes that have no row yet.
pub(crate) async fn lock_code(conn: &mut PgConnection, code: &Code) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(code.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

/// The URL without its password, for error messages and logs.
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "<unparseable database URL>".into(),
    }
}

/// The owners of the codes, present and past, as `export` reads them.
#[derive(Debug, Default)]
pub(crate) struct ExportOwners {
    /// Code → its binding.
    pub bound: std::collections::HashMap<String, bindings::Binding>,
    /// Code → the Voucher that let it go with the deletionPolicy Orphan it chose.
    pub orphaned: std::collections::HashMap<String, bindings::OrphanRelease>,
}
