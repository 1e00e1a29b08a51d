//! The configuration read and validated: the specification's example, and
//! errors that name the file, the line and the key.

use super::*;

mod broker;

const GOOD: &str = r#"
node: beta
state_dir: var/beta
broker:
  rabbitmq:
    urls: [ "amqp://beta:secret@127.0.0.1:5672/%2f" ]
send:
  - file_id: DAILY_SALES
    outbox: var/alpha/outbox/sales
    include: [ "*.csv" ]
    to: [ beta ]
    ready: { stable_for: 2s }
    after_send: { move_to: var/sent }
    on_success: [ "hooks/sent.sh" ]
    on_failure: [ "hooks/alert.sh", "{file_id}" ]
receive:
  - file_id: DAILY_SALES
    from: [ alpha ]
    inbox: var/beta/inbox/sales
    mode: replace
    max_size: 10GiB
    on_success: { run: [ "hooks/import.sh", "{path}" ], timeout: 10m }
    on_failure: { run: [ "hooks/alert.sh" ] }
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("t.yaml"), text)
}

#[test]
fn spec_example_parses() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.node, "beta");
    let s = &c.send[0];
    assert_eq!(s.ready, Ready::StableFor(Duration::from_secs(2)));
    assert!(matches!(s.after_send, AfterSend::MoveTo(_)));
    assert_eq!(s.on_failure.as_ref().unwrap().argv[1], "{file_id}");
    let r = &c.receive[0];
    assert_eq!(r.mode, Mode::Replace);
    assert_eq!(r.max_size, 10 << 30);
    assert_eq!(
        r.on_success.as_ref().unwrap().timeout,
        Duration::from_secs(600)
    );
}

#[test]
fn unknown_key_names_line_and_key() {
    let bad = GOOD.replace("    mode: replace", "    mode: replace\n    colour: blue");
    let e = parse(&bad).unwrap_err();
    assert!(e.message.contains("colour"), "{e}");
    assert_eq!(e.line, Some(21), "{e}");
    assert_eq!(e.key, "receive[0].colour", "{e}");
}

#[test]
fn validation_error_names_line_and_key() {
    let bad = GOOD.replace("mode: replace", "mode: sideways");
    let e = parse(&bad).unwrap_err();
    assert_eq!(e.key, "receive[0].mode");
    assert_eq!(e.line, Some(20));
    assert!(
        e.to_string().starts_with("t.yaml:20: receive[0].mode:"),
        "{e}"
    );
}

#[test]
fn rejects_bad_ids_and_placeholders() {
    let e = parse(&GOOD.replace(
        "file_id: DAILY_SALES\n    outbox",
        "file_id: ../x\n    outbox",
    ))
    .unwrap_err();
    assert_eq!(e.key, "send[0].file_id");
    let e = parse(&GOOD.replace("{file_id}", "{nope}")).unwrap_err();
    assert_eq!(e.key, "send[0].on_failure[1]");
    let e = parse(&GOOD.replace("stable_for: 2s", "stable_for: 2s, done_marker: x")).unwrap_err();
    assert_eq!(e.key, "send[0].ready");
}

#[test]
fn shell_hook_placeholder_inside_quotes_is_refused() {
    let quoted = r#"on_failure: { run: [ "hooks/alert.sh" ] }"#;
    let e = parse(&GOOD.replace(
        quoted,
        r#"on_failure: { run: [ "echo \"failed: {file_name}\" >> var/log" ], shell: true }"#,
    ))
    .unwrap_err();
    assert_eq!(e.key, "receive[0].on_failure");
    assert!(
        e.to_string().contains("{file_name} is inside quotes"),
        "{e}"
    );
    // Bare, the same placeholder is fine: hakobu quotes it.
    assert!(
        parse(&GOOD.replace(
            quoted,
            r#"on_failure: { run: [ "echo failed: {file_name} >> var/log" ], shell: true }"#,
        ))
        .is_ok()
    );
}

