//! The stack `make run` started, found without flags.
//!
//! `scripts/run-stack.sh` writes `KEY=VALUE` lines to [`path`] once the four services are ready
//! (their actual addresses, the data directory, the internal token file and its own PID) and
//! removes the file when it stops. The CLI and the MCP server read it for whatever no flag or
//! environment variable sets, so `securellm status` in another terminal finds a stack started
//! with a custom `DATA_DIR` or free ports (port 0). A file whose PID is no longer running is
//! ignored (a stack killed without cleanup).
//!
//! A system install (the NixOS module) writes the same keys, without a PID, to
//! [`SYSTEM_STACK_FILE`]; it is read when the user has no stack file of their own, so
//! `sudo securellm status` on a NixOS box finds the system's units and the gateway's admin token.
//!
//! Precedence everywhere: flag, then environment variable, then this file, then the default.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Overrides [`path`] (tests, several stacks side by side).
pub const STACK_FILE_ENV: &str = "SECURELLM_STACK_FILE";

/// The keys `run-stack.sh` writes (the environment variables of the same names).
pub const DATA_DIR: &str = "SECURELLM_DATA_DIR";
pub const SCHEDULER: &str = "SECURELLM_SCHEDULER";
pub const REGISTRY: &str = "SECURELLM_REGISTRY";
pub const BACKEND: &str = "SECURELLM_BACKEND";
pub const GATEWAY: &str = "SECURELLM_GATEWAY";
pub const GATEWAY_HTTP: &str = "SECURELLM_GATEWAY_HTTP";
/// Each service's Prometheus `/metrics` address (`HOST:PORT`; absent when its metrics are off).
pub const SCHEDULER_METRICS: &str = "SECURELLM_SCHEDULER_METRICS";
pub const REGISTRY_METRICS: &str = "SECURELLM_REGISTRY_METRICS";
pub const BACKEND_METRICS: &str = "SECURELLM_BACKEND_METRICS";
pub const GATEWAY_METRICS: &str = "SECURELLM_GATEWAY_METRICS";
pub const INTERNAL_TOKEN_FILE: &str = "SECURELLM_INTERNAL_TOKEN_FILE";
/// The PID of the script that runs the stack.
pub const PID: &str = "PID";

/// The stack file of a system install (written by the NixOS module).
pub const SYSTEM_STACK_FILE: &str = "/etc/securellm/stack";

/// `$SECURELLM_STACK_FILE`, else `$XDG_STATE_HOME/securellm/stack` (or
/// `~/.local/state/securellm/stack`) when it exists, else [`SYSTEM_STACK_FILE`] when it exists,
/// else the user's path (which does not exist); `None` without a home and a system file.
pub fn path() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = var(STACK_FILE_ENV) {
        return Some(PathBuf::from(p));
    }
    let user = var("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .map(|state| state.join("securellm/stack"));
    choose(user, std::path::Path::new(SYSTEM_STACK_FILE))
}

/// The user's stack file when it exists, else the system's when that exists, else the user's.
fn choose(user: Option<PathBuf>, system: &std::path::Path) -> Option<PathBuf> {
    match user {
        Some(u) if u.exists() => Some(u),
        _ if system.exists() => Some(system.to_path_buf()),
        u => u,
    }
}

/// What a stack file says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stack {
    values: BTreeMap<String, String>,
}

impl Stack {
    /// `KEY=VALUE` lines; blank lines, `#` comments and lines without `=` are skipped; the value
    /// is everything after the first `=` (paths may hold spaces), trimmed.
    pub fn parse(text: &str) -> Self {
        let values = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            .collect();
        Self { values }
    }

    /// The value of `key`, if the file has a non-empty one.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// Whether the process that wrote the file still runs (no PID: assumed to).
    pub fn is_running(&self) -> bool {
        match self.get(PID).map(str::parse::<u32>) {
            None => true,
            Some(Ok(pid)) => pid_alive(pid),
            Some(Err(_)) => false,
        }
    }
}

#[cfg(target_os = "linux")]
fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(not(target_os = "linux"))]
fn pid_alive(_pid: u32) -> bool {
    true
}

/// The running stack's file, read once per process; `None` when there is none, it cannot be read,
/// or its stack has stopped.
pub fn current() -> Option<&'static Stack> {
    static CURRENT: OnceLock<Option<Stack>> = OnceLock::new();
    CURRENT
        .get_or_init(|| {
            let read = |p: &std::path::Path| {
                let text = std::fs::read_to_string(p).ok()?;
                Some(Stack::parse(&text)).filter(Stack::is_running)
            };
            let first = path()?;
            let named = std::env::var_os(STACK_FILE_ENV).is_some_and(|v| !v.is_empty());
            // A user's stack that has stopped gives way to the system's (NixOS units); a file
            // named by $SECURELLM_STACK_FILE does not.
            read(&first).or_else(|| {
                if named {
                    return None;
                }
                let system = std::path::Path::new(SYSTEM_STACK_FILE);
                (first != system).then(|| read(system)).flatten()
            })
        })
        .as_ref()
}

/// `key` from the running stack's file.
pub fn get(key: &str) -> Option<String> {
    current().and_then(|s| s.get(key)).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_values_with_spaces_and_skips_noise() {
        let s = Stack::parse(
            "# written by run-stack.sh\nSECURELLM_DATA_DIR=/tmp/my data\n\nnot a pair\n\
             SECURELLM_SCHEDULER = 127.0.0.1:4000\nEMPTY=\nURL=http://h:1/?a=b\n",
        );
        assert_eq!(s.get(DATA_DIR), Some("/tmp/my data"));
        assert_eq!(s.get(SCHEDULER), Some("127.0.0.1:4000"));
        assert_eq!(s.get("EMPTY"), None);
        assert_eq!(s.get("URL"), Some("http://h:1/?a=b"));
        assert_eq!(s.get("not a pair"), None);
    }

    #[test]
    fn the_system_file_is_read_only_when_the_user_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let user = dir.path().join("user-stack");
        let system = dir.path().join("system-stack");
        // Neither exists: the user's path (absent, so nothing is read).
        assert_eq!(choose(Some(user.clone()), &system), Some(user.clone()));
        assert_eq!(choose(None, &system), None);
        std::fs::write(&system, "SECURELLM_DATA_DIR=/var/lib/securellm\n").unwrap();
        assert_eq!(choose(Some(user.clone()), &system), Some(system.clone()));
        assert_eq!(choose(None, &system), Some(system.clone()));
        std::fs::write(&user, "PID=1\n").unwrap();
        assert_eq!(choose(Some(user.clone()), &system), Some(user));
    }

    #[test]
    fn a_stopped_stack_is_not_running() {
        let me = std::process::id();
        assert!(Stack::parse(&format!("PID={me}")).is_running());
        assert!(Stack::parse("X=1").is_running());
        assert!(!Stack::parse("PID=garbage").is_running());
        // PIDs are below 2^22 on Linux: this one is never running.
        #[cfg(target_os = "linux")]
        assert!(!Stack::parse("PID=4294967295").is_running());
    }
}
