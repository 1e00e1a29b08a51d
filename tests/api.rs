//! The REST API (issue 14): history filtered and paged, one transfer with
//! its timeline, digests and hook output, sending (the profile's source, or
//! an upload) at once or waiting, requesting a file, errors with stable
//! codes, and the OpenAPI document checked by a validator and against the
//! routes. Real agents on a `hakobu broker` process, real `curl`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::http::{Answer, Client, start_pair};
use common::{Agent, BrokerProcess, sha256_file, wait_until, write_pattern};

const WAIT: Duration = Duration::from_secs(60);

/// alpha sends DATA to beta (its `source` is daily.csv) and serves REPORT
/// to beta on request; beta's DATA hook refuses names starting with `bad`.
/// Both serve `http:`.
struct Rig {
    tmp: tempfile::TempDir,
    _broker: BrokerProcess,
    _alpha: Agent,
    beta: Agent,
    a: Client,
    b: Client,
}

impl Rig {
    fn new() -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let broker = BrokerProcess::start(t);
        fs::write(t.join("daily.csv"), "day,total\n1,100\n").unwrap();
        fs::write(t.join("report.csv"), "report\n").unwrap();
        let alpha_send = format!(
            "  - file_id: DATA\n    source: {source}\n    to: [ beta ]\n  - file_id: REPORT\n    source: {report}\n    requests_from: [ beta ]\n",
            source = t.join("daily.csv").display(),
            report = t.join("report.csv").display(),
        );
        let beta_more = format!(
            "  - file_id: REPORT\n    from: [ alpha ]\n    inbox: {inbox}\n",
            inbox = t.join("inbox").display(),
        );
        let (alpha, beta, a, b) = start_pair(t, &broker.section(), (&alpha_send, &beta_more));
        Rig {
            tmp,
            _broker: broker,
            _alpha: alpha,
            beta,
            a,
            b,
        }
    }

    /// `POST /api/send/DATA?name=NAME&...` with `size` bytes as the body.
    fn upload(&self, name: &str, size: u64, query: &str) -> (Answer, PathBuf) {
        let src = self
            .tmp
            .path()
            .join(format!("upload-{}", name.replace('/', "_")));
        write_pattern(&src, size, size);
        let body = format!("@{}", src.display());
        let a = self.a.request(
            "POST",
            &format!("/api/send/DATA?name={name}{query}"),
            Some(&body),
            Some("application/octet-stream"),
        );
        (a, src)
    }
}

fn code(a: &Answer) -> String {
    a.json()["code"].as_str().unwrap_or_default().to_string()
}

