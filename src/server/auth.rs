//! Bearer tokens: HS256 with the billing service's shared secret, and/or
//! RS256/ES256 verified with the keys of a JWKS URL (Keycloak). The
//! algorithm decides the key source, so a token can never pick its own key
//! type: `alg: none` and HS256-signed-with-the-public-key are rejected.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use axum::http;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;

/// How tokens are checked.
#[derive(Clone, Debug)]
pub struct AuthSettings {
    pub hs256_secret: Option<String>,
    /// The secret before the current one, accepted too while a rotation is
    /// under way (every signer moved to the new one): then removed.
    pub hs256_previous_secret: Option<String>,
    pub jwks_url: Option<String>,
    /// The `iss` and `aud` tokens must carry: the JWKS's (required with it),
    /// and the HS256 tokens' unless these have their own below.
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The `iss` and `aud` of HS256 tokens, when the billing service's
    /// differ from the identity provider's.
    pub hs256_issuer: Option<String>,
    pub hs256_audience: Option<String>,
    /// Allowed clock skew for `exp` and `nbf` (at most [`MAX_LEEWAY`]).
    pub leeway: Duration,
    /// The claim that names the customer's tenant, when the identity
    /// provider sets one: it then wins over what the request body says.
    pub tenant_claim: Option<String>,
}

impl Default for AuthSettings {
    /// Nothing to check tokens with yet (a start refuses it), and the
    /// flags' clock leeway.
    fn default() -> Self {
        Self {
            hs256_secret: None,
            hs256_previous_secret: None,
            jwks_url: None,
            issuer: None,
            audience: None,
            hs256_issuer: None,
            hs256_audience: None,
            leeway: Duration::from_secs(30),
            tenant_claim: None,
        }
    }
}

/// The roles that may administer vouchers.
pub(crate) const ADMIN_ROLES: [&str; 2] = ["superadmin", "sovereign-admin"];

/// Who a valid token speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub email: String,
    pub roles: Vec<String>,
    /// The tenant the token names (see `AuthSettings::tenant_claim`).
    pub tenant: Option<String>,
}

/// The role of the billing service's own token: it commits and reverses orders.
pub(crate) const BILLING_SERVICE_ROLE: &str = "billing-service";

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| ADMIN_ROLES.contains(&r.as_str()))
    }

    /// The billing service's checkout, which prices and commits orders for customers.
    pub fn is_billing_service(&self) -> bool {
        self.roles.iter().any(|r| r == BILLING_SERVICE_ROLE)
    }
}

/// The largest clock skew allowed: more would keep expired tokens alive.
pub(crate) const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// Shortest HS256 secret accepted, in bytes: a key as long as the hash
/// (RFC 7518, section 3.2); a shorter one can be guessed offline from any token.
pub(crate) const MIN_HS256_SECRET: usize = 32;

/// Why tokens could not be checked as configured; start-up stops with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthConfigError {
    #[error("no way to check bearer tokens: set JWT_HS256_SECRET and/or JWKS_URL")]
    Nothing,
    #[error(
        "the {0} has {1} bytes; at least {MIN_HS256_SECRET} are needed, or anyone could guess it \
         and sign admin tokens (generate one with: openssl rand -base64 48)"
    )]
    WeakSecret(&'static str, usize),
    #[error(
        "JWT_HS256_PREVIOUS_SECRET is set without JWT_HS256_SECRET: a rotation needs the new secret too"
    )]
    PreviousWithoutCurrent,
    #[error(
        "JWT_LEEWAY is {0:?}; at most {MAX_LEEWAY:?} is allowed, or expired tokens would stay valid that much longer"
    )]
    Leeway(Duration),
    #[error(
        "JWKS_URL needs JWT_ISSUER and JWT_AUDIENCE: without them a token of any realm, issued \
         for any other service, would be accepted"
    )]
    JwksWithoutIssuerAndAudience,
}

/// Why a request is not authenticated; the message is safe to show.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing bearer token: send Authorization: Bearer <token>")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("tokens signed with {0} are not accepted here")]
    Algorithm(String),
    /// The identity provider's keys cannot be fetched and none are known:
    /// not the client's fault, so not counted against it.
    #[error("{SIGNING_KEYS_UNAVAILABLE}")]
    Unavailable,
}

