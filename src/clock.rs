//! Wall-clock times as RFC 3339 strings, the one format history and hooks use.

use std::time::SystemTime;

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Whether a time from another node's clock may be recorded and handed to a
/// hook: at most 40 characters of RFC 3339's alphabet (digits, letters,
/// `:`, `.`, `+`, `-`), so that it can carry no control character.
pub fn looks_like_rfc3339(text: &str) -> bool {
    text.len() <= 40
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":.+-".contains(&b))
}
