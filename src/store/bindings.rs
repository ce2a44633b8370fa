//! All SQL on the operator's `voucher_bindings` table (which resource owns which code) and on
//! `voucher_orphan_releases` (which resource let go of a code with Orphan).

use sqlx::PgConnection;

use super::{Result, StoreError, promo_codes};
use crate::domain::{Claim, Code, CodeRecord, DeletionPolicy, Owner, Phase, Request};

/// A code's binding to a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub owner: Owner,
    /// The resource generation last applied to the row.
    pub generation: i64,
    /// The phase last recorded, for clock-driven audit records.
    pub phase: Option<Phase>,
    /// The owner's deletion policy at the last bind.
    pub deletion_policy: DeletionPolicy,
}

/// What a resource found when it claimed its code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimState {
    pub claim: Claim,
    pub binding: Option<Binding>,
    pub row: Option<CodeRecord>,
}

#[derive(sqlx::FromRow)]
struct BindingRow {
    namespace: String,
    name: String,
    uid: String,
    generation: i64,
    phase: Option<String>,
    deletion_policy: String,
}

impl From<BindingRow> for Binding {
    fn from(row: BindingRow) -> Self {
        Binding {
            owner: Owner {
                namespace: row.namespace,
                name: row.name,
                uid: row.uid,
            },
            generation: row.generation,
            phase: row.phase.as_deref().and_then(Phase::parse),
            // Unknown text is read as the safe side: revoke.
            deletion_policy: DeletionPolicy::parse(&row.deletion_policy).unwrap_or_default(),
        }
    }
}

pub async fn find(conn: &mut PgConnection, code: &Code) -> Result<Option<Binding>> {
    let row: Option<BindingRow> = sqlx::query_as(
        "SELECT namespace, name, uid, generation, phase, deletion_policy FROM voucher_bindings \
         WHERE code = $1",
    )
    .bind(code.as_str())
    .fetch_optional(conn)
    .await?;
    Ok(row.map(Into::into))
}

/// Every binding, with its code (namespaces: only those), for the sweep of
/// bindings whose Voucher vanished.
pub(crate) async fn list(
    conn: &mut PgConnection,
    namespace: Option<&str>,
) -> Result<Vec<(String, Binding)>> {
    #[derive(sqlx::FromRow)]
    struct Listed {
        code: String,
        #[sqlx(flatten)]
        row: BindingRow,
    }
    let rows: Vec<Listed> = sqlx::query_as(
        "SELECT code, namespace, name, uid, generation, phase, deletion_policy \
         FROM voucher_bindings WHERE $1::text IS NULL OR namespace = $1 ORDER BY code",
    )
    .bind(namespace)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|listed| (listed.code, listed.row.into()))
        .collect())
}

/// Locks the code and decides what `me` may do with it (see [`Claim`]).
/// Call inside the transaction that then applies the outcome.
pub async fn claim(
    conn: &mut PgConnection,
    code: &Code,
    me: &Owner,
    request: Request,
) -> Result<ClaimState> {
    super::lock_code(conn, code).await?;
    let binding = find(conn, code).await?;
    let row = promo_codes::find_for_update(conn, code).await?;
    let claim = Claim::decide(
        binding.as_ref().map(|b| &b.owner),
        row.as_ref(),
        me,
        request,
    );
    Ok(ClaimState {
        claim,
        binding,
        row,
    })
}

/// What a bind records.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub generation: i64,
    pub phase: Phase,
    pub deletion_policy: DeletionPolicy,
}

