//! Pull (send requests, `hakobu request`) and the pre-send job
//! (`before_send`), end to end with real agents: on the three-node cluster
//! and on the embedded broker (a `hakobu broker` process). Beta asks, alpha
//! sends its profile's `source` (or what is ready in its outbox) through the
//! normal path, and `--wait` says how it ended.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{Agent, BrokerProcess, hook_runs, rabbit_broker, recording_hook, unique};
use hakobu::domain::{FileId, NodeName, TransferId};
use hakobu::wire::{Message, Request};

const WAIT: Duration = Duration::from_secs(60);

/// Alpha (the asked node) and beta (the asking one), with these profiles:
/// - `SRC`: alpha's `export/sales.csv`, which beta may ask for;
/// - `DENIED`: the same file, which only `carol` may ask for;
/// - `BOX`: alpha's outbox, only asked for (no `to`);
/// - `FAILJOB`: a source whose `before_send` job exits 3;
/// - `EXPORT`: a source that its `before_send` job writes;
/// - `NOPE`: received by beta, sent by no profile of alpha's;
/// - `HOOKFAIL`: a source whose import hook on beta exits 4;
/// - `STAMP`: an outbox watched for beta, whose `before_send` job appends
///   a line to the spooled copy and writes down the path it was given.
struct Rig {
    tmp: tempfile::TempDir,
    alpha: Agent,
    beta: Agent,
    hooks: PathBuf,
}

impl Rig {
    fn new(broker_alpha: &str, broker_beta: &str) -> Rig {
        Self::named((unique("alpha"), unique("beta")), broker_alpha, broker_beta)
    }

