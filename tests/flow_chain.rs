//! The job flow across servers (issue 14), with real agents on the embedded
//! broker (a `hakobu broker` process) and on the three-node RabbitMQ
//! cluster: alpha sends sales.csv to beta; beta's success hook (a real
//! script) runs `hakobu send` of a report, which goes to gamma. Beta's
//! `hakobu history --chain` shows the three steps (alpha → beta, beta →
//! gamma, gamma's outcome from its receipt); gamma's row carries beta's
//! receive transfer as its parent, and gamma's chain reaches back to it.
//! Also: a done marker's `parent=` (good and bad), `--parent none` and
//! `--parent ID`, a bad `HAKOBU_TRANSFER_ID`, an unknown id, a cycle of
//! parents planted in the database; and a parent id changed, stripped or
//! added on the way, refused like any other header tampering.

mod common;
#[allow(dead_code)]
#[path = "encryption/rig.rs"]
mod rig;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use bytes::Bytes;
use hakobu::domain::TransferId;
use hakobu::wire::ChunkHeader;
use serde_json::Value;

use common::webdriver::Browser;
use common::{Agent, BrokerProcess, bin, rabbit_broker, unique, wait_until};

const WAIT: Duration = Duration::from_secs(90);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Embedded,
    Rabbit,
}

struct Flow {
    tmp: tempfile::TempDir,
    kind: Kind,
    _broker: Option<BrokerProcess>,
    alpha: Agent,
    beta: Agent,
    gamma: Agent,
    /// Beta's console (`http:`), e.g. `http://127.0.0.1:PORT`.
    beta_web: String,
}

fn script(path: &Path, body: &str) -> PathBuf {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, format!("#!/bin/sh\nset -e\n{body}")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    path.to_path_buf()
}

impl Flow {
    fn new(kind: Kind) -> Flow {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let broker = (kind == Kind::Embedded).then(|| BrokerProcess::start(&root));
        let section = |i: usize| match &broker {
            Some(b) => b.section(),
            None => rabbit_broker(i),
        };
        let (a, b, g) = (unique("alpha"), unique("beta"), unique("gamma"));
        let r = root.display();
        let beta_cfg = root.join("beta").join(format!("{b}.yaml"));
        // Beta's import: a report of the file, sent on with `hakobu send`
        // (which takes its parent from HAKOBU_TRANSFER_ID by itself).
        let report = script(
            &root.join("hooks/report.sh"),
            &format!(
                "out={r}/beta/work/$HAKOBU_TRANSFER_ID\nmkdir -p \"$out\"\nwc -l < \"$1\" > \"$out/report.csv\"\nexec {bin} send -c {cfg} --file-id REPORT \"$out/report.csv\"\n",
                bin = bin(),
                cfg = beta_cfg.display()
            ),
        );
        // Beta's other import drops an acknowledgement into an outbox, and
        // links it with its done marker.
        let ack = script(
            &root.join("hooks/ack.sh"),
            &format!(
                "box={r}/beta/ack\nmkdir -p \"$box\"\ncp \"$1\" \"$box/.ack.csv.w\"\nmv \"$box/.ack.csv.w\" \"$box/ack.csv\"\nprintf 'parent=%s\\n' \"$HAKOBU_TRANSFER_ID\" > \"$box/.m\"\nmv \"$box/.m\" \"$box/ack.csv.done\"\n"
            ),
        );
        let alpha_yaml = format!(
            "node: {a}\nstate_dir: {r}/alpha/state\n{broker}send:\n  - file_id: SALES\n    outbox: {r}/alpha/outbox\n    to: [ {b} ]\n    ready: {{ stable_for: 100ms }}\n  - file_id: ORDERS\n    outbox: {r}/alpha/orders\n    to: [ {b} ]\n    ready: {{ stable_for: 100ms }}\n",
            broker = section(0)
        );
        let port = common::http::free_port();
        let beta_web = format!("http://127.0.0.1:{port}");
        let beta_yaml = format!(
            "node: {b}\nstate_dir: {r}/beta/state\n{broker}http:\n  listen: \"127.0.0.1:{port}\"\nreceive:\n  - file_id: SALES\n    from: [ {a} ]\n    inbox: {r}/beta/inbox\n    on_success: [ \"{report}\", \"{{path}}\" ]\n  - file_id: ORDERS\n    from: [ {a} ]\n    inbox: {r}/beta/inbox\n    on_success: [ \"{ack}\", \"{{path}}\" ]\nsend:\n  - file_id: REPORT\n    outbox: {r}/beta/reports\n    to: [ {g} ]\n    ready: {{ stable_for: 100ms }}\n  - file_id: ACK\n    outbox: {r}/beta/ack\n    to: [ {g} ]\n    ready: {{ done_marker: \".done\" }}\n  - file_id: SUMMARY\n    source: {r}/beta/summary.csv\n    to: [ {g} ]\n",
            broker = section(1),
            report = report.display(),
            ack = ack.display()
        );
        let gamma_yaml = format!(
            "node: {g}\nstate_dir: {r}/gamma/state\n{broker}receive:\n  - file_id: REPORT\n    from: [ {b} ]\n    inbox: {r}/gamma/inbox\n    mode: replace\n    on_success: [ \"/bin/sh\", \"-c\", \"exit 0\" ]\n  - file_id: ACK\n    from: [ {b} ]\n    inbox: {r}/gamma/inbox\n    mode: replace\n  - file_id: SUMMARY\n    from: [ {b} ]\n    inbox: {r}/gamma/inbox\n    mode: replace\n",
            broker = section(2)
        );
        let alpha = Agent::new(&a, &root.join("alpha"), &alpha_yaml);
        let beta = Agent::new(&b, &root.join("beta"), &beta_yaml);
        let gamma = Agent::new(&g, &root.join("gamma"), &gamma_yaml);
        Flow {
            tmp,
            kind,
            _broker: broker,
            alpha,
            beta,
            gamma,
            beta_web,
        }
    }

