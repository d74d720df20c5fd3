//! JWT verification for sockets and channels.
//!
//! Supabase Realtime authenticates twice: the socket's `apikey` (query
//! parameter or `x-api-key` header) when the WebSocket is opened, and each
//! channel's user token (`phx_join.payload.access_token`, later
//! `access_token` pushes). Both go through [`Verifier::verify`], which turns a
//! token into [`Claims`]; [`Claims::viewer`] is what the policy layer
//! ([`crate::policy::Viewer`]) sees, and [`Claims::exp`] drives the session's
//! expiry timer. The keys come from [`AuthConfig`]: the project's JWT secret
//! (HS256/HS384/HS512, used as raw bytes like Supabase does) and/or a JWKS
//! (RSA keys for RS256/384/512 and PS256/384/512, EC P-256/P-384 keys for
//! ES256/ES384, Ed25519 keys for EdDSA).
//!
//! Invariants:
//!
//! - **The algorithm is pinned by the key.** An `HS*` token is checked only
//!   with the configured secret, never with JWKS material; an asymmetric token
//!   only with a JWKS key whose type (and `alg`, if the JWK names one) admits
//!   the token's algorithm. So a token "signed" with an RSA public key as an
//!   HMAC secret never verifies, and `alg: none` is always refused.
//! - **No leeway.** `exp` is checked here against the caller's clock, not by
//!   `jsonwebtoken`; a token whose `exp` equals `now` has expired. `nbf`, if
//!   present, must not be in the future. `aud` is not checked (Supabase
//!   issues `authenticated` but its server does not check it either).
//! - **Bounded work, no panics.** Tokens over [`MAX_TOKEN_BYTES`] are refused
//!   before any decoding; every input yields `Ok` or a [`TokenError`].
//! - **Tokens are never logged or echoed.** This module does not log at all;
//!   an error message quotes at most the token's `alg` or `kid`, cut short and
//!   stripped to printable ASCII. [`Verifier`]'s `Debug` never prints the
//!   secret.
//!
//! [`TokenError`]'s `Display` text is Supabase's own wording (capitalised), as
//! clients show it to users: `"InvalidJWTToken: Token has expired 5 seconds
//! ago"` in a join error reply, see [`TokenError::code`].

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header};
use serde_json::{Map, Value};

use crate::policy::Viewer;

/// The longest token [`Verifier::verify`] decodes, in bytes; longer ones are
/// refused as not a valid JWT.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The smallest RSA modulus accepted in a JWKS, in bits (RFC 7518 §3.3).
const MIN_RSA_BITS: usize = 2048;
/// The largest RSA modulus accepted in a JWKS, in bits (what the RSA backend
/// verifies with).
const MAX_RSA_BITS: usize = 4096;
/// The largest RSA public exponent the RSA backend verifies with.
const MAX_RSA_EXPONENT: u64 = (1 << 33) - 1;
/// How much of an untrusted `alg` or `kid` an error message quotes.
const QUOTE_CHARS: usize = 40;

/// Where keys come from. `Debug` shows only whether each is given.
#[derive(Clone, Default)]
pub struct AuthConfig {
    /// The project's JWT secret for HS256/HS384/HS512 tokens, used as raw
    /// bytes (not base64-decoded). Empty counts as not given.
    pub jwt_secret: Option<String>,
    /// A JWKS (`{"keys":[...]}`) for asymmetric tokens: a file path, or the
    /// JSON text itself if it starts with `{`. Empty counts as not given.
    pub jwks: Option<String>,
    /// When set, tokens must carry this `aud` (a string, or an array holding
    /// it). Supabase's own server does not check `aud`; the default is off.
    pub audience: Option<String>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "[redacted]"))
            .field("jwks", &self.jwks.as_ref().map(|_| "[given]"))
            .field("audience", &self.audience)
            .finish()
    }
}

/// Where a JWKS was read from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksOrigin {
    /// A file, by path.
    File(PathBuf),
    /// JSON text given directly in the configuration.
    Inline,
}

impl fmt::Display for JwksOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwksOrigin::File(path) => write!(f, "file {}", path.display()),
            JwksOrigin::Inline => f.write_str("inline JSON"),
        }
    }
}

/// Why the verification keys could not be set up. All are definite: the
/// operator has to fix the configuration. Messages never include key
/// material.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// Neither a secret nor a JWKS was given.
    #[error(
        "no JWT verification key is configured: pass the project's JWT secret with \
         --jwt-secret/API_JWT_SECRET, or a JWKS (file path or inline JSON) with --jwks/API_JWT_JWKS"
    )]
    NoKeys,
    /// The JWKS file could not be read.
    #[error("cannot read the JWKS file {path}")]
    ReadJwks {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The JWKS is not JSON.
    #[error("the JWKS ({origin}) is not valid JSON: {detail}")]
    JwksJson {
        /// Where it came from.
        origin: JwksOrigin,
        /// The parser's complaint (position, not content).
        detail: String,
    },
    /// The JWKS is JSON but not `{"keys":[...]}`.
    #[error("the JWKS ({origin}) must be a JSON object with a \"keys\" array")]
    JwksShape {
        /// Where it came from.
        origin: JwksOrigin,
    },
    /// One key of the JWKS is unusable.
    #[error("the JWKS ({origin}) key #{index}{}: {problem}", kid_suffix(.kid))]
    JwksKey {
        /// Where it came from.
        origin: JwksOrigin,
        /// The key's position in `keys`, from 0.
        index: usize,
        /// The key's `kid`, if it has one.
        kid: Option<String>,
        /// What is wrong with it.
        problem: String,
    },
    /// The JWKS holds no key walcast can verify signatures with.
    #[error(
        "the JWKS ({origin}) has no usable signing key (RSA, EC P-256/P-384 or Ed25519); \
         {skipped} key(s) skipped"
    )]
    NoUsableKey {
        /// Where it came from.
        origin: JwksOrigin,
        /// Keys ignored: encryption keys, unknown key types or curves.
        skipped: usize,
    },
}

fn kid_suffix(kid: &Option<String>) -> String {
    kid.as_deref().map(|kid| format!(" (kid \"{}\")", printable(kid))).unwrap_or_default()
}

/// Why a token was refused. `Display` is the message Supabase sends (see
/// [`TokenError::code`] for the prefix of a join error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT: wrong shape, bad base64 or JSON, too long.
    #[error("The token provided is not a valid JWT")]
    Malformed,
    /// The signature does not match the key.
    #[error("Failed to validate JWT signature")]
    BadSignature,
    /// `role` (a string) or `exp` (a number) is missing.
    #[error("Fields `role` and `exp` are required in JWT")]
    MissingClaims,
    /// `exp` is not after now.
    #[error("Token has expired {seconds_ago} seconds ago")]
    Expired {
        /// `now - exp`, at least 0.
        seconds_ago: i64,
    },
    /// `nbf` is after now.
    #[error("Token is not valid yet")]
    NotYetValid,
    /// An audience is configured and the token's `aud` does not name it.
    #[error("Token audience (aud) does not match the configured audience")]
    WrongAudience,
    /// The header names an algorithm walcast never accepts (`none`, unknown).
    #[error("JWT algorithm `{alg}` is not supported")]
    UnsupportedAlgorithm {
        /// The header's `alg`, shortened and stripped to printable ASCII.
        alg: String,
    },
    /// The algorithm is known but no configured key may verify it.
    #[error("JWT algorithm `{alg}` is not allowed: {reason}")]
    AlgorithmNotAllowed {
        /// The algorithm.
        alg: &'static str,
        /// Which key is missing.
        reason: &'static str,
    },
    /// The token's `kid` names a JWKS key of another type.
    #[error("JWT algorithm `{alg}` is not allowed for the JWKS key with kid \"{kid}\"")]
    KeyAlgorithmMismatch {
        /// The algorithm.
        alg: &'static str,
        /// The key's `kid`, shortened and stripped to printable ASCII.
        kid: String,
    },
    /// No JWKS key has the token's `kid`.
    #[error("No JWKS key has the token's kid \"{kid}\"")]
    UnknownKid {
        /// The header's `kid`, shortened and stripped to printable ASCII.
        kid: String,
    },
    /// The token has no `kid` and several JWKS keys could verify it.
    #[error("The token has no kid and {candidates} JWKS keys accept `{alg}`")]
    AmbiguousKey {
        /// The algorithm.
        alg: &'static str,
        /// How many keys accept it.
        candidates: usize,
    },
}

impl TokenError {
    /// The code Supabase puts before `": <message>"` in a join error reply.
    pub fn code(&self) -> &'static str {
        "InvalidJWTToken"
    }
}