/// Why a token was refused, in words a client developer can act on (the
/// library's own names, e.g. `ExpiredSignature`, only in the debug log).
fn explain(error: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    tracing::debug!(%error, "token refused");
    match error.kind() {
        ErrorKind::ExpiredSignature => "the token has expired (its exp is past)".into(),
        ErrorKind::ImmatureSignature => {
            "the token is not valid yet (its nbf is in the future)".into()
        }
        ErrorKind::InvalidSignature => "the token's signature does not match".into(),
        ErrorKind::InvalidIssuer => "the token was issued by another issuer (iss)".into(),
        ErrorKind::InvalidAudience => "the token is meant for another audience (aud)".into(),
        ErrorKind::InvalidSubject => "the token's subject (sub) is not accepted".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the token has no {claim} claim"),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "the token's algorithm is not accepted here".into()
        }
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => {
            "not a JWT: expected three base64url parts (header.payload.signature) with JSON inside"
                .into()
        }
        _ => "the token could not be verified".into(),
    }
}

#[derive(Deserialize)]
struct RealmAccess {
    #[serde(default)]
    roles: Vec<String>,
}

/// `role` as one string or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum Roles {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    role: Option<Roles>,
    #[serde(default)]
    realm_access: Option<RealmAccess>,
    /// Every other claim, for the configured tenant claim.
    #[serde(flatten)]
    other: HashMap<String, serde_json::Value>,
}

/// The signing keys of the JWKS, as last fetched.
#[derive(Default)]
struct Jwks {
    keys: HashMap<String, (Algorithm, DecodingKey)>,
    /// When the last fetch succeeded, and until when its keys hold.
    fetched: Option<Instant>,
    expires: Option<Instant>,
    /// When the last fetch failed.
    failed: Option<Instant>,
}

impl Jwks {
    /// Whether a fetch may go out now: never sooner than [`JWKS_RETRY`]
    /// after a failure (an unreachable identity provider is not hammered);
    /// at expiry; or for an unknown `kid` (a rotation) at most every
    /// [`JWKS_UNKNOWN_KID`].
    fn may_fetch(&self, unknown_kid: bool, now: Instant) -> bool {
        if self.failed.is_some_and(|at| now < at + JWKS_RETRY) {
            return false;
        }
        let expired = self.expires.is_none_or(|at| now >= at);
        let rotation = unknown_kid && self.fetched.is_none_or(|at| now >= at + JWKS_UNKNOWN_KID);
        expired || rotation
    }

    fn expired(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| now >= at)
    }
}

pub struct Verifier {
    settings: AuthSettings,
    /// The current HS256 key, then the previous one during a rotation.
    hs256: Vec<DecodingKey>,
    jwks: RwLock<Jwks>,
    /// One fetch in flight: concurrent requests wait for it, then read its keys.
    fetching: tokio::sync::Mutex<()>,
    http: reqwest::Client,
}

/// A JWKS is fetched again at most this often for an unknown `kid`.
const JWKS_UNKNOWN_KID: Duration = Duration::from_secs(30);
/// After a failed fetch, the next waits at least this long.
const JWKS_RETRY: Duration = Duration::from_secs(30);
/// How long keys hold when the response has no `Cache-Control: max-age`.
const JWKS_MAX_AGE: Duration = Duration::from_secs(600);

