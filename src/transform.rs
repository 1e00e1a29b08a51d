//! The transform stage: the one place a transfer's bytes may be changed on
//! their way. Sender: read → [`Transform::encode`] → frame. Receiver: frame →
//! [`Transform::decode`] → write, and, between verify and place, the
//! whole-file step ([`Transform::conversion`], `receiver/staged.rs`). The
//! SHA-256 a transfer carries is always of the file as the sender's spool
//! holds it (the outbox's bytes, or a send profile's converted file), and
//! chunk offsets count those bytes, so a transform changes neither the
//! ledger nor the state machine.
//!
//! Variants: [`Transform::Identity`] (the bytes as they are) and end-to-end
//! encryption (`encrypt: true` on a send profile, [`seal`]): the sender
//! seals each body for the receiving node ([`Transform::Seal`]), the
//! receiver opens what a chunk header declares sealed ([`Transform::Open`]).
//! Compression (`compress: zstd`, [`compress`]) wraps either on the sender
//! ([`Transform::Compress`]): each body is compressed, then sealed; the
//! receiver needs no setting, since a chunk header says `compressed`, and
//! it inflates after opening. Code conversion (`convert:`, [`convert`]) is
//! the receiver's whole-file step ([`Transform::Convert`]) and the sender's
//! step into the spool.

pub(crate) mod compress;
pub mod convert;
pub(crate) mod seal;

use std::sync::Arc;

use bytes::Bytes;

use crate::config::{ReceiveProfile, SendProfile};
use crate::domain::NodeName;
use crate::keys::Keyring;
use crate::receiver::ReceiveError;
use crate::wire::{ChunkHeader, Codec, Sealed};

pub use compress::DEFAULT_LEVEL as ZSTD_LEVEL;
pub use seal::{OVERHEAD as SEAL_OVERHEAD, Sealer};

/// How one transfer's bytes change between the outbox and the inbox.
#[derive(Debug, Clone, Default)]
pub enum Transform {
    /// The bytes travel as they are.
    #[default]
    Identity,
    /// Sender: each body sealed with the transfer's data key, wrapped for
    /// the receiving node.
    Seal(Arc<Sealer>),
    /// Receiver: sealed bodies opened with this node's private key.
    Open(Arc<Keyring>),
    /// Receiver, the whole-file step: code conversion (`convert:`) between
    /// verify and place ([`convert`]).
    Convert(convert::Convert),
    /// Sender: each body compressed with zstd at `level` (kept only when it
    /// shrinks), then passed to `then` (identity or a seal).
    Compress { level: i32, then: Box<Transform> },
}

/// Why a send profile's transform cannot be made for a node.
#[derive(Debug, thiserror::Error)]
pub enum SendTransformError {
    #[error(
        "file id `{file_id}` is sent encrypted but keys.peers has no public key for node `{node}`; run `hakobu keygen` on {node} and add the key it prints, then resend"
    )]
    NoPeerKey { file_id: String, node: String },
    #[error("{0}")]
    Seal(String),
}

impl Transform {
    /// What a send profile asks for, for the transfer's receiving node
    /// `peer`: with `encrypt`, a fresh data key wrapped for that node.
    pub fn for_send(
        profile: &SendProfile,
        keys: &Keyring,
        peer: &NodeName,
    ) -> Result<Transform, SendTransformError> {
        let base = Self::cipher_for_send(profile, keys, peer)?;
        Ok(match profile.compress {
            Some(level) => Transform::Compress {
                level,
                then: Box::new(base),
            },
            None => base,
        })
    }

    fn cipher_for_send(
        profile: &SendProfile,
        keys: &Keyring,
        peer: &NodeName,
    ) -> Result<Transform, SendTransformError> {
        if !profile.encrypt {
            return Ok(Transform::Identity);
        }
        let recipient = keys
            .peer(peer)
            .ok_or_else(|| SendTransformError::NoPeerKey {
                file_id: profile.file_id.to_string(),
                node: peer.to_string(),
            })?;
        let sealer = Sealer::new(recipient).map_err(SendTransformError::Seal)?;
        Ok(Transform::Seal(Arc::new(sealer)))
    }

    /// What a receive profile asks for, for the whole-file step.
    pub fn for_receive(profile: &ReceiveProfile) -> Transform {
        match profile.convert {
            Some(c) => Transform::Convert(c),
            None => Transform::Identity,
        }
    }

    /// Receiver: how to decode one chunk, from what its header declares and
    /// what the profile requires.
    pub fn for_chunk(
        profile: &ReceiveProfile,
        keys: &Arc<Keyring>,
        h: &ChunkHeader,
    ) -> Result<Transform, ReceiveError> {
        match &h.sealed {
            Some(_) => Ok(Transform::Open(keys.clone())),
            None if profile.require_encryption => Err(ReceiveError::EncryptionRequired),
            None => Ok(Transform::Identity),
        }
    }

