//! Voucher codes: how user input becomes the key of a `promo_codes` row.

use std::fmt;

/// Longest code the billing database accepts from the operator (1 + 63 characters).
pub const MAX_CODE_LEN: usize = 64;
/// Shortest code (1 + 2 characters): shorter codes are too easy to guess.
pub const MIN_CODE_LEN: usize = 3;

/// What a code may look like as written in a manifest, before normalisation
/// (lower case is upper-cased): the CRD's schema checks it.
pub const CODE_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9_-]{2,63}$";

/// The billing service's normalisation: surrounding whitespace trimmed, ASCII upper-cased.
/// Applied to every code before lookup, on every surface (preview, redemption, issue).
pub fn normalize(input: &str) -> String {
    input.trim().to_ascii_uppercase()
}

/// A normalised, valid voucher code: `[A-Z0-9][A-Z0-9_-]{2,63}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Code(String);

/// Why a piece of input is not a voucher code; the message is shown to people as is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    #[error("the code is empty")]
    Empty,
    #[error("the code {code:?} is too short: it needs at least {MIN_CODE_LEN} characters")]
    TooShort { code: String },
    #[error("the code is too long: it has {len} characters, at most {MAX_CODE_LEN} are allowed")]
    TooLong { len: usize },
    #[error("the code {code:?} must start with a letter or a digit")]
    BadStart { code: String },
    #[error(
        "the code {code:?} contains {found:?}: only letters A-Z, digits, '-' and '_' are allowed"
    )]
    BadCharacter { code: String, found: char },
}

impl Code {
    /// Normalises `input` and checks it against the code grammar.
    pub fn parse(input: &str) -> Result<Self, CodeError> {
        let code = normalize(input);
        let len = code.chars().count();
        if len == 0 {
            return Err(CodeError::Empty);
        }
        if len > MAX_CODE_LEN {
            return Err(CodeError::TooLong { len });
        }
        if let Some(found) = code
            .chars()
            .find(|c| !(c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
        {
            return Err(CodeError::BadCharacter { code, found });
        }
        if !code.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(CodeError::BadStart { code });
        }
        if len < MIN_CODE_LEN {
            return Err(CodeError::TooShort { code });
        }
        Ok(Self(code))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Code {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normalises_like_the_billing_service() {
        assert_eq!(normalize("  omantel-muscat-200\t"), "OMANTEL-MUSCAT-200");
        assert_eq!(
            Code::parse(" launch_2026 ").unwrap().as_str(),
            "LAUNCH_2026"
        );
    }

    #[test]
    fn rejects_each_kind_of_bad_code_with_its_reason() {
        assert_eq!(Code::parse("   "), Err(CodeError::Empty));
        assert!(matches!(Code::parse("ab"), Err(CodeError::TooShort { .. })));
        assert!(matches!(
            Code::parse(&"A".repeat(65)),
            Err(CodeError::TooLong { len: 65 })
        ));
        assert!(matches!(
            Code::parse("-ABC"),
            Err(CodeError::BadStart { .. })
        ));
        assert!(matches!(
            Code::parse("SUMMER SALE"),
            Err(CodeError::BadCharacter { found: ' ', .. })
        ));
        assert!(matches!(
            Code::parse("CAFÉ-10"),
            Err(CodeError::BadCharacter { found: 'É', .. })
        ));
        let message = Code::parse("a.b.c").unwrap_err().to_string();
        assert!(
            message.contains("'.'") || message.contains("\".\""),
            "{message}"
        );
    }

    #[test]
    fn accepts_the_boundaries_of_the_grammar() {
        assert!(Code::parse("A1-").is_ok());
        assert!(Code::parse(&"Z".repeat(64)).is_ok());
        assert!(Code::parse("0__").is_ok());
    }

    proptest! {
        #[test]
        fn normalisation_is_idempotent(s in "\\PC{0,80}") {
            let once = normalize(&s);
            prop_assert_eq!(normalize(&once), once.clone());
        }

        #[test]
        fn every_valid_code_survives_case_and_whitespace_noise(
            code in "[A-Z0-9][A-Z0-9_-]{2,63}",
            lead in "[ \t\n]{0,3}",
            trail in "[ \t\n]{0,3}",
            lower in any::<bool>(),
        ) {
            let noisy = if lower { code.to_ascii_lowercase() } else { code.clone() };
            let parsed = Code::parse(&format!("{lead}{noisy}{trail}")).unwrap();
            prop_assert_eq!(parsed.as_str(), code.as_str());
        }

        #[test]
        fn parse_accepts_exactly_the_grammar(s in "\\PC{0,70}") {
            let normalized = normalize(&s);
            let grammar = normalized.len() >= MIN_CODE_LEN
                && normalized.len() <= MAX_CODE_LEN
                && normalized.chars().enumerate().all(|(i, c)| {
                    c.is_ascii_uppercase() || c.is_ascii_digit() || (i > 0 && (c == '-' || c == '_'))
                });
            prop_assert_eq!(Code::parse(&s).is_ok(), grammar);
        }

        #[test]
        fn a_parsed_code_is_already_normal(s in "[a-zA-Z0-9_ -]{0,70}") {
            if let Ok(code) = Code::parse(&s) {
                prop_assert_eq!(normalize(code.as_str()), code.as_str());
                prop_assert_eq!(Code::parse(code.as_str()).unwrap(), code);
            }
        }
    }
}
