//! RabbitMQ resource alarms (issue 15): a node's disk or memory alarm,
//! raised at run time (`rabbitmqctl set_disk_free_limit` above the free
//! space, `set_vm_memory_high_watermark` near zero) on a node neither agent
//! publishes through: alarms block publishers cluster-wide
//! (`connection.blocked`). Under a stream of files, the agents say so
//! (`broker_blocked`) without a reconnect storm; the receiver, started
//! during the alarm on files queued before it, places them and runs their
//! hooks while its own receipts wait; when the alarm clears, every file
//! arrives byte for byte, each hook runs once, every receipt settles.
//! Whatever happens, the alarm is cleared (the cluster is shared with the
//! next suites). The tests run one at a time; each prints a `figures:` line.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fault::{LogsOnPanic, delivered, hooks_by_transfer};
use common::{Pair, PairOpts, cluster, sha256_file, wait_until, write_pattern};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The node the alarm is raised on (1-based). Both agents consume
/// through node 1 and publish through node 2 (their first and second
/// URLs): an alarm on node 3 blocks them all the same, as alarms are
/// cluster-wide for publishers.
const ALARM_NODE: &str = "3";

/// A confirm timeout well inside the alarm's time: a sender that took the
/// block for a dead node (a confirm timeout, then the next URL, then the
/// chunks published again) would show it several times over.
const CONFIRM_TIMEOUT: &str = "4s";

/// How long the alarm lasts at least.
const HOLD: Duration = Duration::from_secs(12);

#[derive(Clone, Copy, Debug)]
enum Kind {
    Disk,
    Memory,
}

/// A resource alarm on one node; dropping the guard (also while a failed
/// assertion unwinds) clears it.
struct Alarm {
    kind: Kind,
    cleared: bool,
}

impl Alarm {
    fn raise(kind: Kind) -> Alarm {
        let alarm = Alarm {
            kind,
            cleared: false,
        };
        match kind {
            Kind::Disk => {
                // More than the disk holds: the node's disk monitor raises
                // the alarm at once.
                let base = std::env::var("HAKOBU_RMQ_BASE").unwrap_or_else(|_| "/".into());
                let st = nix::sys::statvfs::statvfs(Path::new(&base)).expect("statvfs");
                let size = st.blocks() as u64 * st.fragment_size() as u64;
                let limit = size.saturating_mul(2).max(1 << 40);
                cluster(&["ctl", ALARM_NODE, "set_disk_free_limit", &limit.to_string()]);
            }
            Kind::Memory => {
                cluster(&["ctl", ALARM_NODE, "set_vm_memory_high_watermark", "0.0001"]);
            }
        }
        alarm
    }

    /// The node's own settings back (local-cluster.sh's and RabbitMQ's defaults).
    fn clear_args(&self) -> [&'static str; 4] {
        match self.kind {
            Kind::Disk => ["ctl", ALARM_NODE, "set_disk_free_limit", "50MB"],
            Kind::Memory => ["ctl", ALARM_NODE, "set_vm_memory_high_watermark", "0.4"],
        }
    }

    fn clear(&mut self) {
        cluster(&self.clear_args());
        self.cleared = true;
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        if !self.cleared {
            // No assertion here: this may run while a panic unwinds.
            let script = std::env::var("HAKOBU_RMQ_CLUSTER").unwrap_or_else(|_| {
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/packaging/rabbitmq/local-cluster.sh"
                )
                .into()
            });
            let _ = std::process::Command::new(script)
                .args(self.clear_args())
                .stdin(std::process::Stdio::null())
                .status();
        }
    }
}

/// Drops `name` of `size` bytes into alpha's outbox; returns (name, sha256).
fn drop_one(p_tmp: &Path, outbox: &Path, name: &str, size: u64, seed: u64) -> (String, String) {
    let src = p_tmp.join(name);
    write_pattern(&src, size, seed);
    let want = sha256_file(&src);
    common::drop_file(outbox, name, |t| fs::rename(&src, t).unwrap());
    (name.to_string(), want)
}

/// Files dropped by a background thread, one every 250 ms, until stopped.
struct Stream {
    stop: Arc<AtomicBool>,
    files: Arc<Mutex<Vec<(String, String)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stream {
    fn start(p: &Pair) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let files = Arc::new(Mutex::new(Vec::new()));
        let (tmp, outbox) = (p.tmp.path().to_path_buf(), p.outbox.clone());
        let thread = {
            let (stop, files) = (stop.clone(), files.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    // Small and multi-chunk files (chunks of 512 KiB).
                    let size = if i % 4 == 3 { 1_300_000 } else { 8 << 10 };
                    let f = drop_one(&tmp, &outbox, &format!("stream-{i}.bin"), size, 500 + i);
                    files.lock().unwrap().push(f);
                    i += 1;
                    std::thread::sleep(Duration::from_millis(250));
                }
            })
        };
        Stream {
            stop,
            files,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) -> Vec<(String, String)> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.files.lock().unwrap().clone()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop();
    }
}

