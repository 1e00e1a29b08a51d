//! The ledgers in-process, on a real SQLite file: every status change the
//! sender and receiver make, and a state database written by an earlier
//! release (`tests/fixtures/`), opened and migrated.

use std::path::PathBuf;

use super::*;
use crate::domain::{FileId, NodeName, TransferId};
use crate::wire::Receipt;

fn open() -> (tempfile::TempDir, Store) {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(&d.path().join("state.db")).unwrap();
    (d, store)
}

fn transfer(peer: &str, size: u64, status: Status) -> Transfer {
    Transfer::begin(
        TransferId::new(),
        NodeName::parse(peer).unwrap(),
        FileId::parse("sales").unwrap(),
        "a.csv",
        (size, 65536),
        status,
    )
}

fn hook(exit: i32, tail: &str) -> HookRun {
    HookRun {
        exit: Some(exit),
        ms: 5,
        tail: tail.into(),
        attempts: 1,
    }
}

#[tokio::test]
async fn a_final_status_is_never_overwritten() {
    let (_d, store) = open();
    let rx = store.receiving();
    let t = transfer("alpha", 10, Status::Receiving);
    let key = (&t.transfer_id, &t.peer);
    assert!(rx.insert(&ReceiveRow::new(t.clone())).await.unwrap());
    let first = (ErrorCode::Sha256Mismatch, "first");
    rx.fail(key, Status::ReceiveFailed, first).await.unwrap();
    // A later chunk of the same transfer fails it again for another reason.
    let second = (ErrorCode::InconsistentChunk, "second");
    rx.fail(key, Status::ReceiveFailed, second).await.unwrap();
    let got = rx.get(&t.transfer_id).await.unwrap().unwrap();
    assert_eq!(got.status, Status::ReceiveFailed);
    assert_eq!(got.error_code.as_deref(), Some("sha256_mismatch"));
    assert_eq!(got.error.as_deref(), Some("first"));
}

#[tokio::test]
async fn a_received_transfer_moves_through_placing_to_its_hook() {
    let (_d, store) = open();
    let rx = store.receiving();
    // Two chunks of 64 KiB; the digest comes with the last.
    let t = transfer("alpha", 100_000, Status::Receiving);
    let (tid, peer) = (t.transfer_id.clone(), t.peer.clone());
    let key = (&tid, &peer);
    rx.insert(&ReceiveRow::new(t)).await.unwrap();
    let one = rx.add_chunks(vec![(tid.clone(), 1, 0)]).await.unwrap();
    assert_eq!(one, vec![false], "one chunk of two");
    rx.set_trailer(
        key,
        &"a".repeat(64),
        "2026-01-01T00:00:00Z",
        &Default::default(),
    )
    .await
    .unwrap();
    // A redelivered chunk counts once.
    let two = rx
        .add_chunks(vec![(tid.clone(), 1, 0), (tid.clone(), 0, 0)])
        .await
        .unwrap();
    assert_eq!(two, vec![false, true]);
    let row = rx.get(&tid).await.unwrap().unwrap();
    assert!(
        row.complete(),
        "the recovery's test agrees with the commit's"
    );
    assert_eq!(row.chunks_have, 2);
    // The inode is recorded with `placing`, before the name appears.
    let target = PathBuf::from("/in/a.csv");
    let placing = Placing {
        transfer_id: tid.clone(),
        peer: peer.clone(),
        target: target.clone(),
        inode: 42,
        converted: None,
    };
    rx.placing(vec![placing]).await.unwrap();
    let got = rx.get(&tid).await.unwrap().unwrap();
    assert_eq!(got.status, Status::Placing);
    assert_eq!(
        (got.inode, got.path.as_deref()),
        (Some(42), Some(target.as_path()))
    );
    // Placed: the hook is next; a chunk arriving now leaves no row.
    rx.placed(vec![(tid.clone(), peer.clone(), Status::HookRunning)])
        .await
        .unwrap();
    assert_eq!(
        rx.add_chunks(vec![(tid.clone(), 0, 0)]).await.unwrap(),
        vec![true]
    );
    let failed = Some((
        ErrorCode::HookFailed,
        "hook x exited with code 3".to_string(),
    ));
    let done = rx.finish_hook(key, hook(3, "boom"), Status::HookFailed, failed);
    assert!(done.await.unwrap());
    // Only a running hook finishes: a second report changes nothing.
    let again = rx.finish_hook(key, hook(0, ""), Status::Received, None);
    assert!(!again.await.unwrap());
    let got = rx.get(&tid).await.unwrap().unwrap();
    assert_eq!(got.status, Status::HookFailed);
    assert_eq!(
        (got.hook_exit, got.hook_tail.as_deref()),
        (Some(3), Some("boom"))
    );
    assert_eq!(got.error_code.as_deref(), Some("hook_failed"));
    assert!(got.finished_at.is_some());
    assert!(rx.claim_failure_hook(key).await.unwrap());
    assert!(
        !rx.claim_failure_hook(key).await.unwrap(),
        "the failure hook runs once"
    );
}

