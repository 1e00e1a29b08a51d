//! The spool's files and bytes, by a bounded scan: at most
//! [`MAX_ENTRIES`] directory entries are looked at per scrape; a spool
//! with more is reported as far as scanned, and as truncated.

use std::path::Path;

/// Directory entries looked at, at most, in one scan.
pub const MAX_ENTRIES: usize = 20_000;

/// What one scan saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolFigures {
    pub files: u64,
    pub bytes: u64,
    /// The scan stopped at [`MAX_ENTRIES`].
    pub truncated: bool,
}

/// Scans `spool` (`<file_id>/<entry>`, an entry a file or a directory of
/// files in the older layout) for regular files, hidden ones (copies in
/// progress) left out. Blocking: call it off the async workers. A spool
/// that does not exist yet is empty.
pub fn scan(spool: &Path, max_entries: usize) -> SpoolFigures {
    let mut f = SpoolFigures::default();
    let mut seen = 0usize;
    let mut stack = vec![(spool.to_path_buf(), 0u8)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            seen += 1;
            if seen > max_entries {
                f.truncated = true;
                return f;
            }
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() && depth < 2 {
                stack.push((e.path(), depth + 1));
            } else if meta.is_file() && depth > 0 {
                f.files += 1;
                f.bytes += meta.len();
            }
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_spooled_files_of_both_layouts_and_stops_at_the_bound() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("spool");
        assert_eq!(scan(&s, 10), SpoolFigures::default());
        std::fs::create_dir_all(s.join("DATA/tid-old")).unwrap();
        std::fs::write(s.join("DATA/tid.a.csv"), b"12345").unwrap();
        std::fs::write(s.join("DATA/.tid.b.csv"), b"copying").unwrap();
        std::fs::write(s.join("DATA/tid-old/long.csv"), b"123").unwrap();
        let f = scan(&s, 10);
        assert_eq!((f.files, f.bytes, f.truncated), (2, 8, false));
        assert!(scan(&s, 2).truncated);
    }
}