#[test]
fn file_mode_is_octal_and_never_writable_by_others() {
    let with = |m: &str| {
        GOOD.replace(
            "mode: replace",
            &format!("mode: replace\n    file_mode: {m}"),
        )
    };
    assert_eq!(parse(GOOD).unwrap().receive[0].file_mode, 0o600);
    for (text, want) in [
        ("\"0640\"", 0o640),
        ("0640", 0o640),
        ("640", 0o640),
        ("\"0o440\"", 0o440),
    ] {
        assert_eq!(
            parse(&with(text)).unwrap().receive[0].file_mode,
            want,
            "{text}"
        );
    }
    for bad in ["\"0666\"", "\"rw\"", "\"1777\"", "\"0689\""] {
        let e = parse(&with(bad)).unwrap_err();
        assert_eq!(e.key, "receive[0].file_mode", "{bad}: {e}");
        assert_eq!(e.line, Some(21), "{e}");
    }
}

/// A configuration with the given outbox, inbox and state directory (and
/// `extra` lines after the receive profile).
fn dirs(outbox: &str, inbox: &str, state: &str, extra: &str) -> String {
    format!(
        "node: beta\nstate_dir: {state}\nbroker:\n  embedded: {{ listen: \"127.0.0.1:0\" }}\nsend:\n  - file_id: A\n    outbox: {outbox}\n    to: [ alpha ]\nreceive:\n  - file_id: B\n    from: [ alpha ]\n    inbox: {inbox}\n{extra}"
    )
}

#[test]
fn overlapping_directories_are_refused_with_their_line() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path().display();
    let ok = parse(&dirs(
        &format!("{r}/out"),
        &format!("{r}/in"),
        &format!("{r}/state"),
        "",
    ));
    assert!(ok.is_ok(), "{:?}", ok.err());
    let cases = [
        // An inbox equal to or inside an outbox: sent again, forever.
        (
            dirs(
                &format!("{r}/out"),
                &format!("{r}/out"),
                &format!("{r}/state"),
                "",
            ),
            "receive[0].inbox",
            12,
        ),
        (
            dirs(
                &format!("{r}/out"),
                &format!("{r}/out/x/../in"),
                &format!("{r}/state"),
                "",
            ),
            "receive[0].inbox",
            12,
        ),
        // An outbox inside an inbox.
        (
            dirs(
                &format!("{r}/in/out"),
                &format!("{r}/in"),
                &format!("{r}/state"),
                "",
            ),
            "send[0].outbox",
            7,
        ),
        // The state directory inside an inbox, or an outbox inside it.
        (
            dirs(
                &format!("{r}/out"),
                &format!("{r}/in"),
                &format!("{r}/in/state"),
                "",
            ),
            "receive[0].inbox",
            12,
        ),
        (
            dirs(
                &format!("{r}/state"),
                &format!("{r}/in"),
                &format!("{r}/state"),
                "",
            ),
            "send[0].outbox",
            7,
        ),
        (
            dirs(
                &format!("{r}/out"),
                &format!("{r}/state/spool/x"),
                &format!("{r}/state"),
                "",
            ),
            "receive[0].inbox",
            12,
        ),
        // Two profiles sharing an inbox with different modes.
        (
            dirs(
                &format!("{r}/out"),
                &format!("{r}/in"),
                &format!("{r}/state"),
                &format!(
                    "  - file_id: C\n    from: [ alpha ]\n    inbox: {r}/in\n    mode: append\n"
                ),
            ),
            "receive[1].mode",
            16,
        ),
    ];
    for (text, key, line) in cases {
        let e = parse(&text).unwrap_err();
        assert_eq!(e.key, key, "{e}\n{text}");
        assert_eq!(e.line, Some(line), "{e}");
    }
    // Through a link: the inbox named by a link into the outbox.
    std::fs::create_dir_all(d.path().join("out/sub")).unwrap();
    std::os::unix::fs::symlink(d.path().join("out/sub"), d.path().join("link")).unwrap();
    let e = parse(&dirs(
        &format!("{r}/out"),
        &format!("{r}/link/in"),
        &format!("{r}/state"),
        "",
    ))
    .unwrap_err();
    assert_eq!(e.key, "receive[0].inbox", "{e}");
    // Inbox and outbox inside the state directory (README's layout): allowed.
    let inside = dirs(
        &format!("{r}/state/outbox"),
        &format!("{r}/state/inbox"),
        &format!("{r}/state"),
        "",
    );
    assert!(parse(&inside).is_ok());
    // Same inbox, same mode: allowed.
    let same = dirs(
        &format!("{r}/out"),
        &format!("{r}/in"),
        &format!("{r}/state"),
        &format!("  - file_id: C\n    from: [ alpha ]\n    inbox: {r}/in\n"),
    );
    assert!(parse(&same).is_ok());
}