fn count(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

fn figures(line: &str) {
    // Straight to stderr: the harness captures print! of passing tests.
    let _ = writeln!(std::io::stderr(), "figures: {line}");
}

const BLOCKED: &str = "error_code=broker_blocked";
const UNBLOCKED: &str = "RabbitMQ unblocked the connection";

fn scenario(kind: Kind) {
    let _g = serial();
    let broker = common::rabbit_broker(0).replace(
        "confirm_timeout: 20s",
        &format!("confirm_timeout: {CONFIRM_TIMEOUT}"),
    );
    assert!(broker.contains(CONFIRM_TIMEOUT), "{broker}");
    let mut p = Pair::new(PairOpts {
        broker: Some(broker),
        ..Default::default()
    });
    let _logs = LogsOnPanic::of(&p);
    // Queued before the alarm, for a receiver that starts during it.
    p.alpha.start();
    let tmp = p.tmp.path().to_path_buf();
    let queued: Vec<(String, String)> = (0..8)
        .map(|i| {
            let size = if i % 2 == 0 { 4 << 10 } else { 1_500_000 };
            drop_one(&tmp, &p.outbox, &format!("queued-{i}.bin"), size, 100 + i)
        })
        .collect();
    wait_until(
        Duration::from_secs(60),
        "alpha to publish the queued files",
        || p.alpha.with_status("awaiting_receipt").len() == queued.len(),
    );
    let alpha_connects = count(&p.alpha.log(), "Connected to RabbitMQ for publishing.");

    let mut alarm = Alarm::raise(kind);
    let t0 = Instant::now();
    let mut stream = Stream::start(&p);
    let (alpha_said, beta_said, placed_during, receipts_during) = {
        wait_until(
            Duration::from_secs(30),
            "alpha to say it is blocked",
            || count(&p.alpha.log(), BLOCKED) > 0,
        );
        let alpha_said = t0.elapsed();
        p.beta.start();
        // beta places what was queued, runs the hooks, and says its
        // receipts wait, while the alarm lasts.
        wait_until(
            Duration::from_secs(60),
            "beta to place the queued files during the alarm",
            || {
                let names = p.inbox_files();
                let hooks = hooks_by_transfer(&p, "received").len();
                queued.iter().all(|(n, _)| names.contains(n)) && hooks >= queued.len()
            },
        );
        wait_until(Duration::from_secs(30), "beta to say it is blocked", || {
            count(&p.beta.log(), BLOCKED) > 0
        });
        let beta_said = t0.elapsed();
        let placed_during = p.inbox_files().len();
        std::thread::sleep(HOLD.saturating_sub(t0.elapsed()));
        let receipts_during = p.alpha.with_status("sent").len();
        (alpha_said, beta_said, placed_during, receipts_during)
    };
    let held = t0.elapsed();
    // beta's first publishing connection is made for its first receipt,
    // during the alarm: one connection, and no more.
    let (alpha_log, beta_log) = (p.alpha.log(), p.beta.log());
    let connected = "Connected to RabbitMQ for publishing.";
    let (connects_during, timeouts_during) = (
        count(&alpha_log, connected) - alpha_connects
            + count(&beta_log, connected).saturating_sub(1),
        count(&alpha_log, "broker_confirm_timeout") + count(&beta_log, "broker_confirm_timeout"),
    );
    alarm.clear();
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let mut files = queued.clone();
    files.extend(stream.stop());
    wait_until(
        Duration::from_secs(90),
        "every transfer sent (receipt settled) after the alarm",
        || p.alpha.with_status("sent").len() == files.len(),
    );
    let resumed = t1.elapsed();
    let (alpha_log, beta_log) = (p.alpha.log(), p.beta.log());

    // Every file byte for byte, nothing else; each hook exactly once.
    let (bad, dup_received) = delivered(&p, &files);
    let sent = hooks_by_transfer(&p, "sent");
    let dup = dup_received + sent.values().map(|n| n.saturating_sub(1)).sum::<usize>();
    assert_eq!(sent.len(), files.len(), "a sender hook is missing");
    assert_eq!(bad, 0, "{bad} files lost or corrupted");
    assert_eq!(dup, 0, "{dup} duplicate hook runs");
    assert!(
        count(&alpha_log, UNBLOCKED) > 0 && count(&beta_log, UNBLOCKED) > 0,
        "the agents did not say the block ended"
    );
    // Said once per blocked connection, not at every retry; the block is
    // not taken for a dead node (no fail-over, no confirm timeouts).
    let (alpha_said_n, beta_said_n) = (count(&alpha_log, BLOCKED), count(&beta_log, BLOCKED));
    assert!(
        alpha_said_n <= 2 && beta_said_n <= 2,
        "the block was logged {alpha_said_n} times by alpha, {beta_said_n} by beta"
    );
    assert!(
        connects_during == 0 && timeouts_during == 0,
        "the agents took the block for a dead node: {connects_during} new connections, {timeouts_during} confirm timeouts\n--- alpha ---\n{alpha_log}\n--- beta ---\n{beta_log}"
    );
    assert!(
        placed_during >= queued.len(),
        "beta placed {placed_during} files during the alarm"
    );
    figures(&format!(
        "{kind:?} alarm: {} files ({} queued before it, {} streamed), blocked {:.1} s; alpha said so after {:.1} s, beta after {:.1} s ({} and {} lines); beta placed {placed_during} files and ran their hooks during the alarm while {receipts_during} receipts went out; agents: {connects_during} reconnects, {timeouts_during} confirm timeouts (confirm_timeout {CONFIRM_TIMEOUT}); all sent {:.1} s after the alarm cleared; {bad} lost or corrupted, {dup} duplicate hooks",
        files.len(),
        queued.len(),
        files.len() - queued.len(),
        held.as_secs_f64(),
        alpha_said.as_secs_f64(),
        beta_said.as_secs_f64(),
        alpha_said_n,
        beta_said_n,
        resumed.as_secs_f64(),
    ));
}

#[test]
fn disk_alarm_blocks_then_everything_resumes() {
    scenario(Kind::Disk);
}

#[test]
fn memory_alarm_blocks_then_everything_resumes() {
    scenario(Kind::Memory);
}