#[tokio::test]
async fn a_failed_placement_forgets_the_placement_it_recorded() {
    let (_d, store) = open();
    let rx = store.receiving();
    let t = transfer("alpha", 10, Status::Receiving);
    let (tid, peer) = (t.transfer_id.clone(), t.peer.clone());
    rx.insert(&ReceiveRow::new(t)).await.unwrap();
    let placing = Placing {
        transfer_id: tid.clone(),
        peer: peer.clone(),
        target: PathBuf::from("/in/a.csv"),
        inode: 7,
        converted: None,
    };
    rx.placing(vec![placing]).await.unwrap();
    rx.placing_failed((&tid, &peer), (ErrorCode::FileExists, "taken"))
        .await
        .unwrap();
    let got = rx.get(&tid).await.unwrap().unwrap();
    assert_eq!(got.status, Status::ReceiveFailed);
    assert_eq!((got.inode, got.path.as_deref()), (None, None));
    assert_eq!(got.error_code.as_deref(), Some("file_exists"));
    let unfinished = rx.unfinished().await.unwrap();
    assert_eq!(unfinished.len(), 1, "its receipt is still to be sent");
    rx.set_receipt_sent((&tid, &peer), 1).await.unwrap();
    assert!(rx.unfinished().await.unwrap().is_empty());
}

fn receipt_for(t: &Transfer, file_id: &str, ok: bool) -> Receipt {
    Receipt {
        transfer_id: t.transfer_id.clone(),
        file_id: FileId::parse(file_id).unwrap(),
        from: t.peer.clone(),
        to: NodeName::parse("alpha").unwrap(),
        ok,
        error_code: None,
        error: None,
        path: Some("/in/a.csv".into()),
        hook_exit: Some(0),
        finished_at: "2026-11-25T00:00:00Z".into(),
        attempt: 1,
    }
}

#[tokio::test]
async fn a_receipt_settles_only_its_own_transfer_and_file_id() {
    let (_d, store) = open();
    let tx = store.sending();
    let t = awaiting_receipt(&tx).await;
    let key = (&t.transfer_id, &t.peer);
    let row = tx.get(key).await.unwrap().unwrap();
    assert_eq!((row.status, row.progress), (Status::AwaitingReceipt, 10));
    let wrong_profile = receipt_for(&t, "orders", true);
    assert!(
        !tx.record_receipt(&wrong_profile, Status::Sent)
            .await
            .unwrap()
    );
    let receipt = receipt_for(&t, "sales", true);
    // No sender hook: the receipt ends the transfer.
    assert!(tx.record_receipt(&receipt, Status::Sent).await.unwrap());
    let got = tx.get(key).await.unwrap().unwrap();
    assert_eq!(got.status, Status::Sent);
    assert!(got.delivered && got.finished_at.is_some());
    assert_eq!(got.remote_path.as_deref(), Some("/in/a.csv"));
    // A duplicate is recognised as one.
    assert!(!tx.record_receipt(&receipt, Status::Sent).await.unwrap());
}

