//! Signatures of the wire contract.
//!
//! - `X-Webhook-Signature`: lowercase hex HMAC-SHA256 of the raw body, keyed by the secret's UTF-8
//!   bytes: what the contract's Python and Node.js verification code computes.
//! - Standard Webhooks `webhook-signature`: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`,
//!   keyed by the decoded bytes of a `whsec_<base64>` secret; sent only for secrets of that form,
//!   once per key while a `previous` key is present (rotation).

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a secret cannot sign.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("the secret is empty")]
    Empty,
    #[error(
        "the secret is {0} bytes long; use at least {MIN_SECRET_BYTES} random bytes (for example: echo whsec_$(head -c 32 /dev/urandom | base64))"
    )]
    TooShort(usize),
    #[error("the secret starts with whsec_ but the rest is not valid base64")]
    InvalidStandardKey,
    #[error("the secret is whsec_ with nothing after it: the key is empty")]
    EmptyStandardKey,
}

/// The shortest secret that signs: shorter ones are guessable.
pub const MIN_SECRET_BYTES: usize = 16;

/// One signing secret, never printed.
#[derive(Clone, PartialEq, Eq)]
struct Key {
    /// The secret as written: keys `X-Webhook-Signature`.
    raw: Vec<u8>,
    /// The decoded `whsec_` payload: keys `webhook-signature`.
    standard: Option<Vec<u8>>,
}

impl Key {
    fn parse(raw: &[u8]) -> Result<Self, SecretError> {
        if raw.is_empty() {
            return Err(SecretError::Empty);
        }
        let standard = match raw.strip_prefix(b"whsec_") {
            Some([]) => return Err(SecretError::EmptyStandardKey),
            Some(b64) => Some(
                BASE64
                    .decode(b64)
                    .map_err(|_| SecretError::InvalidStandardKey)?,
            ),
            None => None,
        };
        if raw.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort(raw.len()));
        }
        Ok(Self {
            raw: raw.to_vec(),
            standard,
        })
    }
}

/// The signing keys of one Webhook: the current one and, during a rotation, the previous one.
#[derive(Clone, PartialEq, Eq)]
pub struct Signer {
    current: Key,
    previous: Option<Key>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("standard_webhooks", &self.current.standard.is_some())
            .field("rotating", &self.previous.is_some())
            .finish_non_exhaustive()
    }
}

/// The signature headers of one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signatures {
    /// `X-Webhook-Signature`.
    pub hex: String,
    /// `webhook-signature`, when the secret is a Standard Webhooks secret.
    pub standard: Option<String>,
}

impl Signer {
    /// `previous` is ignored when it cannot sign: a rotation must not break the current key.
    pub fn new(current: &[u8], previous: Option<&[u8]>) -> Result<Self, SecretError> {
        Ok(Self {
            current: Key::parse(current)?,
            previous: previous.and_then(|p| Key::parse(p).ok()),
        })
    }

    /// Signs `body` for the attempt with delivery id `id` at unix time `timestamp`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> Signatures {
        let standard: Vec<String> = std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .filter_map(|k| k.standard.as_deref())
            .map(|key| {
                format!(
                    "v1,{}",
                    BASE64.encode(standard_mac(key, id, timestamp, body))
                )
            })
            .collect();
        Signatures {
            hex: hex::encode(hmac(&self.current.raw, &[body])),
            standard: (!standard.is_empty()).then(|| standard.join(" ")),
        }
    }
}

/// What a receiver finds when it checks an attempt's signature headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    /// `X-Webhook-Signature` is the body's HMAC under the secret's text.
    pub hex: bool,
    /// `webhook-signature` holds a valid `v1` signature under the decoded `whsec_` key; None
    /// when the attempt carries none.
    pub standard: Option<bool>,
}

impl Verified {
    /// Every signature the attempt carries is valid.
    pub fn ok(&self) -> bool {
        self.hex && self.standard != Some(false)
    }
}

