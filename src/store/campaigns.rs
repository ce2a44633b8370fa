//! All SQL on the operator's campaign tables, and a campaign's bulk changes of
//! its `promo_codes` rows: generated, updated and released a chunk at a time,
//! each chunk one transaction, so that a crash or a leader change loses at
//! most the chunk in flight and the next reconcile resumes where the last
//! committed one ended: no duplicate, no gap.

use futures::Stream;
use sqlx::PgConnection;

use super::promo_codes::bind_terms;
use super::{Operation, Result, Store, StoreError, outbox};
use crate::domain::audit::CampaignAuditData;
use crate::domain::campaign::{self, CampaignName, CodeRange};
use crate::domain::{Actor, AuditKind, Code, DeletionPolicy, Facts, Owner, TermField, Terms};

/// Codes written by one generation transaction: large enough that a million
/// codes take 200 round trips, small enough that a chunk commits in well
/// under a second and holds a few hundred kilobytes.
pub(crate) const CHUNK: usize = 5_000;
/// Codes one terms or release statement touches.
pub(crate) const UPDATE_CHUNK: u32 = 20_000;
/// Codes one page of the CSV download reads.
const PAGE: i64 = 5_000;
/// Codes generated between two `campaign_generated` records at most.
const AUDIT_EVERY: u32 = 100_000;

/// What the billing database holds of a campaign.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Codes `0..generated` exist.
    pub generated: u32,
    /// The resource generation whose terms every code carries.
    pub generation: i64,
    /// Those terms (`None` before the first pass).
    pub terms: Option<Terms>,
    /// The fingerprint of the key that generated the codes (`None` before any).
    pub key_fingerprint: Option<String>,
}

/// One chunk of codes to generate: codes `from..from + codes.len()`.
pub struct Batch<'a> {
    pub from: u32,
    pub codes: &'a [Code],
    pub terms: &'a Terms,
    /// The campaign's `count`.
    pub of: u32,
    /// The resource generation whose terms these are.
    pub generation: i64,
    /// The fingerprint of the key that made the codes.
    pub key_fingerprint: &'a str,
}

/// What one step of deleting a campaign did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Some codes were released; more remain.
    More,
    /// Every code is released, as this policy says (`None`: the campaign
    /// never wrote anything, e.g. it was refused).
    Done(Option<DeletionPolicy>),
}

/// What one generation transaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// The codes were written; `generated` now exist.
    Generated { generated: u32 },
    /// Code `index` exists already (another campaign's, a Voucher's, the admin
    /// page's, or an earlier code of this one): nothing was written.
    Collision { index: u32 },
    /// Another writer moved the campaign on meanwhile: read its progress again.
    Moved,
    /// The key is not the one that generated the codes so far: nothing was written.
    KeyChanged,
    /// The campaign's deletion began (its codes are being, or were, released):
    /// nothing was written, and nothing more is — a former leader still
    /// generating never adds codes after a Revoke deletion.
    Released,
}

/// What a pass of the terms over a campaign's codes records, chunk by chunk.
#[derive(Clone, Copy, Debug)]
pub enum TermsPass<'a> {
    /// The first chunk of a spec change: the campaign's terms and generation
    /// move on, with one `campaign_updated` record when terms changed and
    /// codes exist (`codes`: how many).
    Change {
        before: Option<&'a Terms>,
        codes: u32,
    },
    /// A later chunk of the same change: nothing more to record.
    Continue,
    /// A check of unchanged terms: codes edited out of band are reverted,
    /// one `campaign_drift_corrected` record for those of the chunk.
    Drift,
}

/// A campaign's aggregate counters, from one query over its codes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub codes: u32,
    pub redeemed: i64,
    pub exhausted: u32,
}

/// A campaign found by name, for the CSV download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub owner: Owner,
    pub generated: u32,
    /// The fingerprint of the key that generated its codes (`None` before any).
    pub key_fingerprint: Option<String>,
}

/// Refuses to write the terms of generation `mine` over a newer `stored` one.
fn superseded(stored: i64, mine: i64) -> Result<()> {
    if stored > mine {
        return Err(StoreError::Superseded { stored, mine });
    }
    Ok(())
}

