//! Bad input on the real three-node RabbitMQ cluster: a rogue publisher with
//! broker credentials injects crafted messages straight into a receiving
//! agent's queue. Each one must be refused with its stable error code, in
//! history, in the failure hook and in a failure receipt to the sender; what
//! cannot be parsed goes to the dead-letter queue. Nothing is ever written
//! outside the inbox, the agent stays up, and it still accepts a good transfer.

mod common;

use std::collections::HashSet;
use std::fs;

use bytes::Bytes;
use common::rogue::*;
use common::{hook_env, hook_runs, unique, wait_until};

#[test]
fn a_sender_not_in_from_is_refused() {
    let mut rig = Rig::new();
    let body = b"not from you\n";

    // A node this agent knows (it may send OTHER), but not for DATA: refused
    // and told so.
    let known = rig.other_sender.clone();
    rig.listen_as(&known);
    let tid = new_tid();
    rig.inject_chunk(rig.header(&known, &tid, "x.csv", body), body);
    rig.expect_refused(&known, &tid, "sender_not_allowed", true);

    // A node this configuration never names: refused and recorded, but not
    // answered, so that a forged `from` cannot make the agent create queues.
    let stranger = unique("stranger");
    let tid2 = new_tid();
    rig.inject_chunk(rig.header(&stranger, &tid2, "y.csv", body), body);
    rig.expect_refused_unanswered(&stranger, &tid2, "sender_not_allowed");

    rig.finish(&[&tid]);
    assert!(rig.queue_exists(&known), "the positive control failed");
}

#[test]
fn an_unknown_file_id_is_refused_without_a_hook() {
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let tid = new_tid();
    let body = b"for nobody\n";
    let mut h = rig.header(&from, &tid, "x.csv", body);
    h.file_id = "NO_SUCH_PROFILE".into();
    rig.inject_chunk(h, body);
    rig.expect_refused(&from, &tid, "unknown_file_id", false);
    rig.finish(&[&tid]);
}

#[test]
fn file_names_that_are_not_plain_base_names_are_refused() {
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let names = [
        // At most ten: more refused transfers in a minute and the failure
        // hooks beyond are suppressed (tests/security_input.rs).
        "../evil",
        "/etc/passwd",
        "..",
        "a\nb",
        "a\\b",
        ".hidden",
        // An option to the hook's program, whatever it is.
        "-rf",
        // Shows as "invoiceexe.pdf" in a terminal.
        "invoice\u{202E}fdp.exe",
        // Clears the operator's terminal when printed.
        "a\u{1b}[2Jb",
        "zero\u{200B}width",
    ];
    let mut tids = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let tid = new_tid();
        let body = format!("payload {i}\n").into_bytes();
        rig.inject_chunk(rig.header(&from, &tid, name, &body), &body);
        tids.push(tid);
    }
    for (name, tid) in names.iter().zip(&tids) {
        eprintln!("checking file name {name:?} ({tid})");
        rig.expect_refused(&from, tid, "bad_file_name", true);
        // The hook sees the offending name escaped, never raw, and no path.
        let escaped = hakobu::domain::escape_name(name);
        let env = hook_env(&rig.hooks, tid, "receive_failed");
        assert_eq!(env.get("HAKOBU_FILE_NAME"), Some(&escaped), "{name:?}");
        assert_eq!(env.get("HAKOBU_PATH").map(String::as_str), Some(""));
        let args =
            fs::read_to_string(rig.hooks.join(format!("{tid}.receive_failed.args"))).unwrap();
        assert_eq!(
            args,
            format!("{escaped}\n"),
            "the hook's {{file_name}} argument"
        );
        assert!(
            !escaped.starts_with(['-', '.']) && !escaped.contains('/'),
            "{escaped:?}"
        );
    }
    // The operator's terminal: `hakobu history` prints no control or
    // format character that came from the network.
    let out = rig.agent.cli(&["history", "--limit", "1000"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text
            .chars()
            .any(|c| c != '\n' && hakobu::domain::unsafe_char(c)),
        "history printed a raw control or format character:\n{text}"
    );
    let refused: Vec<&str> = tids.iter().map(String::as_str).collect();
    rig.finish(&refused);
}

/// A NUL cannot travel in an environment variable or an argv element; the
/// failure hook (`[hook, "{file_name}"]`) must still run once and the receipt
/// must still go back.
#[test]
fn a_file_name_with_a_nul_is_refused() {
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let tid = new_tid();
    let body = b"nul\n";
    rig.inject_chunk(rig.header(&from, &tid, "a\0b", body), body);
    rig.expect_refused(&from, &tid, "bad_file_name", true);
    rig.finish(&[&tid]);
}

