//! The middle of the flow, in-process and in seconds: agents started with
//! `Agent::start` on one runtime, a real embedded broker on port 0, real
//! files and hook processes in a temporary directory, no RabbitMQ. The
//! receiver's state machine and the sender's claim and recovery are driven
//! from ledger states written by hand, as a crash would leave them.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hakobu::agent::Agent;
use hakobu::broker::embedded::{Credentials, credentials, server};
use hakobu::config::Config;
use hakobu::domain::{FileId, NodeName, TransferId};
use hakobu::store::{Direction, Entry, Placing, ReceiveRow, SendRow, Status, Store, Transfer};
use sha2::{Digest, Sha256};

const WAIT: Duration = Duration::from_secs(30);

/// A temporary directory with an embedded broker, a recording hook, and the
/// configurations of `alpha` (sends `DATA` to beta) and `beta`.
struct World {
    dir: tempfile::TempDir,
    broker: server::Running,
    hook: PathBuf,
}

impl World {
    async fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let broker = server::start(
            "127.0.0.1:0",
            &dir.path().join("broker"),
            server::Limits::default(),
            false,
        )
        .await
        .unwrap();
        let hook = dir.path().join("hook.sh");
        let runs = dir.path().join("runs.log");
        fs::write(
            &hook,
            format!(
                "#!/bin/sh\necho \"$HAKOBU_TRANSFER_ID $HAKOBU_EVENT $HAKOBU_ERROR_CODE\" >> {}\n",
                runs.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
        World { dir, broker, hook }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn alpha(&self) -> Config {
        self.config(
            "alpha",
            &format!(
                "send:\n  - file_id: DATA\n    outbox: {}\n    to: [ beta ]\n    ready: {{ stable_for: 100ms }}\n    on_success: [ \"{h}\" ]\n    on_failure: [ \"{h}\" ]\n",
                self.path("outbox").display(),
                h = self.hook.display()
            ),
        )
    }

    fn beta(&self) -> Config {
        self.config(
            "beta",
            &format!(
                "receive:\n  - file_id: DATA\n    from: [ alpha ]\n    inbox: {}\n    on_success: [ \"{h}\", \"{{path}}\" ]\n    on_failure: [ \"{h}\" ]\n",
                self.path("inbox").display(),
                h = self.hook.display()
            ),
        )
    }

    /// `node`'s credentials on the world's broker, made on first use and
    /// kept where its agent looks for them (`state_dir/broker.secret`).
    fn credentials(&self, node: &str) -> Credentials {
        let file = self.path(node).join("broker.secret");
        if !file.exists() {
            let node = NodeName::parse(node).unwrap();
            let secret = credentials::add_node(&self.path("broker"), &node).unwrap();
            fs::create_dir_all(self.path(node.as_str())).unwrap();
            hakobu::secret::create(&file, &secret).unwrap();
        }
        Credentials {
            node: node.to_string(),
            secret: hakobu::secret::read(&file).unwrap(),
        }
    }

    fn config(&self, node: &str, profiles: &str) -> Config {
        self.credentials(node);
        let yaml = format!(
            "node: {node}\nstate_dir: {}\nbroker:\n  embedded: {{ connect: \"{}\" }}\n{profiles}",
            self.path(node).display(),
            self.broker.addr
        );
        Config::parse(&self.path(&format!("{node}.yaml")), &yaml).unwrap()
    }

    /// The state database of `node`, opened beside its agent (or before it).
    fn store(&self, node: &str) -> Store {
        fs::create_dir_all(self.path(node)).unwrap();
        Store::open(&self.path(node).join("history.sqlite")).unwrap()
    }

    fn runs(&self) -> Vec<String> {
        fs::read_to_string(self.path("runs.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

/// Polls `store`'s history until `check` holds for some row of `tid`.
async fn wait_for(store: &Store, what: &str, check: impl Fn(&[Entry]) -> bool) -> Vec<Entry> {
    let start = Instant::now();
    loop {
        let rows = store.history(1000).await.unwrap();
        if check(&rows) {
            return rows;
        }
        assert!(
            start.elapsed() < WAIT,
            "timed out waiting for {what}: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn status_of(rows: &[Entry], dir: Direction, tid: &TransferId) -> Option<Status> {
    rows.iter()
        .find(|e| e.direction() == dir && e.transfer().transfer_id == *tid)
        .map(|e| e.transfer().status)
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A receiving row for `data` as the ledger holds it once every chunk is
/// recorded: the digest known, `chunks_have` complete.
async fn complete_row(store: &Store, tid: &TransferId, name: &str, data: &[u8]) -> ReceiveRow {
    let mut t = Transfer::begin(
        tid.clone(),
        NodeName::parse("alpha").unwrap(),
        FileId::parse("DATA").unwrap(),
        name,
        (data.len() as u64, 64 << 10),
        Status::Receiving,
    );
    t.sha256 = Some(sha(data));
    let row = ReceiveRow::new(t);
    let rx = store.receiving();
    assert!(rx.insert(&row).await.unwrap());
    let count = (data.len() as u64).div_ceil(64 << 10).max(1);
    let chunks = (0..count).map(|i| (tid.clone(), i, 0)).collect();
    assert!(rx.add_chunks(chunks).await.unwrap().iter().any(|c| *c));
    rx.get(tid).await.unwrap().unwrap()
}

fn partial(w: &World, tid: &TransferId) -> PathBuf {
    w.path("inbox")
        .join(".hakobu-partial")
        .join(format!("{tid}.part"))
}

fn write_partial(w: &World, tid: &TransferId, data: &[u8]) -> PathBuf {
    let p = partial(w, tid);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, data).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_goes_through_every_stage_and_the_spool_is_settled() {
    let w = World::new().await;
    let beta = Agent::start(w.beta()).await.unwrap();
    let alpha = Agent::start(w.alpha()).await.unwrap();
    fs::create_dir_all(w.path("outbox")).unwrap();
    fs::write(w.path("outbox/a.csv"), b"1,2,3\n").unwrap();
    let sent = w.store("alpha");
    let rows = wait_for(&sent, "alpha's row to be sent", |rows| {
        rows.iter().any(|e| e.transfer().status == Status::Sent)
    })
    .await;
    let tid = rows[0].transfer().transfer_id.clone();
    assert_eq!(fs::read(w.path("inbox/a.csv")).unwrap(), b"1,2,3\n");
    let received = w.store("beta").history(10).await.unwrap();
    assert_eq!(
        status_of(&received, Direction::Receive, &tid),
        Some(Status::Received)
    );
    // after_send (delete) empties the spool once the receipt came: just
    // after the row says sent, so wait for it.
    let spool = w.path("alpha/spool/DATA");
    let start = Instant::now();
    while fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0) != 0 {
        assert!(start.elapsed() < WAIT, "after_send did not empty the spool");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        w.runs(),
        vec![format!("{tid} received "), format!("{tid} sent ")]
    );
    alpha.stop().await;
    beta.stop().await;
}

/// Completeness is read from the recorded count (`chunks_have`) alone: a
/// transfer whose every chunk was recorded is placed at start even when the
/// per-chunk rows are gone (the old recovery counted those rows instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_complete_in_the_ledger_is_placed_at_start() {
    let w = World::new().await;
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let tid = TransferId::new();
    {
        let store = w.store("beta");
        complete_row(&store, &tid, "big.bin", &data).await;
    }
    rusqlite::Connection::open(w.path("beta/history.sqlite"))
        .unwrap()
        .execute("DELETE FROM chunks", [])
        .unwrap();
    write_partial(&w, &tid, &data);
    let beta = Agent::start(w.beta()).await.unwrap();
    let store = w.store("beta");
    wait_for(&store, "the transfer to be received", |rows| {
        status_of(rows, Direction::Receive, &tid) == Some(Status::Received)
    })
    .await;
    assert_eq!(fs::read(w.path("inbox/big.bin")).unwrap(), data);
    assert!(!partial(&w, &tid).exists());
    assert_eq!(w.runs(), vec![format!("{tid} received ")]);
    beta.stop().await;
}

/// A crash after the rename and before `placed` was recorded: the inode
/// under the name is the recorded one, so the file is not placed again, the
/// leftover partial link goes, and the hook (which had not started) runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_placed_before_a_crash_is_not_placed_again() {
    let w = World::new().await;
    let data = b"placed once\n";
    let tid = TransferId::new();
    let store = w.store("beta");
    complete_row(&store, &tid, "p.txt", data).await;
    let part = write_partial(&w, &tid, data);
    let target = w.path("inbox/p.txt");
    fs::hard_link(&part, &target).unwrap();
    let inode = fs::metadata(&target).unwrap().ino();
    let placing = Placing {
        transfer_id: tid.clone(),
        peer: NodeName::parse("alpha").unwrap(),
        target: target.clone(),
        inode,
        converted: None,
    };
    store.receiving().placing(vec![placing]).await.unwrap();
    let beta = Agent::start(w.beta()).await.unwrap();
    wait_for(&store, "the transfer to be received", |rows| {
        status_of(rows, Direction::Receive, &tid) == Some(Status::Received)
    })
    .await;
    assert_eq!(fs::metadata(&target).unwrap().ino(), inode);
    assert!(!part.exists(), "the leftover partial link is removed");
    assert_eq!(w.runs(), vec![format!("{tid} received ")]);
    beta.stop().await;
}

/// A success hook that was running when the agent died is recorded as
/// interrupted and not run again; the sender hears `hook_interrupted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_running_at_start_is_interrupted_not_run_again() {
    let w = World::new().await;
    let tid = TransferId::new();
    let data = b"x";
    let alpha_store = w.store("alpha");
    let spooled = w.path("alpha/spool/DATA").join(format!("{tid}.h.txt"));
    fs::create_dir_all(spooled.parent().unwrap()).unwrap();
    fs::write(&spooled, data).unwrap();
    let t = Transfer::begin(
        tid.clone(),
        NodeName::parse("beta").unwrap(),
        FileId::parse("DATA").unwrap(),
        "h.txt",
        (1, 512 << 10),
        Status::AwaitingReceipt,
    );
    alpha_store
        .sending()
        .insert_all(vec![SendRow::new(t, spooled.clone())])
        .await
        .unwrap();
    let store = w.store("beta");
    complete_row(&store, &tid, "h.txt", data).await;
    let key = (&tid, &NodeName::parse("alpha").unwrap());
    let placed = vec![(tid.clone(), key.1.clone(), Status::HookRunning)];
    let rx = store.receiving();
    rx.placing(vec![Placing {
        transfer_id: tid.clone(),
        peer: key.1.clone(),
        target: w.path("inbox/h.txt"),
        inode: 1,
        converted: None,
    }])
    .await
    .unwrap();
    rx.placed(placed).await.unwrap();
    let beta = Agent::start(w.beta()).await.unwrap();
    let alpha = Agent::start(w.alpha()).await.unwrap();
    let rows = wait_for(&alpha_store, "alpha to hear the outcome", |rows| {
        status_of(rows, Direction::Send, &tid) == Some(Status::SendFailed)
    })
    .await;
    assert_eq!(
        rows[0].transfer().error_code.as_deref(),
        Some("hook_interrupted")
    );
    let mine = store.history(10).await.unwrap();
    assert_eq!(
        status_of(&mine, Direction::Receive, &tid),
        Some(Status::HookInterrupted)
    );
    // Only alpha's failure hook ran; beta's success hook was not re-run.
    assert_eq!(
        w.runs(),
        vec![format!("{tid} send_failed hook_interrupted")]
    );
    // A failed transfer's file stays in the spool, for `hakobu resend`.
    assert!(spooled.exists());
    alpha.stop().await;
    beta.stop().await;
}

/// A crash between the claim's rename and its ledger rows leaves a spooled
/// file without rows: the next start records it under its transfer id and
/// sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_file_without_rows_is_recorded_and_sent_at_start() {
    let w = World::new().await;
    let tid = TransferId::new();
    let spooled = w.path("alpha/spool/DATA").join(format!("{tid}.orphan.csv"));
    fs::create_dir_all(spooled.parent().unwrap()).unwrap();
    fs::write(&spooled, b"claimed, never recorded\n").unwrap();
    let beta = Agent::start(w.beta()).await.unwrap();
    let alpha = Agent::start(w.alpha()).await.unwrap();
    let store = w.store("alpha");
    wait_for(&store, "the orphan to be sent", |rows| {
        status_of(rows, Direction::Send, &tid) == Some(Status::Sent)
    })
    .await;
    assert_eq!(
        fs::read(w.path("inbox/orphan.csv")).unwrap(),
        b"claimed, never recorded\n"
    );
    // after_send runs once the receipt is recorded, so shortly after `sent`.
    let start = Instant::now();
    while spooled.exists() {
        assert!(
            start.elapsed() < WAIT,
            "after_send (delete) did not settle it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    alpha.stop().await;
    beta.stop().await;
}

/// `hakobu send`'s path: a file queued in the ledger by another process is
/// picked up, published, and its metadata reaches the receiver's row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_file_is_picked_up_with_its_metadata() {
    let w = World::new().await;
    let cfg = w.alpha();
    let store = w.store("alpha");
    let src = w.path("q.txt");
    fs::write(&src, b"queued\n").unwrap();
    let spool = hakobu::sender::Spool::new(cfg.spool_dir());
    let meta = BTreeMap::from([("batch".to_string(), "7".to_string())]);
    let profile = cfg.send_profile("DATA").unwrap();
    let tid = hakobu::sender::queue(&store.sending(), &spool, profile, (&src, "q.txt"), &meta)
        .await
        .unwrap();
    let beta = Agent::start(w.beta()).await.unwrap();
    let alpha = Agent::start(cfg).await.unwrap();
    let beta_store = w.store("beta");
    let rows = wait_for(&beta_store, "beta to receive it", |rows| {
        status_of(rows, Direction::Receive, &tid) == Some(Status::Received)
    })
    .await;
    assert_eq!(rows[0].transfer().meta, meta);
    assert_eq!(fs::read(w.path("inbox/q.txt")).unwrap(), b"queued\n");
    alpha.stop().await;
    beta.stop().await;
}

/// Stopping drains what is under way; a restart finishes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stopped_mid_stream_finishes_after_a_restart() {
    let w = World::new().await;
    let alpha = Agent::start(w.alpha()).await.unwrap();
    let beta = Agent::start(w.beta()).await.unwrap();
    let outbox = w.path("outbox");
    fs::create_dir_all(&outbox).unwrap();
    let mut want = BTreeMap::new();
    for i in 0..40u32 {
        let data: Vec<u8> = (0..(i * 7919 % 300_000)).map(|b| (b % 251) as u8).collect();
        let tmp = w.path(&format!("f{i}.tmp"));
        fs::write(&tmp, &data).unwrap();
        fs::rename(&tmp, outbox.join(format!("f{i}.bin"))).unwrap();
        want.insert(format!("f{i}.bin"), sha(&data));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    beta.stop().await;
    let beta = Agent::start(w.beta()).await.unwrap();
    let store = w.store("alpha");
    wait_for(&store, "all 40 to be sent", |rows| {
        rows.len() == 40 && rows.iter().all(|e| e.transfer().status == Status::Sent)
    })
    .await;
    for (name, digest) in &want {
        assert_eq!(
            &sha(&fs::read(w.path("inbox").join(name)).unwrap()),
            digest,
            "{name}"
        );
    }
    let received = w.runs().iter().filter(|l| l.contains(" received")).count();
    assert_eq!(received, 40, "each success hook once");
    alpha.stop().await;
    beta.stop().await;
}

/// `hakobu rerun` while the agent runs: a duplicate chunk of the transfer
/// arriving during the rerun's hook must not make the agent record the
/// hook as interrupted (the row says `hook_running` because the rerun runs
/// it, not because an agent died).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_is_not_taken_for_an_interrupted_hook() {
    let w = World::new().await;
    // The hook takes a second while `slow` exists.
    let slow = w.path("slow");
    let hook = fs::read_to_string(&w.hook).unwrap().replace(
        "#!/bin/sh\n",
        &format!("#!/bin/sh\n[ -e {} ] && sleep 1\n", slow.display()),
    );
    fs::write(&w.hook, hook).unwrap();
    let beta_cfg = w.beta();
    let beta = Agent::start(w.beta()).await.unwrap();
    let alpha = Agent::start(w.alpha()).await.unwrap();
    fs::create_dir_all(w.path("outbox")).unwrap();
    let data = b"rerun me\n";
    fs::write(w.path("outbox/r.txt"), data).unwrap();
    let store = w.store("beta");
    let rows = wait_for(&store, "the receipt to be sent", |rows| {
        rows.iter().any(
            |e| matches!(e, Entry::Receive(r) if r.receipt_sent && r.status == Status::Received),
        )
    })
    .await;
    let tid = rows[0].transfer().transfer_id.clone();
    fs::write(&slow, b"").unwrap();
    let rerun = {
        let (cfg, store, tid) = (beta_cfg.clone(), store.clone(), tid.clone());
        tokio::spawn(async move { hakobu::rerun::rerun(&cfg, &store, &tid, true).await })
    };
    wait_for(&store, "the rerun's hook to start", |rows| {
        status_of(rows, Direction::Receive, &tid) == Some(Status::HookRunning)
    })
    .await;
    // The sender publishes the file again (it lost its `published`).
    let header = hakobu::wire::ChunkHeader {
        transfer_id: tid.clone(),
        file_id: FileId::parse("DATA").unwrap(),
        from: NodeName::parse("alpha").unwrap(),
        to: NodeName::parse("beta").unwrap(),
        file_name: "r.txt".into(),
        size: data.len() as u64,
        chunk_size: 512 << 10,
        offset: 0,
        last: Some(hakobu::wire::Trailer {
            sha256: sha(data),
            started_at: "2026-12-02T00:00:00Z".into(),
            meta: BTreeMap::new(),
        }),
        sealed: None,
        request_id: None,
        attempt: 1,
        compressed: None,
        parent_id: None,
    };
    let msg = hakobu::wire::Message::Chunk(header, bytes::Bytes::from_static(data));
    let client = hakobu::broker::embedded::Embedded::new(
        &w.broker.addr.to_string(),
        w.credentials("alpha"),
        1,
    );
    use hakobu::broker::Broker;
    client
        .publish("beta", msg.encode())
        .await
        .unwrap()
        .await
        .unwrap();
    match rerun.await.unwrap().unwrap() {
        hakobu::rerun::Rerun::Ran {
            recorded, outcome, ..
        } => {
            assert!(outcome.ok(), "{outcome:?}");
            assert!(recorded, "the agent took the rerun's row over");
        }
        hakobu::rerun::Rerun::NoHook(_) => panic!("the profile has a hook"),
    }
    let rows = store.history(10).await.unwrap();
    assert_eq!(
        status_of(&rows, Direction::Receive, &tid),
        Some(Status::Received)
    );
    alpha.stop().await;
    beta.stop().await;
}
