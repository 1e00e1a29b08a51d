//! The state database's schema and its migrations. `user_version` says how
//! many migrations a database has had; opening one applies the rest, each
//! in a transaction with the version it reaches, so a crash leaves either
//! the old version or the new one. A database from a newer hakobu is
//! refused rather than misread.

use rusqlite::{Connection, Transaction, params};

use super::StoreError;

/// Migration `i` takes a database from version `i` to `i + 1`.
const MIGRATIONS: &[fn(&Transaction<'_>) -> rusqlite::Result<()>] = &[
    first_schema,
    checked_names,
    send_requests,
    retries,
    conversion,
    wire_bytes,
    super::events::migration,
    parents,
    metrics_totals,
    lean_indexes,
    receipt_timeouts,
    publish_backlog,
    waiting_completions,
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
    for (from, step) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        let tx = conn.transaction()?;
        step(&tx)?;
        tx.pragma_update(None, "user_version", from as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// 1: the schema of release 0.1. A database at version 0 is new, or was
/// made by a build from before `user_version` was kept, whose table lacks
/// the columns added with it: they are added, and the chunk count taken
/// from the chunk rows.
fn first_schema(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
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
         CREATE TABLE IF NOT EXISTS chunks (
            transfer_id TEXT NOT NULL, idx INTEGER NOT NULL,
            PRIMARY KEY (transfer_id, idx)) WITHOUT ROWID;",
    )?;
    let has = |column: &str| -> rusqlite::Result<bool> {
        tx.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('transfers') WHERE name = ?1",
            params![column],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
    };
    if !has("chunks_have")? {
        tx.execute_batch(
            "ALTER TABLE transfers ADD COLUMN chunks_have INTEGER NOT NULL DEFAULT 0;
             UPDATE transfers SET chunks_have =
                (SELECT COUNT(*) FROM chunks WHERE chunks.transfer_id = transfers.transfer_id)
              WHERE direction = 'receive';",
        )?;
    }
    if !has("touched_at")? {
        tx.execute_batch(
            "ALTER TABLE transfers ADD COLUMN touched_at INTEGER NOT NULL DEFAULT 0;
             UPDATE transfers SET touched_at = CAST(strftime('%s', 'now') AS INTEGER);",
        )?;
    }
    if !has("seq")? {
        tx.execute_batch(
            "ALTER TABLE transfers ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
             UPDATE transfers SET seq = rowid;",
        )?;
    }
    tx.execute_batch(
        "CREATE INDEX IF NOT EXISTS transfers_status ON transfers(status);
         CREATE INDEX IF NOT EXISTS transfers_seq ON transfers(seq);",
    )
}

/// 2: rows are read back as checked names. Release 0.1 recorded the file id
/// of an incoming transfer before it refused it, so a rogue message could
/// leave a refused row (`unknown_file_id`) whose file id breaks the rule
/// (its `error` sentence still quotes it). Such a file id becomes `-`, and
/// the row counts as answered: no sender of ours sent it.
fn checked_names(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "UPDATE transfers SET file_id = '-', receipt_sent = 1, failure_hook = 1
          WHERE length(CAST(file_id AS BLOB)) NOT BETWEEN 1 AND 50
             OR file_id GLOB '*[^A-Za-z0-9_.-]*'
             OR file_id IN ('.', '..');",
    )
}

/// 3: send requests (`hakobu request`): the request a transfer was sent
/// for, and one row per request asked (`out`), served (`in`) or queued by
/// `hakobu send` without a path (`local`).
fn send_requests(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "ALTER TABLE transfers ADD COLUMN request_id TEXT;
         CREATE TABLE IF NOT EXISTS requests (
            direction TEXT NOT NULL, request_id TEXT NOT NULL, peer TEXT NOT NULL,
            file_id TEXT NOT NULL, status TEXT NOT NULL,
            ok INTEGER, error_code TEXT, error TEXT,
            transfer_ids TEXT NOT NULL DEFAULT '[]',
            created_at TEXT NOT NULL, answered_at TEXT,
            PRIMARY KEY (direction, request_id));",
    )
}

/// 4: retries. `attempt` numbers the tries of one transfer (a send
/// profile's `retry:` sends a transfer again under the same id);
/// `retry_at` is when a queued retry is due (unix milliseconds); `hook_attempts`
/// counts the runs of the hook whose exit `hook_exit` holds (a hook's
/// `retry:`).
fn retries(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "ALTER TABLE transfers ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
         ALTER TABLE transfers ADD COLUMN retry_at INTEGER;
         ALTER TABLE transfers ADD COLUMN hook_attempts INTEGER;",
    )
}

/// 5: code conversion: the digest of the file as placed (`convert:` on a
/// receive profile; the `sha256` column stays the one of the bytes as
/// received) and its line count.
fn conversion(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "ALTER TABLE transfers ADD COLUMN placed_sha256 TEXT;
         ALTER TABLE transfers ADD COLUMN records INTEGER;",
    )
}