/// A failure hook that does not finish normally (here: it times out) still
/// counts as run: it runs once, and the receipt goes back.
#[test]
fn a_failure_hook_that_times_out_runs_once_and_the_receipt_still_goes_back() {
    let mut rig = Rig::with(Opts {
        on_failure: Some("{ run: [ \"{hook}\", \"{file_name}\" ], timeout: 1s }"),
        env: &[("HOOK_SLEEP", "3")],
        ..Opts::default()
    });
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let tid = new_tid();
    let body = b"escape\n";
    rig.inject_chunk(rig.header(&from, &tid, "../evil", body), body);
    rig.expect_refused(&from, &tid, "bad_file_name", true);
    rig.finish(&[&tid]);
}

#[test]
fn a_declared_size_over_max_size_is_refused() {
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let mut tids = Vec::new();
    for size in [MAX_SIZE + 1, u64::MAX] {
        // The first chunk of a file that would be too large.
        let tid = new_tid();
        let body = pattern(CHUNK as usize, size);
        let mut h = rig.header(&from, &tid, "huge.bin", &body);
        h.size = size;
        h.last = None;
        rig.inject_chunk(h, &body);
        tids.push(tid);
    }
    for tid in &tids {
        rig.expect_refused(&from, tid, "file_too_large", true);
    }
    let refused: Vec<&str> = tids.iter().map(String::as_str).collect();
    rig.finish(&refused);
}

#[test]
fn a_chunk_outside_the_declared_size_is_refused() {
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let small = b"0123456789".to_vec();
    let mut tids = Vec::new();

    // Each case: (size, offset, body) of a single, last chunk.
    let cases: Vec<(u64, u64, Vec<u8>)> = vec![
        // Offset beyond the declared size.
        (10, CHUNK, small.clone()),
        // Far beyond, where a sparse write would make a huge file.
        (10, CHUNK * (1 << 40), small.clone()),
        // A body longer than the declared size.
        (10, 0, pattern(20, 1)),
        // A body longer than a chunk.
        (MAX_SIZE, 0, pattern(CHUNK as usize + 1, 2)),
        // A body shorter than declared.
        (100, 0, pattern(50, 3)),
        // An offset off the chunk grid.
        (CHUNK * 2, 1, pattern(CHUNK as usize, 4)),
    ];
    let mut first = None;
    for (size, offset, body) in cases {
        let tid = new_tid();
        let mut h = rig.header(&from, &tid, "range.bin", &body);
        h.size = size;
        h.offset = offset;
        first.get_or_insert_with(|| (h.clone(), body.clone()));
        rig.inject_chunk(h, &body);
        tids.push(tid);
    }

    // A good first chunk (written to the partial file), then a second chunk
    // beyond the end: the transfer fails and the partial file goes.
    let tid = new_tid();
    let file = pattern(CHUNK as usize + 100, 5);
    let mut h = rig.header(&from, &tid, "two.bin", &file);
    h.last = None;
    rig.inject_chunk(h.clone(), &file[..CHUNK as usize]);
    h.offset = 2 * CHUNK;
    h.last = trailer(sha256(&file));
    rig.inject_chunk(h, &file[CHUNK as usize..]);
    tids.push(tid);

    for tid in &tids {
        rig.expect_refused(&from, tid, "chunk_out_of_range", true);
    }
    // The same bad chunk again (a redelivery, or a replay): the transfer is
    // settled, so no second hook and no second receipt (checked by finish).
    let (h, body) = first.unwrap();
    rig.inject_chunk(h, &body);
    let refused: Vec<&str> = tids.iter().map(String::as_str).collect();
    rig.finish(&refused);
}

/// A flood of transfers begun and never finished (a first chunk each, then
/// nothing): after `partial_ttl` every one expires, its partial file is
/// removed, its failure hook runs once and a failure receipt goes back; the
/// agent keeps receiving.
#[test]
fn a_flood_of_unfinished_transfers_expires_and_is_cleaned_up() {
    let mut rig = Rig::with(Opts {
        profile_extra: "    partial_ttl: 3s\n",
        ..Default::default()
    });
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let file = pattern(CHUNK as usize * 2, 11);
    let mut tids = Vec::new();
    for i in 0..50 {
        let tid = new_tid();
        let mut h = rig.header(&from, &tid, &format!("flood-{i}.bin"), &file);
        h.last = None;
        rig.inject_chunk(h, &file[..CHUNK as usize]);
        tids.push(tid);
    }
    for tid in &tids {
        rig.expect_refused(&from, tid, "transfer_expired", true);
    }
    let refused: Vec<&str> = tids.iter().map(String::as_str).collect();
    rig.finish(&refused);
}

