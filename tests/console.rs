//! The web console in a real browser (issue 14): Debian's headless Chromium
//! driven over WebDriver against an agent pair on the embedded broker with
//! real transfers: one received, one whose receive hook failed, one in
//! flight under a bandwidth cap. Screenshots of each page go to
//! target/console-screenshots/.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::http::{Client, free_port};
use common::webdriver::Browser;
use common::{Agent, BrokerProcess, drop_file, wait_until, write_pattern};
use hakobu::error_code::ErrorCode;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);
/// The succeeded transfer's name: markup a console must print as text.
const XSS_NAME: &str = "<img src=x onerror=alert(1)>.csv";

fn screenshots() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots")
}

/// The receive hook of file id BAD: records each run, and fails until the
/// operator has "fixed" the job (the file `fixed` exists).
fn import_hook(dir: &Path) -> PathBuf {
    let path = dir.join("import.sh");
    let script = format!(
        "#!/bin/sh\necho \"run $HAKOBU_TRANSFER_ID\" >> {d}/import-runs.log\nif [ -e {d}/fixed ]; then echo imported; exit 0; fi\necho 'import failed: row 3 has no customer id'\nexit 1\n",
        d = dir.display()
    );
    fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn row<'a>(rows: &'a [Value], file_id: &str) -> Option<&'a Value> {
    rows.iter().find(|r| r["file_id"] == file_id)
}