    fn named((a, b): (String, String), broker_alpha: &str, broker_beta: &str) -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let hooks = root.join("hooks");
        let hook = recording_hook(&hooks, "hook.sh");
        let export = root.join("export");
        fs::create_dir_all(&export).unwrap();
        let hooked = format!(
            "    on_success: [ \"{h}\" ]\n    on_failure: [ \"{h}\" ]\n",
            h = hook.display()
        );
        let source = |id: &str, file: &str, who: &str, extra: &str| {
            format!(
                "  - file_id: {id}\n    source: {}\n    requests_from: [ {who} ]\n{hooked}{extra}",
                export.join(file).display()
            )
        };
        let outbox_profile = format!(
            "  - file_id: BOX\n    outbox: {root}/alpha/outbox\n    requests_from: [ {b} ]\n    ready: {{ stable_for: 100ms }}\n{hooked}",
            root = root.display()
        );
        let send = [
            source("SRC", "sales.csv", &b, ""),
            source("DENIED", "sales.csv", "carol", ""),
            outbox_profile,
            source(
                "FAILJOB",
                "fail.csv",
                &b,
                "    before_send: [ \"/bin/sh\", \"-c\", \"exit 3\" ]\n",
            ),
            source(
                "EXPORT",
                "gen.csv",
                &b,
                "    before_send: [ \"/bin/sh\", \"-c\", \"printf 'id,amount\\\\n1,100\\\\n' > \\\"$HAKOBU_PATH\\\"\" ]\n",
            ),
            source("HOOKFAIL", "hf.csv", &b, ""),
            format!(
                "  - file_id: STAMP\n    outbox: {root}/alpha/stamp\n    to: [ {b} ]\n    ready: {{ stable_for: 100ms }}\n    before_send: [ \"/bin/sh\", \"-c\", \"echo stamped >> \\\"$HAKOBU_PATH\\\"; echo \\\"$HAKOBU_PATH\\\" > {root}/stamp.path\" ]\n",
                root = root.display()
            ),
        ]
        .concat();
        let alpha_yaml = format!(
            "node: {a}\nstate_dir: {root}/alpha/state\n{broker_alpha}send:\n{send}",
            root = root.display(),
        );
        let receive: String = [
            "SRC", "DENIED", "BOX", "FAILJOB", "EXPORT", "NOPE", "HOOKFAIL", "STAMP",
        ]
        .iter()
        .map(|id| {
            let import = match *id {
                "HOOKFAIL" => "[ \"/bin/sh\", \"-c\", \"exit 4\" ]".to_string(),
                _ => format!("[ \"{}\", \"{{path}}\" ]", hook.display()),
            };
            format!(
                "  - file_id: {id}\n    from: [ {a} ]\n    inbox: {root}/beta/inbox\n    mode: replace\n    on_success: {import}\n",
                root = root.display(),
            )
        })
        .collect();
        let beta_yaml = format!(
            "node: {b}\nstate_dir: {root}/beta/state\n{broker_beta}receive:\n{receive}",
            root = root.display()
        );
        let alpha = Agent::new(&a, &root.join("alpha"), &alpha_yaml);
        let beta = Agent::new(&b, &root.join("beta"), &beta_yaml);
        Rig {
            tmp,
            alpha,
            beta,
            hooks,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    fn start(&mut self) {
        self.beta.start();
        self.alpha.start();
    }

    /// `hakobu request --wait` on beta, for `file_id` from alpha.
    fn request(&self, file_id: &str) -> Output {
        let a = self.alpha.node.clone();
        self.beta.cli(&[
            "request",
            "--file-id",
            file_id,
            "--from",
            &a,
            "--wait",
            "--timeout",
            "90s",
        ])
    }

    fn spooled(&self, file_id: &str) -> Vec<String> {
        common::dir_names(&self.path("alpha/state/spool").join(file_id))
    }

    fn inbox(&self) -> Vec<String> {
        common::visible_names(&self.path("beta/inbox"))
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Exit 1 with `code` on stdout.
fn assert_refused(o: &Output, code: &str, rig: &Rig) {
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}\nalpha log:\n{}",
        text(o),
        rig.alpha.log()
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.lines().any(|l| l == code),
        "{code} not printed: {}",
        text(o)
    );
}

/// A pull of the source: exit 0, the file placed byte for byte (and its
/// success hook run), the source still there, beta's row carrying the
/// request id.
fn pull_of_a_source(rig: &Rig) {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(rig.path("export/sales.csv"), &data).unwrap();
    let o = rig.request("SRC");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\nalpha log:\n{}\nbeta log:\n{}",
        text(&o),
        rig.alpha.log(),
        rig.beta.log()
    );
    let request_id = String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(fs::read(rig.path("beta/inbox/sales.csv")).unwrap(), data);
    assert_eq!(
        fs::read(rig.path("export/sales.csv")).unwrap(),
        data,
        "the source stays"
    );
    let row = rig
        .beta
        .history()
        .into_iter()
        .find(|r| r["file_id"] == "SRC")
        .expect("beta's row");
    assert_eq!(row["status"], "received");
    assert_eq!(row["request_id"], request_id.as_str());
    let tid = row["transfer_id"].as_str().unwrap().to_string();
    assert!(hook_runs(&rig.hooks).contains(&format!("{tid} received")));
}

