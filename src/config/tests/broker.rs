//! The `broker:` section: RabbitMQ's identity, transport and heartbeat
//! rules, the embedded broker's keys and its TLS.

use super::*;

#[test]
fn rabbitmq_identity_and_transport_rules() {
    let with = |from: &str, to: &str| parse(&GOOD.replace(from, to));
    // verify_sender is on by default, and the login must then be the node.
    let BrokerConfig::Rabbitmq(r) = parse(GOOD).unwrap().broker else {
        panic!()
    };
    assert!(r.verify_sender);
    assert_eq!(r.dead_letter_max, DEFAULT_DEAD_LETTER_MAX);
    let e = with("amqp://beta:", "amqp://hakobu:").unwrap_err();
    assert_eq!(e.key, "broker.rabbitmq.urls[0]");
    assert!(e.message.contains("verify_sender"), "{e}");
    assert!(with("amqp://beta:", "amqp://hakobu:").map(|_| ()).is_err());
    let ok = GOOD.replace(
        "urls: [ \"amqp://beta:",
        "verify_sender: false\n    urls: [ \"amqp://hakobu:",
    );
    assert!(parse(&ok).is_ok());
    // Plain AMQP beyond loopback, unless insecure.
    let e = with("@127.0.0.1:5672", "@192.0.2.1:5672").unwrap_err();
    assert!(e.message.contains("insecure"), "{e}");
    let ok = GOOD
        .replace("@127.0.0.1:5672", "@192.0.2.1:5672")
        .replace("    urls:", "    insecure: true\n    urls:");
    assert!(parse(&ok).is_ok());
    // EXTERNAL: amqps, a client certificate, and the node as the user.
    let e = with(
        "amqp://beta:secret@127.0.0.1:5672/%2f\" ]",
        "amqps://127.0.0.1:5671/%2f\" ]\n    auth_mechanism: external",
    )
    .unwrap_err();
    assert_eq!(e.key, "broker.rabbitmq.auth_mechanism", "{e}");
    // Serde errors quote what was written: never the password.
    let e = with(
        "urls: [ \"amqp://beta:secret@127.0.0.1:5672/%2f\" ]",
        "urls: \"amqp://beta:secret@127.0.0.1:5672/%2f\"",
    )
    .unwrap_err();
    assert!(!e.to_string().contains("secret"), "{e}");
    assert!(e.to_string().contains("amqp://beta@127.0.0.1"), "{e}");
}

#[test]
fn rabbitmq_heartbeat_is_short_and_never_off() {
    let with = |hb: &str| {
        parse(&GOOD.replace(
            "    urls: [ \"amqp://beta:",
            &format!("    heartbeat: {hb}\n    urls: [ \"amqp://beta:"),
        ))
    };
    let BrokerConfig::Rabbitmq(r) = parse(GOOD).unwrap().broker else {
        panic!()
    };
    assert_eq!(r.heartbeat, DEFAULT_HEARTBEAT);
    let BrokerConfig::Rabbitmq(r) = with("2s").unwrap().broker else {
        panic!()
    };
    assert_eq!(r.heartbeat, std::time::Duration::from_secs(2));
    for bad in ["0s", "1500ms", "601s"] {
        let e = with(bad).unwrap_err();
        assert_eq!(e.key, "broker.rabbitmq.heartbeat", "{bad}: {e}");
        assert!(e.message.contains("whole seconds"), "{e}");
    }
}

#[test]
fn embedded_broker_keys() {
    let embedded = |section: &str| {
        let text = GOOD.replace(
            "  rabbitmq:\n    urls: [ \"amqp://beta:secret@127.0.0.1:5672/%2f\" ]\n",
            section,
        );
        assert_ne!(text, GOOD, "the broker section to replace is not in GOOD");
        text
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
    let cfg = parse(&embedded(
        "  embedded: { listen: 127.0.0.1:7800, max_connections: 64, max_connections_per_node: 4 }\n",
    ))
    .unwrap();
    let BrokerConfig::Embedded(e) = &cfg.broker else {
        panic!("embedded")
    };
    assert_eq!(
        (e.limits.max_connections, e.limits.max_connections_per_node),
        (64, 4)
    );
    let e = parse(&embedded(
        "  embedded: { listen: 127.0.0.1:7800, max_connections_per_node: 1 }\n",
    ))
    .unwrap_err();
    assert_eq!(e.key, "broker.embedded.max_connections_per_node", "{e}");
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

#[test]
fn embedded_tls_rules() {
    let embedded = |section: &str| {
        GOOD.replace(
            "  rabbitmq:\n    urls: [ \"amqp://beta:secret@127.0.0.1:5672/%2f\" ]\n",
            section,
        )
    };
    // With tls, beyond loopback is allowed; the server name is the host.
    let cfg = parse(&embedded(
        "  embedded: { connect: 10.0.0.1:7800, tls: { ca_file: /c/ca.pem } }\n",
    ))
    .unwrap();
    let BrokerConfig::Embedded(e) = &cfg.broker else {
        panic!("embedded")
    };
    assert_eq!(
        e.client_tls,
        Some((PathBuf::from("/c/ca.pem"), "10.0.0.1".to_string()))
    );
    assert!(e.server_tls.is_none());
    // Listening with tls needs the certificate, its key and a CA.
    let e = parse(&embedded(
        "  embedded: { listen: 0.0.0.0:7800, tls: { ca_file: /c/ca.pem } }\n",
    ))
    .unwrap_err();
    assert!(e.message.contains("cert_file"), "{e}");
    let e = parse(&embedded(
        "  embedded: { listen: 0.0.0.0:7800, tls: { ca_file: /c/ca.pem, cert_file: /c/s.pem, key_file: /c/s.key } }\n",
    ))
    .unwrap_err();
    assert_eq!(e.key, "broker.embedded.tls.server_name", "{e}");
    let cfg = parse(&embedded(
        "  embedded: { listen: 0.0.0.0:7800, tls: { ca_file: /c/ca.pem, cert_file: /c/s.pem, key_file: /c/s.key, server_name: hub.example } }\n",
    ))
    .unwrap();
    let BrokerConfig::Embedded(e) = &cfg.broker else {
        panic!("embedded")
    };
    assert!(e.server_tls.is_some());
    // A connecting node has no use for a key; no CA is no TLS.
    let e = parse(&embedded(
        "  embedded: { connect: 10.0.0.1:7800, tls: { ca_file: /c/ca.pem, key_file: /c/s.key } }\n",
    ))
    .unwrap_err();
    assert!(e.message.contains("only ca_file"), "{e}");
    let e = parse(&embedded(
        "  embedded: { connect: 10.0.0.1:7800, tls: { cert_file: /c/s.pem } }\n",
    ))
    .unwrap_err();
    assert_eq!(e.key, "broker.embedded.tls.ca_file", "{e}");
}
