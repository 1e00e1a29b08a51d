//! The HTTP endpoint's door (issue 14): the token, the console's session
//! cookie, `/metrics` left open on loopback, TLS beyond loopback; each against
//! a real agent with real `curl`.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::http::{Client, http_agent};

const PROFILE: &str = "receive:\n  - file_id: IN\n    from: [ somebody ]\n    inbox: inbox\n";

#[test]
fn every_route_needs_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let h = http_agent(tmp.path(), &common::unique("web"), "", PROFILE);
    let mode = std::fs::metadata(&h.token_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the token file is created private");

    let anonymous = Client::new(&h.client.base);
    for path in ["/metrics", "/api/openapi.json", "/api/transfers"] {
        let a = anonymous.get(path);
        assert_eq!(a.status, 401, "{path} without the token: {a:?}");
        assert_eq!(a.json()["code"], "unauthorized");
        assert_eq!(a.header("www-authenticate"), Some("Bearer"));
    }
    let page = anonymous.get("/");
    assert_eq!(
        page.status, 303,
        "a page without the token goes to the login page"
    );
    assert_eq!(page.header("location"), Some("/login"));

    let mut wrong = anonymous.clone();
    wrong.token = Some("0".repeat(64));
    assert_eq!(wrong.get("/metrics").status, 401, "a wrong token");
    let mut short = anonymous.clone();
    short.token = Some(h.client.token.clone().unwrap()[..10].to_string());
    assert_eq!(short.get("/metrics").status, 401, "a prefix of the token");

    assert_eq!(h.client.get("/metrics").status, 200, "the right token");
    assert_eq!(h.client.get("/").status, 200, "the right token, a page");
}

#[test]
fn the_console_signs_in_once_and_keeps_a_strict_cookie() {
    let tmp = tempfile::tempdir().unwrap();
    let h = http_agent(tmp.path(), &common::unique("web"), "", PROFILE);
    let anonymous = Client::new(&h.client.base);
    assert_eq!(anonymous.get("/login").status, 200);

    let bad = anonymous.post_form("/login", "token=nope");
    assert_eq!(bad.status, 401);
    assert!(bad.body.contains("not the token"), "{}", bad.body);
    assert!(bad.header("set-cookie").is_none());

    let token = h.client.token.clone().unwrap();
    let good = anonymous.post_form("/login", &format!("token={token}"));
    assert_eq!(good.status, 303, "{good:?}");
    let cookie = good
        .header("set-cookie")
        .expect("a session cookie")
        .to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attr), "cookie {cookie} lacks {attr}");
    }
    assert!(
        !cookie.contains("Secure"),
        "no Secure flag over plain loopback http"
    );
    let session = cookie.split(';').next().unwrap().to_string();

    let mut browser = anonymous.clone();
    browser.cookie = Some(session.clone());
    assert_eq!(
        browser.get("/").status,
        200,
        "the session opens the console"
    );
    assert_eq!(browser.get("/metrics").status, 200);

    // A change with the cookie but without the console's header: what a
    // page of another site could make the browser send.
    let forged = browser.post_json("/api/transfers/x/rerun", &serde_json::json!({}));
    assert_eq!(forged.status, 403, "{forged:?}");
    assert_eq!(forged.json()["code"], "unauthorized");

    let out = browser.post_form("/logout", "");
    assert_eq!(out.status, 303);
    assert_eq!(browser.get("/").status, 303, "the session ended at logout");

    let mut guessed = anonymous.clone();
    guessed.cookie = Some(format!("hakobu_session={}", "a".repeat(64)));
    assert_eq!(guessed.get("/").status, 303, "an invented session id");
}

#[test]
fn metrics_may_be_left_open_on_loopback_only() {
    let tmp = tempfile::tempdir().unwrap();
    let h = http_agent(
        tmp.path(),
        &common::unique("web"),
        "  metrics_open: true\n",
        PROFILE,
    );
    let anonymous = Client::new(&h.client.base);
    assert_eq!(anonymous.get("/metrics").status, 200);
    assert_eq!(
        anonymous.get("/api/transfers").status,
        401,
        "only /metrics is open"
    );

    let dir = tempfile::tempdir().unwrap();
    for (http, what) in [
        (
            "  listen: \"0.0.0.0:9810\"\n",
            "beyond loopback without TLS",
        ),
        (
            "  listen: \"0.0.0.0:9810\"\n  metrics_open: true\n  tls: { cert_file: c.pem, key_file: k.pem }\n",
            "metrics_open beyond loopback",
        ),
        ("  listen: \"nowhere\"\n", "not an address"),
    ] {
        let yaml = format!(
            "node: x\nstate_dir: {}/state\nbroker:\n  embedded:\n    listen: \"127.0.0.1:1\"\nhttp:\n{http}{PROFILE}",
            dir.path().display()
        );
        let cfg = dir.path().join("x.yaml");
        std::fs::write(&cfg, yaml).unwrap();
        let out = std::process::Command::new(common::bin())
            .args(["check", "-c"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(
            err.contains("http."),
            "{what}: the error names the key: {err}"
        );
    }
}

#[test]
fn a_token_file_others_can_read_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let yaml = format!(
        "node: {}\nstate_dir: {}/state\nbroker:\n  embedded:\n    listen: \"127.0.0.1:{}\"\nhttp:\n  listen: \"127.0.0.1:{}\"\n  token_file: {}\n{PROFILE}",
        common::unique("web"),
        tmp.path().display(),
        common::http::free_port(),
        common::http::free_port(),
        token.display()
    );
    let cfg = tmp.path().join("a.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let err = common::must_refuse_to_start(
        std::process::Command::new(common::bin())
            .args(["run", "-c"])
            .arg(&cfg),
        "a token file with mode 0644",
    );
    assert!(err.contains(&token.display().to_string()), "{err}");
}

#[test]
fn beyond_loopback_the_endpoint_speaks_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    let made = std::process::Command::new("tests/certs.sh")
        .arg(&tls)
        .status()
        .unwrap();
    assert!(made.success(), "tests/certs.sh (needs openssl)");
    let extra = format!(
        "  tls: {{ cert_file: {0}/server.pem, key_file: {0}/server.key }}\n",
        tls.display()
    );
    let h = http_agent(tmp.path(), &common::unique("web"), &extra, PROFILE);
    let mut client = h.client.clone();
    client.ca = Some(tls.join("ca.pem"));
    assert_eq!(client.get("/metrics").status, 200, "https with the CA");

    let untrusted = Client {
        ca: None,
        ..client.clone()
    };
    assert_eq!(
        untrusted.get("/metrics").status,
        0,
        "a client that does not trust the CA"
    );

    let plain = Client {
        base: client.base.replace("https://", "http://"),
        ..client.clone()
    };
    assert_ne!(
        plain.get("/metrics").status,
        200,
        "plain http to the TLS port"
    );

    let anonymous = Client {
        token: None,
        ..client.clone()
    };
    let login = anonymous.post_form(
        "/login",
        &format!("token={}", client.token.clone().unwrap()),
    );
    let cookie = login.header("set-cookie").expect("a cookie").to_string();
    assert!(
        cookie.contains("Secure"),
        "under TLS the cookie is Secure: {cookie}"
    );
}
