//! Network partitions: each RabbitMQ node and each agent in a network
//! namespace of its own, joined by a router namespace
//! (tests/netns-cluster.sh), and the network cut between them while files
//! stream through: the node the agents use isolated, the queue's leader
//! isolated, a follower isolated, and the sender's side cut off from the
//! receiver's, each healed again. The cluster handles partitions with
//! `pause_minority`. After each scenario every file is placed byte for byte,
//! each success hook ran once, and every transfer is `sent` (its receipt
//! settled); while the sender can reach only the minority, nothing of its
//! new files is confirmed, and it says it waits.
//!
//! Namespaces need root and iproute2: where the machine cannot make them,
//! the suite fails (it never passes without having cut anything). The
//! network exists only inside the namespaces the script creates, and a
//! guard deletes them and every process in them, also when a test fails.
//! One test runs the scenarios in turn on one cluster (booting it takes
//! ~35 s); each prints a `figures:` line.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::fault::{LogsOnPanic, delivered, sent_none_failed};
use common::{Pair, PairOpts, sha256_file, wait_until, write_pattern};

fn script() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/netns-cluster.sh")
}

/// The namespaces, the three nodes and the router; dropping it (also while
/// a failed assertion unwinds) stops and deletes all of it.
struct Net {
    id: String,
    base: Option<tempfile::TempDir>,
    urls: Vec<String>,
}

impl Net {
    fn up() -> Net {
        let base = tempfile::Builder::new().prefix("hkbp-").tempdir().unwrap();
        let mut net = Net {
            id: format!("hkbp-{}", std::process::id()),
            base: Some(base),
            urls: Vec::new(),
        };
        let out = net.output(&["up"]);
        assert!(
            out.status.success(),
            "could not build the partition suite's network: {}\n\
             The partition suite needs root, iproute2 (ip netns, veth) and rabbitmq-server; \
             it fails rather than pass without cutting anything.",
            String::from_utf8_lossy(&out.stderr)
        );
        net.urls = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect();
        assert_eq!(net.urls.len(), 3, "netns-cluster.sh up printed no URLs");
        net
    }

    fn base(&self) -> &Path {
        self.base.as_ref().expect("base").path()
    }

    fn output(&self, args: &[&str]) -> Output {
        Command::new(script())
            .args(args)
            .env("HKBP_ID", &self.id)
            .env("HKBP_BASE", self.base())
            .stdin(Stdio::null())
            .output()
            .expect("run tests/netns-cluster.sh")
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "netns-cluster.sh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn ns(&self, endpoint: &str) -> String {
        format!("{}-{endpoint}", self.id)
    }

    fn cut(&self, x: &str, y: &str) {
        self.run(&["cut", x, y]);
    }

    /// Cuts node `n` (1..3) from every other endpoint: the other nodes and
    /// the agents alike.
    fn isolate(&self, n: usize) {
        let me = format!("n{n}");
        for other in ["n1", "n2", "n3", "a", "b", "c"] {
            if other != me {
                self.cut(&me, other);
            }
        }
    }

    fn heal(&self, x: &str, y: &str) {
        self.run(&["heal", x, y]);
    }

    fn heal_all(&self) {
        self.run(&["heal-all"]);
    }

