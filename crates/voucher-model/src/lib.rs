//! An explicit-state model check of the cross-Sovereign allotment protocol
//! (docs/federation.md, DESIGN §11): every interleaving of two Sovereigns and
//! two allotment-service replicas, with lost, duplicated, reordered and
//! delayed messages, replica crashes, a Sovereign database backed up and
//! restored, and other writers of a Sovereign's database — searched breadth
//! first, each state once. The promise checked in every reachable state:
//!
//!   Σ redemptions ≤ the global cap, and Σ granted shares ≤ the global cap.
//!
//! Each rule of the protocol is a switch in [`Rules`]; the tests show that
//! with every rule the promise holds, and that with any one rule removed the
//! search finds a trace that breaks it (the trace is the shortest, printed).
//! Rules 4, 6, 8, 10 and 11 of DESIGN §11 are not modelled yet.

#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};

/// Sovereigns in the model.
const S: usize = 2;
/// Allotment-service replicas.
const R: usize = 2;

/// The protocol's rules, each of which can be removed to see why it is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Rule 1: one record per code, every change a compare-and-set on its one
    /// revision. Without: a key per Sovereign, each write checked against its
    /// own key only (the sum read from the other is stale: write skew).
    pub one_record: bool,
    /// Rule 2: a request names the version it was made at and the absolute
    /// share it wants, and is checked on that version. Without: a request is
    /// a relative change (+n / −n), applied whenever it arrives.
    pub versioned_requests: bool,
    /// Rule 2: an OK is sent only after the write is acknowledged. Without:
    /// the replica answers OK, then writes (and may crash in between).
    pub ok_after_write: bool,
    /// Rule 3: a reply is applied only if its version is newer than the one
    /// stored. Without: every reply is applied as it arrives.
    pub newer_replies_only: bool,
    /// Rule 5: a restored database serves no global redemption until the
    /// leader has synced with the hub. Without: it serves from what it holds.
    pub sync_after_restore: bool,
    /// Allotments: only the Sovereign lowers its own share (the hub asks,
    /// rule 7). Without: the hub takes an idle-looking unit back by itself.
    pub only_the_sovereign_lowers: bool,
    /// Rule 9 (and "a zero allotment is an inactive row"): the database guard
    /// holds every writer to the operator's share. Without: the billing
    /// service's checkout reads `max_redemptions`, where 0 means unlimited.
    pub guard: bool,
}

impl Rules {
    /// Every rule in force.
    pub const ALL: Rules = Rules {
        one_record: true,
        versioned_requests: true,
        ok_after_write: true,
        newer_replies_only: true,
        sync_after_restore: true,
        only_the_sovereign_lowers: true,
        guard: true,
    };
}

/// How far the search goes: budgets that keep the state space finite.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub cap: u8,
    /// Requests each Sovereign may send (first sends and re-sends).
    pub requests: u8,
    /// Messages in flight at once.
    pub in_flight: usize,
    /// Faults of each kind (message loss, replica crash, backup/restore).
    pub faults: u8,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            cap: 2,
            requests: 2,
            in_flight: 2,
            faults: 1,
        }
    }
}

/// A request to the allotment service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Request {
    /// "At version `v`, make my share `t`."
    Set { s: u8, v: u8, t: u8 },
    /// A relative change (the design without rule 2).
    Add { s: u8, delta: i8 },
    /// A sync after a restore: bump my version, keep my share.
    Sync { s: u8 },
}

/// A reply of the allotment service: the share and version of the record.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Reply {
    s: u8,
    share: u8,
    version: u8,
    sync: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Message {
    Request(Request),
    Reply(Reply),
}

/// What a replica holds between reading the record and writing it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Pending {
    request: Request,
    /// The revision it read: of the whole record (rule 1), or of the
    /// requester's key alone.
    revision: u16,
    /// The share it decided to write (`None`: a refusal).
    write: Option<u8>,
    /// An OK already sent (without rule 2's "after the write").
    answered: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Sovereign {
    /// `max_redemptions` of the global row: the share as the Sovereign holds it.
    local_cap: u8,
    version: u8,
    redeemed: u8,
    /// The request made and not yet answered (a re-send repeats it).
    outstanding: Option<Request>,
    requests_sent: u8,
    /// A backup of the database: (local cap, version, redemptions).
    backup: Option<(u8, u8, u8)>,
    /// Restored: global redemptions wait for the sync.
    needs_sync: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    shares: [u8; S],
    versions: [u8; S],
    /// The record's revision (rule 1), and each key's (without it).
    revision: u16,
    key_revisions: [u16; S],
    replicas: [Option<Pending>; R],
    sovereigns: [Sovereign; S],
    /// In flight, sorted (a multiset: any may be delivered next).
    network: Vec<Message>,
    losses: u8,
    crashes: u8,
    restores: u8,
    reclaims: u8,
}