#[test]
fn send_list_show_and_request_through_the_api() {
    let rig = Rig::new();

    // An upload, waiting: 200 once beta's hook has run, with the digest.
    let (ok, src) = rig.upload("good.csv", 100_000, "&wait=25s");
    assert_eq!(ok.status, 200, "{}", ok.body);
    let ok = ok.json();
    let good_id = ok["transfer_id"].as_str().unwrap().to_string();
    assert_eq!(ok["transfers"][0]["status"], "sent", "{ok}");
    assert_eq!(ok["transfers"][0]["sha256"], sha256_file(&src).as_str());
    assert_eq!(
        sha256_file(&rig.tmp.path().join("inbox/good.csv")),
        sha256_file(&src)
    );

    // beta's hook refuses it: 502 with the code.
    let (bad, _) = rig.upload("bad.csv", 4321, "&wait=25s");
    assert_eq!(bad.status, 502, "{}", bad.body);
    assert_eq!(code(&bad), "hook_failed", "{}", bad.body);

    // At once: 202 with the id; the transfer goes on by itself.
    let (later, _) = rig.upload("later.csv", 10, "");
    assert_eq!(later.status, 202, "{}", later.body);
    let later_id = later.json()["transfer_id"].as_str().unwrap().to_string();
    wait_until(WAIT, "the 202 upload to be sent", || {
        rig.a.get(&format!("/api/transfers/{later_id}")).json()["rows"][0]["status"] == "sent"
    });

    // The profile's source, waiting.
    let s = rig.a.post_json(
        "/api/send",
        &serde_json::json!({ "file_id": "DATA", "wait": "25s" }),
    );
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(s.json()["transfers"][0]["file_name"], "daily.csv");

    // History on alpha: four sends, filters and paging.
    let page = rig.a.get("/api/transfers?direction=send&limit=2").json();
    assert_eq!(page["total"], 4, "{page}");
    assert_eq!(page["transfers"].as_array().unwrap().len(), 2);
    let next = rig
        .a
        .get("/api/transfers?direction=send&limit=2&offset=2")
        .json();
    assert_eq!(next["transfers"].as_array().unwrap().len(), 2);
    assert_ne!(
        page["transfers"][0]["transfer_id"],
        next["transfers"][0]["transfer_id"]
    );
    let future = rig
        .a
        .get("/api/transfers?since=2999-01-01T00:00:00Z")
        .json();
    assert_eq!(future["total"], 0);

    // On beta: the failed one, with its hook's output and its timeline.
    let failed = rig.b.get("/api/transfers?failed=true&file_id=DATA").json();
    assert_eq!(failed["total"], 1, "{failed}");
    let bad_id = failed["transfers"][0]["transfer_id"].as_str().unwrap();
    let one = rig.b.get(&format!("/api/transfers/{bad_id}")).json();
    let row = &one["rows"][0];
    assert_eq!(row["error_code"], "hook_failed", "{one}");
    assert!(
        row["hook_tail"]
            .as_str()
            .unwrap()
            .contains("refused bad.csv"),
        "{one}"
    );
    assert!(row["sha256"].as_str().is_some_and(|d| d.len() == 64));
    let statuses: Vec<&str> = one["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.first(), Some(&"receiving"), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&"hook_failed"), "{statuses:?}");
    let good = rig.b.get(&format!("/api/transfers/{good_id}")).json();
    assert_eq!(good["rows"][0]["status"], "received", "{good}");
    let chain = rig.b.get(&format!("/api/transfers/{good_id}/chain")).json();
    assert_eq!(chain["root"], good_id.as_str(), "{chain}");
    assert_eq!(chain["steps"].as_array().map(Vec::len), Some(1), "{chain}");

    // Rerun on beta: the failed hook runs again and fails again (502 with
    // its code); the good one's succeeds. Resend on alpha: a new transfer.
    let again = rig.b.post_json(
        &format!("/api/transfers/{bad_id}/rerun"),
        &serde_json::json!({}),
    );
    assert_eq!(again.status, 502, "{}", again.body);
    assert_eq!(again.json()["code"], "hook_failed");
    assert_eq!(again.json()["ran"], true);
    let again = rig.b.post_json(
        &format!("/api/transfers/{good_id}/rerun"),
        &serde_json::json!({}),
    );
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["ok"], true);
    let runs = rig.b.get(&format!("/api/transfers/{good_id}")).json();
    let hook_runs = runs["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["status"] == "hook_running")
        .count();
    assert_eq!(hook_runs, 2, "the timeline shows the rerun: {runs}");
    // The inbox keeps the failed file (mode `new`): out of the way first.
    fs::remove_file(rig.tmp.path().join("inbox/bad.csv")).unwrap();
    let resent = rig.a.post_json(
        &format!("/api/transfers/{bad_id}/resend"),
        &serde_json::json!({}),
    );
    assert_eq!(resent.status, 202, "{}", resent.body);
    let new_id = resent.json()["transfer_ids"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_id, bad_id);
    wait_until(WAIT, "the resent file to settle on alpha", || {
        let r = rig.a.get(&format!("/api/transfers/{new_id}")).json();
        !matches!(
            r["rows"][0]["status"].as_str(),
            Some("queued" | "sending" | "awaiting_receipt")
        )
    });
    let r = rig.b.get(&format!("/api/transfers/{new_id}"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["rows"][0]["error_code"],
        "hook_failed",
        "{}",
        r.body
    );
    let on_beta = rig.b.post_json(
        &format!("/api/transfers/{bad_id}/resend"),
        &serde_json::json!({}),
    );
    assert_eq!(on_beta.status, 404, "beta never sent it: {}", on_beta.body);
    assert_eq!(code(&on_beta), "unknown_transfer");

    // A pull: beta asks alpha for REPORT and waits for it.
    let r = rig.b.post_json(
        "/api/requests",
        &serde_json::json!({ "file_id": "REPORT", "from": "alpha", "wait": "25s" }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let request_id = r.json()["request_id"].as_str().unwrap().to_string();
    let state = rig.b.get(&format!("/api/requests/{request_id}")).json();
    assert_eq!(state["status"], "answered", "{state}");
    assert_eq!(state["ok"], true);
    assert_eq!(
        fs::read_to_string(rig.tmp.path().join("inbox/report.csv")).unwrap(),
        "report\n"
    );
}

#[test]
fn bad_calls_get_stable_codes() {
    let mut rig = Rig::new();
    let c = &rig.a;
    let expect = |a: Answer, status: u16, want: &str| {
        assert_eq!(a.status, status, "{}", a.body);
        assert_eq!(code(&a), want, "{}", a.body);
        assert!(!a.json()["message"].as_str().unwrap().is_empty());
    };
    expect(c.get("/api/transfers?limit=0"), 400, "bad_request");
    expect(c.get("/api/transfers?bogus=1"), 400, "bad_request");
    expect(c.get("/api/transfers?since=yesterday"), 400, "bad_request");
    expect(c.get("/api/transfers?status=nonsense"), 400, "bad_request");
    expect(c.get("/api/transfers/not-an-id"), 400, "bad_request");
    let unknown = "0190c0de-0000-7000-8000-000000000000";
    expect(
        c.get(&format!("/api/transfers/{unknown}")),
        404,
        "unknown_transfer",
    );
    expect(
        c.get(&format!("/api/transfers/{unknown}/chain")),
        404,
        "unknown_transfer",
    );
    expect(c.get(&format!("/api/requests/{unknown}")), 404, "not_found");
    expect(c.get("/api/nothing-here"), 404, "not_found");
    expect(
        c.post_json("/api/send", &serde_json::json!({ "file_id": "NOPE" })),
        404,
        "not_found",
    );
    expect(
        c.post_json(
            "/api/send",
            &serde_json::json!({ "file_id": "DATA", "extra": 1 }),
        ),
        400,
        "bad_request",
    );
    expect(
        c.post_json(
            "/api/send",
            &serde_json::json!({ "file_id": "DATA", "wait": "2h" }),
        ),
        400,
        "bad_request",
    );
    expect(rig.upload("../escape.csv", 10, "").0, 400, "bad_request");
    expect(
        rig.b.post_json(
            "/api/requests",
            &serde_json::json!({ "file_id": "DATA", "from": "gamma" }),
        ),
        404,
        "not_found",
    );
    assert!(
        fs::read_dir(rig.tmp.path().join("alpha/state/uploads"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "a refused upload leaves nothing behind"
    );

    // The receiver is away: a waiting call gives up with request_timeout,
    // and the transfer goes on when beta is back.
    rig.beta.kill9();
    let (a, _) = rig.upload("waits.csv", 10, "&wait=2s");
    assert_eq!(a.status, 504, "{}", a.body);
    assert_eq!(code(&a), "request_timeout");
    rig.beta.start();
    wait_until(WAIT, "the file once beta is back", || {
        rig.tmp.path().join("inbox/waits.csv").exists()
    });
}

/// The document passes an OpenAPI validator, and every path and method it
/// lists is served (not the API's catch-all 404).
#[test]
fn the_openapi_document_is_valid_and_matches_the_routes() {
    let rig = Rig::new();
    let doc = rig.a.get("/api/openapi.json");
    assert_eq!(doc.status, 200);
    assert_eq!(doc.header("content-type"), Some("application/json"));
    let path = rig.tmp.path().join("openapi.json");
    fs::write(&path, &doc.body).unwrap();
    validate(&path);
    let doc = doc.json();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 6);
    for (p, methods) in paths {
        let concrete = p
            .replace("{id}", "0190c0de-0000-7000-8000-000000000000")
            .replace("{file_id}", "DATA");
        for method in methods.as_object().unwrap().keys() {
            let a = rig.a.request(
                &method.to_uppercase(),
                &concrete,
                Some("{}"),
                Some("application/json"),
            );
            assert!(
                !a.body.contains("no such API path"),
                "{method} {p} is in the document but not served: {}",
                a.body
            );
            assert_ne!(a.status, 405, "{method} {p}: {}", a.body);
        }
    }
}

/// `openapi-spec-validator` (PyPI; tests/run.sh installs it): fails loudly
/// when missing.
fn validate(path: &Path) {
    let out = Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(path)
        .output()
        .expect("python3 must be installed");
    assert!(
        out.status.success(),
        "openapi-spec-validator refused the document (or is not installed: pip install openapi-spec-validator, as tests/run.sh does):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
