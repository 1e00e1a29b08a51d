//! Code conversion (`convert:`) and the receive name (`name:`), end to end:
//! real agents on the real cluster and on the embedded broker (a `hakobu
//! broker` process), real files in real Japanese encodings, recording hooks
//! on both sides, history read back with `hakobu history --json`.

mod common;

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use common::{Agent, BrokerProcess, hook_env, recording_hook, sha256_file, unique, wait_until};

/// Shift_JIS (CP932) text with full-width kanji, half-width kana and the
/// NEC special character ① (0x87 0x40, CP932 only).
const SALES: &str = "売上,数量,ｶﾅ\r\n①,2\r\n東京,3\r\n";

fn encode(label: &str, text: &str) -> Vec<u8> {
    match label {
        "utf-16le" => text.encode_utf16().flat_map(u16::to_le_bytes).collect(),
        "utf-16be" => text.encode_utf16().flat_map(u16::to_be_bytes).collect(),
        _ => {
            let enc = encoding_rs::Encoding::for_label(label.as_bytes()).unwrap();
            let (bytes, _, unmappable) = enc.encode(text);
            assert!(!unmappable, "{text:?} in {label}");
            bytes.into_owned()
        }
    }
}

fn sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// One environment variable for an agent: (name, value).
type EnvVar<'a> = (&'a str, &'a str);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Broker {
    Rabbit,
    Embedded,
}

/// A sender and a receiver with one send and one receive profile per
/// `(file_id, send_extra, receive_extra)`, recording hooks on both sides.
struct Rig {
    root: PathBuf,
    alpha: Agent,
    beta: Agent,
    hooks: PathBuf,
    _broker: Option<BrokerProcess>,
    _tmp: tempfile::TempDir,
}

impl Rig {
    fn new(broker: Broker, profiles: &[(&str, &str, &str)]) -> Rig {
        Self::with_env(broker, profiles, (None, None))
    }

    /// [`Rig::new`] with one variable in the sending or the receiving
    /// agent's environment.
    fn with_env(
        broker: Broker,
        profiles: &[(&str, &str, &str)],
        (alpha_env, beta_env): (Option<EnvVar>, Option<EnvVar>),
    ) -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let (a, b) = (unique("calpha"), unique("cbeta"));
        let hooks = root.join("hooks");
        let hook = recording_hook(&hooks, "hook.sh");
        let (section, process) = match broker {
            Broker::Rabbit => (common::rabbit_broker(0), None),
            Broker::Embedded => {
                let p = BrokerProcess::start(&root);
                (p.section(), Some(p))
            }
        };
        let mut send = String::from("send:\n");
        let mut receive = String::from("receive:\n");
        for (id, send_extra, receive_extra) in profiles {
            send.push_str(&format!(
                "  - file_id: {id}\n    outbox: {root}/out/{id}\n    to: [ {b} ]\n    ready: {{ stable_for: 300ms }}\n    after_send: keep\n    on_success: [ \"{hook}\" ]\n    on_failure: [ \"{hook}\" ]\n{send_extra}",
                root = root.display(),
                hook = hook.display(),
            ));
            receive.push_str(&format!(
                "  - file_id: {id}\n    from: [ {a} ]\n    inbox: {root}/in/{id}\n    on_success: [ \"{hook}\" ]\n    on_failure: [ \"{hook}\" ]\n{receive_extra}",
                root = root.display(),
                hook = hook.display(),
            ));
            fs::create_dir_all(root.join("out").join(id)).unwrap();
        }
        let alpha_yaml = format!(
            "node: {a}\nstate_dir: {}/alpha-state\n{section}{send}",
            root.display()
        );
        let beta_yaml = format!(
            "node: {b}\nstate_dir: {}/beta-state\n{section}{receive}",
            root.display()
        );
        let mut beta = Agent::new(&b, &root.join("beta"), &beta_yaml);
        if let Some((k, v)) = beta_env {
            beta = beta.env(k, v);
        }
        let mut alpha = Agent::new(&a, &root.join("alpha"), &alpha_yaml);
        if let Some((k, v)) = alpha_env {
            alpha = alpha.env(k, v);
        }
        let mut rig = Rig {
            alpha,
            beta,
            root,
            hooks,
            _broker: process,
            _tmp: tmp,
        };
        rig.beta.start();
        rig.alpha.start();
        rig
    }

    fn inbox(&self, id: &str) -> PathBuf {
        self.root.join("in").join(id)
    }

    /// Drops `bytes` into profile `id`'s outbox as `name` (written aside, renamed in).
    fn drop_file(&self, id: &str, name: &str, bytes: &[u8]) {
        let tmp = self.root.join(format!(".{id}.{name}.tmp"));
        fs::write(&tmp, bytes).unwrap();
        fs::rename(&tmp, self.root.join("out").join(id).join(name)).unwrap();
    }

    /// Waits until alpha's transfer of profile `id` is settled (sent or
    /// failed) and returns alpha's and beta's history rows for it (beta's
    /// is `Null` when nothing arrived).
    fn settled(&self, id: &str) -> (serde_json::Value, serde_json::Value) {
        let mut row = serde_json::Value::Null;
        wait_until(
            Duration::from_secs(90),
            &format!("transfer of {id} settled"),
            || {
                row = self
                    .alpha
                    .history()
                    .into_iter()
                    .find(|r| r["file_id"] == id)
                    .unwrap_or_default();
                matches!(row["status"].as_str(), Some("sent" | "send_failed"))
            },
        );
        let tid = row["transfer_id"].as_str().unwrap().to_string();
        let beta = self
            .beta
            .history()
            .into_iter()
            .find(|r| r["transfer_id"] == tid.as_str())
            .unwrap_or_default();
        (row, beta)
    }

    /// Names left in an inbox's partial directory.
    fn partials(&self, id: &str) -> Vec<String> {
        common::dir_names(&self.inbox(id).join(".hakobu-partial"))
    }
}

