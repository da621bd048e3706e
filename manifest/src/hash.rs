//! The two image digests a manifest carries, as 32-byte values with a lowercase hex form.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::keys::{KeyError, decode_hex, hex_bytes};

macro_rules! digest_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            pub fn from_hex(text: &str) -> Result<Self, KeyError> {
                decode_hex(text).map(Self)
            }

            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                hex_bytes::serialize(&self.0, serializer)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                hex_bytes::deserialize(deserializer).map(Self)
            }
        }
    };
}

digest_type!(
    /// BLAKE3 of the whole image: the root of its bao tree, the hash iroh-blobs and `b3sum` give.
    Blake3Hash
);

digest_type!(
    /// SHA-256 of the whole image, for legacy agents, humans and the final read-back check.
    Sha256Hash
);

impl From<blake3::Hash> for Blake3Hash {
    fn from(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }
}

impl From<Blake3Hash> for blake3::Hash {
    fn from(hash: Blake3Hash) -> Self {
        blake3::Hash::from_bytes(hash.0)
    }
}
