//! The transform stage: the one place a transfer's bytes may be changed on
//! their way. Sender: read → [`Transform::encode`] → frame. Receiver: frame →
//! [`Transform::decode`] → write, and, between verify and place, the
//! whole-file step [`Transform::finish_file`]. The SHA-256 a transfer
//! carries is always of the file as the sender's outbox held it, and chunk
//! offsets count those bytes, so a transform changes neither the ledger
//! nor the state machine.
//!
//! Today every transfer is [`Transform::Identity`]; compression, encryption
//! and code conversion are to be added here as variants, chosen from the
//! profile (and, on the receiver, from what the chunk header declares).

use std::path::Path;

use bytes::Bytes;

use crate::config::{ReceiveProfile, SendProfile};
use crate::receiver::ReceiveError;

/// How one transfer's bytes change between the outbox and the inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transform {
    /// The bytes travel as they are.
    #[default]
    Identity,
}

impl Transform {
    /// What a send profile asks for.
    pub fn for_send(_profile: &SendProfile) -> Transform {
        Transform::Identity
    }

    /// What a receive profile asks for.
    pub fn for_receive(_profile: &ReceiveProfile) -> Transform {
        Transform::Identity
    }

    /// True when a chunk's body goes into its frame as read, so that the
    /// sender may read it straight into the frame without a copy.
    pub fn in_place(self) -> bool {
        matches!(self, Transform::Identity)
    }

    /// Sender: the body to frame for the chunk read as `plain`.
    pub fn encode(self, plain: Bytes) -> Bytes {
        match self {
            Transform::Identity => plain,
        }
    }

    /// Receiver: the bytes to write for a chunk's body as framed. The chunk
    /// grid (offset, length) is checked on what this returns.
    pub fn decode(self, framed: Bytes) -> Result<Bytes, ReceiveError> {
        match self {
            Transform::Identity => Ok(framed),
        }
    }

    /// Receiver: the whole-file step, on the verified partial file just
    /// before it is placed (code conversion, for one, works on whole lines).
    pub fn finish_file(self, _partial: &Path) -> Result<(), ReceiveError> {
        match self {
            Transform::Identity => Ok(()),
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
        assert!(t.in_place());
        assert_eq!(t.decode(t.encode(body.clone())).unwrap(), body);
        assert!(t.finish_file(Path::new("/nonexistent")).is_ok());
    }
}
