//! The live codes the public preview shows, from memory: a bounded cache of
//! code → row, and of codes known not to exist, kept true by the
//! `promo_codes` trigger's notifications (each names the code it changed).
//!
//! Trusted only while the notifications are heard: until the listener is
//! connected, and from a lost connection until it is back, every preview
//! reads the database; a reconnect empties the cache (what changed in the gap
//! was not heard). A short time-to-live bounds any staleness the rest could
//! leave. A read that an invalidation overtook is not cached.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use moka::sync::Cache;
use tokio_util::sync::CancellationToken;

use crate::domain::{Code, CodeRecord};
use crate::store::notify::{CODES_CHANNEL, Changed, Notification};
use crate::store::{Result, Store};

/// Codes remembered, existing and unknown each: bounds memory whatever the
/// traffic (an enumeration of random codes only cycles the unknown ones).
const CAPACITY: u64 = 100_000;
/// The safety net: an entry is read again from the database after this long.
const TIME_TO_LIVE: Duration = Duration::from_secs(10);
/// How long an invalidation is remembered against reads in flight: longer
/// than any read takes (the request timeout is shorter).
const INVALIDATION_MEMORY: Duration = Duration::from_secs(60);

pub struct Codes {
    known: Cache<String, Arc<CodeRecord>>,
    unknown: Cache<String, ()>,
    /// Code → the epoch its last invalidation took.
    invalidated: Cache<String, u64>,
    /// Counts invalidations; a read notes it before going to the database.
    epoch: AtomicU64,
    /// The epoch of the last emptying (a reconnect).
    cleared: AtomicU64,
    /// Whether notifications are heard now.
    listening: AtomicBool,
}

/// How a preview found its code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    Memory,
    Database,
}

impl Default for Codes {
    fn default() -> Self {
        Self {
            known: Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(TIME_TO_LIVE)
                .build(),
            unknown: Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(TIME_TO_LIVE)
                .build(),
            invalidated: Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(INVALIDATION_MEMORY)
                .build(),
            epoch: AtomicU64::new(0),
            cleared: AtomicU64::new(0),
            listening: AtomicBool::new(false),
        }
    }
}

impl Codes {
    /// The live row of `code` (`None`: unknown or soft-deleted), from memory
    /// when it can be trusted.
    pub async fn find_live(
        &self,
        store: &Store,
        code: &Code,
    ) -> Result<(Option<Arc<CodeRecord>>, Lookup)> {
        let key = code.as_str();
        if self.listening.load(Ordering::Acquire) {
            if let Some(record) = self.known.get(key) {
                return Ok((Some(record), Lookup::Memory));
            }
            if self.unknown.contains_key(key) {
                return Ok((None, Lookup::Memory));
            }
        }
        let started = self.epoch.load(Ordering::Acquire);
        let record = store.find_live(code).await?.map(Arc::new);
        // Cached only when no invalidation of this code (or emptying) came
        // after the read began, and while notifications are heard.
        if self.listening.load(Ordering::Acquire) && !self.overtaken(key, started) {
            match &record {
                Some(record) => self.known.insert(key.to_owned(), record.clone()),
                None => self.unknown.insert(key.to_owned(), ()),
            }
            // An invalidation may have run between the check and the insert
            // (its marker is written before it removes): look again.
            if self.overtaken(key, started) || !self.listening.load(Ordering::Acquire) {
                self.known.invalidate(key);
                self.unknown.invalidate(key);
            }
        }
        Ok((record, Lookup::Database))
    }

    /// Whether an invalidation of `key`, or an emptying, came after `started`.
    fn overtaken(&self, key: &str, started: u64) -> bool {
        self.cleared.load(Ordering::Acquire) > started
            || self.invalidated.get(key).is_some_and(|at| at > started)
    }

    /// Forgets `code`: called for each notification, and by this server at
    /// once after its own change (its next preview must show it, whenever
    /// the notification arrives).
    pub(crate) fn invalidate(&self, code: &str) {
        // The marker first: a read that inserts after this sees it and undoes.
        let at = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.invalidated.insert(code.to_owned(), at);
        self.known.invalidate(code);
        self.unknown.invalidate(code);
    }

    /// Forgets every code: a campaign's change, or a reconnect.
    pub(crate) fn empty(&self) {
        // The marker first: a read that inserts after this sees it and undoes.
        let at = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.cleared.store(at, Ordering::Release);
        self.known.invalidate_all();
        self.unknown.invalidate_all();
    }

    /// Entries held (existing and unknown codes), for the metrics.
    pub(crate) fn entries(&self) -> u64 {
        self.known.entry_count() + self.unknown.entry_count()
    }

    /// Follows the notifications until `stop`: each names a changed code.
    pub async fn follow(self: Arc<Self>, store: Store, stop: CancellationToken) {
        let mut notifications = Box::pin(store.listen(CODES_CHANNEL));
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                next = notifications.next() => next,
            };
            match next {
                Some(Notification::Payload(payload)) => match Changed::of(&payload) {
                    Changed::Code(code) => self.invalidate(code.as_str()),
                    // A campaign's bulk change, switch or suspension: any code
                    // may have changed.
                    Changed::Campaign(_) | Changed::Any => self.empty(),
                    // Its row's own notification says what changed.
                    Changed::Voucher { .. } => {}
                },
                Some(Notification::Connected) => {
                    // Whatever changed while nothing was heard is forgotten.
                    self.empty();
                    self.listening.store(true, Ordering::Release);
                }
                Some(Notification::Disconnected) => {
                    self.listening.store(false, Ordering::Release);
                    self.empty();
                }
                None => return,
            }
        }
    }
}
