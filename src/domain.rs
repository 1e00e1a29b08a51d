//! The names a transfer carries: the node, the file id, the transfer id and
//! the file name. Each is checked once, where it enters the agent (the
//! configuration, a message, the command line, the state database), and
//! travels as its own type from then on: a function that takes a
//! [`TransferId`] never checks it again, and cannot be handed a path.

use std::fmt;

/// A value that is not a valid name of its kind, with the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a valid {kind}: {rule}")]
pub struct NameError {
    pub kind: &'static str,
    pub rule: &'static str,
    pub value: String,
}

/// Defines a string newtype that can only be built by `check`, and reads as
/// a `&str` everywhere else.
macro_rules! checked_name {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $rule:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// What the value must look like, for error messages.
            pub const RULE: &'static str = $rule;

            pub fn parse(value: &str) -> Result<$name, NameError> {
                let check: fn(&str) -> bool = $check;
                if check(value) {
                    Ok($name(value.to_string()))
                } else {
                    Err(NameError {
                        kind: $kind,
                        rule: $rule,
                        value: value.to_string(),
                    })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<std::path::Path> for $name {
            fn as_ref(&self) -> &std::path::Path {
                std::path::Path::new(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // `pad`, so that `{:<36}` lines a table up.
                f.pad(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        /// Reading one (from a message) checks it: a value that breaks the
        /// rule makes the whole message malformed.
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $name::parse(&s).map_err(serde::de::Error::custom)
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                $name::parse(s)
            }
        }
    };
}

/// Node names and file ids share one rule: 1–50 characters from
/// `[A-Za-z0-9_.-]`, and neither `.` nor `..` (both become path parts).
fn plain_id(s: &str) -> bool {
    (1..=50).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && s != "."
        && s != ".."
}

checked_name!(
    /// One agent's identity, unique in the cluster (`tokyo-db1`); it names
    /// the node's broker queue and its broker user.
    NodeName,
    "node name",
    "1-50 characters from A-Z a-z 0-9 _ . -",
    plain_id
);

checked_name!(
    /// The name of a transfer profile, the same on both sides (HULFT's file
    /// ID); it names a spool directory.
    FileId,
    "file id",
    "1-50 characters from A-Z a-z 0-9 _ . -",
    plain_id
);

checked_name!(
    /// One file's journey: a UUID (v7 when hakobu assigns it) or a ULID. It
    /// names partial files, spool entries and hook logs, so it is letters,
    /// digits and dashes only.
    TransferId,
    "transfer id",
    "10-64 characters from A-Z a-z 0-9 -",
    |id| (10..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
);

checked_name!(
    /// A file's base name as it arrives in an inbox: it cannot leave the
    /// inbox (no separator, no `.` or `..`), hide (no leading dot), pass for
    /// an option in a hook's argument list (no leading `-`) or confuse a
    /// hook, a log or a terminal (no NUL, control or Unicode format
    /// character: no bidirectional override, no zero-width character).
    FileName,
    "file name",
    "a plain base name: no separator, `..`, leading dot or dash, NUL, control or format character, at most 255 bytes",
    |name| !(name.is_empty()
        || name.len() > 255
        || name.starts_with('.')
        || name.starts_with('-')
        || name.contains('/')
        || name.contains('\\')
        || name.chars().any(unsafe_char))
);

/// Characters no name from the network may hold, because they change what a
/// terminal or a log shows: controls (C0, DEL, C1) and the Unicode format
/// characters that reorder or hide text (soft hyphen, Arabic letter mark,
/// Mongolian vowel separator, zero-width characters and marks, bidirectional
/// embeddings, overrides and isolates, invisible operators, the byte order
/// mark, interlinear annotations).
pub fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}' | '\u{061C}' | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}')
}

/// `text` safe to print on a terminal or to write into a log: every
/// character [`unsafe_char`] names written as `\u{..}`, and backslashes
/// doubled so the escaped form cannot be forged.
pub fn escape_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// A name from the network that may not be a [`FileName`], made safe to
/// record and to hand to a hook: escaped like [`escape_text`], with
/// separators and a leading dot or dash escaped too, and cut to 255 bytes.
/// A valid name comes back unchanged.
pub fn escape_name(raw: &str) -> String {
    if FileName::parse(raw).is_ok() {
        return raw.to_string();
    }
    let mut out = String::new();
    for (i, c) in raw.chars().enumerate() {
        let piece = match c {
            '/' | '\\' => format!("\\u{{{:x}}}", c as u32),
            '.' | '-' if i == 0 => format!("\\u{{{:x}}}", c as u32),
            c => escape_text(&c.to_string()),
        };
        if out.len() + piece.len() > 255 {
            break;
        }
        out.push_str(&piece);
    }
    out
}

/// Keys a transfer's metadata may hold at most.
pub const META_MAX_KEYS: usize = 32;
/// Bytes one metadata value may hold at most.
pub const META_MAX_VALUE: usize = 4096;

/// Checks a transfer's metadata (`hakobu send --meta`, the last chunk's
/// trailer): each key becomes a `HAKOBU_META_*` variable, so keys are 1-64
/// characters from A-Z a-z 0-9 _ and no two of them may map to the same
/// variable (they differ in case only); values are one line of text
/// without control or format characters. Err says what is wrong.
pub fn check_meta<'a>(
    meta: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for (n, (k, v)) in meta.into_iter().enumerate() {
        if n >= META_MAX_KEYS {
            return Err(format!("more than {META_MAX_KEYS} keys"));
        }
        if k.is_empty()
            || k.len() > 64
            || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(format!(
                "key \"{}\" is not 1-64 characters from A-Z a-z 0-9 _",
                escape_text(k)
            ));
        }
        if !seen.insert(k.to_ascii_uppercase()) {
            return Err(format!(
                "keys that differ only in case ({k}) would be the same HAKOBU_META_{} variable",
                k.to_ascii_uppercase()
            ));
        }
        if v.len() > META_MAX_VALUE {
            return Err(format!("the value of {k} is over {META_MAX_VALUE} bytes"));
        }
        if v.chars().any(unsafe_char) {
            return Err(format!(
                "the value of {k} holds a newline, control or format character"
            ));
        }
    }
    Ok(())
}

