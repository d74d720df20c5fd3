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

/// Where keys come from.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// The project's JWT secret for HS256/HS384/HS512 tokens, used as raw
    /// bytes (not base64-decoded). Empty counts as not given.
    pub jwt_secret: Option<String>,
    /// A JWKS (`{"keys":[...]}`) for asymmetric tokens: a file path, or the
    /// JSON text itself if it starts with `{`. Empty counts as not given.
    pub jwks: Option<String>,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The Postgres role: `anon`, `authenticated`, `service_role`, ….
    pub role: String,
    /// The user id, if `sub` is a string.
    pub sub: Option<String>,
    /// Expiry, Unix seconds (fractions rounded down).
    pub exp: i64,
}

impl Claims {
    /// Who is looking, for the policy layer.
    pub fn viewer(&self) -> Viewer {
        Viewer::from_claims(&self.role, self.sub.as_deref())
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
        Ok(Verifier { keys: Arc::new(Keys { secret, jwks }) })
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
        let sub = match claims.get("sub") {
            Some(Value::String(sub)) => Some(sub.clone()),
            _ => None,
        };
        Ok(Claims { role, sub, exp })
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

    let algorithms = match string_member(jwk, "alg")? {
        None => kind.algorithms().to_vec(),
        Some(alg) => match alg.parse::<Algorithm>() {
            Ok(alg) if kind.algorithms().contains(&alg) => vec![alg],
            Ok(alg) => return Err(format!("\"alg\" {} does not fit a {kind:?} key", alg_name(alg))),
            // An algorithm for something else (encryption): not a signing key.
            Err(_) => return Ok(None),
        },
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
