//! Operator tokens: the input is the claims part of a correctly signed HS256 token (so the
//! claims parser, `exp`/`nbf` checks and the `sub` rule are reached), and also a token and an
//! `Authorization` header as they come. An accepted token names its operator canonically.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use presence_hub::auth::{Tokens, bearer, bearer_matches};

const SECRET: &str = "fuzz-jwt-secret";

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
    if let Ok(op) = tokens.verify(&format!("{message}.{sig}")) {
        let claims: serde_json::Value =
            serde_json::from_slice(data).expect("accepted claims are JSON");
        assert_eq!(
            claims["sub"].as_str(),
            Some(op.to_string().as_str()),
            "sub is canonical"
        );
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tokens.verify(text);
        if let Some(t) = bearer(text) {
            assert!(!t.is_empty() && !t.starts_with(' '));
        }
        let _ = bearer_matches(Some(text), "key");
    }
});