#[tokio::test]
async fn queued_transfers_are_taken_once_and_moves_are_recorded() {
    let (_d, store) = open();
    let tx = store.sending();
    let (a, b) = (
        transfer("beta", 1, Status::Queued),
        transfer("gamma", 1, Status::Queued),
    );
    tx.insert_all(vec![
        SendRow::new(a.clone(), "/spool/a".into()),
        SendRow::new(b.clone(), "/spool/b".into()),
    ])
    .await
    .unwrap();
    assert_eq!(tx.in_status(Status::Queued).await.unwrap().len(), 2);
    let key = (&a.transfer_id, &a.peer);
    assert!(
        tx.advance(key, Status::Queued, Status::Sending)
            .await
            .unwrap()
    );
    assert!(
        !tx.advance(key, Status::Queued, Status::Sending)
            .await
            .unwrap()
    );
    assert_eq!(tx.unfinished().await.unwrap().len(), 2);
    tx.moved(&a.transfer_id, std::path::Path::new("/sent/a.csv"))
        .await
        .unwrap();
    let row = tx.get(key).await.unwrap().unwrap();
    assert_eq!(row.path, PathBuf::from("/sent/a.csv"));
    let history = store.history(10).await.unwrap();
    assert_eq!(history.len(), 2);
    assert!(history.iter().all(|e| e.direction() == Direction::Send));
}

#[test]
fn calls_from_a_plain_thread_wait_for_their_result() {
    let (_d, store) = open();
    let t = transfer("beta", 1, Status::Queued);
    let rows = vec![SendRow::new(t.clone(), "/spool/a".into())];
    store.sending().insert_all(rows).wait().unwrap();
    let got = store.sending().rows_of(&t.transfer_id).wait().unwrap();
    assert_eq!(got.len(), 1);
}

/// The state database of release 0.1 (commit 232e341), made by running
/// that release: sent, received, failed, hook failed, hook interrupted,
/// queued, awaiting a receipt from a node that never answered, and a large
/// transfer cut off mid-way (1,223 chunk rows).
#[tokio::test]
async fn a_database_from_release_0_1_opens_and_every_transfer_is_found() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("history.sqlite");
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/state-232e341.sqlite"
    );
    std::fs::copy(fixture, &path).unwrap();
    let store = Store::open(&path).unwrap();
    let history = store.history(100).await.unwrap();
    assert_eq!(history.len(), 18, "every row of the old database");
    let count = |dir: Direction, status: Status| {
        history
            .iter()
            .filter(|e| e.direction() == dir && e.transfer().status == status)
            .count()
    };
    assert_eq!(count(Direction::Send, Status::Sent), 4);
    assert_eq!(count(Direction::Send, Status::SendFailed), 3);
    assert_eq!(count(Direction::Send, Status::AwaitingReceipt), 1);
    assert_eq!(count(Direction::Send, Status::Queued), 1);
    assert_eq!(count(Direction::Send, Status::Sending), 1);
    assert_eq!(count(Direction::Receive, Status::Received), 4);
    assert_eq!(count(Direction::Receive, Status::ReceiveFailed), 1);
    assert_eq!(count(Direction::Receive, Status::HookFailed), 1);
    assert_eq!(count(Direction::Receive, Status::HookInterrupted), 1);
    assert_eq!(count(Direction::Receive, Status::Receiving), 1);
    // What recovery reads: the cut-off transfer, on both sides, and the
    // queued and awaiting rows.
    let receiving = store.receiving().unfinished().await.unwrap();
    assert_eq!(receiving.len(), 1);
    assert_eq!(receiving[0].chunks_have, 1223);
    assert!(!receiving[0].complete());
    assert_eq!(store.sending().unfinished().await.unwrap().len(), 3);
    let queued = store.sending().in_status(Status::Queued).await.unwrap();
    assert_eq!(queued[0].meta.get("k").map(String::as_str), Some("v"));
    // Every transfer id is found by `hakobu rerun`'s lookup.
    for e in &history {
        let found = store.find(&e.transfer().transfer_id).await.unwrap();
        assert!(!found.is_empty());
    }
    let v: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
}

