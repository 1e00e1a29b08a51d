//! Security on RabbitMQ, against the real cluster (`tests/run.sh`) and the
//! real binary: every node logs in as a broker user of its own with the
//! narrowest permissions (`local-cluster.sh user`), `verify_sender` is on
//! by default, passwords are never printed, plain AMQP leaves loopback only
//! when told, and a transfer runs over amqps with client certificates.
//!
//! The attackers are broker clients holding some credentials (another
//! node's, their own, none): a small lapin client in this process, or the
//! real binary with a forged profile. The nodes' names are unique per test,
//! and so are their users.

mod common;

use std::fs;
use std::time::Duration;

use common::rabbit::{
    FILE_ID, WAIT, hakobu, login_url, outbox, receiver, rt, sender, spooled, start_consuming,
    wait_for,
};
use common::{Agent, node_broker, node_urls, node_users, unique, wait_until};
use hakobu::broker::Broker;
use hakobu::broker::rabbitmq::RabbitMq;
use hakobu::config::RabbitmqConfig;
use hakobu::domain::{FileId, NodeName, TransferId};
use hakobu::wire::{Message, Receipt};
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

/// Beta's queue holds a file from alpha while beta is away; a process with
/// alpha's credentials tries to take it (consume, get, purge, delete,
/// redeclare): the broker refuses each with ACCESS_REFUSED, and beta, back,
/// receives the file. (With one shared user, or `.*` permissions, the first
/// consume took the file.)
#[test]
fn another_nodes_credentials_cannot_consume_its_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (a, b) = (unique("alpha"), unique("beta"));
    let pw = node_users(&[&a, &b]);
    let mut beta = receiver(root, &b, &pw[1], &a);
    start_consuming(&mut beta); // its queue is declared
    beta.kill9();
    let mut alpha = sender(root, &a, &node_broker(&a, &pw[0]), &b);
    alpha.start();
    common::drop_file(&outbox(root, &a), "payroll.csv", |t| {
        fs::write(t, "salary,1000000\n").unwrap()
    });
    wait_for(&[&alpha], "the file to wait in beta's queue", || {
        alpha.with_status("awaiting_receipt").len() == 1
    });

    let url = login_url(&a, &pw[0]);
    let queue = format!("hakobu.node.{b}");
    let refusals = rt().block_on(async {
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("alpha's credentials log in");
        let mut refusals = Vec::new();
        let ch = conn.create_channel().await.unwrap();
        let r = ch
            .basic_consume(
                queue.as_str().into(),
                "thief".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await;
        refusals.push(("consume", r.err().map(|e| e.to_string())));
        let ch = conn.create_channel().await.unwrap();
        let r = ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await;
        refusals.push(("get", r.err().map(|e| e.to_string())));
        let ch = conn.create_channel().await.unwrap();
        let r = ch
            .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
            .await;
        refusals.push(("purge", r.err().map(|e| e.to_string())));
        let ch = conn.create_channel().await.unwrap();
        let r = ch
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        refusals.push(("delete", r.err().map(|e| e.to_string())));
        let ch = conn.create_channel().await.unwrap();
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        let r = ch
            .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
            .await;
        refusals.push(("declare", r.err().map(|e| e.to_string())));
        refusals
    });
    for (op, err) in &refusals {
        assert!(
            err.as_deref().is_some_and(|e| e.contains("ACCESS_REFUSED")),
            "{op} of beta's queue with alpha's credentials was not refused: {err:?}"
        );
    }

    beta.start();
    let placed = root.join(&b).join("inbox/payroll.csv");
    wait_until(WAIT, "the file in beta's inbox", || placed.exists());
    assert_eq!(fs::read_to_string(&placed).unwrap(), "salary,1000000\n");
    wait_until(WAIT, "alpha's receipt", || {
        alpha.with_status("sent").len() == 1
    });
}

