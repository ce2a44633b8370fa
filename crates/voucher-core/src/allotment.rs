//! The allotment of a global voucher's cap among Sovereigns (DESIGN §11,
//! docs/federation.md): the hub's record of one code and the decision a hub
//! replica takes on one request — pure, so that the service around it only
//! reads the record, decides here, and writes with a compare-and-set on the
//! record's revision. Each rule is the one `crates/voucher-model` checks.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::voucher::{TermField, Terms};

/// The hub's record of one global code: one KV key (rule 1), every change a
/// compare-and-set on its revision — grants, returns, syncs, and the vendor's
/// changes of the cap or the state alike.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The hub Voucher's uid: a request for another (a re-created Voucher
    /// under the same code) is refused.
    pub uid: String,
    /// The bucket's epoch (rule 6): a restored bucket starts a new one.
    pub epoch: u32,
    pub cap: u64,
    pub active: bool,
    pub valid_from: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    /// The most one Sovereign may hold, and the most one request may add:
    /// no Sovereign hoards the cap.
    pub ceiling: u64,
    pub per_request: u64,
    /// Per Sovereign (its NATS account's name).
    pub sovereigns: BTreeMap<String, Entry>,
    /// The vendor's terms (credit or discount, description, window): what a
    /// Sovereign's row carries, and what its copy of the Voucher is held to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terms: Option<Terms>,
    /// A credit voucher's credit per currency (`creditByCurrency`, or
    /// `creditOMR` as `{OMR: n}`): each Sovereign grants it in its own
    /// currency and offers it only if it is there. Empty for a discount (and in
    /// a record of an earlier version: the terms' credit, in any currency).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub credits: BTreeMap<String, i32>,
    /// `perCustomer: Global`: once per customer on any Sovereign (rule 8).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_customer_global: bool,
}

/// What the record holds for one Sovereign.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub share: u64,
    /// Moves on every change of `share` (and on every sync).
    pub version: u64,
    /// The redemptions the Sovereign last reported (rule 10).
    pub reported: u64,
    /// Heard from in this epoch (after a restore, not until it syncs).
    pub known: bool,
}

impl Entry {
    /// This entry with its share moved to `share` at the next version, heard from in this
    /// epoch, having spent `used`: what a grant, a return, a report or a sync writes.
    fn moved_to(&self, share: u64, used: u64) -> Entry {
        Entry {
            share,
            version: self.version + 1,
            reported: used,
            known: true,
        }
    }
}

/// A Sovereign's request. The Sovereign is never in it: the service takes it
/// from the subject the request came on, which NATS accounts fix (rule 11).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Request {
    /// "In `epoch`, at `version`, make my share `share`; I have spent `used`."
    /// Checked on the version alone (rule 2): a duplicate or a replay made at
    /// an older version is refused, whatever it asks.
    #[serde(rename_all = "camelCase")]
    Set {
        uid: String,
        epoch: u32,
        version: u64,
        share: u64,
        used: u64,
    },
    /// A sync (a new leader, a restored database, a new epoch): keep at most
    /// `keep` (what the Sovereign may still spend: its local cap, or its
    /// high-water count after a restore of its own), move the version so that
    /// any request still in flight fails its check.
    #[serde(rename_all = "camelCase")]
    Sync {
        uid: String,
        epoch: u32,
        keep: u64,
        used: u64,
    },
}

/// Why a request changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Refusal {
    /// Made at a version the record has moved past (a duplicate, a replay, a
    /// former leader's): the reply carries the current share and version.
    StaleVersion,
    /// A raise past the (effective) cap, the ceiling or the per-request limit.
    Cap,
    /// A raise while the voucher is inactive or outside its window (by the
    /// hub's clock).
    NotRedeemable,
    /// Another Voucher under the same code.
    OtherVoucher,
}

/// The reply to a Sovereign: the record's share and version for it, read
/// after the write (or after the refusal).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Reply {
    #[serde(rename_all = "camelCase")]
    Ok {
        epoch: u32,
        share: u64,
        version: u64,
        gone: bool,
    },
    #[serde(rename_all = "camelCase")]
    Refused {
        reason: Refusal,
        epoch: u32,
        share: u64,
        version: u64,
        gone: bool,
    },
    /// The hub's epoch is newer than the request's, or the Sovereign has not
    /// synced in it: its entry in a restored record is no grant. Sync first.
    SyncFirst { epoch: u32 },
    /// No global voucher has this code.
    Unknown,
}

