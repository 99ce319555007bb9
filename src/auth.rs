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
        data.claims
            .sub
            .parse()
            .map_err(|_| Error::Unauthorized("token `sub` must be an operator id".into()))
    }
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
    let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
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

    #[test]
    fn bearer_checks_key() {
        assert!(bearer_matches(Some("Bearer k1"), "k1"));
        assert!(!bearer_matches(Some("Bearer k2"), "k1"));
        assert!(!bearer_matches(Some("k1"), "k1"));
        assert!(!bearer_matches(None, "k1"));
    }
}
