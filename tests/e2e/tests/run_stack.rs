//! The README's quick start, end to end: `scripts/run-stack.sh` (what `make run` runs) with the
//! debug binaries, a temporary `DATA_DIR`, no `SECURELLM_MODELS` (so it generates the demo model)
//! and free ports (port 0 for every address: the script passes on the ones the services got).
//!
//! 1. The script prints its instructions; the printed `curl` command, run as printed with bash,
//!    gets an OpenAI chat completion; the printed Python `openai` example works with the test venv's
//!    Python; `securellm status` against the stack's addresses exits 0.
//! 2. Ctrl-C (SIGINT to the script's process group, as a terminal sends it to its foreground job):
//!    the script exits within a bounded time; no process of the stack (the four services and
//!    llama-server) is left; the scheduler's lease snapshot holds no lease; the audit log verifies
//!    and holds the curl request's row.
//!
//! Every process the script started is killed when the test fails (the guard's drop), and the script
//! gets SIGTERM (its own orderly stop) if the test process dies (`PR_SET_PDEATHSIG`).

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use securellm_e2e::{bin_dir, binary, descendants, llama_server, processes_mentioning, python};
use sqlx::{Connection, Row};

/// The script's whole start (demo model, four services) on a busy 2-core machine.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// The first request loads the model (llama-server start).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);
/// Ctrl-C to exit. The script gives each service 30 s before SIGKILL; a clean stop takes seconds.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

const SERVICES: [&str; 4] = [
    "vram-scheduler",
    "registry",
    "backend-manager",
    "securellm-gateway",
];

// ------------------------------------------------------------------------------------------------
// Processes

/// A process's start time (clock ticks since boot, /proc/PID/stat field 22): with the pid, it names
/// one process even if the pid is reused later.
fn start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(')')?;
    // `rest` starts at field 3 (state); field 22 is the 20th from there.
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// One process of the stack, as seen while it ran.
#[derive(Clone, Debug)]
struct Proc {
    pid: u32,
    start: u64,
    cmd: Vec<String>,
}

impl Proc {
    fn of(pid: u32) -> Option<Proc> {
        Some(Proc {
            pid,
            start: start_time(pid)?,
            cmd: cmdline(pid),
        })
    }

    /// Still in the process table (zombies included) as the same process.
    fn present(&self) -> bool {
        start_time(self.pid) == Some(self.start)
    }

    fn program(&self) -> &str {
        self.cmd.first().map(String::as_str).unwrap_or("")
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a process (group) this test started; touches no memory.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Where the script tells the CLI about its stack (this test's own file, never the developer's).
fn stack_file() -> PathBuf {
    std::env::temp_dir().join(format!("securellm-e2e-stack-{}", std::process::id()))
}

/// The environment of everything this test runs: no SECURELLM_* from the test's environment
/// (SECURELLM_MODELS in particular) except this test's stack file, loopback never through a proxy.
fn clean_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SECURELLM_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("SECURELLM_STACK_FILE", stack_file())
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
}

/// What [`run`] saw.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Ran {
    fn describe(&self) -> String {
        format!(
            "{} after {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.took, self.stdout, self.stderr
        )
    }
}