/// Binds `code` to `owner`, or moves an existing binding of the same owner
/// on. Fails when another resource holds it.
pub async fn bind(conn: &mut PgConnection, code: &Code, owner: &Owner, bound: Bound) -> Result<()> {
    let result = sqlx::query(
        "INSERT INTO voucher_bindings (code, namespace, name, uid, generation, phase, deletion_policy) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (code) DO UPDATE SET generation = EXCLUDED.generation, phase = EXCLUDED.phase, \
         deletion_policy = EXCLUDED.deletion_policy \
         WHERE voucher_bindings.uid = EXCLUDED.uid",
    )
    .bind(code.as_str())
    .bind(&owner.namespace)
    .bind(&owner.name)
    .bind(&owner.uid)
    .bind(bound.generation)
    .bind(bound.phase.as_str())
    .bind(bound.deletion_policy.as_str())
    .execute(&mut *conn)
    .await?;
    if result.rows_affected() == 0 {
        return Err(StoreError::BindingTaken {
            code: code.to_string(),
        });
    }
    // Owned again: the new owner's policy holds, not the one that let it go.
    forget_orphan(conn, code).await
}

/// Releases the binding of `code`, whoever holds it (the admin revoke).
pub(crate) async fn release_any(conn: &mut PgConnection, code: &Code) -> Result<Option<Owner>> {
    let row: Option<(String, String, String)> = sqlx::query_as(
        "DELETE FROM voucher_bindings WHERE code = $1 RETURNING namespace, name, uid",
    )
    .bind(code.as_str())
    .fetch_optional(conn)
    .await?;
    Ok(row.map(owner))
}

/// An owner as its binding's columns hold it.
fn owner((namespace, name, uid): (String, String, String)) -> Owner {
    Owner {
        namespace,
        name,
        uid,
    }
}

/// Records that `owner` let go of `code` with the deletionPolicy Orphan it chose (see the
/// migration `orphan_releases`): `export` writes the code back with Orphan.
pub(crate) async fn record_orphan(
    conn: &mut PgConnection,
    code: &Code,
    owner: &Owner,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO voucher_orphan_releases (code, namespace, name) VALUES ($1, $2, $3) \
         ON CONFLICT (code) DO UPDATE SET namespace = EXCLUDED.namespace, \
         name = EXCLUDED.name, released_at = now()",
    )
    .bind(code.as_str())
    .bind(&owner.namespace)
    .bind(&owner.name)
    .execute(conn)
    .await?;
    Ok(())
}

/// Forgets an Orphan release of `code`: it is bound or revoked again, and that holds now.
pub(crate) async fn forget_orphan(conn: &mut PgConnection, code: &Code) -> Result<()> {
    sqlx::query("DELETE FROM voucher_orphan_releases WHERE code = $1")
        .bind(code.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

/// A code let go of with Orphan: by which Voucher, when.
#[derive(Clone, Debug, sqlx::FromRow)]
pub(crate) struct OrphanRelease {
    pub code: String,
    pub namespace: String,
    pub name: String,
    pub released_at: chrono::DateTime<chrono::Utc>,
}

/// Every code let go of with Orphan, by code.
pub(crate) async fn orphan_releases(
    conn: &mut PgConnection,
) -> Result<std::collections::HashMap<String, OrphanRelease>> {
    let rows: Vec<OrphanRelease> =
        sqlx::query_as("SELECT code, namespace, name, released_at FROM voucher_orphan_releases")
            .fetch_all(conn)
            .await?;
    Ok(rows.into_iter().map(|r| (r.code.clone(), r)).collect())
}

/// Releases the binding if `uid` holds it; returns whether it did.
pub async fn release(conn: &mut PgConnection, code: &Code, uid: &str) -> Result<bool> {
    let result = sqlx::query("DELETE FROM voucher_bindings WHERE code = $1 AND uid = $2")
        .bind(code.as_str())
        .bind(uid)
        .execute(conn)
        .await?;
    Ok(result.rows_affected() == 1)
}

/// The resource that owns `code`, if any: how a change of the row finds the
/// Voucher to reconcile.
pub async fn owner_of(conn: &mut PgConnection, code: &str) -> Result<Option<Owner>> {
    let row: Option<(String, String, String)> =
        sqlx::query_as("SELECT namespace, name, uid FROM voucher_bindings WHERE code = $1")
            .bind(code)
            .fetch_optional(conn)
            .await?;
    Ok(row.map(owner))
}