/// The claims walcast uses from a verified token.
#[derive(Debug, Clone)]
pub struct Claims {
    /// The Postgres role: `anon`, `authenticated`, `service_role`, ….
    pub role: String,
    /// The user id, if `sub` is a string.
    pub sub: Option<String>,
    /// Expiry, Unix seconds (fractions rounded down).
    pub exp: i64,
    /// Every claim, as the policies' `auth.jwt()` reads them.
    pub all: Arc<Value>,
}

/// Two claim sets are the same token's when role, sub and expiry agree.
impl PartialEq for Claims {
    fn eq(&self, other: &Self) -> bool {
        self.role == other.role && self.sub == other.sub && self.exp == other.exp
    }
}

impl Eq for Claims {}

impl Claims {
    /// Who is looking, for the policy layer.
    pub fn viewer(&self) -> Viewer {
        Viewer::shared(&self.role, Arc::clone(&self.all))
    }

    /// Seconds until the token expires: `exp - now`, 0 or less once expired.
    pub fn seconds_left(&self, now_unix: i64) -> i64 {
        self.exp.saturating_sub(now_unix)
    }
}

/// Checks tokens against the configured secret and JWKS keys. Cheap to clone
/// (the keys are shared).
#[derive(Clone)]
pub struct Verifier {
    keys: Arc<Keys>,
}

struct Keys {
    /// The HMAC secret, if configured.
    secret: Option<DecodingKey>,
    /// Usable JWKS keys; `kid`s are unique.
    jwks: Vec<JwksKey>,
    /// Required `aud`, if configured.
    audience: Option<String>,
    /// Claims of verified tokens, shared by the sockets and channels that
    /// present the same token.
    shared: std::sync::Mutex<SharedClaims>,
}

/// The decoded claims of verified tokens still in use, by a keyed hash of
/// the token's payload part: every socket of a project presents the same
/// `apikey`, and a user's sockets the same token, and each would otherwise
/// keep its own copy of the same JSON (~0.7–1 KiB each; docs/benchmarks.md,
/// E3). Verification is unchanged — only the result's `all` is shared, and
/// only when equal to what this token decoded to. An entry costs ~24 bytes
/// while it lives; entries whose claims were dropped are pruned once they
/// outnumber the live ones.
#[derive(Default)]
struct SharedClaims {
    hasher: std::hash::RandomState,
    by_payload: std::collections::HashMap<u64, std::sync::Weak<Value>>,
    /// Prune when the map reaches this many entries.
    prune_at: usize,
}

impl SharedClaims {
    /// `claims` as an `Arc`, the one already in use for `payload` if equal.
    fn share(&mut self, payload: &str, claims: Map<String, Value>) -> Arc<Value> {
        use std::hash::BuildHasher as _;
        let key = self.hasher.hash_one(payload);
        let claims = Value::Object(claims);
        if let Some(known) = self.by_payload.get(&key).and_then(std::sync::Weak::upgrade) {
            if *known == claims {
                return known;
            }
        }
        let claims = Arc::new(claims);
        self.by_payload.insert(key, Arc::downgrade(&claims));
        if self.by_payload.len() >= self.prune_at {
            self.by_payload.retain(|_, weak| weak.strong_count() > 0);
            self.by_payload.shrink_to(self.by_payload.len() * 2);
            self.prune_at = (self.by_payload.len() * 2).max(1024);
        }
        claims
    }
}

/// One usable JWKS key.
struct JwksKey {
    kid: Option<String>,
    kind: KeyKind,
    /// The algorithms this key verifies: the JWK's `alg`, or all of its type's.
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa { bits: usize },
    P256,
    P384,
    Ed25519,
}

impl KeyKind {
    fn algorithms(self) -> &'static [Algorithm] {
        match self {
            KeyKind::Rsa { .. } => &[
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            KeyKind::P256 => &[Algorithm::ES256],
            KeyKind::P384 => &[Algorithm::ES384],
            KeyKind::Ed25519 => &[Algorithm::EdDSA],
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::Rsa { bits } => write!(f, "RSA {bits}-bit"),
            KeyKind::P256 => f.write_str("EC P-256"),
            KeyKind::P384 => f.write_str("EC P-384"),
            KeyKind::Ed25519 => f.write_str("Ed25519"),
        }
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("secret", &self.keys.secret.as_ref().map(|_| "[redacted]"))
            .field("jwks", &self.keys.jwks)
            .finish()
    }
}

impl fmt::Debug for JwksKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let algorithms: Vec<&str> = self.algorithms.iter().map(|&a| alg_name(a)).collect();
        f.debug_struct("JwksKey")
            .field("kid", &self.kid)
            .field("kind", &self.kind)
            .field("algorithms", &algorithms)
            .finish()
    }
}

impl Verifier {
    /// Loads the keys: the secret as raw bytes, the JWKS from a file or
    /// inline JSON (checking every key now, so a bad key fails at start-up
    /// rather than on the first token). JWKS keys for encryption or of types
    /// walcast does not know are skipped; symmetric (`oct`) keys are refused,
    /// since HMAC tokens are checked only with the secret.
    ///
    /// # Errors
    /// [`AuthConfigError::NoKeys`] if neither is given; the other variants
    /// name what is wrong with the JWKS.
    pub fn new(config: &AuthConfig) -> Result<Verifier, AuthConfigError> {
        let secret = config
            .jwt_secret
            .as_deref()
            .filter(|secret| !secret.is_empty())
            .map(|secret| DecodingKey::from_secret(secret.as_bytes()));
        let jwks = match config.jwks.as_deref().map(str::trim) {
            Some(spec) if !spec.is_empty() => load_jwks(spec)?,
            _ => Vec::new(),
        };
        if secret.is_none() && jwks.is_empty() {
            return Err(AuthConfigError::NoKeys);
        }
        let audience = config.audience.clone().filter(|a| !a.is_empty());
        let shared = std::sync::Mutex::new(SharedClaims::default());
        Ok(Verifier { keys: Arc::new(Keys { secret, jwks, audience, shared }) })
    }

    /// Verifies `token` at time `now_unix` (Unix seconds): size, shape,
    /// algorithm and key, signature, then `role` and `exp`, expiry and `nbf`.
    ///
    /// # Errors
    /// The first check that fails, as a [`TokenError`].
    pub fn verify(&self, token: &str, now_unix: i64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };

        let header = decode_object(header_b64)?;
        if header.contains_key("crit") {
            // No critical extension is understood (RFC 7515 §4.1.11).
            return Err(TokenError::Malformed);
        }
        let alg = match header.get("alg") {
            Some(Value::String(alg)) => {
                alg.parse::<Algorithm>().map_err(|_| TokenError::UnsupportedAlgorithm { alg: printable(alg) })?
            }
            _ => return Err(TokenError::Malformed),
        };
        let kid = match header.get("kid") {
            None | Some(Value::Null) => None,
            Some(Value::String(kid)) => Some(kid.as_str()),
            Some(_) => return Err(TokenError::Malformed),
        };

        let key = self.key_for(alg, kid)?;
        let signing_input = &token[..header_b64.len() + 1 + payload_b64.len()];
        match jsonwebtoken::crypto::verify(signature_b64, signing_input.as_bytes(), key, alg) {
            Ok(true) => {}
            Ok(false) => return Err(TokenError::BadSignature),
            // Only the signature's base64 can fail here: keys were checked at start-up.
            Err(_) => return Err(TokenError::Malformed),
        }