/// Mallory, a node with a user of its own, publishes as alpha. Through a
/// client of its own it sets `user_id` to alpha: the broker refuses the
/// message. Through the real binary with a forged profile (`node: alpha`,
/// logged in as mallory) the message reaches beta with `user_id` mallory:
/// beta, verifying senders by default, dead-letters it untouched. (Without
/// verify_sender on by default, beta placed the forged file and ran its
/// hook as if alpha had sent it.)
#[test]
fn a_node_cannot_publish_as_another() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (a, b, m) = (unique("alpha"), unique("beta"), unique("mallory"));
    let pw = node_users(&[&a, &b, &m]);
    let mut beta = receiver(root, &b, &pw[1], &a);
    beta.start();

    // 1. user_id set to another node: the broker closes the channel.
    let url = login_url(&m, &pw[2]);
    let queue = format!("hakobu.node.{b}");
    let refused = rt().block_on(async {
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("mallory logs in");
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let sent = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                b"forged",
                BasicProperties::default().with_user_id(ShortString::from(a.as_str())),
            )
            .await;
        match sent {
            Err(e) => Some(e.to_string()),
            Ok(confirm) => match confirm.await {
                Err(e) => Some(e.to_string()),
                Ok(c) if !c.is_ack() => Some("nack".into()),
                Ok(_) => None,
            },
        }
    });
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("PRECONDITION_FAILED") || e.contains("user_id")),
        "the broker took a message whose user_id was another node: {refused:?}"
    );

    // 2. The real binary, claiming to be alpha, logged in as mallory.
    let forged_broker = node_broker(&m, &pw[2]) + "    verify_sender: false\n";
    let mut forger = sender(root, &a, &forged_broker, &b);
    forger.start();
    common::drop_file(&outbox(root, &a), "invoice.csv", |t| {
        fs::write(t, "pay mallory\n").unwrap()
    });
    wait_for(&[&beta], "beta to dead-letter the forged file", || {
        beta.log().contains("sender_mismatch") || !beta.history().is_empty()
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        common::visible_names(&root.join(&b).join("inbox")).is_empty(),
        "a forged file was placed"
    );
    assert!(
        beta.history().is_empty(),
        "the forged file became a transfer: {:?}",
        beta.history()
    );
    assert!(beta.alive());
}

/// Alpha's file waits for beta's receipt. Mallory sends alpha receipts for
/// it: one that claims to come from beta (alpha, verifying senders,
/// dead-letters it) and one honestly from mallory, which was never the
/// transfer's destination (it matches no ledger row). Neither settles the
/// transfer: the file stays in alpha's spool until beta's own receipt.
/// (With verify_sender off by default, the first receipt made alpha delete
/// its only copy.)
#[test]
fn a_receipt_from_a_node_that_is_not_the_destination_has_no_effect() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (a, b, m) = (unique("alpha"), unique("beta"), unique("mallory"));
    let pw = node_users(&[&a, &b, &m]);
    let mut beta = receiver(root, &b, &pw[1], &a);
    start_consuming(&mut beta);
    beta.kill9();
    let mut alpha = sender(root, &a, &node_broker(&a, &pw[0]), &b);
    alpha.start();
    common::drop_file(&outbox(root, &a), "only-copy.csv", |t| {
        fs::write(t, "the only copy\n").unwrap()
    });
    wait_for(&[&alpha], "the transfer to await its receipt", || {
        alpha.with_status("awaiting_receipt").len() == 1
    });
    let tid = alpha.with_status("awaiting_receipt")[0]["transfer_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(spooled(root, &a).len(), 1);

    // Mallory's client: the backend itself, logged in as mallory.
    let mut cfg = RabbitmqConfig::with_urls(vec![login_url(&m, &pw[2])]);
    cfg.confirm_timeout = Duration::from_secs(20);
    let mallory = RabbitMq::new(cfg);
    let receipt = |from: &str| Receipt {
        transfer_id: TransferId::parse(&tid).unwrap(),
        file_id: FileId::parse(FILE_ID).unwrap(),
        from: NodeName::parse(from).unwrap(),
        to: NodeName::parse(&a).unwrap(),
        ok: true,
        error_code: None,
        error: None,
        path: Some("/dev/null".into()),
        hook_exit: None,
        finished_at: "2026-12-02T00:00:00Z".into(),
        attempt: 1,
    };
    rt().block_on(async {
        for from in [b.as_str(), m.as_str()] {
            let msg = Message::Receipt(receipt(from)).encode();
            let confirm = mallory.publish(&a, msg).await.expect("publish");
            confirm.await.expect("confirmed");
        }
    });
    wait_for(&[&alpha], "alpha to refuse the forged receipt", || {
        alpha.log().contains("sender_mismatch") || alpha.log().contains("Receipt.")
    });
    wait_for(&[&alpha], "alpha to see mallory's receipt", || {
        alpha.log().contains("error_code=unexpected_receipt")
    });
    assert_eq!(
        alpha.with_status("awaiting_receipt").len(),
        1,
        "a receipt from another node settled the transfer: {:?}",
        alpha.history()
    );
    assert_eq!(spooled(root, &a).len(), 1, "the only copy left the spool");

    beta.start();
    wait_until(WAIT, "beta's own receipt", || {
        alpha.with_status("sent").len() == 1
    });
    assert_eq!(
        fs::read_to_string(root.join(&b).join("inbox/only-copy.csv")).unwrap(),
        "the only copy\n"
    );
}

