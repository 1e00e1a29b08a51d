//! `/metrics` (issue 14): a valid Prometheus exposition, checked by
//! `promtool check metrics`, whose figures move with real transfers between
//! real agents on the embedded broker (a `hakobu broker` process); the
//! broker connection's gauge and fail-overs when that broker is killed and
//! restarted; the Grafana dashboard's queries against what is exposed. The
//! RabbitMQ side (dead letters, a node stopped) is in
//! `metrics_rabbitmq_*` below and needs the test cluster.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::http::{Client, http_section, start_pair};
use common::{Agent, BrokerProcess, drop_file, wait_until, write_pattern};

const WAIT: Duration = Duration::from_secs(60);

/// One sample: metric name and labels → value.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Parses the samples of an exposition (comments skipped). Label values
/// in these tests hold no `,` `"` or `}`.
fn samples(text: &str) -> Samples {
    let mut out = Samples::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("a number in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let rest = rest.strip_suffix('}').expect("labels end with }");
                let labels = rest
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once('=').expect("label=value");
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                (n.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.insert((name, labels), value);
    }
    out
}

/// The value of `name` with exactly `labels`, if exposed.
fn value(s: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    s.get(&(name.to_string(), labels)).copied()
}

/// The sum of `name` over the samples whose labels include `labels`.
fn sum(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.iter()
        .filter(|((n, l), _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| *v)
        .sum()
}

/// `promtool check metrics` on `text`: panics (naming the problems) unless
/// it is a valid exposition with no lint problem. Fails loudly when
/// promtool is missing (tests/run.sh installs Debian's `prometheus`).
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be installed: apt-get install prometheus (tests/run.sh does)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics refused the exposition:\n{}{}\n--- exposition ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

/// Two agents on a `hakobu broker` process: alpha sends `DATA` from its
/// outbox to beta, beta receives it with a hook that fails for names
/// starting with `bad`. Both serve `http:`.
struct Rig {
    tmp: tempfile::TempDir,
    broker: BrokerProcess,
    outbox: PathBuf,
    alpha: Agent,
    beta: Agent,
    a: Client,
    b: Client,
}

impl Rig {
    /// `send_extra` is appended to alpha's send profile.
    fn new(send_extra: &str) -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let broker = BrokerProcess::start(t);
        let outbox = t.join("outbox");
        let alpha_send = format!(
            "  - file_id: DATA\n    outbox: {outbox}\n    to: [ beta ]\n    ready: {{ stable_for: 200ms }}\n{send_extra}",
            outbox = outbox.display(),
        );
        let (alpha, beta, a, b) = start_pair(t, &broker.section(), (&alpha_send, ""));
        Rig {
            tmp,
            broker,
            outbox,
            alpha,
            beta,
            a,
            b,
        }
    }

    fn drop_file(&self, name: &str, size: u64) -> u64 {
        drop_file(&self.outbox, name, |p| write_pattern(p, size, size));
        size
    }
}