        let claims = decode_object(payload_b64)?;
        let role = match claims.get("role") {
            Some(Value::String(role)) => role.clone(),
            _ => return Err(TokenError::MissingClaims),
        };
        let exp = claims.get("exp").and_then(|exp| numeric_date(exp, f64::floor)).ok_or(TokenError::MissingClaims)?;
        if exp <= now_unix {
            return Err(TokenError::Expired { seconds_ago: now_unix.saturating_sub(exp) });
        }
        match claims.get("nbf") {
            None | Some(Value::Null) => {}
            Some(nbf) => match numeric_date(nbf, f64::ceil) {
                Some(nbf) if nbf > now_unix => return Err(TokenError::NotYetValid),
                Some(_) => {}
                None => return Err(TokenError::Malformed),
            },
        }
        if let Some(audience) = &self.keys.audience {
            let matches = match claims.get("aud") {
                Some(Value::String(aud)) => aud == audience,
                Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(audience.as_str())),
                _ => false,
            };
            if !matches {
                return Err(TokenError::WrongAudience);
            }
        }
        let sub = match claims.get("sub") {
            Some(Value::String(sub)) => Some(sub.clone()),
            _ => None,
        };
        let all = self.keys.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner).share(payload_b64, claims);
        Ok(Claims { role, sub, exp, all })
    }

    /// The one key that may verify a token with `alg` and `kid`.
    fn key_for(&self, alg: Algorithm, kid: Option<&str>) -> Result<&DecodingKey, TokenError> {
        let name = alg_name(alg);
        if alg.family() == AlgorithmFamily::Hmac {
            return self.keys.secret.as_ref().ok_or(TokenError::AlgorithmNotAllowed {
                alg: name,
                reason: "no JWT secret is configured (only a JWKS)",
            });
        }
        if self.keys.jwks.is_empty() {
            return Err(TokenError::AlgorithmNotAllowed {
                alg: name,
                reason: "no JWKS is configured (only a JWT secret)",
            });
        }
        match kid {
            Some(kid) => {
                let key = self
                    .keys
                    .jwks
                    .iter()
                    .find(|key| key.kid.as_deref() == Some(kid))
                    .ok_or_else(|| TokenError::UnknownKid { kid: printable(kid) })?;
                if key.algorithms.contains(&alg) {
                    Ok(&key.key)
                } else {
                    Err(TokenError::KeyAlgorithmMismatch { alg: name, kid: printable(kid) })
                }
            }
            None => {
                let mut candidates = self.keys.jwks.iter().filter(|key| key.algorithms.contains(&alg));
                match (candidates.next(), candidates.next()) {
                    (Some(key), None) => Ok(&key.key),
                    (None, _) => {
                        Err(TokenError::AlgorithmNotAllowed { alg: name, reason: "no JWKS key is for this algorithm" })
                    }
                    (Some(_), Some(_)) => {
                        Err(TokenError::AmbiguousKey { alg: name, candidates: 2 + candidates.count() })
                    }
                }
            }
        }
    }
}

/// Base64url (no padding) → a JSON object.
fn decode_object(part: &str) -> Result<Map<String, Value>, TokenError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

/// A JSON number as whole Unix seconds (`round` for fractions, saturating).
fn numeric_date(value: &Value, round: fn(f64) -> f64) -> Option<i64> {
    let Value::Number(number) = value else {
        return None;
    };
    if let Some(seconds) = number.as_i64() {
        Some(seconds)
    } else if number.as_u64().is_some() {
        Some(i64::MAX)
    } else {
        // `as` saturates; JSON has no NaN or infinity.
        number.as_f64().map(|seconds| round(seconds) as i64)
    }
}

/// Untrusted text for an error message: printable ASCII, at most
/// [`QUOTE_CHARS`] characters.
fn printable(text: &str) -> String {
    let mut out: String =
        text.chars().take(QUOTE_CHARS).map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
    if text.chars().nth(QUOTE_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
    }
}

/// Reads the JWKS from `spec`: inline JSON if it starts with `{`, else a path.
fn load_jwks(spec: &str) -> Result<Vec<JwksKey>, AuthConfigError> {
    if spec.starts_with('{') {
        return parse_jwks(spec, JwksOrigin::Inline);
    }
    let path = PathBuf::from(spec);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_jwks(&text, JwksOrigin::File(path)),
        Err(source) => Err(AuthConfigError::ReadJwks { path, source }),
    }
}

fn parse_jwks(text: &str, origin: JwksOrigin) -> Result<Vec<JwksKey>, AuthConfigError> {
    let document: Value = match serde_json::from_str(text) {
        Ok(document) => document,
        Err(err) => return Err(AuthConfigError::JwksJson { origin, detail: err.to_string() }),
    };
    let Some(Value::Array(entries)) = document.get("keys") else {
        return Err(AuthConfigError::JwksShape { origin });
    };
    let mut keys: Vec<JwksKey> = Vec::with_capacity(entries.len());
    let mut skipped = 0;
    for (index, entry) in entries.iter().enumerate() {
        let kid = entry.get("kid").and_then(Value::as_str).map(str::to_owned);
        let bad_key =
            |problem: String| AuthConfigError::JwksKey { origin: origin.clone(), index, kid: kid.clone(), problem };
        match parse_jwk(entry) {
            Ok(Some(key)) => {
                if key.kid.is_some() && keys.iter().any(|other| other.kid == key.kid) {
                    return Err(bad_key("another key has the same kid".to_owned()));
                }
                keys.push(key);
            }
            Ok(None) => skipped += 1,
            Err(problem) => return Err(bad_key(problem)),
        }
    }
    if keys.is_empty() {
        return Err(AuthConfigError::NoUsableKey { origin, skipped });
    }
    Ok(keys)
}

/// One JWK → a usable key, `None` to skip it (not for signatures, or a type
/// walcast does not know), or what is wrong with it.
fn parse_jwk(entry: &Value) -> Result<Option<JwksKey>, String> {
    let Value::Object(jwk) = entry else {
        return Err("not a JSON object".to_owned());
    };
    let kid = string_member(jwk, "kid")?.map(str::to_owned);
    let kty = string_member(jwk, "kty")?.ok_or("no \"kty\"")?;
    if string_member(jwk, "use")?.is_some_and(|usage| usage != "sig") {
        return Ok(None);
    }
    match jwk.get("key_ops") {
        None | Some(Value::Null) => {}
        Some(Value::Array(ops)) => {
            if !ops.iter().any(|op| op.as_str() == Some("verify")) {
                return Ok(None);
            }
        }
        Some(_) => return Err("\"key_ops\" is not an array".to_owned()),
    }

    let pinned = match string_member(jwk, "alg")?.map(str::parse::<Algorithm>) {
        None => None,
        Some(Ok(alg)) => Some(alg),
        // An algorithm for something else (encryption): not a signing key.
        Some(Err(_)) => return Ok(None),
    };

    let (kind, key) = match kty {
        "RSA" => rsa_key(jwk)?,
        "EC" => match string_member(jwk, "crv")?.ok_or("no \"crv\"")? {
            "P-256" => ec_key(jwk, KeyKind::P256, 32, Algorithm::ES256)?,
            "P-384" => ec_key(jwk, KeyKind::P384, 48, Algorithm::ES384)?,
            _ => return Ok(None),
        },
        "OKP" => match string_member(jwk, "crv")?.ok_or("no \"crv\"")? {
            "Ed25519" => {
                if base64_member(jwk, "x")?.len() != 32 {
                    return Err("\"x\" is not 32 bytes".to_owned());
                }
                let x = string_member(jwk, "x")?.unwrap_or_default();
                let key = DecodingKey::from_ed_components(x).map_err(|_| "\"x\" is not base64url".to_owned())?;
                check_point(&key, Algorithm::EdDSA)?;
                (KeyKind::Ed25519, key)
            }
            _ => return Ok(None),
        },
        "oct" => {
            return Err("symmetric (\"oct\") keys are not accepted in a JWKS; pass the shared \
                        secret with --jwt-secret/API_JWT_SECRET"
                .to_owned())
        }
        _ => return Ok(None),
    };

    let algorithms = match pinned {
        None => kind.algorithms().to_vec(),
        Some(alg) if kind.algorithms().contains(&alg) => vec![alg],
        Some(alg) => return Err(format!("\"alg\" {} does not fit an {kind} key", alg_name(alg))),
    };
    Ok(Some(JwksKey { kid, kind, algorithms, key }))
}

fn rsa_key(jwk: &Map<String, Value>) -> Result<(KeyKind, DecodingKey), String> {
    let n = base64_member(jwk, "n")?;
    let e = base64_member(jwk, "e")?;
    let n = strip_leading_zeros(&n);
    let e = strip_leading_zeros(&e);
    let bits = match n.first() {
        Some(&first) => (n.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
        None => 0,
    };
    if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
        return Err(format!("the RSA modulus has {bits} bits; {MIN_RSA_BITS} to {MAX_RSA_BITS} are supported"));
    }
    if n.last().is_some_and(|last| last & 1 == 0) {
        return Err("the RSA modulus is even".to_owned());
    }
    let exponent = if e.len() <= 8 { e.iter().fold(0u64, |acc, &byte| (acc << 8) | u64::from(byte)) } else { u64::MAX };
    if !(3..=MAX_RSA_EXPONENT).contains(&exponent) || exponent & 1 == 0 {
        return Err("the RSA public exponent is not an odd number from 3 to 2^33-1".to_owned());
    }
    Ok((KeyKind::Rsa { bits }, DecodingKey::from_rsa_raw_components(n, e)))
}

