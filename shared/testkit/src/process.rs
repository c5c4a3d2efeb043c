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

/// Spawn `cmd` (stdout piped, killed when the child is dropped) and wait up to `within` for its
/// first line on stdout: the `ready <service> grpc=… http=…` line every SecureLLM binary prints
/// once it serves. Returns the child and that line.
pub async fn spawn_ready(
    mut cmd: tokio::process::Command,
    within: std::time::Duration,
) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.as_std().get_program()));
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(within, lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("no ready line within {within:?}"))
        .expect("read stdout")
        .expect("a ready line before stdout closed");
    (child, line)
}

/// The value of `key` (e.g. `http=`) among the words of a ready line.
pub fn ready_word(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        .to_string()
}

/// `n` distinct loopback addresses nothing listens on (bound together, then closed).
pub fn dead_addrs(n: usize) -> Vec<String> {
    let ls: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port"))
        .collect();
    ls.iter()
        .map(|l| l.local_addr().expect("its address").to_string())
        .collect()
}

/// A loopback address nothing listens on.
pub fn dead_addr() -> String {
    dead_addrs(1).remove(0)
}