fn to_u32(value: i32) -> u32 {
    u32::try_from(value).unwrap_or_default()
}

fn to_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

fn actor(owner: &Owner) -> Actor {
    Actor::Campaign {
        namespace: owner.namespace.clone(),
        name: owner.name.clone(),
        uid: owner.uid.clone(),
    }
}

/// Marks the transaction's changes of `promo_codes` as bulk: its rows notify
/// nobody one by one; `notify_all` says once that any code may have changed.
async fn bulk(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT set_config('voucher_operator.bulk', 'on', true)")
        .execute(conn)
        .await?;
    Ok(())
}

async fn notify_all(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(super::notify::CODES_CHANNEL)
        .bind(super::notify::ALL_CODES)
        .execute(conn)
        .await?;
    Ok(())
}

/// What a campaign's audit record says beside its kind and campaign.
struct Said<'a> {
    codes: CodeRange,
    before: Option<Terms>,
    after: Option<Terms>,
    changed: &'a [TermField],
    by: Actor,
}

impl Said<'_> {
    /// `by` did something to `codes`, terms aside.
    fn of(by: Actor, codes: CodeRange) -> Self {
        Self {
            codes,
            before: None,
            after: None,
            changed: &[],
            by,
        }
    }
}

/// A campaign's suspension by `by` (or its lifting), audited as the campaign's.
pub(super) async fn audit_suspension(
    conn: &mut PgConnection,
    owner: &Owner,
    on: bool,
    by: Actor,
) -> Result<()> {
    let generated: i32 =
        sqlx::query_scalar("SELECT generated FROM voucher_campaigns WHERE uid = $1")
            .bind(&owner.uid)
            .fetch_optional(&mut *conn)
            .await?
            .unwrap_or_default();
    let kind = match on {
        true => AuditKind::CampaignSuspended,
        false => AuditKind::CampaignSuspensionLifted,
    };
    let said = Said::of(by, CodeRange::new(0, to_u32(generated)));
    audit(conn, kind, owner, said).await
}

/// Appends a campaign's own audit record (its subject the campaign's).
async fn audit(
    conn: &mut PgConnection,
    kind: AuditKind,
    owner: &Owner,
    said: Said<'_>,
) -> Result<()> {
    let subject = campaign::subject(&owner.namespace, &owner.name);
    let facts = Facts {
        changed: said.changed,
        codes: Some(said.codes.count),
        ..Facts::new(&subject, &said.by)
    };
    let data = CampaignAuditData {
        campaign: CampaignName {
            namespace: owner.namespace.clone(),
            name: owner.name.clone(),
        },
        codes: said.codes,
        before: said.before,
        after: said.after,
        changed: said.changed.to_vec(),
        reason: kind.wording(&facts).reason,
        actor: said.by,
    };
    let payload = serde_json::to_value(&data).expect("audit data serialises");
    outbox::append(conn, &outbox::NewAuditRecord::new(subject, kind, payload)).await?;
    Ok(())
}

/// The campaign that issued `code`, if any.
pub async fn owner_of(conn: &mut PgConnection, code: &str) -> Result<Option<Owner>> {
    let row: Option<(String, String, String)> = sqlx::query_as(
        "SELECT c.namespace, c.name, c.uid FROM voucher_campaign_codes cc \
         JOIN voucher_campaigns c ON c.uid = cc.campaign_uid WHERE cc.code = $1",
    )
    .bind(code)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(namespace, name, uid)| Owner {
        namespace,
        name,
        uid,
    }))
}