impl Verifier {
    /// Checks the settings: a way to check tokens, a strong HS256 secret,
    /// issuer and audience with a JWKS. Fetching a JWKS over HTTPS needs the
    /// process's TLS provider, which `main` installs.
    pub fn new(settings: AuthSettings) -> Result<Self, AuthConfigError> {
        if settings.hs256_secret.is_none() && settings.jwks_url.is_none() {
            return Err(AuthConfigError::Nothing);
        }
        for (name, secret) in [
            ("HS256 secret", &settings.hs256_secret),
            ("previous HS256 secret", &settings.hs256_previous_secret),
        ] {
            if let Some(secret) = secret
                && secret.len() < MIN_HS256_SECRET
            {
                return Err(AuthConfigError::WeakSecret(name, secret.len()));
            }
        }
        if settings.hs256_previous_secret.is_some() && settings.hs256_secret.is_none() {
            return Err(AuthConfigError::PreviousWithoutCurrent);
        }
        if settings.leeway > MAX_LEEWAY {
            return Err(AuthConfigError::Leeway(settings.leeway));
        }
        if settings.jwks_url.is_some() && (settings.issuer.is_none() || settings.audience.is_none())
        {
            return Err(AuthConfigError::JwksWithoutIssuerAndAudience);
        }
        let hs256 = [&settings.hs256_secret, &settings.hs256_previous_secret]
            .into_iter()
            .flatten()
            .map(|s| DecodingKey::from_secret(s.as_bytes()))
            .collect();
        Ok(Self {
            settings,
            hs256,
            jwks: RwLock::new(Jwks::default()),
            fetching: tokio::sync::Mutex::new(()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("an HTTP client"),
        })
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.settings.leeway.as_secs();
        validation.validate_nbf = true;
        // Each key source has its own issuer and audience (HS256 falls back
        // to the shared ones). A configured one is required: the library
        // compares `iss` and `aud` only when a token carries them.
        let settings = &self.settings;
        let (issuer, audience) = match algorithm {
            Algorithm::HS256 => (
                settings.hs256_issuer.as_ref().or(settings.issuer.as_ref()),
                settings
                    .hs256_audience
                    .as_ref()
                    .or(settings.audience.as_ref()),
            ),
            _ => (settings.issuer.as_ref(), settings.audience.as_ref()),
        };
        let mut required = vec!["exp", "sub"];
        match audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        validation
    }

    /// Checks a request's `Authorization` header.
    pub async fn verify(&self, headers: &http::HeaderMap) -> Result<Principal, AuthError> {
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            // The scheme is case-insensitive (RFC 9110, section 11.1).
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        let header = decode_header(token).map_err(|e| AuthError::Invalid(explain(&e)))?;
        let keys = match header.alg {
            Algorithm::HS256 if self.hs256.is_empty() => {
                return Err(AuthError::Algorithm("HS256".into()));
            }
            Algorithm::HS256 => self.hs256.clone(),
            Algorithm::RS256 | Algorithm::ES256 => {
                vec![self.jwks_key(header.kid.as_deref(), header.alg).await?]
            }
            other => return Err(AuthError::Algorithm(format!("{other:?}"))),
        };
        let claims = self.decode(token, &keys, header.alg)?;
        let subject = claims
            .sub
            .filter(|s| !s.is_empty())
            .ok_or_else(|| AuthError::Invalid("the token has no subject".into()))?;
        let mut roles: Vec<String> = claims.realm_access.map(|r| r.roles).unwrap_or_default();
        match claims.role {
            Some(Roles::One(role)) => roles.push(role),
            Some(Roles::Many(more)) => roles.extend(more),
            None => {}
        }
        let tenant = match self.settings.tenant_claim.as_ref() {
            Some(name) => match claims.other.get(name) {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(tenant)) => Some(tenant.clone()),
                // Never fall back to the body's tenant_id for a token that says something else.
                Some(_) => {
                    return Err(AuthError::Invalid(format!(
                        "the token's {name} claim must be a string (the tenant's id)"
                    )));
                }
            },
            None => None,
        };
        Ok(Principal {
            subject,
            email: claims.email.unwrap_or_default(),
            roles,
            tenant,
        })
    }