fn ec_key(
    jwk: &Map<String, Value>,
    kind: KeyKind,
    coordinate_bytes: usize,
    alg: Algorithm,
) -> Result<(KeyKind, DecodingKey), String> {
    for name in ["x", "y"] {
        if base64_member(jwk, name)?.len() != coordinate_bytes {
            return Err(format!("\"{name}\" is not {coordinate_bytes} bytes"));
        }
    }
    let (Some(Value::String(x)), Some(Value::String(y))) = (jwk.get("x"), jwk.get("y")) else {
        return Err("no \"x\" or \"y\"".to_owned());
    };
    let key = DecodingKey::from_ec_components(x, y).map_err(|_| "\"x\" or \"y\" is not base64url".to_owned())?;
    check_point(&key, alg)?;
    Ok((kind, key))
}

/// Builds a verifier from `key` once, so a point that is not on the curve
/// fails here and not on every token.
fn check_point(key: &DecodingKey, alg: Algorithm) -> Result<(), String> {
    // A dummy signature: the result is `Ok(false)` for a good key.
    jsonwebtoken::crypto::verify("AAAA", b"", key, alg)
        .map(|_| ())
        .map_err(|_| "the public key is not a point on its curve".to_owned())
}

fn string_member<'a>(jwk: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, String> {
    match jwk.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) => Ok(Some(value)),
        Some(_) => Err(format!("\"{name}\" is not a string")),
    }
}

