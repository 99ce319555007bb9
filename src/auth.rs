//! Operator tokens (JWT HS256, claims `sub` and `exp`), the back end's API key, and the
//! secrets generated into the data dir when the config leaves them empty.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};

mod jwt;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// Signs and verifies operator tokens. Signing (rare: the token endpoint, the CLI) goes
/// through `jsonwebtoken`; verifying (every operator upgrade) through a verifier keyed once.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    verifier: jwt::Verifier,
}

impl Tokens {
    pub fn new(secret: &str) -> Tokens {
        Tokens {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            verifier: jwt::Verifier::new(secret.as_bytes()),
        }
    }

    pub fn mint(&self, operator: u64, ttl: Duration) -> String {
        let exp = (SystemTime::now() + ttl)
            .duration_since(UNIX_EPOCH)
            // A clock before 1970 refuses every token as expired (jsonwebtoken panics there).
            .map_or(u64::MAX, |d| d.as_secs());
        let claims = Claims {
            sub: operator.to_string(),
            exp,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    /// The operator id of a valid token (HS256, `exp` and `sub` required, no leeway, a
    /// token that is not valid yet (`nbf`) refused like an expired one).
    pub fn verify(&self, token: &str) -> Result<u64> {
        self.verify_at(token, unix_now())
    }

    fn verify_at(&self, token: &str, now: u64) -> Result<u64> {
        let id = self
            .verifier
            .verify(token, now, operator_id)
            .map_err(|e| Error::Unauthorized(format!("invalid token: {e}")))?;
        id.ok_or_else(|| {
            Error::Unauthorized(
                "token `sub` must be an operator id in decimal (\"7\": no sign, no leading zero, no space)"
                    .into(),
            )
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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

    /// The hub's verification as it was, through `jsonwebtoken`: the reference the
    /// hand-written verifier is held to.
    fn reference(secret: &str, token: &str) -> std::result::Result<Option<u64>, String> {
        let mut v = jsonwebtoken::Validation::new(Algorithm::HS256);
        v.set_required_spec_claims(&["exp", "sub"]);
        v.leeway = 0;
        v.validate_nbf = true;
        let key = jsonwebtoken::DecodingKey::from_secret(secret.as_bytes());
        jsonwebtoken::decode::<Claims>(token, &key, &v)
            .map(|d| operator_id(&d.claims.sub))
            .map_err(|e| e.to_string())
    }

    fn b64(part: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(part)
    }

    /// A token with any header and claims, HS256-signed with `key` whatever the header says.
    fn raw(header: &str, claims: &str, key: &str) -> String {
        use base64::Engine as _;
        use hmac::Mac as _;
        let message = format!("{}.{}", b64(header), b64(claims));
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
        mac.update(message.as_bytes());
        let sig =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{message}.{sig}")
    }

    /// Every token either verifier accepts, the other accepts with the same operator; every
    /// token one refuses, the other refuses, for the same reason where `jsonwebtoken` names
    /// one (its parse errors are all `InvalidToken` here).
    #[test]
    fn jwt_verify_agrees_with_jsonwebtoken() {
        let t = Tokens::new("s3cret");
        let h = r#"{"alg":"HS256","typ":"JWT"}"#;
        let exp = in_an_hour();
        let past = exp - 7200;
        let c = |extra: &str| format!(r#"{{"sub":"7","exp":{exp}{extra}}}"#);
        let good = raw(h, &c(""), "s3cret");
        let long = format!(r#","pad":"{}""#, "x".repeat(2000));
        let mut cases = vec![
            ("minted", t.mint(7, Duration::from_secs(60))),
            (
                "by jsonwebtoken",
                signed(serde_json::json!({"sub": "7", "exp": exp})),
            ),
            ("raw", good.clone()),
            (
                "header with kid",
                raw(r#"{"alg":"HS256","kid":"k1"}"#, &c(""), "s3cret"),
            ),
            (
                "other claims",
                raw(h, &c(r#","iss":"x","role":[1,2]"#), "s3cret"),
            ),
            ("claims past the stack buffer", raw(h, &c(&long), "s3cret")),
            // Valid JSON whose number no f64 holds (found by the fuzzer): an unread claim
            // is only scanned, as `jsonwebtoken` scans it.
            (
                "huge unread number",
                raw(h, &c(r#","zbf":9551e615"#), "s3cret"),
            ),
            // A claim given twice: refused when it is one `jsonwebtoken` declares (found
            // by review: `iss`, which the hub never reads).
            ("iss twice", raw(h, &c(r#","iss":"x","iss":"y""#), "s3cret")),
            (
                "exp twice",
                raw(h, &c(&format!(r#","exp":{exp}"#)), "s3cret"),
            ),
            ("sub twice", raw(h, &c(r#","sub":"7""#), "s3cret")),
            (
                "unread claim twice",
                raw(h, &c(r#","zbf":1,"zbf":2"#), "s3cret"),
            ),
            (
                "escaped sub",
                raw(h, &format!(r#"{{"sub":"\u0037","exp":{exp}}}"#), "s3cret"),
            ),
            (
                "claims as an array",
                raw(h, &format!(r#"["7",{exp}]"#), "s3cret"),
            ),
            ("header as an array", raw(r#"["HS256"]"#, &c(""), "s3cret")),
            (
                "sub not canonical",
                raw(h, &format!(r#"{{"sub":"07","exp":{exp}}}"#), "s3cret"),
            ),
            ("wrong key", raw(h, &c(""), "other")),
            (
                "expired",
                raw(h, &format!(r#"{{"sub":"7","exp":{past}}}"#), "s3cret"),
            ),
            (
                "nbf ahead",
                raw(h, &c(&format!(r#","nbf":{exp}"#)), "s3cret"),
            ),
            ("nbf passed", raw(h, &c(r#","nbf":1"#), "s3cret")),
            ("nbf float", raw(h, &c(r#","nbf":1.5"#), "s3cret")),
            ("nbf null", raw(h, &c(r#","nbf":null"#), "s3cret")),
            ("nbf object", raw(h, &c(r#","nbf":{"a":1}"#), "s3cret")),
            ("nbf string", raw(h, &c(r#","nbf":"1""#), "s3cret")),
            ("nbf negative", raw(h, &c(r#","nbf":-1"#), "s3cret")),
            ("aud string", raw(h, &c(r#","aud":"x""#), "s3cret")),
            ("aud list", raw(h, &c(r#","aud":["x","y"]"#), "s3cret")),
            ("aud empty list", raw(h, &c(r#","aud":[]"#), "s3cret")),
            ("aud number", raw(h, &c(r#","aud":5"#), "s3cret")),
            ("exp missing", raw(h, r#"{"sub":"7"}"#, "s3cret")),
            (
                "exp string",
                raw(h, &format!(r#"{{"sub":"7","exp":"{exp}"}}"#), "s3cret"),
            ),
            (
                "exp float",
                raw(h, &format!(r#"{{"sub":"7","exp":{exp}.5}}"#), "s3cret"),
            ),
            (
                "sub missing",
                raw(h, &format!(r#"{{"exp":{exp}}}"#), "s3cret"),
            ),
            (
                "sub number",
                raw(h, &format!(r#"{{"sub":7,"exp":{exp}}}"#), "s3cret"),
            ),
            ("claims not an object", raw(h, "[1]", "s3cret")),
            ("claims not JSON", raw(h, "{", "s3cret")),
            ("alg HS384", raw(r#"{"alg":"HS384"}"#, &c(""), "s3cret")),
            ("alg none", raw(r#"{"alg":"none"}"#, &c(""), "s3cret")),
            ("no alg", raw(r#"{"typ":"JWT"}"#, &c(""), "s3cret")),
            ("header not JSON", raw("{", &c(""), "s3cret")),
            ("garbage", "garbage".into()),
            ("empty", String::new()),
            ("two parts", good.rsplit_once('.').unwrap().0.to_string()),
            ("four parts", format!("{good}.x")),
            ("padded signature", format!("{good}=")),
            ("signature cut", good[..good.len() - 1].to_string()),
            ("signature longer", format!("{good}AA")),
        ];
        // Every byte of the valid token changed in turn: header, claims, signature.
        for i in 0..good.len() {
            let mut b = good.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            if let Ok(s) = String::from_utf8(b) {
                cases.push(("tampered", s));
            }
        }
        let named = [
            "ExpiredSignature",
            "ImmatureSignature",
            "InvalidSignature",
            "InvalidAlgorithm",
            "InvalidAudience",
            "InvalidClaimFormat",
        ];
        let mut accepted = 0;
        for (what, token) in &cases {
            let ours = t.verify(token);
            match (reference("s3cret", token), &ours) {
                (Ok(Some(want)), Ok(got)) => {
                    assert_eq!(*got, want, "{what}");
                    accepted += 1;
                }
                (Ok(None), Err(Error::Unauthorized(m))) => {
                    assert!(m.contains("`sub`"), "{what}: {m}")
                }
                (Err(theirs), Err(Error::Unauthorized(m))) => {
                    if let Some(name) = named.iter().find(|n| theirs.contains(*n)) {
                        assert!(m.contains(name), "{what}: {m} against {theirs}");
                    }
                }
                (theirs, ours) => panic!("{what}: jsonwebtoken {theirs:?}, ours {ours:?}"),
            }
        }
        assert_eq!(accepted, 12, "the valid cases above all verify");
    }

    #[test]
    fn jwt_expires_at_the_second_after_exp() {
        let t = Tokens::new("s3cret");
        let tok = raw(r#"{"alg":"HS256"}"#, r#"{"sub":"7","exp":1000}"#, "s3cret");
        assert_eq!(t.verify_at(&tok, 1000).unwrap(), 7);
        let e = t.verify_at(&tok, 1001).unwrap_err();
        assert!(e.to_string().contains("ExpiredSignature"), "{e}");
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