/// 6 (issue 13, compression): the bytes of chunk bodies as they travelled
/// (compressed, sealed), beside the file's size: what the sender published,
/// what the receiver received.
fn wire_bytes(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch("ALTER TABLE transfers ADD COLUMN wire_bytes INTEGER NOT NULL DEFAULT 0;")
}

/// 8 (issue 14, the job flow): the transfer that started this one (a
/// hook's `hakobu send`, a done marker's `parent=`), on both sides' rows and
/// on requests (`hakobu send` without a path queues one), indexed so that
/// `hakobu history --chain` finds a transfer's children.
fn parents(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "ALTER TABLE transfers ADD COLUMN parent_id TEXT;
         CREATE INDEX IF NOT EXISTS transfers_parent ON transfers(parent_id);
         CREATE INDEX IF NOT EXISTS transfers_id ON transfers(transfer_id);
         ALTER TABLE requests ADD COLUMN parent_id TEXT;",
    )
}

/// 9 (issue 14, `/metrics`): settled transfers counted by side, file id
/// and status with their bytes, from an index alone (`store/figures.rs`),
/// so a scrape never reads the table itself.
fn metrics_totals(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE INDEX IF NOT EXISTS transfers_totals
            ON transfers(status, direction, file_id, size);",
    )
}

/// 10: fewer indexes for every status change and insert to keep up
/// (small files are a handful of each per file). `transfers_status` goes:
/// `transfers_totals` leads with the status and serves the same lookups.
/// `transfers_id` goes: a lookup by id names both directions and uses the
/// primary key (`direction IN ('receive', 'send') AND transfer_id = ?`).
/// `transfers_parent` keeps only rows that have a parent (most have none).
fn lean_indexes(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "DROP INDEX IF EXISTS transfers_status;
         DROP INDEX IF EXISTS transfers_id;
         DROP INDEX IF EXISTS transfers_parent;
         CREATE INDEX transfers_parent ON transfers(parent_id) WHERE parent_id IS NOT NULL;",
    )
}

/// 11 (issue 15, receivers gone for days): when a send row's
/// `receipt_timeout` ran out (unix seconds; NULL while it has not), set
/// before the failure hook runs so that it runs once, restarts included.
/// The sender's checker finds the rows still due through a partial index
/// that holds only the sending rows waiting for their receipt and not yet
/// timed out, by file id and the time they were published (`touched_at`).
fn receipt_timeouts(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "ALTER TABLE transfers ADD COLUMN receipt_timeout_at INTEGER;
         CREATE INDEX transfers_receipt_due ON transfers(file_id, touched_at)
            WHERE direction = 'send' AND status = 'awaiting_receipt'
              AND receipt_timeout_at IS NULL;",
    )
}

/// 12 (issue 15, memory bounded whatever the backlog): the sender
/// publishes a bounded number of transfers at once and takes the next ones
/// from the ledger; a partial index of the rows waiting to be published
/// (`sending`), by file id in the order they were recorded, finds them
/// without reading the rest (`SendLedger::to_publish`).
fn publish_backlog(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE INDEX transfers_to_publish ON transfers(file_id, seq)
            WHERE direction = 'send' AND status = 'sending';",
    )
}