/// What beta placed for profile `id`, by name.
fn placed(rig: &Rig, id: &str) -> Vec<(String, Vec<u8>)> {
    common::visible_names(&rig.inbox(id))
        .into_iter()
        .map(|n| {
            let bytes = fs::read(rig.inbox(id).join(&n)).unwrap();
            (n, bytes)
        })
        .collect()
}

fn conversions_on_arrival(broker: Broker) {
    let profiles = [
        (
            "SJIS",
            "",
            "    convert: { from: shift_jis, to: utf-8, newline: lf }\n",
        ),
        (
            "EUC",
            "",
            "    convert: { from: euc-jp, to: utf-16le, newline: crlf, bom: true }\n",
        ),
        (
            "U16",
            "",
            "    convert: { from: utf-16be, to: iso-2022-jp }\n",
        ),
        ("BOM", "", "    convert: { from: utf-8, to: shift_jis }\n"),
        (
            "BAD",
            "",
            "    convert: { from: shift_jis, to: utf-8, newline: lf }\n",
        ),
        (
            "REPL",
            "",
            "    convert: { from: shift_jis, to: utf-8, on_error: replace }\n",
        ),
    ];
    let rig = Rig::new(broker, &profiles);
    let sjis = encode("shift_jis", SALES);
    assert!(
        sjis.windows(2).any(|w| w == [0x87, 0x40]),
        "① is CP932's 0x8740"
    );
    rig.drop_file("SJIS", "sales.csv", &sjis);
    let text = "売上,数量\n①,東京\n";
    rig.drop_file("EUC", "e.txt", &encode("euc-jp", text));
    rig.drop_file("U16", "u.txt", &encode("utf-16be", text));
    let mut with_bom = b"\xEF\xBB\xBF".to_vec();
    with_bom.extend(text.as_bytes());
    rig.drop_file("BOM", "b.txt", &with_bom);
    let mut bad = encode("shift_jis", "売上,数量\r\n東京,3\r\n");
    let bad_at = bad.len() + 2;
    bad.extend(b"ab");
    bad.extend([0x82, 0x0A]); // a lead byte, then a newline: no character
    bad.extend(encode("shift_jis", "大阪\r\n"));
    rig.drop_file("BAD", "bad.csv", &bad);
    rig.drop_file("REPL", "r.csv", &bad);

    // Shift_JIS CRLF → UTF-8 LF, byte for byte; both digests and the lines.
    let (a, b) = rig.settled("SJIS");
    assert_eq!(a["status"], "sent", "{a}\n{}", rig.beta.log());
    let want = SALES.replace("\r\n", "\n");
    assert_eq!(
        placed(&rig, "SJIS"),
        vec![("sales.csv".to_string(), want.as_bytes().to_vec())]
    );
    assert_eq!(b["status"], "received");
    assert_eq!(b["sha256"], sha(&sjis).as_str());
    assert_eq!(b["placed_sha256"], sha(want.as_bytes()).as_str());
    assert_eq!(b["records"], 3);
    let tid = b["transfer_id"].as_str().unwrap();
    let env = hook_env(&rig.hooks, tid, "received");
    assert_eq!(env.get("HAKOBU_RECORDS").map(String::as_str), Some("3"));
    assert_eq!(env.get("HAKOBU_SHA256"), Some(&sha(&sjis)));
    assert_eq!(env.get("HAKOBU_PLACED_SHA256"), Some(&sha(want.as_bytes())));
    assert_eq!(
        sha256_file(&rig.inbox("SJIS").join("sales.csv")),
        sha(want.as_bytes())
    );
    assert!(
        rig.partials("SJIS").is_empty(),
        "{:?}",
        rig.partials("SJIS")
    );

    // EUC-JP → UTF-16LE with a BOM and CRLF.
    let (a, _) = rig.settled("EUC");
    assert_eq!(a["status"], "sent", "{a}");
    let mut want = b"\xFF\xFE".to_vec();
    want.extend(encode("utf-16le", &text.replace('\n', "\r\n")));
    assert_eq!(placed(&rig, "EUC"), vec![("e.txt".to_string(), want)]);

    // UTF-16BE → ISO-2022-JP.
    let (a, _) = rig.settled("U16");
    assert_eq!(a["status"], "sent", "{a}");
    assert_eq!(
        placed(&rig, "U16"),
        vec![("u.txt".to_string(), encode("iso-2022-jp", text))]
    );

    // A UTF-8 BOM is stripped, not converted.
    let (a, b) = rig.settled("BOM");
    assert_eq!(a["status"], "sent", "{a}");
    assert_eq!(
        placed(&rig, "BOM"),
        vec![("b.txt".to_string(), encode("shift_jis", text))]
    );
    assert_eq!(b["records"], 2);

    // An undecodable byte: refused with its offset and line, nothing placed,
    // the failure hooks run on both sides, the code in the receipt.
    let (a, b) = rig.settled("BAD");
    assert_eq!(a["status"], "send_failed", "{a}");
    assert_eq!(a["error_code"], "conversion_failed");
    assert_eq!(b["status"], "receive_failed");
    assert_eq!(b["error_code"], "conversion_failed");
    let error = b["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("byte offset {bad_at} (line 3)")),
        "{error}"
    );
    assert!(placed(&rig, "BAD").is_empty());
    let tid = b["transfer_id"].as_str().unwrap();
    wait_until(Duration::from_secs(30), "beta's failure hook", || {
        hook_env(&rig.hooks, tid, "receive_failed").contains_key("HAKOBU_ERROR_CODE")
    });
    let env = hook_env(&rig.hooks, tid, "receive_failed");
    assert_eq!(env["HAKOBU_ERROR_CODE"], "conversion_failed");
    wait_until(Duration::from_secs(30), "the partial files removed", || {
        rig.partials("BAD").is_empty()
    });

    // `on_error: replace`: the same file placed with U+FFFD in its place.
    let (a, _) = rig.settled("REPL");
    assert_eq!(a["status"], "sent", "{a}");
    let got = placed(&rig, "REPL");
    assert_eq!(
        String::from_utf8(got[0].1.clone()).unwrap(),
        "売上,数量\r\n東京,3\r\nab\u{FFFD}\n大阪\r\n"
    );
}