impl Store {
    /// Records the campaign (or its new deletion policy); how far it got.
    pub async fn register_campaign(
        &self,
        owner: &Owner,
        deletion_policy: DeletionPolicy,
    ) -> Result<Progress> {
        let run = async {
            let row: (i32, i64, Option<serde_json::Value>, Option<String>) = sqlx::query_as(
                "INSERT INTO voucher_campaigns (uid, namespace, name, deletion_policy) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (uid) DO UPDATE \
                 SET deletion_policy = EXCLUDED.deletion_policy \
                 RETURNING generated, generation, terms, key_fingerprint",
            )
            .bind(&owner.uid)
            .bind(&owner.namespace)
            .bind(&owner.name)
            .bind(deletion_policy.as_str())
            .fetch_one(self.pool())
            .await?;
            Ok(Progress {
                generated: to_u32(row.0),
                generation: row.1,
                terms: row.2.and_then(|t| serde_json::from_value(t).ok()),
                key_fingerprint: row.3,
            })
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Campaign, None))
    }

    /// Writes a chunk of codes with their terms, in one transaction, unless
    /// one of them exists already (then nothing, and the codes generated so
    /// far are audited). At least every [`AUDIT_EVERY`] codes, and with the
    /// chunk that reaches `count`, one `campaign_generated` record names the
    /// codes generated since the last one.
    pub async fn generate_campaign_codes(&self, owner: &Owner, batch: &Batch<'_>) -> Result<Chunk> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            let audited = match may_generate(&mut tx, owner, batch).await? {
                Ok(audited) => audited,
                Err(stopped) => {
                    tx.rollback().await?;
                    return Ok(stopped);
                }
            };
            bulk(&mut tx).await?;
            if let Some(at) = insert_codes(&mut tx, owner, batch).await? {
                tx.rollback().await?;
                self.audit_generated(owner, batch.terms).await?;
                return Ok(Chunk::Collision {
                    index: batch.from + at,
                });
            }
            let to = batch.from + batch.codes.len() as u32;
            record_generated(&mut tx, owner, batch, to, audited).await?;
            notify_all(&mut tx).await?;
            tx.commit().await?;
            Ok(Chunk::Generated { generated: to })
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Generate, None))
    }

    /// Names the codes generated since the last `campaign_generated` record
    /// in one more (when generation stops before `count`).
    async fn audit_generated(&self, owner: &Owner, terms: &Terms) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        let row: Option<(i32, i32)> = sqlx::query_as(
            "WITH before AS (SELECT audited FROM voucher_campaigns WHERE uid = $1 FOR UPDATE) \
             UPDATE voucher_campaigns SET audited = generated FROM before \
             WHERE uid = $1 AND voucher_campaigns.audited < generated \
             RETURNING before.audited, generated",
        )
        .bind(&owner.uid)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((from, to)) = row {
            let said = Said {
                after: Some(terms.clone()),
                ..Said::of(actor(owner), CodeRange::new(to_u32(from), to_u32(to)))
            };
            audit(&mut tx, AuditKind::CampaignGenerated, owner, said).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Gives the live codes among `from..to` of the campaign `terms` (of the
    /// resource's `generation`), in one statement; revoked codes stay revoked.
    /// The audit record commits with the rows it describes, as `pass` says.
    /// Returns how many codes changed.
    pub async fn apply_campaign_terms(
        &self,
        owner: &Owner,
        (from, to): (u32, u32),
        terms: &Terms,
        generation: i64,
        pass: &TermsPass<'_>,
    ) -> Result<u64> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            // Serialised with generation; a replica that lost its lease (still
            // finishing a reconcile) never writes an older spec over a newer.
            let stored: i64 = sqlx::query_scalar(
                "SELECT generation FROM voucher_campaigns WHERE uid = $1 FOR UPDATE",
            )
            .bind(&owner.uid)
            .fetch_one(&mut *tx)
            .await?;
            superseded(stored, generation)?;
            bulk(&mut tx).await?;
            let update = sqlx::query(
                "UPDATE promo_codes p SET credit_omr = $4, description = $5, active = $6, \
                 max_redemptions = $7, valid_from = $8, expires_at = $9, discount = $10 \
                 FROM voucher_campaign_codes c \
                 WHERE c.campaign_uid = $1 AND c.code_index >= $2 AND c.code_index < $3 \
                   AND p.code = c.code AND p.deleted_at IS NULL \
                   AND (p.credit_omr, p.description, p.active, p.max_redemptions, p.valid_from, \
                        p.expires_at, p.discount) IS DISTINCT FROM ($4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(&owner.uid)
            .bind(to_i32(from))
            .bind(to_i32(to));
            let changed = bind_terms!(update, terms)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            record_pass(&mut tx, owner, terms, generation, pass, (from, to), changed).await?;
            if changed > 0 {
                notify_all(&mut tx).await?;
            }
            tx.commit().await?;
            Ok(changed)
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Campaign, None))
    }

    /// The campaign's counters, from one aggregate query over its codes.
    pub async fn campaign_counts(&self, owner: &Owner) -> Result<Counts> {
        let run = async {
            let row: (i64, Option<i64>, i64) = sqlx::query_as(
                "SELECT count(*), sum(p.times_redeemed), \
                 count(*) FILTER (WHERE p.max_redemptions > 0 \
                                  AND p.times_redeemed >= p.max_redemptions) \
                 FROM voucher_campaign_codes c JOIN promo_codes p ON p.code = c.code \
                 WHERE c.campaign_uid = $1",
            )
            .bind(&owner.uid)
            .fetch_one(self.pool())
            .await?;
            let count = |n: i64| u32::try_from(n).unwrap_or(u32::MAX);
            Ok(Counts {
                codes: count(row.0),
                redeemed: row.1.unwrap_or_default(),
                exhausted: count(row.2),
            })
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Campaign, None))
    }

    /// Releases the next [`UPDATE_CHUNK`] codes of a deleted campaign,
    /// revoking them (`Revoke`) or leaving them live (`Orphan`), as `policy`
    /// or else the policy recorded at its last apply says; when every code
    /// is, marks the campaign released with one audit record. Its codes stay
    /// its own: no Voucher adopts or revives them, no download lists them.
    pub async fn release_campaign(
        &self,
        owner: &Owner,
        policy: Option<DeletionPolicy>,
    ) -> Result<Release> {
        let run = async {
            let mut tx = self.pool().begin().await?;
            let row: Option<(i32, i32, String, bool)> = sqlx::query_as(
                "SELECT generated, released, deletion_policy, released_at IS NOT NULL \
                 FROM voucher_campaigns WHERE uid = $1 FOR UPDATE",
            )
            .bind(&owner.uid)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((generated, released, recorded, done)) = row else {
                tx.rollback().await?;
                return Ok(Release::Done(None));
            };
            // Unknown text is read as the safe side: revoke.
            let policy =
                policy.unwrap_or_else(|| DeletionPolicy::parse(&recorded).unwrap_or_default());
            if done {
                tx.rollback().await?;
                return Ok(Release::Done(Some(policy)));
            }
            let (released, generated) = (to_u32(released), to_u32(generated));
            // A Revoke deletion first switches the campaign off, in its one
            // row, at once on every path; the codes' rows follow chunk by chunk.
            if policy == DeletionPolicy::Revoke && released == 0 && generated > 0 {
                let switched: u64 = sqlx::query(
                    "UPDATE voucher_campaigns SET active = false WHERE uid = $1 AND active",
                )
                .bind(&owner.uid)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if switched > 0 {
                    tx.commit().await?;
                    return Ok(Release::More);
                }
            }
            if released < generated {
                let to = (released + UPDATE_CHUNK).min(generated);
                release_chunk(&mut tx, owner, policy, (released, to)).await?;
                tx.commit().await?;
                return Ok(Release::More);
            }
            sqlx::query("UPDATE voucher_campaigns SET released_at = now() WHERE uid = $1")
                .bind(&owner.uid)
                .execute(&mut *tx)
                .await?;
            // Its suspensions went with it (its codes, orphaned, are no longer its).
            sqlx::query("DELETE FROM voucher_suspensions WHERE target = $1")
                .bind(format!("campaign:{}", owner.uid))
                .execute(&mut *tx)
                .await?;
            let kind = match policy {
                DeletionPolicy::Revoke => AuditKind::CampaignRevoked,
                DeletionPolicy::Orphan => AuditKind::CampaignOrphaned,
            };
            let range = CodeRange::new(0, generated);
            audit(&mut tx, kind, owner, Said::of(actor(owner), range)).await?;
            tx.commit().await?;
            Ok(Release::Done(Some(policy)))
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Campaign, None))
    }

    /// The campaign of `uid`, as a notification names it.
    pub(crate) async fn campaign_by_uid(&self, uid: &str) -> Result<Option<Owner>> {
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT namespace, name FROM voucher_campaigns WHERE uid = $1")
                .bind(uid)
                .fetch_optional(self.pool())
                .await
                .map_err(|e| StoreError::from(e).during(Operation::FindOwner, None))?;
        Ok(row.map(|(namespace, name)| Owner {
            namespace,
            name,
            uid: uid.to_owned(),
        }))
    }

    /// The campaign `namespace/name` (the newest, should an older one with
    /// the same name still be being released).
    pub async fn find_campaign(&self, namespace: &str, name: &str) -> Result<Option<Found>> {
        let run = async {
            let row: Option<(String, i32, Option<String>)> = sqlx::query_as(
                "SELECT uid, generated, key_fingerprint FROM voucher_campaigns \
                 WHERE namespace = $1 AND name = $2 AND released_at IS NULL \
                 ORDER BY created_at DESC LIMIT 1",
            )
            .bind(namespace)
            .bind(name)
            .fetch_optional(self.pool())
            .await?;
            Ok(row.map(|(uid, generated, key_fingerprint)| Found {
                owner: Owner {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    uid,
                },
                generated: to_u32(generated),
                key_fingerprint,
            }))
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Campaign, None))
    }

    /// Records that `subject` downloaded codes `range` of the campaign.
    pub async fn audit_campaign_download(
        &self,
        owner: &Owner,
        subject: &str,
        range: CodeRange,
    ) -> Result<()> {
        let run = async {
            let mut conn = self.pool().acquire().await?;
            let by = Actor::Subject {
                subject: subject.to_owned(),
            };
            let kind = AuditKind::CampaignCodesDownloaded;
            audit(&mut conn, kind, owner, Said::of(by, range)).await
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Campaign, None))
    }

    /// The live codes among `range` of the campaign in index order (a code
    /// revoked alone is left out), read a page at a time (memory does not
    /// grow with the range): `(index, code)`.
    pub fn campaign_codes(
        &self,
        owner: &Owner,
        range: CodeRange,
    ) -> impl Stream<Item = Result<Vec<(u32, String)>>> + Send + 'static {
        let (store, uid) = (self.clone(), owner.uid.clone());
        futures::stream::try_unfold(range.from, move |next| {
            let (store, uid) = (store.clone(), uid.clone());
            async move {
                if next >= range.to {
                    return Ok(None);
                }
                let limit = PAGE.min(i64::from(range.to - next));
                let rows: Vec<(i32, String)> = sqlx::query_as(
                    "SELECT c.code_index, c.code FROM voucher_campaign_codes c \
                     JOIN promo_codes p ON p.code = c.code \
                     WHERE c.campaign_uid = $1 AND c.code_index >= $2 AND c.code_index < $4 \
                       AND p.deleted_at IS NULL \
                     ORDER BY c.code_index LIMIT $3",
                )
                .bind(&uid)
                .bind(to_i32(next))
                .bind(limit)
                .bind(to_i32(range.to))
                .fetch_all(store.pool())
                .await
                .map_err(|e| StoreError::from(e).during(Operation::Campaign, None))?;
                let Some(last) = rows.last().map(|(i, _)| to_u32(*i)) else {
                    return Ok(None);
                };
                let page = rows.into_iter().map(|(i, c)| (to_u32(i), c)).collect();
                Ok(Some((page, last + 1)))
            }
        })
    }

    /// Which of `codes` exist as live rows issued by the campaign `owner`.
    pub async fn campaign_holds(&self, owner: &Owner, codes: &[Code]) -> Result<Vec<bool>> {
        let run = async {
            let texts: Vec<&str> = codes.iter().map(Code::as_str).collect();
            let held: Vec<String> = sqlx::query_scalar(
                "SELECT c.code FROM voucher_campaign_codes c JOIN promo_codes p ON p.code = c.code \
                 WHERE c.code = ANY($1) AND c.campaign_uid = $2 AND p.deleted_at IS NULL",
            )
            .bind(&texts)
            .bind(&owner.uid)
            .fetch_all(self.pool())
            .await?;
            let held: std::collections::HashSet<String> = held.into_iter().collect();
            Ok(texts.iter().map(|c| held.contains(*c)).collect())
        };
        run.await
            .map_err(|e: StoreError| e.during(Operation::Campaign, None))
    }

    /// The campaign that issued `code`, if any.
    pub async fn campaign_of(&self, code: &Code) -> Result<Option<Owner>> {
        let find = async {
            let mut conn = self.pool().acquire().await?;
            owner_of(&mut conn, code.as_str()).await
        };
        find.await
            .map_err(|e: StoreError| e.during(Operation::FindOwner, Some(code)))
    }
}