#[test]
fn pull_on_the_cluster() {
    let mut rig = Rig::new(&rabbit_broker(0), &rabbit_broker(1));
    rig.start();
    pull_of_a_source(&rig);

    // A node not in requests_from.
    let o = rig.request("DENIED");
    assert_refused(&o, "request_denied", &rig);
    // A file id alpha sends by no profile.
    let o = rig.request("NOPE");
    assert_refused(&o, "unknown_file_id", &rig);
    // An outbox with nothing ready.
    let o = rig.request("BOX");
    assert_refused(&o, "nothing_to_send", &rig);
    assert!(
        rig.alpha
            .history()
            .iter()
            .all(|r| r["file_id"] != "DENIED" && r["file_id"] != "NOPE" && r["file_id"] != "BOX"),
        "a refused request sends nothing"
    );

    // What is ready in the outbox goes to the asking node only.
    common::drop_file(&rig.path("alpha/outbox"), "orders.csv", |t| {
        fs::write(t, "order,1\n").unwrap()
    });
    common::wait_until(WAIT, "the outbox file to be ready", || {
        fs::metadata(rig.path("alpha/outbox/orders.csv"))
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_millis(150))
    });
    let o = rig.request("BOX");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        fs::read(rig.path("beta/inbox/orders.csv")).unwrap(),
        b"order,1\n"
    );

    // A failing pre-send job: before_send_failed on both sides, the
    // sender's failure hook ran, nothing reached beta, the copy is spooled.
    fs::write(rig.path("export/fail.csv"), "x\n").unwrap();
    let before = rig.inbox();
    let o = rig.request("FAILJOB");
    assert_refused(&o, "before_send_failed", &rig);
    let row = rig
        .alpha
        .history()
        .into_iter()
        .find(|r| r["file_id"] == "FAILJOB")
        .expect("alpha's row of the failed job");
    assert_eq!(row["error_code"], "before_send_failed");
    let tid = row["transfer_id"].as_str().unwrap().to_string();
    common::wait_until(WAIT, "the failure hook", || {
        hook_runs(&rig.hooks).contains(&format!("{tid} send_failed"))
            && rig.alpha.with_status("send_failed").len() == 1
    });
    let env = common::hook_env(&rig.hooks, &tid, "send_failed");
    assert_eq!(env["HAKOBU_ERROR_CODE"], "before_send_failed", "{env:?}");
    assert_eq!(rig.inbox(), before, "nothing reached beta");
    assert!(!rig.inbox().contains(&"fail.csv".to_string()));
    assert_eq!(rig.spooled("FAILJOB"), vec![format!("{tid}.fail.csv")]);

    // The typical export: the job writes the source, the request sends it.
    assert!(!rig.path("export/gen.csv").exists());
    let o = rig.request("EXPORT");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\n{}",
        text(&o),
        rig.alpha.log()
    );
    assert_eq!(
        fs::read_to_string(rig.path("beta/inbox/gen.csv")).unwrap(),
        "id,amount\n1,100\n"
    );

    // The receiver's own code: its import hook fails.
    fs::write(rig.path("export/hf.csv"), "y\n").unwrap();
    let o = rig.request("HOOKFAIL");
    assert_refused(&o, "hook_failed", &rig);

    // An outbox file's pre-send job runs on its spooled copy, which it may
    // rewrite: what arrives is what the job left.
    common::drop_file(&rig.path("alpha/stamp"), "s.csv", |t| {
        fs::write(t, "data\n").unwrap()
    });
    common::wait_until(WAIT, "the stamped file on beta", || {
        fs::read_to_string(rig.path("beta/inbox/s.csv")).is_ok_and(|t| t == "data\nstamped\n")
    });
    let job_path = fs::read_to_string(rig.path("stamp.path")).unwrap();
    assert!(
        job_path.starts_with(&rig.path("alpha/state/spool/STAMP/").display().to_string()),
        "HAKOBU_PATH was {job_path}"
    );

    // `hakobu send` without a path sends the source, to --to.
    fs::write(rig.path("export/sales.csv"), "second\n").unwrap();
    let b = rig.beta.node.clone();
    let o = rig
        .alpha
        .cli(&["send", "--file-id", "SRC", "--to", &b, "--wait"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\n{}",
        text(&o),
        rig.alpha.log()
    );
    assert_eq!(
        fs::read_to_string(rig.path("beta/inbox/sales.csv")).unwrap(),
        "second\n"
    );

    // Usage errors exit 2: no receive profile here for the file id, a
    // source profile sent without --to and no `to`.
    let a = rig.alpha.node.clone();
    let o = rig
        .beta
        .cli(&["request", "--file-id", "OTHER", "--from", &a, "--wait"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = rig.alpha.cli(&["send", "--file-id", "SRC"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

/// A request with `--wait` and no agent running on beta: a usage error.
#[test]
fn wait_needs_the_agent() {
    let rig = Rig::new(&rabbit_broker(0), &rabbit_broker(0));
    let o = rig.request("SRC");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("hakobu run"));
}

/// Nobody serves the request (alpha's agent is not running): `--wait
/// --timeout` gives up with `request_timeout`; the request waits in alpha's
/// queue, and alpha serves it when it starts.
#[test]
fn a_request_nobody_answers_times_out() {
    let mut rig = Rig::new(&rabbit_broker(0), &rabbit_broker(2));
    rig.beta.start();
    fs::write(rig.path("export/sales.csv"), "late\n").unwrap();
    let a = rig.alpha.node.clone();
    let o = rig.beta.cli(&[
        "request",
        "--file-id",
        "SRC",
        "--from",
        &a,
        "--wait",
        "--timeout",
        "1s",
    ]);
    assert_refused(&o, "request_timeout", &rig);
    rig.alpha.start();
    common::wait_until(WAIT, "the late request served", || {
        fs::read_to_string(rig.path("beta/inbox/sales.csv")).is_ok_and(|t| t == "late\n")
    });
}

/// The embedded broker: a pull, a denied request, and a forged one (a node
/// with credentials of its own publishing a request in beta's name) that
/// alpha dead-letters without sending anything.
#[test]
fn pull_on_the_embedded_broker_and_a_forged_request() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let section = broker.section();
    let mut rig = Rig::new(&section, &section);
    rig.start();
    pull_of_a_source(&rig);
    let o = rig.request("DENIED");
    assert_refused(&o, "request_denied", &rig);

    let mallory = unique("mallory");
    refuses_a_forged_request(&rig, |forged| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            use hakobu::broker::Broker;
            let m = hakobu::broker::embedded::Embedded::new(
                &broker.addr,
                broker.credentials(&mallory),
                1,
            );
            let c = m.publish(&rig.alpha.node, forged.encode()).await;
            c.unwrap().await.unwrap();
        });
    });
}

