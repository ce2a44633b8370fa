//! Suspensions that GitOps cannot revert: of a code, or of a whole campaign,
//! by the admin endpoint or by the resource's `catalyst.openova.io/suspended`
//! annotation — each way lifts its own. The database's guard refuses the
//! redemption of a suspended code to every writer (migration `…_guard.sql`);
//! the preview and the operator's redemption read the same rows.

use sqlx::PgConnection;

use super::{Operation, Result, Store, StoreError, campaigns, outbox, promo_codes};
use crate::domain::{Actor, AuditData, AuditKind, Code, Facts, Owner};

/// Who set a suspension (and so may lift it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// `POST /billing/vouchers/suspend/…`.
    Admin,
    /// The resource's `catalyst.openova.io/suspended: "true"` annotation.
    Annotation,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Annotation => "annotation",
        }
    }
}

/// What a suspension holds.
#[derive(Clone, Debug)]
pub(crate) enum Target<'a> {
    Code(&'a Code),
    Campaign(&'a Owner),
}

impl Target<'_> {
    /// Its key in `voucher_suspensions`.
    fn key(&self) -> String {
        match self {
            Self::Code(code) => code.to_string(),
            Self::Campaign(owner) => format!("campaign:{}", owner.uid),
        }
    }
}

/// Suspends (`on`) or lifts the suspension of `target` set by `source`;
/// `true` when something changed (the caller audits it). Lifting leaves the
/// other source's suspension in place.
pub(super) async fn set(
    conn: &mut PgConnection,
    target: &Target<'_>,
    source: Source,
    on: bool,
    actor: &Actor,
) -> Result<bool> {
    let key = target.key();
    let query = match on {
        true => sqlx::query(
            "INSERT INTO voucher_suspensions (target, source, actor) VALUES ($1, $2, $3) \
             ON CONFLICT (target, source) DO NOTHING",
        )
        .bind(key)
        .bind(source.as_str())
        .bind(actor.to_string()),
        false => sqlx::query("DELETE FROM voucher_suspensions WHERE target = $1 AND source = $2")
            .bind(key)
            .bind(source.as_str()),
    };
    Ok(query.execute(conn).await?.rows_affected() > 0)
}

/// The audit record of a change of `target`'s suspension by `actor`.
async fn audit(
    conn: &mut PgConnection,
    target: &Target<'_>,
    on: bool,
    actor: &Actor,
) -> Result<()> {
    match target {
        Target::Code(code) => {
            let kind = match on {
                true => AuditKind::Suspended,
                false => AuditKind::SuspensionLifted,
            };
            let row = promo_codes::find(conn, code).await?;
            let data = AuditData::of(kind, &Facts::new(code.as_str(), actor), row.clone(), row);
            outbox::append_audit(conn, kind, &data).await.map(|_| ())
        }
        Target::Campaign(owner) => {
            campaigns::audit_suspension(conn, owner, on, actor.clone()).await
        }
    }
}

/// [`set`], audited when it changed something: what it did, and whether
/// `target` is suspended now by any source.
async fn switch(
    conn: &mut PgConnection,
    target: &Target<'_>,
    source: Source,
    on: bool,
    actor: &Actor,
) -> Result<Suspension> {
    let changed = set(conn, target, source, on, actor).await?;
    if changed {
        audit(conn, target, on, actor).await?;
    }
    let suspended = held(conn, target).await?;
    Ok(Suspension { changed, suspended })
}

/// Whether `target` is suspended, by any source.
async fn held(conn: &mut PgConnection, target: &Target<'_>) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM voucher_suspensions WHERE target = $1)")
            .bind(target.key())
            .fetch_one(conn)
            .await?,
    )
}

/// What the admin endpoint did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Suspension {
    /// Whether this request changed anything (a repeat does not).
    pub changed: bool,
    /// Whether the target is suspended now, by any source.
    pub suspended: bool,
}

impl Store {
    /// The admin endpoint: suspends (`on`) or lifts the admin's suspension of
    /// `code`, audited. `None` when there is no live code.
    pub async fn suspend_code(
        &self,
        code: &Code,
        on: bool,
        subject: &str,
    ) -> Result<Option<Suspension>> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            if promo_codes::find_live(&mut tx, code).await?.is_none() {
                tx.rollback().await?;
                return Ok(None);
            }
            let actor = Actor::Subject {
                subject: subject.to_owned(),
            };
            let done = switch(&mut tx, &Target::Code(code), Source::Admin, on, &actor).await?;
            tx.commit().await?;
            Ok(Some(done))
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Suspend, Some(code)))
    }

    /// The admin endpoint for a campaign (by namespace and name, as the admin
    /// page knows it). `None` when the billing database has no such campaign.
    pub async fn suspend_campaign(
        &self,
        namespace: &str,
        name: &str,
        on: bool,
        subject: &str,
    ) -> Result<Option<Suspension>> {
        let Some(found) = self.find_campaign(namespace, name).await? else {
            return Ok(None);
        };
        let run = async {
            let mut tx = self.pool().begin().await?;
            let actor = Actor::Subject {
                subject: subject.to_owned(),
            };
            let target = Target::Campaign(&found.owner);
            let done = switch(&mut tx, &target, Source::Admin, on, &actor).await?;
            tx.commit().await?;
            Ok(Some(done))
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Suspend, None))
    }

    /// A campaign's annotation, as its controller finds it: suspended (`on`)
    /// or not, idempotent; what changed, and whether the campaign is
    /// suspended now by any source (for its status).
    pub(crate) async fn set_campaign_annotation_suspension(
        &self,
        owner: &Owner,
        on: bool,
    ) -> Result<Suspension> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            let actor = Actor::Campaign {
                namespace: owner.namespace.clone(),
                name: owner.name.clone(),
                uid: owner.uid.clone(),
            };
            let target = Target::Campaign(owner);
            let done = switch(&mut tx, &target, Source::Annotation, on, &actor).await?;
            tx.commit().await?;
            Ok(done)
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Suspend, None))
    }
}