#[test]
fn a_sha256_mismatch_is_refused_and_nothing_is_placed() {
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let mut tids = Vec::new();

    // One chunk, the digest of other bytes.
    let tid = new_tid();
    let body = b"id,amount\n1,100\n".to_vec();
    let mut h = rig.header(&from, &tid, "one.csv", &body);
    h.last = trailer(sha256(b"something else"));
    rig.inject_chunk(h, &body);
    tids.push(tid);

    // Two chunks, the last chunk's trailer wrong by one digit.
    let tid = new_tid();
    let file = pattern(CHUNK as usize + 1000, 9);
    let mut good = sha256(&file).into_bytes();
    good[0] = if good[0] == b'0' { b'1' } else { b'0' };
    let mut h = rig.header(&from, &tid, "two.bin", &file);
    h.last = None;
    rig.inject_chunk(h.clone(), &file[..CHUNK as usize]);
    h.offset = CHUNK;
    h.last = trailer(String::from_utf8(good).unwrap());
    rig.inject_chunk(h, &file[CHUNK as usize..]);
    tids.push(tid);

    for tid in &tids {
        rig.expect_refused(&from, tid, "sha256_mismatch", true);
    }
    assert!(!rig.inbox.join("one.csv").exists(), "a bad file was placed");
    assert!(!rig.inbox.join("two.bin").exists(), "a bad file was placed");
    let refused: Vec<&str> = tids.iter().map(String::as_str).collect();
    rig.finish(&refused);
}

/// What cannot be parsed (or names no usable transfer) is dead-lettered: no
/// history row, no receipt, no hook, and the agent carries on.
#[test]
fn malformed_messages_are_dead_lettered() {
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let tid = new_tid();
    let body = b"hello\n".to_vec();
    let valid = chunk_frame(&rig.header(&from, &tid, "m.txt", &body), &body);

    let mut bad_version = valid.to_vec();
    bad_version[3] = 99;
    let mut bad_kind = valid.to_vec();
    bad_kind[4] = 77;
    let mut bad_json = valid[..9].to_vec();
    bad_json.extend_from_slice(b"{\"transfer_id\":");
    let header_len = bad_json.len() as u32 - 9;
    bad_json[5..9].copy_from_slice(&header_len.to_be_bytes());
    let mut unknown_field = Vec::from(&b"HKB\x01\x01"[..]);
    let header = format!(
        "{{\"transfer_id\":\"{tid}\",\"file_id\":\"DATA\",\"from\":\"{from}\",\"to\":\"{}\",\"file_name\":\"u.txt\",\"size\":1,\"chunk_size\":65536,\"offset\":0,\"exec\":\"rm -rf /\"}}",
        rig.agent.node
    );
    unknown_field.extend_from_slice(&(header.len() as u32).to_be_bytes());
    unknown_field.extend_from_slice(header.as_bytes());
    unknown_field.push(b'x');

    let malformed: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", pattern(777, 42)),
        ("empty", Vec::new()),
        ("truncated frame", valid[..20].to_vec()),
        ("truncated prefix", valid[..5].to_vec()),
        ("bad version", bad_version),
        ("bad kind", bad_kind),
        ("malformed header", bad_json),
        ("unknown header field", unknown_field),
    ];
    let dead_before = rig.dead_letter_count();
    for (_, payload) in &malformed {
        rig.inject(Bytes::from(payload.clone()));
    }
    // Parsable, but naming no usable transfer: a path as transfer id, another
    // node as recipient.
    rig.inject_chunk(
        rig.header(&from, "../../../../tmp/x-1234567890", "p.txt", &body),
        &body,
    );
    let mut wrong_to = rig.header(&from, &new_tid(), "w.txt", &body);
    wrong_to.to = unique("someone-else");
    rig.inject_chunk(wrong_to, &body);
    let expected = malformed.len() + 2;

    wait_until(WAIT, "every malformed message to be dead-lettered", || {
        rig.agent.log().matches("Dead-lettering").count() >= expected
    });
    let log = rig.agent.log();
    let dead_lettered = log.matches("Dead-lettering").count();
    assert!(
        dead_lettered <= expected + rig.republished.get(),
        "{dead_lettered} dead-lettered, {expected} sent\nagent log:\n{log}"
    );
    assert!(log.contains("bytes=777"), "agent log:\n{log}");
    // They are in the dead-letter queue, not dropped.
    wait_until(WAIT, "the dead-letter queue to hold them", || {
        rig.dead_letter_count() >= dead_before + expected as u32
    });
    assert!(!log.contains("panicked"), "agent log:\n{log}");
    assert!(rig.agent.alive(), "the agent died");
    assert!(
        rig.agent.history().is_empty(),
        "malformed input became a transfer: {:?}",
        rig.agent.history()
    );

    rig.finish(&[]);
    // Only the good transfer is in history, and no hook ran for anything else.
    let history = rig.agent.history();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["status"], "received");
    assert_eq!(hook_runs(&rig.hooks).len(), 1);
    let receipted: HashSet<&String> = rig.receipt_counts.keys().collect();
    assert_eq!(receipted.len(), 1, "receipts for malformed input");
}

