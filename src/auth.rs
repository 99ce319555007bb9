//! Operator tokens (JWT HS256, claims `sub` and `exp`), the back end's API key, and the
//! secrets generated into the data dir when the config leaves them empty.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// Signs and verifies operator tokens.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl Tokens {
    pub fn new(secret: &str) -> Tokens {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        // A token that is not valid yet is refused like an expired one.
        validation.validate_nbf = true;
        Tokens {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    pub fn mint(&self, operator: u64, ttl: Duration) -> String {
        let exp = (SystemTime::now() + ttl)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = Claims {
            sub: operator.to_string(),
            exp,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    /// The operator id of a valid token.
    pub fn verify(&self, token: &str) -> Result<u64> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| Error::Unauthorized(format!("invalid token: {e}")))?;
        operator_id(&data.claims.sub).ok_or_else(|| {
            Error::Unauthorized(
                "token `sub` must be an operator id in decimal (\"7\": no sign, no leading zero, no space)"
                    .into(),
            )
        })
    }
}

/// The operator id a `sub` names, in canonical decimal only: `"+7"`, `"07"` and `" 7"` are
/// not operator 7 (one id, one spelling: a token cannot alias another's).
fn operator_id(sub: &str) -> Option<u64> {
    let canonical = !sub.is_empty()
        && sub.bytes().all(|b| b.is_ascii_digit())
        && (sub == "0" || !sub.starts_with('0'));
    canonical.then(|| sub.parse().ok()).flatten()
}

/// The credentials of an `Authorization: Bearer …` header. The scheme is matched without
/// regard to case (RFC 7235 section 2.1) and may be followed by several spaces.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, rest) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_start_matches(' ');
    (!token.is_empty()).then_some(token)
}

/// The two secrets in use, from the config or the data dir.
#[derive(Clone)]
pub struct Secrets {
    pub jwt_secret: String,
    pub api_key: String,
}

impl Secrets {
    /// Takes the configured secrets; an empty one is read from the data dir, or generated
    /// there (mode 0600) on first start.
    pub fn resolve(cfg: &Config) -> std::io::Result<Secrets> {
        let dir = &cfg.store.data_dir;
        let pick = |configured: &str, file: &str| -> std::io::Result<String> {
            if configured.is_empty() {
                load_or_generate(&dir.join(file))
            } else {
                Ok(configured.to_string())
            }
        };
        Ok(Secrets {
            jwt_secret: pick(cfg.auth.jwt_secret.as_str(), "jwt_secret")?,
            api_key: pick(cfg.auth.api_key.as_str(), "api_key")?,
        })
    }
}

fn load_or_generate(path: &Path) -> std::io::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let s = existing.trim().to_string();
        if !s.is_empty() {
            return Ok(s);
        }
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let bytes: [u8; 32] = rand::random();
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(secret.as_bytes())?;
    f.sync_all()?;
    tracing::info!(path = %path.display(), "generated a secret");
    Ok(secret)
}

/// Compares the `Authorization: Bearer …` value with the API key.
pub fn bearer_matches(header: Option<&str>, key: &str) -> bool {
    let Some(given) = header.and_then(bearer) else {
        return false;
    };
    given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip() {
        let t = Tokens::new("s3cret");
        assert_eq!(t.verify(&t.mint(7, Duration::from_secs(60))).unwrap(), 7);
    }

    #[test]
    fn token_bad_signature_and_expired_are_refused() {
        let t = Tokens::new("s3cret");
        let other = Tokens::new("other").mint(7, Duration::from_secs(60));
        assert!(matches!(t.verify(&other), Err(Error::Unauthorized(_))));
        let claims = Claims {
            sub: "7".into(),
            exp: 1,
        };
        let old = jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert!(t.verify(&old).unwrap_err().to_string().contains("Expired"));
        assert!(t.verify("garbage").is_err());
    }

    #[test]
    fn secrets_generated_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.store.data_dir = dir.path().to_path_buf();
        let a = Secrets::resolve(&cfg).unwrap();
        let b = Secrets::resolve(&cfg).unwrap();
        assert_eq!(a.api_key, b.api_key);
        assert_eq!(a.jwt_secret, b.jwt_secret);
        assert_ne!(a.api_key, a.jwt_secret);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("api_key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    fn signed(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap()
    }

    fn in_an_hour() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600
    }

    #[test]
    fn jwt_sub_only_in_canonical_decimal() {
        let t = Tokens::new("s3cret");
        for sub in ["7", "0", "18446744073709551615"] {
            let tok = signed(serde_json::json!({"sub": sub, "exp": in_an_hour()}));
            assert_eq!(t.verify(&tok).unwrap().to_string(), sub);
        }
        for sub in [
            "+7",
            "07",
            " 7",
            "7 ",
            "-7",
            "",
            "7.0",
            "0x7",
            "18446744073709551616",
            "٧",
        ] {
            let tok = signed(serde_json::json!({"sub": sub, "exp": in_an_hour()}));
            let e = t.verify(&tok).unwrap_err();
            assert!(matches!(e, Error::Unauthorized(_)), "{sub:?}: {e}");
        }
    }

    #[test]
    fn jwt_future_nbf_is_refused() {
        let t = Tokens::new("s3cret");
        let later =
            signed(serde_json::json!({"sub": "7", "exp": in_an_hour() + 60, "nbf": in_an_hour()}));
        let e = t.verify(&later).unwrap_err();
        assert!(e.to_string().contains("ImmatureSignature"), "{e}");
        let past = signed(serde_json::json!({"sub": "7", "exp": in_an_hour(), "nbf": 1}));
        assert_eq!(t.verify(&past).unwrap(), 7);
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for h in ["Bearer k1", "bearer k1", "BEARER k1", "bEaReR   k1"] {
            assert_eq!(bearer(h), Some("k1"), "{h}");
        }
        for h in ["Bearerk1", "Basic k1", "Bearer ", "Bearer", "k1"] {
            assert_eq!(bearer(h), None, "{h}");
        }
    }

    #[test]
    fn bearer_checks_key() {
        assert!(bearer_matches(Some("Bearer k1"), "k1"));
        assert!(bearer_matches(Some("bearer k1"), "k1"));
        assert!(!bearer_matches(Some("Bearer k2"), "k1"));
        assert!(!bearer_matches(Some("k1"), "k1"));
        assert!(!bearer_matches(None, "k1"));
    }
}
