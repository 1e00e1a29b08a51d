//! The job flow across servers (issue 14): a transfer started from inside a
//! hook records the transfer that ran the hook as its parent (`parent_id`),
//! and the chunks carry it, so every node that sees the child knows its
//! parent. [`Store::chain`] gives the whole flow this node knows: from the
//! transfer asked for up the parents to the root, then down every child,
//! one [`Step`] per row, with what the receipts told of the receiving nodes.
//!
//! The parents in the database are input: the walk keeps a visited set
//! (a cycle ends it, and is reported), goes at most [`MAX_DEPTH`] levels up
//! or down, and reads at most [`MAX_ROWS`] rows (beyond: `truncated`).

use std::collections::HashSet;

use rusqlite::{Connection, params};
use serde::Serialize;

use super::history::Entry;
use super::row::{Direction, Status};
use super::{BY_ID, COLUMNS, Cached, Call, Store};
use crate::domain::{FileId, NodeName, TransferId};

/// Most levels walked up from the transfer asked for, and down from the root.
pub const MAX_DEPTH: usize = 64;
/// Most rows a chain reads.
pub const MAX_ROWS: usize = 10_000;

/// Whose record a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepView {
    /// A row of this node's state database.
    Local,
    /// The receiving node's outcome, as its receipt told this node's send row.
    Receipt,
    /// A parent this node knows only by its id: a transfer of `node`.
    Parent,
}

/// One step of a flow: a transfer from one node to another, as one record
/// sees it. Fields that record does not know are empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub transfer_id: TransferId,
    /// Levels below the root.
    pub depth: usize,
    pub view: StepView,
    /// The node whose record this is (for a `parent` step, where it ran).
    pub node: NodeName,
    pub from: Option<NodeName>,
    pub to: Option<NodeName>,
    /// The side of `node` the record is of.
    pub direction: Option<Direction>,
    pub file_id: Option<FileId>,
    pub file_name: Option<String>,
    pub status: Option<Status>,
    pub error_code: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub parent_id: Option<TransferId>,
}

/// A transfer's whole flow as this node knows it, steps in tree order
/// (each step before its children).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chain {
    /// The transfer asked for.
    pub transfer_id: TransferId,
    /// The first transfer of the flow this node knows of.
    pub root: TransferId,
    /// This node.
    pub node: NodeName,
    pub steps: Vec<Step>,
    /// The parents recorded here form a cycle (the walk stopped at it).
    pub cycle: bool,
    /// The flow is larger than [`MAX_DEPTH`] or [`MAX_ROWS`]: steps are missing.
    pub truncated: bool,
}

impl Chain {
    /// What a reader of the flow must know besides its steps (a cycle, a
    /// flow larger than one view), one sentence each: `hakobu history
    /// --chain` and the console say the same.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.cycle {
            notes.push("The recorded parents form a cycle; the flow is shown up to it.".into());
        }
        if self.truncated {
            notes.push(format!(
                "The flow is larger than one view shows ({MAX_DEPTH} levels, {MAX_ROWS} rows); ask for a transfer further down."
            ));
        }
        notes
    }
}

impl Store {
    /// The flow of `tid` as `node` (this node) knows it; `None` when no row
    /// here has that transfer id or names it as a parent.
    pub fn chain(&self, node: &NodeName, tid: &TransferId) -> Call<Option<Chain>> {
        let (node, tid) = (node.clone(), tid.clone());
        self.call(move |db| Walk::new(db, node).run(tid))
    }
}

struct Walk<'a> {
    db: &'a Connection,
    node: NodeName,
    rows_read: usize,
    truncated: bool,
    cycle: bool,
}

