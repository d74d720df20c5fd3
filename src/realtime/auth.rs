//! JWT verification for sockets and channels (placeholder: signing only).

use jsonwebtoken::{EncodingKey, Header};

/// Signs `claims` with HS256 and `secret` (demo tokens, tests).
///
/// # Panics
/// Never for a JSON object of claims.
pub fn sign_hs256(secret: &[u8], claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::default(), claims, &EncodingKey::from_secret(secret))
        .expect("HS256 signing of a JSON value cannot fail")
}
