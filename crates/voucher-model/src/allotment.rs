//! The allotment protocol: a global cap shared out among Sovereigns in
//! versioned shares, every change a compare-and-set on the hub's one record
//! for the code (DESIGN §11, docs/federation.md).
//!
//! The actors: up to three Sovereigns (each its database and its operator's
//! leader), two allotment-service replicas (each reads the record, decides,
//! then writes with a compare-and-set — or crashes in between), the network
//! (any message delivered next, duplicated by re-sends, or lost), and the
//! vendor (backs up and restores the hub, lowers the cap). A former leader of
//! a Sovereign is a delayed duplicate of a request it made; the model has no
//! other kind of leader: what a Sovereign holds is its database.

use crate::search::{self, Model, Outcome};

/// Sovereigns the state has room for.
pub const MAX_SOVEREIGNS: usize = 3;
/// Allotment-service replicas.
const REPLICAS: usize = 2;

/// The protocol's rules, each of which can be removed to see why it is there
/// (the numbers are DESIGN §11's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// 1: one record per code, every change a compare-and-set on its one
    /// revision. Without: a key per Sovereign, each write checked against its
    /// own key only (the sum read from the others is stale: write skew).
    pub one_record: bool,
    /// 2: a request names the version it was made at and the absolute share
    /// it wants, and is checked on that version. Without: a relative change
    /// (+n / −n), applied whenever it arrives.
    pub versioned_requests: bool,
    /// 2: an OK is sent only after the write is acknowledged. Without: the
    /// replica answers OK, then writes (and may crash or lose the race).
    pub ok_after_write: bool,
    /// 3: a reply is applied only if its (epoch, version) is newer than the
    /// one stored. Without: every reply is applied as it arrives.
    pub newer_replies_only: bool,
    /// 4: the Sovereign's state for a code is never deleted (a re-created
    /// Voucher keeps its share, version and high-water redemption count).
    /// Without: deleting the Voucher deletes it, and the new row starts
    /// from share 0, version 0 and a redemption count of 0.
    pub local_state_kept: bool,
    /// 5: a restored database serves no global redemption until the leader
    /// has synced with the hub (keeping only its high-water count). Without:
    /// it serves from what the backup held.
    pub sync_after_restore: bool,
    /// 6: a restored hub starts a new epoch, answers "sync first" to every
    /// Sovereign that has not reported in it, and grants nothing while one
    /// has not (charged its ceiling). Without: the record simply goes back
    /// to the backup's.
    pub new_epoch_after_hub_restore: bool,
    /// 7: lowering the cap is a write on the record (it moves the revision,
    /// so a grant decided under the old cap fails its compare-and-set), and
    /// the effective cap is max(new cap, Σ shares). Without: the cap is read
    /// from the definition, beside the record.
    pub cap_change_moves_the_record: bool,
    /// 7: only the Sovereign lowers its own share (the hub asks). Without:
    /// the hub takes an idle-looking unit back by itself.
    pub only_the_sovereign_lowers: bool,
    /// 9 (and "a zero allotment is an inactive row"): the database guard
    /// holds every writer to the operator's share. Without: the billing
    /// service's checkout reads `max_redemptions`, where 0 means unlimited.
    pub guard: bool,
    /// 10: the record carries each Sovereign's reported redemptions, and
    /// "used up" (410) is answered only when every unit is granted and
    /// reported spent. Without: 410 as soon as every unit is granted.
    pub reported_usage: bool,
    /// 11 (and 2's "the Sovereign taken from its NATS account"): a Sovereign
    /// can only ask for itself, through the allotment service's subjects.
    /// Without: a request names its Sovereign in the body, and a buggy or
    /// hostile Sovereign returns another's share.
    pub identity_from_account: bool,
}

impl Rules {
    /// Every rule in force.
    pub const ALL: Rules = Rules {
        one_record: true,
        versioned_requests: true,
        ok_after_write: true,
        newer_replies_only: true,
        local_state_kept: true,
        sync_after_restore: true,
        new_epoch_after_hub_restore: true,
        cap_change_moves_the_record: true,
        only_the_sovereign_lowers: true,
        guard: true,
        reported_usage: true,
        identity_from_account: true,
    };
}

