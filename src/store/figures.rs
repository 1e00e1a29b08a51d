//! What `/metrics` reads of the state database at each scrape: settled
//! transfers counted by side, file id and status (with their bytes), the
//! transfers under way, and the oldest file waiting for its receipt. Each
//! statement reads an index only (`transfers_totals`, whose first column is
//! the status), never the whole table.

use super::row::Status;
use super::{Cached, Call, Store};

/// Settled transfers of one side, file id and final status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Total {
    pub direction: String,
    pub file_id: String,
    pub status: String,
    pub count: u64,
    /// The sum of their files' sizes.
    pub bytes: u64,
}

/// Transfers of one side in one status that is not final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    pub direction: String,
    pub status: String,
    pub count: u64,
    /// The sum of their files' sizes.
    pub bytes: u64,
    /// The bytes of them sent or received so far.
    pub progress: u64,
}

/// One scrape's figures from the database.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub totals: Vec<Total>,
    pub in_flight: Vec<InFlight>,
    /// The `started_at` (RFC 3339) of the oldest sent file waiting for its
    /// receipt, if any.
    pub oldest_awaiting_receipt: Option<String>,
}

const TOTALS: &str = "SELECT direction, file_id, status, COUNT(*), COALESCE(SUM(size), 0)
     FROM transfers WHERE status IN (SELECT value FROM json_each(?1))
     GROUP BY direction, file_id, status";
const IN_FLIGHT: &str = "SELECT direction, status, COUNT(*), COALESCE(SUM(size), 0),
        COALESCE(SUM(MIN(progress, size)), 0)
     FROM transfers WHERE status IN (SELECT value FROM json_each(?1))
     GROUP BY direction, status";
const OLDEST: &str = "SELECT MIN(started_at) FROM transfers
     WHERE status = ?1 AND direction = 'send'";

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Store {
    /// The figures of one scrape, read in one call.
    pub fn figures(&self) -> Call<Figures> {
        self.deferred().call(|conn| {
            let totals = conn.all(TOTALS, [Status::set(true)], |r| {
                Ok(Total {
                    direction: r.get(0)?,
                    file_id: r.get(1)?,
                    status: r.get(2)?,
                    count: count(r.get(3)?),
                    bytes: count(r.get(4)?),
                })
            })?;
            let in_flight = conn.all(IN_FLIGHT, [Status::set(false)], |r| {
                Ok(InFlight {
                    direction: r.get(0)?,
                    status: r.get(1)?,
                    count: count(r.get(2)?),
                    bytes: count(r.get(3)?),
                    progress: count(r.get(4)?),
                })
            })?;
            let oldest_awaiting_receipt =
                conn.one(OLDEST, [Status::AwaitingReceipt.as_str()], |r| r.get(0))?;
            Ok(Figures {
                totals,
                in_flight,
                oldest_awaiting_receipt,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every statement of a scrape reads through an index: none scans the
    /// table (`SCAN transfers` without an index in its plan).
    #[test]
    fn a_scrape_reads_indexes_only() {
        let d = tempfile::tempdir().unwrap();
        let mut conn = rusqlite::Connection::open(d.path().join("db")).unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        for (sql, param) in [
            (TOTALS, Status::set(true)),
            (IN_FLIGHT, Status::set(false)),
            (OLDEST, "awaiting_receipt".to_string()),
        ] {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let plan: Vec<String> = stmt
                .query_map([param], |r| r.get::<_, String>(3))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            for step in &plan {
                assert!(
                    !step.contains("transfers") || step.contains("INDEX"),
                    "{sql}: {plan:?}"
                );
            }
        }
    }
}
