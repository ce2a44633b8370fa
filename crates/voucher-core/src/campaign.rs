//! Campaign codes: the unique single-use codes a campaign issues. Code *i* of
//! a campaign is a pure function of the campaign's secret key, its identity
//! (namespace and name) and *i* — an HMAC — so that re-applying the same
//! manifest with the same key, in another cluster or after a restore, yields
//! the same codes, and no code ever needs to be written down in configuration.

use hmac::{Hmac, Mac};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::code::{Code, MAX_CODE_LEN};

/// Crockford's base32: digits and letters without I, L, O and U, which read
/// as 1, 1, 0 and V on a printed bill insert.
pub const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Shortest random part: 8 characters of 5 bits, 40 bits per code.
pub const MIN_CODE_LENGTH: usize = 8;
/// The random part's length unless a campaign says otherwise (50 bits: 1,024
/// codes under [`max_count`]; more need a longer one, said explicitly). Never
/// changed: a manifest that leaves it out must derive the same codes in any
/// cluster, in any release.
pub const DEFAULT_CODE_LENGTH: usize = 10;
/// Longest random part: an HMAC-SHA256 holds 51 characters of 5 bits.
pub const MAX_CODE_LENGTH: usize = 51;
/// Most codes one campaign issues.
pub const MAX_COUNT: u32 = 1_000_000;
/// Shortest generator key, in bytes (256 bits, the HMAC's own size).
pub const MIN_KEY_LEN: usize = 32;

/// Most codes a campaign whose random part has `length` characters may
/// issue: so many that a guess still finds one at most once in 2^40 tries
/// (32^length / count ≥ 2^40, i.e. count ≤ 32^(length − 8)). One in 1.1
/// million, as 8 characters for a million codes would give, is found by a
/// /48 of IPv6 within seconds whatever the per-client limits.
pub fn max_count(length: usize) -> u64 {
    let spare = length.saturating_sub(MIN_CODE_LENGTH).min(12);
    1u64 << (5 * spare)
}

/// The shortest random part for `count` codes under [`max_count`].
pub fn min_code_length(count: u32) -> usize {
    (MIN_CODE_LENGTH..=MAX_CODE_LENGTH)
        .find(|&length| u64::from(count) <= max_count(length))
        .unwrap_or(MAX_CODE_LENGTH)
}

/// Why a campaign cannot generate codes; the message is shown to people as is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CampaignError {
    /// Its length is not said: a campaign may name any Secret of its namespace.
    #[error("the generator key is shorter than {MIN_KEY_LEN} bytes")]
    WeakKey(usize),
    #[error(
        "the random part of a code must have {MIN_CODE_LENGTH} to {MAX_CODE_LENGTH} characters, \
         not {0}"
    )]
    CodeLength(usize),
    #[error(
        "the prefix {0:?} may hold only letters A-Z, digits, '-' and '_', and must start with a \
         letter or a digit"
    )]
    Prefix(String),
    #[error(
        "the prefix and the random part make {0} characters; a code has at most {MAX_CODE_LEN}"
    )]
    TooLong(usize),
    #[error(
        "{count} codes of {length} random characters could be guessed once in {} tries; \
         {count} codes need a codeLength of at least {} (one in 2^40)",
        (1u128 << (5 * (*length).min(25))) / u128::from(*count).max(1), min_code_length(*count)
    )]
    Guessable { count: u32, length: usize },
}

/// Refuses `count` codes of `length` random characters past [`max_count`].
pub fn check_guessing(count: u32, length: usize) -> Result<(), CampaignError> {
    match u64::from(count) <= max_count(length) {
        true => Ok(()),
        false => Err(CampaignError::Guessable { count, length }),
    }
}

/// The codes of one campaign.
#[derive(Clone)]
pub struct Generator {
    mac: Hmac<Sha256>,
    prefix: String,
    length: usize,
    fingerprint: String,
}

impl Generator {
    /// The generator of the campaign `namespace/name`: codes `prefix` + `length`
    /// characters of [`ALPHABET`], keyed by `key`.
    pub fn new(
        key: &[u8],
        namespace: &str,
        name: &str,
        prefix: &str,
        length: usize,
    ) -> Result<Self, CampaignError> {
        if key.len() < MIN_KEY_LEN {
            return Err(CampaignError::WeakKey(key.len()));
        }
        if !(MIN_CODE_LENGTH..=MAX_CODE_LENGTH).contains(&length) {
            return Err(CampaignError::CodeLength(length));
        }
        let prefix = prefix.to_ascii_uppercase();
        let valid = prefix
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-' || c == '_')
            && prefix
                .chars()
                .next()
                .is_none_or(|c| c.is_ascii_alphanumeric());
        if !valid {
            return Err(CampaignError::Prefix(prefix));
        }
        if prefix.len() + length > MAX_CODE_LEN {
            return Err(CampaignError::TooLong(prefix.len() + length));
        }
        // Which key made a campaign's codes, recorded with them: a key that
        // changes later would make other codes. Keyed, so it tells nothing
        // of the key.
        let mut tag = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        tag.update(b"voucher-operator/campaign/key-fingerprint/v1");
        let fingerprint = tag.finalize().into_bytes()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        // The campaign's identity, each part with its length, so that no two
        // (namespace, name) pairs feed the same bytes.
        mac.update(b"voucher-operator/campaign/v1");
        for part in [namespace, name] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        Ok(Self {
            mac,
            prefix,
            length,
            fingerprint,
        })
    }