/// `source`, `outbox`, `to`, `requests_from` and `before_send` on a send
/// profile: a source beside or instead of an outbox, at least one of the
/// two, and someone to send to or to ask; each error with its line.
#[test]
fn send_sources_requests_and_pre_send_jobs() {
    let pull = GOOD.replace(
        "    outbox: var/alpha/outbox/sales\n    include: [ \"*.csv\" ]\n    to: [ beta ]\n",
        "    source: /var/export/sales.csv\n    requests_from: [ gamma ]\n    before_send: { run: [ \"hooks/export.sh\", \"{path}\" ], timeout: 5m }\n",
    );
    let c = parse(&pull).unwrap();
    let s = &c.send[0];
    assert_eq!(s.outbox, None);
    assert_eq!(
        s.source.as_deref(),
        Some(Path::new("/var/export/sales.csv"))
    );
    assert!(s.to.is_empty());
    assert_eq!(s.requests_from, vec![NodeName::parse("gamma").unwrap()]);
    let job = s.before_send.as_ref().unwrap();
    assert_eq!(job.argv[1], "{path}");
    assert_eq!(job.timeout, Duration::from_secs(300));
    assert!(c.knows("gamma"), "a node that may ask is known");

    // Both: an outbox watched for `to`, and a source sent when asked.
    let both = GOOD.replace(
        "    to: [ beta ]\n",
        "    to: [ beta ]\n    source: var/export/sales.csv\n",
    );
    let c = parse(&both).unwrap();
    assert!(c.send[0].outbox.is_some() && c.send[0].source.as_ref().unwrap().is_absolute());

    // Neither an outbox nor a source.
    let e = parse(&GOOD.replace("    outbox: var/alpha/outbox/sales\n", "")).unwrap_err();
    assert_eq!(e.key, "send[0].outbox", "{e}");
    assert!(e.message.contains("source"), "{e}");
    assert!(e.line.is_some(), "{e}");

    // Nobody to send to and nobody who may ask.
    let e = parse(&GOOD.replace("    to: [ beta ]\n", "")).unwrap_err();
    assert_eq!(e.key, "send[0].to", "{e}");
    assert!(e.message.contains("requests_from"), "{e}");

    // A node name that breaks the rule, a source that is no file's name,
    // a before_send without a command.
    let e = parse(&pull.replace("[ gamma ]", "[ \"ga/mma\" ]")).unwrap_err();
    assert_eq!(e.key, "send[0].requests_from[0]", "{e}");
    assert_eq!(e.line, Some(10), "{e}");
    let e = parse(&pull.replace("/var/export/sales.csv", "/var/export/..")).unwrap_err();
    assert_eq!(e.key, "send[0].source", "{e}");
    let e = parse(&pull.replace("/var/export/sales.csv", "/var/export/.hidden")).unwrap_err();
    assert_eq!(e.key, "send[0].source", "{e}");
    let e = parse(&pull.replace(
        "before_send: { run: [ \"hooks/export.sh\", \"{path}\" ], timeout: 5m }",
        "before_send: [ ]",
    ))
    .unwrap_err();
    assert_eq!(e.key, "send[0].before_send", "{e}");
}