fn base64_member(jwk: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    let value = string_member(jwk, name)?.ok_or_else(|| format!("no \"{name}\""))?;
    URL_SAFE_NO_PAD.decode(value).map_err(|_| format!("\"{name}\" is not base64url (no padding)"))
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// Signs `claims` with HS256 and `secret` (demo tokens, tests).
///
/// # Panics
/// Never for a JSON object of claims.
pub fn sign_hs256(secret: &[u8], claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::default(), claims, &EncodingKey::from_secret(secret))
        .expect("HS256 signing of a JSON value cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const NOW: i64 = 1_700_000_000;
    const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";

    // Test keys, generated once with `openssl genpkey` (RSA 2048, EC P-256,
    // EC P-384, Ed25519); the JWKs below are their public halves.
    /// RSA 2048 test key (PKCS#8), `openssl genpkey -algorithm RSA`.
    const RSA_PRIVATE_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDHBl9KQ6I6DR+t\n\
gys9offkgpV/qfXoh8VDfOOsEpQ3URdyxQ2EVCstwXny7Kqx8vfJLTX4yAx3FVkY\n\
VINMQyK9Mq7l4lU+XeTWldmceBu6D1eXpLhcs+oQIvRnCsJB404tbh76thMHsJqI\n\
X+l6ytPDItAb0/JQ9S4K+he7hq3m35P9Q9HPinlEp0hpC2YdR16iFj5FfUyC1C96\n\
bbO3uZHrNXtkwnaA3DQXKD3J5jS4zalsupGeDmd+1N9r7L5rfcecfGDxQXjw3Toj\n\
gP0jRlo18/gtCNWHWgTY4AgicG2oKv3LduOHzRe9IGWKyUaE5mC/8r8iPYHYQJ9R\n\
FK/QuB4JAgMBAAECggEAAoUSYkiSbn05jDMXsk9Raed8WJIwjpnfdcAISuauUTf5\n\
3cZgai89n7XuIxT7gUbD+9xSbVytCbnvt5bkVawY7b/NRpRTw3chXVUm3OwJX9Tv\n\
ZThc7DGL8lna8c4JURe9ZuZYxpBVE9kYz8a1GEymmzce3udTT1KXW2S4tbNaEsz2\n\
pXCmez2oyejRmmUdXIMLmqQexJXlIo1SDInEjfibCKxhGsA75if/2VcwsyuR6Ehn\n\
grtUh+MxcFmrXDn1eN3WrO6GzR1ESTEW2+ZvX/DASllRDFEVsoyD17/gaVy2OV3i\n\
am40++BJQQpn+VammdRY/57UIxRdpNAV8I/iM8IJHQKBgQDmO8xVVW1jW0+c/QXI\n\
VDQBBdapNy6IC40OQVwCPQwlLNlgOzqSplokqqJIjjx6aWeEs8GXfoc0WLVsgRJ5\n\
6UU0ZddUdkb/QqlPbcU3GFa4i6+zA0XEgh44jskEm5H7tAQ+MTM+4LhErGHQJf2I\n\
fooQx/CER5VfCmAPP2T+5y+9jQKBgQDdTHGSQv+I+IEV3/X057nHr53JwB9+rZef\n\
wzD66Xdam9TivSIvKvzaLOCm/MtpDw1Z+oGmhbxR6TuJeNSnIwWT+n8urvG2jNfi\n\
EwyZk39VbZuxLvdHviE4k+oSzWgFe3vkTBeM3tdjM2d/VfK2ZRgamoBWft6FocOj\n\
OrKeICVNbQKBgGaR63V06pfiHTTWcJYQFV8DR9/5SoyngL8CFUiWA+wn7+v0VyLw\n\
Y6aEMmpam8z5Wnn/T1b7sqZ6gtEFK8MOTpuKZ4UkcHrWKvHM+JiUCkaLTMpWweVL\n\
BsWxrxKTcFUPnPhMGQWBPfaySZ1e33XI0h+pw5ha/8vopmUEnC0Ht/gdAoGBAK9+\n\
Y8Jdp0/z4kp6pQ5mhYm51yObXF6VQ1zK6hjQ9HnCgnydCHLnYEWUuUMzzguuiCQG\n\
6LIp9EHw9+n5DIrO1ymWyS04Ry9BWiJKgP95XM1ecs18NVWLjcTUaBgpFIjkeEd/\n\
oF1yitR8e2MbwbKrUQYn6Aav7b+DnSXg8q07SNmxAoGBAJPOLhyKbztR6kgZEAQj\n\
tZkXFS4BHcAISMmrmcLBo22lRemIrB7S5IzoJ4f5K6fvxH/MfT7F72I9I0kAIB5n\n\
cYNIA2w/0Pudt7WzahIMZs2wg+ndkDTk90C6yZeiSB+GkY6Ha2tjNts+snFwsR/O\n\
sIvfXcprkBGBXU+xHI6wHUUd\n\
-----END PRIVATE KEY-----\n";
    /// Its public half (SPKI PEM): the bytes an algorithm-confusion attack would use as an HMAC secret.
    const RSA_PUBLIC_PEM: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAxwZfSkOiOg0frYMrPaH3\n\
5IKVf6n16IfFQ3zjrBKUN1EXcsUNhFQrLcF58uyqsfL3yS01+MgMdxVZGFSDTEMi\n\
vTKu5eJVPl3k1pXZnHgbug9Xl6S4XLPqECL0ZwrCQeNOLW4e+rYTB7CaiF/pesrT\n\
wyLQG9PyUPUuCvoXu4at5t+T/UPRz4p5RKdIaQtmHUdeohY+RX1MgtQvem2zt7mR\n\
6zV7ZMJ2gNw0Fyg9yeY0uM2pbLqRng5nftTfa+y+a33HnHxg8UF48N06I4D9I0Za\n\
NfP4LQjVh1oE2OAIInBtqCr9y3bjh80XvSBlislGhOZgv/K/Ij2B2ECfURSv0Lge\n\
CQIDAQAB\n\
-----END PUBLIC KEY-----\n";
    /// EC P-256 test key (PKCS#8).
    const EC_P256_PRIVATE_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgVytDsL8SqB2Ta2tX\n\
LFhIC4CCcSxadCAKe0SzzVJD0TihRANCAASd4/AbFufpojCLBOQUBmueW6+Zfn5h\n\
0CwaJlFsmfbTj/0zfpWkcjC9FcNhcu4jmMGDc42od2JRk0QQtuB3m3z9\n\
-----END PRIVATE KEY-----\n";
    /// EC P-384 test key (PKCS#8).
    const EC_P384_PRIVATE_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDAXY2TNJJ04asDJYgAK\n\
qNlmqZNCATjdT5JC2+Jyy5v67Aq959+QKN4YZjOoUCsK/jGhZANiAAQU5qh4rbv9\n\
Gyu/2jLba8uzRRYTPUXFW0kCnmQOPEp8AzpZWHsb/SKE7VMEH1cmzQt568X/qiUh\n\
rVkkcY6XhWXxqF+o1RaQ5eOzRR5ctwLX9FRoupw89QRrQEWwBnrqJdA=\n\
-----END PRIVATE KEY-----\n";
    /// Ed25519 test key (PKCS#8).
    const ED25519_PRIVATE_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MC4CAQAwBQYDK2VwBCIEIAldnfMyJGFgqrsaqKk06xjuJFhPSsDFHD8qeRwxResd\n\
-----END PRIVATE KEY-----\n";
    /// The RSA key's JWK, pinned to RS256.
    const RSA_JWK: &str = r#"{"kty":"RSA","kid":"rsa-1","use":"sig","alg":"RS256","n":"xwZfSkOiOg0frYMrPaH35IKVf6n16IfFQ3zjrBKUN1EXcsUNhFQrLcF58uyqsfL3yS01-MgMdxVZGFSDTEMivTKu5eJVPl3k1pXZnHgbug9Xl6S4XLPqECL0ZwrCQeNOLW4e-rYTB7CaiF_pesrTwyLQG9PyUPUuCvoXu4at5t-T_UPRz4p5RKdIaQtmHUdeohY-RX1MgtQvem2zt7mR6zV7ZMJ2gNw0Fyg9yeY0uM2pbLqRng5nftTfa-y-a33HnHxg8UF48N06I4D9I0ZaNfP4LQjVh1oE2OAIInBtqCr9y3bjh80XvSBlislGhOZgv_K_Ij2B2ECfURSv0LgeCQ","e":"AQAB"}"#;
    /// The same RSA key under another kid, with no `alg`: any RS*/PS* algorithm.
    const RSA_ANY_JWK: &str = r#"{"kty":"RSA","kid":"rsa-any","n":"xwZfSkOiOg0frYMrPaH35IKVf6n16IfFQ3zjrBKUN1EXcsUNhFQrLcF58uyqsfL3yS01-MgMdxVZGFSDTEMivTKu5eJVPl3k1pXZnHgbug9Xl6S4XLPqECL0ZwrCQeNOLW4e-rYTB7CaiF_pesrTwyLQG9PyUPUuCvoXu4at5t-T_UPRz4p5RKdIaQtmHUdeohY-RX1MgtQvem2zt7mR6zV7ZMJ2gNw0Fyg9yeY0uM2pbLqRng5nftTfa-y-a33HnHxg8UF48N06I4D9I0ZaNfP4LQjVh1oE2OAIInBtqCr9y3bjh80XvSBlislGhOZgv_K_Ij2B2ECfURSv0LgeCQ","e":"AQAB"}"#;
    /// The P-256 key's JWK.
    const EC_P256_JWK: &str = r#"{"kty":"EC","kid":"ec-1","crv":"P-256","x":"nePwGxbn6aIwiwTkFAZrnluvmX5-YdAsGiZRbJn2048","y":"_TN-laRyML0Vw2Fy7iOYwYNzjah3YlGTRBC24HebfP0"}"#;
    /// The P-384 key's JWK.
    const EC_P384_JWK: &str = r#"{"kty":"EC","kid":"ec384-1","crv":"P-384","x":"FOaoeK27_Rsrv9oy22vLs0UWEz1FxVtJAp5kDjxKfAM6WVh7G_0ihO1TBB9XJs0L","y":"eevF_6olIa1ZJHGOl4Vl8ahfqNUWkOXjs0UeXLcC1_RUaLqcPPUEa0BFsAZ66iXQ"}"#;
    /// The Ed25519 key's JWK.
    const ED25519_JWK: &str =
        r#"{"kty":"OKP","kid":"ed-1","crv":"Ed25519","x":"SWLpBj7QWwW9KcfOsdnxkK5KVZfQAV9dcWc3E9JXKr8"}"#;

    fn jwks(keys: &[&str]) -> String {
        format!(r#"{{"keys":[{}]}}"#, keys.join(","))
    }

    fn full_jwks() -> String {
        jwks(&[RSA_JWK, EC_P256_JWK, EC_P384_JWK, ED25519_JWK])
    }

    fn verifier(secret: Option<&str>, jwks: Option<String>) -> Verifier {
        Verifier::new(&AuthConfig { jwt_secret: secret.map(str::to_owned), jwks, audience: None })
            .expect("test keys load")
    }

    fn secret_only() -> Verifier {
        verifier(Some(SECRET), None)
    }

    fn with_audience() -> Verifier {
        let config =
            AuthConfig { jwt_secret: Some(SECRET.to_owned()), jwks: None, audience: Some("authenticated".into()) };
        Verifier::new(&config).expect("test keys load")
    }

    fn jwks_only() -> Verifier {
        verifier(None, Some(full_jwks()))
    }

    fn both() -> Verifier {
        verifier(Some(SECRET), Some(full_jwks()))
    }

    fn sign_with(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
        let header = Header { kid: kid.map(str::to_owned), ..Header::new(alg) };
        jsonwebtoken::encode(&header, claims, key).expect("test token signs")
    }

    /// Signs with the test key for `alg`'s family.
    fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let key = match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => EncodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::ES256 => EncodingKey::from_ec_pem(EC_P256_PRIVATE_PEM.as_bytes()).expect("P-256 key"),
            Algorithm::ES384 => EncodingKey::from_ec_pem(EC_P384_PRIVATE_PEM.as_bytes()).expect("P-384 key"),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(ED25519_PRIVATE_PEM.as_bytes()).expect("Ed25519 key"),
            _ => EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).expect("RSA key"),
        };
        sign_with(alg, kid, &key, claims)
    }

    fn b64_json(value: &Value) -> String {
        URL_SAFE_NO_PAD.encode(value.to_string())
    }

    /// A token from parts, signed or not.
    fn hand_built(header: &Value, claims: &Value, signature: &str) -> String {
        format!("{}.{}.{signature}", b64_json(header), b64_json(claims))
    }

    fn anon() -> Value {
        json!({"role": "anon", "exp": NOW + 3600, "iss": "supabase", "aud": "authenticated"})
    }

    const USER: &str = "5f0c3c2e-7a3b-4e55-9d1a-2b7f0e6c9a10";

    fn ok(role: &str, sub: Option<&str>, exp: i64) -> Result<Claims, TokenError> {
        Ok(Claims { role: role.to_owned(), sub: sub.map(str::to_owned), exp, all: Arc::new(Value::Null) })
    }

    fn not_allowed(alg: &'static str, reason: &'static str) -> Result<Claims, TokenError> {
        Err(TokenError::AlgorithmNotAllowed { alg, reason })
    }

    const NO_SECRET: &str = "no JWT secret is configured (only a JWKS)";
    const NO_JWKS: &str = "no JWKS is configured (only a JWT secret)";

    #[test]
    fn verify_table() {
        let user = json!({"role": "authenticated", "sub": USER, "exp": NOW + 60, "aud": "authenticated"});
        let service = json!({"role": "service_role", "exp": NOW + 1});
        let anon_token = sign(Algorithm::HS256, None, &anon());
        let service_token = sign(Algorithm::HS256, None, &service);
        let [anon_header, _, anon_signature]: [&str; 3] =
            anon_token.split('.').collect::<Vec<_>>().try_into().expect("three parts");
        let [_, service_payload, service_signature]: [&str; 3] =
            service_token.split('.').collect::<Vec<_>>().try_into().expect("three parts");
        let rsa_token = sign(Algorithm::RS256, Some("rsa-1"), &anon());
        let confused = sign_with(
            Algorithm::HS256,
            Some("rsa-1"),
            &EncodingKey::from_secret(RSA_PUBLIC_PEM.as_bytes()),
            &json!({"role": "service_role", "exp": NOW + 60}),
        );
        let big = |padding: usize| {
            sign(Algorithm::HS256, None, &json!({"role": "anon", "exp": NOW + 1, "pad": "x".repeat(padding)}))
        };
        let (too_big, just_fits) = (big(15 * 1024), big(11_900));
        assert!(too_big.len() > 20 * 1024 && (15 * 1024..=MAX_TOKEN_BYTES).contains(&just_fits.len()));
        let ambiguous = verifier(None, Some(jwks(&[RSA_JWK, RSA_ANY_JWK])));
        let long_alg = "A".repeat(100);

        #[rustfmt::skip]
        let cases: Vec<(&str, Verifier, String, Result<Claims, TokenError>)> = vec![
            // Valid HS*.
            ("hs256 anon", secret_only(), anon_token.clone(), ok("anon", None, NOW + 3600)),
            ("hs256 authenticated with sub", secret_only(), sign(Algorithm::HS256, None, &user), ok("authenticated", Some(USER), NOW + 60)),
            ("hs256 service_role", secret_only(), service_token.clone(), ok("service_role", None, NOW + 1)),
            ("hs384", secret_only(), sign(Algorithm::HS384, None, &anon()), ok("anon", None, NOW + 3600)),
            ("hs512", secret_only(), sign(Algorithm::HS512, None, &anon()), ok("anon", None, NOW + 3600)),
            ("hs256 with a kid, both configured", both(), sign(Algorithm::HS256, Some("rsa-1"), &anon()), ok("anon", None, NOW + 3600)),
            ("sub not a string", secret_only(), sign(Algorithm::HS256, None, &json!({"role": "authenticated", "sub": 7, "exp": NOW + 1})), ok("authenticated", None, NOW + 1)),
            ("fractional exp rounds down", secret_only(), sign(Algorithm::HS256, None, &json!({"role": "anon", "exp": (NOW + 10) as f64 + 0.9})), ok("anon", None, NOW + 10)),
            ("nbf now", secret_only(), sign(Algorithm::HS256, None, &json!({"role": "anon", "exp": NOW + 1, "nbf": NOW})), ok("anon", None, NOW + 1)),
            // Time.
            ("expired", secret_only(), sign(Algorithm::HS256, None, &json!({"role": "anon", "exp": NOW - 300})), Err(TokenError::Expired { seconds_ago: 300 })),
            ("exp exactly now", secret_only(), sign(Algorithm::HS256, None, &json!({"role": "anon", "exp": NOW})), Err(TokenError::Expired { seconds_ago: 0 })),
            ("exp far in the past", secret_only(), sign(Algorithm::HS256, None, &json!({"role": "anon", "exp": i64::MIN})), Err(TokenError::Expired { seconds_ago: i64::MAX })),
            ("nbf in the future", secret_only(), sign(Algorithm::HS256, None, &json!({"role": "anon", "exp": NOW + 60, "nbf": NOW + 1})), Err(TokenError::NotYetValid)),
            ("aud matches (string)", with_audience(), sign(Algorithm::HS256, None, &json!({"role": "anon", "exp": NOW + 60, "aud": "authenticated"})), ok("anon", None, NOW + 60)),
            ("aud matches (array)", with_audience(), sign(Algorithm::HS256, None, &json!({"role": "anon", "exp": NOW + 60, "aud": ["x", "authenticated"]})), ok("anon", None, NOW + 60)),
            ("wrong aud", with_audience(), sign(Algorithm::HS256, None, &json!({"role": "anon", "exp": NOW + 60, "aud": "someone-else"})), Err(TokenError::WrongAudience)),
            ("missing aud when one is configured", with_audience(), sign(Algorithm::HS256, None, &json!({"role": "anon", "exp": NOW + 60})), Err(TokenError::WrongAudience)),
            ("aud ignored when none is configured", secret_only(), sign(Algorithm::HS256, None, &json!({"role": "anon", "exp": NOW + 60, "aud": "someone-else"})), ok("anon", None, NOW + 60)),
            ("nbf not a number", secret_only(), sign(Algorithm::HS256, None, &json!({"role": "anon", "exp": NOW + 60, "nbf": "0"})), Err(TokenError::Malformed)),
            // Required claims.
            ("missing role", secret_only(), sign(Algorithm::HS256, None, &json!({"exp": NOW + 60})), Err(TokenError::MissingClaims)),
            ("missing exp", secret_only(), sign(Algorithm::HS256, None, &json!({"role": "anon"})), Err(TokenError::MissingClaims)),
            ("exp as string", secret_only(), sign(Algorithm::HS256, None, &json!({"role": "anon", "exp": (NOW + 60).to_string()})), Err(TokenError::MissingClaims)),
            ("exp null", secret_only(), sign(Algorithm::HS256, None, &json!({"role": "anon", "exp": null})), Err(TokenError::MissingClaims)),
            ("role not a string", secret_only(), sign(Algorithm::HS256, None, &json!({"role": 1, "exp": NOW + 60})), Err(TokenError::MissingClaims)),
            // Not a JWT.
            ("empty", secret_only(), String::new(), Err(TokenError::Malformed)),
            ("garbage", secret_only(), "not a jwt at all".to_owned(), Err(TokenError::Malformed)),
            ("three dots", secret_only(), "...".to_owned(), Err(TokenError::Malformed)),
            ("three dots of junk", secret_only(), "a.b.c".to_owned(), Err(TokenError::Malformed)),
            ("junk with symbols", secret_only(), "%%%.$$$.***".to_owned(), Err(TokenError::Malformed)),
            ("four parts", secret_only(), format!("{anon_token}.x"), Err(TokenError::Malformed)),
            ("two parts", secret_only(), anon_token.rsplit_once('.').map(|(head, _)| head.to_owned()).unwrap_or_default(), Err(TokenError::Malformed)),
            ("header not JSON", secret_only(), format!("{}.{}.{anon_signature}", URL_SAFE_NO_PAD.encode("{"), b64_json(&anon())), Err(TokenError::Malformed)),
            ("header an array", secret_only(), format!("{}.{}.{anon_signature}", b64_json(&json!(["HS256"])), b64_json(&anon())), Err(TokenError::Malformed)),
            ("header without alg", secret_only(), hand_built(&json!({"typ": "JWT"}), &anon(), anon_signature), Err(TokenError::Malformed)),
            ("kid not a string", both(), hand_built(&json!({"alg": "RS256", "kid": 1}), &anon(), anon_signature), Err(TokenError::Malformed)),
            ("crit header", secret_only(), hand_built(&json!({"alg": "HS256", "crit": ["b64"], "b64": false}), &anon(), anon_signature), Err(TokenError::Malformed)),
            ("signature not base64url", secret_only(), format!("{}.{}.+/+/", anon_header, b64_json(&anon())), Err(TokenError::Malformed)),
            ("claims not an object", secret_only(), sign(Algorithm::HS256, None, &json!([1, 2])), Err(TokenError::Malformed)),
            ("20 KiB token", secret_only(), too_big, Err(TokenError::Malformed)),
            ("token just under 16 KiB", secret_only(), just_fits, ok("anon", None, NOW + 1)),
            // Signatures.
            ("bad signature", secret_only(), format!("{anon_header}.{service_payload}.{anon_signature}"), Err(TokenError::BadSignature)),
            ("another token's signature", secret_only(), format!("{}.{service_signature}", anon_token.rsplit_once('.').map(|(head, _)| head).unwrap_or_default()), Err(TokenError::BadSignature)),
            ("empty signature", secret_only(), hand_built(&json!({"alg": "HS256"}), &anon(), ""), Err(TokenError::BadSignature)),
            ("wrong secret", verifier(Some("another-secret-another-secret-another"), None), anon_token.clone(), Err(TokenError::BadSignature)),
            ("rs256 tampered", jwks_only(), format!("{}.{service_payload}.{}", rsa_token.split('.').next().unwrap_or_default(), rsa_token.rsplit('.').next().unwrap_or_default()), Err(TokenError::BadSignature)),
            // Algorithms.
            ("alg none", both(), hand_built(&json!({"alg": "none", "typ": "JWT"}), &anon(), ""), Err(TokenError::UnsupportedAlgorithm { alg: "none".to_owned() })),
            ("alg None with a signature", both(), hand_built(&json!({"alg": "None"}), &anon(), anon_signature), Err(TokenError::UnsupportedAlgorithm { alg: "None".to_owned() })),
            ("alg unknown, long", both(), hand_built(&json!({"alg": long_alg}), &anon(), anon_signature), Err(TokenError::UnsupportedAlgorithm { alg: format!("{}...", "A".repeat(QUOTE_CHARS)) })),
            ("alg not a string", both(), hand_built(&json!({"alg": 256}), &anon(), anon_signature), Err(TokenError::Malformed)),
            ("hs256 with only a JWKS", jwks_only(), anon_token.clone(), not_allowed("HS256", NO_SECRET)),
            ("rs256 with only a secret", secret_only(), rsa_token.clone(), not_allowed("RS256", NO_JWKS)),
            ("hs256 signed with the RSA public key, both configured", both(), confused.clone(), Err(TokenError::BadSignature)),
            ("hs256 signed with the RSA public key, only a JWKS", jwks_only(), confused, not_allowed("HS256", NO_SECRET)),
            // JWKS.
            ("rs256 by kid", jwks_only(), rsa_token.clone(), ok("anon", None, NOW + 3600)),
            ("rs256 without kid, one RSA key", jwks_only(), sign(Algorithm::RS256, None, &anon()), ok("anon", None, NOW + 3600)),
            ("rs256, both configured", both(), rsa_token.clone(), ok("anon", None, NOW + 3600)),
            ("es256 by kid", jwks_only(), sign(Algorithm::ES256, Some("ec-1"), &user), ok("authenticated", Some(USER), NOW + 60)),
            ("es256 without kid", jwks_only(), sign(Algorithm::ES256, None, &user), ok("authenticated", Some(USER), NOW + 60)),
            ("es384 by kid", jwks_only(), sign(Algorithm::ES384, Some("ec384-1"), &anon()), ok("anon", None, NOW + 3600)),
            ("eddsa by kid", jwks_only(), sign(Algorithm::EdDSA, Some("ed-1"), &anon()), ok("anon", None, NOW + 3600)),
            ("ps256 on a key without alg", ambiguous.clone(), sign(Algorithm::PS256, Some("rsa-any"), &anon()), ok("anon", None, NOW + 3600)),
            ("rs512 on a key without alg", ambiguous.clone(), sign(Algorithm::RS512, Some("rsa-any"), &anon()), ok("anon", None, NOW + 3600)),
            ("ps256 on a key pinned to RS256", jwks_only(), sign(Algorithm::PS256, Some("rsa-1"), &anon()), Err(TokenError::KeyAlgorithmMismatch { alg: "PS256", kid: "rsa-1".to_owned() })),
            ("ps256 without kid, only a pinned key", jwks_only(), sign(Algorithm::PS256, None, &anon()), not_allowed("PS256", "no JWKS key is for this algorithm")),
            ("rs256 with the EC key's kid", jwks_only(), sign(Algorithm::RS256, Some("ec-1"), &anon()), Err(TokenError::KeyAlgorithmMismatch { alg: "RS256", kid: "ec-1".to_owned() })),
            ("es256 signed by another key under ec-1", jwks_only(), { let token = sign(Algorithm::ES256, Some("ec-1"), &anon()); let forged = sign_with(Algorithm::ES256, Some("ec-1"), &EncodingKey::from_ec_pem(EC_P256_PRIVATE_PEM.as_bytes()).expect("P-256 key"), &service); format!("{}.{}", token.rsplit_once('.').map(|(head, _)| head).unwrap_or_default(), forged.rsplit('.').next().unwrap_or_default()) }, Err(TokenError::BadSignature)),
            ("kid not found", jwks_only(), sign(Algorithm::RS256, Some("nope"), &anon()), Err(TokenError::UnknownKid { kid: "nope".to_owned() })),
            ("kid with control characters", jwks_only(), sign(Algorithm::RS256, Some("a\u{1b}[31mb\u{e9}"), &anon()), Err(TokenError::UnknownKid { kid: "a?[31mb?".to_owned() })),
            ("no kid, two RSA keys", ambiguous, sign(Algorithm::RS256, None, &anon()), Err(TokenError::AmbiguousKey { alg: "RS256", candidates: 2 })),
        ];

        for (name, verifier, token, expected) in cases {
            assert_eq!(verifier.verify(&token, NOW), expected, "case {name}");
        }
    }

    #[test]
    fn messages_are_supabases() {
        let expected = [
            (TokenError::Expired { seconds_ago: 300 }, "Token has expired 300 seconds ago"),
            (TokenError::Expired { seconds_ago: 0 }, "Token has expired 0 seconds ago"),
            (TokenError::MissingClaims, "Fields `role` and `exp` are required in JWT"),
            (TokenError::Malformed, "The token provided is not a valid JWT"),
            (TokenError::BadSignature, "Failed to validate JWT signature"),
            (TokenError::NotYetValid, "Token is not valid yet"),
            (TokenError::UnsupportedAlgorithm { alg: "none".to_owned() }, "JWT algorithm `none` is not supported"),
            (
                TokenError::AlgorithmNotAllowed { alg: "HS256", reason: NO_SECRET },
                "JWT algorithm `HS256` is not allowed: no JWT secret is configured (only a JWKS)",
            ),
            (
                TokenError::KeyAlgorithmMismatch { alg: "RS256", kid: "ec-1".to_owned() },
                "JWT algorithm `RS256` is not allowed for the JWKS key with kid \"ec-1\"",
            ),
            (TokenError::UnknownKid { kid: "nope".to_owned() }, "No JWKS key has the token's kid \"nope\""),
            (
                TokenError::AmbiguousKey { alg: "RS256", candidates: 2 },
                "The token has no kid and 2 JWKS keys accept `RS256`",
            ),
        ];
        for (err, message) in expected {
            assert_eq!(err.to_string(), message);
            assert_eq!(err.code(), "InvalidJWTToken");
        }
        let err = secret_only().verify(&sign(Algorithm::HS256, None, &json!({"role": "anon", "exp": NOW - 42})), NOW);
        let err = err.expect_err("expired");
        assert_eq!(format!("{}: {err}", err.code()), "InvalidJWTToken: Token has expired 42 seconds ago");
    }

    #[test]
    fn claims_give_viewer_and_time_left() {
        let user = secret_only()
            .verify(&sign(Algorithm::HS256, None, &json!({"role": "authenticated", "sub": USER, "exp": NOW + 90})), NOW)
            .expect("valid");
        let viewer = user.viewer();
        assert_eq!(&*viewer.role, "authenticated");
        assert_eq!(viewer.sub(), Some(USER));
        assert_eq!(viewer.claims["exp"], json!(NOW + 90), "the viewer carries every claim");
        assert_eq!(user.seconds_left(NOW), 90);
        assert_eq!(user.seconds_left(NOW + 100), -10);
        let claims = |role: &str, sub: Option<&str>| Claims {
            role: role.to_owned(),
            sub: sub.map(str::to_owned),
            exp: 0,
            all: Arc::new(Value::Null),
        };
        assert_eq!(claims("x", None).seconds_left(i64::MIN), i64::MAX);
    }

    #[test]
    fn no_keys_tells_the_operator_what_to_pass() {
        for config in [
            AuthConfig::default(),
            AuthConfig { jwt_secret: Some(String::new()), jwks: Some("  ".to_owned()), audience: None },
        ] {
            let err = Verifier::new(&config).expect_err("no keys");
            assert!(matches!(err, AuthConfigError::NoKeys), "{err:?}");
            let message = err.to_string();
            for flag in ["--jwt-secret", "API_JWT_SECRET", "--jwks", "API_JWT_JWKS"] {
                assert!(message.contains(flag), "{message}");
            }
        }
    }

    #[test]
    fn jwks_from_a_file_and_inline() {
        let rsa_token = sign(Algorithm::RS256, Some("rsa-1"), &anon());
        let es_token = sign(Algorithm::ES256, Some("ec-1"), &anon());

        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(&mut file, full_jwks().as_bytes()).expect("write JWKS");
        let path = file.path().to_str().expect("utf-8 path").to_owned();
        let from_file = verifier(None, Some(path));
        let inline = verifier(None, Some(format!("\n  {}\n", full_jwks())));
        for verifier in [from_file, inline] {
            assert_eq!(verifier.verify(&rsa_token, NOW), ok("anon", None, NOW + 3600));
            assert_eq!(verifier.verify(&es_token, NOW), ok("anon", None, NOW + 3600));
        }
    }

    fn config_error(jwks: &str) -> AuthConfigError {
        Verifier::new(&AuthConfig { jwt_secret: Some(SECRET.to_owned()), jwks: Some(jwks.to_owned()), audience: None })
            .expect_err("bad JWKS")
    }

    #[test]
    fn invalid_jwks_is_a_definite_error() {
        let missing = config_error("/nonexistent/walcast/jwks.json");
        assert!(
            matches!(&missing, AuthConfigError::ReadJwks { path, .. } if path.ends_with("jwks.json")),
            "{missing:?}"
        );
        assert!(missing.to_string().contains("/nonexistent/walcast/jwks.json"), "{missing}");

        let not_json = config_error(r#"{"keys": [{"kty": "RSA", "n": "c2VjcmV0"#);
        assert!(matches!(&not_json, AuthConfigError::JwksJson { origin: JwksOrigin::Inline, .. }), "{not_json:?}");
        assert!(!not_json.to_string().contains("c2VjcmV0"), "{not_json}");

        assert!(matches!(config_error(r#"{"kty": "RSA"}"#), AuthConfigError::JwksShape { .. }));
        assert!(matches!(config_error(r#"{"keys": {}}"#), AuthConfigError::JwksShape { .. }));

        let oct = config_error(r#"{"keys": [{"kty": "oct", "kid": "hs", "k": "c2VjcmV0LXNlY3JldA"}]}"#);
        assert!(matches!(&oct, AuthConfigError::JwksKey { index: 0, kid: Some(kid), .. } if kid == "hs"), "{oct:?}");
        let message = oct.to_string();
        assert!(message.contains("--jwt-secret") && !message.contains("c2VjcmV0"), "{message}");

        let short_rsa = r#"{"kty": "RSA", "kid": "short", "n": "xwZfSkOiOg0frYMrPaH35IKVf6n16IfFQ3zjrBKUN1EXcsUNhFQrLcF58uyqsfL3yS01-MgMdxVZGFSDTEMivQ", "e": "AQAB"}"#;
        let err = config_error(&jwks(&[EC_P256_JWK, short_rsa]));
        assert!(matches!(&err, AuthConfigError::JwksKey { index: 1, .. }), "{err:?}");
        assert!(err.to_string().contains("512 bits"), "{err}");

        let off_curve = r#"{"kty": "EC", "crv": "P-256", "x": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "y": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAE"}"#;
        let err = config_error(&jwks(&[off_curve]));
        assert!(err.to_string().contains("not a point on its curve"), "{err}");

        let short_x = r#"{"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"}"#;
        assert!(config_error(&jwks(&[short_x])).to_string().contains("\"x\" is not 32 bytes"));
        let no_n = r#"{"kty": "RSA", "e": "AQAB"}"#;
        assert!(config_error(&jwks(&[no_n])).to_string().contains("no \"n\""));
        let padded = RSA_JWK.replace("\"AQAB\"", "\"AQAB=\"");
        assert!(config_error(&jwks(&[&padded])).to_string().contains("\"e\" is not base64url"));
        let even_e = RSA_JWK.replace("\"AQAB\"", "\"AQAA\"");
        assert!(config_error(&jwks(&[&even_e])).to_string().contains("public exponent"));
        let wrong_alg = EC_P256_JWK.replace("\"kty\"", "\"alg\":\"RS256\",\"kty\"");
        assert!(config_error(&jwks(&[&wrong_alg])).to_string().contains("RS256 does not fit an EC P-256 key"));
        assert!(config_error(&jwks(&["1"])).to_string().contains("not a JSON object"));

        let duplicate = config_error(&jwks(&[RSA_JWK, RSA_JWK]));
        assert!(duplicate.to_string().contains("same kid"), "{duplicate}");

        let only_skipped = config_error(&jwks(&[
            &RSA_JWK.replace("\"use\":\"sig\"", "\"use\":\"enc\""),
            r#"{"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}"#,
            r#"{"kty": "RSA", "alg": "RSA-OAEP", "n": "AA", "e": "AQAB"}"#,
            r#"{"kty": "PQC"}"#,
        ]));
        assert!(matches!(only_skipped, AuthConfigError::NoUsableKey { skipped: 4, .. }), "{only_skipped:?}");
        assert!(matches!(config_error(r#"{"keys": []}"#), AuthConfigError::NoUsableKey { skipped: 0, .. }));
    }

    #[test]
    fn skipped_keys_do_not_hide_usable_ones() {
        let verifier = verifier(
            None,
            Some(jwks(&[
                r#"{"kty": "RSA", "kid": "enc", "use": "enc", "n": "AA", "e": "AQAB"}"#,
                r#"{"kty": "EC", "kid": "ops", "crv": "P-256", "key_ops": ["encrypt"], "x": "AA", "y": "AA"}"#,
                EC_P256_JWK,
            ])),
        );
        assert_eq!(verifier.verify(&sign(Algorithm::ES256, None, &anon()), NOW), ok("anon", None, NOW + 3600));
        assert_eq!(
            verifier.verify(&sign(Algorithm::ES256, Some("enc"), &anon()), NOW),
            Err(TokenError::UnknownKid { kid: "enc".to_owned() })
        );
    }

    #[test]
    fn debug_never_prints_the_secret() {
        let debug = format!("{:?}", both());
        assert!(!debug.contains(SECRET), "{debug}");
        assert!(debug.contains("[redacted]") && debug.contains("rsa-1"), "{debug}");
        let config = AuthConfig { jwt_secret: Some(SECRET.to_owned()), jwks: None, audience: None };
        let cloned = Verifier::new(&config).expect("secret").clone();
        assert!(!format!("{cloned:?}").contains(SECRET));
    }

    /// Sockets presenting the same token share one copy of its claims;
    /// other tokens get their own, and a token seen again after every copy
    /// was dropped decodes afresh. Pruning keeps the map near the live count.
    #[test]
    fn the_same_token_shares_its_claims() {
        let verifier = secret_only();
        let token = sign(Algorithm::HS256, None, &json!({"role": "authenticated", "sub": USER, "exp": NOW + 90}));
        let other = sign(Algorithm::HS256, None, &json!({"role": "authenticated", "sub": "other", "exp": NOW + 90}));
        let a = verifier.verify(&token, NOW).expect("valid");
        let b = verifier.clone().verify(&token, NOW).expect("valid");
        assert!(Arc::ptr_eq(&a.all, &b.all), "the same token's claims are shared");
        let c = verifier.verify(&other, NOW).expect("valid");
        assert!(!Arc::ptr_eq(&a.all, &c.all));
        assert_eq!(c.all["sub"], json!("other"));
        // A refused token shares nothing: the checks come first.
        assert_eq!(verifier.verify(&token, NOW + 90), Err(TokenError::Expired { seconds_ago: 0 }));
        drop((a, b));
        let again = verifier.verify(&token, NOW).expect("valid");
        assert_eq!(again.all["sub"], json!(USER));
        for i in 0..3000 {
            let t = sign(Algorithm::HS256, None, &json!({"role": "anon", "n": i, "exp": NOW + 90}));
            drop(verifier.verify(&t, NOW).expect("valid"));
        }
        let entries = verifier.keys.shared.lock().unwrap().by_payload.len();
        assert!(entries <= 1024, "dead entries are pruned ({entries} kept)");
        assert!(Arc::ptr_eq(&again.all, &verifier.verify(&token, NOW).expect("valid").all), "a live entry survives");
    }

    #[test]
    fn sign_hs256_round_trips() {
        let token = sign_hs256(SECRET.as_bytes(), &anon());
        assert_eq!(secret_only().verify(&token, NOW), ok("anon", None, NOW + 3600));
    }

    /// A JSON value for a claim or header member: any type, near-valid often.
    fn json_member() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (NOW - 10..NOW + 10).prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            "[a-z_]{0,12}".prop_map(Value::from),
            prop::sample::select(vec!["anon", "authenticated", "service_role", USER]).prop_map(Value::from),
            prop::collection::vec(any::<i32>(), 0..3).prop_map(Value::from),
        ]
    }

    fn alg_name_strategy() -> impl Strategy<Value = Value> {
        prop_oneof![
            prop::sample::select(vec![
                "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                "EdDSA", "none", "NONE", "hs256", "",
            ])
            .prop_map(Value::from),
            json_member(),
        ]
    }

    /// Structured tokens: a plausible header, claims of any types, a
    /// signature that is random or (for HS256) real.
    fn structured_token() -> impl Strategy<Value = String> {
        let header = (
            alg_name_strategy(),
            prop::option::of(prop_oneof![
                prop::sample::select(vec!["rsa-1", "ec-1", "ec384-1", "ed-1", "nope"]).prop_map(Value::from),
                json_member(),
            ]),
            any::<bool>(),
        )
            .prop_map(|(alg, kid, crit)| {
                let mut header = json!({"alg": alg});
                if let Some(kid) = kid {
                    header["kid"] = kid;
                }
                if crit {
                    header["crit"] = json!([]);
                }
                header
            });
        let claims = prop::collection::btree_map(
            prop::sample::select(vec!["role", "exp", "nbf", "sub", "aud", "other"]),
            json_member(),
            0..6,
        )
        .prop_map(|members| Value::Object(members.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()));
        let signature = prop_oneof![
            Just(None),
            prop::collection::vec(any::<u8>(), 0..600).prop_map(|bytes| Some(URL_SAFE_NO_PAD.encode(bytes))),
        ];
        (header, claims, signature).prop_map(|(header, claims, signature)| {
            let message = format!("{}.{}", b64_json(&header), b64_json(&claims));
            let signature = signature.unwrap_or_else(|| {
                jsonwebtoken::crypto::sign(
                    message.as_bytes(),
                    &EncodingKey::from_secret(SECRET.as_bytes()),
                    Algorithm::HS256,
                )
                .expect("HMAC signs")
            });
            format!("{message}.{signature}")
        })
    }

    proptest! {
        #[test]
        fn verify_never_panics_on_strings(token in any::<String>()) {
            let _ = both().verify(&token, NOW);
        }

        #[test]
        fn verify_never_panics_on_base64_parts(
            parts in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..5),
            now in any::<i64>(),
        ) {
            let token = parts.iter().map(|part| URL_SAFE_NO_PAD.encode(part)).collect::<Vec<_>>().join(".");
            let _ = both().verify(&token, now);
        }

        #[test]
        fn verify_never_panics_on_structured_tokens(token in structured_token(), now in prop_oneof![Just(NOW), any::<i64>()]) {
            if let Ok(claims) = both().verify(&token, now) {
                // Whatever got through is unexpired and, being random, HMAC-signed by us.
                prop_assert!(claims.exp > now);
                prop_assert!(claims.seconds_left(now) > 0);
            }
        }
    }
}
