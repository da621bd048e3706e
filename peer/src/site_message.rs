//! The wire form of a site announcement: its author's key, its place in the author's
//! sequence, and the author's Ed25519 signature over both with the topic and the payload.
//!
//! Why not gossipsub's own signing: its codec checks the signature of every copy it decodes,
//! duplicates included; at 16 appliances that was a third of an agent's CPU. Agents take an
//! announcement only from its author's own connection (`crate::site`), whose Noise handshake
//! already proved who sent it, so they check no signature. The signature is what lets a copy
//! that another peer passes on be told from a forgery, so that relaying can come back
//! without a new format (and a forged copy is rejected, not just ignored).
//!
//! The sequence starts from the clock when the agent starts and grows with every message: an
//! announcement repeated word for word is still a new message (gossipsub drops a message it
//! has seen, by the hash of these bytes).

use sitecast_manifest::{PublicKey, SecretKey, Signature};

/// Messages of another format are ignored by this agent, not taken for forgeries.
const FORMAT: u8 = 1;
/// Keeps these signatures apart from anything else the identity key signs.
const CONTEXT: &[u8] = b"sitecast site announcement 1\0";
const HEADER: usize = 1 + 32 + 8 + 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SiteMessageError {
    #[error("{0} bytes, shorter than a message header")]
    Truncated(usize),
    #[error("format {0}, which this agent does not read")]
    UnknownFormat(u8),
    #[error("the author is not a valid Ed25519 key")]
    NotAKey,
    #[error("the signature is not the author's over this topic and payload")]
    BadSignature,
}

/// A message as read from the wire; its author is taken at its word until
/// [`SiteMessage::verify`] or the connection it came on says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteMessage<'a> {
    pub author: [u8; 32],
    pub sequence: u64,
    signature: [u8; 64],
    pub payload: &'a [u8],
}

/// `payload` as `key`'s message number `sequence` on `topic`.
pub fn seal(key: &SecretKey, topic: &str, sequence: u64, payload: &[u8]) -> Vec<u8> {
    let author = *key.public().as_bytes();
    let signature = key.sign(&signed_bytes(topic, &author, sequence, payload));
    let mut message = Vec::with_capacity(HEADER + payload.len());
    message.push(FORMAT);
    message.extend_from_slice(&author);
    message.extend_from_slice(&sequence.to_be_bytes());
    message.extend_from_slice(&signature.0);
    message.extend_from_slice(payload);
    message
}

impl<'a> SiteMessage<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, SiteMessageError> {
        let Some(&format) = data.first() else { return Err(SiteMessageError::Truncated(0)) };
        if format != FORMAT {
            return Err(SiteMessageError::UnknownFormat(format));
        }
        if data.len() < HEADER {
            return Err(SiteMessageError::Truncated(data.len()));
        }
        let (header, payload) = data.split_at(HEADER);
        let field = |range: std::ops::Range<usize>| &header[range];
        Ok(Self {
            author: field(1..33).try_into().expect("32 bytes"),
            sequence: u64::from_be_bytes(field(33..41).try_into().expect("8 bytes")),
            signature: field(41..HEADER).try_into().expect("64 bytes"),
            payload,
        })
    }

    /// Whether the author signed this message for `topic` (what the author's own connection
    /// delivers needs no check).
    pub fn verify(&self, topic: &str) -> Result<(), SiteMessageError> {
        let key = PublicKey::from_bytes(self.author).map_err(|_| SiteMessageError::NotAKey)?;
        let signed = signed_bytes(topic, &self.author, self.sequence, self.payload);
        if key.verify(&signed, &Signature(self.signature)) {
            Ok(())
        } else {
            Err(SiteMessageError::BadSignature)
        }
    }
}

fn signed_bytes(topic: &str, author: &[u8; 32], sequence: u64, payload: &[u8]) -> Vec<u8> {
    let topic_len = u32::try_from(topic.len()).expect("a topic is short");
    let mut signed = Vec::with_capacity(CONTEXT.len() + 4 + topic.len() + 40 + payload.len());
    signed.extend_from_slice(CONTEXT);
    signed.extend_from_slice(&topic_len.to_be_bytes());
    signed.extend_from_slice(topic.as_bytes());
    signed.extend_from_slice(author);
    signed.extend_from_slice(&sequence.to_be_bytes());
    signed.extend_from_slice(payload);
    signed
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &str = "sitecast/2/site-a/00";

    #[test]
    fn a_sealed_message_reads_back_and_verifies() {
        let key = SecretKey::from_seed([7; 32]);
        let data = seal(&key, TOPIC, 42, b"{\"have\":1}");
        let message = SiteMessage::parse(&data).expect("parses");
        assert_eq!(message.author, *key.public().as_bytes());
        assert_eq!(message.sequence, 42);
        assert_eq!(message.payload, b"{\"have\":1}");
        assert_eq!(message.verify(TOPIC), Ok(()));
    }

    #[test]
    fn a_changed_byte_anywhere_signed_fails_verification() {
        let key = SecretKey::from_seed([7; 32]);
        let data = seal(&key, TOPIC, 42, b"{\"have\":1}");
        // Every byte but the format: author, sequence, signature, payload.
        for at in 1..data.len() {
            let mut forged = data.clone();
            forged[at] ^= 1;
            let verdict = SiteMessage::parse(&forged).expect("still parses").verify(TOPIC);
            assert!(verdict.is_err(), "a flipped bit at {at} went unnoticed");
        }
        let message = SiteMessage::parse(&data).expect("parses");
        assert_eq!(message.verify("sitecast/2/site-b/00"), Err(SiteMessageError::BadSignature));
    }

    #[test]
    fn someone_else_cannot_sign_in_the_authors_name() {
        let author = SecretKey::from_seed([7; 32]);
        let forger = SecretKey::from_seed([8; 32]);
        let mut data = seal(&forger, TOPIC, 42, b"{}");
        data[1..33].copy_from_slice(author.public().as_bytes());
        let message = SiteMessage::parse(&data).expect("parses");
        assert_eq!(message.verify(TOPIC), Err(SiteMessageError::BadSignature));
    }

    #[test]
    fn short_and_unknown_messages_are_told_apart_from_forgeries() {
        let key = SecretKey::from_seed([7; 32]);
        let data = seal(&key, TOPIC, 1, b"");
        assert_eq!(SiteMessage::parse(&[]), Err(SiteMessageError::Truncated(0)));
        assert_eq!(
            SiteMessage::parse(&data[..HEADER - 1]),
            Err(SiteMessageError::Truncated(HEADER - 1))
        );
        let mut newer = data.clone();
        newer[0] = FORMAT + 1;
        assert_eq!(SiteMessage::parse(&newer), Err(SiteMessageError::UnknownFormat(FORMAT + 1)));
        assert!(SiteMessage::parse(&data).is_ok(), "an empty payload is a message");
    }
}