    /// The node (1..3) that leads `queue`, as the first of `asked` that
    /// answers sees it; none while nobody knows (an election).
    fn leader(&self, queue: &str, asked: &[usize]) -> Option<usize> {
        let mut args = vec!["leader".to_string(), queue.to_string()];
        args.extend(asked.iter().map(|n| n.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.output(&args);
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// True while node `n`'s RabbitMQ application runs (a paused minority
    /// node stops it).
    fn running(&self, n: usize) -> bool {
        let out = self.output(&["ctl", &n.to_string(), "eval", "rabbit:is_running()."]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "true"
    }

    fn healthy(&self) -> bool {
        self.output(&["status"]).status.success()
    }

    /// The agents' `broker:` section, URLs starting at node `first` (0-based).
    fn broker(&self, first: usize) -> String {
        let urls: Vec<String> = (0..3)
            .map(|i| format!("\"{}\"", self.urls[(first + i) % 3]))
            .collect();
        format!(
            "broker:\n  rabbitmq:\n    urls: [ {} ]\n    confirm_timeout: 20s\n    verify_sender: false\n    insecure: true\n",
            urls.join(", ")
        )
    }

    /// Heals every cut and waits for the cluster to be whole: (how long).
    fn heal_and_wait(&self) -> Duration {
        self.heal_all();
        let t = Instant::now();
        wait_until(
            Duration::from_secs(120),
            "the cluster whole again after the heal",
            || self.healthy(),
        );
        t.elapsed()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let out = self.output(&["down"]);
        if !out.status.success() {
            let _ = writeln!(
                std::io::stderr(),
                "netns-cluster.sh down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if std::thread::panicking() {
            if let Some(base) = self.base.take() {
                let kept = base.keep();
                let _ = writeln!(
                    std::io::stderr(),
                    "partition suite: RabbitMQ logs kept in {}/node*/log",
                    kept.display()
                );
            }
        }
    }
}

fn figures(line: &str) {
    // Straight to stderr: the harness captures print! of passing tests.
    let _ = writeln!(std::io::stderr(), "figures: {line}");
}

/// Rewrites an agent's `broker:` section.
fn set_broker(config: &Path, from: &str, to: &str) {
    let yaml = fs::read_to_string(config).unwrap();
    assert!(yaml.contains(from), "no broker section to replace");
    fs::write(config, yaml.replace(from, to)).unwrap();
}

/// A pair in namespaces `a` (alpha, sender) and `b` (beta, receiver).
/// Beta declares its queue through node `leader_at` (quorum queues are led
/// by the declaring client's node), then consumes on node `beta_at`; alpha
/// consumes on `alpha_first` and publishes on the node after it. One small
/// file goes through before the scenario starts.
fn start_pair(net: &Net, leader_at: usize, beta_at: usize, alpha_first: usize) -> Pair {
    let mut p = Pair::new(PairOpts {
        broker: Some(net.broker(alpha_first)),
        ..Default::default()
    });
    p.alpha.set_netns(&net.ns("a"));
    p.beta.set_netns(&net.ns("b"));
    set_broker(
        &p.beta.config,
        &net.broker(alpha_first),
        &net.broker(leader_at),
    );
    common::rabbit::start_consuming(&mut p.beta);
    if beta_at != leader_at {
        p.beta.kill9();
        set_broker(&p.beta.config, &net.broker(leader_at), &net.broker(beta_at));
        common::rabbit::start_consuming(&mut p.beta);
    }
    p.alpha.start();
    let warm = drop_files(&p, "warm", 1, 4 << 10);
    p.wait_sent(1, Duration::from_secs(60));
    assert_eq!(check(&p, &warm), (0, 0));
    p
}

fn queue(p: &Pair) -> String {
    format!("hakobu.node.{}", p.beta.node)
}

/// Drops `n` files of `size` bytes named `prefix-i.bin`; returns (name, sha256).
fn drop_files(p: &Pair, prefix: &str, n: usize, size: u64) -> Vec<(String, String)> {
    drop_into(p.tmp.path(), &p.outbox, prefix, n, size, Duration::ZERO)
}

fn drop_into(
    tmp: &Path,
    outbox: &Path,
    prefix: &str,
    n: usize,
    size: u64,
    gap: Duration,
) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let name = format!("{prefix}-{i}.bin");
            let src = tmp.join(&name);
            write_pattern(&src, size, 7 + i as u64);
            let want = sha256_file(&src);
            common::drop_file(outbox, &name, |t| fs::rename(&src, t).unwrap());
            std::thread::sleep(gap);
            (name, want)
        })
        .collect()
}

/// Drops a stream of files from another thread while `during` runs.
fn streaming<T>(
    p: &Pair,
    prefix: &str,
    n: usize,
    size: u64,
    during: impl FnOnce() -> T,
) -> (Vec<(String, String)>, T) {
    let (tmp, outbox): (PathBuf, PathBuf) = (p.tmp.path().into(), p.outbox.clone());
    std::thread::scope(|s| {
        let dropper =
            s.spawn(|| drop_into(&tmp, &outbox, prefix, n, size, Duration::from_millis(300)));
        let t = during();
        (dropper.join().expect("dropping files"), t)
    })
}

/// Every file in the inbox byte for byte, nothing else there, a success
/// hook per transfer, and every transfer `sent` on alpha (its receipt
/// settled): (lost or corrupted, duplicate hooks).
fn check(p: &Pair, files: &[(String, String)]) -> (usize, usize) {
    let figures = delivered(p, files);
    let h = p.alpha.history();
    let unsettled: Vec<_> = h.iter().filter(|r| r["status"] != "sent").collect();
    assert!(unsettled.is_empty(), "receipts not settled: {unsettled:?}");
    figures
}

/// Waits for `n` transfers sent, with both agents' logs if it fails.
fn wait_sent(p: &Pair, n: usize, limit: Duration, mut each: impl FnMut()) {
    let _logs = LogsOnPanic::of(p);
    wait_until(limit, &format!("{n} transfers sent"), || {
        each();
        sent_none_failed(p) >= n
    })
}

/// When an agent's log gained a line with `what` since `before` lines of it.
struct Moved<'a> {
    agent: &'a common::Agent,
    what: &'static str,
    before: usize,
    at: Option<Duration>,
}

impl<'a> Moved<'a> {
    fn new(agent: &'a common::Agent, what: &'static str) -> Moved<'a> {
        let before = agent.log().matches(what).count();
        Moved {
            agent,
            what,
            before,
            at: None,
        }
    }

