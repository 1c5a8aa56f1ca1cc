//! The token envelope: AES-256-GCM exactly as Node's `crypto.createCipheriv('aes-256-gcm')`
//! produces it, written as `base64(iv):base64(authTag):base64(ciphertext)`.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::{Zeroize, Zeroizing};

use crate::mask::mask_token;

const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
const KEY_LEN: usize = 32;

/// Why an `ENCRYPTION_KEY` value was refused. Never carries the value itself.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// The value is empty or only whitespace.
    #[error("is empty")]
    Empty,
    /// Neither hex, nor base64, nor raw text of the right length.
    #[error(
        "must be 32 bytes given as 64 hex characters, as base64 of 32 bytes, or as 32 raw characters (got {len} characters)"
    )]
    BadFormat {
        /// The value's length in characters (never the value).
        len: usize,
    },
}

/// Why a token could not be decrypted. Never carries key, ciphertext or plaintext.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// The value is not three base64 parts, or a part has the wrong length; the reason says which.
    #[error("encrypted token is not in the iv:authTag:ciphertext format ({0})")]
    Format(&'static str),
    /// The GCM tag did not verify.
    #[error("encrypted token could not be decrypted: wrong ENCRYPTION_KEY or tampered ciphertext")]
    Authentication,
    /// The plaintext decrypted but is not text, so it cannot be a token.
    #[error("decrypted token is not valid UTF-8")]
    NotUtf8,
}

/// A 32-byte AES-256 key. Its `Debug` output is redacted and its bytes are zeroed on drop.
#[derive(Clone)]
pub struct EncryptionKey(Zeroizing<[u8; KEY_LEN]>);

impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EncryptionKey(<redacted>)")
    }
}

impl EncryptionKey {
    /// Parses a key in any of the contract's three forms: 64 hex characters, base64 of
    /// 32 bytes, or a raw 32-character string. Surrounding whitespace (a trailing newline
    /// in a mounted Secret file) is ignored.
    pub fn parse(value: &str) -> Result<Self, KeyError> {
        let v = value.trim();
        if v.is_empty() {
            return Err(KeyError::Empty);
        }
        let mut bytes = [0u8; KEY_LEN];
        if v.len() == 2 * KEY_LEN && hex::decode_to_slice(v, &mut bytes).is_ok() {
            return Ok(Self(Zeroizing::new(bytes)));
        }
        if let Ok(mut decoded) = STANDARD.decode(v)
            && decoded.len() == KEY_LEN
        {
            bytes.copy_from_slice(&decoded);
            decoded.zeroize();
            return Ok(Self(Zeroizing::new(bytes)));
        }
        if v.len() == KEY_LEN {
            bytes.copy_from_slice(v.as_bytes());
            return Ok(Self(Zeroizing::new(bytes)));
        }
        Err(KeyError::BadFormat {
            len: v.chars().count(),
        })
    }

    /// A key from raw bytes (tests and tools).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.0.as_slice().into())
    }

    /// Decrypts an `iv:authTag:ciphertext` envelope.
    pub fn decrypt(&self, envelope: &str) -> Result<Token, CryptoError> {
        let mut parts = envelope.trim().split(':');
        let (Some(iv), Some(tag), Some(ct), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CryptoError::Format("expected three ':'-separated parts"));
        };
        let iv = STANDARD
            .decode(iv)
            .map_err(|_| CryptoError::Format("iv is not base64"))?;
        let tag = STANDARD
            .decode(tag)
            .map_err(|_| CryptoError::Format("authTag is not base64"))?;
        let ct = STANDARD
            .decode(ct)
            .map_err(|_| CryptoError::Format("ciphertext is not base64"))?;
        if iv.len() != IV_LEN {
            return Err(CryptoError::Format("iv must be 12 bytes"));
        }
        if tag.len() != TAG_LEN {
            return Err(CryptoError::Format("authTag must be 16 bytes"));
        }
        // aes-gcm expects the tag appended to the ciphertext, as GCM defines it.
        let mut sealed = ct;
        sealed.extend_from_slice(&tag);
        let plain = self
            .cipher()
            .decrypt(
                Nonce::from_slice(&iv),
                Payload {
                    msg: &sealed,
                    aad: b"",
                },
            )
            .map_err(|_| CryptoError::Authentication)?;
        String::from_utf8(plain).map(Token::new).map_err(|e| {
            let mut bytes = e.into_bytes();
            bytes.zeroize();
            CryptoError::NotUtf8
        })
    }

    /// Encrypts like the web app does (used by tests, the demo and docs tooling).
    pub fn encrypt(&self, plaintext: &str) -> String {
        let iv: [u8; IV_LEN] = rand::random();
        self.encrypt_with_iv(plaintext, iv)
    }

    /// Encrypts with a caller-chosen IV; only for reproducible test vectors.
    pub fn encrypt_with_iv(&self, plaintext: &str, iv: [u8; IV_LEN]) -> String {
        // Encryption with a valid key and a 12-byte nonce cannot fail for inputs this size.
        let sealed = self
            .cipher()
            .encrypt(Nonce::from_slice(&iv), plaintext.as_bytes())
            .unwrap_or_default();
        let (ct, tag) = sealed.split_at(sealed.len().saturating_sub(TAG_LEN));
        format!(
            "{}:{}:{}",
            STANDARD.encode(iv),
            STANDARD.encode(tag),
            STANDARD.encode(ct)
        )
    }
}