#[test]
fn retry_keys_on_hooks_and_send_profiles() {
    let text = GOOD
        .replace(
            "    on_success: [ \"hooks/sent.sh\" ]",
            "    retry: { attempts: 4, backoff: 1m }\n    on_success: [ \"hooks/sent.sh\" ]",
        )
        .replace("timeout: 10m }", "timeout: 10m, retry: { attempts: 3 } }");
    let c = parse(&text).unwrap();
    assert_eq!(
        c.send[0].retry,
        Retry {
            attempts: 4,
            backoff: Duration::from_secs(60)
        }
    );
    assert_eq!(c.send[0].on_success.as_ref().unwrap().retry, Retry::ONCE);
    let hook = c.receive[0].on_success.as_ref().unwrap();
    assert_eq!(
        (hook.retry.attempts, hook.retry.backoff),
        (3, Duration::from_secs(30))
    );
    let cases = [
        ("retry: { attempts: 0 }", "send[0].retry.attempts"),
        ("retry: { attempts: 101 }", "send[0].retry.attempts"),
        (
            "retry: { attempts: 2, backoff: 500ms }",
            "send[0].retry.backoff",
        ),
        (
            "retry: { attempts: 2, backoff: soon }",
            "send[0].retry.backoff",
        ),
    ];
    for (retry, key) in cases {
        let bad = GOOD.replace(
            "    on_success: [ \"hooks/sent.sh\" ]",
            &format!("    {retry}\n    on_success: [ \"hooks/sent.sh\" ]"),
        );
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.key, key, "{e}");
        assert_eq!(e.line, Some(14), "{e}");
    }
}

#[test]
fn convert_and_receive_name_are_checked_with_their_line() {
    let with = |extra: &str| GOOD.replace("mode: replace", &format!("mode: replace\n{extra}"));
    let c = parse(&with(
        "    convert: { from: cp932, to: utf-8, newline: lf }\n    name: \"{meta.branch}_{stem}_{date}.{ext}\"",
    ))
    .unwrap();
    let conv = c.receive[0].convert.unwrap();
    assert_eq!((conv.from, conv.to), (Charset::ShiftJis, Charset::Utf8));
    assert_eq!(
        (conv.newline, conv.on_error, conv.bom),
        (Newline::Lf, OnError::Fail, false)
    );
    assert!(!c.receive[0].name.is_default());
    assert!(parse(GOOD).unwrap().receive[0].name.is_default());
    assert!(parse(GOOD).unwrap().receive[0].convert.is_none());
    for (extra, key) in [
        ("    name: \"{file_name}.{nope}\"", "receive[0].name"),
        (
            "    convert:\n      from: latin1\n      to: utf-8",
            "receive[0].convert.from",
        ),
        (
            "    convert:\n      from: utf-8\n      to: shift_jis\n      bom: true",
            "receive[0].convert.bom",
        ),
        (
            "    convert:\n      from: utf-8\n      to: utf-8\n      newline: cr",
            "receive[0].convert.newline",
        ),
        (
            "    convert:\n      from: utf-8\n      to: utf-8\n      on_error: skip",
            "receive[0].convert.on_error",
        ),
    ] {
        let e = parse(&with(extra)).unwrap_err();
        assert_eq!(e.key, key, "{extra}: {e}");
        assert!(e.line.is_some_and(|l| l >= 21), "{extra}: {e}");
    }
    let e = parse(&with("    name: \"{nope}\"")).unwrap_err();
    assert_eq!(e.line, Some(21), "{e}");
    assert!(e.message.contains("unknown placeholder `{nope}`"), "{e}");
}

#[test]
fn receipt_timeout_is_a_duration_from_a_second_to_a_year() {
    let with = |t: &str| {
        GOOD.replace(
            "    on_success: [ \"hooks/sent.sh\" ]",
            &format!("    receipt_timeout: {t}\n    on_success: [ \"hooks/sent.sh\" ]"),
        )
    };
    assert_eq!(parse(GOOD).unwrap().send[0].receipt_timeout, None);
    let c = parse(&with("2d")).unwrap();
    assert_eq!(
        c.send[0].receipt_timeout,
        Some(Duration::from_secs(2 * 86_400))
    );
    for (bad, says) in [
        ("soon", "not a duration"),
        ("0s", "1s to 365d"),
        ("400d", "1s to 365d"),
    ] {
        let e = parse(&with(bad)).unwrap_err();
        assert_eq!(e.key, "send[0].receipt_timeout", "{e}");
        assert_eq!(e.line, Some(14), "{e}");
        assert!(e.to_string().contains(says), "{bad}: {e}");
    }
}
