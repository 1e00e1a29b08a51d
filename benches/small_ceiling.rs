//! The small-file ceiling for `benches/run.sh`: the least any receiver must do
//! per file under hakobu's contract, with no broker, no sender, no database
//! and nothing else running, so that what it takes is a floor under every
//! small-file figure on this machine (its disk, its filesystem, its cores).
//!
//! Per file, on worker threads side by side:
//! - a new partial file: create, write the body, `fdatasync`;
//! - put in place: rename into the inbox, `fsync` of the inbox directory;
//! - the success hook: a new log file per transfer (SPEC: "full output into a
//!   log file per transfer"), the hook started in a process group of its own
//!   with its output to that log, and waited for.
//!
//! The hook is the benchmark's own (`/bin/date +%s.%N {file_name}`); the
//! clock runs from the first file to the last hook's exit. One JSON line on
//! stdout: `{"files":..,"seconds":..,"files_per_s":..,"parallel":..}`.
//!
//! Usage (cargo builds it with `cargo build --release --bench small_ceiling`):
//!   small_ceiling --dir DIR [--files 2000] [--size 4096] [--parallel 16] -- HOOK ARGS...

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

struct Args {
    dir: PathBuf,
    files: usize,
    size: usize,
    parallel: usize,
    hook: Vec<String>,
}

fn args() -> Args {
    let mut a = Args {
        dir: PathBuf::new(),
        files: 2000,
        size: 4096,
        parallel: 16,
        hook: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            // `cargo bench` passes --bench; ignore it.
            "--bench" => {}
            "--" => {
                a.hook = it.by_ref().collect();
                break;
            }
            _ => {
                let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
                match k.as_str() {
                    "--dir" => a.dir = PathBuf::from(v),
                    "--files" => a.files = v.parse().expect("--files N"),
                    "--size" => a.size = v.parse().expect("--size BYTES"),
                    "--parallel" => a.parallel = v.parse().expect("--parallel N"),
                    _ => panic!("unknown argument {k}"),
                }
            }
        }
    }
    assert!(!a.dir.as_os_str().is_empty(), "--dir is required");
    assert!(!a.hook.is_empty(), "the hook command follows --");
    assert!(a.parallel > 0, "--parallel must be at least 1");
    a
}

/// One file's work, as a receiver must do it.
fn one(dir: &Path, i: usize, body: &[u8], hook: &[String]) -> std::io::Result<()> {
    let name = format!("s{i}.dat");
    let partial = dir.join("partial").join(format!("{i}.part"));
    let mut f = File::create(&partial)?;
    f.write_all(body)?;
    f.sync_data()?;
    drop(f);
    let inbox = dir.join("inbox");
    fs::rename(&partial, inbox.join(&name))?;
    File::open(&inbox)?.sync_all()?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("logs").join(format!("{i}.received.log")))?;
    let argv: Vec<String> = hook
        .iter()
        .map(|a| a.replace("{file_name}", &name))
        .collect();
    let status = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .process_group(0)
        .status()?;
    if !status.success() {
        return Err(std::io::Error::other(format!("hook exited with {status}")));
    }
    Ok(())
}

fn main() {
    let a = args();
    for sub in ["partial", "inbox", "logs"] {
        fs::create_dir_all(a.dir.join(sub)).expect("cannot create the work directory");
    }
    let body = vec![b'x'; a.size];
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..a.parallel {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= a.files {
                        break;
                    }
                    one(&a.dir, i + 1, &body, &a.hook).expect("a file of the ceiling run failed");
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{{\"files\":{},\"seconds\":{:.3},\"files_per_s\":{:.1},\"parallel\":{}}}",
        a.files,
        seconds,
        a.files as f64 / seconds,
        a.parallel
    );
}