/// A decrypted git token. `Debug` and `Display` show only its masked form; the bytes are
/// zeroed on drop. The only way to the clear text is [`Token::expose`].
#[derive(Clone)]
pub struct Token(Zeroizing<String>);

impl Token {
    /// Wraps a clear-text token (after decryption, or in tests).
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The clear text, for the one place that must hand it to git.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({})", mask_token(&self.0))
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&mask_token(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> EncryptionKey {
        EncryptionKey::from_bytes([7u8; 32])
    }

    #[test]
    fn round_trip() {
        let env = key().encrypt("ghp_1234567890abcdefghij");
        assert_eq!(env.split(':').count(), 3);
        assert_eq!(
            key().decrypt(&env).unwrap().expose(),
            "ghp_1234567890abcdefghij"
        );
    }

    #[test]
    fn key_formats() {
        let hex64 = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let from_hex = EncryptionKey::parse(hex64).unwrap();
        let b64 = STANDARD.encode(hex::decode(hex64).unwrap());
        let from_b64 = EncryptionKey::parse(&b64).unwrap();
        assert_eq!(from_hex.0.as_slice(), from_b64.0.as_slice());
        let raw = EncryptionKey::parse("abcdefghijklmnopqrstuvwxyz012345").unwrap();
        assert_eq!(raw.0.as_slice(), b"abcdefghijklmnopqrstuvwxyz012345");
        // A trailing newline from a mounted file is fine.
        assert!(EncryptionKey::parse(&format!("{hex64}\n")).is_ok());
    }

    #[test]
    fn bad_keys_are_refused_without_echoing_them() {
        assert_eq!(EncryptionKey::parse("  ").unwrap_err(), KeyError::Empty);
        let err = EncryptionKey::parse("too-short-secret").unwrap_err();
        assert_eq!(err, KeyError::BadFormat { len: 16 });
        assert!(!err.to_string().contains("too-short-secret"));
        // 64 characters that are not hex and not 32 bytes of anything.
        let not_hex = "z".repeat(64);
        assert!(EncryptionKey::parse(&not_hex).is_err());
        // base64 of 16 bytes is the wrong length.
        assert!(EncryptionKey::parse(&STANDARD.encode([1u8; 16])).is_err());
        assert_eq!(format!("{:?}", key()), "EncryptionKey(<redacted>)");
    }

    #[test]
    fn wrong_key_and_tampering_fail_authentication() {
        let env = key().encrypt("ghp_1234567890abcdefghij");
        let other = EncryptionKey::from_bytes([8u8; 32]);
        assert_eq!(
            other.decrypt(&env).unwrap_err(),
            CryptoError::Authentication
        );

        let parts: Vec<&str> = env.split(':').collect();
        let mut ct = STANDARD.decode(parts[2]).unwrap();
        ct[0] ^= 1;
        let tampered = format!("{}:{}:{}", parts[0], parts[1], STANDARD.encode(ct));
        assert_eq!(
            key().decrypt(&tampered).unwrap_err(),
            CryptoError::Authentication
        );

        let mut tag = STANDARD.decode(parts[1]).unwrap();
        tag[15] ^= 0x80;
        let tampered = format!("{}:{}:{}", parts[0], STANDARD.encode(tag), parts[2]);
        assert_eq!(
            key().decrypt(&tampered).unwrap_err(),
            CryptoError::Authentication
        );
    }

    #[test]
    fn malformed_envelopes_are_format_errors() {
        let k = key();
        for bad in ["", "a:b", "a:b:c:d", "!!:AAAA:AAAA", "AAAA:AAAA:AAAA"] {
            assert!(
                matches!(k.decrypt(bad), Err(CryptoError::Format(_))),
                "{bad}"
            );
        }
        let iv = STANDARD.encode([0u8; 12]);
        let short_tag = STANDARD.encode([0u8; 8]);
        assert_eq!(
            k.decrypt(&format!("{iv}:{short_tag}:AAAA")).unwrap_err(),
            CryptoError::Format("authTag must be 16 bytes")
        );
    }

    #[test]
    fn token_debug_and_display_are_masked() {
        let t = Token::new("ghp_1234567890abcdefghij".into());
        assert_eq!(format!("{t:?}"), "Token(ghp_****ghij)");
        assert_eq!(t.to_string(), "ghp_****ghij");
    }

    proptest! {
        #[test]
        fn key_parser_never_panics(s in "\\PC{0,100}") {
            let _ = EncryptionKey::parse(&s);
        }

        #[test]
        fn decrypt_never_panics_on_arbitrary_text(s in "\\PC{0,200}") {
            let _ = key().decrypt(&s);
        }

        #[test]
        fn decrypt_never_panics_on_base64_triples(
            a in proptest::collection::vec(any::<u8>(), 0..40),
            b in proptest::collection::vec(any::<u8>(), 0..40),
            c in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let env = format!("{}:{}:{}", STANDARD.encode(a), STANDARD.encode(b), STANDARD.encode(c));
            let _ = key().decrypt(&env);
        }

        #[test]
        fn round_trip_any_token(t in "\\PC{1,100}") {
            let k = key();
            let back = k.decrypt(&k.encrypt(&t)).unwrap();
            prop_assert_eq!(back.expose(), t.as_str());
        }
    }
}
