//! Rate limits of the HTTP API, in the process (governor): per client
//! address (an IPv6 client by its /64, which one subscriber gets whole), per
//! token subject on the authenticated endpoints, on failed authentications
//! per client, and on unknown codes per code prefix (whoever asks: a guesser
//! of a campaign's codes spread over many addresses still shares one
//! budget). Every limiter forgets keys whose budget is full again, so memory
//! follows the clients of the last moments only.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// How many requests each budget allows.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LimitSettings {
    /// Per client on every public and admin endpoint, and its burst.
    pub(crate) per_minute: u32,
    pub burst: u32,
    /// Per token subject on redeem and the admin endpoints (a customer, or
    /// an administrator's script).
    pub(crate) per_subject_per_minute: u32,
    /// Failed authentications per client before it is refused outright
    /// until its budget refills.
    pub auth_failures_per_minute: u32,
    /// Unknown codes asked for under one prefix (by anyone), on the preview
    /// and redeem, before that prefix is refused until its budget refills.
    pub guesses_per_minute: u32,
}

/// Why a request must wait, and how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Wait {
    pub what: Budget,
    pub(crate) retry_after: Duration,
}

/// Which budget ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Budget {
    Client,
    Subject,
    AuthFailures,
    Guesses,
}

/// Failures counted per key: once a key's budget is spent, it is refused
/// outright until the budget has room again.
struct Failures<K: Hash + Eq + Clone> {
    budget: Budget,
    limiter: DefaultKeyedRateLimiter<K>,
    /// Keys that failed too often, until when.
    blocked: Mutex<HashMap<K, Instant>>,
}

impl<K: Hash + Eq + Clone> Failures<K> {
    fn new(budget: Budget, per_minute: u32) -> Self {
        Self {
            budget,
            limiter: RateLimiter::keyed(quota(per_minute, per_minute)),
            blocked: Mutex::default(),
        }
    }