/// What a terms pass records: a change moves the campaign's own row on (its
/// terms, its one-row switch that every path reads at once) and is audited
/// once; drift corrected on codes is audited with their range.
async fn record_pass(
    tx: &mut sqlx::PgConnection,
    owner: &Owner,
    terms: &Terms,
    generation: i64,
    pass: &TermsPass<'_>,
    (from, to): (u32, u32),
    changed: u64,
) -> Result<()> {
    match pass {
        TermsPass::Change { before, codes } => {
            let value = serde_json::to_value(terms).expect("terms serialise");
            // The campaign's switch is this one row: every path (the
            // preview, the redemption, the database's guard for any
            // writer) reads it before the codes' own rows, which follow.
            sqlx::query(
                "UPDATE voucher_campaigns SET generation = $2, terms = $3, active = $4 \
                 WHERE uid = $1",
            )
            .bind(&owner.uid)
            .bind(generation)
            .bind(value)
            .bind(terms.active)
            .execute(&mut *tx)
            .await?;
            let fields = before.map(|b| terms.changes_from(b)).unwrap_or_default();
            if !fields.is_empty() && *codes > 0 {
                let said = Said {
                    before: before.cloned(),
                    after: Some(terms.clone()),
                    changed: &fields,
                    ..Said::of(actor(owner), CodeRange::new(0, *codes))
                };
                audit(tx, AuditKind::CampaignUpdated, owner, said).await?;
            }
        }
        TermsPass::Continue => {}
        TermsPass::Drift if changed > 0 => {
            let range = CodeRange {
                from,
                to,
                count: u32::try_from(changed).unwrap_or(u32::MAX),
            };
            let said = Said {
                after: Some(terms.clone()),
                ..Said::of(actor(owner), range)
            };
            audit(tx, AuditKind::CampaignDriftCorrected, owner, said).await?;
        }
        TermsPass::Drift => {}
    }
    Ok(())
}

