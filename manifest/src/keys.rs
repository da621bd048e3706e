//! Ed25519 keys and signatures, and their text forms.
//!
//! A key is named by its public key in lowercase hex: no separate key id that could disagree
//! with the key it names. Hex is parsed strictly (lowercase, exact length), so one key or
//! signature has exactly one spelling and a changed letter case is a changed document.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a key, signature or hash in text form was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not exactly the expected number of lowercase hex digits.
    #[error("expected {expected} lowercase hex digits, got {found:?}")]
    Hex { expected: usize, found: String },
    /// 32 bytes that are not a point on the curve (or a weak, small-order point).
    #[error("{0} is not a usable ed25519 public key")]
    NotAKey(String),
    /// A key file that does not start with the expected label.
    #[error("not a sitecast {expected} key file (it should start with {expected:?})")]
    FileLabel { expected: &'static str },
}

/// Decodes exactly `N` bytes from lowercase hex.
pub fn decode_hex<const N: usize>(text: &str) -> Result<[u8; N], KeyError> {
    let error = || KeyError::Hex { expected: 2 * N, found: text.chars().take(2 * N + 8).collect() };
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return Err(error());
    }
    let nibble = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let (Some(hi), Some(lo)) = (nibble(pair[0]), nibble(pair[1])) else {
            return Err(error());
        };
        *byte = (hi << 4) | lo;
    }
    Ok(out)
}

/// Serde helpers for fixed-size byte arrays written as lowercase hex strings.
pub(crate) mod hex_bytes {
    use super::*;

    pub(crate) fn serialize<S: Serializer, const N: usize>(
        bytes: &[u8; N],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex::encode(bytes))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        deserializer: D,
    ) -> Result<[u8; N], D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        decode_hex(&text).map_err(serde::de::Error::custom)
    }
}

/// An ed25519 public key; its hex form is also its key id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Accepts only keys that decode to a curve point of full order.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, KeyError> {
        match VerifyingKey::from_bytes(&bytes) {
            Ok(key) if !key.is_weak() => Ok(Self(bytes)),
            _ => Err(KeyError::NotAKey(hex::encode(bytes))),
        }
    }

    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        Self::from_bytes(decode_hex(text)?)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Checks `signature` over `message` with RFC 8032 verification in its strict form
    /// (non-canonical and small-order encodings are refused), so a signature cannot be
    /// changed into a second valid one.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify_strict(message, &signature).is_ok()
    }

    /// The text of a `.pub` file: a label and the hex key on one line.
    pub fn to_file_text(&self) -> String {
        format!("{PUBLIC_LABEL} {}\n", self.to_hex())
    }

    /// Reads a `.pub` file, or a bare hex key.
    pub fn from_file_text(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let hex = text.strip_prefix(PUBLIC_LABEL).unwrap_or(text).trim();
        Self::from_hex(hex)
    }
}

const PUBLIC_LABEL: &str = "sitecast-ed25519-public";
const SECRET_LABEL: &str = "sitecast-ed25519-secret";

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::from_hex(&text).map_err(serde::de::Error::custom)
    }
}

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl Signature {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        decode_hex(text).map(Self)
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", self.to_hex())
    }
}

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        hex_bytes::serialize(&self.0, serializer)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        hex_bytes::deserialize(deserializer).map(Self)
    }
}

/// An ed25519 secret key. Its `Debug` form never shows the secret.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)?;
        Ok(Self::from_seed(seed))
    }

    /// The RFC 8032 secret key: 32 bytes of seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// The 32-byte seed, for deriving the same identity in a transport (iroh, libp2p) that
    /// takes raw ed25519 seeds. Never log or print it.
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Signs `message` as it is (RFC 8032 Ed25519, no prehash, no context).
    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature(self.0.sign(message).to_bytes())
    }

    /// The text of a secret key file. Whoever writes it must make the file private (0600).
    pub fn to_file_text(&self) -> String {
        format!("{SECRET_LABEL} {}\n", hex::encode(self.0.to_bytes()))
    }

    pub fn from_file_text(text: &str) -> Result<Self, KeyError> {
        let hex = text
            .trim()
            .strip_prefix(SECRET_LABEL)
            .ok_or(KeyError::FileLabel { expected: SECRET_LABEL })?;
        decode_hex(hex.trim()).map(Self::from_seed)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public: {}, secret: <redacted>)", self.public())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(hex: &str) -> Vec<u8> {
        hex::decode(hex).expect("test vector is hex")
    }

    /// RFC 8032 section 7.1, TEST 1, 2 and 3: secret seed, public key, message, signature.
    const RFC8032: [(&str, &str, &str, &str); 3] = [
        (
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "",
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        ),
        (
            "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            "72",
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        ),
        (
            "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
            "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
            "af82",
            "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
        ),
    ];

    #[test]
    fn rfc8032_vectors_pass_through_our_wrapper() {
        for (seed, public, message, signature) in RFC8032 {
            let key = SecretKey::from_seed(decode_hex(seed).expect("seed"));
            assert_eq!(key.public().to_hex(), public);
            let sig = key.sign(&bytes(message));
            assert_eq!(sig.to_hex(), signature);
            let public = PublicKey::from_hex(public).expect("vector key is valid");
            assert!(public.verify(&bytes(message), &sig));
            let mut wrong = bytes(message);
            wrong.push(0);
            assert!(!public.verify(&wrong, &sig));
        }
    }

    #[test]
    fn hex_is_strict() {
        let key = RFC8032[0].1;
        assert!(PublicKey::from_hex(key).is_ok());
        assert!(PublicKey::from_hex(&key.to_uppercase()).is_err());
        assert!(PublicKey::from_hex(&key[1..]).is_err());
        assert!(PublicKey::from_hex(&format!("{key}00")).is_err());
    }

    #[test]
    fn weak_keys_are_refused() {
        // The identity point: every signature would "verify" against a small-order key.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(matches!(PublicKey::from_bytes(identity), Err(KeyError::NotAKey(_))));
    }

    #[test]
    fn key_files_round_trip_and_debug_hides_the_secret() {
        let key = SecretKey::generate().expect("os randomness");
        let text = key.to_file_text();
        let back = SecretKey::from_file_text(&text).expect("own file format");
        assert_eq!(back.public(), key.public());
        let secret_hex = text.split_whitespace().nth(1).expect("two words");
        assert!(!format!("{key:?}").contains(secret_hex));
        assert_eq!(
            PublicKey::from_file_text(&key.public().to_file_text()).expect("pub file"),
            key.public()
        );
        assert!(matches!(
            SecretKey::from_file_text(&key.public().to_file_text()),
            Err(KeyError::FileLabel { .. })
        ));
    }
}
