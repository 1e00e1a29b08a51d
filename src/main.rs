//! The `hakobu` binary: parses the command line and hands over to `cli`.

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    hakobu::cli::main()
}

/// glibc gives threads that allocate at once arenas of their own, and an
/// agent's many short-lived blocking threads (file writes, fsyncs) made its
/// memory grow with the work done: a receiver peaked at 45 MiB after a 4 GiB
/// transfer, 26 MiB with two arenas (and the same speed).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt is called before any other thread exists.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
    }
}
