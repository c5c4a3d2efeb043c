//! Processes by pid, from /proc and kill(2).

use std::path::Path;

/// Is `pid` a live process (present in /proc and not a zombie)?
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Is `pid` in the process table at all (zombies included)?
pub fn in_process_table(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `kill -9 pid`.
pub fn kill9(pid: u32) {
    signal(pid, libc::SIGKILL);
}

/// Send `sig` to `pid` (nothing when the pid does not fit a `pid_t`).
pub fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) on a pid the test started; touches no memory.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}