/// How many faults of each kind a search may inject.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Faults {
    /// A message lost.
    pub loss: u8,
    /// A replica crashing between its read and its write.
    pub crash: u8,
    /// A Sovereign database restored from a backup (its identity changes).
    pub db_restore: u8,
    /// The hub's bucket restored from a backup (the service stopped).
    pub hub_restore: u8,
    /// A Voucher deleted and re-created on a Sovereign.
    pub recreate: u8,
    /// The vendor lowering the cap by one.
    pub lower_cap: u8,
    /// A request in another Sovereign's name (only without rule 11).
    pub forge: u8,
    /// The hub taking a unit back by itself (only without rule 7's).
    pub reclaim: u8,
}

impl Faults {
    /// The faults every search has: loss, a replica crash, a database restore.
    pub const BASE: Faults = Faults {
        loss: 1,
        crash: 1,
        db_restore: 1,
        hub_restore: 0,
        recreate: 0,
        lower_cap: 0,
        forge: 0,
        reclaim: 0,
    };
}

/// How far a search goes: budgets that keep the state space finite.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub sovereigns: usize,
    pub cap: u8,
    /// Requests each Sovereign may send (first sends, re-sends and syncs).
    pub requests: u8,
    /// Messages in flight at once.
    pub in_flight: usize,
    pub faults: Faults,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            sovereigns: 2,
            cap: 2,
            requests: 2,
            in_flight: 2,
            faults: Faults::BASE,
        }
    }
}

/// A request to the allotment service. `s` is the Sovereign it is for: its
/// NATS account under rule 11, the body's word without it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Request {
    /// "In `epoch`, at version `v`, make my share `t`; I have spent `used`."
    Set {
        s: u8,
        epoch: u8,
        v: u8,
        t: u8,
        used: u8,
    },
    /// A relative change (the design without rule 2).
    Add { s: u8, delta: i8 },
    /// A sync (a restored database, a new epoch): bump my version, keep at
    /// most `t` (what I may still spend), I have spent `used`.
    Sync { s: u8, epoch: u8, t: u8, used: u8 },
}

impl Request {
    fn sovereign(self) -> u8 {
        match self {
            Request::Set { s, .. } | Request::Add { s, .. } | Request::Sync { s, .. } => s,
        }
    }
}

/// A reply: the record's share and version for the Sovereign (read after
/// the write, or after the failure), whether every unit is used up, and the
/// request it answers. `resync`: the hub's epoch is newer than the request's
/// or has no report from the Sovereign yet — sync first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Reply {
    s: u8,
    epoch: u8,
    share: u8,
    version: u8,
    gone: bool,
    resync: bool,
    to: Request,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Message {
    Request(Request),
    Reply(Reply),
}

/// The hub's record of one code.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Record {
    epoch: u8,
    cap: u8,
    shares: [u8; MAX_SOVEREIGNS],
    versions: [u8; MAX_SOVEREIGNS],
    reported: [u8; MAX_SOVEREIGNS],
    /// Reported in this epoch (all, in the first).
    known: [bool; MAX_SOVEREIGNS],
    /// The record's revision (rule 1), and each per-Sovereign key's (without it).
    revision: u8,
    key_revisions: [u8; MAX_SOVEREIGNS],
}

/// The part of the record a backup of the bucket holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RecordBackup {
    shares: [u8; MAX_SOVEREIGNS],
    versions: [u8; MAX_SOVEREIGNS],
    reported: [u8; MAX_SOVEREIGNS],
}

/// What a replica holds between reading the record and writing it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Pending {
    request: Request,
    /// The revision it read: of the whole record (rule 1), or of the
    /// requester's key alone.
    revision: u8,
    /// The Sovereign's entry it decided to write (`None`: a refusal).
    write: Option<Entry>,
    /// An OK already sent (without rule 2's "after the write").
    answered: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Entry {
    share: u8,
    version: u8,
    reported: u8,
}

