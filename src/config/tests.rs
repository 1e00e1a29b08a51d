//! The configuration read and validated: the specification's example, and
//! errors that name the file, the line and the key.

use super::*;

const GOOD: &str = r#"
node: beta
state_dir: var/beta
broker:
  rabbitmq:
    urls: [ "amqp://hakobu:secret@127.0.0.1:5672/%2f" ]
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
fn embedded_broker_keys() {
    let embedded = |section: &str| {
        GOOD.replace(
            "  rabbitmq:\n    urls: [ \"amqp://hakobu:secret@127.0.0.1:5672/%2f\" ]\n",
            section,
        )
    };
    let cfg = parse(&embedded(
        "  embedded: { connect: 127.0.0.1:7800, token_file: /k/alpha.secret, max_disk: 1GiB }\n",
    ))
    .unwrap();
    assert!(cfg.verify_sender(), "always on for the embedded broker");
    assert_eq!(cfg.embedded_secret_file(), Path::new("/k/alpha.secret"));
    let BrokerConfig::Embedded(e) = &cfg.broker else {
        panic!("embedded")
    };
    assert_eq!(e.limits.max_disk, 1 << 30);
    let cfg = parse(&embedded("  embedded: { listen: 127.0.0.1:7800 }\n")).unwrap();
    assert_eq!(
        cfg.embedded_secret_file(),
        cfg.state_dir.join("broker.secret")
    );
    let e = parse(&embedded("  embedded: { listen: 0.0.0.0:7800 }\n")).unwrap_err();
    assert_eq!(e.key, "broker.embedded.listen", "{e}");
    assert!(e.message.contains("insecure: true"), "{e}");
    parse(&embedded(
        "  embedded: { connect: 10.0.0.1:7800, insecure: true }\n",
    ))
    .unwrap();
}