fn conversion_before_sending(broker: Broker) {
    let profiles = [
        (
            "OUT",
            "    convert: { from: utf-8, to: shift_jis, newline: crlf }\n",
            "",
        ),
        (
            "OUTBAD",
            "    convert: { from: utf-8, to: shift_jis }\n",
            "",
        ),
    ];
    let rig = Rig::new(broker, &profiles);
    let text = "売上,数量,ｶﾅ\n①,2\n東京,3\n";
    rig.drop_file("OUT", "sales.csv", text.as_bytes());
    let (a, b) = rig.settled("OUT");
    assert_eq!(a["status"], "sent", "{a}\n{}", rig.alpha.log());
    let want = encode("shift_jis", SALES);
    assert_eq!(
        placed(&rig, "OUT"),
        vec![("sales.csv".to_string(), want.clone())]
    );
    // What was chunked and digested is the converted file.
    assert_eq!(a["sha256"], sha(&want).as_str());
    assert_eq!(a["size"], want.len());
    assert_eq!(a["records"], 3);
    assert_eq!(b["sha256"], sha(&want).as_str());
    assert_eq!(fs::read(a["path"].as_str().unwrap()).unwrap(), want);

    // A character Shift_JIS cannot hold: failed before anything is
    // published, the sender's failure hook run, the file kept in the spool.
    let emoji = "ok\n売上😀\n";
    rig.drop_file("OUTBAD", "e.csv", emoji.as_bytes());
    let (a, b) = rig.settled("OUTBAD");
    assert_eq!(a["status"], "send_failed", "{a}");
    assert_eq!(a["error_code"], "conversion_failed");
    let error = a["error"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "byte offset {} (line 2)",
            emoji.find('😀').unwrap()
        )),
        "{error}"
    );
    assert!(b.is_null(), "nothing reached the receiver: {b}");
    let tid = a["transfer_id"].as_str().unwrap();
    wait_until(Duration::from_secs(30), "alpha's failure hook", || {
        hook_env(&rig.hooks, tid, "send_failed").contains_key("HAKOBU_ERROR_CODE")
    });
    assert_eq!(
        fs::read(a["path"].as_str().unwrap()).unwrap(),
        emoji.as_bytes()
    );
    assert!(placed(&rig, "OUTBAD").is_empty());

    // `hakobu send` converts too, and refuses what does not convert.
    let src = rig.root.join("manual.csv");
    fs::write(&src, "東京\n").unwrap();
    let out = rig
        .alpha
        .cli(&["send", "--file-id", "OUT", src.to_str().unwrap(), "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(Duration::from_secs(30), "manual.csv placed", || {
        rig.inbox("OUT").join("manual.csv").exists()
    });
    assert_eq!(
        fs::read(rig.inbox("OUT").join("manual.csv")).unwrap(),
        encode("shift_jis", "東京\r\n")
    );
    fs::write(&src, "😀\n").unwrap();
    let out = rig
        .alpha
        .cli(&["send", "--file-id", "OUT", src.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("conversion_failed"), "{stderr}");
}