/// Polls `f` in the page until it gives a value other than null/false.
fn wait_js(b: &Browser, what: &str, script: &str, args: Value) -> Value {
    let start = Instant::now();
    loop {
        let v = b.js(script, args.clone());
        if !v.is_null() && v != false {
            return v;
        }
        assert!(start.elapsed() < WAIT, "{what}: not seen on {}", b.url());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_browser_shows_failures_first_progress_history_and_a_transfer_with_its_rerun() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let broker = BrokerProcess::start(&root.join("broker"));
    let hook = import_hook(root);
    let (hport, aport) = (free_port(), free_port());
    let mut beta = Agent::new(
        "beta",
        &root.join("beta"),
        &format!(
            "node: beta\nstate_dir: {r}/beta/state\n{b}http:\n  listen: \"127.0.0.1:{hport}\"\nreceive:\n  - file_id: OK\n    from: [ alpha ]\n    inbox: {r}/in/ok\n    mode: replace\n  - file_id: BAD\n    from: [ alpha ]\n    inbox: {r}/in/bad\n    mode: replace\n    on_success: [ \"{h}\" ]\n  - file_id: BIG\n    from: [ alpha ]\n    inbox: {r}/in/big\n",
            r = root.display(),
            b = broker.section(),
            h = hook.display(),
        ),
    );
    let mut alpha = Agent::new(
        "alpha",
        &root.join("alpha"),
        &format!(
            "node: alpha\nstate_dir: {r}/alpha/state\n{b}http:\n  listen: \"127.0.0.1:{aport}\"\nsend:\n  - file_id: OK\n    outbox: {r}/out/ok\n    to: [ beta ]\n  - file_id: BAD\n    outbox: {r}/out/bad\n    to: [ beta ]\n  - file_id: BIG\n    outbox: {r}/out/big\n    to: [ beta ]\n    chunk_size: 256KiB\n    bandwidth: 1MiB/s\n",
            r = root.display(),
            b = broker.section(),
        ),
    );
    beta.start();
    alpha.start();
    let base = format!("http://127.0.0.1:{hport}");
    let api = Client::new(&base).with_token_file(&root.join("beta/state/http.token"));
    let token = api.token.clone().unwrap();

    // One received, one whose receive hook failed (exit 1).
    drop_file(&root.join("out/ok"), XSS_NAME, |p| {
        fs::write(p, "id;amount\n1;10\n").unwrap()
    });
    drop_file(&root.join("out/bad"), "orders.csv", |p| {
        fs::write(p, "id;customer\n1;\n").unwrap()
    });
    wait_until(WAIT, "beta settles OK and BAD", || {
        let rows = beta.history();
        row(&rows, "OK").is_some_and(|r| r["status"] == "received")
            && row(&rows, "BAD")
                .is_some_and(|r| r["status"] == "hook_failed" && r["receipt_sent"] == true)
    });
    let rows = beta.history();
    let ok_tid = row(&rows, "OK").unwrap()["transfer_id"]
        .as_str()
        .unwrap()
        .to_string();
    let bad_tid = row(&rows, "BAD").unwrap()["transfer_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        fs::read_to_string(root.join("import-runs.log"))
            .unwrap()
            .lines()
            .count(),
        1
    );

    let shots = screenshots();
    let b = Browser::start();

    // Without the token every page goes to the login page.
    for path in ["/", "/history", &format!("/transfers/{bad_tid}")] {
        b.goto(&format!("{base}{path}"));
        assert_eq!(b.url(), format!("{base}/login"), "{path} without a session");
    }
    b.screenshot(&shots, "01-login");
    b.type_into("#token", &token);
    b.click("button[type=submit]");
    wait_js(
        &b,
        "the overview after signing in",
        "return document.querySelector('#failures') !== null;",
        json!([]),
    );
    assert_eq!(b.url(), format!("{base}/"));

    // A transfer in flight: 16 MiB at 1 MiB/s.
    drop_file(&root.join("out/big"), "big.bin", |p| {
        write_pattern(p, 16 << 20, 7)
    });
    let mut big_tid = String::new();
    wait_until(WAIT, "beta to show BIG in flight", || {
        let a = api.get("/console/inflight.json");
        assert_eq!(a.status, 200, "{a:?}");
        let rows = a.json();
        if let Some(r) = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["done"].as_u64().unwrap_or(0) > 0)
        {
            big_tid = r["transfer_id"].as_str().unwrap().to_string();
            return true;
        }
        false
    });
    b.goto(&format!("{base}/"));
    let sections = b.js(
        "return [...document.querySelectorAll('main section')].map(s => s.id);",
        json!([]),
    );
    assert_eq!(
        sections,
        json!(["failures", "inflight", "awaiting", "recent"]),
        "failures come first"
    );
    let failures = b.js(
        "return [...document.querySelectorAll('#failures tbody tr')].map(tr => ({id: tr.dataset.transfer, code: tr.querySelector('td.code').textContent, sentence: tr.querySelector('td.sentence').textContent, todo: tr.querySelector('td.todo').textContent, name: tr.querySelector('td.name').textContent}));",
        json!([]),
    );
    assert_eq!(
        failures,
        json!([{
            "id": bad_tid,
            "code": "hook_failed",
            "sentence": ErrorCode::HookFailed.sentence(),
            "todo": ErrorCode::HookFailed.what_to_do(),
            "name": "orders.csv",
        }]),
        "the failed transfer with its code, sentence and what to do"
    );
    let bar = "const el = [...document.querySelectorAll('#inflight .progress')].find(e => e.dataset.key.startsWith(arguments[0])); return el ? {value: Number(el.querySelector('progress').value), max: Number(el.querySelector('progress').max), text: el.querySelector('.bytes').textContent} : null;";
    let first = wait_js(&b, "the in-flight bar", bar, json!([big_tid]));
    assert_eq!(first["max"], json!(16 << 20), "{first}");
    assert!(
        first["text"].as_str().unwrap().ends_with("/ 16.0 MiB"),
        "{first}"
    );
    b.screenshot(&shots, "02-overview-in-flight");
    let v0 = first["value"].as_f64().unwrap();
    let moved = wait_js(
        &b,
        "the bar to move (app.js polling /console/inflight.json)",
        "const el = [...document.querySelectorAll('#inflight .progress')].find(e => e.dataset.key.startsWith(arguments[0])); const v = el ? Number(el.querySelector('progress').value) : 0; return v > arguments[1] ? v : null;",
        json!([big_tid, v0]),
    );
    assert!(moved.as_f64().unwrap() > v0, "{moved}");

    // The file name from the network is text, not markup.
    let names = b.js(
        "return {names: [...document.querySelectorAll('td.name')].map(td => td.textContent), imgs: document.querySelectorAll('img').length};",
        json!([]),
    );
    assert!(
        names["names"]
            .as_array()
            .unwrap()
            .contains(&json!(XSS_NAME)),
        "{names}"
    );
    assert_eq!(names["imgs"], 0, "the file name became an element");
    let raw = api.get("/");
    assert!(!raw.body.contains("<img"), "raw markup in the page");
    assert!(
        raw.header("content-security-policy")
            .is_some_and(|c| c.contains("script-src 'self'") && !c.contains("unsafe-inline")),
        "{:?}",
        raw.headers
    );

    // History, filtered through its form.
    b.goto(&format!("{base}/history"));
    b.js(
        "document.querySelector('select[name=status]').value = 'failed';",
        json!([]),
    );
    b.click("#apply");
    let ids = "return location.search.includes(arguments[0]) ? [...document.querySelectorAll('#results tbody tr')].map(tr => tr.dataset.transfer) : null;";
    let failed = wait_js(&b, "the failed filter", ids, json!(["status=failed"]));
    assert_eq!(failed, json!([bad_tid]));
    b.screenshot(&shots, "03-history-failed");
    b.goto(&format!("{base}/history"));
    b.type_into("input[name=file_id]", "OK");
    b.click("#apply");
    let ok = wait_js(&b, "the file id filter", ids, json!(["file_id=OK"]));
    assert_eq!(ok, json!([ok_tid]));
    b.goto(&format!("{base}/history?peer=nobody"));
    assert_eq!(b.text("#count"), "No transfer matches.");

    // The failed transfer's page, then its Rerun once the job is fixed.
    b.goto(&format!("{base}/transfers/{bad_tid}"));
    assert_eq!(b.text(".error code.code"), "hook_failed");
    assert_eq!(b.text(".error .sentence"), ErrorCode::HookFailed.sentence());
    assert!(
        b.text("pre.tail").contains("row 3 has no customer id"),
        "the hook's output"
    );
    assert_eq!(
        b.js(
            "return [!!document.querySelector('#rerun'), !!document.querySelector('#resend')];",
            json!([])
        ),
        json!([true, false]),
        "Rerun applies; Resend only where this node sent the file"
    );
    b.screenshot(&shots, "04-transfer-failed");
    fs::write(root.join("fixed"), "").unwrap();
    b.click("#rerun");
    let said = wait_js(
        &b,
        "the rerun's answer",
        "const t = document.querySelector('#action-result').textContent; return t.includes('exit') || t.includes('_') ? t : null;",
        json!([]),
    );
    assert!(
        said.as_str().unwrap().contains("ran again: exit 0"),
        "{said}"
    );
    assert_eq!(
        fs::read_to_string(root.join("import-runs.log"))
            .unwrap()
            .lines()
            .count(),
        2,
        "the hook ran again"
    );
    b.screenshot(&shots, "05-transfer-rerun");
    b.goto(&format!("{base}/transfers/{bad_tid}"));
    assert_eq!(
        b.js(
            "return document.querySelector('section.row').dataset.status;",
            json!([])
        ),
        "received"
    );

    // A refused action answers with its code and sentence.
    let mut csrf = api.clone();
    csrf.headers.push("X-Hakobu-Csrf: 1".into());
    let a = csrf.request(
        "POST",
        &format!("/console/transfers/{ok_tid}/resend"),
        None,
        None,
    );
    assert_eq!(a.status, 404, "{a:?}");
    assert_eq!(a.json()["code"], "unknown_transfer");
    assert_eq!(a.json()["sentence"], ErrorCode::UnknownTransfer.sentence());

    // Resend, from the sending node's console: the spooled copy goes again.
    let abase = format!("http://127.0.0.1:{aport}");
    let atoken = fs::read_to_string(root.join("alpha/state/http.token")).unwrap();
    b.goto(&format!("{abase}/transfers/{ok_tid}"));
    assert_eq!(b.url(), format!("{abase}/login"));
    b.type_into("#token", atoken.trim());
    b.click("button[type=submit]");
    wait_js(
        &b,
        "alpha's overview",
        "return document.querySelector('#failures') !== null;",
        json!([]),
    );
    // The delivered file's spooled copy is gone (after_send): refused, with
    // the code, its sentence and what to do.
    b.goto(&format!("{abase}/transfers/{ok_tid}"));
    assert_eq!(b.text("section.row h2 .status"), "sent");
    b.click("#resend");
    let code = wait_js(
        &b,
        "the refusal",
        "const c = document.querySelector('#action-result.refused .code'); return c ? c.textContent : null;",
        json!([]),
    );
    assert_eq!(code, "spool_unreadable");
    assert_eq!(
        b.text("#action-result .sentence"),
        ErrorCode::SpoolUnreadable.sentence()
    );
    b.screenshot(&shots, "06-transfer-resend-refused");
    // The failed one stays in the spool: sent again, and this time its
    // (fixed) hook succeeds at beta.
    wait_until(WAIT, "alpha to settle BAD", || {
        alpha
            .history()
            .iter()
            .any(|r| r["file_id"] == "BAD" && r["status"] == "send_failed")
    });
    b.goto(&format!("{abase}/transfers/{bad_tid}"));
    b.click("#resend");
    let said = wait_js(
        &b,
        "the resend's answer",
        "const t = document.querySelector('#action-result').textContent; return t.includes('Queued') || t.includes('_') ? t : null;",
        json!([]),
    );
    assert!(said.as_str().unwrap().contains("Queued again as"), "{said}");
    b.screenshot(&shots, "07-transfer-resent");
    wait_until(WAIT, "beta to receive the resent copy", || {
        beta.history()
            .iter()
            .filter(|r| r["file_id"] == "BAD" && r["status"] == "received")
            .count()
            == 2
    });
    // The command line goes through the same action and code.
    let out = alpha.cli(&["resend", "0190f6c4-0000-7000-8000-000000000001"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("error_code=unknown_transfer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(b);
    drop(alpha);
}