impl Signer {
    /// Checks an attempt as a receiver holding this secret would, in constant time: `hex` is
    /// the `X-Webhook-Signature` header, `standard` the `webhook-signature` one (space-separated
    /// `v1,<base64>` entries, one of which must match) with the `webhook-id` and
    /// `webhook-timestamp` it signs. Every key of the signer (the previous one too) is tried.
    pub fn verify(
        &self,
        body: &[u8],
        hex: Option<&str>,
        standard: Option<(&str, &str, &str)>,
    ) -> Verified {
        let keys = || std::iter::once(&self.current).chain(self.previous.as_ref());
        let hex = hex
            .and_then(|h| hex::decode(h).ok())
            .is_some_and(|sig| keys().any(|k| mac(&k.raw, &[body]).verify_slice(&sig).is_ok()));
        let standard = standard.map(|(header, id, timestamp)| {
            let signed = [id.as_bytes(), b".", timestamp.as_bytes(), b".", body];
            header
                .split_whitespace()
                .filter_map(|entry| entry.strip_prefix("v1,"))
                .filter_map(|b64| BASE64.decode(b64).ok())
                .any(|sig| {
                    keys()
                        .filter_map(|k| k.standard.as_deref())
                        .any(|key| mac(key, &signed).verify_slice(&sig).is_ok())
                })
        });
        Verified { hex, standard }
    }
}

fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    mac(key, parts).finalize().into_bytes().into()
}

