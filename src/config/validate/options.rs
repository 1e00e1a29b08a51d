//! The checks of a profile's transfer options (issue 13): `bandwidth:`,
//! `compress:`, `convert:` and `retry:`, each with its key and line.

use std::time::Duration;

use super::super::raw::{RawCompress, RawConvert, RawRetry};
use super::super::*;
use super::{Result, Validator};

impl Validator<'_> {
    /// `bandwidth: 10MiB/s`: a size a second, more than zero.
    pub(super) fn rate(&self, key: &str, text: Option<&str>) -> Result<Option<u64>> {
        let Some(text) = text else {
            return Ok(None);
        };
        let Some(size) = text.trim().strip_suffix("/s") else {
            return Err(self.err(key, format!("`{text}` is not a rate such as 10MiB/s")));
        };
        match self.size(key, size)? {
            0 => Err(self.err(key, "a rate is more than 0 bytes a second")),
            n => Ok(Some(n)),
        }
    }

    /// `compress: zstd` (level 3) or `compress: { zstd: LEVEL }` (1 to 19).
    pub(super) fn compress(&self, key: &str, raw: Option<RawCompress>) -> Result<Option<i32>> {
        match raw {
            None => Ok(None),
            Some(RawCompress::Word(w)) if w == "zstd" => Ok(Some(crate::transform::ZSTD_LEVEL)),
            Some(RawCompress::Word(w)) => Err(self.err(
                key,
                format!("`{w}` is not a compression; write `zstd` or `{{ zstd: LEVEL }}`"),
            )),
            Some(RawCompress::Level(l)) if (1..=19).contains(&l.zstd) => Ok(Some(l.zstd)),
            Some(RawCompress::Level(_)) => Err(self.err(
                &format!("{key}.zstd"),
                "a zstd level is between 1 (fastest) and 19 (smallest)",
            )),
        }
    }

    /// `convert:`: two known encodings, a newline rule, an error rule, and
    /// a BOM only for a target that has one.
    pub(super) fn convert(&self, key: &str, raw: Option<RawConvert>) -> Result<Option<Convert>> {
        let Some(raw) = raw else {
            return Ok(None);
        };
        let charset = |k: &str, v: &str| {
            Charset::parse(v).ok_or_else(|| {
                self.err(
                    &format!("{key}.{k}"),
                    format!("`{v}` is not one of {}", Charset::NAMES),
                )
            })
        };
        let (from, to) = (charset("from", &raw.from)?, charset("to", &raw.to)?);
        let newline = match raw.newline.as_deref().unwrap_or("keep") {
            "lf" => Newline::Lf,
            "crlf" => Newline::Crlf,
            "keep" => Newline::Keep,
            other => {
                return Err(self.err(
                    &format!("{key}.newline"),
                    format!("`{other}` is not one of lf, crlf, keep"),
                ));
            }
        };
        let on_error = match raw.on_error.as_deref().unwrap_or("fail") {
            "fail" => OnError::Fail,
            "replace" => OnError::Replace,
            other => {
                return Err(self.err(
                    &format!("{key}.on_error"),
                    format!("`{other}` is not one of fail, replace"),
                ));
            }
        };
        let bom = raw.bom.unwrap_or(false);
        if bom && !to.is_unicode() {
            return Err(self.err(
                &format!("{key}.bom"),
                format!("{to} has no byte order mark: `bom: true` needs utf-8, utf-16le or utf-16be as `to`"),
            ));
        }
        Ok(Some(Convert {
            from,
            to,
            newline,
            on_error,
            bom,
        }))
    }

    /// A `retry:` key: 1 to 100 attempts, a backoff (default 30s) of at
    /// least `min`.
    pub(super) fn retry(&self, key: &str, raw: Option<RawRetry>, min: Duration) -> Result<Retry> {
        let Some(raw) = raw else {
            return Ok(Retry::ONCE);
        };
        if !(1..=Retry::MAX_ATTEMPTS).contains(&raw.attempts) {
            return Err(self.err(
                &format!("{key}.attempts"),
                format!(
                    "attempts counts every run, the first included: 1 to {}",
                    Retry::MAX_ATTEMPTS
                ),
            ));
        }
        let backoff = match raw.backoff {
            Some(b) => self.duration(&format!("{key}.backoff"), &b)?,
            None => Retry::ONCE.backoff,
        };
        if backoff < min {
            return Err(self.err(
                &format!("{key}.backoff"),
                format!("at least {min:?}: the receiver must have settled a failed try before the next one arrives"),
            ));
        }
        Ok(Retry {
            attempts: raw.attempts,
            backoff,
        })
    }
}
