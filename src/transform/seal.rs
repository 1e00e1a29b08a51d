//! Sealing: end-to-end encryption of chunk bodies (`encrypt: true`), from
//! well-kept crates only. Each transfer to each receiving node gets a fresh
//! random 32-byte data key (OsRng), wrapped for that node's public key with
//! age (X25519); the wrapped key travels in every chunk's header
//! ([`Sealed`]), so that any chunk can be opened first. Each body is sealed
//! with XChaCha20-Poly1305 under a random 24-byte nonce; the associated data
//! binds the chunk to its place: transfer id, file id, sender, receiver, file
//! name, size, chunk size, offset, index, count, length and, on the last
//! chunk, the trailer (digest, start, meta), and whether the body is
//! compressed (it is compressed before sealing). A chunk changed, moved to
//! another offset or into another transfer, or cut short does not open.
//!
//! Sealed body: nonce (24 bytes) · ciphertext · tag (16 bytes).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Bytes, BytesMut};
use chacha20poly1305::aead::{AeadCore, AeadInPlace, KeyInit, OsRng};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use serde::Serialize;

use crate::domain::{FileId, NodeName, TransferId};
use crate::keys::Keyring;
use crate::wire::{ChunkHeader, Codec, Sealed, Trailer};

/// The one scheme so far (see [`Sealed::v`]).
pub const SCHEME: u8 = 1;
pub const NONCE: usize = 24;
pub const TAG: usize = 16;
/// Bytes a sealed body has beyond the plain one.
pub const OVERHEAD: usize = NONCE + TAG;
/// A wrapped key is about 300 base64 characters; anything much larger is hostile.
const MAX_WRAPPED: usize = 4096;
/// Domain separation for the associated data.
const CONTEXT: &str = "hakobu/e2e/v1";

/// Seals the chunks of one transfer for one receiving node.
pub struct Sealer {
    cipher: XChaCha20Poly1305,
    sealed: Sealed,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").finish_non_exhaustive()
    }
}

impl Sealer {
    /// A fresh data key, wrapped for `recipient`.
    pub fn new(recipient: &age::x25519::Recipient) -> Result<Sealer, String> {
        let key = XChaCha20Poly1305::generate_key(&mut OsRng);
        let wrapped = age::encrypt(recipient, key.as_slice())
            .map_err(|e| format!("cannot wrap the data key: {e}"))?;
        Ok(Sealer {
            cipher: XChaCha20Poly1305::new(&key),
            sealed: Sealed {
                v: SCHEME,
                key: BASE64.encode(wrapped),
            },
        })
    }

    /// What every chunk's header carries.
    pub fn sealed(&self) -> Sealed {
        self.sealed.clone()
    }

    /// Seals `buf` in place: it holds [`NONCE`] bytes to fill, the plain
    /// body, and [`TAG`] bytes to fill.
    pub fn seal_in_place(&self, h: &ChunkHeader, buf: &mut [u8]) -> Result<(), String> {
        let len = buf
            .len()
            .checked_sub(OVERHEAD)
            .ok_or("a sealed body needs room for its nonce and tag")?;
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = bound(h, len as u64);
        let (head, rest) = buf.split_at_mut(NONCE);
        let (body, tail) = rest.split_at_mut(len);
        let tag = self
            .cipher
            .encrypt_in_place_detached(&nonce, &aad, body)
            .map_err(|_| "the chunk is too large to seal".to_string())?;
        head.copy_from_slice(&nonce);
        tail.copy_from_slice(&tag);
        Ok(())
    }
}

/// Why a sealed chunk did not open. Never says more than that about the key.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("unknown encryption scheme {0}; upgrade this agent")]
    Scheme(u8),
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    #[error("the wrapped data key is malformed")]
    Wrapped,
    #[error(
        "the data key is not for this node's private key: the sender has another public key for this node in keys.peers"
    )]
    NotForUs,
    #[error("the chunk does not authenticate: it was changed, moved or cut on the way")]
    Forged,
}

/// Opens a sealed body with the data key in `sealed`, unwrapped with this
/// node's private key (or remembered from an earlier chunk).
pub fn open(
    keys: &Keyring,
    h: &ChunkHeader,
    sealed: &Sealed,
    framed: &[u8],
) -> Result<Bytes, OpenError> {
    if sealed.v != SCHEME {
        return Err(OpenError::Scheme(sealed.v));
    }
    if framed.len() < OVERHEAD {
        return Err(OpenError::Forged);
    }
    let key = match keys.remembered(&sealed.key) {
        Some(k) => k,
        None => {
            let identity = keys.identity()?;
            if sealed.key.len() > MAX_WRAPPED {
                return Err(OpenError::Wrapped);
            }
            let wrapped = BASE64.decode(&sealed.key).map_err(|_| OpenError::Wrapped)?;
            let plain = age::decrypt(identity, &wrapped).map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => OpenError::NotForUs,
                _ => OpenError::Wrapped,
            })?;
            let k: [u8; 32] = plain.try_into().map_err(|_| OpenError::Wrapped)?;
            keys.remember(&sealed.key, k);
            k
        }
    };
    let cipher = XChaCha20Poly1305::new(&k_array(key));
    let (nonce, rest) = framed.split_at(NONCE);
    let (ct, tag) = rest.split_at(rest.len() - TAG);
    let mut out = BytesMut::from(ct);
    cipher
        .decrypt_in_place_detached(
            XNonce::from_slice(nonce),
            &bound(h, ct.len() as u64),
            &mut out,
            Tag::from_slice(tag),
        )
        .map_err(|_| OpenError::Forged)?;
    Ok(out.freeze())
}

fn k_array(k: [u8; 32]) -> chacha20poly1305::Key {
    k.into()
}

/// What a chunk's seal binds it to: everything its header says, but the
/// seal itself.
#[derive(Serialize)]
struct Bound<'a> {
    context: &'static str,
    transfer_id: &'a TransferId,
    file_id: &'a FileId,
    from: &'a NodeName,
    to: &'a NodeName,
    file_name: &'a str,
    size: u64,
    chunk_size: u64,
    offset: u64,
    index: u64,
    count: u64,
    len: u64,
    last: &'a Option<Trailer>,
    /// Bound only when present, so that chunks without one open as before.
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: &'a Option<TransferId>,
    /// Absent when plain, so that seals of uncompressed chunks stay as before.
    #[serde(skip_serializing_if = "Option::is_none")]
    compressed: Option<Codec>,
    /// Bound only when present, like `request_id`: a parent can be neither
    /// forged onto a sealed chunk nor stripped from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: &'a Option<TransferId>,
}

fn bound(h: &ChunkHeader, len: u64) -> Vec<u8> {
    let b = Bound {
        context: CONTEXT,
        transfer_id: &h.transfer_id,
        file_id: &h.file_id,
        from: &h.from,
        to: &h.to,
        file_name: &h.file_name,
        size: h.size,
        chunk_size: h.chunk_size,
        offset: h.offset,
        index: h.index(),
        count: h.chunk_count().unwrap_or(0),
        len,
        last: &h.last,
        request_id: &h.request_id,
        compressed: h.compressed,
        parent_id: &h.parent_id,
    };
    // Plain strings and integers: serializing cannot fail.
    serde_json::to_vec(&b).unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests;