/// No credentials, or a wrong password: the broker refuses the connection,
/// and `hakobu status` says so without printing the password.
#[test]
fn no_or_wrong_credentials_are_refused() {
    let (a, b) = (unique("alpha"), unique("beta"));
    let pw = node_users(&[&a, &b]);
    let bare = node_urls(&a, 0)[0].replace(&format!("{a}@"), "");
    let wrong = login_url(&b, &pw[1]).replace(&format!("{b}:"), &format!("{a}:"));
    for url in [bare.clone(), wrong.clone()] {
        let r = rt().block_on(Connection::connect(&url, ConnectionProperties::default()));
        assert!(r.is_err(), "the broker let {url} in");
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("a.yaml");
    fs::write(
        &cfg,
        format!(
            "node: {a}\nstate_dir: s\nbroker:\n  rabbitmq:\n    urls: [ \"{wrong}\" ]\nreceive:\n  - {{ file_id: X, from: [ {b} ], inbox: in }}\n"
        ),
    )
    .unwrap();
    let (code, out) = hakobu(dir.path(), &["status"], &cfg);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("broker_unavailable"), "{out}");
    let secret = fs::read_to_string(&pw[1]).unwrap();
    assert!(
        !out.contains(secret.trim()),
        "the password was printed: {out}"
    );
}

/// `hakobu check` and every error keep passwords out: a URL written as a
/// string instead of a list (the YAML parser quotes it), a broker that
/// cannot be reached, a password file others may read.
#[test]
fn passwords_are_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("a.yaml");
    let tail = "receive:\n  - { file_id: X, from: [ b ], inbox: in }\n";
    fs::write(
        &cfg,
        format!(
            "node: a\nstate_dir: s\nbroker:\n  rabbitmq:\n    urls: \"amqp://a:Top%5Ecret@127.0.0.1:1/%2f\"\n{tail}"
        ),
    )
    .unwrap();
    let (code, out) = hakobu(dir.path(), &["check"], &cfg);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("a.yaml:5: broker.rabbitmq.urls"), "{out}");
    assert!(
        !out.contains("Top%5Ecret"),
        "check printed the password: {out}"
    );

    // Unreachable: the connection error names the URL, not the password.
    fs::write(
        &cfg,
        format!(
            "node: a\nstate_dir: s\nbroker:\n  rabbitmq:\n    urls: [ \"amqp://a:Top%5Ecret@127.0.0.1:1/%2f\" ]\n{tail}"
        ),
    )
    .unwrap();
    let (code, out) = hakobu(dir.path(), &["status"], &cfg);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("amqp://a@127.0.0.1:1/%2f"), "{out}");
    assert!(
        !out.contains("Top%5Ecret"),
        "an error printed the password: {out}"
    );

    // A password file its group or others may read is refused.
    let pwfile = dir.path().join("a.password");
    fs::write(&pwfile, "Top^cret\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(
        &cfg,
        format!(
            "node: a\nstate_dir: s\nbroker:\n  rabbitmq:\n    urls: [ \"amqp://a@127.0.0.1:1/%2f\" ]\n    password_file: {}\n{tail}",
            pwfile.display()
        ),
    )
    .unwrap();
    let (code, out) = hakobu(dir.path(), &["check"], &cfg);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("chmod 600"), "{out}");
    assert!(!out.contains("Top^cret"), "{out}");
}