    /// The claims of `token`, verified with the first of `keys` whose
    /// signature matches (the current HS256 secret, then the previous one).
    fn decode(
        &self,
        token: &str,
        keys: &[DecodingKey],
        alg: Algorithm,
    ) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let validation = self.validation(alg);
        let mut last = None;
        for key in keys {
            match decode::<Claims>(token, key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => last = Some(e),
                Err(e) => return Err(AuthError::Invalid(explain(&e))),
            }
        }
        Err(AuthError::Invalid(last.map_or_else(
            || "the token could not be verified".into(),
            |e| explain(&e),
        )))
    }

    async fn jwks_key(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, AuthError> {
        let Some(url) = &self.settings.jwks_url else {
            return Err(AuthError::Algorithm(format!("{alg:?}")));
        };
        let kid = kid.ok_or_else(|| AuthError::Invalid("the token has no key id (kid)".into()))?;
        let fresh = |jwks: &Jwks| {
            (!jwks.expired(Instant::now()))
                .then(|| jwks.keys.get(kid).cloned())
                .flatten()
        };
        // Expired or not: while the identity provider cannot be reached, the
        // last keys it served keep counting.
        let last_good = |jwks: &Jwks| jwks.keys.get(kid).cloned();
        // (Each read guard is dropped before any await: the future stays Send.)
        let cached = fresh(&self.jwks.read().unwrap());
        let found = match cached {
            Some(found) => found,
            None => {
                let _one_fetch = self.fetching.lock().await;
                // The fetch this request waited for may have brought the key.
                let fetched_meanwhile = fresh(&self.jwks.read().unwrap());
                match fetched_meanwhile {
                    Some(found) => found,
                    None => {
                        let may_fetch = self.jwks.read().unwrap().may_fetch(true, Instant::now());
                        let refreshed = if may_fetch {
                            self.refresh(url).await
                        } else {
                            Ok(())
                        };
                        let (ever_fetched, known) = {
                            let jwks = self.jwks.read().unwrap();
                            (jwks.fetched.is_some(), last_good(&jwks))
                        };
                        match (known, refreshed) {
                            (Some(found), _) => found,
                            (None, Err(unavailable)) => return Err(unavailable),
                            (None, Ok(())) if !ever_fetched => return Err(AuthError::Unavailable),
                            (None, Ok(())) => {
                                return Err(AuthError::Invalid(format!(
                                    "unknown signing key {kid:?}"
                                )));
                            }
                        }
                    }
                }
            }
        };
        let (key_alg, key) = found;
        if key_alg != alg {
            return Err(AuthError::Invalid(format!(
                "key {kid:?} is not a {alg:?} key"
            )));
        }
        Ok(key)
    }

    /// Fetches the key set; the caller holds `fetching`. What went wrong is
    /// logged; the client hears only that keys are unavailable.
    async fn refresh(&self, url: &str) -> Result<(), AuthError> {
        let fetched = async {
            let response = self.http.get(url).send().await?.error_for_status()?;
            let max_age = response
                .headers()
                .get(reqwest::header::CACHE_CONTROL)
                .and_then(|v| v.to_str().ok())
                .and_then(max_age);
            let set: JwkSet = response.json().await?;
            Ok::<_, reqwest::Error>((set, max_age))
        }
        .await;
        let now = Instant::now();
        let (set, max_age) = match fetched {
            Ok(fetched) => fetched,
            Err(error) => {
                tracing::warn!(%error, "cannot fetch the JWKS; retrying no sooner than {JWKS_RETRY:?}");
                self.jwks.write().unwrap().failed = Some(now);
                return Err(AuthError::Unavailable);
            }
        };
        let keys = signing_keys(&set);
        let mut jwks = self.jwks.write().unwrap();
        jwks.keys = keys;
        jwks.fetched = Some(now);
        jwks.expires = Some(now + max_age.unwrap_or(JWKS_MAX_AGE).min(JWKS_MAX_AGE));
        jwks.failed = None;
        Ok(())
    }
}

/// What a client hears while the identity provider's keys cannot be had.
pub(crate) const SIGNING_KEYS_UNAVAILABLE: &str =
    "the signing keys cannot be fetched right now; try again shortly";

/// `max-age` of a `Cache-Control` value.
fn max_age(cache_control: &str) -> Option<Duration> {
    cache_control.split(',').find_map(|directive| {
        let seconds = directive.trim().strip_prefix("max-age=")?;
        seconds.parse().ok().map(Duration::from_secs)
    })
}