/// With `verify_sender: true`, a chunk whose `from` is not the broker user
/// that published it (the rogue logs in as `hakobu` and claims to be the
/// allowed node) is dead-lettered untouched: no history, no hook, no receipt.
#[test]
fn a_forged_sender_is_dead_lettered_when_verify_sender_is_on() {
    let mut rig = Rig::with(Opts {
        broker_extra: "    verify_sender: true\n",
        ..Opts::default()
    });
    let from = rig.allowed.clone();
    let tid = new_tid();
    let body = b"forged\n";
    rig.inject_chunk(rig.header(&from, &tid, "f.csv", body), body);
    wait_until(WAIT, "the forged chunk to be dead-lettered", || {
        rig.agent
            .log()
            .lines()
            .any(|l| l.contains("Dead-lettering") && l.contains(&tid))
    });
    let log = rig.agent.log();
    assert!(log.contains("sender_mismatch"), "{}", rig.log_tail());
    assert!(rig.agent.alive(), "the agent died");
    assert!(
        rig.agent.history().is_empty(),
        "a forged chunk became a transfer: {:?}",
        rig.agent.history()
    );
    assert!(hook_runs(&rig.hooks).is_empty(), "a hook ran");
    assert!(
        !rig.queue_exists(&from),
        "a receipt queue was created for the forged sender"
    );
    rig.assert_nothing_escaped();
}

/// The peak resident memory of a process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent's status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib << 10
}

/// Compressed chunks (issue 13, item 4) whose content does not inflate to
/// exactly the chunk's declared length: a zstd bomb (1 GiB of zeros in a
/// few dozen KiB), a frame that declares a content size larger than the
/// chunk, one that inflates short of it, and bytes that are not zstd. Each
/// fails its transfer with `inconsistent_chunk`, and the receiver never
/// allocates the inflated size.
#[test]
fn compressed_chunks_that_inflate_past_or_short_of_their_length_are_refused() {
    use std::io::Read;
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let pid = rig.agent.pid();
    let before = peak_rss(pid);

    let mut bomb = Vec::new();
    zstd::stream::copy_encode(std::io::repeat(0).take(1 << 30), &mut bomb, 1).unwrap();
    assert!(bomb.len() < 256 << 10, "the bomb is {} bytes", bomb.len());
    // The bulk API writes the content size into the frame: 256 MiB.
    let declares_large = zstd::bulk::compress(&vec![0u8; 256 << 20], 1).unwrap();
    let short = zstd::bulk::compress(&[7u8; 500], 1).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("bomb.csv", bomb),
        ("declares.csv", declares_large),
        ("short.csv", short),
        ("garbage.csv", b"this is not a zstd frame at all".to_vec()),
    ];
    let mut tids = Vec::new();
    for (name, body) in cases {
        let tid = new_tid();
        let declared = vec![0u8; 1000];
        let mut h = rig.header(&from, &tid, name, &declared);
        h.compressed = Some("zstd".into());
        rig.inject_chunk(h, &body);
        tids.push(tid);
    }
    for tid in &tids {
        rig.expect_refused(&from, tid, "inconsistent_chunk", true);
    }
    for (name, _) in [("bomb.csv", ()), ("declares.csv", ()), ("short.csv", ())] {
        assert!(!rig.inbox.join(name).exists(), "{name} was placed");
    }
    let after = peak_rss(pid);
    assert!(
        after < before + (64 << 20),
        "the receiver's peak RSS grew from {before} to {after} bytes on a zstd bomb"
    );

    // The control: a good compressed chunk is placed byte for byte.
    let tid = new_tid();
    let plain: Vec<u8> = (0..2000)
        .flat_map(|i| format!("{i},tokyo,ok\n").into_bytes())
        .collect();
    let mut h = rig.header(&from, &tid, "good.csv", &plain);
    h.compressed = Some("zstd".into());
    rig.inject_chunk(h, &zstd::bulk::compress(&plain, 3).unwrap());
    let row = rig.final_row(&tid);
    assert_eq!(row["status"], "received", "{row}");
    assert_eq!(fs::read(rig.inbox.join("good.csv")).unwrap(), plain);
    assert!(
        row["wire_bytes"].as_u64().unwrap() < plain.len() as u64 / 2,
        "{row}"
    );
    rig.placed.push("good.csv".into());

    let refused: Vec<&str> = tids.iter().map(String::as_str).collect();
    rig.finish(&refused);
}