/// Plain AMQP to a host beyond loopback would carry the password and the
/// files in clear: refused unless `insecure: true`. A login that is not
/// the node's name is refused while verify_sender is on by default.
#[test]
fn plain_amqp_beyond_loopback_and_a_shared_login_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("a.yaml");
    let write = |broker_lines: &str| {
        fs::write(
            &cfg,
            format!(
                "node: a\nstate_dir: s\nbroker:\n  rabbitmq:\n{broker_lines}receive:\n  - {{ file_id: X, from: [ b ], inbox: in }}\n"
            ),
        )
        .unwrap();
    };
    write("    urls: [ \"amqp://a:x@10.11.12.13:5672/%2f\" ]\n");
    let (code, out) = hakobu(dir.path(), &["check"], &cfg);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("broker.rabbitmq.urls[0]") && out.contains("insecure"),
        "{out}"
    );
    write("    urls: [ \"amqp://a:x@10.11.12.13:5672/%2f\" ]\n    insecure: true\n");
    let (code, out) = hakobu(dir.path(), &["check"], &cfg);
    assert_eq!(code, Some(0), "{out}");
    write("    urls: [ \"amqps://a:x@10.11.12.13:5671/%2f\" ]\n");
    let (code, out) = hakobu(dir.path(), &["check"], &cfg);
    assert_eq!(code, Some(0), "{out}");
    write("    urls: [ \"amqp://hakobu:x@127.0.0.1:5672/%2f\" ]\n");
    let (code, out) = hakobu(dir.path(), &["check"], &cfg);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("verify_sender"), "{out}");
}