impl State {
    fn initial() -> Self {
        let sovereign = Sovereign {
            local_cap: 0,
            version: 0,
            redeemed: 0,
            outstanding: None,
            requests_sent: 0,
            backup: None,
            needs_sync: false,
        };
        State {
            shares: [0; S],
            versions: [0; S],
            revision: 0,
            key_revisions: [0; S],
            replicas: [None, None],
            sovereigns: [sovereign.clone(), sovereign],
            network: Vec::new(),
            losses: 0,
            crashes: 0,
            restores: 0,
            reclaims: 0,
        }
    }

    fn send(&mut self, message: Message) {
        self.network.push(message);
        self.network.sort();
    }

    fn request(&mut self, request: Request) {
        self.send(Message::Request(request));
    }

    fn reply(&mut self, reply: Reply) {
        self.send(Message::Reply(reply));
    }

    fn reply_for(&self, s: u8, sync: bool) -> Reply {
        Reply {
            s,
            share: self.shares[s as usize],
            version: self.versions[s as usize],
            sync,
        }
    }

    /// What the promise says of this state: `Err` names the broken part.
    fn promise(&self, cap: u8) -> Result<(), String> {
        let redeemed: u8 = self.sovereigns.iter().map(|s| s.redeemed).sum();
        let granted: u8 = self.shares.iter().sum();
        if redeemed > cap {
            return Err(format!("{redeemed} redemptions under a cap of {cap}"));
        }
        if granted > cap {
            return Err(format!("{granted} units granted under a cap of {cap}"));
        }
        Ok(())
    }
}

/// One step of the search, named for the trace.
type Step = (String, State);

/// Every state reachable from `state` in one step.
fn next(state: &State, rules: Rules, bounds: Bounds) -> Vec<Step> {
    let mut steps = Vec::new();
    for s in 0..S {
        sovereign_steps(state, s, rules, bounds, &mut steps);
    }
    for r in 0..R {
        replica_steps(state, r, rules, bounds, &mut steps);
    }
    network_steps(state, rules, bounds, &mut steps);
    steps
}

fn sovereign_steps(state: &State, s: usize, rules: Rules, bounds: Bounds, steps: &mut Vec<Step>) {
    let me = &state.sovereigns[s];
    let s8 = s as u8;
    // A redemption by the operator (or, without the guard, the billing service's checkout,
    // for which max_redemptions = 0 means unlimited).
    let serves = !(rules.sync_after_restore && me.needs_sync);
    let under_cap = me.redeemed < me.local_cap;
    let legacy_unlimited = !rules.guard && me.local_cap == 0;
    if (serves && under_cap) || legacy_unlimited {
        let mut next = state.clone();
        next.sovereigns[s].redeemed += 1;
        steps.push((format!("S{s} redeems"), next));
    }
    let room = state.network.len() < bounds.in_flight && me.requests_sent < bounds.requests;
    // Ask for more (one or two units), or give one back (lowered locally first).
    if room && me.outstanding.is_none() && !me.needs_sync {
        for more in 1..=2u8 {
            let t = me.local_cap + more;
            if t > bounds.cap {
                continue;
            }
            let request = if rules.versioned_requests {
                Request::Set {
                    s: s8,
                    v: me.version,
                    t,
                }
            } else {
                Request::Add {
                    s: s8,
                    delta: more as i8,
                }
            };
            let mut next = state.clone();
            next.sovereigns[s].outstanding = Some(request.clone());
            next.sovereigns[s].requests_sent += 1;
            next.request(request);
            steps.push((format!("S{s} asks for {t}"), next));
        }
        if me.local_cap > me.redeemed {
            let t = me.local_cap - 1;
            let request = if rules.versioned_requests {
                Request::Set {
                    s: s8,
                    v: me.version,
                    t,
                }
            } else {
                Request::Add { s: s8, delta: -1 }
            };
            let mut next = state.clone();
            next.sovereigns[s].local_cap = t;
            next.sovereigns[s].outstanding = Some(request.clone());
            next.sovereigns[s].requests_sent += 1;
            next.request(request);
            steps.push((format!("S{s} returns one unit (local cap {t})"), next));
        }
    }
    // A re-send of the outstanding request (a retry after a timeout).
    if room && let Some(request) = me.outstanding.clone() {
        let mut next = state.clone();
        next.sovereigns[s].requests_sent += 1;
        next.request(request);
        steps.push((format!("S{s} re-sends its request"), next));
    }
    // A backup of the database, and later its restore (a changed database identity).
    if me.backup.is_none() && state.restores < bounds.faults {
        let mut next = state.clone();
        next.sovereigns[s].backup = Some((me.local_cap, me.version, me.redeemed));
        steps.push((format!("S{s}'s database is backed up"), next));
    }
    if let Some((local_cap, version, redeemed)) = me.backup
        && state.restores < bounds.faults
    {
        let mut next = state.clone();
        let sov = &mut next.sovereigns[s];
        sov.local_cap = local_cap;
        sov.version = version;
        sov.redeemed = redeemed;
        sov.outstanding = None;
        sov.backup = None;
        sov.needs_sync = true;
        next.restores += 1;
        steps.push((format!("S{s}'s database is restored from the backup"), next));
    }
    if me.needs_sync && rules.sync_after_restore && me.outstanding.is_none() && room {
        let request = Request::Sync { s: s8 };
        let mut next = state.clone();
        next.sovereigns[s].outstanding = Some(request.clone());
        next.sovereigns[s].requests_sent += 1;
        next.request(request);
        steps.push((format!("S{s} syncs with the hub"), next));
    }
}