    fn logs(&self) -> String {
        [&self.alpha, &self.beta, &self.gamma]
            .iter()
            .map(|a| format!("--- {} ---\n{}", a.node, a.log()))
            .collect()
    }

    /// `hakobu send` on beta with this environment for HAKOBU_TRANSFER_ID.
    fn beta_send(&self, file: &Path, env: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin());
        cmd.args(["send", "-c"])
            .arg(&self.beta.config)
            .args(["--file-id", "REPORT"])
            .arg(file)
            .args(args)
            .env_remove("HAKOBU_TRANSFER_ID");
        if let Some(v) = env {
            cmd.env("HAKOBU_TRANSFER_ID", v);
        }
        cmd.output().unwrap()
    }
}

/// Beta's console shows the same three steps on the first transfer's page,
/// in a real browser (headless Chromium over WebDriver), with a screenshot
/// under target/console-screenshots/.
fn console_shows_the_flow(f: &Flow, t1: &str, [a, b, g]: [&str; 3], [s1, s2]: [&str; 2]) {
    let token = fs::read_to_string(f.tmp.path().join("beta/state/http.token")).unwrap();
    let web = &f.beta_web;
    let browser = Browser::start();
    browser.goto(&format!("{web}/login"));
    browser.type_into("#token", token.trim());
    browser.click("button[type=submit]");
    wait_until(WAIT, "the console after signing in", || {
        browser.url() == format!("{web}/")
    });
    browser.goto(&format!("{web}/transfers/{t1}"));
    let seen = browser.js(
        "return [...document.querySelectorAll('#flow li.step')].map(e => [e.dataset.id, e.dataset.depth, e.querySelector('.hop').textContent, e.querySelector('.status').textContent]);",
        serde_json::json!([]),
    );
    assert_eq!(
        seen,
        serde_json::json!([
            [s1, "0", format!("{a} → {b}"), "received"],
            [s2, "1", format!("{b} → {g}"), "sent"],
            [s2, "1", format!("{b} → {g}"), "received"],
        ]),
        "the console's flow on beta"
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
    browser.screenshot(&dir, &format!("flow-{:?}", f.kind).to_lowercase());
}

/// The row of `agent` matching `pred`, once it is in a final status.
fn settled_row(agent: &Agent, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut found = Value::Null;
    wait_until(WAIT, what, || {
        found = agent
            .history()
            .into_iter()
            .find(|r| pred(r))
            .unwrap_or(Value::Null);
        matches!(
            found["status"].as_str(),
            Some("sent" | "received" | "send_failed" | "receive_failed" | "hook_failed")
        )
    });
    found
}

fn chain(agent: &Agent, id: &str) -> Value {
    // `timeout`: a walk that did not end would fail the test, not hang it.
    let out = Command::new("timeout")
        .args(["60", bin(), "history", "-c"])
        .arg(&agent.config)
        .args(["--chain", id, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "history --chain {id} on {}: {:?} {}",
        agent.node,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// (transfer id, view, from, to, status) of each step.
fn steps(c: &Value) -> Vec<(String, String, String, String, String)> {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    c["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|st| {
            (
                s(&st["transfer_id"]),
                s(&st["view"]),
                s(&st["from"]),
                s(&st["to"]),
                s(&st["status"]),
            )
        })
        .collect()
}

fn by_name(name: &'static str) -> impl Fn(&Value) -> bool {
    move |r| r["file_name"] == name
}

fn job_flow(kind: Kind) {
    let mut f = Flow::new(kind);
    let (a, b, g) = (
        f.alpha.node.clone(),
        f.beta.node.clone(),
        f.gamma.node.clone(),
    );
    f.gamma.start();
    f.beta.start();
    f.alpha.start();
    let root = f.tmp.path().to_path_buf();

    // alpha → beta → (hook) → gamma.
    common::drop_file(&root.join("alpha/outbox"), "sales.csv", |p| {
        fs::write(p, "id,amount\n1,100\n2,200\n").unwrap()
    });
    let sales = settled_row(&f.alpha, "alpha's sales.csv settled", by_name("sales.csv"));
    assert_eq!(sales["status"], "sent", "{sales}\n{}", f.logs());
    let t1 = sales["transfer_id"].as_str().unwrap().to_string();
    assert!(sales["parent_id"].is_null(), "{sales}");
    let sent = settled_row(&f.beta, "beta's report sent", by_name("report.csv"));
    assert_eq!(sent["status"], "sent", "{sent}\n{}", f.logs());
    assert_eq!(sent["parent_id"], t1.as_str(), "{sent}");
    let t2 = sent["transfer_id"].as_str().unwrap().to_string();
    let load = settled_row(&f.gamma, "gamma's report", by_name("report.csv"));
    assert_eq!(load["status"], "received", "{load}");
    assert_eq!(
        load["parent_id"],
        t1.as_str(),
        "gamma's row names beta's receive transfer as parent: {load}"
    );
    // Beta knows the whole flow: its import, its report, gamma's load.
    let c = chain(&f.beta, &t1);
    assert_eq!(c["root"], t1.as_str(), "{c}");
    let st = |t: &str, v: &str, from: &str, to: &str, s: &str| {
        (t.into(), v.into(), from.into(), to.into(), s.into())
    };
    assert_eq!(
        steps(&c),
        vec![
            st(&t1, "local", &a, &b, "received"),
            st(&t2, "local", &b, &g, "sent"),
            st(&t2, "receipt", &b, &g, "received"),
        ],
        "{c}"
    );
    assert_eq!(c["steps"][1]["parent_id"], t1.as_str(), "{c}");
    assert_eq!(c["steps"][1]["depth"], 1, "{c}");
    assert!(c["steps"][0]["started_at"].is_string() && c["steps"][0]["finished_at"].is_string());
    console_shows_the_flow(&f, &t1, [&a, &b, &g], [&t1, &t2]);
    let from_child = chain(&f.beta, &t2);
    assert_eq!(from_child["transfer_id"], t2.as_str());
    assert_eq!(
        (&from_child["root"], &from_child["steps"]),
        (&c["root"], &c["steps"]),
        "asked from the child, the same flow"
    );
    // Gamma knows its step, and that its parent ran on beta.
    let c = chain(&f.gamma, &t2);
    assert_eq!(c["root"], t1.as_str(), "{c}");
    assert_eq!(
        steps(&c),
        vec![
            st(&t1, "parent", "-", "-", "-"),
            st(&t2, "local", &b, &g, "received")
        ],
        "{c}"
    );
    assert_eq!(c["steps"][0]["node"], b.as_str(), "{c}");
    // The text view: one indented line per step.
    let out = f.beta.cli(&["history", "--chain", &t1]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("    ") && l.contains(&t2) && l.contains("REPORT")),
        "{text}"
    );

    // A hook that drops a file into an outbox links it with its marker.
    common::drop_file(&root.join("alpha/orders"), "orders.csv", |p| {
        fs::write(p, "o,1\n").unwrap()
    });
    let orders = settled_row(
        &f.alpha,
        "alpha's orders.csv settled",
        by_name("orders.csv"),
    );
    let ack = settled_row(&f.gamma, "gamma's ack", by_name("ack.csv"));
    assert_eq!(ack["status"], "received", "{ack}");
    assert_eq!(ack["parent_id"], orders["transfer_id"], "{ack}\n{orders}");
    // A marker with a bad parent: logged, the file sent without one.
    let box_ = root.join("beta/ack");
    fs::write(box_.join("bad.csv"), "b\n").unwrap();
    fs::write(box_.join("bad.csv.done"), "parent=../../etc/passwd\n").unwrap();
    let bad = settled_row(&f.gamma, "gamma's bad.csv", by_name("bad.csv"));
    assert_eq!(bad["status"], "received", "{bad}");
    assert!(bad["parent_id"].is_null(), "{bad}");
    assert!(f.beta.log().contains("bad_parent_id"), "{}", f.beta.log());

    // `--parent none` beats the environment; `--parent ID` needs none.
    let file = root.join("extra.csv");
    fs::write(&file, "x\n").unwrap();
    let out = f.beta_send(&file, Some(&t1), &["--parent", "none"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let none = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = f.beta_send(&file, None, &["--parent", &t2]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let explicit = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let row = settled_row(&f.gamma, "the --parent none transfer", |r| {
        r["transfer_id"] == none.as_str()
    });
    assert!(row["parent_id"].is_null(), "{row}");
    let row = settled_row(&f.gamma, "the --parent ID transfer", |r| {
        r["transfer_id"] == explicit.as_str()
    });
    assert_eq!(row["parent_id"], t2.as_str(), "{row}");
    // A profile's source sent by a hook (no path) takes the parent too.
    fs::write(root.join("beta/summary.csv"), "s\n").unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["send", "-c"])
        .arg(&f.beta.config)
        .args(["--file-id", "SUMMARY"])
        .env("HAKOBU_TRANSFER_ID", &t1);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = settled_row(&f.gamma, "gamma's summary.csv", by_name("summary.csv"));
    assert_eq!(row["parent_id"], t1.as_str(), "{row}");
    // A bad HAKOBU_TRANSFER_ID: refused with its code, nothing queued.
    let before = f.beta.history().len();
    let out = f.beta_send(&file, Some("x/../y z"), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("bad_parent_id") && err.contains("--parent none"),
        "{err}"
    );
    let out = f.beta_send(&file, None, &["--parent", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad_parent_id"));
    assert_eq!(
        f.beta.history().len(),
        before,
        "a refused send queued nothing"
    );

    // An id this node does not know.
    let out = f
        .beta
        .cli(&["history", "--chain", TransferId::new().as_str()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_transfer"));

    // A cycle planted in the database: the walk ends and says so.
    let db = rusqlite::Connection::open(root.join("beta/state/history.sqlite")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let n = db
        .execute(
            "UPDATE transfers SET parent_id = ?1 WHERE transfer_id = ?2",
            [&t2, &t1],
        )
        .unwrap();
    assert!(n > 0);
    let c = chain(&f.beta, &t1);
    assert_eq!(c["cycle"], true, "{c}");
    // Each row once: T2 and its receipt, T1 under it with the summary (a
    // child of T1) and its receipt, and the `--parent` transfer (a child
    // of T2) with its receipt.
    let seen = steps(&c);
    assert_eq!(seen.len(), 7, "{c}");
    let mut unique_steps = seen.clone();
    unique_steps.sort();
    unique_steps.dedup();
    assert_eq!(unique_steps.len(), seen.len(), "{c}");
    let out = f.beta.cli(&["history", "--chain", &t2]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("cycle"));
}

#[test]
fn embedded_a_hooks_send_is_one_flow_across_three_nodes() {
    job_flow(Kind::Embedded);
}

#[test]
fn rabbitmq_a_hooks_send_is_one_flow_across_three_nodes() {
    job_flow(Kind::Rabbit);
}

// ---- a parent id changed on the way ----

/// Sealed chunks whose parent id was changed, stripped or added fail with
/// `decrypt_failed`, like any other change to a sealed header; a plain
/// chunk that names another parent than its transfer's first chunk fails
/// with `inconsistent_chunk`. The untouched file arrives with its parent.
fn forged_parents(kind: rig::Kind) {
    let mut rig = rig::Rig::new(kind, &[rig::Keys::Right]);
    rig.alpha.start();
    let size = 100 * 1024;
    let parent = TransferId::new().to_string();
    let stage = rig.root.join("parents");
    fs::create_dir_all(&stage).unwrap();
    let files = [
        ("forged.bin", "SECRET", parent.as_str()),
        ("stripped.bin", "SECRET", parent.as_str()),
        ("added.bin", "SECRET", "none"),
        ("good.bin", "SECRET", parent.as_str()),
        ("plain.bin", "PLAIN", parent.as_str()),
    ];
    for (i, (name, id, p)) in files.iter().enumerate() {
        let path = stage.join(name);
        rig::pattern_file(&path, size, 40 + i as u8);
        let out = rig.alpha.cli(&[
            "send",
            "--file-id",
            id,
            path.to_str().unwrap(),
            "--parent",
            p,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    rig.wait_published(files.len());
    let node = rig.receivers[0].node.clone();
    let client = rig.backend.client(&node);
    let publisher = rig.backend.client(&rig.alpha.node);
    let per_file = rig::chunks_of(size);
    let mut chunks: Vec<(ChunkHeader, Bytes)> =
        rig::run(rig::take_all(&client, &node, files.len() * per_file));
    let other = TransferId::new();
    for (h, _) in &mut chunks {
        match h.file_name.as_str() {
            "forged.bin" => h.parent_id = Some(other.clone()),
            "stripped.bin" => h.parent_id = None,
            "added.bin" => h.parent_id = Some(other.clone()),
            "plain.bin" if h.offset > 0 => h.parent_id = Some(other.clone()),
            _ => {}
        }
    }
    // The plain file's first chunk first, so that its row has the true parent.
    chunks.sort_by_key(|(h, _)| h.offset);
    rig::run(rig::put_back(&publisher, &node, &chunks));
    drop((client, publisher));
    rig.receivers[0].start();
    let done = rig.wait_settled(files.len());
    for (name, _, _) in files {
        let (status, code) = &done[&(name.to_string(), node.clone())];
        let want = match name {
            "good.bin" => ("sent", ""),
            "plain.bin" => ("send_failed", "inconsistent_chunk"),
            _ => ("send_failed", "decrypt_failed"),
        };
        assert_eq!(
            (status.as_str(), code.as_str()),
            want,
            "{name}\n{}",
            rig.logs()
        );
    }
    let good = rig.receivers[0]
        .history()
        .into_iter()
        .find(|r| r["file_name"] == "good.bin")
        .unwrap();
    assert_eq!(good["parent_id"], parent.as_str(), "{good}");
    assert!(rig.receivers[0].alive(), "the receiver died");
}

#[test]
fn embedded_a_parent_id_changed_on_the_way_is_refused() {
    forged_parents(rig::Kind::Embedded);
}

#[test]
fn rabbitmq_a_parent_id_changed_on_the_way_is_refused() {
    forged_parents(rig::Kind::Rabbit);
}