/// What a replica decided: the record to write (compare-and-set on the
/// revision it read), and the reply to send once that write is acknowledged
/// (rule 2: never before).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub write: Option<Record>,
    pub reply: Reply,
}

impl Record {
    /// A new record: every listed Sovereign known, with nothing granted.
    pub fn new(uid: impl Into<String>, cap: u64, ceiling: u64, per_request: u64) -> Self {
        Self {
            uid: uid.into(),
            epoch: 0,
            cap,
            active: true,
            valid_from: None,
            expires_at: None,
            ceiling,
            per_request,
            sovereigns: BTreeMap::new(),
            terms: None,
            credits: BTreeMap::new(),
            per_customer_global: false,
        }
    }

    /// This definition with its credit per currency and its "once per
    /// customer" (what a Voucher defines beyond the terms of one row).
    pub fn offering(self, credits: BTreeMap<String, i32>, per_customer_global: bool) -> Self {
        Self {
            credits,
            per_customer_global,
            ..self
        }
    }

    /// What the voucher grants in every currency it states (`50 BHD, 50 OMR`),
    /// or, without a credit per currency, what `terms` grant in `currency`.
    pub fn grants(&self, terms: &Terms, currency: &crate::Currency) -> String {
        if self.credits.is_empty() || terms.discount.is_some() {
            return terms.grant(currency);
        }
        self.credits
            .iter()
            .map(|(code, credit_omr)| {
                let currency = crate::Currency::parse(code).unwrap_or_else(|_| currency.clone());
                let terms = Terms {
                    credit_omr: *credit_omr,
                    ..terms.clone()
                };
                terms.grant(&currency)
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The vendor's terms as a Sovereign of `currency` grants them (its
    /// credit in that currency); `None` when the voucher has no credit in it
    /// (not offered there). A record without terms: the copy's (`copy`).
    pub fn terms_in(&self, currency: &str, copy: &Terms) -> Option<Terms> {
        let terms = self.terms.clone().unwrap_or_else(|| copy.clone());
        if terms.discount.is_some() || self.credits.is_empty() {
            return Some(terms);
        }
        let credit_omr = *self.credits.get(currency)?;
        Some(Terms {
            credit_omr,
            ..terms
        })
    }

    /// The record a hub Voucher defines: its cap (`max_redemptions`, which a
    /// global voucher never leaves 0), state, window and terms.
    pub fn defined(uid: impl Into<String>, terms: &Terms, ceiling: u64, per_request: u64) -> Self {
        let cap = u64::try_from(terms.max_redemptions).unwrap_or_default();
        Record {
            active: terms.active,
            valid_from: terms.valid_from,
            expires_at: terms.expires_at,
            terms: Some(terms.clone()),
            ..Record::new(uid, cap, ceiling.min(cap), per_request)
        }
    }

    /// This record with the vendor's new definition (`by`): its cap, state,
    /// window, limits and terms — a write on the record like every other
    /// change (rule 7); the shares stay as they are.
    /// A hub Voucher re-created under the same code continues the record (its
    /// uid replaces the old one): units granted stay granted and charged.
    pub fn redefined(&self, by: &Record) -> Record {
        Record {
            uid: by.uid.clone(),
            cap: by.cap,
            active: by.active,
            valid_from: by.valid_from,
            expires_at: by.expires_at,
            ceiling: by.ceiling,
            per_request: by.per_request,
            terms: by.terms.clone(),
            credits: by.credits.clone(),
            per_customer_global: by.per_customer_global,
            ..self.clone()
        }
    }

    /// Each Sovereign's share and reported redemptions, for a printer column:
    /// `sov1=30/12 sov2=20/20`.
    pub fn summary(&self) -> String {
        self.sovereigns
            .iter()
            .map(|(name, e)| format!("{name}={}/{}", e.share, e.reported))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Redemptions every Sovereign reported, together.
    pub fn reported(&self) -> u64 {
        self.sovereigns.values().map(|e| e.reported).sum()
    }

    /// The vendor lowered the cap below the units granted (rule 7: the
    /// effective cap stays max(cap, Σ shares)): the hub asks the Sovereigns
    /// to give back what they have not spent, and grants nothing until the
    /// units fit the cap again.
    pub fn asks_returns(&self) -> bool {
        self.granted() > self.cap
    }

    /// Whether grants are made now, by the hub's clock: active and in its window.
    pub fn offered(&self, now: DateTime<Utc>) -> bool {
        self.redeemable(now)
    }

    /// Where a Sovereign's copy of the Voucher differs from the vendor's terms
    /// (the copy changes nothing: the row carries the hub's terms).
    /// `copy` is the record the copy would define, compared on the terms, the
    /// credit per currency and "once per customer" — the fields named as the
    /// spec names them.
    pub fn differences(&self, copy: &Record) -> Vec<&'static str> {
        let (Some(terms), Some(copied)) = (&self.terms, &copy.terms) else {
            return Vec::new();
        };
        let mut differs: Vec<&'static str> = copied
            .changes_from(terms)
            .into_iter()
            // A credit per currency is compared as one field, below.
            .filter(|f| *f != TermField::CreditOmr || self.credits.is_empty())
            .map(TermField::spec_name)
            .collect();
        if copy.credits != self.credits && !self.credits.is_empty() {
            let only_omr = |r: &Record| r.credits.keys().all(|c| c == "OMR");
            differs.push(match only_omr(self) && only_omr(copy) {
                true => "creditOMR",
                false => "creditByCurrency",
            });
        }
        if copy.per_customer_global != self.per_customer_global {
            differs.push("perCustomer");
        }
        differs
    }

    /// What the record charges a Sovereign: its share, or the ceiling while it
    /// has not reported in this epoch (so a restored hub grants nothing it may
    /// have granted before).
    fn charged(&self, entry: &Entry) -> u64 {
        if entry.known {
            entry.share
        } else {
            self.ceiling.max(entry.share)
        }
    }

    /// Σ shares as the hub must count them.
    pub fn granted(&self) -> u64 {
        self.sovereigns.values().map(|e| self.charged(e)).sum()
    }

    /// Every unit granted and reported spent, by every Sovereign (rule 10):
    /// the voucher is used up (410) — not merely this Sovereign's share (503).
    pub fn gone(&self) -> bool {
        self.granted() >= self.cap
            && self
                .sovereigns
                .values()
                .all(|e| e.known && e.reported >= e.share)
    }

    fn redeemable(&self, now: DateTime<Utc>) -> bool {
        self.active
            && self.valid_from.is_none_or(|from| from <= now)
            && self.expires_at.is_none_or(|until| now < until)
    }

    fn reply(&self, sovereign: &str, refused: Option<Refusal>) -> Reply {
        let entry = self.sovereigns.get(sovereign).cloned().unwrap_or_default();
        let (epoch, share, version, gone) = (self.epoch, entry.share, entry.version, self.gone());
        match refused {
            None => Reply::Ok {
                epoch,
                share,
                version,
                gone,
            },
            Some(reason) => Reply::Refused {
                reason,
                epoch,
                share,
                version,
                gone,
            },
        }
    }

    /// The vendor lowers (or raises) the cap, or switches the voucher off:
    /// a write on this record (rule 7), so a grant decided under the old
    /// terms fails its compare-and-set. Units already granted stay granted
    /// (the effective cap is max(new cap, Σ shares)); the Sovereigns are asked
    /// to return them.
    pub fn with_terms(&self, cap: u64, active: bool) -> Record {
        Record {
            cap,
            active,
            ..self.clone()
        }
    }

    /// A restored bucket (rule 6): a new epoch, and no Sovereign known until
    /// it syncs and says what it holds. `members` are every Sovereign of the
    /// account configuration: one the backup never saw may have been granted
    /// units since, and is charged its ceiling too.
    pub fn restored<'a>(&self, members: impl IntoIterator<Item = &'a str>) -> Record {
        let mut record = self.clone();
        record.epoch += 1;
        for member in members {
            record.sovereigns.entry(member.to_owned()).or_default();
        }
        for entry in record.sovereigns.values_mut() {
            entry.known = false;
        }
        record
    }
}

/// What a hub replica decides on `request` from `sovereign`, reading `record`.
pub fn decide(record: &Record, sovereign: &str, request: &Request, now: DateTime<Utc>) -> Decision {
    let (uid, epoch) = match request {
        Request::Set { uid, epoch, .. } | Request::Sync { uid, epoch, .. } => (uid, *epoch),
    };
    let refuse = |reason| Decision {
        write: None,
        reply: record.reply(sovereign, Some(reason)),
    };
    if *uid != record.uid {
        return refuse(Refusal::OtherVoucher);
    }
    let entry = record.sovereigns.get(sovereign).cloned().unwrap_or(Entry {
        known: record.epoch == 0,
        ..Entry::default()
    });
    let sync_first = Decision {
        write: None,
        reply: Reply::SyncFirst {
            epoch: record.epoch,
        },
    };
    if epoch != record.epoch {
        return sync_first;
    }
    let (next, refused) = match request {
        Request::Sync { keep, used, .. } => {
            // A sync never raises a share the record knows.
            let share = if entry.known {
                (*keep).min(entry.share)
            } else {
                *keep
            };
            (entry.moved_to(share, *used), None)
        }
        Request::Set { .. } if !entry.known => return sync_first,
        Request::Set { version, .. } if *version != entry.version => {
            return refuse(Refusal::StaleVersion);
        }
        Request::Set { share, used, .. } => {
            match granted_share(record, sovereign, &entry, *share, now) {
                Ok(share) => (entry.moved_to(share, *used), None),
                // A refused raise still records the usage it reports (rule 10).
                Err(reason) => (
                    Entry {
                        reported: *used,
                        ..entry.clone()
                    },
                    Some(reason),
                ),
            }
        }
    };
    if next == entry && record.sovereigns.contains_key(sovereign) {
        return refuse(refused.expect("an unchanged entry is a refusal"));
    }
    let mut write = record.clone();
    write.sovereigns.insert(sovereign.to_owned(), next);
    let reply = write.reply(sovereign, refused);
    Decision {
        write: Some(write),
        reply,
    }
}

/// The share a request for `share` gets: a lowering (a return) as asked,
/// always; a raise as far as it fits — the cap (effective: what the others
/// are charged counts), the ceiling and the per-request limit — so that the
/// last units of a cap are granted rather than refused to a step that does
/// not fit whole; refused when nothing more fits.
fn granted_share(
    record: &Record,
    sovereign: &str,
    entry: &Entry,
    share: u64,
    now: DateTime<Utc>,
) -> Result<u64, Refusal> {
    if share <= entry.share {
        return Ok(share);
    }
    if !record.redeemable(now) {
        return Err(Refusal::NotRedeemable);
    }
    let others: u64 = record
        .sovereigns
        .iter()
        .filter(|(name, _)| name.as_str() != sovereign)
        .map(|(_, e)| record.charged(e))
        .sum();
    let fits = record
        .cap
        .saturating_sub(others)
        .min(record.ceiling)
        .min(entry.share.saturating_add(record.per_request));
    match share.min(fits) {
        granted if granted > entry.share => Ok(granted),
        _ => Err(Refusal::Cap),
    }
}

#[cfg(test)]
mod tests;

/// A Sovereign's state for one global code (rule 4: one row, never deleted;
/// a re-created Voucher finds it). The billing row's `max_redemptions` and
/// `active` are derived from it, never from the spec.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Local {
    pub share: u64,
    pub epoch: u32,
    pub version: u64,
    /// The most redemptions ever counted: reversals do not lower it, and no
    /// return goes below it.
    pub high_water: u64,
    /// The request made and not yet answered: re-sent as it is.
    pub outstanding: Option<Request>,
    /// The database identity (system identifier, timeline) the state was
    /// last synced under; another one means a restore or a failover (rule 5).
    pub synced_identity: Option<String>,
    /// A newer epoch the hub asked to sync in (rule 6).
    pub resync_epoch: Option<u32>,
    /// The hub's last word that every unit is granted and spent everywhere
    /// (rule 10): "fully redeemed" (410) rather than "try again" (503).
    #[serde(default)]
    pub gone: bool,
    /// The redemptions the hub last heard of from this Sovereign: once more
    /// are spent, a round reports them (rule 10 decides "used up" from them,
    /// and the hub's status shows them) even when no refill is due.
    #[serde(default)]
    pub reported: u64,
}

/// What applying a reply did to the local state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The share moved to the reply's (a newer version).
    Moved { share: u64 },
    /// An older or equal version: ignored (rule 3).
    Ignored,
    /// The hub asks for a sync first.
    SyncFirst,
}