/// A transfer over amqps: a private CA, client certificates signed by it.
/// Alpha logs in with its certificate alone (SASL EXTERNAL: the user is
/// the certificate's CN), beta with its password over TLS; both verify
/// senders. A client without a certificate is turned away.
#[test]
fn a_transfer_runs_over_amqps_with_client_certificates() {
    let (urls, tls_dir) = common::amqps_urls();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (a, b) = (unique("alpha"), unique("beta"));
    let pw = node_users(&[&a, &b]);
    let (a_cert, a_key) = common::client_cert(&tls_dir, &a);
    let (b_cert, b_key) = common::client_cert(&tls_dir, &b);
    let ca = tls_dir.join("ca.pem");
    let list = |user: Option<&str>| {
        urls.iter()
            .map(|u| match user {
                Some(user) => format!("\"{}\"", u.replacen("://", &format!("://{user}@"), 1)),
                None => format!("\"{u}\""),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let a_broker = format!(
        "broker:\n  rabbitmq:\n    urls: [ {} ]\n    auth_mechanism: external\n    tls: {{ ca_file: {}, cert_file: {}, key_file: {} }}\n",
        list(None),
        ca.display(),
        a_cert.display(),
        a_key.display()
    );
    let b_yaml = format!(
        "node: {b}\nstate_dir: {root}/{b}/state\nbroker:\n  rabbitmq:\n    urls: [ {urls} ]\n    password_file: {pw}\n    tls: {{ ca_file: {ca}, cert_file: {cert}, key_file: {key} }}\nreceive:\n  - file_id: {FILE_ID}\n    from: [ {a} ]\n    inbox: {root}/{b}/inbox\n",
        root = root.display(),
        urls = list(Some(&b)),
        pw = pw[1].display(),
        ca = ca.display(),
        cert = b_cert.display(),
        key = b_key.display(),
    );
    let mut beta = Agent::new(&b, &root.join(&b), &b_yaml);
    beta.start();
    let mut alpha = sender(root, &a, &a_broker, &b);
    alpha.start();
    let name = "over-tls.bin";
    let src = common::drop_file(&outbox(root, &a), name, |t| {
        common::write_pattern(t, 3 << 20, 7)
    });
    let _ = src;
    wait_until(WAIT, "the file over amqps", || {
        alpha.with_status("sent").len() == 1
    });
    let placed = root.join(&b).join("inbox").join(name);
    let expect = {
        let p = root.join("expect.bin");
        common::write_pattern(&p, 3 << 20, 7);
        common::sha256_file(&p)
    };
    assert_eq!(common::sha256_file(&placed), expect);
    assert!(alpha.log().contains("amqps://"), "{}", alpha.log());

    // No client certificate: the TLS listener refuses the connection.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    fs::write(
        &cfg,
        format!(
            "node: {b}\nstate_dir: s\nbroker:\n  rabbitmq:\n    urls: [ {} ]\n    password_file: {}\n    tls: {{ ca_file: {} }}\nreceive:\n  - {{ file_id: X, from: [ {a} ], inbox: in }}\n",
            list(Some(&b)),
            pw[1].display(),
            ca.display()
        ),
    )
    .unwrap();
    let (code, out) = hakobu(dir.path(), &["status"], &cfg);
    assert_eq!(
        code,
        Some(1),
        "a client without a certificate got in: {out}"
    );
}

/// Review: `ca_file` was added to the system's roots, so a certificate for
/// the broker's name from any CA the system trusts passed. Now `ca_file` is
/// the only CA trusted. Here the system's store (`SSL_CERT_FILE`) holds the
/// cluster's CA and `ca_file` another one: `hakobu status` must refuse the
/// cluster; with the cluster's CA as `ca_file` it connects.
#[test]
fn ca_file_is_the_only_ca_trusted() {
    let (urls, tls_dir) = common::amqps_urls();
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("other-ca");
    let made = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/certs.sh"))
        .arg(&other)
        .status()
        .unwrap();
    assert!(made.success(), "tests/certs.sh failed");
    let b = unique("beta");
    let pw = node_users(&[&b]);
    let (cert, key) = common::client_cert(&tls_dir, &b);
    let status_with_ca = |ca: &std::path::Path| {
        let cfg = tmp.path().join("c.yaml");
        let list = urls
            .iter()
            .map(|u| format!("\"{}\"", u.replacen("://", &format!("://{b}@"), 1)))
            .collect::<Vec<_>>()
            .join(", ");
        fs::write(
            &cfg,
            format!(
                "node: {b}\nstate_dir: s\nbroker:\n  rabbitmq:\n    urls: [ {list} ]\n    password_file: {}\n    tls: {{ ca_file: {}, cert_file: {}, key_file: {} }}\nreceive:\n  - {{ file_id: X, from: [ a ], inbox: in }}\n",
                pw[0].display(),
                ca.display(),
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        let out = std::process::Command::new(common::bin())
            .args(["status", "-c"])
            .arg(&cfg)
            .current_dir(tmp.path())
            .env("SSL_CERT_FILE", tls_dir.join("ca.pem"))
            .output()
            .unwrap();
        common::rabbit::code_and_text(&out)
    };
    let (code, out) = status_with_ca(&other.join("ca.pem"));
    assert_eq!(
        code,
        Some(1),
        "a cluster whose CA is not ca_file was trusted: {out}"
    );
    assert!(out.to_lowercase().contains("certificate"), "{out}");
    let (code, out) = status_with_ca(&tls_dir.join("ca.pem"));
    assert_eq!(code, Some(0), "the cluster's own CA as ca_file: {out}");
}

/// The dead-letter queue is bounded (`x-max-length-bytes`): redeclaring it
/// without the bound is refused by the broker, which proves the argument
/// is there. An agent configured with another bound (as an upgraded agent
/// meets an unbounded queue an older version declared) still runs, and
/// `hakobu status` shows both queues' depth.
#[test]
fn the_dead_letter_queue_is_bounded_and_its_depth_visible() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (a, b) = (unique("alpha"), unique("beta"));
    let pw = node_users(&[&a, &b]);
    let mut beta = receiver(root, &b, &pw[1], &a);
    beta.start();
    // The agent declares the dead-letter queue before it consumes; until
    // then the queue may not exist, and the declaration below would make it.
    common::wait_until(Duration::from_secs(30), "beta to consume", || {
        beta.log().contains("Consuming.")
    });
    let admin = common::amqp_urls()[0].clone();
    let unbounded = rt().block_on(async {
        let conn = Connection::connect(&admin, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        ch.queue_declare(
            "hakobu.dead-letter".into(),
            QueueDeclareOptions::durable(),
            args,
        )
        .await
        .err()
        .map(|e| e.to_string())
    });
    assert!(
        unbounded
            .as_deref()
            .is_some_and(|e| e.contains("PRECONDITION_FAILED") && e.contains("x-max-length-bytes")),
        "the dead-letter queue has no x-max-length-bytes: {unbounded:?}"
    );

    // Another bound than the queue's: the agent warns and goes on.
    let broker = node_broker(&a, &pw[0]) + "    dead_letter_max: 5MiB\n";
    let mut alpha = sender(root, &a, &broker, &b);
    alpha.start();
    common::drop_file(&outbox(root, &a), "f.csv", |t| fs::write(t, "x\n").unwrap());
    wait_until(WAIT, "the transfer", || {
        alpha.with_status("sent").len() == 1
    });
    assert!(
        alpha
            .log()
            .contains("The dead-letter queue exists with other arguments"),
        "{}",
        alpha.log()
    );
    let (code, out) = hakobu(&alpha.dir, &["status"], &alpha.config);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("hakobu.node.{a}: 0 messages")),
        "{out}"
    );
    assert!(out.contains("hakobu.dead-letter: "), "{out}");
    assert!(out.contains("5242880 bytes"), "{out}");
}
