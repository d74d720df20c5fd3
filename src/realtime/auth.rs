//! JWT verification for sockets and channels (interim HS256-only version;
//! replaced by the full verifier).

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

use crate::policy::Viewer;

/// Where keys come from.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// HS256 secret.
    pub jwt_secret: Option<String>,
    /// JWKS (path or JSON).
    pub jwks: Option<String>,
}

/// Verifies tokens.
#[derive(Clone)]
pub struct Verifier {
    secret: Vec<u8>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier")
    }
}

/// Bad auth configuration.
#[derive(Debug, thiserror::Error)]
#[error("no JWT secret configured")]
pub struct AuthConfigError;

/// The claims walcast uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `role`.
    pub role: String,
    /// `sub`.
    pub sub: Option<String>,
    /// `exp`.
    pub exp: i64,
}

impl Claims {
    /// The viewer.
    pub fn viewer(&self) -> Viewer {
        Viewer::from_claims(&self.role, self.sub.as_deref())
    }
}

/// A refused token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Expired.
    #[error("Token has expired {0} seconds ago")]
    Expired(i64),
    /// Other.
    #[error("The token provided is not a valid JWT")]
    Invalid,
    /// Claims.
    #[error("Fields `role` and `exp` are required in JWT")]
    MissingClaims,
}

impl TokenError {
    /// Supabase's code.
    pub fn code(&self) -> &'static str {
        "InvalidJWTToken"
    }
}

impl Verifier {
    /// A verifier.
    ///
    /// # Errors
    /// No secret.
    pub fn new(config: &AuthConfig) -> Result<Verifier, AuthConfigError> {
        Ok(Verifier { secret: config.jwt_secret.clone().ok_or(AuthConfigError)?.into_bytes() })
    }

    /// Verifies.
    ///
    /// # Errors
    /// Refused.
    pub fn verify(&self, token: &str, now_unix: i64) -> Result<Claims, TokenError> {
        let mut v = Validation::new(Algorithm::HS256);
        v.validate_exp = false;
        v.required_spec_claims.clear();
        v.validate_aud = false;
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &DecodingKey::from_secret(&self.secret), &v)
            .map_err(|_| TokenError::Invalid)?;
        let role = data.claims.get("role").and_then(|r| r.as_str()).ok_or(TokenError::MissingClaims)?;
        let exp = data.claims.get("exp").and_then(serde_json::Value::as_i64).ok_or(TokenError::MissingClaims)?;
        if exp <= now_unix {
            return Err(TokenError::Expired(now_unix - exp));
        }
        let sub = data.claims.get("sub").and_then(|s| s.as_str()).map(str::to_owned);
        Ok(Claims { role: role.to_owned(), sub, exp })
    }
}

/// Signs `claims` with HS256 and `secret` (demo tokens, tests).
///
/// # Panics
/// Never for a JSON object of claims.
pub fn sign_hs256(secret: &[u8], claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::default(), claims, &EncodingKey::from_secret(secret))
        .expect("HS256 signing of a JSON value cannot fail")
}