    fn poll(&mut self, t0: Instant) {
        if self.at.is_none() && self.agent.log().matches(self.what).count() > self.before {
            self.at = Some(t0.elapsed());
        }
    }

    fn text(&self) -> String {
        self.at.map_or("stayed".into(), |d| {
            format!("moved in {:.1}s", d.as_secs_f64())
        })
    }
}

/// What a scenario isolates.
#[derive(Clone, Copy)]
enum Target {
    /// Node n (1..3), the one the agents use.
    AgentsNode(usize),
    /// Whichever node leads the receiving queue.
    Leader,
    /// A follower of the receiving queue (node 3 unless it leads).
    Follower,
}

/// One node cut off from everything while files stream through the other
/// two: every file is placed while the cut holds, then the cut heals and
/// nothing comes twice.
fn isolate_one(net: &Net, what: &str, target: Target, p: &Pair) {
    let q = queue(p);
    let leader_before = net.leader(&q, &[1, 2, 3]).expect("the queue's leader");
    let victim = match target {
        Target::AgentsNode(n) => n,
        Target::Leader => leader_before,
        Target::Follower if leader_before == 3 => 2,
        Target::Follower => 3,
    };
    let others: Vec<usize> = (1..=3).filter(|n| *n != victim).collect();
    let mut elected = None;
    let mut beta = Moved::new(&p.beta, "Consuming.");
    let mut alpha = Moved::new(&p.alpha, "Connected to RabbitMQ for publishing.");
    let mut t0 = Instant::now();
    let (files, ()) = streaming(p, what, 8, 2 << 20, || {
        std::thread::sleep(Duration::from_millis(700));
        net.isolate(victim);
        t0 = Instant::now();
    });
    wait_sent(p, files.len() + 1, Duration::from_secs(150), || {
        beta.poll(t0);
        alpha.poll(t0);
        if matches!(target, Target::Leader) && elected.is_none() {
            if let Some(l) = net.leader(&q, &others).filter(|l| *l != victim) {
                elected = Some((l, t0.elapsed()));
            }
        }
    });
    let placed = t0.elapsed();
    let leader_during = net.leader(&q, &others).unwrap_or(0);
    // Everything arrived with the node still cut off.
    let (bad_cut, dup_cut) = check(p, &files_with_warm(p, &files));
    let healed = net.heal_and_wait();
    // What the isolated node held comes back now, if anything: give it time.
    std::thread::sleep(Duration::from_secs(5));
    let (bad, dup) = check(p, &files_with_warm(p, &files));
    figures(&format!(
        "partition[{what}]: node {victim} isolated (queue leader n{leader_before}, n{leader_during} during the cut{}), {} files, receiver {}, sender {}, all placed {:.1}s after the cut, cluster whole {:.1}s after the heal, {} lost or corrupted, {} duplicate hooks",
        elected.map_or(String::new(), |(_, d)| format!(
            ", elected in {:.1}s",
            d.as_secs_f64()
        )),
        files.len() + 1,
        beta.text(),
        alpha.text(),
        placed.as_secs_f64(),
        healed.as_secs_f64(),
        bad_cut.max(bad),
        dup_cut.max(dup),
    ));
    assert_eq!((bad_cut, dup_cut), (0, 0));
    assert_eq!((bad, dup), (0, 0));
    match target {
        Target::AgentsNode(_) => {
            assert!(alpha.at.is_some(), "alpha never left the isolated node");
            assert!(beta.at.is_some(), "beta never left the isolated node");
        }
        Target::Leader => assert_ne!(leader_during, victim, "the leader did not move"),
        Target::Follower => {}
    }
}

/// The warm-up file's entry plus `files`.
fn files_with_warm(p: &Pair, files: &[(String, String)]) -> Vec<(String, String)> {
    let warm = p.inbox.join("warm-0.bin");
    let mut all = vec![("warm-0.bin".to_string(), sha256_file(&warm))];
    all.extend(files.iter().cloned());
    all
}

