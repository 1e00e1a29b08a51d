//! Wall-clock times as RFC 3339 strings, the one format history and hooks use.

use std::time::SystemTime;

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Today's date in the local time zone (`TZ`, else /etc/localtime), as
/// YYYYMMDD: a receive name's `{date}`. The UTC date should the C library
/// not know the time zone.
pub fn local_date() -> String {
    let secs = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let t = secs as nix::libc::time_t;
    // SAFETY: `localtime_r` is the reentrant form; it writes only into `tm`,
    // which lives for the call, and reads `t`.
    let mut tm: nix::libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !nix::libc::localtime_r(&t, &mut tm).is_null() };
    if ok {
        format!(
            "{:04}{:02}{:02}",
            tm.tm_year + 1900,
            tm.tm_mon + 1,
            tm.tm_mday
        )
    } else {
        humantime::format_rfc3339(SystemTime::now()).to_string()[..10].replace('-', "")
    }
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

/// Now in unix seconds (0 before 1970).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