    /// A fingerprint of the key (32 hex digits), the same for the same key
    /// whatever the campaign: to tell whether a key is the one recorded.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Code number `index` (0-based).
    pub fn code(&self, index: u32) -> Code {
        let mut mac = self.mac.clone();
        mac.update(&index.to_be_bytes());
        let digest = mac.finalize().into_bytes();
        let mut code = self.prefix.clone();
        // 5 bits a character, from the digest's leading bits.
        for i in 0..self.length {
            let bit = i * 5;
            let (byte, shift) = (bit / 8, bit % 8);
            let pair = (u16::from(digest[byte]) << 8)
                | u16::from(digest.get(byte + 1).copied().unwrap_or(0));
            let value = (pair >> (11 - shift)) & 0x1f;
            code.push(char::from(ALPHABET[usize::from(value)]));
        }
        Code::parse(&code).expect("a prefix and base32 characters make a valid code")
    }
}

/// The subject of a campaign's own audit records, where a code's records have
/// the code: `CAMPAIGN:<NAMESPACE>/<NAME>`, upper-cased like codes (so that
/// `events --code campaign:billing/bill-2027` finds them) and never a code
/// (codes hold no ':').
pub fn subject(namespace: &str, name: &str) -> String {
    format!("CAMPAIGN:{namespace}/{name}").to_ascii_uppercase()
}

/// The lifecycle phase shown in a campaign's `.status.phase`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum CampaignPhase {
    /// Codes are being written to the billing database.
    Generating,
    /// Every code exists and can be redeemed now.
    Active,
    /// Switched off by `spec.active: false`.
    Inactive,
    /// Before `spec.validFrom`.
    Scheduled,
    /// At or after `spec.expiresAt`.
    Expired,
    /// Suspended (the admin endpoint or its annotation): none of its codes can be
    /// redeemed, whatever the spec says, until lifted.
    Suspended,
    /// Cannot go on until a person acts (no key, a code collision, invalid terms).
    Stalled,
    /// The campaign is outside the issuer namespaces; nothing was written.
    Forbidden,
    /// The last reconcile failed (e.g. the database is unreachable); retrying.
    Error,
}

impl CampaignPhase {
    pub const ALL: [CampaignPhase; 9] = [
        Self::Generating,
        Self::Active,
        Self::Inactive,
        Self::Scheduled,
        Self::Expired,
        Self::Suspended,
        Self::Stalled,
        Self::Forbidden,
        Self::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Generating => "Generating",
            Self::Active => "Active",
            Self::Inactive => "Inactive",
            Self::Scheduled => "Scheduled",
            Self::Expired => "Expired",
            Self::Suspended => "Suspended",
            Self::Stalled => "Stalled",
            Self::Forbidden => "Forbidden",
            Self::Error => "Error",
        }
    }
}

/// Which campaign a record or a code belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignName {
    pub namespace: String,
    pub name: String,
}

/// Code indices `from..to` of a campaign (`count` of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeRange {
    pub from: u32,
    pub to: u32,
    pub count: u32,
}

