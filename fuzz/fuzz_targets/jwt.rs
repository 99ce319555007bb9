//! Operator tokens: the input is the claims part of a correctly signed HS256 token (so the
//! claims parser, `exp`/`nbf` checks and the `sub` rule are reached), and also a token and an
//! `Authorization` header as they come. The hub's verifier is held to `jsonwebtoken` with the
//! hub's rules (the reference it replaced): one accepts a token exactly when the other does,
//! and an accepted token names its operator canonically.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use libfuzzer_sys::fuzz_target;
use presence_hub::auth::{Tokens, bearer, bearer_matches};

const SECRET: &str = "fuzz-jwt-secret";

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    #[allow(dead_code)]
    exp: u64,
}

/// `sub` as `jsonwebtoken` reads a token under the hub's rules, or why it refuses it.
fn reference(token: &str) -> Result<String, String> {
    let mut v = Validation::new(Algorithm::HS256);
    v.set_required_spec_claims(&["exp", "sub"]);
    v.leeway = 0;
    v.validate_nbf = true;
    jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(SECRET.as_bytes()), &v)
        .map(|d| d.claims.sub)
        .map_err(|e| e.to_string())
}

fn check(tokens: &Tokens, token: &str) {
    // Both read the clock: the reference before and after pins the second the hub's
    // verifier saw (time only moves on); a token whose answer changed in between is skipped.
    let before = reference(token);
    let ours = tokens.verify(token);
    let after = reference(token);
    if before != after {
        return;
    }
    match (ours, after) {
        (Ok(op), Ok(sub)) => assert_eq!(sub, op.to_string(), "sub is canonical"),
        (Err(_), Err(_)) => {}
        // Accepted by the reference with a `sub` that is no operator id in decimal.
        (Err(e), Ok(sub)) => {
            assert!(e.to_string().contains("`sub`"), "{e}: refused, sub {sub:?}");
            assert!(
                sub.parse::<u64>().map_or(true, |n| n.to_string() != sub),
                "a canonical sub {sub:?} refused: {e}"
            );
        }
        (Ok(op), Err(e)) => panic!("accepted as operator {op}, jsonwebtoken refuses: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let tokens = Tokens::new(SECRET);
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let message = format!("{header}.{}", URL_SAFE_NO_PAD.encode(data));
    let sig = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
        Algorithm::HS256,
    )
    .unwrap();
    check(&tokens, &format!("{message}.{sig}"));
    if let Ok(text) = std::str::from_utf8(data) {
        check(&tokens, text);
        if let Some(t) = bearer(text) {
            assert!(!t.is_empty() && !t.starts_with(' '));
        }
        let _ = bearer_matches(Some(text), "key");
    }
});
