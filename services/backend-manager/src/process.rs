//! Child processes the manager supervises (llama-server, vLLM, TGI).
//!
//! Hygiene: every child runs in its own process group and gets `PR_SET_PDEATHSIG(SIGKILL)`, so it
//! dies with the manager even when the manager is killed with SIGKILL (no orphans); its exit is
//! awaited by a dedicated task (no zombies) and published at once on a watch channel, so a crash is
//! noticed when it happens, not on the next health poll. Stopping is SIGTERM to the group, then
//! SIGKILL after a grace period. stdout and stderr are read line by line into a bounded tail (for
//! error messages) and a channel (for log parsing: readiness, buffer sizes, stalls).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, watch};

/// How many log lines are kept for error messages.
const TAIL_LINES: usize = 40;

/// What to run.
#[derive(Clone)]
pub struct ChildSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Added to the manager's environment (may hold the engine's API key: `Debug` shows only the
    /// names).
    pub env: Vec<(String, String)>,
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSpec")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .finish()
    }
}

/// How a child ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit status {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            _ => write!(f, "exited"),
        }
    }
}

/// The last lines a child printed.
#[derive(Clone, Default)]
pub struct LogTail(Arc<Mutex<VecDeque<String>>>);

impl LogTail {
    fn push(&self, line: String) {
        if let Ok(mut q) = self.0.lock() {
            if q.len() == TAIL_LINES {
                q.pop_front();
            }
            q.push_back(line);
        }
    }

    /// The last `n` lines, joined.
    pub fn last(&self, n: usize) -> String {
        self.0
            .lock()
            .map(|q| {
                let skip = q.len().saturating_sub(n);
                q.iter().skip(skip).cloned().collect::<Vec<_>>().join("\n")
            })
            .unwrap_or_default()
    }
}

/// A running child.
pub struct Supervised {
    pub pid: u32,
    /// `None` while running; the exit once it happened.
    pub exit: watch::Receiver<Option<ExitInfo>>,
    pub tail: LogTail,
}

impl Supervised {
    pub fn exited(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }

    /// Wait for the child to exit.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
        loop {
            if let Some(e) = rx.borrow_and_update().clone() {
                return e;
            }
            if rx.changed().await.is_err() {
                return ExitInfo {
                    code: None,
                    signal: None,
                };
            }
        }
    }

    /// SIGTERM to the process group, SIGKILL after `grace`; returns once the child was reaped.
    ///
    /// Engines that fork workers (vLLM, TGI) keep GPU memory in other members of the group: once
    /// the leader is gone the whole group is killed, and this waits (up to the grace) until no
    /// member is left, so a lease released afterwards is really free.
    pub async fn stop(&self, grace: Duration) -> ExitInfo {
        let exit = match self.exited() {
            Some(e) => e,
            None => {
                signal_group(self.pid, libc::SIGTERM);
                match tokio::time::timeout(grace, self.wait()).await {
                    Ok(e) => e,
                    Err(_) => {
                        signal_group(self.pid, libc::SIGKILL);
                        self.wait().await
                    }
                }
            }
        };
        signal_group(self.pid, libc::SIGKILL);
        let until = tokio::time::Instant::now() + grace;
        while group_alive(self.pid) && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        exit
    }

    /// SIGKILL the group now.
    pub fn kill(&self) {
        if self.exited().is_none() {
            signal_group(self.pid, libc::SIGKILL);
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        // A supervised child, and anything it forked, never outlives its handle.
        signal_group(self.pid, libc::SIGKILL);
    }
}

/// Does any process of the group led by `pid` still exist?
fn group_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(-pid, 0) == 0 }
}

fn signal_group(pid: u32, sig: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) with a negative pid signals the process group; no memory is touched.
    unsafe {
        libc::kill(-pid, sig);
    }
}

/// Start a child in its own process group that dies with us. Lines of its output go to `lines`
/// (dropped if nobody reads) and to the returned tail.
pub fn spawn(
    spec: &ChildSpec,
    lines: Option<mpsc::UnboundedSender<String>>,
) -> std::io::Result<Supervised> {
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    let tail = LogTail::default();
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump(out, tail.clone(), lines.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump(err, tail.clone(), lines));
    }
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let info = match child.wait().await {
            Ok(st) => {
                use std::os::unix::process::ExitStatusExt;
                ExitInfo {
                    code: st.code(),
                    signal: st.signal(),
                }
            }
            Err(_) => ExitInfo {
                code: None,
                signal: None,
            },
        };
        let _ = tx.send(Some(info));
    });
    Ok(Supervised {
        pid,
        exit: rx,
        tail,
    })
}

async fn pump(
    r: impl AsyncRead + Unpin,
    tail: LogTail,
    lines: Option<mpsc::UnboundedSender<String>>,
) {
    let mut r = BufReader::new(r).lines();
    while let Ok(Some(line)) = r.next_line().await {
        if let Some(tx) = &lines {
            let _ = tx.send(line.clone());
        }
        tail.push(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> ChildSpec {
        ChildSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![],
        }
    }

    /// Alive and not a zombie.
    pub fn running(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => s
                .rsplit(") ")
                .next()
                .is_some_and(|rest| !rest.starts_with('Z')),
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn exit_is_noticed_and_output_kept() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = spawn(&sh("echo hello; echo oops >&2; exit 3"), Some(tx)).unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), c.wait())
            .await
            .unwrap();
        assert_eq!(e.code, Some(3));
        let mut got = Vec::new();
        while let Ok(Some(l)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            got.push(l);
        }
        got.sort();
        assert_eq!(got, vec!["hello".to_string(), "oops".to_string()]);
        assert!(c.tail.last(5).contains("oops"));
    }

    #[tokio::test]
    async fn stop_escalates_to_sigkill_when_sigterm_is_ignored() {
        let c = spawn(
            &sh("trap '' TERM; echo ready; while true; do sleep 0.1; done"),
            None,
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = std::time::Instant::now();
        let e = c.stop(Duration::from_millis(300)).await;
        assert_eq!(e.signal, Some(libc::SIGKILL));
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn dropping_the_handle_kills_the_whole_group() {
        let c = spawn(&sh("sleep 30 & echo $!; wait"), None).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let grandchild: i32 = c.tail.last(1).trim().parse().unwrap();
        drop(c);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !running(grandchild),
            "the grandchild survived its group being killed"
        );
    }
}
