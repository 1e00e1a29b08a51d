//! A hook's `retry: { attempts: N, backoff: 30s }`: a failing run (non-zero
//! exit, timeout, or a command that would not start) is run again after
//! `backoff`, then twice that, and so on ([`Retry::delay`]), until one
//! succeeds or `attempts` runs have failed. Each run sees its number in
//! `HAKOBU_ATTEMPT`; each failed run is recorded in the ledger as it ends
//! (the status stays `hook_running`), and the hook's log says when the
//! next run comes. The waits are async sleeps: other transfers go on, and
//! the agent's stop ends a wait at once.
//!
//! A crash or a stop between runs leaves the transfer `hook_running`, which
//! the next start records as `hook_interrupted` like a hook cut off mid-run
//! (a run may have done part of its work; only an operator knows whether
//! to run it again): `hakobu rerun` runs the hook again, retries included.

use std::io::Write;
use std::path::Path;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{HookContext, HookOutcome, run};
use crate::config::HookSpec;
#[cfg(test)]
use crate::config::Retry;
use crate::domain::{NodeName, TransferId};
use crate::store::Side;

/// Runs `spec` for `ctx`, again while it fails and its `retry:` allows.
/// `record`: the ledger side and row to record each failed run on before
/// the wait. `None` when `stop` was cancelled during a wait: the transfer
/// is left as it is, for the next start.
pub async fn run_retrying(
    spec: &HookSpec,
    ctx: &HookContext,
    log: &Path,
    stop: &CancellationToken,
    record: Option<(&Side, (&TransferId, &NodeName))>,
) -> Option<HookOutcome> {
    let retry = spec.retry;
    let mut ctx = ctx.clone();
    ctx.attempt = 1;
    loop {
        let outcome = run(spec, &ctx, log).await;
        if outcome.ok() || ctx.attempt >= retry.attempts {
            if !outcome.ok() && retry.attempts > 1 {
                note(
                    log,
                    &format!(
                        "run {} of {} failed; no run left",
                        ctx.attempt, retry.attempts
                    ),
                )
                .await;
            }
            return Some(outcome);
        }
        let delay = retry.delay(ctx.attempt);
        warn!(message = "Hook failed; running it again after the backoff.",
            transfer_id = %ctx.transfer_id, event = ctx.event.as_str(), attempt = ctx.attempt,
            attempts = retry.attempts, backoff_ms = delay.as_millis() as u64, error = %outcome.describe());
        note(
            log,
            &format!(
                "run {} of {} failed ({}); the next run in {:?}",
                ctx.attempt,
                retry.attempts,
                outcome.describe(),
                delay
            ),
        )
        .await;
        if let Some((side, key)) = record {
            if let Err(e) = side.set_hook(key, outcome.record()).await {
                warn!(message = "Cannot record a failed hook run; retrying all the same.",
                    transfer_id = %ctx.transfer_id, error = %e, error_code = %e.code());
            }
        }
        // Other transfers take this one's completion slot meanwhile.
        let slot = super::slot::release();
        let stopped = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep(delay) => false,
        };
        if stopped {
            info!(message = "Agent stopping: the hook's next run is left for the next start (hook_interrupted).",
                transfer_id = %ctx.transfer_id, attempt = ctx.attempt + 1);
            note(log, "the agent stopped before the next run").await;
            return None;
        }
        super::slot::retake(slot).await;
        ctx.attempt += 1;
    }
}

/// One line from hakobu in the hook's log, between the runs' output.
async fn note(log: &Path, line: &str) {
    let (path, line) = (log.to_path_buf(), format!("hakobu: {line}\n"));
    let _ = tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;

    /// The waits a `retry:` makes.
    fn schedule(retry: &Retry) -> Vec<Duration> {
        (1..retry.attempts).map(|n| retry.delay(n)).collect()
    }

    /// `s` run for the tests' context with its retries, never stopped.
    async fn run_once_retrying(s: &HookSpec, log: &std::path::Path) -> HookOutcome {
        run_retrying(
            s,
            &super::super::tests::ctx(),
            log,
            &CancellationToken::new(),
            None,
        )
        .await
        .unwrap()
    }

    fn spec(script: &str, attempts: u32, backoff: Duration) -> HookSpec {
        HookSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            timeout: Duration::from_secs(10),
            shell: false,
            env: BTreeMap::new(),
            cwd: None,
            retry: Retry { attempts, backoff },
        }
    }

    #[test]
    fn the_backoff_doubles_up_to_the_cap() {
        let r = Retry {
            attempts: 30,
            backoff: Duration::from_secs(30),
        };
        assert_eq!(r.delay(1), Duration::from_secs(30));
        assert_eq!(r.delay(2), Duration::from_secs(60));
        assert_eq!(r.delay(3), Duration::from_secs(120));
        assert_eq!(r.delay(29), Retry::MAX_DELAY);
        let long = Retry {
            attempts: 3,
            backoff: Duration::from_secs(7200),
        };
        assert_eq!(schedule(&long), vec![Duration::from_secs(7200); 2]);
        assert!(schedule(&Retry::ONCE).is_empty());
    }

    #[tokio::test]
    async fn a_hook_that_fails_once_runs_twice_and_sees_its_attempt() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("h.log");
        // Fails on its first run, succeeds on the second.
        let s = spec(
            "echo \"run $HAKOBU_ATTEMPT\"; [ \"$HAKOBU_ATTEMPT\" -ge 2 ]",
            3,
            Duration::from_millis(10),
        );
        let o = run_once_retrying(&s, &log).await;
        assert!(o.ok(), "{o:?}");
        assert_eq!(o.attempts, 2);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("run 1\n") && text.contains("run 2\n"),
            "{text}"
        );
        assert!(text.contains("hakobu: run 1 of 3 failed"), "{text}");
    }

    #[tokio::test]
    async fn a_hook_that_always_fails_runs_attempts_times() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("h.log");
        let s = spec("echo ran; exit 4", 3, Duration::from_millis(10));
        let o = run_once_retrying(&s, &log).await;
        assert_eq!((o.exit, o.attempts), (Some(4), 3));
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.matches("ran\n").count(), 3, "{text}");
    }

    #[tokio::test]
    async fn a_stop_ends_the_wait_between_runs() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("h.log");
        let s = spec("exit 1", 5, Duration::from_secs(3600));
        let stop = CancellationToken::new();
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            stopper.cancel();
        });
        let o = run_retrying(&s, &super::super::tests::ctx(), &log, &stop, None).await;
        assert!(o.is_none(), "{o:?}");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("the agent stopped"), "{text}");
    }
}
