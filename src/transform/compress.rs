//! Compression of chunk bodies (`compress: zstd` on a send profile), with
//! the zstd crate. The sender compresses each chunk on its own and keeps the
//! result only when it is smaller; the header then says `compressed: zstd`
//! (and a seal, if any, is made over the compressed bytes and binds the
//! flag). The receiver inflates into a buffer of exactly the chunk's
//! declared length, never more: a body that would inflate past it (a
//! "zstd bomb", or a frame that declares a larger content size) fails
//! without the larger buffer ever being allocated, and so does one that
//! inflates short of it.

use bytes::Bytes;

/// Level of `compress: zstd`: zstd's own default, fast and a good ratio.
pub const DEFAULT_LEVEL: i32 = 3;

/// The largest window a body may ask the decoder for (2^27 bytes, zstd's
/// default limit): bodies are at most 8 MiB, so a sender never needs more.
const WINDOW_LOG_MAX: u32 = 27;

/// Sender: `plain` compressed at `level`, or `None` when that does not
/// make it smaller (it then travels as it is).
pub fn deflate(plain: &[u8], level: i32) -> std::io::Result<Option<Bytes>> {
    if plain.is_empty() {
        return Ok(None);
    }
    let mut c = zstd::bulk::Compressor::new(level)?;
    // No content size in the frame header: the receiver knows it anyway.
    c.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false))?;
    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(false))?;
    let mut out = Vec::with_capacity(plain.len());
    // A result that would not fit in `plain.len()` bytes is no gain: the
    // compressor then reports a full buffer, and the chunk goes plain.
    match c.compress_to_buffer(plain, &mut out) {
        Ok(n) if n < plain.len() => {
            out.truncate(n);
            Ok(Some(Bytes::from(out)))
        }
        Ok(_) | Err(_) => Ok(None),
    }
}

/// Why a compressed body was refused.
#[derive(Debug, thiserror::Error)]
pub enum InflateError {
    #[error("the compressed chunk inflates past its declared length of {0} bytes")]
    TooLong(u64),
    #[error("the compressed chunk inflates to {got} bytes, {want} were declared")]
    TooShort { want: u64, got: u64 },
    #[error("the compressed chunk is not valid zstd: {0}")]
    Corrupt(String),
}

/// Receiver: `framed` inflated into exactly `len` bytes.
pub fn inflate(framed: &[u8], len: u64) -> Result<Bytes, InflateError> {
    let want = usize::try_from(len).map_err(|_| InflateError::TooLong(len))?;
    let mut d =
        zstd::bulk::Decompressor::new().map_err(|e| InflateError::Corrupt(e.to_string()))?;
    d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(WINDOW_LOG_MAX))
        .map_err(|e| InflateError::Corrupt(e.to_string()))?;
    // Exactly the declared length, and no more: zstd writes into this
    // buffer's capacity and stops with an error when it is full.
    let mut out: Vec<u8> = Vec::with_capacity(want);
    let got = match d.decompress_to_buffer(framed, &mut out) {
        Ok(n) => n,
        Err(e) if is_too_small(&e) => return Err(InflateError::TooLong(len)),
        Err(e) => return Err(InflateError::Corrupt(e.to_string())),
    };
    if got != want {
        return Err(InflateError::TooShort {
            want: len,
            got: got as u64,
        });
    }
    Ok(Bytes::from(out))
}

/// zstd's own "destination buffer is too small": the body inflates past it.
fn is_too_small(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|e| e.downcast_ref::<zstd::Error>())
        .is_some_and(|z| {
            z.is(zstd::zstd_safe::zstd_sys::ZSTD_ErrorCode::ZSTD_error_dstSize_tooSmall)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(rows: usize) -> Vec<u8> {
        (0..rows)
            .flat_map(|i| format!("{i},2026-12-02,tokyo,{},ok\n", i * 7).into_bytes())
            .collect()
    }

    #[test]
    fn a_csv_shrinks_and_inflates_back() {
        let plain = csv(20_000);
        let z = deflate(&plain, DEFAULT_LEVEL).unwrap().expect("shrinks");
        assert!(z.len() * 3 < plain.len(), "{} of {}", z.len(), plain.len());
        assert_eq!(inflate(&z, plain.len() as u64).unwrap(), plain);
    }

    #[test]
    fn random_bytes_do_not_shrink() {
        let plain: Vec<u8> = (0..100_000u64)
            .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect();
        // A multiplicative sequence has structure; what matters is the rule:
        // a result is kept only when it is smaller.
        if let Some(z) = deflate(&plain, DEFAULT_LEVEL).unwrap() {
            assert!(z.len() < plain.len());
        }
        assert!(deflate(&[], DEFAULT_LEVEL).unwrap().is_none());
        assert!(deflate(b"x", DEFAULT_LEVEL).unwrap().is_none());
    }

    #[test]
    fn a_body_that_inflates_past_its_length_is_refused() {
        // 64 MiB of zeros declared as 1 MiB: refused, and no 64 MiB buffer.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
        assert!(bomb.len() < 64 << 10);
        let e = inflate(&bomb, 1 << 20).unwrap_err();
        assert!(matches!(e, InflateError::TooLong(_)), "{e}");
    }

    #[test]
    fn a_body_that_inflates_short_or_is_garbage_is_refused() {
        let plain = csv(1000);
        let z = deflate(&plain, DEFAULT_LEVEL).unwrap().unwrap();
        let e = inflate(&z, plain.len() as u64 + 1).unwrap_err();
        assert!(matches!(e, InflateError::TooShort { .. }), "{e}");
        let e = inflate(b"not zstd at all", 100).unwrap_err();
        assert!(matches!(e, InflateError::Corrupt(_)), "{e}");
        let e = inflate(&z[..z.len() / 2], plain.len() as u64).unwrap_err();
        assert!(!matches!(e, InflateError::TooLong(_)), "{e}");
    }
}
