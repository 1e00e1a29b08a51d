//! Why a transfer failed on the receiving side, with the stable codes that
//! become `HAKOBU_ERROR_CODE` and travel back in the receipt.

use std::io;

use crate::error_code::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(
        "no receive profile for file id `{0}` on this node; add one or fix the sender's file id"
    )]
    UnknownFileId(String),
    #[error(
        "node `{0}` may not send file id `{1}` here; add it to the profile's `from` list if it should"
    )]
    SenderNotAllowed(String, String),
    #[error("the broker authenticated the sender as user `{user}`, which is not node `{node}`")]
    SenderMismatch { user: String, node: String },
    #[error(
        "file name \"{0}\" (escaped) is not a plain base name (separator, `..`, leading dot or dash, NUL, control or Unicode format character); rename it on the sender"
    )]
    BadFileName(String),
    #[error("the transfer's metadata is refused: {0}; fix the sender's --meta")]
    BadMetadata(String),
    #[error(
        "declared size {size} bytes exceeds the profile's max_size of {max} bytes; raise max_size or send a smaller file"
    )]
    TooLarge { size: u64, max: u64 },
    #[error(
        "chunk at offset {offset} with {len} bytes lies outside the declared size {size} or chunk grid"
    )]
    ChunkOutOfRange { offset: u64, len: u64, size: u64 },
    #[error("chunk disagrees with earlier chunks of the same transfer about {0}")]
    Inconsistent(&'static str),
    #[error("assembled file has {actual} bytes, {expected} were declared")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error(
        "SHA-256 mismatch: the sender declared {expected}, the received bytes hash to {actual}; the file was not placed"
    )]
    DigestMismatch { expected: String, actual: String },
    #[error("{0} exists and the profile's mode is `new`; remove it or use mode replace")]
    FileExists(String),
    #[error("the inbox filesystem is full ({0}); free space, then resend")]
    DiskFull(String),
    #[error("cannot write the file: {0}")]
    Io(String),
    #[error("{1}")]
    Hook(ErrorCode, String),
    #[error(
        "the agent stopped while the success hook ran; run `hakobu rerun` if it should run again"
    )]
    HookInterrupted,
    #[error(
        "no chunk arrived for {0:?} (the profile's partial_ttl); the partial file was removed, send the file again"
    )]
    Expired(std::time::Duration),
    #[error("{0}; nothing was written through it: remove it, then send the file again")]
    UnsafeInbox(String),
    #[error(
        "cannot decrypt a chunk: {0}; the transfer was refused (give the sender this node's public key, `hakobu keygen` prints it, and resend)"
    )]
    DecryptFailed(String),
    #[error(
        "the profile requires encryption and a chunk came unencrypted; set `encrypt: true` on the sender's profile and resend"
    )]
    EncryptionRequired,
    /// Code conversion (`convert:`) failed; the sentence names the byte
    /// offset and the line.
    #[error("{0}")]
    ConversionFailed(String),
    #[error(
        "the profile's `name:` made \"{0}\" (escaped), which is not a plain base name (separator, `..`, leading dot or dash, control character); fix the template or the metadata it uses"
    )]
    BadReceiveName(String),
}

impl ReceiveError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ReceiveError::UnknownFileId(_) => ErrorCode::UnknownFileId,
            ReceiveError::SenderNotAllowed(..) => ErrorCode::SenderNotAllowed,
            ReceiveError::SenderMismatch { .. } => ErrorCode::SenderMismatch,
            ReceiveError::BadFileName(_) => ErrorCode::BadFileName,
            ReceiveError::ConversionFailed(_) => ErrorCode::ConversionFailed,
            ReceiveError::BadReceiveName(_) => ErrorCode::BadReceiveName,
            ReceiveError::BadMetadata(_) => ErrorCode::BadMetadata,
            ReceiveError::TooLarge { .. } => ErrorCode::FileTooLarge,
            ReceiveError::ChunkOutOfRange { .. } => ErrorCode::ChunkOutOfRange,
            ReceiveError::Inconsistent(_) => ErrorCode::InconsistentChunk,
            ReceiveError::SizeMismatch { .. } => ErrorCode::SizeMismatch,
            ReceiveError::DigestMismatch { .. } => ErrorCode::Sha256Mismatch,
            ReceiveError::FileExists(_) => ErrorCode::FileExists,
            ReceiveError::DiskFull(_) => ErrorCode::DiskFull,
            ReceiveError::Io(_) => ErrorCode::IoError,
            ReceiveError::Hook(code, _) => *code,
            ReceiveError::HookInterrupted => ErrorCode::HookInterrupted,
            ReceiveError::Expired(_) => ErrorCode::TransferExpired,
            ReceiveError::UnsafeInbox(_) => ErrorCode::UnsafeInbox,
            ReceiveError::DecryptFailed(_) => ErrorCode::DecryptFailed,
            ReceiveError::EncryptionRequired => ErrorCode::EncryptionRequired,
        }
    }

    pub fn from_io(context: &str, e: io::Error) -> Self {
        if ErrorCode::of_io(&e) == ErrorCode::DiskFull {
            ReceiveError::DiskFull(format!("{context}: {e}"))
        } else {
            ReceiveError::Io(format!("{context}: {e}"))
        }
    }
}
