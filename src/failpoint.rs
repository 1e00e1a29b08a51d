//! Crash points for tests. With `HAKOBU_FAILPOINT=NAME` in its environment,
//! the agent kills itself with SIGKILL when it reaches the point `NAME`: a
//! `kill -9` that lands exactly between two steps, which a test cannot time
//! from outside. Without the variable a point costs one load of a cached
//! value. The points are named after the stage and the step just done.

use std::sync::OnceLock;

/// Dies here if `HAKOBU_FAILPOINT` names `point`.
pub fn hit(point: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("HAKOBU_FAILPOINT").ok());
    if armed.as_deref() == Some(point) {
        tracing::warn!(message = "Failpoint reached; killing this process.", point);
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