/// On the cluster with a broker user per node and `verify_sender` on (the
/// default): a pull works, and a request that mallory, logged in as
/// herself, publishes in beta's name is dead-lettered by alpha, which
/// sends nothing.
#[test]
fn pull_with_node_users_and_a_forged_request() {
    use common::rabbit::{login_url, rt};
    let (a, b, m) = (unique("alpha"), unique("beta"), unique("mallory"));
    let pw = common::node_users(&[&a, &b, &m]);
    let (ba, bb) = (
        common::node_broker(&a, &pw[0]),
        common::node_broker(&b, &pw[1]),
    );
    let mut rig = Rig::named((a.clone(), b.clone()), &ba, &bb);
    rig.start();
    pull_of_a_source(&rig);

    let mut cfg = hakobu::config::RabbitmqConfig::with_urls(vec![login_url(&m, &pw[2])]);
    cfg.confirm_timeout = Duration::from_secs(20);
    let mallory = hakobu::broker::rabbitmq::RabbitMq::new(cfg);
    refuses_a_forged_request(&rig, |forged| {
        rt().block_on(async {
            use hakobu::broker::Broker;
            let confirm = mallory.publish(&a, forged.encode()).await.expect("publish");
            confirm.await.expect("confirmed");
        });
    });
}

/// A request in beta's name for `SRC`, published by `publish` (with some
/// other node's credentials), is dead-lettered by alpha, which sends
/// nothing.
fn refuses_a_forged_request(rig: &Rig, publish: impl FnOnce(Message)) {
    let rows_before = rig.alpha.history().len();
    let inbox_before = rig.inbox();
    publish(Message::Request(Request {
        request_id: TransferId::new(),
        file_id: FileId::parse("SRC").unwrap(),
        from: NodeName::parse(&rig.beta.node).unwrap(),
        to: NodeName::parse(&rig.alpha.node).unwrap(),
        requested_at: "2026-12-02T00:00:00Z".into(),
    }));
    common::wait_until(WAIT, "alpha to refuse the forged request", || {
        rig.alpha
            .log()
            .contains("Dead-lettering a request whose sender is not its broker user.")
    });
    assert_eq!(rig.alpha.history().len(), rows_before, "nothing was sent");
    assert_eq!(rig.inbox(), inbox_before);
}

