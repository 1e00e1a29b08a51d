//! Wall-clock times as RFC 3339 strings, the one format history and hooks use.

use std::time::SystemTime;

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