/// Run `cmd` in its own process group with stdin closed, output to files in `dir`; the whole group
/// is killed (and the test fails) after `timeout`.
fn run(cmd: &mut Command, dir: &Path, what: &str, timeout: Duration) -> Ran {
    let tag = what.replace(|c: char| !c.is_ascii_alphanumeric(), "-");
    let out_path = dir.join(format!("{tag}.stdout"));
    let err_path = dir.join(format!("{tag}.stderr"));
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .process_group(0);
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            Ok(())
        });
    }
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Ran {
                status,
                stdout: read(&out_path),
                stderr: read(&err_path),
                took: t0.elapsed(),
            };
        }
        if t0.elapsed() > timeout {
            signal(-(child.id() as i32), libc::SIGKILL);
            let _ = child.wait();
            panic!(
                "{what} did not finish within {timeout:?}\n--- stdout\n{}\n--- stderr\n{}",
                read(&out_path),
                read(&err_path)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ------------------------------------------------------------------------------------------------
// The script

/// `scripts/run-stack.sh`, running in its own process group (as a terminal runs a foreground job);
/// on drop, everything it started is killed.
struct RunStack {
    child: Option<Child>,
    pid: u32,
    /// The script's stdout and stderr (one file, in order).
    output: PathBuf,
    /// Every process of the stack seen so far.
    seen: Vec<Proc>,
    data_dir: tempfile::TempDir,
    /// Outputs of the commands the test runs (outside DATA_DIR).
    scratch: tempfile::TempDir,
}

impl RunStack {
    fn start() -> RunStack {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/run-stack.sh");
        let script = script.canonicalize().expect("scripts/run-stack.sh");
        for b in SERVICES.iter().chain(&["securellm"]) {
            binary(b);
        }
        let llama = llama_server();
        assert!(llama.is_file(), "{} missing", llama.display());
        let data_dir = tempfile::Builder::new()
            .prefix("securellm-run-stack-")
            .tempdir()
            .unwrap();
        let scratch = tempfile::Builder::new()
            .prefix("securellm-run-stack-test-")
            .tempdir()
            .unwrap();
        let output = scratch.path().join("run-stack.out");
        let out = std::fs::File::create(&output).unwrap();
        let mut cmd = Command::new("bash");
        cmd.arg(&script);
        clean_env(&mut cmd)
            .env("BIN", bin_dir())
            .env("DATA_DIR", data_dir.path())
            .env("LLAMA_SERVER", &llama)
            .env("SCHEDULER_LISTEN", "127.0.0.1:0")
            .env("REGISTRY_LISTEN", "127.0.0.1:0")
            .env("BACKEND_LISTEN", "127.0.0.1:0")
            .env("GATEWAY_LISTEN", "127.0.0.1:0")
            .env("GATEWAY_HTTP_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .current_dir(script.parent().unwrap().parent().unwrap())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            // Its own process group, like a job a terminal runs in the foreground: Ctrl-C is
            // SIGINT to that group.
            .process_group(0);
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls (prctl, signal, getppid, _exit) between fork and
        // exec.
        unsafe {
            cmd.pre_exec(move || {
                // If the test dies (nextest's timeout), the script stops the stack in order.
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGTERM as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                // An interactive shell starts a job with SIGINT at its default (bash cannot trap
                // a signal ignored on entry), whatever the test runner does.
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("run scripts/run-stack.sh");
        RunStack {
            pid: child.id(),
            child: Some(child),
            output,
            seen: Vec::new(),
            data_dir,
            scratch,
        }
    }

    fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// The script's exit status, once it has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().unwrap()
    }

    /// Wait for the printed instructions (up to the last line, "Ctrl-C stops everything.").
    fn wait_ready(&mut self) -> String {
        let t0 = Instant::now();
        loop {
            let out = self.output();
            if out.lines().any(|l| l == "Ctrl-C stops everything.") {
                eprintln!("run-stack.sh ready after {:?}", t0.elapsed());
                return out;
            }
            if let Some(st) = self.exited() {
                panic!("run-stack.sh exited ({st}) before it was ready");
            }
            assert!(
                t0.elapsed() < READY_TIMEOUT,
                "run-stack.sh did not print its instructions within {READY_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The processes under the script now (the four services and llama-server children); they
    /// are remembered for the checks and the cleanup.
    fn processes(&mut self) -> Vec<Proc> {
        let now: Vec<Proc> = descendants(self.pid)
            .into_iter()
            .filter_map(Proc::of)
            .collect();
        for p in &now {
            if !self
                .seen
                .iter()
                .any(|s| s.pid == p.pid && s.start == p.start)
            {
                self.seen.push(p.clone());
            }
        }
        now
    }

    /// Ctrl-C: SIGINT to the script's process group.
    fn ctrl_c(&self) {
        signal(-(self.pid as i32), libc::SIGINT);
    }

    /// Wait for the script to exit; `None` after `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.exited() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The tail of every log in DATA_DIR/logs.
    fn logs(&self) -> String {
        let mut out = String::new();
        let dir = self.data_dir().join("logs");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {}\n", f.display()));
            for l in &lines[lines.len().saturating_sub(40)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Kill the script's process group and every process of the stack (ours only: same pid and
    /// start time as seen, or DATA_DIR on its command line).
    fn kill_all(&mut self) {
        if self.exited().is_none() {
            self.processes();
        }
        signal(-(self.pid as i32), libc::SIGKILL);
        for _ in 0..20 {
            let mut any = false;
            for p in &self.seen {
                if p.present() {
                    signal(p.pid as i32, libc::SIGKILL);
                    any = true;
                }
            }
            let dir = self.data_dir().to_string_lossy().into_owned();
            for (pid, _) in processes_mentioning(&dir) {
                if pid != std::process::id() {
                    signal(pid as i32, libc::SIGKILL);
                    any = true;
                }
            }
            if !any {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RunStack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "==== run-stack.sh output ({})\n{}\n==== logs\n{}",
                self.output.display(),
                self.output(),
                self.logs()
            );
        }
        self.kill_all();
    }
}

// ------------------------------------------------------------------------------------------------
// The printed instructions

/// What the script printed once ready.
struct Printed {
    /// `ready <service> grpc=ADDR [http=ADDR]` lines: service → (key → address).
    ready: BTreeMap<String, BTreeMap<String, String>>,
    base_url: String,
    api_key: String,
    /// The curl command as printed (continuation lines included).
    curl: String,
    /// The Python example as printed.
    python: Option<String>,
    /// `export SECURELLM_...=...` (non-default addresses), as key → value.
    exports: BTreeMap<String, String>,
}

fn parse(out: &str) -> Printed {
    let lines: Vec<&str> = out.lines().collect();
    let mut ready = BTreeMap::new();
    for l in &lines {
        if let Some(rest) = l.strip_prefix("ready ") {
            let mut words = rest.split_whitespace();
            let name = words.next().unwrap().to_string();
            let addrs = words
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            ready.insert(name, addrs);
        }
    }
    let after = |prefix: &str| -> Option<String> {
        lines
            .iter()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string()))
    };
    let base_url = after("OpenAI base URL:").expect("printed base URL");
    let api_key = after("API key:")
        .expect("printed API key")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let start = lines
        .iter()
        .position(|l| l.trim_start().starts_with("curl "))
        .expect("printed curl command");
    let mut curl = Vec::new();
    for l in &lines[start..] {
        curl.push(*l);
        if !l.ends_with('\\') {
            break;
        }
    }
    let python = lines
        .iter()
        .find(|l| l.trim_start().starts_with("python3 -c "))
        .map(|l| l.trim().to_string());
    let exports = after("export ")
        .map(|r| {
            r.split_whitespace()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default();
    Printed {
        ready,
        base_url,
        api_key,
        curl: curl.join("\n"),
        python,
        exports,
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The scheduler's lease snapshot (`<scheduler data dir>/scheduler-leases.json`): its leases.
fn snapshot_leases(data_dir: &Path) -> Vec<serde_json::Value> {
    let p = data_dir.join("scheduler/scheduler-leases.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", p.display()));
    v["leases"]
        .as_array()
        .unwrap_or_else(|| panic!("no leases array in {}: {text}", p.display()))
        .clone()
}

/// An audit row's fields this test looks at.
#[derive(Debug)]
struct AuditRow {
    id: i64,
    time_ms: i64,
    endpoint: String,
    model: String,
    status: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    streamed: i64,
}

fn audit_rows(db: &Path) -> Vec<AuditRow> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(db)
            .busy_timeout(Duration::from_secs(10));
        let mut c = sqlx::SqliteConnection::connect_with(&opts)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", db.display()));
        let rows = sqlx::query(
            "SELECT id, time_ms, endpoint, model, status, prompt_tokens, completion_tokens, \
             streamed FROM audit ORDER BY id",
        )
        .fetch_all(&mut c)
        .await
        .unwrap()
        .into_iter()
        .map(|r| AuditRow {
            id: r.get("id"),
            time_ms: r.get("time_ms"),
            endpoint: r.get("endpoint"),
            model: r.get("model"),
            status: r.get("status"),
            prompt_tokens: r.get("prompt_tokens"),
            completion_tokens: r.get("completion_tokens"),
            streamed: r.get("streamed"),
        })
        .collect();
        c.close().await.unwrap();
        rows
    })
}

fn now_ms() -> i64 {
    securellm_e2e::now_ms() as i64
}

// ------------------------------------------------------------------------------------------------

#[test]
fn make_run_serves_the_demo_model_and_ctrl_c_stops_everything() {
    let t0 = Instant::now();
    let mut stack = RunStack::start();
    let out = stack.wait_ready();
    let printed = parse(&out);
    let data_dir = stack.data_dir().to_path_buf();
    let scratch = stack.scratch.path().to_path_buf();

    // -- what it printed --
    assert!(
        out.contains("no SECURELLM_MODELS set: serving the generated demo model"),
        "{out}"
    );
    assert!(data_dir.join("models/tiny.gguf").is_file());
    for s in SERVICES {
        let a = printed
            .ready
            .get(s)
            .unwrap_or_else(|| panic!("no ready line for {s}"));
        assert!(
            a.get("grpc")
                .is_some_and(|g| g.starts_with("127.0.0.1:") && !g.ends_with(":0")),
            "{s}: {a:?}"
        );
    }
    let addr = |s: &str, k: &str| printed.ready[s][k].clone();
    let http = addr("securellm-gateway", "http");
    assert_eq!(printed.base_url, format!("http://{http}/v1"));
    let key_file = std::fs::read_to_string(data_dir.join("api-key")).unwrap();
    assert_eq!(printed.api_key, key_file.lines().next().unwrap().trim());
    assert!(printed.api_key.starts_with("sk-"), "{}", printed.api_key);
    // Non-default addresses: the printed CLI hint names them.
    for (var, svc) in [
        ("SECURELLM_SCHEDULER", "vram-scheduler"),
        ("SECURELLM_REGISTRY", "registry"),
        ("SECURELLM_BACKEND", "backend-manager"),
        ("SECURELLM_GATEWAY", "securellm-gateway"),
    ] {
        assert_eq!(
            printed.exports.get(var),
            Some(&addr(svc, "grpc")),
            "printed export line: {:?}",
            printed.exports
        );
    }
    let model = printed
        .curl
        .split("\"model\": \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("model in the curl command")
        .to_string();
    assert_eq!(model, "tiny", "{}", printed.curl);

    // -- the printed curl, run as printed --
    let curl_start = now_ms();
    let ran = run(
        clean_env(Command::new("bash").arg("-c").arg(&printed.curl)),
        &scratch,
        "curl",
        REQUEST_TIMEOUT,
    );
    let curl_end = now_ms();
    assert!(
        ran.status.success(),
        "curl: {}\n{}",
        printed.curl,
        ran.describe()
    );
    let reply: serde_json::Value = serde_json::from_str(&ran.stdout)
        .unwrap_or_else(|e| panic!("curl's answer is not JSON ({e}): {}", ran.describe()));
    assert_eq!(reply["object"], "chat.completion", "{reply}");
    assert_eq!(reply["model"], model.as_str(), "{reply}");
    assert_eq!(
        reply["choices"][0]["message"]["role"], "assistant",
        "{reply}"
    );
    assert!(
        reply["choices"][0]["message"]["content"].is_string(),
        "{reply}"
    );
    let usage = &reply["usage"];
    let prompt_tokens = usage["prompt_tokens"].as_i64().expect("usage");
    let completion_tokens = usage["completion_tokens"].as_i64().expect("usage");
    assert!(
        prompt_tokens > 0 && (1..=32).contains(&completion_tokens),
        "{reply}"
    );
    eprintln!(
        "curl answered after {:?} ({:?} from the start)",
        ran.took,
        t0.elapsed()
    );

    // -- the printed Python example, with the test venv's Python --
    let mut chat_requests = 1;
    if let Some(py) = &printed.python {
        let rest = py.strip_prefix("python3").unwrap();
        let line = format!("{}{rest}", quote(&python().to_string_lossy()));
        let ran = run(
            clean_env(Command::new("bash").arg("-c").arg(&line)),
            &scratch,
            "python",
            REQUEST_TIMEOUT,
        );
        assert!(ran.status.success(), "python: {line}\n{}", ran.describe());
        eprintln!(
            "the Python example answered after {:?}: {:?}",
            ran.took,
            ran.stdout.trim()
        );
        chat_requests += 1;
    }

    // The internal token the services share: created by the first of them, for the service user
    // only; the printed CLI hint names it.
    let internal_token = data_dir.join("internal-token");
    let mode = std::fs::metadata(&internal_token)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap_or_else(|e| panic!("{}: {e}", internal_token.display()));
    assert_eq!(mode, 0o600, "{}", internal_token.display());
    assert_eq!(
        printed.exports.get("SECURELLM_INTERNAL_TOKEN_FILE"),
        Some(&internal_token.to_string_lossy().into_owned()),
        "printed export line: {:?}",
        printed.exports
    );

    // -- securellm status against the stack's addresses --
    let ran = run(
        clean_env(&mut Command::new(binary("securellm")))
            .arg("--scheduler")
            .arg(addr("vram-scheduler", "grpc"))
            .arg("--registry")
            .arg(addr("registry", "grpc"))
            .arg("--backend")
            .arg(addr("backend-manager", "grpc"))
            .arg("--internal-token-file")
            .arg(&internal_token)
            .arg("status")
            .arg("--gateway")
            .arg(addr("securellm-gateway", "grpc")),
        &scratch,
        "securellm status",
        Duration::from_secs(30),
    );
    assert!(ran.status.success(), "securellm status: {}", ran.describe());
    assert!(
        ran.stdout.contains(&model),
        "the loaded model in status: {}",
        ran.describe()
    );

    // -- the CLI finds the stack by itself (the stack file): no flag, no variable --
    let ran = run(
        clean_env(&mut Command::new(binary("securellm"))).arg("status"),
        &scratch,
        "securellm status (no flags)",
        Duration::from_secs(30),
    );
    assert!(
        ran.status.success()
            && ran.stdout.contains(&model)
            && ran.stdout.contains("requests/s:")
            && !ran.stdout.contains("requests/s: unknown"),
        "securellm status without flags: {}",
        ran.describe()
    );
    // The banner's `audit tail`, and `--data-dir` after the subcommand (a global flag).
    let ran = run(
        clean_env(&mut Command::new(binary("securellm")))
            .args(["audit", "tail", "--data-dir"])
            .arg(&data_dir),
        &scratch,
        "securellm audit tail --data-dir DATA_DIR",
        Duration::from_secs(30),
    );
    assert!(
        ran.status.success() && ran.stdout.contains("/v1/chat/completions"),
        "securellm audit tail --data-dir: {}",
        ran.describe()
    );

    // -- the stack's processes: the four services and a llama-server serving the model --
    let procs = stack.processes();
    let bin = bin_dir();
    for s in SERVICES {
        let path = bin.join(s).to_string_lossy().into_owned();
        let n = procs.iter().filter(|p| p.program() == path).count();
        assert_eq!(n, 1, "{s} processes: {procs:#?}");
    }
    let llama = llama_server().to_string_lossy().into_owned();
    let model_file = data_dir.join("models/tiny.gguf");
    let model_file = model_file.to_string_lossy();
    assert!(
        procs
            .iter()
            .any(|p| p.program() == llama && p.cmd.iter().any(|a| a == &*model_file)),
        "a llama-server for the demo model: {procs:#?}"
    );
    let dir = data_dir.to_string_lossy().into_owned();
    for (pid, cmd) in processes_mentioning(&dir) {
        assert!(
            procs.iter().any(|p| p.pid == pid),
            "{pid} ({cmd}) mentions DATA_DIR but is not under the script"
        );
    }
    // The manager's lease is in the snapshot (written within 100 ms of a change): the check after
    // the stop means something.
    let deadline = Instant::now() + Duration::from_secs(10);
    while snapshot_leases(&data_dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the scheduler's snapshot never showed the manager's lease"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // -- Ctrl-C --
    let stop_t0 = Instant::now();
    stack.ctrl_c();
    let st = stack
        .wait_exit(STOP_TIMEOUT)
        .unwrap_or_else(|| panic!("run-stack.sh still running {STOP_TIMEOUT:?} after Ctrl-C"));
    let stop_took = stop_t0.elapsed();
    eprintln!("run-stack.sh exited ({st}) {stop_took:?} after Ctrl-C");
    assert_eq!(st.code(), Some(130), "exit status after Ctrl-C: {st}");
    let out = stack.output();
    let tail = out.rsplit("Ctrl-C stops everything.").next().unwrap();
    assert!(
        tail.contains("stopping...") && tail.contains("stopped"),
        "{tail}"
    );
    assert!(
        !tail.contains("did not stop"),
        "a service had to be killed: {tail}"
    );

    // Nothing of the stack is left: not running, not a zombie.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<&Proc> = stack.seen.iter().filter(|p| p.present()).collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind after Ctrl-C: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = processes_mentioning(&dir);
    assert!(left.is_empty(), "left behind after Ctrl-C: {left:?}");

    // The stack file went with the stack.
    assert!(
        !stack_file().exists(),
        "{} left after the stop",
        stack_file().display()
    );

    // Leases released before the scheduler wrote its last snapshot.
    let leases = snapshot_leases(&data_dir);
    assert!(
        leases.is_empty(),
        "leases left in the snapshot: {leases:#?}"
    );

    // The audit log was flushed: the chain verifies and holds the curl request.
    let gateway_data = data_dir.join("gateway");
    let ran = run(
        clean_env(&mut Command::new(binary("securellm")))
            .arg("audit")
            .arg("--data-dir")
            .arg(&gateway_data)
            .arg("verify"),
        &scratch,
        "securellm audit verify",
        Duration::from_secs(30),
    );
    assert!(
        ran.status.success() && ran.stdout.contains("OK"),
        "securellm audit verify: {}",
        ran.describe()
    );
    let rows = audit_rows(&gateway_data.join("gateway-audit.db"));
    let chats: Vec<&AuditRow> = rows
        .iter()
        .filter(|r| r.endpoint == "/v1/chat/completions")
        .collect();
    assert_eq!(
        chats.len(),
        chat_requests,
        "one row per chat request (curl, python): {rows:#?}"
    );
    let curl_row = chats[0];
    assert!(
        curl_row.time_ms >= curl_start - 1000
            && curl_row.time_ms <= curl_end + 1000
            && curl_row.model == model
            && curl_row.status == 200
            && curl_row.streamed == 0
            && curl_row.prompt_tokens == prompt_tokens
            && curl_row.completion_tokens == completion_tokens,
        "the curl request's audit row (usage {prompt_tokens}/{completion_tokens}, between \
         {curl_start} and {curl_end}): {curl_row:#?}"
    );
    let verified: usize = ran
        .stdout
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("row count in {:?}", ran.stdout));
    assert_eq!(verified, rows.len(), "{}", ran.stdout);
    assert!(rows.iter().any(|r| r.id == curl_row.id));

    eprintln!("whole run: {:?}", t0.elapsed());
}