/// A replica reads a request and the record, decides, and (later) writes.
fn replica_steps(state: &State, r: usize, rules: Rules, bounds: Bounds, steps: &mut Vec<Step>) {
    match &state.replicas[r] {
        None => {
            for (i, message) in state.network.iter().enumerate() {
                let Message::Request(request) = message else {
                    continue;
                };
                let request = request.clone();
                let mut next = state.clone();
                next.network.remove(i);
                let pending = decide(&next, request.clone(), rules, bounds.cap);
                if pending.answered {
                    // Without "OK after the write": the OK goes out first.
                    let s = requester(&request);
                    let share = pending.write.unwrap_or_default();
                    let version = next.versions[s as usize] + 1;
                    next.reply(Reply {
                        s,
                        share,
                        version,
                        sync: matches!(request, Request::Sync { .. }),
                    });
                }
                next.replicas[r] = Some(pending);
                steps.push((format!("replica {r} reads {request:?}"), next));
            }
        }
        Some(pending) => {
            let mut next = state.clone();
            next.replicas[r] = None;
            write(&mut next, pending, rules);
            steps.push((format!("replica {r} writes"), next));
            if state.crashes < bounds.faults {
                let mut crashed = state.clone();
                crashed.replicas[r] = None;
                crashed.crashes += 1;
                steps.push((format!("replica {r} crashes before writing"), crashed));
            }
        }
    }
}

fn requester(request: &Request) -> u8 {
    match request {
        Request::Set { s, .. } | Request::Add { s, .. } | Request::Sync { s } => *s,
    }
}

/// What a replica decides from the record it reads.
fn decide(state: &State, request: Request, rules: Rules, cap: u8) -> Pending {
    let s = requester(&request) as usize;
    let others: u8 = (0..S).filter(|&o| o != s).map(|o| state.shares[o]).sum();
    let wanted: Option<u8> = match &request {
        Request::Set { v, t, .. } => (*v == state.versions[s]).then_some(*t),
        Request::Add { delta, .. } => {
            let t = i16::from(state.shares[s]) + i16::from(*delta);
            u8::try_from(t).ok()
        }
        Request::Sync { .. } => Some(state.shares[s]),
    };
    // A raise only within the cap; a return or a sync always.
    let write = wanted.filter(|&t| t <= state.shares[s] || others + t <= cap);
    let revision = if rules.one_record {
        state.revision
    } else {
        state.key_revisions[s]
    };
    Pending {
        request,
        revision,
        write,
        answered: write.is_some() && !rules.ok_after_write,
    }
}

/// The compare-and-set, and the reply after it.
fn write(state: &mut State, pending: &Pending, rules: Rules) {
    let s = requester(&pending.request);
    let si = s as usize;
    let current = if rules.one_record {
        state.revision
    } else {
        state.key_revisions[si]
    };
    let sync = matches!(pending.request, Request::Sync { .. });
    match pending.write {
        Some(share) if current == pending.revision => {
            state.shares[si] = share;
            state.versions[si] += 1;
            state.revision += 1;
            state.key_revisions[si] += 1;
            if !pending.answered {
                let reply = state.reply_for(s, sync);
                state.reply(reply);
            }
        }
        // Refused (or the revision moved): the record as it is now.
        _ if !pending.answered => {
            let reply = state.reply_for(s, sync);
            state.reply(reply);
        }
        _ => {}
    }
}