impl<'a> Walk<'a> {
    fn new(db: &'a Connection, node: NodeName) -> Walk<'a> {
        Walk {
            db,
            node,
            rows_read: 0,
            truncated: false,
            cycle: false,
        }
    }

    fn rows_of(&mut self, tid: &TransferId) -> rusqlite::Result<Vec<Entry>> {
        let rows = self.db.all(
            &format!("SELECT {COLUMNS} FROM transfers WHERE {BY_ID} ORDER BY direction DESC, peer"),
            params![tid],
            Entry::from_sql,
        )?;
        self.rows_read += rows.len();
        Ok(rows)
    }

    /// The transfers whose parent is `tid`, oldest first.
    fn children_of(&self, tid: &TransferId) -> rusqlite::Result<Vec<TransferId>> {
        self.db.all(
            "SELECT transfer_id FROM transfers WHERE parent_id = ?1
             GROUP BY transfer_id ORDER BY MIN(seq) LIMIT ?2",
            params![tid, MAX_ROWS as i64 + 1],
            |r| r.get(0),
        )
    }

    fn run(mut self, tid: TransferId) -> rusqlite::Result<Option<Chain>> {
        let rows = self.rows_of(&tid)?;
        if rows.is_empty() && self.children_of(&tid)?.is_empty() {
            return Ok(None);
        }
        let root = self.root(&tid, rows)?;
        let steps = self.down(&root)?;
        Ok(Some(Chain {
            transfer_id: tid,
            root,
            node: self.node,
            steps,
            cycle: self.cycle,
            truncated: self.truncated,
        }))
    }

    /// Up the parents from `tid` (whose rows are `rows`) to the first
    /// transfer this node knows of: one without a parent, a parent with no
    /// row here, or where a cycle or the depth limit stops the walk.
    fn root(&mut self, tid: &TransferId, mut rows: Vec<Entry>) -> rusqlite::Result<TransferId> {
        let mut seen = HashSet::from([tid.clone()]);
        let mut at = tid.clone();
        for _ in 0..MAX_DEPTH {
            let Some(parent) = rows.iter().find_map(|e| e.transfer().parent_id.clone()) else {
                return Ok(at);
            };
            if !seen.insert(parent.clone()) {
                self.cycle = true;
                return Ok(at);
            }
            rows = self.rows_of(&parent)?;
            at = parent;
            if rows.is_empty() || self.rows_read > MAX_ROWS {
                return Ok(at);
            }
        }
        self.truncated = true;
        Ok(at)
    }

    /// The steps of `root` and of everything below it, depth first.
    fn down(&mut self, root: &TransferId) -> rusqlite::Result<Vec<Step>> {
        let mut steps = Vec::new();
        let mut seen = HashSet::new();
        let mut stack = vec![(root.clone(), 0usize)];
        while let Some((tid, depth)) = stack.pop() {
            if !seen.insert(tid.clone()) {
                self.cycle = true;
                continue;
            }
            if self.rows_read > MAX_ROWS {
                self.truncated = true;
                break;
            }
            let rows = self.rows_of(&tid)?;
            let children = self.children_of(&tid)?;
            if rows.is_empty() {
                steps.push(self.parent_step(&tid, &children)?);
            }
            for e in &rows {
                steps.push(self.step(e, depth));
                steps.extend(receipt_step(e, depth, &self.node));
            }
            if depth + 1 > MAX_DEPTH {
                self.truncated |= !children.is_empty();
                continue;
            }
            // Reversed onto the stack: the oldest child comes out first.
            for child in children.into_iter().rev() {
                stack.push((child, depth + 1));
            }
        }
        Ok(steps)
    }

    fn step(&self, e: &Entry, depth: usize) -> Step {
        let t = e.transfer();
        let (from, to) = match e.direction() {
            Direction::Send => (self.node.clone(), t.peer.clone()),
            Direction::Receive => (t.peer.clone(), self.node.clone()),
        };
        Step {
            transfer_id: t.transfer_id.clone(),
            depth,
            view: StepView::Local,
            node: self.node.clone(),
            from: Some(from),
            to: Some(to),
            direction: Some(e.direction()),
            file_id: Some(t.file_id.clone()),
            file_name: Some(t.file_name.clone()),
            status: Some(t.status),
            error_code: t.error_code.clone(),
            started_at: Some(t.started_at.clone()),
            finished_at: t.finished_at.clone(),
            parent_id: t.parent_id.clone(),
        }
    }

    /// A transfer known here only as the parent of `children`: it ran on
    /// the node that sent them here, or on this one if they were sent from
    /// here.
    fn parent_step(&self, tid: &TransferId, children: &[TransferId]) -> rusqlite::Result<Step> {
        let sender: Option<NodeName> = match children.first() {
            Some(child) => self
                .db
                .all(
                    "SELECT peer FROM transfers WHERE transfer_id = ?1 AND direction = ?2 LIMIT 1",
                    params![child, Direction::Receive],
                    |r| r.get(0),
                )?
                .into_iter()
                .next(),
            None => None,
        };
        Ok(Step {
            transfer_id: tid.clone(),
            depth: 0,
            view: StepView::Parent,
            node: sender.unwrap_or_else(|| self.node.clone()),
            from: None,
            to: None,
            direction: None,
            file_id: None,
            file_name: None,
            status: None,
            error_code: None,
            started_at: None,
            finished_at: None,
            parent_id: None,
        })
    }
}

/// What a send row's receipt told of the receiving node: placed (and its
/// hook, if any, exited 0), its hook failed, or it refused the file. None
/// before a receipt arrived, and for a row that failed here.
fn receipt_step(e: &Entry, depth: usize, node: &NodeName) -> Option<Step> {
    let Entry::Send(r) = e else { return None };
    let status = if r.delivered {
        Status::Received
    } else if r.remote_hook_exit.is_some_and(|c| c != 0) {
        Status::HookFailed
    } else if r.remote_path.is_some() || r.remote_hook_exit.is_some() {
        Status::ReceiveFailed
    } else {
        return None;
    };
    Some(Step {
        transfer_id: r.transfer_id.clone(),
        depth,
        view: StepView::Receipt,
        node: r.peer.clone(),
        from: Some(node.clone()),
        to: Some(r.peer.clone()),
        direction: Some(Direction::Receive),
        file_id: Some(r.file_id.clone()),
        file_name: Some(r.file_name.clone()),
        status: Some(status),
        error_code: (!r.delivered).then(|| r.error_code.clone()).flatten(),
        started_at: None,
        finished_at: None,
        parent_id: r.parent_id.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ReceiveRow, SendRow, Transfer};

    fn t(tid: &TransferId, peer: &str, parent: Option<&TransferId>, status: Status) -> Transfer {
        let mut t = Transfer::begin(
            tid.clone(),
            NodeName::parse(peer).unwrap(),
            FileId::parse("F").unwrap(),
            "f.csv",
            (1, 65536),
            status,
        );
        t.parent_id = parent.cloned();
        t
    }

    fn node() -> NodeName {
        NodeName::parse("beta").unwrap()
    }

    /// beta received T1 from alpha; its hook sent T2 to gamma (delivered)
    /// and T3 to delta; T2's receipt names gamma's outcome.
    #[tokio::test]
    async fn a_flow_is_walked_up_to_its_root_and_down_to_every_child() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("db")).unwrap();
        let (t1, t2, t3) = (TransferId::new(), TransferId::new(), TransferId::new());
        let rx = store.receiving();
        let mut r1 = ReceiveRow::new(t(&t1, "alpha", None, Status::Received));
        r1.transfer.sha256 = Some("00".repeat(32));
        rx.insert(&r1).await.unwrap();
        let mut s2 = SendRow::new(t(&t2, "gamma", Some(&t1), Status::Sent), "/x".into());
        s2.transfer.file_id = FileId::parse("REPORT").unwrap();
        let s3 = SendRow::new(t(&t3, "delta", Some(&t1), Status::Sending), "/y".into());
        store.sending().insert_all(vec![s2, s3]).await.unwrap();
        store
            .call({
                let t2 = t2.clone();
                move |db| {
                    db.execute(
                        "UPDATE transfers SET delivered = 1, remote_path = '/in/r' WHERE transfer_id = ?1",
                        params![t2],
                    )
                }
            })
            .await
            .unwrap();
        for asked in [&t1, &t2, &t3] {
            let c = store.chain(&node(), asked).await.unwrap().unwrap();
            assert_eq!(c.root, t1, "from {asked}");
            let seen: Vec<(&TransferId, StepView, usize)> = c
                .steps
                .iter()
                .map(|s| (&s.transfer_id, s.view, s.depth))
                .collect();
            assert_eq!(
                seen,
                vec![
                    (&t1, StepView::Local, 0),
                    (&t2, StepView::Local, 1),
                    (&t2, StepView::Receipt, 1),
                    (&t3, StepView::Local, 1)
                ]
            );
            assert!(!c.cycle && !c.truncated);
        }
        let c = store.chain(&node(), &t2).await.unwrap().unwrap();
        let alpha = NodeName::parse("alpha").unwrap();
        assert_eq!(c.steps[0].from.as_ref(), Some(&alpha));
        assert_eq!(c.steps[0].to.as_ref(), Some(&node()));
        assert_eq!(c.steps[1].parent_id.as_ref(), Some(&t1));
        assert_eq!(c.steps[2].status, Some(Status::Received));
        assert_eq!(c.steps[2].node.as_str(), "gamma");
        assert!(
            store
                .chain(&node(), &TransferId::new())
                .await
                .unwrap()
                .is_none()
        );
    }