/// A Sovereign's database (and what its leader acts on).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Sovereign {
    /// `max_redemptions` of the global row: the share as the Sovereign holds it.
    local_cap: u8,
    epoch: u8,
    version: u8,
    /// The row's redemption count (`times_redeemed`), which the guard checks.
    counter: u8,
    /// Redemptions in the ledger (what the promise counts).
    redeemed: u8,
    /// The request made and not yet answered (a re-send repeats it).
    outstanding: Option<Request>,
    requests_sent: u8,
    backup: Option<Backup>,
    /// Restored: global redemptions wait for the sync (rule 5).
    needs_sync: bool,
    /// A newer epoch the hub asked this Sovereign to sync in (rule 6).
    resync_epoch: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Backup {
    local_cap: u8,
    epoch: u8,
    version: u8,
    counter: u8,
    redeemed: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct State {
    hub: Record,
    hub_backup: Option<RecordBackup>,
    replicas: [Option<Pending>; REPLICAS],
    sovereigns: [Sovereign; MAX_SOVEREIGNS],
    /// In flight, sorted (a multiset: any may be delivered next).
    network: Vec<Message>,
    used: Faults,
    /// What Σ shares and Σ redemptions may reach: the cap, and after a
    /// lowering max(new cap, Σ shares at that moment).
    bound: u8,
    /// "Used up" answered by this Sovereign while that one held an unused unit.
    wrong_answer: Option<(u8, u8)>,
}

/// A step of a trace (its fields are read by `Debug`, for the trace).
#[derive(Clone, Debug)]
#[allow(dead_code)]
pub(crate) enum Step {
    Redeems { s: u8 },
    Asks { s: u8, t: u8 },
    ReturnsOne { s: u8, local_cap: u8 },
    ReSends { s: u8 },
    Syncs { s: u8, keeps: u8 },
    DatabaseBackedUp { s: u8 },
    DatabaseRestored { s: u8 },
    VoucherRecreated { s: u8 },
    Forges { s: u8, request: Request },
    ReplicaReads { r: u8, request: Request },
    ReplicaWrites { r: u8 },
    ReplicaCrashes { r: u8 },
    Lost { message: Message },
    Delivered { reply: Reply },
    HubBackedUp,
    HubRestored,
    CapLowered { to: u8 },
    HubTakesAUnitFrom { s: u8 },
}

/// A search: the rules in force and the bounds.
pub struct Check {
    pub rules: Rules,
    pub bounds: Bounds,
}

impl Check {
    pub fn run(&self) -> Outcome {
        assert!((1..=MAX_SOVEREIGNS).contains(&self.bounds.sovereigns));
        search::check(self)
    }

    fn sovereigns(&self) -> std::ops::Range<usize> {
        0..self.bounds.sovereigns
    }
}

impl Model for Check {
    type State = State;
    type Step = Step;

    fn initial(&self) -> State {
        let sovereign = Sovereign {
            local_cap: 0,
            epoch: 0,
            version: 0,
            counter: 0,
            redeemed: 0,
            outstanding: None,
            requests_sent: 0,
            backup: None,
            needs_sync: false,
            resync_epoch: 0,
        };
        State {
            hub: Record {
                epoch: 0,
                cap: self.bounds.cap,
                shares: [0; MAX_SOVEREIGNS],
                versions: [0; MAX_SOVEREIGNS],
                reported: [0; MAX_SOVEREIGNS],
                known: [true; MAX_SOVEREIGNS],
                revision: 0,
                key_revisions: [0; MAX_SOVEREIGNS],
            },
            hub_backup: None,
            replicas: [None, None],
            sovereigns: [sovereign.clone(), sovereign.clone(), sovereign],
            network: Vec::new(),
            used: Faults::default(),
            bound: self.bounds.cap,
            wrong_answer: None,
        }
    }

    fn next(&self, state: &State, steps: &mut Vec<(Step, State)>) {
        for s in self.sovereigns() {
            self.sovereign_steps(state, s, steps);
        }
        for r in 0..REPLICAS {
            self.replica_steps(state, r, steps);
        }
        self.network_steps(state, steps);
        self.vendor_steps(state, steps);
    }

    fn promise(&self, state: &State) -> Result<(), String> {
        let n = self.bounds.sovereigns;
        let redeemed: u8 = state.sovereigns[..n].iter().map(|s| s.redeemed).sum();
        // A Sovereign's entry in a restored record, before it reports, is
        // no grant: it is charged the ceiling until it says what it holds.
        let granted: u8 = (0..n)
            .filter(|&s| state.hub.known[s])
            .map(|s| state.hub.shares[s])
            .sum();
        if redeemed > state.bound {
            return Err(format!(
                "{redeemed} redemptions where {} may be",
                state.bound
            ));
        }
        if granted > state.bound {
            return Err(format!(
                "{granted} units granted where {} may be",
                state.bound
            ));
        }
        if let Some((s, holder)) = state.wrong_answer {
            return Err(format!(
                "S{s} answered 'used up' while S{holder} held an unused unit"
            ));
        }
        Ok(())
    }
}

impl Check {
    fn sovereign_steps(&self, state: &State, s: usize, steps: &mut Vec<(Step, State)>) {
        let rules = self.rules;
        let me = &state.sovereigns[s];
        let s8 = s as u8;
        // A redemption by the operator (or, without the guard, the billing
        // service's checkout, for which max_redemptions = 0 means unlimited).
        let serves = !me.needs_sync && me.counter < me.local_cap;
        let legacy_unlimited = !rules.guard && me.local_cap == 0;
        if serves || legacy_unlimited {
            let mut next = state.clone();
            next.sovereigns[s].counter += 1;
            next.sovereigns[s].redeemed += 1;
            steps.push((Step::Redeems { s: s8 }, next));
        }
        let room =
            state.network.len() < self.bounds.in_flight && me.requests_sent < self.bounds.requests;
        let must_sync = me.needs_sync || me.resync_epoch > me.epoch;
        if room && me.outstanding.is_none() && !must_sync {
            self.ask_or_return(state, s, steps);
        }
        // A re-send of the outstanding request (a retry after a timeout).
        if room && let Some(request) = me.outstanding {
            let mut next = state.clone();
            next.sovereigns[s].requests_sent += 1;
            next.send(Message::Request(request));
            steps.push((Step::ReSends { s: s8 }, next));
        }
        if room && me.outstanding.is_none() && must_sync {
            // Keep only what was spent after a restore (the high-water count),
            // what may still be spent otherwise; lowered locally first.
            let keeps = if me.needs_sync {
                me.counter
            } else {
                me.local_cap
            };
            let request = Request::Sync {
                s: s8,
                epoch: me.epoch.max(me.resync_epoch),
                t: keeps,
                used: me.counter,
            };
            let mut next = state.clone();
            let sov = &mut next.sovereigns[s];
            sov.local_cap = keeps;
            sov.outstanding = Some(request);
            sov.requests_sent += 1;
            next.send(Message::Request(request));
            steps.push((Step::Syncs { s: s8, keeps }, next));
        }
        self.database_steps(state, s, steps);
        // Without rule 11: this Sovereign returns another's share in its name.
        if !rules.identity_from_account && state.used.forge < self.bounds.faults.forge {
            for victim in self.sovereigns().filter(|&o| o != s) {
                let request = Request::Set {
                    s: victim as u8,
                    epoch: state.hub.epoch,
                    v: state.hub.versions[victim],
                    t: 0,
                    used: 0,
                };
                let mut next = state.clone();
                next.used.forge += 1;
                next.send(Message::Request(request));
                steps.push((Step::Forges { s: s8, request }, next));
            }
        }
    }

    /// Ask for one or two more units, or give one back (lowered locally first).
    fn ask_or_return(&self, state: &State, s: usize, steps: &mut Vec<(Step, State)>) {
        let me = &state.sovereigns[s];
        let s8 = s as u8;
        let request = |t: u8, delta: i8| {
            if self.rules.versioned_requests {
                Request::Set {
                    s: s8,
                    epoch: me.epoch,
                    v: me.version,
                    t,
                    used: me.counter,
                }
            } else {
                Request::Add { s: s8, delta }
            }
        };
        for more in 1..=2u8 {
            let t = me.local_cap + more;
            if t > self.bounds.cap {
                continue;
            }
            let request = request(t, more as i8);
            let mut next = state.clone();
            next.sovereigns[s].outstanding = Some(request);
            next.sovereigns[s].requests_sent += 1;
            next.send(Message::Request(request));
            steps.push((Step::Asks { s: s8, t }, next));
        }
        if me.local_cap > me.counter {
            let t = me.local_cap - 1;
            let request = request(t, -1);
            let mut next = state.clone();
            next.sovereigns[s].local_cap = t;
            next.sovereigns[s].outstanding = Some(request);
            next.sovereigns[s].requests_sent += 1;
            next.send(Message::Request(request));
            steps.push((
                Step::ReturnsOne {
                    s: s8,
                    local_cap: t,
                },
                next,
            ));
        }
    }

    /// A backup and its restore; a Voucher deleted and re-created.
    fn database_steps(&self, state: &State, s: usize, steps: &mut Vec<(Step, State)>) {
        let me = &state.sovereigns[s];
        let s8 = s as u8;
        let restores_left = state.used.db_restore < self.bounds.faults.db_restore;
        if me.backup.is_none() && restores_left {
            let mut next = state.clone();
            next.sovereigns[s].backup = Some(Backup {
                local_cap: me.local_cap,
                epoch: me.epoch,
                version: me.version,
                counter: me.counter,
                redeemed: me.redeemed,
            });
            steps.push((Step::DatabaseBackedUp { s: s8 }, next));
        }
        if let Some(backup) = &me.backup
            && restores_left
        {
            let mut next = state.clone();
            let sov = &mut next.sovereigns[s];
            sov.local_cap = backup.local_cap;
            sov.epoch = backup.epoch;
            sov.version = backup.version;
            sov.counter = backup.counter;
            sov.redeemed = backup.redeemed;
            sov.outstanding = None;
            sov.backup = None;
            sov.needs_sync = self.rules.sync_after_restore;
            next.used.db_restore += 1;
            steps.push((Step::DatabaseRestored { s: s8 }, next));
        }
        // With rule 4 the re-created Voucher finds its state: nothing changes.
        if !self.rules.local_state_kept && state.used.recreate < self.bounds.faults.recreate {
            let mut next = state.clone();
            let sov = &mut next.sovereigns[s];
            sov.local_cap = 0;
            sov.epoch = 0;
            sov.version = 0;
            sov.counter = 0;
            sov.outstanding = None;
            next.used.recreate += 1;
            steps.push((Step::VoucherRecreated { s: s8 }, next));
        }
    }

    /// A replica reads a request and the record, decides, and (later) writes.
    fn replica_steps(&self, state: &State, r: usize, steps: &mut Vec<(Step, State)>) {
        let r8 = r as u8;
        match &state.replicas[r] {
            None => {
                for (i, message) in state.network.iter().enumerate() {
                    let Message::Request(request) = *message else {
                        continue;
                    };
                    let mut next = state.clone();
                    next.network.remove(i);
                    let pending = self.decide(&next.hub, request);
                    if pending.answered {
                        // Without "OK after the write": the OK goes out first.
                        let entry = pending.write.expect("only an OK is answered early");
                        let reply = Reply {
                            s: request.sovereign(),
                            epoch: next.hub.epoch,
                            share: entry.share,
                            version: entry.version,
                            gone: false,
                            resync: false,
                            to: request,
                        };
                        next.send(Message::Reply(reply));
                    }
                    next.replicas[r] = Some(pending);
                    steps.push((Step::ReplicaReads { r: r8, request }, next));
                }
            }
            Some(pending) => {
                let mut next = state.clone();
                next.replicas[r] = None;
                self.write(&mut next, pending);
                steps.push((Step::ReplicaWrites { r: r8 }, next));
                if state.used.crash < self.bounds.faults.crash {
                    let mut crashed = state.clone();
                    crashed.replicas[r] = None;
                    crashed.used.crash += 1;
                    steps.push((Step::ReplicaCrashes { r: r8 }, crashed));
                }
            }
        }
    }

    /// What the record charges Sovereign `s`: its share, or the ceiling
    /// (here the whole cap) while it has not reported in this epoch.
    fn charged(&self, hub: &Record, s: usize) -> u8 {
        if hub.known[s] {
            hub.shares[s]
        } else {
            self.bounds.cap
        }
    }

    /// What a replica decides from the record it reads.
    fn decide(&self, hub: &Record, request: Request) -> Pending {
        let rules = self.rules;
        let s = request.sovereign() as usize;
        let others: u8 = self
            .sovereigns()
            .filter(|&o| o != s)
            .map(|o| self.charged(hub, o))
            .sum();
        let share = hub.shares[s];
        let version = hub.versions[s];
        let write = match request {
            Request::Set { epoch, .. } if epoch != hub.epoch || !hub.known[s] => None,
            Request::Set { v, t, used, .. } if v == version => {
                let fits = t <= share || others + t <= hub.cap;
                let t = if fits { t } else { share };
                // A refusal for the cap still records the usage reported.
                (fits || used != hub.reported[s]).then_some(Entry {
                    share: t,
                    version: if fits { version + 1 } else { version },
                    reported: used,
                })
            }
            Request::Set { .. } => None,
            Request::Add { delta, .. } => {
                let t = u8::try_from(i16::from(share) + i16::from(delta)).ok();
                t.filter(|&t| t <= share || others + t <= hub.cap)
                    .map(|t| Entry {
                        share: t,
                        version: version + 1,
                        reported: hub.reported[s],
                    })
            }
            Request::Sync { epoch, t, used, .. } if epoch == hub.epoch => Some(Entry {
                // A sync never raises a share the record knows.
                share: if hub.known[s] { t.min(share) } else { t },
                version: version + 1,
                reported: used,
            }),
            Request::Sync { .. } => None,
        };
        let revision = if rules.one_record {
            hub.revision
        } else {
            hub.key_revisions[s]
        };
        let grants = write.is_some_and(|e| e.version > version);
        Pending {
            request,
            revision,
            write,
            answered: grants && !rules.ok_after_write,
        }
    }

    /// The compare-and-set, and the reply after it.
    fn write(&self, state: &mut State, pending: &Pending) {
        let s = pending.request.sovereign() as usize;
        let current = if self.rules.one_record {
            state.hub.revision
        } else {
            state.hub.key_revisions[s]
        };
        if let Some(entry) = pending.write
            && current == pending.revision
        {
            let hub = &mut state.hub;
            hub.shares[s] = entry.share;
            hub.versions[s] = entry.version;
            hub.reported[s] = entry.reported;
            if matches!(pending.request, Request::Sync { .. }) {
                hub.known[s] = true;
            }
            hub.revision += 1;
            hub.key_revisions[s] += 1;
        }
        if !pending.answered {
            let reply = self.reply(&state.hub, pending.request);
            state.send(Message::Reply(reply));
        }
    }

    /// The record as it is now, for the requester.
    fn reply(&self, hub: &Record, request: Request) -> Reply {
        let s = request.sovereign() as usize;
        let n = self.bounds.sovereigns;
        let all_granted = hub.shares[..n].iter().sum::<u8>() >= hub.cap;
        let all_spent = (0..n).all(|o| hub.known[o] && hub.reported[o] == hub.shares[o]);
        let epoch_of = match request {
            Request::Set { epoch, .. } | Request::Sync { epoch, .. } => epoch,
            Request::Add { .. } => hub.epoch,
        };
        let resync =
            epoch_of != hub.epoch || (!hub.known[s] && !matches!(request, Request::Sync { .. }));
        Reply {
            s: s as u8,
            epoch: hub.epoch,
            share: hub.shares[s],
            version: hub.versions[s],
            gone: all_granted && (all_spent || !self.rules.reported_usage),
            resync,
            to: request,
        }
    }

    fn network_steps(&self, state: &State, steps: &mut Vec<(Step, State)>) {
        for (i, message) in state.network.iter().enumerate() {
            if state.used.loss < self.bounds.faults.loss {
                let mut next = state.clone();
                next.network.remove(i);
                next.used.loss += 1;
                steps.push((Step::Lost { message: *message }, next));
            }
            if let Message::Reply(reply) = *message {
                let mut next = state.clone();
                next.network.remove(i);
                self.deliver(&mut next, reply);
                steps.push((Step::Delivered { reply }, next));
            }
        }
    }

    /// A reply applied by its Sovereign under the row lock.
    fn deliver(&self, state: &mut State, reply: Reply) {
        let s = reply.s as usize;
        let sov = &mut state.sovereigns[s];
        if sov.outstanding == Some(reply.to) {
            sov.outstanding = None;
        }
        if reply.resync {
            sov.resync_epoch = sov.resync_epoch.max(reply.epoch);
            return;
        }
        let newer = (reply.epoch, reply.version) > (sov.epoch, sov.version);
        if newer || !self.rules.newer_replies_only {
            sov.local_cap = reply.share;
            sov.epoch = reply.epoch;
            sov.version = reply.version;
            if matches!(reply.to, Request::Sync { .. }) {
                sov.needs_sync = false;
            }
        }
        // A customer at a Sovereign whose share is spent hears "used up".
        let spent = !sov.needs_sync && sov.counter >= sov.local_cap;
        if reply.gone && spent && state.wrong_answer.is_none() {
            let holder = self.sovereigns().find(|&o| {
                let other = &state.sovereigns[o];
                !other.needs_sync && other.counter < other.local_cap.min(state.hub.shares[o])
            });
            state.wrong_answer = holder.map(|o| (reply.s, o as u8));
        }
    }

    fn vendor_steps(&self, state: &State, steps: &mut Vec<(Step, State)>) {
        let faults = self.bounds.faults;
        let idle = state.replicas.iter().all(Option::is_none);
        let restores_left = state.used.hub_restore < faults.hub_restore;
        if state.hub_backup.is_none() && restores_left {
            let mut next = state.clone();
            next.hub_backup = Some(RecordBackup {
                shares: state.hub.shares,
                versions: state.hub.versions,
                reported: state.hub.reported,
            });
            steps.push((Step::HubBackedUp, next));
        }
        // Restored only with the service stopped (no replica mid-request).
        if let Some(backup) = &state.hub_backup
            && restores_left
            && idle
        {
            let mut next = state.clone();
            let hub = &mut next.hub;
            hub.shares = backup.shares;
            hub.versions = backup.versions;
            hub.reported = backup.reported;
            hub.revision += 1;
            if self.rules.new_epoch_after_hub_restore {
                hub.epoch += 1;
                hub.known = [false; MAX_SOVEREIGNS];
            }
            next.hub_backup = None;
            next.used.hub_restore += 1;
            steps.push((Step::HubRestored, next));
        }
        if state.used.lower_cap < faults.lower_cap && state.hub.cap > 1 {
            let mut next = state.clone();
            let to = state.hub.cap - 1;
            // Σ shares as the hub must count them: a Sovereign not heard from
            // since a restore is charged its ceiling.
            let granted: u8 = self.sovereigns().map(|s| self.charged(&state.hub, s)).sum();
            next.hub.cap = to;
            next.bound = next.bound.min(to.max(granted));
            if self.rules.cap_change_moves_the_record {
                next.hub.revision += 1;
            }
            next.used.lower_cap += 1;
            steps.push((Step::CapLowered { to }, next));
        }
        // Without the rule: the hub takes an idle-looking unit back by itself.
        if !self.rules.only_the_sovereign_lowers && state.used.reclaim < faults.reclaim {
            for s in self.sovereigns() {
                if state.hub.shares[s] > 0 {
                    let mut next = state.clone();
                    let hub = &mut next.hub;
                    hub.shares[s] -= 1;
                    hub.versions[s] += 1;
                    hub.revision += 1;
                    hub.key_revisions[s] += 1;
                    next.used.reclaim += 1;
                    steps.push((Step::HubTakesAUnitFrom { s: s as u8 }, next));
                }
            }
        }
    }
}

impl State {
    fn send(&mut self, message: Message) {
        let at = self.network.partition_point(|m| *m < message);
        self.network.insert(at, message);
    }
}

#[cfg(test)]
mod tests;