/// A send profile's `retry:` in the ledgers: a failure receipt of try 1
/// queues try 2 (due after the backoff), an old receipt settles nothing,
/// and the receiver restarts its failed row only for a later try.
#[tokio::test]
async fn a_retry_is_the_next_try_of_the_same_row_on_both_sides() {
    use std::time::Duration;
    let (_d, store) = open();
    let tx = store.sending();
    let t = awaiting_receipt(&tx).await;
    let key = (&t.transfer_id, &t.peer);
    let mut failed = receipt_for(&t, "sales", false);
    failed.error_code = Some("disk_full".into());
    // Try 1 waited past its receipt_timeout before the receipt came.
    assert!(tx.time_out_receipt(key, 1, "late").await.unwrap());
    // Tries used up (max 1): no retry.
    assert!(!tx.retry(&failed, 1, Duration::ZERO).await.unwrap());
    assert!(
        tx.retry(&failed, 3, Duration::from_secs(3600))
            .await
            .unwrap()
    );
    let row = tx.get(key).await.unwrap().unwrap();
    assert_eq!((row.status, row.attempt), (Status::Queued, 2));
    assert_eq!(row.error_code.as_deref(), Some("disk_full"));
    assert_eq!(row.receipt_timeout_at, None, "try 2 may time out again");
    assert!(tx.queued_due(10).await.unwrap().is_empty(), "not due yet");
    // The same receipt again (redelivered) neither retries nor settles.
    assert!(!tx.retry(&failed, 3, Duration::ZERO).await.unwrap());
    tx.advance(key, Status::Queued, Status::Sending)
        .await
        .unwrap();
    assert!(
        !tx.record_receipt(&failed, Status::SendFailed)
            .await
            .unwrap()
    );
    let mut second = receipt_for(&t, "sales", true);
    second.attempt = 2;
    assert!(tx.record_receipt(&second, Status::Sent).await.unwrap());

    let rx = store.receiving();
    let mut r = transfer("alpha", 10, Status::Receiving);
    rx.insert(&ReceiveRow::new(r.clone())).await.unwrap();
    let rkey = (&r.transfer_id, &r.peer);
    rx.fail(rkey, Status::ReceiveFailed, (ErrorCode::DiskFull, "full"))
        .await
        .unwrap();
    rx.set_receipt_sent(rkey, 1).await.unwrap();
    // Not a later try: nothing changes.
    assert!(!rx.restart(&ReceiveRow::new(r.clone())).await.unwrap());
    r.attempt = 2;
    assert!(rx.restart(&ReceiveRow::new(r.clone())).await.unwrap());
    let got = rx.get(&r.transfer_id).await.unwrap().unwrap();
    assert_eq!((got.status, got.attempt), (Status::Receiving, 2));
    assert!(!got.receipt_sent && got.error_code.is_none() && got.chunks_have == 0);
    // The earlier try's receipt, recorded late, leaves the new try's row be.
    rx.set_receipt_sent(rkey, 1).await.unwrap();
    assert!(!rx.get(&r.transfer_id).await.unwrap().unwrap().receipt_sent);
}

/// A transfer to beta of 10 bytes, recorded and published: it awaits its
/// receipt.
async fn awaiting_receipt(tx: &SendLedger) -> Transfer {
    let t = transfer("beta", 10, Status::Sending);
    tx.insert_all(vec![SendRow::new(t.clone(), "/spool/x".into())])
        .await
        .unwrap();
    tx.published((&t.transfer_id, &t.peer), &"b".repeat(64), (1, 0))
        .await
        .unwrap();
    t
}

/// The refiller's read: rows still to publish (`sending`) of one file id,
/// oldest first, at most the limit; and those of file ids no longer
/// configured. Rows in other statuses are not among them.
#[tokio::test]
async fn rows_to_publish_are_read_oldest_first_by_file_id() {
    let (_d, store) = open();
    let tx = store.sending();
    let mut ids = Vec::new();
    for (file_id, status) in [
        ("sales", Status::Sending),
        ("orders", Status::Sending),
        ("sales", Status::AwaitingReceipt),
        ("sales", Status::Sending),
        ("gone", Status::Sending),
    ] {
        let mut t = transfer("beta", 1, status);
        t.file_id = FileId::parse(file_id).unwrap();
        ids.push(t.transfer_id.clone());
        tx.insert_all(vec![SendRow::new(t, "/spool/a".into())])
            .await
            .unwrap();
    }
    let sales = Some(FileId::parse("sales").unwrap());
    let known = |names: &[&str]| names.iter().map(|n| FileId::parse(n).unwrap()).collect();
    let got = |rows: Vec<SendRow>| -> Vec<TransferId> {
        rows.into_iter().map(|r| r.transfer_id.clone()).collect()
    };
    let all = tx.to_publish(sales.clone(), vec![], 10).await.unwrap();
    assert_eq!(got(all), vec![ids[0].clone(), ids[3].clone()]);
    let first = tx.to_publish(sales, vec![], 1).await.unwrap();
    assert_eq!(got(first), vec![ids[0].clone()]);
    let unknown = tx
        .to_publish(None, known(&["sales", "orders"]), 10)
        .await
        .unwrap();
    assert_eq!(got(unknown), vec![ids[4].clone()]);
}