    /// Whether `key` is refused for its failures.
    fn blocked(&self, key: &K) -> Result<(), Wait> {
        let now = Instant::now();
        let mut blocked = self.blocked.lock().unwrap();
        match blocked.get(key) {
            Some(until) if *until > now => Err(Wait {
                what: self.budget,
                retry_after: *until - now,
            }),
            Some(_) => {
                blocked.remove(key);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Counts a failure of `key`; `true` when it spent the budget (the key is
    /// blocked from now on).
    fn failed(&self, key: K) -> bool {
        let Err(not_until) = self.limiter.check_key(&key) else {
            return false;
        };
        let retry = wait(self.budget, not_until).retry_after;
        self.blocked
            .lock()
            .unwrap()
            .insert(key, Instant::now() + retry.max(Duration::from_secs(1)));
        true
    }

    fn retain_recent(&self) {
        self.limiter.retain_recent();
        let now = Instant::now();
        self.blocked.lock().unwrap().retain(|_, until| *until > now);
    }
}

pub(crate) struct Limits {
    clients: DefaultKeyedRateLimiter<IpAddr>,
    subjects: DefaultKeyedRateLimiter<String>,
    auth_failures: Failures<IpAddr>,
    guesses: Failures<String>,
}

fn quota(per_minute: u32, burst: u32) -> Quota {
    let per_minute = NonZeroU32::new(per_minute.max(1)).expect("at least 1");
    let burst = NonZeroU32::new(burst.max(1)).expect("at least 1");
    Quota::per_minute(per_minute).allow_burst(burst)
}

fn wait(what: Budget, not_until: governor::NotUntil<governor::clock::QuantaInstant>) -> Wait {
    Wait {
        what,
        retry_after: not_until.wait_time_from(DefaultClock::default().now()),
    }
}

impl Limits {
    pub fn new(settings: LimitSettings) -> Self {
        let per_subject = settings.per_subject_per_minute;
        Self {
            clients: RateLimiter::keyed(quota(settings.per_minute, settings.burst)),
            subjects: RateLimiter::keyed(quota(per_subject, per_subject)),
            auth_failures: Failures::new(Budget::AuthFailures, settings.auth_failures_per_minute),
            guesses: Failures::new(Budget::Guesses, settings.guesses_per_minute),
        }
    }

    /// Counts a request of the client at `ip`.
    pub fn client(&self, ip: IpAddr) -> Result<(), Wait> {
        self.clients
            .check_key(&client_key(ip))
            .map_err(|n| wait(Budget::Client, n))
    }

    /// Counts a request of an authenticated `subject`.
    pub fn subject(&self, subject: &str) -> Result<(), Wait> {
        self.subjects
            .check_key(&subject.to_owned())
            .map_err(|n| wait(Budget::Subject, n))
    }

    /// Whether the client at `ip` is refused for its failed authentications.
    pub(crate) fn auth_blocked(&self, ip: IpAddr) -> Result<(), Wait> {
        self.auth_failures.blocked(&client_key(ip))
    }

    /// Counts a failed authentication of the client at `ip`; once its budget
    /// is spent, it is blocked until the budget has room again.
    pub(crate) fn auth_failed(&self, ip: IpAddr) {
        self.auth_failures.failed(client_key(ip));
    }

    /// Whether codes under the prefix of `code` are refused for the unknown
    /// codes asked for under it (checked before the code is looked up, so
    /// that a refusal says nothing of the code).
    pub(crate) fn guesses_blocked(&self, code: &str) -> Result<(), Wait> {
        self.guesses.blocked(&guess_prefix(code).to_owned())
    }

    /// Counts an unknown code asked for; `true` when it spent its prefix's
    /// budget.
    pub fn guessed(&self, code: &str) -> bool {
        self.guesses.failed(guess_prefix(code).to_owned())
    }

    /// Forgets every client and subject whose budget is full again.
    pub(crate) fn retain_recent(&self) {
        self.clients.retain_recent();
        self.subjects.retain_recent();
        self.auth_failures.retain_recent();
        self.guesses.retain_recent();
    }

    /// How many keys the limiters hold (for the memory bound).
    pub(crate) fn tracked(&self) -> usize {
        self.clients.len()
            + self.subjects.len()
            + self.auth_failures.limiter.len()
            + self.guesses.limiter.len()
    }
}

/// What a guess of a campaign's code shares with every other guess of it: the
/// code up to its last '-' or '_' (a campaign's prefix, as `OMANTEL-BILL-`),
/// or nothing for a code without one (all such codes share one budget).
pub(crate) fn guess_prefix(code: &str) -> &str {
    code.rfind(['-', '_']).map_or("", |at| &code[..=at])
}

/// The key a client is limited by: its IPv4 address, or the /64 of its IPv6
/// address (a subscriber's prefix: rotating inside it gains nothing).
pub(crate) fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

/// One `X-Forwarded-For` entry: an address, `v4:port`, `[v6]` or `[v6]:port`.
pub(crate) fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse().ok())
        })
}