impl Local {
    /// The cap the billing row carries: the share, while the state was
    /// synced under this database's identity; 0 (an inactive row, never
    /// "unlimited") until then. A newer epoch of the hub alone does not stop
    /// redemptions: the units held were granted (the model check agrees).
    pub fn local_cap(&self, identity: &str) -> u64 {
        if self.synced_identity.as_deref() == Some(identity) {
            self.share
        } else {
            0
        }
    }

    /// A restored or failed-over database, or a newer epoch: no global
    /// redemption until the sync is answered.
    pub fn needs_sync(&self, identity: &str) -> bool {
        self.synced_identity.as_deref() != Some(identity) || self.resync_epoch.is_some()
    }

    /// Counts a redemption (the high-water mark follows the row's counter).
    pub fn counted(&mut self, times_redeemed: u64) {
        self.high_water = self.high_water.max(times_redeemed);
    }

    /// The next request to send, recorded as outstanding: the one already
    /// outstanding (re-sent as it is), a sync when one is needed, or a refill
    /// of `step` more once fewer than `low_water` units are left.
    pub fn next_request(
        &mut self,
        uid: &str,
        identity: &str,
        low_water: u64,
        step: u64,
    ) -> Option<Request> {
        if let Some(outstanding) = &self.outstanding {
            return Some(outstanding.clone());
        }
        let request = if self.needs_sync(identity) {
            // Keep only what was spent after a restore of this database;
            // what it holds when only the hub's epoch moved.
            let restored = self.synced_identity.as_deref() != Some(identity);
            let keep = if restored {
                self.high_water
            } else {
                self.share
            };
            self.share = self.share.min(keep);
            Request::Sync {
                uid: uid.into(),
                epoch: self.resync_epoch.unwrap_or(self.epoch),
                keep,
                used: self.high_water,
            }
        } else if self.share.saturating_sub(self.high_water) < low_water {
            self.set(uid, self.share + step)
        } else if self.high_water > self.reported {
            // A report: the share as it is (changing nothing at the hub but the version
            // and the usage), so the hub's count follows what is spent here.
            self.set(uid, self.share)
        } else {
            return None;
        };
        self.outstanding = Some(request.clone());
        Some(request)
    }