/// 13 (issue 15): a complete transfer that finds every completion slot
/// taken waits in the ledger, still `receiving`; a partial index of the
/// receiving rows, in the order they were recorded, finds them a window
/// at a time without reading the rest or sorting
/// (`ReceiveLedger::completable`). It leads with the status and direction
/// its condition fixes: indexed by `seq` alone, SQLite preferred
/// `transfers_totals` and sorted every receiving row for each window.
fn waiting_completions(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE INDEX transfers_receiving ON transfers(status, direction, seq)
            WHERE direction = 'receive' AND status = 'receiving';",
    )
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

    /// A table as builds before `user_version` made it: the missing columns
    /// are added and the chunk count taken from the chunk rows.
    #[test]
    fn a_database_from_before_user_version_gets_its_missing_columns() {
        let d = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(d.path().join("db")).unwrap();
        conn.execute_batch(
            "CREATE TABLE transfers (
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
                PRIMARY KEY (direction, transfer_id, peer));
             CREATE TABLE chunks (transfer_id TEXT NOT NULL, idx INTEGER NOT NULL,
                PRIMARY KEY (transfer_id, idx)) WITHOUT ROWID;
             INSERT INTO transfers (direction, transfer_id, peer, file_id, file_name, size,
                chunk_size, status, started_at)
             VALUES ('receive', '0190f6c4-0000-7000-8000-000000000001', 'alpha', 'daily sales',
                'a.csv', 10, 65536, 'receiving', 'x');
             INSERT INTO chunks VALUES ('0190f6c4-0000-7000-8000-000000000001', 0),
                ('0190f6c4-0000-7000-8000-000000000001', 1);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let (have, seq, file_id): (i64, i64, String) = conn
            .query_row("SELECT chunks_have, seq, file_id FROM transfers", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((have, seq), (2, 1));
        assert_eq!(file_id, "-", "a file id that breaks the rule is replaced");
    }

    /// A database at version 6 (before the job flow) opens: its rows get
    /// an empty `parent_id`, requests too, and the column is indexed.
    #[test]
    fn a_database_at_version_6_gets_parent_ids() {
        let d = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(d.path().join("db")).unwrap();
        for (from, step) in MIGRATIONS.iter().enumerate().take(6) {
            let tx = conn.transaction().unwrap();
            step(&tx).unwrap();
            tx.pragma_update(None, "user_version", from as i64 + 1)
                .unwrap();
            tx.commit().unwrap();
        }
        conn.execute_batch(
            "INSERT INTO transfers (direction, transfer_id, peer, file_id, file_name, size,
                chunk_size, status, started_at)
             VALUES ('send', '0190f6c4-0000-7000-8000-000000000001', 'beta', 'SALES',
                'a.csv', 10, 65536, 'sent', 'x');",
        )
        .unwrap();
        let has_parent = |conn: &Connection, table: &str| -> bool {
            conn.query_row(
                "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = 'parent_id'",
                params![table],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
                > 0
        };
        assert!(!has_parent(&conn, "transfers"));
        migrate(&mut conn).unwrap();
        assert!(has_parent(&conn, "transfers") && has_parent(&conn, "requests"));
        let parent: Option<String> = conn
            .query_row("SELECT parent_id FROM transfers", [], |r| r.get(0))
            .unwrap();
        assert_eq!(parent, None, "an old row has no parent");
        let indexed: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'transfers_parent'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexed, 1);
    }

    /// The lookups the indexes of migration 10 are meant for find their
    /// rows through an index, not by reading the table: by id through the
    /// primary key, children through the partial `transfers_parent`, by
    /// status through `transfers_totals`.
    #[test]
    fn lookups_use_the_lean_indexes() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let plan = |sql: &str| -> String {
            let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let rows = st.query_map([], |r| r.get::<_, String>(3)).unwrap();
            rows.map(|r| r.unwrap()).collect::<Vec<_>>().join("; ")
        };
        let id = "'0190f6c4-0000-7000-8000-000000000001'";
        let by_id = plan(&format!(
            "SELECT * FROM transfers WHERE {}",
            super::super::BY_ID.replace("?1", id)
        ));
        assert!(
            by_id.contains("USING INDEX sqlite_autoindex_transfers_1"),
            "{by_id}"
        );
        let children = plan(&format!("SELECT * FROM transfers WHERE parent_id = {id}"));
        assert!(
            children.contains("USING INDEX transfers_parent"),
            "{children}"
        );
        let by_status = plan("SELECT COUNT(*) FROM transfers WHERE status = 'sending'");
        assert!(by_status.contains("transfers_totals"), "{by_status}");
        let names: Vec<String> = conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'transfers'",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        for gone in ["transfers_status", "transfers_id"] {
            assert!(!names.iter().any(|n| n == gone), "{gone} in {names:?}");
        }
    }

    /// The query plan of `SELECT transfer_id FROM transfers {condition}`
    /// with `params` bound, its steps joined with "; ".
    fn plan_of(condition: &str, params: impl rusqlite::Params) -> String {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let sql = format!("EXPLAIN QUERY PLAN SELECT transfer_id FROM transfers {condition}");
        let mut st = conn.prepare(&sql).unwrap();
        let plan: Vec<String> = st
            .query_map(params, |r| r.get::<_, String>(3))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        plan.join("; ")
    }

    /// The sender's checker finds rows past their `receipt_timeout` through
    /// the partial index of migration 11, not by reading the table.
    #[test]
    fn receipts_due_use_their_partial_index() {
        let plan = plan_of(
            super::super::send_ledger::RECEIPT_DUE,
            params!["SALES", 0, 10],
        );
        assert!(plan.contains("USING INDEX transfers_receipt_due"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
    }

    /// The sender's refiller finds the rows waiting to be published
    /// through the partial index of migration 12, oldest first, without a
    /// sort and without reading the table's other rows.
    #[test]
    fn rows_to_publish_use_their_partial_index() {
        let plan = plan_of(super::super::send_ledger::TO_PUBLISH, params!["SALES", 10]);
        assert!(plan.contains("USING INDEX transfers_to_publish"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
    }

    /// The receiver finds the complete transfers waiting for a completion
    /// slot through the partial index of migration 13, oldest first,
    /// without a sort and without reading the table's other rows.
    #[test]
    fn waiting_completions_use_their_partial_index() {
        let plan = plan_of(super::super::receive_ledger::RECEIVING, params![0, 256]);
        assert!(plan.contains("USING INDEX transfers_receiving"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
    }
}