/// A scrape: the body of `GET /metrics`, checked for its status and type.
fn scrape(c: &Client) -> String {
    let r = c.get("/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    r.body
}

/// After 3 good transfers and 1 whose receive hook exits 1, both agents'
/// counters read exactly that, bytes are the files' sizes, beta's hook
/// histogram counted the 4 runs, and every scrape passes promtool.
#[test]
fn counters_read_what_happened() {
    let rig = Rig::new("");
    // Before anything moved: valid, and the gauges are there at 0.
    let first = scrape(&rig.a);
    promtool_check(&first);
    let s = samples(&first);
    assert_eq!(
        value(
            &s,
            "hakobu_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert!(value(&s, "hakobu_start_time_seconds", &[]).is_some_and(|t| t > 1.7e9));
    assert_eq!(value(&s, "hakobu_spool_files", &[]), Some(0.0));
    assert_eq!(value(&s, "hakobu_broker_connected", &[]), Some(1.0));
    assert_eq!(value(&s, "hakobu_broker_failovers_total", &[]), Some(0.0));

    let mut good = 0;
    for (i, size) in [1000u64, 70_000, 3_000_000].into_iter().enumerate() {
        good += rig.drop_file(&format!("good-{i}.bin"), size);
    }
    let bad = rig.drop_file("bad.bin", 4321);
    wait_until(WAIT, "beta to settle the four files", || {
        let s = samples(&scrape(&rig.b));
        sum(&s, "hakobu_transfers_total", &[("direction", "receive")]) == 4.0
    });
    wait_until(WAIT, "alpha to settle the four files", || {
        let s = samples(&scrape(&rig.a));
        sum(&s, "hakobu_transfers_total", &[("direction", "send")]) == 4.0
    });

    let text = scrape(&rig.b);
    promtool_check(&text);
    let s = samples(&text);
    let recv = |status| {
        value(
            &s,
            "hakobu_transfers_total",
            &[
                ("direction", "receive"),
                ("file_id", "DATA"),
                ("status", status),
            ],
        )
    };
    assert_eq!(recv("received"), Some(3.0), "{text}");
    assert_eq!(recv("hook_failed"), Some(1.0), "{text}");
    assert_eq!(
        value(&s, "hakobu_received_bytes_total", &[("file_id", "DATA")]),
        Some((good + bad) as f64),
        "the failed hook's file was placed: its bytes count"
    );
    let hook = |outcome, series: &str| {
        value(
            &s,
            &format!("hakobu_hook_duration_seconds_{series}"),
            &[("event", "received"), ("outcome", outcome)],
        )
    };
    assert_eq!(hook("ok", "count"), Some(3.0), "{text}");
    assert_eq!(hook("failed", "count"), Some(1.0), "{text}");
    assert!(hook("ok", "sum").is_some_and(|v| v > 0.0));
    assert_eq!(
        value(
            &s,
            "hakobu_hook_duration_seconds_bucket",
            &[("event", "received"), ("outcome", "ok"), ("le", "+Inf")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &s,
            "hakobu_hook_runs_total",
            &[("event", "received"), ("outcome", "failed")]
        ),
        Some(1.0)
    );
    assert_eq!(sum(&s, "hakobu_transfers_in_flight", &[]), 0.0, "{text}");

    let text = scrape(&rig.a);
    promtool_check(&text);
    let s = samples(&text);
    let sent = sum(
        &s,
        "hakobu_transfers_total",
        &[("direction", "send"), ("file_id", "DATA")],
    );
    assert_eq!(sent, 4.0, "{text}");
    // The receiver's hook failed on one: the sender's ledger says so too.
    let ok_sent = value(
        &s,
        "hakobu_transfers_total",
        &[
            ("direction", "send"),
            ("file_id", "DATA"),
            ("status", "sent"),
        ],
    );
    assert_eq!(ok_sent, Some(3.0), "{text}");
    assert_eq!(
        value(&s, "hakobu_sent_bytes_total", &[("file_id", "DATA")]),
        Some(good as f64 + sum_bytes_of_failed(&s, bad)),
        "{text}"
    );
    assert_eq!(
        value(&s, "hakobu_oldest_awaiting_receipt_age_seconds", &[]),
        Some(0.0)
    );
    let _ = &rig.tmp;
}

/// On the sender, a transfer whose receiver's hook failed is `hook_failed`
/// (its file crossed, its bytes count) or `send_failed` (they do not).
fn sum_bytes_of_failed(s: &Samples, bad: u64) -> f64 {
    let hook_failed = value(
        s,
        "hakobu_transfers_total",
        &[
            ("direction", "send"),
            ("file_id", "DATA"),
            ("status", "hook_failed"),
        ],
    );
    if hook_failed == Some(1.0) {
        bad as f64
    } else {
        0.0
    }
}

/// A throttled transfer shows in the in-flight gauges while it runs, and
/// with the receiver stopped, the oldest file waiting for its receipt ages.
#[test]
fn in_flight_and_awaiting_receipt_move() {
    let mut rig = Rig::new("    bandwidth: 1MiB/s\n");
    let size = rig.drop_file("slow.bin", 5 * 1024 * 1024);
    wait_until(WAIT, "the throttled transfer in flight", || {
        let s = samples(&scrape(&rig.a));
        sum(&s, "hakobu_transfers_in_flight", &[("direction", "send")]) >= 1.0
            && value(&s, "hakobu_in_flight_bytes", &[("direction", "send")]) == Some(size as f64)
    });
    wait_until(WAIT, "progress to show mid-transfer", || {
        let s = samples(&scrape(&rig.a));
        value(
            &s,
            "hakobu_in_flight_progress_bytes",
            &[("direction", "send")],
        )
        .is_some_and(|p| p > 0.0 && p < size as f64)
    });
    let s = samples(&scrape(&rig.a));
    assert!(value(&s, "hakobu_spool_bytes", &[]).is_some_and(|b| b >= size as f64));
    assert!(value(&s, "hakobu_spool_files", &[]).is_some_and(|n| n >= 1.0));
    wait_until(WAIT, "the throttled transfer to settle", || {
        let s = samples(&scrape(&rig.a));
        value(
            &s,
            "hakobu_transfers_total",
            &[
                ("direction", "send"),
                ("file_id", "DATA"),
                ("status", "sent"),
            ],
        ) == Some(1.0)
    });

    // The receiver is away: the next file waits for its receipt, and ages.
    rig.beta.kill9();
    rig.drop_file("waits.bin", 2000);
    wait_until(WAIT, "the file to wait for its receipt", || {
        let s = samples(&scrape(&rig.a));
        value(
            &s,
            "hakobu_transfers_in_flight",
            &[("direction", "send"), ("status", "awaiting_receipt")],
        ) == Some(1.0)
    });
    let age = |c: &Client| {
        value(
            &samples(&scrape(c)),
            "hakobu_oldest_awaiting_receipt_age_seconds",
            &[],
        )
        .unwrap()
    };
    let before = age(&rig.a);
    std::thread::sleep(Duration::from_secs(2));
    let after = age(&rig.a);
    assert!(
        after >= before + 1.5,
        "the age grows: {before} then {after}"
    );
    rig.beta.start();
    wait_until(WAIT, "the receipt once beta is back", || age(&rig.a) == 0.0);
}

/// The broker process killed: the connection gauge drops to 0; restarted:
/// back to 1, and one fail-over counted.
#[test]
fn broker_connection_and_fail_over() {
    let mut rig = Rig::new("");
    let read = |c: &Client| {
        let s = samples(&scrape(c));
        (
            value(&s, "hakobu_broker_connected", &[]).unwrap(),
            value(&s, "hakobu_broker_failovers_total", &[]).unwrap(),
        )
    };
    assert_eq!(read(&rig.a), (1.0, 0.0));
    rig.broker.kill9();
    wait_until(WAIT, "the gauge to drop", || read(&rig.a).0 == 0.0);
    // A scrape while the broker is down still answers, and stays valid.
    promtool_check(&scrape(&rig.a));
    rig.broker.restart();
    wait_until(WAIT, "the agent to reconnect", || {
        read(&rig.a) == (1.0, 1.0)
    });
    // And the link works again.
    rig.drop_file("after.bin", 100);
    wait_until(WAIT, "a file after the fail-over", || {
        !rig.alpha.with_status("sent").is_empty()
    });
    let _ = &rig.b;
}

/// Every metric a query of packaging/grafana/hakobu.json uses is one that
/// `/metrics` exposes (a family name, or its histogram series).
#[test]
fn the_grafana_dashboard_uses_exposed_metrics() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/grafana/hakobu.json");
    let dash: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).expect("the dashboard is JSON");
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let mut exprs = Vec::new();
    collect_exprs(&dash, &mut exprs);
    assert!(exprs.len() >= 10, "a panel per family: {exprs:?}");
    let known: Vec<String> = hakobu::metrics::FAMILIES
        .iter()
        .flat_map(|f| {
            [
                f.to_string(),
                format!("{f}_bucket"),
                format!("{f}_sum"),
                format!("{f}_count"),
            ]
        })
        .collect();
    let mut used = std::collections::BTreeSet::new();
    for e in &exprs {
        let mut word = String::new();
        for c in e.chars().chain(std::iter::once(' ')) {
            if c.is_ascii_alphanumeric() || c == '_' {
                word.push(c);
            } else {
                if word.starts_with("hakobu_") {
                    used.insert(std::mem::take(&mut word));
                }
                word.clear();
            }
        }
    }
    for m in &used {
        assert!(
            known.contains(m),
            "the dashboard queries {m}, which /metrics does not expose"
        );
    }
    for f in hakobu::metrics::FAMILIES {
        if *f == "hakobu_spool_scan_truncated" || *f == "hakobu_start_time_seconds" {
            continue;
        }
        assert!(used.iter().any(|u| u.starts_with(f)), "no panel shows {f}");
    }
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if k == "expr" {
                    if let Some(s) = x.as_str() {
                        out.push(s.to_string());
                    }
                }
                collect_exprs(x, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

/// One agent on the test cluster (tests/run.sh) serving `http:`; its
/// consumer connects to the cluster's first node first.
struct RabbitRig {
    tmp: tempfile::TempDir,
    node: String,
    agent: Agent,
    c: Client,
    cfg: hakobu::config::RabbitmqConfig,
}

impl RabbitRig {
    fn new() -> RabbitRig {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let node = common::unique("met");
        let (h, c) = http_section();
        let yaml = format!(
            "node: {node}\nstate_dir: state\n{broker}{h}receive:\n  - file_id: DATA\n    from: [ alpha ]\n    inbox: {inbox}\n",
            broker = common::rabbit_broker(0),
            inbox = t.join("inbox").display(),
        );
        let mut agent = Agent::new(&node, &t.join("agent"), &yaml);
        agent.start();
        let cfg = match hakobu::config::Config::parse(&agent.config, &yaml)
            .expect("the agent's configuration")
            .broker
        {
            hakobu::config::BrokerConfig::Rabbitmq(r) => r,
            _ => unreachable!("a rabbitmq section"),
        };
        let c = c.with_token_file(&t.join("agent/state/http.token"));
        RabbitRig {
            tmp,
            node,
            agent,
            c,
            cfg,
        }
    }

    /// `hakobu_dead_letters` once the agent has asked the cluster.
    fn dead_letters(&self) -> f64 {
        let mut n = None;
        wait_until(WAIT, "hakobu_dead_letters to be known", || {
            n = value(&samples(&scrape(&self.c)), "hakobu_dead_letters", &[]);
            n.is_some()
        });
        n.unwrap()
    }
}

/// A message the agent cannot parse is dead-lettered on the cluster, and
/// `hakobu_dead_letters` (asked of RabbitMQ in the background, cached)
/// counts it.
#[test]
fn metrics_rabbitmq_dead_letters() {
    let rig = RabbitRig::new();
    let text = scrape(&rig.c);
    promtool_check(&text);
    let before = rig.dead_letters();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let broker = hakobu::broker::rabbitmq::RabbitMq::new(rig.cfg.clone());
    use hakobu::broker::Broker;
    rt.block_on(async {
        let confirm = broker
            .publish(
                &rig.node,
                bytes::Bytes::from_static(b"not a hakobu message"),
            )
            .await
            .expect("publish to the agent's queue");
        confirm.await.expect("the cluster confirms");
    });
    wait_until(WAIT, "the agent to dead-letter it", || {
        rig.agent.log().contains("Dead-lettering")
    });
    wait_until(WAIT, "hakobu_dead_letters to count it", || {
        rig.dead_letters() >= before + 1.0
    });
    promtool_check(&scrape(&rig.c));
    let _ = &rig.tmp;
}

/// The cluster node the agent consumes from stopped: the agent fails over
/// to another node, and counts it.
#[test]
fn metrics_rabbitmq_node_stopped() {
    let rig = RabbitRig::new();
    let read = || {
        let s = samples(&scrape(&rig.c));
        (
            value(&s, "hakobu_broker_connected", &[]).unwrap(),
            value(&s, "hakobu_broker_failovers_total", &[]).unwrap(),
        )
    };
    wait_until(WAIT, "the consumer to connect", || read() == (1.0, 0.0));
    common::cluster(&["stop", "1"]);
    let restarted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(WAIT, "a fail-over to another node", || {
            let (connected, failovers) = read();
            connected == 1.0 && failovers >= 1.0
        });
        promtool_check(&scrape(&rig.c));
    }));
    common::cluster(&["start", "1"]);
    if let Err(e) = restarted {
        std::panic::resume_unwind(e);
    }
}