/// The sender reaches only node 1, the receiver only node 3; then node 1
/// is cut from nodes 2 and 3. Node 1, the minority, pauses; the sender
/// confirms nothing of the files dropped meanwhile and says it waits; the
/// receiver on the majority is unaffected. Once node 1's links heal (the
/// sender still reaching node 1 alone), node 1 resumes and every file
/// arrives once.
fn sender_cut_from_receiver(net: &Net) {
    for (x, y) in [("a", "n2"), ("a", "n3"), ("b", "n1"), ("b", "n2")] {
        net.cut(x, y);
    }
    // beta declares and consumes on node 3, alpha on node 1.
    let p = start_pair(net, 2, 2, 0);
    let before_waits = p.alpha.log().matches("Publishing interrupted").count();
    net.cut("n1", "n2");
    net.cut("n1", "n3");
    let t0 = Instant::now();
    let files = drop_files(&p, "minority", 4, 1 << 20);
    let mut paused = None;
    // Longer than the cluster takes to count node 1 out (net_ticktime
    // 15 s +- 25 %) and than the sender's confirm_timeout (20 s).
    let hold = Duration::from_secs(40);
    while t0.elapsed() < hold {
        if paused.is_none() && !net.running(1) {
            paused = Some(t0.elapsed());
        }
        let h = p.alpha.history();
        let confirmed: Vec<_> = h
            .iter()
            .filter(|r| {
                r["file_name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("minority"))
                    && ["awaiting_receipt", "hook_running", "sent"]
                        .contains(&r["status"].as_str().unwrap_or(""))
            })
            .collect();
        assert!(
            confirmed.is_empty(),
            "the minority confirmed a file: {confirmed:?}\n{}",
            p.alpha.log()
        );
        assert!(
            p.inbox_files() == ["warm-0.bin"],
            "a file arrived from the minority side"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // What the sender said meanwhile: the error codes of its waits.
    let mut codes: Vec<String> = p
        .alpha
        .log()
        .lines()
        .filter(|l| l.contains("Publishing interrupted"))
        .skip(before_waits)
        .filter_map(|l| l.split("error_code=").nth(1))
        .filter_map(|c| c.split_whitespace().next())
        .map(String::from)
        .collect();
    codes.sort();
    codes.dedup();
    assert!(
        !codes.is_empty(),
        "the sender did not say it waits:\n{}",
        p.alpha.log()
    );
    assert!(
        paused.is_some(),
        "node 1 did not pause as a minority (cluster_partition_handling)"
    );
    // Only node 1's cut heals: the sender still reaches node 1 alone, so
    // its files go once node 1 has resumed and rejoined.
    net.heal("n1", "n2");
    net.heal("n1", "n3");
    let t1 = Instant::now();
    wait_sent(&p, files.len() + 1, Duration::from_secs(150), || {});
    let placed = t1.elapsed();
    wait_until(Duration::from_secs(120), "the cluster whole", || {
        net.healthy()
    });
    net.heal_all();
    std::thread::sleep(Duration::from_secs(3));
    let (bad, dup) = check(&p, &files_with_warm(&p, &files));
    figures(&format!(
        "partition[sender | receiver]: sender on node 1 cut from nodes 2-3 and the receiver, {} files, node 1 paused {:.1}s after the cut, 0 confirmed in {:.0}s on the minority (the sender waited: {}), all placed {:.1}s after node 1's cut healed, {} lost or corrupted, {} duplicate hooks",
        files.len() + 1,
        paused.map_or(-1.0, |d| d.as_secs_f64()),
        hold.as_secs_f64(),
        codes.join(", "),
        placed.as_secs_f64(),
        bad,
        dup,
    ));
    assert_eq!((bad, dup), (0, 0));
}

#[test]
fn partitions() {
    let net = Net::up();
    // Node 2 carries the agents: alpha publishes there (consumes on node
    // 1), beta consumes there; the queue is led by node 1.
    {
        let p = start_pair(&net, 0, 1, 0);
        isolate_one(&net, "agents' node", Target::AgentsNode(2), &p);
    }
    // The queue led by node 1, no agent on it: alpha consumes on node 2
    // and publishes on node 3, beta consumes on node 2.
    {
        let p = start_pair(&net, 0, 1, 1);
        isolate_one(&net, "queue leader", Target::Leader, &p);
    }
    // A follower of the queue, that no agent uses when the queue is led
    // by node 1 (agents on nodes 1 and 2).
    {
        let p = start_pair(&net, 0, 0, 0);
        isolate_one(&net, "follower", Target::Follower, &p);
    }
    sender_cut_from_receiver(&net);
}

/// Where namespaces cannot be made (here: run as `nobody`, not root), the
/// network does not come up and says why, so `partitions` fails instead of
/// passing without having cut anything; nothing is left behind.
#[test]
fn without_namespaces_the_network_refuses_to_come_up() {
    let dir = common::attacker::open_dir("hkbp-noroot");
    common::attacker::let_nobody_write(dir.path());
    let copy = dir.path().join("netns-cluster.sh");
    fs::copy(script(), &copy).unwrap();
    let id = format!("hkbp-n{}", std::process::id());
    let out = common::attacker::as_nobody(&copy)
        .arg("up")
        .env("HKBP_ID", &id)
        .env("HKBP_BASE", dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "up succeeded as nobody: {err}");
    assert!(err.contains("network namespaces need root"), "{err}");
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&id),
        "a namespace was left behind"
    );
}