    /// Parents planted in a cycle, and a chain deeper than the limit: the
    /// walk ends, says why, and reads a bounded number of rows.
    #[tokio::test]
    async fn cycles_and_deep_chains_end() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("db")).unwrap();
        let (a, b) = (TransferId::new(), TransferId::new());
        let rows = vec![
            SendRow::new(t(&a, "gamma", Some(&b), Status::Sent), "/a".into()),
            SendRow::new(t(&b, "gamma", Some(&a), Status::Sent), "/b".into()),
        ];
        store.sending().insert_all(rows).await.unwrap();
        let c = store.chain(&node(), &a).await.unwrap().unwrap();
        assert!(c.cycle);
        assert_eq!(c.steps.len(), 2, "{:?}", c.steps);
        assert_eq!(c.notes().len(), 1);
        assert!(c.notes()[0].contains("cycle"), "{:?}", c.notes());
        let ids: Vec<TransferId> = (0..100).map(|_| TransferId::new()).collect();
        let rows = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let parent = i.checked_sub(1).map(|p| &ids[p]);
                SendRow::new(t(id, "gamma", parent, Status::Sent), "/c".into())
            })
            .collect();
        store.sending().insert_all(rows).await.unwrap();
        let c = store.chain(&node(), &ids[99]).await.unwrap().unwrap();
        assert!(c.truncated && !c.cycle);
        assert!(c.notes()[0].contains("64 levels"), "{:?}", c.notes());
        assert!(c.steps.len() <= MAX_DEPTH + 1, "{}", c.steps.len());
    }
}
