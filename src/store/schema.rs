//! The state database's schema and its migrations. `user_version` says how
//! many migrations a database has had; opening one applies the rest, each
//! in a transaction with the version it reaches, so a crash leaves either
//! the old version or the new one. A database from a newer hakobu is
//! refused rather than misread.

use rusqlite::Connection;

use super::StoreError;

/// Migration `i` takes a database from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema (release 0.1). `IF NOT EXISTS`: databases made
    // before `user_version` was kept have these tables at version 0.
    "CREATE TABLE IF NOT EXISTS transfers (
        direction TEXT NOT NULL, transfer_id TEXT NOT NULL, peer TEXT NOT NULL,
        file_id TEXT NOT NULL, file_name TEXT NOT NULL, size INTEGER NOT NULL,
        sha256 TEXT, chunk_size INTEGER NOT NULL, status TEXT NOT NULL,
        error_code TEXT, error TEXT, path TEXT, remote_path TEXT, remote_hook_exit INTEGER,
        meta TEXT NOT NULL DEFAULT '{}', started_at TEXT NOT NULL, finished_at TEXT,
        hook_exit INTEGER, hook_ms INTEGER, hook_tail TEXT,
        receipt_sent INTEGER NOT NULL DEFAULT 0,
        delivered INTEGER NOT NULL DEFAULT 0, inode INTEGER,
        failure_hook INTEGER NOT NULL DEFAULT 0,
        progress INTEGER NOT NULL DEFAULT 0,
        chunks_have INTEGER NOT NULL DEFAULT 0,
        touched_at INTEGER NOT NULL DEFAULT 0,
        seq INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (direction, transfer_id, peer));
     CREATE INDEX IF NOT EXISTS transfers_status ON transfers(status);
     CREATE INDEX IF NOT EXISTS transfers_seq ON transfers(seq);
     CREATE TABLE IF NOT EXISTS chunks (
        transfer_id TEXT NOT NULL, idx INTEGER NOT NULL,
        PRIMARY KEY (transfer_id, idx)) WITHOUT ROWID;",
];

/// The version this hakobu writes.
pub const LATEST: i64 = MIGRATIONS.len() as i64;

/// Brings `conn`'s database to [`LATEST`]: reads `user_version`, applies
/// the migrations it lacks, and writes the version with each.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > LATEST {
        return Err(StoreError::TooNew {
            found,
            known: LATEST,
        });
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", from as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_database_reaches_the_latest_version_and_a_newer_one_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(d.path().join("db")).unwrap();
        migrate(&mut conn).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, LATEST);
        // Opening again changes nothing.
        migrate(&mut conn).unwrap();
        conn.pragma_update(None, "user_version", LATEST + 1)
            .unwrap();
        let e = migrate(&mut conn).unwrap_err();
        assert!(matches!(e, StoreError::TooNew { .. }), "{e}");
        assert!(e.to_string().contains("newer hakobu"), "{e}");
    }
}