    /// True when a chunk's body can be read straight into its frame and
    /// encoded there ([`Transform::encode_in_place`]), without a copy.
    pub fn in_place(&self) -> bool {
        matches!(self, Transform::Identity | Transform::Seal(_))
    }

    /// What the chunk headers of this transfer carry to say how to decode.
    pub fn sealed(&self) -> Option<Sealed> {
        match self {
            Transform::Seal(s) => Some(s.sealed()),
            Transform::Compress { then, .. } => then.sealed(),
            _ => None,
        }
    }

    /// Bytes a framed body has for a plain body of `len` bytes, in place.
    pub fn framed_len(&self, len: usize) -> usize {
        match self {
            Transform::Seal(_) => len + seal::OVERHEAD,
            _ => len,
        }
    }

    /// Where, in a framed body encoded in place, the plain bytes go.
    pub fn plain_at(&self) -> usize {
        match self {
            Transform::Seal(_) => seal::NONCE,
            _ => 0,
        }
    }

    /// Sender: encodes in place a body of [`Transform::framed_len`] bytes
    /// that holds the plain ones at [`Transform::plain_at`].
    pub fn encode_in_place(&self, h: &ChunkHeader, body: &mut [u8]) -> std::io::Result<()> {
        match self {
            Transform::Seal(s) => s.seal_in_place(h, body).map_err(std::io::Error::other),
            _ => Ok(()),
        }
    }

    /// Sender: the body to frame for the chunk read as `plain`, whose
    /// header is `h` (complete: a seal binds the chunk to it). Compression
    /// sets `h.compressed` when it keeps the compressed bytes.
    pub fn encode(&self, h: &mut ChunkHeader, plain: Bytes) -> std::io::Result<Bytes> {
        match self {
            Transform::Compress { level, then } => {
                let body = match compress::deflate(&plain, *level)? {
                    Some(z) => {
                        h.compressed = Some(Codec::Zstd);
                        z
                    }
                    None => plain,
                };
                then.encode(h, body)
            }
            Transform::Seal(_) => {
                let mut body = vec![0u8; self.framed_len(plain.len())];
                let at = self.plain_at();
                body[at..at + plain.len()].copy_from_slice(&plain);
                self.encode_in_place(h, &mut body)?;
                Ok(Bytes::from(body))
            }
            _ => Ok(plain),
        }
    }

    /// Receiver: the bytes to write for a chunk's body as framed: opened
    /// when sealed, then inflated when compressed, into no more than the
    /// chunk's declared length. The chunk grid (offset, length) is checked
    /// on what this returns.
    pub fn decode(&self, h: &ChunkHeader, framed: Bytes) -> Result<Bytes, ReceiveError> {
        let body = self.open(h, framed)?;
        match h.compressed {
            None => Ok(body),
            Some(Codec::Zstd) => {
                let len = h
                    .expected_len()
                    .ok_or(ReceiveError::Inconsistent("the chunk grid (offset, size)"))?;
                compress::inflate(&body, len).map_err(|e| {
                    ReceiveError::Inconsistent(match e {
                        compress::InflateError::TooLong(_) => {
                            "the chunk's length (its content inflates past it)"
                        }
                        compress::InflateError::TooShort { .. } => {
                            "the chunk's length (its content inflates short of it)"
                        }
                        compress::InflateError::Corrupt(_) => {
                            "the chunk's compressed content (not valid zstd)"
                        }
                    })
                })
            }
        }
    }

    fn open(&self, h: &ChunkHeader, framed: Bytes) -> Result<Bytes, ReceiveError> {
        match (self, &h.sealed) {
            (Transform::Identity, None) => Ok(framed),
            (Transform::Open(keys), Some(sealed)) => seal::open(keys, h, sealed, &framed)
                .map_err(|e| ReceiveError::DecryptFailed(e.to_string())),
            _ => Err(ReceiveError::DecryptFailed(
                "the chunk's header and the transform chosen for it disagree".into(),
            )),
        }
    }

    /// Receiver: the conversion the whole-file step makes on the verified
    /// file just before it is placed (`receiver/staged.rs`), if any.
    pub fn conversion(&self) -> Option<&convert::Convert> {
        match self {
            Transform::Convert(c) => Some(c),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_changes_nothing() {
        let body = Bytes::from_static(b"a,b\r\n");
        let t = Transform::default();
        let mut h = seal::tests::header(0, 5);
        assert!(t.in_place());
        let framed = t.encode(&mut h, body.clone()).unwrap();
        assert_eq!(t.decode(&h, framed).unwrap(), body);
        assert!(t.conversion().is_none());
    }
}