impl CodeRange {
    pub fn new(from: u32, to: u32) -> Self {
        Self {
            from,
            to,
            count: to.saturating_sub(from),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    /// Codes 0, 1 and 999,999 of billing/bill-2027 with KEY, as first released
    /// (computed independently, with Python's hmac and hashlib, from the
    /// description in this module: HMAC-SHA256 over the tag, the length-prefixed
    /// namespace and name and the big-endian index; 5 bits a character from the
    /// digest's first bit).
    #[test]
    fn a_valid_code_takes_at_least_two_to_the_forty_guesses() {
        assert_eq!(max_count(8), 1);
        assert_eq!(max_count(12), 1 << 20);
        for count in [1, 2, 32, 33, 1024, 100_000, MAX_COUNT] {
            let length = min_code_length(count);
            let space = 1u128 << (5 * length);
            assert!(
                space / u128::from(count) >= 1 << 40,
                "{count} codes of {length}"
            );
            // One character less would be guessable.
            if length > MIN_CODE_LENGTH {
                assert!((1u128 << (5 * (length - 1))) / u128::from(count) < 1 << 40);
                assert!(check_guessing(count, length - 1).is_err());
            }
            assert_eq!(check_guessing(count, length), Ok(()));
        }
        assert_eq!(min_code_length(MAX_COUNT), 12);
        assert_eq!(max_count(DEFAULT_CODE_LENGTH), 1024);
        // The finding: a million codes of 8 characters, one guess in 1.1 million.
        let error = check_guessing(1_000_000, 8).unwrap_err().to_string();
        assert!(error.contains("once in 1099511 tries"), "{error}");
        assert!(error.contains("at least 12"), "{error}");
    }

    const PINNED: [&str; 3] = [
        "OMANTEL-BILL-93N9DB6D2J",
        "OMANTEL-BILL-8J34P2M78Z",
        "OMANTEL-BILL-00RT2Z4JYF",
    ];

    /// The length the pinned codes were printed with (the default then).
    const PINNED_LENGTH: usize = 10;

    fn generator(namespace: &str, name: &str) -> Generator {
        Generator::new(KEY, namespace, name, "OMANTEL-BILL-", PINNED_LENGTH).unwrap()
    }

    #[test]
    fn the_same_key_and_campaign_give_the_same_codes_anywhere() {
        let (a, b) = (
            generator("billing", "bill-2027"),
            generator("billing", "bill-2027"),
        );
        for i in [0, 1, 999_999] {
            assert_eq!(a.code(i), b.code(i));
        }
        assert_ne!(a.code(0), a.code(1));
        // Another campaign, namespace or key: other codes.
        assert_ne!(a.code(0), generator("billing", "bill-2028").code(0));
        assert_ne!(a.code(0), generator("partners", "bill-2027").code(0));
        let other_key =
            Generator::new(&[7; 32], "billing", "bill-2027", "OMANTEL-BILL-", 10).unwrap();
        assert_ne!(a.code(0), other_key.code(0));
        // Identity parts are length-prefixed: "ab"/"c" is not "a"/"bc".
        assert_ne!(generator("ab", "c").code(0), generator("a", "bc").code(0));
    }

    #[test]
    fn codes_are_the_prefix_and_unambiguous_base32() {
        let g = generator("billing", "bill-2027");
        for i in 0..1000 {
            let code = g.code(i);
            let random = code.as_str().strip_prefix("OMANTEL-BILL-").unwrap();
            assert_eq!(random.len(), PINNED_LENGTH);
            assert!(random.bytes().all(|b| ALPHABET.contains(&b)), "{code}");
            assert!(!random.contains(['I', 'L', 'O', 'U']), "{code}");
        }
    }

    /// Codes already printed on bill inserts must keep matching: the derivation
    /// never changes (a new one would need a new version tag in the HMAC input).
    #[test]
    fn the_derivation_is_stable_across_releases() {
        let g = generator("billing", "bill-2027");
        assert_eq!(g.code(0).as_str(), PINNED[0]);
        assert_eq!(g.code(1).as_str(), PINNED[1]);
        assert_eq!(g.code(999_999).as_str(), PINNED[2]);
    }

    #[test]
    fn a_hundred_thousand_codes_are_distinct() {
        let g = generator("billing", "bill-2027");
        let codes: HashSet<Code> = (0..100_000).map(|i| g.code(i)).collect();
        assert_eq!(codes.len(), 100_000);
    }

    #[test]
    fn weak_keys_short_codes_and_bad_prefixes_are_refused() {
        let new =
            |key: &[u8], prefix: &str, length| Generator::new(key, "ns", "c", prefix, length).err();
        assert_eq!(new(&[1; 31], "P-", 10), Some(CampaignError::WeakKey(31)));
        assert_eq!(new(KEY, "P-", 7), Some(CampaignError::CodeLength(7)));
        assert_eq!(new(KEY, "P-", 52), Some(CampaignError::CodeLength(52)));
        assert_eq!(new(KEY, "-P", 10), Some(CampaignError::Prefix("-P".into())));
        assert_eq!(
            new(KEY, "P Q", 10),
            Some(CampaignError::Prefix("P Q".into()))
        );
        assert_eq!(
            new(KEY, &"P".repeat(60), 10),
            Some(CampaignError::TooLong(70))
        );
        assert!(new(KEY, "bill-", 8).is_none(), "lower case is upper-cased");
        assert!(new(KEY, "", 8).is_none(), "no prefix at all");
        assert!(
            !CampaignError::WeakKey(5).to_string().contains('5'),
            "never a Secret's length"
        );
    }

    #[test]
    fn the_fingerprint_tells_keys_apart_and_nothing_of_them() {
        let a = generator("billing", "bill-2027");
        assert_eq!(a.fingerprint(), generator("other", "name").fingerprint());
        let other = Generator::new(&[7; 32], "billing", "bill-2027", "P-", 10).unwrap();
        assert_ne!(a.fingerprint(), other.fingerprint());
        assert_eq!(a.fingerprint().len(), 32);
        assert!(
            !a.fingerprint().contains("3031"),
            "not the key's bytes in hex"
        );
    }

    #[test]
    fn every_bit_of_the_random_part_varies() {
        // Each character position takes many values over many codes: no bits are stuck.
        let g = Generator::new(KEY, "ns", "c", "", MAX_CODE_LENGTH).unwrap();
        let codes: Vec<Code> = (0..2000).map(|i| g.code(i)).collect();
        for position in 0..MAX_CODE_LENGTH {
            let seen: HashSet<u8> = codes
                .iter()
                .map(|c| c.as_str().as_bytes()[position])
                .collect();
            assert!(
                seen.len() >= 24,
                "position {position}: {} values",
                seen.len()
            );
        }
    }
}
