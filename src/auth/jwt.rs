//! Verifying an HS256 token without re-keying the HMAC or building a JSON tree per token:
//! the HMAC-SHA256 is keyed once (at startup) and its state cloned for each token; the header
//! and the claims are read into borrowed structs; the signature is compared in constant time.
//!
//! It refuses what `jsonwebtoken` (with the hub's `Validation`: HS256 only, `exp` and `sub`
//! required, no leeway, `nbf` checked, no audience configured) refuses, with the same reason
//! names in the message; the tests in `auth.rs` sign with `jsonwebtoken` and compare. Where
//! it is laxer: header fields other than `alg` are not type-checked (only a holder of the
//! secret can sign such a header).

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer};
use sha2::Sha256;

/// Why a token is refused; the names are `jsonwebtoken`'s `ErrorKind`s, so the messages
/// clients see did not change with the verifier.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not three base64url parts, or a part that is not the JSON it must be.
    InvalidToken,
    /// The header's `alg` is not HS256.
    InvalidAlgorithm,
    InvalidSignature,
    ExpiredSignature,
    ImmatureSignature,
    /// An `aud` claim: the hub is no audience, so a token meant for one is not for it.
    InvalidAudience,
    /// `nbf` that is no number of seconds.
    InvalidClaimFormat(&'static str),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::InvalidClaimFormat(claim) => write!(f, "InvalidClaimFormat({claim:?})"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// HS256 keyed once; cloning the keyed state per token skips hashing the key pads again.
#[derive(Clone)]
pub(crate) struct Verifier {
    keyed: Hmac<Sha256>,
}

/// The claims the hub reads; other claims are ignored, as `jsonwebtoken` does.
#[derive(Deserialize)]
struct Claims<'a> {
    #[serde(borrow)]
    sub: Cow<'a, str>,
    exp: u64,
    #[serde(default, deserialize_with = "seconds")]
    nbf: TryParse<Seconds>,
    #[serde(default)]
    aud: TryParse<Audience<'a>>,
    /// Never checked (the hub configures no issuer), but declared as `jsonwebtoken`
    /// declares it: a claim given twice is refused, and that holds only for declared ones.
    #[serde(default)]
    #[allow(dead_code)]
    iss: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
}

/// A claim read like `jsonwebtoken` reads the optional ones: a value of the wrong type is
/// remembered as such instead of failing the whole parse.
#[derive(Default)]
enum TryParse<T> {
    Parsed(T),
    FailedToParse,
    #[default]
    NotPresent,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for TryParse<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(d) {
            Ok(Some(v)) => TryParse::Parsed(v),
            Ok(None) => TryParse::NotPresent,
            Err(_) => TryParse::FailedToParse,
        })
    }
}

/// A NumericDate: an unsigned integer, or a finite non-negative float rounded.
struct Seconds(u64);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Seconds;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of seconds")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Seconds, E> {
                Ok(Seconds(v))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Seconds, E> {
                if v.is_finite() && v >= 0.0 && v < u64::MAX as f64 {
                    Ok(Seconds(v.round() as u64))
                } else {
                    Err(E::custom("not a number of seconds"))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `nbf` as `jsonwebtoken` reads it: present but not a number of seconds (`null` too) is a
/// malformed claim, not an absent one.
fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<TryParse<Seconds>, D::Error> {
    Ok(Seconds::deserialize(d).map_or(TryParse::FailedToParse, TryParse::Parsed))
}

/// An audience as `jsonwebtoken` recognises one (a string, or a list of strings); any of
/// them is refused because the hub configures none (the contents are never read).
#[derive(Deserialize)]
#[allow(dead_code)]
#[serde(untagged)]
enum Audience<'a> {
    Single(#[serde(borrow)] Cow<'a, str>),
    Multiple(Vec<Cow<'a, str>>),
}

/// Room on the stack for a decoded header or claims part; a larger part goes to the heap.
const PART: usize = 512;

impl Verifier {
    pub(crate) fn new(secret: &[u8]) -> Verifier {
        Verifier {
            keyed: Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length"),
        }
    }

    /// What `sub` makes of the `sub` of a valid token, as of `now` (seconds since the
    /// epoch). `sub` sees the claim where it was decoded, so it costs no allocation.
    pub(crate) fn verify<T>(
        &self,
        token: &str,
        now: u64,
        sub: impl FnOnce(&str) -> T,
    ) -> Result<T, Refusal> {
        let (message, signature) = token.rsplit_once('.').ok_or(Refusal::InvalidToken)?;
        let (header, payload) = message.rsplit_once('.').ok_or(Refusal::InvalidToken)?;

        let mut buf = [0u8; PART];
        let mut heap = Vec::new();
        let header = object(decode(header, &mut buf, &mut heap)?)?;
        let header: Header = serde_json::from_slice(header).map_err(|_| Refusal::InvalidToken)?;
        if header.alg != "HS256" {
            return Err(Refusal::InvalidAlgorithm);
        }

        let mut sig = [0u8; 32];
        let n = URL_SAFE_NO_PAD
            .decode_slice(signature, &mut sig)
            .map_err(|_| Refusal::InvalidSignature)?;
        let mut mac = self.keyed.clone();
        mac.update(message.as_bytes());
        // Constant time: `verify_slice` compares the whole tag whatever differs first.
        mac.verify_slice(&sig[..n])
            .map_err(|_| Refusal::InvalidSignature)?;

        // Only after the signature: the claims of a forged token are never parsed.
        let mut buf = [0u8; PART];
        let mut heap = Vec::new();
        let payload = object(decode(payload, &mut buf, &mut heap)?)?;
        let claims: Claims = serde_json::from_slice(payload).map_err(|_| Refusal::InvalidToken)?;
        // `jsonwebtoken`'s order: the format of `nbf`, expiry, `nbf`, audience.
        if matches!(claims.nbf, TryParse::FailedToParse) {
            return Err(Refusal::InvalidClaimFormat("nbf"));
        }
        if claims.exp < now {
            return Err(Refusal::ExpiredSignature);
        }
        if matches!(claims.nbf, TryParse::Parsed(Seconds(nbf)) if nbf > now) {
            return Err(Refusal::ImmatureSignature);
        }
        if matches!(claims.aud, TryParse::Parsed(_)) {
            return Err(Refusal::InvalidAudience);
        }
        Ok(sub(&claims.sub))
    }
}

/// A part of the token as a JSON object only: serde's derived structs also read an array
/// (fields by position), which `jsonwebtoken` refuses.
fn object(part: &[u8]) -> Result<&[u8], Refusal> {
    match part.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(part),
        _ => Err(Refusal::InvalidToken),
    }
}

/// Decodes one base64url part (no padding, canonical) on the stack when it fits.
fn decode<'b>(
    part: &str,
    buf: &'b mut [u8; PART],
    heap: &'b mut Vec<u8>,
) -> Result<&'b [u8], Refusal> {
    if part.len() / 4 * 3 + 3 <= PART {
        let n = URL_SAFE_NO_PAD
            .decode_slice(part, buf)
            .map_err(|_| Refusal::InvalidToken)?;
        Ok(&buf[..n])
    } else {
        URL_SAFE_NO_PAD
            .decode_vec(part, heap)
            .map_err(|_| Refusal::InvalidToken)?;
        Ok(heap)
    }
}