/// The client of a request from `peer` that carried the `X-Forwarded-For`
/// `entries`: read from the right, past the `trusted` proxies, the first
/// address none of them is (the peer itself unless it is a trusted proxy).
/// An entry that is not an address ends the walk at the hop that wrote it:
/// skipping it would make the entry to its left — which the client may have
/// written itself — the client.
pub(crate) fn forwarded_client(peer: IpAddr, entries: &[&str], trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut hop = peer;
    for entry in entries.iter().rev() {
        match forwarded_ip(entry) {
            Some(ip) if is_trusted(&ip) => hop = ip,
            Some(ip) => return ip,
            None => return hop,
        }
    }
    peer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::new(LimitSettings {
            per_minute: 60,
            burst: 2,
            per_subject_per_minute: 3,
            auth_failures_per_minute: 2,
            guesses_per_minute: 100,
        })
    }

    #[test]
    fn an_ipv6_client_is_limited_by_its_64() {
        let l = limits();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:fffe".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(l.client(a).is_ok() && l.client(b).is_ok());
        assert_eq!(l.client(a).unwrap_err().what, Budget::Client, "same /64");
        assert!(l.client(other).is_ok(), "another /64");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn guesses_of_one_prefix_share_a_budget_whoever_asks() {
        assert_eq!(guess_prefix("OMANTEL-BILL-7Q2M9XK4TR1D"), "OMANTEL-BILL-");
        assert_eq!(guess_prefix("SPRING_SALE"), "SPRING_");
        assert_eq!(guess_prefix("LAUNCH50"), "");
        let limits = Limits::new(LimitSettings {
            per_minute: 1000,
            burst: 1000,
            per_subject_per_minute: 1000,
            auth_failures_per_minute: 10,
            guesses_per_minute: 3,
        });
        for guess in ["BILL-AAAA", "BILL-BBBB", "BILL-CCCC"] {
            assert_eq!(limits.guesses_blocked(guess), Ok(()));
            assert!(!limits.guessed(guess));
        }
        // The fourth unknown code under BILL- spends the budget: every BILL- code waits, a real
        // one too (a refusal before the lookup says nothing of the code), other prefixes not.
        assert!(limits.guessed("BILL-DDDD"));
        let wait = limits.guesses_blocked("BILL-REAL").unwrap_err();
        assert_eq!(wait.what, Budget::Guesses);
        assert!(wait.retry_after > Duration::ZERO);
        assert_eq!(limits.guesses_blocked("SPRING-1"), Ok(()));
    }

    #[test]
    fn an_entry_that_is_no_address_never_lets_the_client_name_itself() {
        let proxies: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "10.0.0.5".parse().unwrap();
        let client = |entries: &[&str]| forwarded_client(peer, entries, &proxies);
        assert_eq!(
            client(&["203.0.113.9"]),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client(&["198.51.100.1", "203.0.113.9", "10.0.0.7"]),
            "203.0.113.9".parse::<IpAddr>().unwrap(),
            "past the trusted hops, the first that is not one"
        );
        // "unknown" written by a hop: the client is not the forgeable entry to its left.
        assert_eq!(
            client(&["198.51.100.1", "unknown", "10.0.0.7"]),
            "10.0.0.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client(&["198.51.100.1", "garbage"]), peer);
        assert_eq!(client(&[]), peer);
        // An untrusted peer is the client, whatever it says.
        let outsider: IpAddr = "192.0.2.4".parse().unwrap();
        assert_eq!(
            forwarded_client(outsider, &["203.0.113.9"], &proxies),
            outsider
        );
    }

    #[test]
    fn forwarded_entries_with_ports_are_parsed() {
        let ip = |s: &str| forwarded_ip(s);
        assert_eq!(ip(" 192.0.2.7 "), Some("192.0.2.7".parse().unwrap()));
        assert_eq!(ip("192.0.2.7:4711"), Some("192.0.2.7".parse().unwrap()));
        assert_eq!(
            ip("[2001:db8::1]:4711"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(ip("[2001:db8::1]"), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(ip("2001:db8::1"), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(ip("unknown"), None);
    }

    #[test]
    fn subjects_and_failed_authentications_have_budgets_of_their_own() {
        let l = limits();
        for _ in 0..3 {
            l.subject("alice").unwrap();
        }
        assert_eq!(l.subject("alice").unwrap_err().what, Budget::Subject);
        assert!(l.subject("bob").is_ok());
        let client: IpAddr = "192.0.2.9".parse().unwrap();
        l.auth_failed(client);
        l.auth_failed(client);
        assert!(l.auth_blocked(client).is_ok(), "within its budget");
        l.auth_failed(client);
        let blocked = l.auth_blocked(client).unwrap_err();
        assert_eq!(blocked.what, Budget::AuthFailures);
        assert!(blocked.retry_after > Duration::ZERO);
    }

    /// A million distinct clients (each within its budget) are forgotten
    /// once their budgets refill; a million addresses of one /64 are one key.
    #[test]
    fn the_limiters_memory_stays_bounded_under_a_million_keys() {
        let l = limits();
        for i in 0..1_000_000u32 {
            let _ = l.client(IpAddr::V4(i.into()));
        }
        assert_eq!(l.tracked(), 1_000_000);
        // One request each: refilled a second later (60 a minute); with room to spare.
        std::thread::sleep(Duration::from_millis(2500));
        l.retain_recent();
        assert_eq!(l.tracked(), 0);
        let base = u128::from("2001:db8:7:7::".parse::<Ipv6Addr>().unwrap());
        for i in 0..1_000_000u128 {
            let _ = l.client(IpAddr::V6(Ipv6Addr::from(base | i)));
        }
        assert_eq!(l.tracked(), 1);
    }
}
