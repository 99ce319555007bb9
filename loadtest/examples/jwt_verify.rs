//! What verifying one operator JWT costs, the way the hub does it (jsonwebtoken 11, HS256,
//! `exp`/`sub` required, `nbf` checked) against a pre-keyed HMAC-SHA256 (keyed once, cloned per
//! token, constant-time `verify_slice`, claims parsed with serde_json): the figure behind
//! keeping jsonwebtoken (docs/benchmarks.md, "Churn and the JWT").
//!
//! `cargo run --release -p presence-loadtest --example jwt_verify`

use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use sha2::Sha256;

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

const N: u32 = 200_000;

fn per_token(label: &str, mut f: impl FnMut()) {
    let t0 = Instant::now();
    for _ in 0..N {
        f();
    }
    println!(
        "{label:<44} {:>6.2} µs",
        t0.elapsed().as_secs_f64() * 1e6 / f64::from(N)
    );
}

fn main() {
    let secret = b"loadtest-jwt-secret-0123456789abcdef";
    let claims = Claims {
        sub: "123".into(),
        exp: 4_000_000_000,
    };
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("signing");
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation.leeway = 0;
    validation.validate_nbf = true;
    let key = DecodingKey::from_secret(secret);
    let keyed = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");

    for _ in 0..3 {
        per_token("jsonwebtoken::decode (the hub today)", || {
            let d = jsonwebtoken::decode::<Claims>(&token, &key, &validation).expect("valid");
            std::hint::black_box(d);
        });
        per_token("pre-keyed HMAC + serde_json claims", || {
            let (message, signature) = token.rsplit_once('.').expect("three parts");
            let signature = URL_SAFE_NO_PAD.decode(signature).expect("base64");
            let mut mac = keyed.clone();
            mac.update(message.as_bytes());
            mac.verify_slice(&signature).expect("signature");
            let payload = URL_SAFE_NO_PAD
                .decode(message.split_once('.').expect("header").1)
                .expect("base64");
            let c: Claims = serde_json::from_slice(&payload).expect("claims");
            std::hint::black_box(c);
        });
        per_token("keying HMAC-SHA256 alone (what pre-keying saves)", || {
            let mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
            std::hint::black_box(mac);
        });
    }
}