/// The keys of `set` that sign (`use` absent or `sig`) with an algorithm
/// accepted here, by `kid`. A JWK that names another `alg` is left out.
fn signing_keys(set: &JwkSet) -> HashMap<String, (Algorithm, DecodingKey)> {
    use jsonwebtoken::jwk::{AlgorithmParameters, KeyAlgorithm, PublicKeyUse};
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|u| *u != PublicKeyUse::Signature)
        {
            continue;
        }
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
            _ => continue,
        };
        let named = jwk.common.key_algorithm;
        let matches = match named {
            None => true,
            Some(KeyAlgorithm::RS256) => alg == Algorithm::RS256,
            Some(KeyAlgorithm::ES256) => alg == Algorithm::ES256,
            Some(_) => false,
        };
        if !matches {
            continue;
        }
        if let Ok(key) = DecodingKey::from_jwk(jwk) {
            keys.insert(kid, (alg, key));
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(settings: AuthSettings) -> Result<(), AuthConfigError> {
        // The JWKS client needs the provider that main installs.
        crate::install_tls_provider();
        Verifier::new(settings).map(|_| ())
    }

    #[test]
    fn an_empty_or_short_hs256_secret_stops_the_start() {
        let secret = |s: &str| AuthSettings {
            hs256_secret: Some(s.into()),
            ..Default::default()
        };
        const CURRENT: &str = "HS256 secret";
        assert_eq!(
            with(secret("")),
            Err(AuthConfigError::WeakSecret(CURRENT, 0))
        );
        assert_eq!(
            with(secret(&"x".repeat(MIN_HS256_SECRET - 1))),
            Err(AuthConfigError::WeakSecret(CURRENT, MIN_HS256_SECRET - 1))
        );
        assert_eq!(with(secret(&"x".repeat(MIN_HS256_SECRET))), Ok(()));
        assert_eq!(with(AuthSettings::default()), Err(AuthConfigError::Nothing));
        assert!(
            AuthConfigError::WeakSecret(CURRENT, 0)
                .to_string()
                .contains("openssl rand")
        );
        // The previous secret of a rotation is held to the same rule.
        assert_eq!(
            with(AuthSettings {
                hs256_previous_secret: Some("short".into()),
                ..secret(&"x".repeat(MIN_HS256_SECRET))
            }),
            Err(AuthConfigError::WeakSecret("previous HS256 secret", 5))
        );
        assert_eq!(
            with(AuthSettings {
                hs256_previous_secret: Some("p".repeat(MIN_HS256_SECRET)),
                jwks_url: Some("https://keycloak.example/certs".into()),
                issuer: Some("i".into()),
                audience: Some("a".into()),
                ..Default::default()
            }),
            Err(AuthConfigError::PreviousWithoutCurrent)
        );
    }

    #[test]
    fn a_leeway_beyond_five_minutes_stops_the_start() {
        let leeway = |secs| AuthSettings {
            hs256_secret: Some("x".repeat(MIN_HS256_SECRET)),
            leeway: Duration::from_secs(secs),
            ..Default::default()
        };
        assert_eq!(with(leeway(300)), Ok(()));
        assert_eq!(
            with(leeway(301)),
            Err(AuthConfigError::Leeway(Duration::from_secs(301)))
        );
    }

    /// A bearer header with an HS256 token of `claims`, signed with `secret`.
    fn bearer(secret: &str, claims: serde_json::Value) -> http::HeaderMap {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let token = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers
    }

    fn exp() -> i64 {
        chrono::Utc::now().timestamp() + 300
    }

    #[tokio::test]
    async fn a_configured_issuer_and_audience_are_required_claims() {
        crate::install_tls_provider();
        let secret = "s".repeat(MIN_HS256_SECRET);
        let verifier = Verifier::new(AuthSettings {
            hs256_secret: Some(secret.clone()),
            issuer: Some("billing-service".into()),
            audience: Some("billing".into()),
            ..Default::default()
        })
        .unwrap();
        let with_claims = |claims| bearer(&secret, claims);
        let full = serde_json::json!({"sub": "u", "iss": "billing-service", "aud": "billing",
                                      "exp": exp(), "role": "superadmin"});
        assert!(verifier.verify(&with_claims(full.clone())).await.is_ok());
        for missing in ["iss", "aud"] {
            let mut claims = full.clone();
            claims.as_object_mut().unwrap().remove(missing);
            assert_eq!(
                verifier.verify(&with_claims(claims)).await,
                Err(AuthError::Invalid(format!(
                    "the token has no {missing} claim"
                ))),
                "a token without {missing} was accepted"
            );
        }
    }

    #[tokio::test]
    async fn a_tenant_claim_that_is_not_a_string_is_refused() {
        crate::install_tls_provider();
        let secret = "s".repeat(MIN_HS256_SECRET);
        let verifier = Verifier::new(AuthSettings {
            hs256_secret: Some(secret.clone()),
            tenant_claim: Some("tenant_id".into()),
            ..Default::default()
        })
        .unwrap();
        let token = |tenant: serde_json::Value| {
            bearer(
                &secret,
                serde_json::json!({"sub": "u", "exp": exp(), "tenant_id": tenant}),
            )
        };
        let principal = verifier.verify(&token("acme".into())).await.unwrap();
        assert_eq!(principal.tenant.as_deref(), Some("acme"));
        for wrong in [serde_json::json!(["acme", "other"]), serde_json::json!(7)] {
            assert!(
                matches!(verifier.verify(&token(wrong.clone())).await,
                    Err(AuthError::Invalid(m)) if m.contains("tenant_id claim must be a string")),
                "{wrong} was taken"
            );
        }
        // Absent: the request body names the tenant, as before.
        let absent = bearer(&secret, serde_json::json!({"sub": "u", "exp": exp()}));
        assert_eq!(verifier.verify(&absent).await.unwrap().tenant, None);
    }

    #[tokio::test]
    async fn the_previous_secret_is_accepted_until_it_is_removed() {
        crate::install_tls_provider();
        let (old, new) = ("o".repeat(MIN_HS256_SECRET), "n".repeat(MIN_HS256_SECRET));
        let claims = serde_json::json!({"sub": "u", "exp": exp()});
        let rotating = Verifier::new(AuthSettings {
            hs256_secret: Some(new.clone()),
            hs256_previous_secret: Some(old.clone()),
            ..Default::default()
        })
        .unwrap();
        assert!(rotating.verify(&bearer(&new, claims.clone())).await.is_ok());
        assert!(rotating.verify(&bearer(&old, claims.clone())).await.is_ok());
        let forged = "f".repeat(MIN_HS256_SECRET);
        assert_eq!(
            rotating.verify(&bearer(&forged, claims.clone())).await,
            Err(AuthError::Invalid(
                "the token's signature does not match".into()
            ))
        );
        let rotated = Verifier::new(AuthSettings {
            hs256_secret: Some(new.clone()),
            ..Default::default()
        })
        .unwrap();
        assert!(rotated.verify(&bearer(&new, claims.clone())).await.is_ok());
        assert!(rotated.verify(&bearer(&old, claims)).await.is_err());
    }

    #[tokio::test]
    async fn each_key_source_checks_its_own_issuer_and_audience() {
        use jsonwebtoken::{EncodingKey, Header, encode};
        crate::install_tls_provider();
        let secret = "s".repeat(MIN_HS256_SECRET);
        let verifier = Verifier::new(AuthSettings {
            hs256_secret: Some(secret.clone()),
            jwks_url: Some("https://keycloak.example/certs".into()),
            issuer: Some("https://keycloak.example/realms/catalyst".into()),
            audience: Some("voucher-operator".into()),
            hs256_issuer: Some("billing-service".into()),
            hs256_audience: Some("billing".into()),
            ..Default::default()
        })
        .unwrap();
        let hs256 = |iss: &str, aud: &str| {
            let exp = chrono::Utc::now().timestamp() + 300;
            let token = encode(
                &Header::new(Algorithm::HS256),
                &serde_json::json!({"sub": "u", "iss": iss, "aud": aud, "exp": exp}),
                &EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap();
            let mut headers = http::HeaderMap::new();
            headers.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {token}").parse().unwrap(),
            );
            headers
        };
        assert!(
            verifier
                .verify(&hs256("billing-service", "billing"))
                .await
                .is_ok()
        );
        // The identity provider's issuer and audience are not the billing service's.
        for (iss, aud) in [
            (
                "https://keycloak.example/realms/catalyst",
                "voucher-operator",
            ),
            ("billing-service", "voucher-operator"),
            ("https://keycloak.example/realms/catalyst", "billing"),
        ] {
            assert!(
                matches!(
                    verifier.verify(&hs256(iss, aud)).await,
                    Err(AuthError::Invalid(_))
                ),
                "iss {iss}, aud {aud} was accepted"
            );
        }
        // Without their own, HS256 tokens are held to the shared ones.
        let shared = Verifier::new(AuthSettings {
            hs256_secret: Some(secret.clone()),
            issuer: Some("https://keycloak.example/realms/catalyst".into()),
            audience: Some("voucher-operator".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(
            shared
                .verify(&hs256("billing-service", "billing"))
                .await
                .is_err()
        );
        assert!(
            shared
                .verify(&hs256(
                    "https://keycloak.example/realms/catalyst",
                    "voucher-operator"
                ))
                .await
                .is_ok()
        );
    }

    #[test]
    fn a_jwks_without_issuer_and_audience_stops_the_start() {
        let jwks = |issuer: Option<&str>, audience: Option<&str>| AuthSettings {
            jwks_url: Some("https://keycloak.example/certs".into()),
            issuer: issuer.map(Into::into),
            audience: audience.map(Into::into),
            ..Default::default()
        };
        let refused = Err(AuthConfigError::JwksWithoutIssuerAndAudience);
        assert_eq!(with(jwks(None, None)), refused);
        assert_eq!(with(jwks(Some("https://kc/realms/x"), None)), refused);
        assert_eq!(with(jwks(None, Some("billing"))), refused);
        assert_eq!(
            with(jwks(Some("https://kc/realms/x"), Some("billing"))),
            Ok(())
        );
    }
}