fn network_steps(state: &State, rules: Rules, bounds: Bounds, steps: &mut Vec<Step>) {
    for (i, message) in state.network.iter().enumerate() {
        // Lost.
        if state.losses < bounds.faults {
            let mut next = state.clone();
            next.network.remove(i);
            next.losses += 1;
            steps.push((format!("{message:?} is lost"), next));
        }
        // A reply delivered to its Sovereign.
        if let Message::Reply(reply) = message {
            let mut next = state.clone();
            next.network.remove(i);
            let sov = &mut next.sovereigns[reply.s as usize];
            if !rules.newer_replies_only || reply.version > sov.version {
                sov.local_cap = reply.share;
                sov.version = reply.version;
                sov.outstanding = None;
                if reply.sync {
                    sov.needs_sync = false;
                }
            }
            steps.push((format!("S{} receives {reply:?}", reply.s), next));
        }
    }
    // Without the rule: the hub takes an idle-looking unit back by itself.
    if !rules.only_the_sovereign_lowers && state.reclaims < bounds.faults {
        for s in 0..S {
            if state.shares[s] > 0 {
                let mut next = state.clone();
                next.shares[s] -= 1;
                next.versions[s] += 1;
                next.revision += 1;
                next.key_revisions[s] += 1;
                next.reclaims += 1;
                steps.push((format!("the hub takes a unit back from S{s}"), next));
            }
        }
    }
}

/// What the search found.
#[derive(Debug)]
pub enum Outcome {
    /// The promise held in every reachable state; how many there were.
    Holds { states: usize },
    /// The shortest trace to a state that breaks it, and what broke.
    Broken { trace: Vec<String>, broken: String },
}

/// Searches every state reachable under `rules` within `bounds`.
pub fn check(rules: Rules, bounds: Bounds) -> Outcome {
    // Each state once: its index, the step that first reached it and from where.
    let mut index: HashMap<State, usize> = HashMap::new();
    let mut states: Vec<State> = vec![State::initial()];
    let mut parent: Vec<Option<(usize, String)>> = vec![None];
    index.insert(states[0].clone(), 0);
    let mut queue = VecDeque::from([0usize]);
    while let Some(at) = queue.pop_front() {
        if let Err(broken) = states[at].promise(bounds.cap) {
            let mut trace = Vec::new();
            let mut here = at;
            while let Some((before, step)) = &parent[here] {
                trace.push(step.clone());
                here = *before;
            }
            trace.reverse();
            return Outcome::Broken { trace, broken };
        }
        for (step, next) in next(&states[at], rules, bounds) {
            if index.contains_key(&next) {
                continue;
            }
            let id = states.len();
            index.insert(next.clone(), id);
            states.push(next);
            parent.push(Some((at, step)));
            queue.push_back(id);
        }
    }
    Outcome::Holds {
        states: states.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broken_without(rules: Rules, bounds: Bounds, why: &str) {
        match check(rules, bounds) {
            Outcome::Broken { trace, broken } => {
                println!("without {why}: {broken}\n  {}", trace.join("\n  "));
            }
            Outcome::Holds { states } => {
                panic!("without {why} the promise still held in all {states} states")
            }
        }
    }

    #[test]
    fn the_promise_holds_in_every_reachable_state_with_every_rule() {
        match check(Rules::ALL, Bounds::default()) {
            Outcome::Holds { states } => {
                println!("{states} states, the promise held in each");
                assert!(states > 1000, "the search explored {states} states only");
            }
            Outcome::Broken { trace, broken } => {
                panic!("{broken} after:\n  {}", trace.join("\n  "))
            }
        }
    }

    #[test]
    fn each_rule_removed_lets_the_search_break_the_promise() {
        // (the rule removed, how far to search, why it is there)
        let wide = Bounds::default();
        // A duplicated or stale reply to a return needs a third request (ask, re-send, return).
        let deep = Bounds {
            requests: 3,
            ..Bounds::default()
        };
        let cases: [(Rules, Bounds, &str); 7] = [
            (
                Rules {
                    one_record: false,
                    ..Rules::ALL
                },
                wide,
                "one record per code (write skew)",
            ),
            (
                Rules {
                    versioned_requests: false,
                    ..Rules::ALL
                },
                deep,
                "versioned absolute requests (a duplicate applies twice)",
            ),
            (
                Rules {
                    ok_after_write: false,
                    ..Rules::ALL
                },
                wide,
                "an OK only after the write (an OK whose compare-and-set then fails)",
            ),
            (
                Rules {
                    newer_replies_only: false,
                    ..Rules::ALL
                },
                deep,
                "newer replies only (a stale reply undoes a return)",
            ),
            (
                Rules {
                    sync_after_restore: false,
                    ..Rules::ALL
                },
                wide,
                "a sync after a restore (the returned units served again)",
            ),
            (
                Rules {
                    only_the_sovereign_lowers: false,
                    ..Rules::ALL
                },
                wide,
                "only the Sovereign lowers its share (the hub reclaims a spent unit)",
            ),
            (
                Rules {
                    guard: false,
                    ..Rules::ALL
                },
                wide,
                "the guard (max_redemptions 0 means unlimited to the legacy checkout)",
            ),
        ];
        for (rules, bounds, why) in cases {
            broken_without(rules, bounds, why);
        }
    }
}