fn receive_names(broker: Broker) {
    let profiles = [(
        "NAMED",
        "",
        "    name: \"{meta.branch}_{stem}_{date}.{ext}\"\n",
    )];
    let rig = Rig::new(broker, &profiles);
    let today = std::process::Command::new("date")
        .arg("+%Y%m%d")
        .output()
        .unwrap();
    let today = String::from_utf8(today.stdout).unwrap().trim().to_string();
    let src = rig.root.join("sales.csv");
    fs::write(&src, "1,2\n").unwrap();
    let send = |meta: &str| {
        let out = rig.alpha.cli(&[
            "send",
            "--file-id",
            "NAMED",
            src.to_str().unwrap(),
            "--meta",
            meta,
            "--wait",
        ]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = send("branch=tokyo");
    assert_eq!(code, Some(0), "{out}");
    let name = format!("tokyo_sales_{today}.csv");
    assert_eq!(
        common::visible_names(&rig.inbox("NAMED")),
        vec![name.clone()]
    );
    // A metadata value that would leave the inbox, or pass for an option.
    for bad in ["../x", "-rf", "a/b"] {
        let (code, out) = send(&format!("branch={bad}"));
        assert_eq!(code, Some(1), "{bad}: {out}");
        assert!(out.contains("bad_receive_name"), "{bad}: {out}");
    }
    assert_eq!(common::visible_names(&rig.inbox("NAMED")), vec![name]);
    assert!(!rig.root.join("in/x").exists());
    let failed: Vec<_> = rig
        .beta
        .history()
        .into_iter()
        .filter(|r| r["error_code"] == "bad_receive_name")
        .collect();
    assert_eq!(failed.len(), 3, "{failed:?}");
    assert!(rig.partials("NAMED").is_empty());
}

macro_rules! on_both {
    ($($name:ident),+) => {
        mod rabbit {
            $(#[test] fn $name() { super::$name(super::Broker::Rabbit) })+
        }
        mod embedded {
            $(#[test] fn $name() { super::$name(super::Broker::Embedded) })+
        }
    };
}

on_both!(
    conversions_on_arrival,
    conversion_before_sending,
    receive_names
);

/// The receiver killed right after writing the converted file, before
/// placing it: nothing half-converted in the inbox, and the restarted agent
/// converts again from the received file and places it.
#[test]
fn a_crash_mid_conversion_resumes() {
    let profiles = [(
        "SJIS",
        "",
        "    convert: { from: shift_jis, to: utf-8, newline: lf }\n",
    )];
    let mut rig = Rig::with_env(
        Broker::Embedded,
        &profiles,
        (None, Some(("HAKOBU_FAILPOINT", "receiver.convert.written"))),
    );
    let sjis = encode("shift_jis", SALES);
    rig.drop_file("SJIS", "sales.csv", &sjis);
    wait_until(
        Duration::from_secs(60),
        "beta to die at its failpoint",
        || !rig.beta.alive(),
    );
    assert!(common::visible_names(&rig.inbox("SJIS")).is_empty());
    assert!(
        rig.partials("SJIS").iter().any(|n| n.ends_with(".conv")),
        "{:?}",
        rig.partials("SJIS")
    );
    // The same configuration, without the failpoint.
    rig.beta.kill9();
    let (node, yaml) = (
        rig.beta.node.clone(),
        fs::read_to_string(&rig.beta.config).unwrap(),
    );
    rig.beta = Agent::new(&node, &rig.root.join("beta"), &yaml);
    rig.beta.start();
    let (a, b) = rig.settled("SJIS");
    assert_eq!(a["status"], "sent", "{a}\n{}", rig.beta.log());
    assert_eq!(b["records"], 3);
    let want = SALES.replace("\r\n", "\n");
    assert_eq!(
        placed(&rig, "SJIS"),
        vec![("sales.csv".to_string(), want.into_bytes())]
    );
    assert!(
        rig.partials("SJIS").is_empty(),
        "{:?}",
        rig.partials("SJIS")
    );
}

/// The sender killed after recording a converted transfer and before the
/// converted file took the spooled file's name: the restarted agent puts
/// the converted file in place and sends it, converted once, not twice.
#[test]
fn a_sender_crash_mid_conversion_converts_once() {
    let profiles = [(
        "OUT",
        "    convert: { from: utf-8, to: shift_jis, newline: crlf }\n",
        "",
    )];
    let mut rig = Rig::with_env(
        Broker::Embedded,
        &profiles,
        (Some(("HAKOBU_FAILPOINT", "sender.convert.recorded")), None),
    );
    let text = "売上,数量,ｶﾅ\n①,2\n東京,3\n";
    rig.drop_file("OUT", "sales.csv", text.as_bytes());
    wait_until(
        Duration::from_secs(60),
        "alpha to die at its failpoint",
        || !rig.alpha.alive(),
    );
    rig.alpha.kill9();
    let (node, yaml) = (
        rig.alpha.node.clone(),
        fs::read_to_string(&rig.alpha.config).unwrap(),
    );
    rig.alpha = Agent::new(&node, &rig.root.join("alpha"), &yaml);
    rig.alpha.start();
    let (a, b) = rig.settled("OUT");
    assert_eq!(a["status"], "sent", "{a}\n{}", rig.alpha.log());
    let want = encode("shift_jis", SALES);
    assert_eq!(
        placed(&rig, "OUT"),
        vec![("sales.csv".to_string(), want.clone())]
    );
    assert_eq!(b["sha256"], sha(&want).as_str());
    assert_eq!(a["records"], 3);
    let spool = PathBuf::from(a["path"].as_str().unwrap());
    assert_eq!(fs::read(&spool).unwrap(), want);
    let hidden: Vec<_> = common::dir_names(spool.parent().unwrap())
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}
