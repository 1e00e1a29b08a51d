//! The attacker's side of `security_embedded.rs`: this test binary again,
//! run as `nobody`, entering `attacker::attacker_entry_point` with the attack
//! named in `HAKOBU_ATTACK`; it speaks the embedded broker's protocol over
//! raw TCP, as a rogue local process would, and prints `ATTACK key=value`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use hakobu::broker::embedded::frame::{Frame, PROTOCOL_VERSION};

use super::common::attacker::{as_nobody, open_dir};

/// The copy of this test binary that `nobody` runs, in a directory of its
/// own. A static is never dropped, so the directory is removed at exit
/// (`remove_copy`); before, every run left a copy of the binary in /tmp.
static COPY: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();

extern "C" fn remove_copy() {
    if let Some((d, _)) = COPY.get() {
        let _ = std::fs::remove_dir_all(d.path());
    }
}

/// This test binary, copied where `nobody` may run it.
fn attacker_bin() -> PathBuf {
    let (_, path) = COPY.get_or_init(|| {
        // SAFETY: registers a plain function, once; it runs at exit.
        unsafe {
            nix::libc::atexit(remove_copy);
        }
        let d = open_dir("hakobu-attacker-");
        let p = d.path().join("attacker");
        std::fs::copy(std::env::current_exe().unwrap(), &p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        (d, p)
    });
    path.clone()
}

/// An attack, run as `nobody`: `kind` with its settings.
pub struct Attack {
    env: Vec<(String, String)>,
}

impl Attack {
    pub fn new(kind: &str, addr: &str) -> Attack {
        Attack {
            env: vec![
                ("HAKOBU_ATTACK".into(), kind.into()),
                ("HAKOBU_ATTACK_ADDR".into(), addr.into()),
            ],
        }
    }

    pub fn set(mut self, k: &str, v: &str) -> Attack {
        self.env.push((format!("HAKOBU_ATTACK_{k}"), v.to_string()));
        self
    }

    /// As node `node` with `secret` (either may be wrong or empty).
    pub fn acting_as(self, node: &str, secret: &str) -> Attack {
        self.set("NODE", node).set("SECRET", secret)
    }

    fn command(&self) -> Command {
        let mut c = as_nobody(attacker_bin());
        c.args([
            "attacker::attacker_entry_point",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ]);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    pub fn run(&self) -> Report {
        Report(self.command().output().expect("start the attacker"))
    }

    pub fn spawn(&self) -> Child {
        self.command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the attacker")
    }
}

/// What the attacker printed: `ATTACK key=value` lines.
pub struct Report(pub Output);

impl Report {
    pub fn get(&self, key: &str) -> String {
        let out = String::from_utf8_lossy(&self.0.stdout);
        out.lines()
            .find_map(|l| {
                // libtest may print "test attacker_entry_point ... " first.
                let tag = format!("ATTACK {key}=");
                l.find(&tag).map(|i| &l[i + tag.len()..])
            })
            .map(String::from)
            .unwrap_or_else(|| {
                panic!(
                    "the attacker reported no {key}: status {:?}\n{out}\n{}",
                    self.0.status,
                    String::from_utf8_lossy(&self.0.stderr)
                )
            })
    }

    pub fn num(&self, key: &str) -> u64 {
        self.get(key).parse().unwrap()
    }
}

fn env(k: &str) -> String {
    std::env::var(format!("HAKOBU_ATTACK_{k}")).unwrap_or_default()
}

fn put(s: &mut TcpStream, f: &Frame) -> std::io::Result<()> {
    let b = f.encode();
    let mut buf = (b.len() as u32).to_be_bytes().to_vec();
    buf.extend_from_slice(&b);
    s.write_all(&buf)
}

/// The next frame, `None` at EOF, a timeout or a reset.
fn get(s: &mut TcpStream) -> Option<Frame> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    Frame::decode(Bytes::from(body)).ok()
}

/// Connects and says hello as the attack's node; the broker's reply.
fn hello() -> (TcpStream, String) {
    let mut s = TcpStream::connect(env("ADDR")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let hello = Frame::Hello {
        version: PROTOCOL_VERSION,
        node: env("NODE"),
        secret: env("SECRET"),
    };
    let reply = match put(&mut s, &hello).ok().and_then(|()| get(&mut s)) {
        Some(Frame::Welcome { .. }) => "welcome".to_string(),
        Some(Frame::Error { message }) => format!("refused: {message}"),
        other => format!("{other:?}"),
    };
    (s, reply)
}

/// Frames that arrive within `within`, by kind.
fn drain(s: &mut TcpStream, within: Duration) -> (u64, String) {
    s.set_read_timeout(Some(within)).unwrap();
    let (mut delivered, mut last) = (0, String::from("none"));
    while let Some(f) = get(s) {
        match f {
            Frame::Deliver { .. } => delivered += 1,
            Frame::Error { message } => last = format!("error: {message}"),
            other => last = format!("{other:?}"),
        }
    }
    (delivered, last)
}

/// The attacker's side of each test. In a normal run (no `HAKOBU_ATTACK`)
/// it does nothing: it is the entry point the attacks run through.
#[test]
fn attacker_entry_point() {
    let Ok(kind) = std::env::var("HAKOBU_ATTACK") else {
        return;
    };
    match kind.as_str() {
        // Consume another node's queue: with the given credentials, and
        // without any hello at all.
        "steal" => {
            let (mut s, reply) = hello();
            println!("ATTACK hello={reply}");
            let sub = Frame::Subscribe {
                queue: env("QUEUE"),
                prefetch: 100,
            };
            let _ = put(&mut s, &sub);
            let (delivered, last) = drain(&mut s, Duration::from_secs(3));
            println!("ATTACK delivered={delivered}");
            println!("ATTACK last={last}");
            let mut raw = TcpStream::connect(env("ADDR")).unwrap();
            let _ = put(&mut raw, &sub);
            let (no_hello, _) = drain(&mut raw, Duration::from_secs(3));
            println!("ATTACK delivered_without_hello={no_hello}");
        }
        // Publish a prepared message (a file's bytes) to a queue.
        "publish" => {
            let (mut s, reply) = hello();
            println!("ATTACK hello={reply}");
            let payload = std::fs::read(env("PAYLOAD")).unwrap();
            let f = Frame::Publish {
                seq: 1,
                queue: env("QUEUE"),
                payload: payload.into(),
            };
            let _ = put(&mut s, &f);
            let outcome = match get(&mut s) {
                Some(Frame::Confirm { .. }) => "confirmed".to_string(),
                Some(Frame::Nack { reason, .. }) => format!("nack: {reason}"),
                other => format!("{other:?}"),
            };
            println!("ATTACK publish={outcome}");
        }
        // Length prefixes of 16 MiB before any hello, the bytes after them,
        // on many connections held open together.
        "oversize" => {
            let n = 40;
            let (mut held, mut refused) = (Vec::new(), 0);
            let piece = vec![1u8; 64 << 10];
            for _ in 0..n {
                let mut s = TcpStream::connect(env("ADDR")).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut ok = s.write_all(&(16u32 << 20).to_be_bytes()).is_ok();
                let mut left = (16usize << 20) - 1;
                while ok && left > 0 {
                    let k = left.min(piece.len());
                    ok = s.write_all(&piece[..k]).is_ok();
                    left -= k;
                }
                refused += u64::from(!ok);
                held.push(s);
            }
            println!("ATTACK refused={refused}");
            std::thread::sleep(Duration::from_secs(3));
        }
        // Connections held open without a word (or, with credentials, after
        // the hello), many more than the broker should take.
        "flood" => {
            let n: usize = env("COUNT").parse().unwrap();
            let with_hello = !env("NODE").is_empty();
            let (mut held, mut welcomed) = (Vec::new(), 0);
            for _ in 0..n {
                let s = if with_hello {
                    let (s, reply) = hello();
                    welcomed += u64::from(reply == "welcome");
                    s
                } else {
                    match TcpStream::connect(env("ADDR")) {
                        Ok(s) => s,
                        Err(_) => continue,
                    }
                };
                held.push(s);
            }
            println!("ATTACK welcomed={welcomed}");
            std::thread::sleep(Duration::from_secs(env("HOLD").parse().unwrap()));
            println!("ATTACK held={}", held.len());
        }
        // A consumer of its own queue that never reads, and a publisher
        // filling that queue.
        "hog" => {
            let (mut consumer, reply) = hello();
            println!("ATTACK hello={reply}");
            let own = format!("hakobu.node.{}", env("NODE"));
            let sub = Frame::Subscribe {
                queue: own.clone(),
                prefetch: 1024,
            };
            put(&mut consumer, &sub).unwrap();
            let (mut publisher, _) = hello();
            let mib: u64 = env("MIB").parse().unwrap();
            let body = Bytes::from(vec![7u8; 1 << 20]);
            let mut w = publisher.try_clone().unwrap();
            let writer = std::thread::spawn(move || {
                for seq in 0..mib {
                    let f = Frame::Publish {
                        seq,
                        queue: own.clone(),
                        payload: body.clone(),
                    };
                    if put(&mut w, &f).is_err() {
                        return;
                    }
                }
            });
            publisher
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let mut confirmed = 0;
            for _ in 0..mib {
                match get(&mut publisher) {
                    Some(Frame::Confirm { .. }) => confirmed += 1,
                    _ => break,
                }
            }
            let _ = writer.join();
            println!("ATTACK confirmed={confirmed}");
            std::fs::write(Path::new(&env("MARK")), b"published").unwrap();
            std::thread::sleep(Duration::from_secs(4));
            drop(consumer);
        }
        // Authenticated, then silent: how long until the broker hangs up.
        "silent" => {
            let (mut s, reply) = hello();
            println!("ATTACK hello={reply}");
            let start = std::time::Instant::now();
            let (_, last) = drain(&mut s, Duration::from_secs(30));
            println!("ATTACK closed_after_ms={}", start.elapsed().as_millis());
            println!("ATTACK last={last}");
        }
        other => panic!("unknown attack {other}"),
    }
}