    /// Gives units back down to `keep` (never below the high-water count):
    /// the local cap lowered first, in the same transaction that records the
    /// request — the hub's record is lowered after, so the local cap never
    /// exceeds it. `None` when nothing can be returned or a request is out.
    pub fn give_back(&mut self, uid: &str, keep: u64) -> Option<Request> {
        let keep = keep.max(self.high_water);
        if self.outstanding.is_some() || keep >= self.share {
            return None;
        }
        let request = self.set(uid, keep);
        self.share = keep;
        self.outstanding = Some(request.clone());
        Some(request)
    }

    fn set(&self, uid: &str, share: u64) -> Request {
        Request::Set {
            uid: uid.into(),
            epoch: self.epoch,
            version: self.version,
            share,
            used: self.high_water,
        }
    }

    /// Applies the hub's reply to `request` under the row lock: only a newer
    /// (epoch, version) moves the share (rule 3); the outstanding request is
    /// done once answered.
    pub fn apply(&mut self, request: &Request, reply: &Reply, identity: &str) -> Applied {
        if self.outstanding.as_ref() == Some(request) {
            self.outstanding = None;
        }
        if let (
            Request::Set { used, .. } | Request::Sync { used, .. },
            Reply::Ok { .. } | Reply::Refused { .. },
        ) = (request, reply)
        {
            // Answered: the hub recorded the usage the request carried.
            self.reported = self.reported.max(*used);
        }
        let (epoch, share, version, gone) = match *reply {
            Reply::Ok {
                epoch,
                share,
                version,
                gone,
            }
            | Reply::Refused {
                epoch,
                share,
                version,
                gone,
                ..
            } => (epoch, share, version, gone),
            Reply::SyncFirst { epoch } => {
                if epoch > self.epoch {
                    self.resync_epoch = Some(epoch);
                }
                return Applied::SyncFirst;
            }
            Reply::Unknown => return Applied::Ignored,
        };
        // A refusal for the cap moves no version, yet says whether all is spent.
        if (epoch, version) >= (self.epoch, self.version) {
            self.gone = gone;
        }
        if (epoch, version) <= (self.epoch, self.version) {
            return Applied::Ignored;
        }
        (self.epoch, self.version, self.share) = (epoch, version, share);
        if matches!(request, Request::Sync { .. }) {
            self.synced_identity = Some(identity.into());
            self.resync_epoch = None;
        }
        Applied::Moved { share }
    }
}