impl TransferId {
    /// A new transfer id: a UUIDv7, so that ids sort by the time they were made.
    pub fn new() -> TransferId {
        TransferId(uuid::Uuid::now_v7().to_string())
    }
}

impl Default for TransferId {
    fn default() -> Self {
        TransferId::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/etc/passwd",
            "a\0b",
            "a\nb",
            ".hidden",
            "a\\b",
            "-rf",
            "-",
            "invoice\u{202E}fdp.exe",
            "a\u{200B}b",
            "a\u{2066}b",
            "a\u{FEFF}b",
            "a\u{AD}b",
            "a\u{85}b",
            "x\u{7f}",
            &"x".repeat(256),
        ] {
            let e = FileName::parse(bad).unwrap_err();
            assert_eq!(e.kind, "file name");
        }
        for good in ["sales.csv", "売上.csv", "a b.txt", "x..y", &"x".repeat(255)] {
            assert!(FileName::parse(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn escaped_names_are_safe_names() {
        assert_eq!(escape_name("sales.csv"), "sales.csv");
        assert_eq!(escape_name("-rf"), "\\u{2d}rf");
        assert_eq!(escape_name("../x"), "\\u{2e}.\\u{2f}x");
        assert_eq!(escape_name("a\u{202E}b\nc"), "a\\u{202e}b\\u{a}c");
        assert_eq!(escape_text("a\\u{41}\u{1b}[2J"), "a\\\\u{41}\\u{1b}[2J");
        for raw in [
            "",
            ".",
            "..",
            "-",
            "a\0b",
            &"\u{202E}".repeat(200),
            "/etc/passwd",
        ] {
            let e = escape_name(raw);
            assert!(e.len() <= 255, "{raw:?}");
            assert!(
                !e.chars().any(unsafe_char) && !e.contains('/'),
                "{raw:?} -> {e:?}"
            );
        }
    }

    #[test]
    fn metadata() {
        let m = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(check_meta(&m(&[("batch_no", "7"), ("ORDER", "売上 2026")])).is_ok());
        for bad in [
            m(&[("batch", "1"), ("BATCH", "2")]),
            m(&[("a-b", "1")]),
            m(&[("", "1")]),
            m(&[("k", "line\nHAKOBU_X=1")]),
            m(&[("k", "\u{202E}")]),
            m(&[("k", &"v".repeat(META_MAX_VALUE + 1))]),
            (0..=META_MAX_KEYS)
                .map(|i| (format!("k{i}"), "v".to_string()))
                .collect(),
        ] {
            assert!(check_meta(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn transfer_ids() {
        assert!(TransferId::parse("0190f6c4-1234-7000-8000-0123456789ab").is_ok());
        assert!(TransferId::parse("01ARZ3NDEKTSV4RRFFQ69G5FAV").is_ok());
        for bad in ["../../etc", "short", "a_b_c_d_e_f_g", &"a".repeat(65)] {
            assert!(TransferId::parse(bad).is_err(), "{bad:?} accepted");
        }
        let fresh = TransferId::new();
        assert_eq!(TransferId::parse(&fresh).unwrap(), fresh);
        let node = NodeName::parse("beta").unwrap();
        assert_eq!(format!("[{node:<6}]"), "[beta  ]", "widths pad");
    }

    #[test]
    fn node_names_and_file_ids() {
        for good in ["beta", "tokyo-db1", "DAILY_SALES", "a.b", &"n".repeat(50)] {
            assert!(NodeName::parse(good).is_ok(), "{good:?}");
            assert!(FileId::parse(good).is_ok(), "{good:?}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"n".repeat(51)] {
            assert!(NodeName::parse(bad).is_err(), "{bad:?}");
            assert!(FileId::parse(bad).is_err(), "{bad:?}");
        }
        let e = NodeName::parse("a/b").unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"a/b\" is not a valid node name: 1-50 characters from A-Z a-z 0-9 _ . -"
        );
    }
}
