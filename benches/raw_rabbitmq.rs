//! The raw broker ceiling for `benches/run.sh`: the least a program can do to
//! move N bytes through one RabbitMQ quorum queue with the guarantees hakobu
//! asks for, and no file, hashing or database work at either end.
//!
//! - one publisher connection with confirms, persistent messages
//!   (delivery_mode 2), `mandatory`, a pipelined window of unconfirmed bytes
//!   (hakobu's `window`, 8 MiB by default);
//! - one consumer connection (another node if given) with manual acks and a
//!   prefetch (hakobu's default 32);
//! - a durable quorum queue (`x-queue-type=quorum`), declared by the consumer
//!   first, as hakobu's receiver does, so the leader is placed the same way;
//!   deleted at the end.
//!
//! The clock runs from the first publish to the ack of the last message. The
//! result is one JSON line on stdout:
//! `{"bytes":..,"messages":..,"seconds":..,"mib_per_s":..,"publish_seconds":..}`.
//!
//! Usage (cargo builds it with `cargo build --release --bench raw_rabbitmq`):
//!   raw_rabbitmq --publish-url URL --consume-url URL [--bytes 1GiB]
//!                [--chunk 512KiB] [--window 8MiB] [--prefetch 32] [--queue NAME]
//!   raw_rabbitmq --publish-url URL --delete QUEUE [--delete QUEUE...]
//!                deletes queues (the bench's agents' queues, after their run:
//!                idle quorum queues left on a shared cluster cost it CPU)

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

struct Args {
    publish_url: String,
    consume_url: String,
    bytes: u64,
    chunk: u64,
    window: u64,
    prefetch: u16,
    queue: String,
    delete: Vec<String>,
}

fn size(s: &str) -> u64 {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("GiB") {
        (n, 1u64 << 30)
    } else if let Some(n) = s.strip_suffix("MiB") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("KiB") {
        (n, 1 << 10)
    } else {
        (s, 1)
    };
    num.trim().parse::<u64>().expect("a size like 512KiB") * mult
}

fn args() -> Args {
    let mut a = Args {
        publish_url: String::new(),
        consume_url: String::new(),
        bytes: 1 << 30,
        chunk: 512 << 10,
        window: 8 << 20,
        prefetch: 32,
        queue: format!("hakobu.bench.raw.{}", std::process::id()),
        delete: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        // `cargo bench` passes --bench; ignore it.
        if k == "--bench" {
            continue;
        }
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--publish-url" => a.publish_url = v,
            "--consume-url" => a.consume_url = v,
            "--bytes" => a.bytes = size(&v),
            "--chunk" => a.chunk = size(&v),
            "--window" => a.window = size(&v),
            "--prefetch" => a.prefetch = v.parse().expect("--prefetch N"),
            "--queue" => a.queue = v,
            "--delete" => a.delete.push(v),
            _ => panic!("unknown argument {k}"),
        }
    }
    assert!(!a.publish_url.is_empty(), "--publish-url is required");
    if a.consume_url.is_empty() {
        a.consume_url = a.publish_url.clone();
    }
    a
}

/// The user name in an AMQP URL, sent as `user_id` as hakobu does.
fn url_user(url: &str) -> Option<String> {
    let s = url.find("://")? + 3;
    let at = url.rfind('@')?;
    let user = url.get(s..at)?.split(':').next()?;
    (!user.is_empty() && !user.contains('%')).then(|| user.to_string())
}

#[tokio::main]
async fn main() {
    let a = args();
    if !a.delete.is_empty() {
        let conn = Connection::connect(&a.publish_url, ConnectionProperties::default())
            .await
            .expect("connect");
        for q in &a.delete {
            // A fresh channel each: deleting a missing queue is fine, but an
            // error would close the channel for the next one.
            let ch = conn.create_channel().await.expect("channel");
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "bye".into()).await;
        return;
    }
    let messages = a.bytes.div_ceil(a.chunk);
    let queue: ShortString = a.queue.as_str().into();

    // Consumer side first: declare the queue (leader on the consumer's node,
    // like hakobu's receiver), purge leftovers, subscribe.
    let cconn = Connection::connect(&a.consume_url, ConnectionProperties::default())
        .await
        .expect("consumer connect");
    let cch = cconn.create_channel().await.expect("consumer channel");
    let mut qargs = FieldTable::default();
    qargs.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    cch.queue_declare(queue.clone(), QueueDeclareOptions::durable(), qargs)
        .await
        .expect("declare quorum queue");
    cch.queue_purge(queue.clone(), QueuePurgeOptions::default())
        .await
        .expect("purge");
    cch.basic_qos(a.prefetch, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = cch
        .basic_consume(
            queue.clone(),
            format!("raw-{}", std::process::id()).as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");

    let pconn = Connection::connect(&a.publish_url, ConnectionProperties::default())
        .await
        .expect("publisher connect");
    let pch = pconn.create_channel().await.expect("publisher channel");
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");

    // An incompressible body, reused for every message (no per-message copy).
    let mut body = vec![0u8; a.chunk as usize];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for c in body.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
    let last_len = a.bytes - (messages - 1) * a.chunk;

    let start = Instant::now();
    let consume = tokio::spawn(async move {
        let mut got = 0u64;
        let mut bytes = 0u64;
        while got < messages {
            let d = match tokio::time::timeout(Duration::from_secs(120), consumer.next()).await {
                Ok(Some(Ok(d))) => d,
                other => panic!("consumer stopped after {got} messages: {other:?}"),
            };
            bytes += d.data.len() as u64;
            d.acker.ack(BasicAckOptions::default()).await.expect("ack");
            got += 1;
        }
        (Instant::now(), bytes)
    });

    let user = url_user(&a.publish_url);
    let mut in_flight: VecDeque<(u64, lapin::PublisherConfirm)> = VecDeque::new();
    let mut unconfirmed = 0u64;
    for i in 0..messages {
        let len = if i + 1 == messages { last_len } else { a.chunk };
        while unconfirmed + len > a.window && !in_flight.is_empty() {
            let (l, c) = in_flight.pop_front().expect("in flight");
            let conf = c.await.expect("confirm");
            assert!(conf.is_ack(), "nacked");
            unconfirmed -= l;
        }
        let mut props = BasicProperties::default().with_delivery_mode(2);
        if let Some(u) = &user {
            props = props.with_user_id(u.as_str().into());
        }
        let c = pch
            .basic_publish(
                "".into(),
                queue.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body[..len as usize],
                props,
            )
            .await
            .expect("publish");
        in_flight.push_back((len, c));
        unconfirmed += len;
    }
    while let Some((_, c)) = in_flight.pop_front() {
        assert!(c.await.expect("confirm").is_ack(), "nacked");
    }
    let published = start.elapsed();
    let (end, bytes) = consume.await.expect("consumer task");
    let secs = (end - start).as_secs_f64();
    assert_eq!(bytes, a.bytes, "consumed bytes");

    let _ = cch.queue_delete(queue, QueueDeleteOptions::default()).await;
    let _ = pconn.close(200, "bye".into()).await;
    let _ = cconn.close(200, "bye".into()).await;
    println!(
        "{{\"bytes\":{},\"messages\":{},\"seconds\":{:.3},\"mib_per_s\":{:.1},\"publish_seconds\":{:.3}}}",
        a.bytes,
        messages,
        secs,
        a.bytes as f64 / secs / (1 << 20) as f64,
        published.as_secs_f64()
    );
}