/// Releases the codes `from..to` of a deleted campaign: revoked (as `policy`
/// says) or left live, and the campaign's progress moved on.
async fn release_chunk(
    tx: &mut sqlx::PgConnection,
    owner: &Owner,
    policy: DeletionPolicy,
    (from, to): (u32, u32),
) -> Result<()> {
    if policy == DeletionPolicy::Revoke {
        bulk(tx).await?;
        sqlx::query(
            "UPDATE promo_codes p SET deleted_at = now(), active = false \
             FROM voucher_campaign_codes c \
             WHERE c.campaign_uid = $1 AND c.code_index >= $2 AND c.code_index < $3 \
               AND p.code = c.code AND p.deleted_at IS NULL",
        )
        .bind(&owner.uid)
        .bind(to_i32(from))
        .bind(to_i32(to))
        .execute(&mut *tx)
        .await?;
        notify_all(tx).await?;
    }
    sqlx::query("UPDATE voucher_campaigns SET released = $2 WHERE uid = $1")
        .bind(&owner.uid)
        .bind(to_i32(to))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Locks the campaign's row (which the release takes too) and says whether
/// `batch` goes on from where it stands: the codes audited so far, or why
/// not (being released, moved on by another replica, another key).
async fn may_generate(
    tx: &mut sqlx::PgConnection,
    owner: &Owner,
    batch: &Batch<'_>,
) -> Result<std::result::Result<u32, Chunk>> {
    let (generated, audited, stored, fingerprint, releasing): (
        i32,
        i32,
        i64,
        Option<String>,
        bool,
    ) = sqlx::query_as(
        "SELECT generated, audited, generation, key_fingerprint, \
         released > 0 OR released_at IS NOT NULL FROM voucher_campaigns \
         WHERE uid = $1 FOR UPDATE",
    )
    .bind(&owner.uid)
    .fetch_one(&mut *tx)
    .await?;
    if releasing {
        return Ok(Err(Chunk::Released));
    }
    superseded(stored, batch.generation)?;
    if to_u32(generated) != batch.from || stored != batch.generation {
        return Ok(Err(Chunk::Moved));
    }
    if fingerprint
        .as_deref()
        .is_some_and(|f| f != batch.key_fingerprint)
    {
        return Ok(Err(Chunk::KeyChanged));
    }
    Ok(Ok(to_u32(audited)))
}

/// Inserts the batch's codes with their terms, bound to the campaign, unless
/// one exists: then `Some` the position in the batch of the first that was
/// not written (it existed, or an earlier code of the same batch was the
/// same code), and the transaction must be undone.
async fn insert_codes(
    tx: &mut sqlx::PgConnection,
    owner: &Owner,
    batch: &Batch<'_>,
) -> Result<Option<u32>> {
    let texts: Vec<&str> = batch.codes.iter().map(Code::as_str).collect();
    let insert = sqlx::query_scalar(
        "INSERT INTO promo_codes (code, credit_omr, description, active, max_redemptions, \
         valid_from, expires_at, discount) \
         SELECT c, $2, $3, $4, $5, $6, $7, $8 FROM unnest($1::text[]) AS c \
         ON CONFLICT (code) DO NOTHING RETURNING code",
    );
    let inserted: Vec<String> = bind_terms!(insert.bind(&texts), batch.terms)
        .fetch_all(&mut *tx)
        .await?;
    if inserted.len() != texts.len() {
        let written: std::collections::HashSet<&str> =
            inserted.iter().map(String::as_str).collect();
        let mut seen = std::collections::HashSet::new();
        let at = texts
            .iter()
            .position(|c| !written.contains(c) || !seen.insert(*c))
            .unwrap_or(0);
        return Ok(Some(at as u32));
    }
    sqlx::query(
        "INSERT INTO voucher_campaign_codes (code, campaign_uid, code_index) \
         SELECT c, $2, $3 + n - 1 FROM unnest($1::text[]) WITH ORDINALITY AS t(c, n)",
    )
    .bind(&texts)
    .bind(&owner.uid)
    .bind(to_i32(batch.from))
    .execute(&mut *tx)
    .await?;
    Ok(None)
}

/// The campaign's progress moved to `to`; at least every [`AUDIT_EVERY`]
/// codes, and with the chunk that reaches the count, one
/// `campaign_generated` record names the codes generated since the last.
async fn record_generated(
    tx: &mut sqlx::PgConnection,
    owner: &Owner,
    batch: &Batch<'_>,
    to: u32,
    audited: u32,
) -> Result<()> {
    let audit_now = to >= batch.of || to - audited >= AUDIT_EVERY;
    sqlx::query(
        "UPDATE voucher_campaigns SET generated = $2, key_fingerprint = $4, \
         audited = CASE WHEN $3 THEN $2 ELSE audited END WHERE uid = $1",
    )
    .bind(&owner.uid)
    .bind(to_i32(to))
    .bind(audit_now)
    .bind(batch.key_fingerprint)
    .execute(&mut *tx)
    .await?;
    if audit_now {
        let said = Said {
            after: Some(batch.terms.clone()),
            ..Said::of(actor(owner), CodeRange::new(audited, to))
        };
        audit(tx, AuditKind::CampaignGenerated, owner, said).await?;
    }
    Ok(())
}