/// The worked example in `profiles/` as README and its comments tell it
/// (issue 13's "done when"): pull-alpha hosts the broker, pull-beta gets its
/// secret with `add-node` and asks for STOCK; pull-alpha's pre-send job
/// exports it in Shift_JIS with CRLF and it travels compressed; it arrives
/// in UTF-8 with LF; the import finds the database busy once and succeeds
/// on its second run; `hakobu request --wait` exits 0. Then pull-alpha no
/// longer lets pull-beta ask: the same request exits 1, `request_denied`.
#[test]
fn the_pull_example_in_profiles() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for sub in ["profiles", "hooks"] {
        fs::create_dir_all(w.join(sub)).unwrap();
        for e in fs::read_dir(repo.join(sub)).unwrap().flatten() {
            fs::copy(e.path(), w.join(sub).join(e.file_name())).unwrap();
        }
    }
    let yaml = |n: &str| fs::read_to_string(repo.join(format!("profiles/{n}.yaml"))).unwrap();
    let mut alpha = Agent::new("pull-alpha", w, &yaml("pull-alpha"));
    alpha.start();
    fs::create_dir_all(w.join("var/pull-beta")).unwrap();
    let added = std::process::Command::new(common::bin())
        .args(["broker", "add-node", "-c"])
        .arg(&alpha.config)
        .args(["pull-beta", "-o", "var/pull-beta/broker.secret"])
        .current_dir(w)
        .output()
        .unwrap();
    assert!(added.status.success(), "{}", text(&added));
    let mut beta = Agent::new("pull-beta", w, &yaml("pull-beta"));
    beta.start();
    let request = |beta: &Agent| {
        std::process::Command::new(common::bin())
            .args(["request", "-c"])
            .arg(&beta.config)
            .args(["--file-id", "STOCK", "--from", "pull-alpha"])
            .args(["--wait", "--timeout", "120s"])
            .current_dir(w)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // The database is busy at first: the import's first run fails (75).
    let lock = w.join("var/import.lock");
    fs::write(&lock, "").unwrap();
    let asking = request(&beta);
    let log = w.join("var/import.log");
    common::wait_until(WAIT, "the import to find the database busy", || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("busy attempt=1"))
    });
    fs::remove_file(&lock).unwrap();
    let o = asking.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\n{}\n{}",
        text(&o),
        alpha.log(),
        beta.log()
    );

    // Exported in Shift_JIS with CRLF; the source stays as the job wrote it.
    let source = fs::read(w.join("var/pull-alpha/export/stock.csv")).unwrap();
    let (text_sjis, _, bad) = encoding_rs::SHIFT_JIS.decode(&source);
    assert!(
        !bad && source.ends_with(b"\r\n"),
        "the export is not CP932 with CRLF"
    );
    assert!(
        std::str::from_utf8(&source).is_err(),
        "the export is not Shift_JIS"
    );
    // Placed in UTF-8 with LF: the same text.
    let placed = fs::read_to_string(w.join("var/pull-beta/inbox/stock.csv")).unwrap();
    assert!(
        placed.starts_with("品番,品名,数量,出力日時\n000001,ﾎﾞﾙﾄ①型,37,"),
        "{}",
        &placed[..80.min(placed.len())]
    );
    assert_eq!(placed, text_sjis.replace("\r\n", "\n"));
    // Compressed on the wire.
    let sent = alpha
        .history()
        .into_iter()
        .find(|r| r["direction"] == "send" && r["file_id"] == "STOCK")
        .expect("pull-alpha's row");
    let (size, wire) = (
        sent["size"].as_u64().unwrap(),
        sent["wire_bytes"].as_u64().unwrap(),
    );
    assert!(
        wire > 0 && wire * 3 < size,
        "{wire} bytes on the wire for {size}"
    );
    // Imported on the second run.
    let imported = fs::read_to_string(&log).unwrap();
    assert!(
        imported.contains("received from=pull-alpha file_id=STOCK")
            && imported.contains("attempt=2"),
        "{imported}"
    );

    // Pull-alpha no longer lets pull-beta ask.
    alpha.kill9();
    let denied = yaml("pull-alpha").replace(
        "requests_from: [ pull-beta ]",
        "requests_from: [ pull-gamma ]",
    );
    assert_ne!(denied, yaml("pull-alpha"));
    fs::write(&alpha.config, denied).unwrap();
    alpha.start();
    let o = request(&beta).wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("request_denied"), "{}", text(&o));
}
