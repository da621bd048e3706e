//! The signed envelope shared by roots and release manifests:
//! `{"signatures":[{"key":HEX,"sig":HEX}],"signed":{...}}`.
//!
//! The `signed` object is kept as parsed JSON, unknown fields included, so that what the
//! signatures cover is exactly what a newer writer signed, and a reader that knows fewer fields
//! still checks every byte of it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::canonical;
use crate::error::{Role, VerifyError};
use crate::keys::{PublicKey, SecretKey, Signature};

/// No document is read past this size; a release manifest is a few hundred bytes plus notes.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// Prefixed to the canonical `signed` bytes before signing, so that a sitecast signature can
/// never be replayed as a signature over some other protocol's message.
const SIGNING_CONTEXT: &[u8] = b"sitecast signed document v1\n";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureEntry {
    pub key: PublicKey,
    pub sig: Signature,
}

/// The `signed` object of a document: `fields` as JSON plus its `type` and `format`.
pub(crate) fn signed_object(
    fields: &impl Serialize,
    doc_type: &'static str,
    format: u64,
) -> Map<String, Value> {
    let Ok(Value::Object(mut signed)) = serde_json::to_value(fields) else {
        unreachable!("documents are plain structs of strings and numbers")
    };
    signed.insert("type".into(), doc_type.into());
    signed.insert("format".into(), format.into());
    signed
}

/// A parsed, not yet verified, signed document.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedDocument {
    pub(crate) signed: Map<String, Value>,
    pub(crate) signatures: Vec<SignatureEntry>,
}

#[derive(Deserialize)]
struct RawEnvelope {
    signed: Map<String, Value>,
    signatures: Vec<SignatureEntry>,
}

impl SignedDocument {
    /// Parses an envelope; refuses more than [`MAX_DOCUMENT_BYTES`] before looking inside.
    pub fn parse(bytes: &[u8]) -> Result<Self, VerifyError> {
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(VerifyError::TooLarge { limit: MAX_DOCUMENT_BYTES });
        }
        let raw: RawEnvelope =
            serde_json::from_slice(bytes).map_err(|e| VerifyError::Malformed(e.to_string()))?;
        Ok(Self { signed: raw.signed, signatures: raw.signatures })
    }

    /// Signs `signed` with each key.
    pub fn sign(signed: Map<String, Value>, keys: &[&SecretKey]) -> Self {
        let mut document = Self { signed, signatures: Vec::new() };
        for key in keys {
            document.add_signature(key);
        }
        document
    }

    /// Adds (or replaces) `key`'s signature.
    pub fn add_signature(&mut self, key: &SecretKey) {
        let sig = key.sign(&self.signing_bytes());
        let public = key.public();
        self.signatures.retain(|entry| entry.key != public);
        self.signatures.push(SignatureEntry { key: public, sig });
    }

    /// The canonical encoding of the whole envelope.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut envelope = Map::new();
        envelope.insert("signed".into(), Value::Object(self.signed.clone()));
        let signatures =
            serde_json::to_value(&self.signatures).expect("signature entries are plain strings");
        envelope.insert("signatures".into(), signatures);
        canonical::to_vec(&Value::Object(envelope))
    }

    /// What the signatures cover: the context prefix and the canonical `signed` object.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut bytes = SIGNING_CONTEXT.to_vec();
        bytes.extend(canonical::to_vec(&Value::Object(self.signed.clone())));
        bytes
    }

    pub fn signatures(&self) -> &[SignatureEntry] {
        &self.signatures
    }

    /// The `signed` object as parsed, unknown fields included.
    pub fn signed(&self) -> &Map<String, Value> {
        &self.signed
    }

    /// Checks the `type` and `format` fields before anything else is read.
    pub(crate) fn check_kind(
        &self,
        expected: &'static str,
        format: u64,
    ) -> Result<(), VerifyError> {
        let found = self.signed.get("type").and_then(Value::as_str).unwrap_or("");
        if found != expected {
            return Err(VerifyError::WrongDocumentType { expected, found: found.to_owned() });
        }
        match self.signed.get("format").and_then(Value::as_u64) {
            Some(found) if found > format => {
                Err(VerifyError::UnsupportedFormat { found, supported: format })
            }
            Some(found) if found >= 1 => Ok(()),
            _ => Err(VerifyError::invalid("format", "must be a positive integer")),
        }
    }

    /// Counts distinct keys of `trusted` with a valid signature; at least `threshold` must.
    ///
    /// Signatures by keys outside `trusted` are skipped (a document may be signed for two roots
    /// during a rotation), but an invalid signature by a trusted key refuses the document: it was
    /// changed after signing.
    pub(crate) fn check_threshold(
        &self,
        role: Role,
        trusted: &[PublicKey],
        threshold: u32,
    ) -> Result<usize, VerifyError> {
        let message = self.signing_bytes();
        let mut valid = BTreeSet::new();
        let mut first_unknown = None;
        for entry in &self.signatures {
            if !trusted.contains(&entry.key) {
                first_unknown.get_or_insert(entry.key);
                continue;
            }
            if !entry.key.verify(&message, &entry.sig) {
                return Err(VerifyError::BadSignature { role, key: entry.key });
            }
            valid.insert(entry.key);
        }
        let threshold_met = u32::try_from(valid.len()).is_ok_and(|n| n >= threshold);
        match (threshold_met, valid.is_empty(), first_unknown) {
            (true, _, _) => Ok(valid.len()),
            (false, true, Some(key)) => Err(VerifyError::UnknownKey { role, key }),
            (false, _, _) => {
                Err(VerifyError::ThresholdNotMet { role, valid: valid.len(), threshold })
            }
        }
    }
}