fn standard_mac(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
    let ts = timestamp.to_string();
    hmac(key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_accepts_what_sign_produced_and_refuses_a_changed_body_or_key() {
        let secret = b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let signer = Signer::new(secret, None).unwrap();
        let sigs = signer.sign("msg_1", 1_700_000_000, BODY);
        let standard = sigs.standard.as_deref().unwrap();
        let good = signer.verify(
            BODY,
            Some(&sigs.hex),
            Some((standard, "msg_1", "1700000000")),
        );
        assert_eq!(
            good,
            Verified {
                hex: true,
                standard: Some(true)
            }
        );
        assert!(good.ok());
        let changed = signer.verify(
            b"{}",
            Some(&sigs.hex),
            Some((standard, "msg_1", "1700000000")),
        );
        assert_eq!(
            changed,
            Verified {
                hex: false,
                standard: Some(false)
            }
        );
        // The standard signature covers the id and the timestamp too.
        let replayed = signer.verify(
            BODY,
            Some(&sigs.hex),
            Some((standard, "msg_2", "1700000000")),
        );
        assert_eq!(
            replayed,
            Verified {
                hex: true,
                standard: Some(false)
            }
        );
        assert!(!replayed.ok());
        let other = Signer::new(b"another-secret-of-enough-bytes", None).unwrap();
        assert!(!other.verify(BODY, Some(&sigs.hex), None).ok());
        // No signature, or one that is not hex, is not valid.
        assert!(!signer.verify(BODY, None, None).ok());
        assert!(!signer.verify(BODY, Some("zz"), None).ok());
        // During a rotation the previous key's signatures still verify.
        let rotated = Signer::new(b"the-new-secret-0123456789", Some(secret)).unwrap();
        assert!(rotated.verify(BODY, Some(&sigs.hex), None).ok());
    }

    const BODY: &[u8] = br#"{"event":"document.completed","timestamp":"2023-06-15T10:35:00Z","data":{"document_id":123}}"#;

    #[test]
    fn hex_signature_is_hmac_sha256_of_the_body_keyed_by_the_secret_text() {
        // Known answer from RFC 4231 test case 2 (key "Jefe", too short for a Signer).
        assert_eq!(
            hex::encode(hmac(b"Jefe", &[b"what do ya want for nothing?"])),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let s = Signer::new(b"a-plain-secret-of-32-characters!", None).unwrap();
        let sig = s.sign("id", 0, BODY);
        assert_eq!(
            sig.hex,
            hex::encode(hmac(b"a-plain-secret-of-32-characters!", &[BODY]))
        );
        assert_eq!(
            sig.standard, None,
            "plain secrets send no Standard Webhooks header"
        );
    }

    #[test]
    fn standard_webhooks_signature_matches_the_specification_example() {
        // The test vector of the Standard Webhooks reference libraries.
        let s = Signer::new(b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", None).unwrap();
        let sig = s.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(
            sig.standard.as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
        // The hex signature is keyed by the whole secret text, as the contract's code verifies.
        assert_eq!(
            sig.hex,
            hex::encode(hmac(
                b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                &[br#"{"test": 2432232314}"#]
            ))
        );
    }

    #[test]
    fn rotation_signs_with_both_keys_but_hex_with_the_current_one() {
        let current = b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let previous = b"whsec_c2VjcmV0LXByZXZpb3Vz";
        let both = Signer::new(current, Some(previous))
            .unwrap()
            .sign("id1", 42, BODY);
        let only = Signer::new(current, None).unwrap().sign("id1", 42, BODY);
        let old = Signer::new(previous, None).unwrap().sign("id1", 42, BODY);
        assert_eq!(both.hex, only.hex);
        assert_eq!(
            both.standard.unwrap(),
            format!("{} {}", only.standard.unwrap(), old.standard.unwrap())
        );
    }

    #[test]
    fn different_secret_or_body_changes_the_signature() {
        let a = Signer::new(b"secret-a-0123456789", None)
            .unwrap()
            .sign("id", 1, BODY);
        let b = Signer::new(b"secret-b-0123456789", None)
            .unwrap()
            .sign("id", 1, BODY);
        let tampered = Signer::new(b"secret-a-0123456789", None)
            .unwrap()
            .sign("id", 1, b"{}");
        assert_ne!(a.hex, b.hex);
        assert_ne!(a.hex, tampered.hex);
    }

    #[test]
    fn unusable_secrets_are_refused_and_never_printed() {
        assert_eq!(Signer::new(b"", None), Err(SecretError::Empty));
        assert_eq!(
            Signer::new(b"whsec_***", None),
            Err(SecretError::InvalidStandardKey)
        );
        let s = Signer::new(b"super-secret-value", Some(b"")).unwrap();
        assert!(!format!("{s:?}").contains("super-secret"));
    }

    #[test]
    fn short_secrets_and_empty_standard_keys_are_refused() {
        assert_eq!(
            Signer::new(b"your_secret", None),
            Err(SecretError::TooShort(11))
        );
        assert_eq!(
            Signer::new(b"0123456789abcde", None),
            Err(SecretError::TooShort(15))
        );
        assert!(Signer::new(b"0123456789abcdef", None).is_ok());
        assert_eq!(
            Signer::new(b"whsec_", None),
            Err(SecretError::EmptyStandardKey)
        );
        // A short previous key is ignored rather than breaking the current one.
        let s = Signer::new(b"0123456789abcdef", Some(b"short")).unwrap();
        assert_eq!(s.sign("id", 1, BODY).standard, None);
        assert!(
            SecretError::TooShort(3).to_string().contains("at least 16"),
            "the message says what to do"
        );
    }
}

/// Sign/verify round-trips, verified the way receivers verify (independently of [`Signer`]).
#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    /// The document-processing contract's receiver check: lowercase hex HMAC-SHA256 of the exact body, keyed by the
    /// secret text, compared in constant time.
    fn verify_hex(secret: &[u8], body: &[u8], header: &str) -> bool {
        let Ok(sig) = hex::decode(header) else {
            return false;
        };
        let mut mac = HmacSha256::new_from_slice(secret).unwrap();
        mac.update(body);
        mac.verify_slice(&sig).is_ok()
    }

    /// Standard Webhooks: any `v1,<base64>` of the space-separated list verifies over
    /// `{id}.{timestamp}.{body}` with the decoded `whsec_` key.
    fn verify_standard(key: &[u8], id: &str, ts: i64, body: &[u8], header: &str) -> bool {
        header.split(' ').any(|sig| {
            let Some(Ok(sig)) = sig.strip_prefix("v1,").map(|b64| BASE64.decode(b64)) else {
                return false;
            };
            let mut mac = HmacSha256::new_from_slice(key).unwrap();
            mac.update(format!("{id}.{ts}.").as_bytes());
            mac.update(body);
            mac.verify_slice(&sig).is_ok()
        })
    }

    /// A secret that signs: raw text of at least 16 bytes, or `whsec_` + base64 of a key.
    fn secret() -> impl Strategy<Value = (Vec<u8>, Option<Vec<u8>>)> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), MIN_SECRET_BYTES..64)
                .prop_filter("not a whsec_ secret", |s| !s.starts_with(b"whsec_"))
                .prop_map(|s| (s, None)),
            prop::collection::vec(any::<u8>(), 1..64).prop_map(|key| {
                let raw = format!("whsec_{}", BASE64.encode(&key)).into_bytes();
                (raw, Some(key))
            }),
        ]
        .prop_filter("long enough", |(raw, _)| raw.len() >= MIN_SECRET_BYTES)
    }

    proptest! {
        #![proptest_config(crate::proptest_support::config(256))]

        #[test]
        fn signatures_verify_and_any_flipped_body_byte_fails(
            (raw, key) in secret(),
            body in prop::collection::vec(any::<u8>(), 1..512),
            id in "[a-zA-Z0-9_-]{1,40}",
            ts in 0i64..4_102_444_800,
            flip_at in any::<prop::sample::Index>(),
            flip_bits in 1u8..=255,
        ) {
            let signer = Signer::new(&raw, None).unwrap();
            let sigs = signer.sign(&id, ts, &body);
            prop_assert!(verify_hex(&raw, &body, &sigs.hex));
            prop_assert_eq!(sigs.standard.is_some(), key.is_some());
            if let (Some(key), Some(header)) = (&key, &sigs.standard) {
                prop_assert!(verify_standard(key, &id, ts, &body, header));
            }

            let mut tampered = body.clone();
            tampered[flip_at.index(body.len())] ^= flip_bits;
            prop_assert!(!verify_hex(&raw, &tampered, &sigs.hex));
            if let (Some(key), Some(header)) = (&key, &sigs.standard) {
                prop_assert!(!verify_standard(key, &id, ts, &tampered, header));
                // Nor does the same body under another id or time (a replayed signature).
                let other_id = format!("{id}x");
                prop_assert!(!verify_standard(key, &other_id, ts, &body, header));
                prop_assert!(!verify_standard(key, &id, ts + 1, &body, header));
            }
        }

        #[test]
        fn during_a_rotation_both_keys_verify_and_hex_uses_the_current_one(
            (current, current_key) in secret(),
            (previous, previous_key) in secret(),
            body in prop::collection::vec(any::<u8>(), 0..256),
            ts in 0i64..4_102_444_800,
        ) {
            let sigs = Signer::new(&current, Some(&previous)).unwrap().sign("msg_1", ts, &body);
            prop_assert!(verify_hex(&current, &body, &sigs.hex));
            for key in [current_key, previous_key].into_iter().flatten() {
                let header = sigs.standard.as_deref().unwrap_or_default();
                prop_assert!(verify_standard(&key, "msg_1", ts, &body, header));
            }
        }

        #[test]
        fn any_bytes_as_a_secret_sign_or_are_refused_without_panicking(
            raw in prop::collection::vec(any::<u8>(), 0..48),
            whsec in any::<bool>(),
        ) {
            let raw = if whsec { [b"whsec_".as_slice(), &raw].concat() } else { raw };
            if let Ok(signer) = Signer::new(&raw, Some(&raw)) {
                prop_assert!(raw.len() >= MIN_SECRET_BYTES);
                let body = b"[]";
                prop_assert!(verify_hex(&raw, body, &signer.sign("id", 1, body).hex));
            }
        }
    }
}
