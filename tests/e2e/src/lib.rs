//! The end-to-end harness: the four real SecureLLM binaries (vram-scheduler, registry,
//! backend-manager, securellm-gateway) as separate processes on loopback ports, with temporary data
//! directories, the real `llama-server` and generated tiny GGUF models.
//!
//! ```text
//! let s = Stack::start(Options::default()).await;     // four processes, each `ready` on stdout
//! s.chat(&s.api_key, "tiny", 4, "req-1").await;       // through the gateway's OpenAI HTTP API
//! s.status().await;                                   // scheduler GetStatus
//! s.backend.kill9(); s.backend.restart().await;       // same port, same flags
//! let text = s.scrape(&s.gateway).await;              // its Prometheus /metrics
//! ```
//!
//! Every service gets its own `/metrics` listener on a free port (`--metrics-listen 127.0.0.1:0`,
//! kept across restarts; [`Service::metrics`] from its `ready` line), so stacks run in parallel.
//! The test's own `SECURELLM_*` and `OTEL_*` variables never reach the services; [`Options::env`]
//! sets variables for all four (e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`).
//!
//! The four share one internal token (the file `<stack dir>/internal-token`, passed to each with
//! `--internal-token-file`); the harness's gRPC clients of the scheduler, the registry and the
//! backend manager present it ([`internal_token`]), as does the CLI that [`Stack::cli`] runs.
//!
//! Every process is killed when its [`Service`] is dropped, and also dies with the test process
//! (`PR_SET_PDEATHSIG`), so a test that fails or is killed by a timeout leaves nothing running;
//! llama-server children die with their manager the same way. When a test fails, the tail of every
//! service's log is printed.
//!
//! The binaries are found beside the test executable (`target/<profile>/`):
//! `cargo nextest run --workspace` (and `make test`) builds them; for `-p securellm-e2e` alone,
//! build them first (`cargo build --workspace --bins`).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use securellm_common::internal_auth::{AuthChannel, InternalToken, authenticated};
use securellm_gguf::testmodels::{TinyLlamaOptions, write_tiny_llama};
use securellm_proto::v1 as pb;
use securellm_proto::v1::backend_manager_client::BackendManagerClient;
use securellm_proto::v1::gateway_admin_client::GatewayAdminClient;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub use securellm_proto::v1;

// What the in-process tests share too: the engines, processes by pid, polling.
use securellm_testkit::signal;
pub use securellm_testkit::{
    MIB, alive, bin_dir, binary, in_process_table, kill9, llama_server, python, wait_until,
};

/// The internal token of every stack this test process starts (one per process is enough: each
/// stack has its own copy of the file).
pub fn internal_token() -> &'static InternalToken {
    static TOKEN: std::sync::OnceLock<InternalToken> = std::sync::OnceLock::new();
    TOKEN.get_or_init(InternalToken::generate)
}

/// Write [`internal_token`] to `path` (mode 0600), as a service would have created it.
fn write_internal_token(path: &Path) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    writeln!(f, "{}", internal_token().expose()).unwrap();
}

/// A Python script of this crate (`tests/e2e/tests/<name>`).
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name)
}

// ------------------------------------------------------------------------------------------------
// Processes

fn parent_of(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Every descendant of `pid` (children, grandchildren, ...), from /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let table: Vec<(u32, u32)> = all_pids()
        .into_iter()
        .filter_map(|p| Some((p, parent_of(p)?)))
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for (c, _) in table.iter().filter(|(_, pp)| *pp == p) {
            out.push(*c);
            frontier.push(*c);
        }
    }
    out
}

/// Processes whose command line mentions `needle` (e.g. a stack's temporary directory).
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    all_pids()
        .into_iter()
        .filter_map(|p| {
            let raw = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            cmd.contains(needle).then(|| (p, cmd.trim().to_string()))
        })
        .collect()
}

/// One service binary, started with `--listen` (and `--http-listen` for the gateway) plus fixed
/// arguments; stdout and stderr go to files in the stack's log directory. Killed on drop.
pub struct Service {
    /// The binary's name (also its service name in the `ready` line).
    pub name: &'static str,
    args: Vec<OsString>,
    child: Option<Child>,
    /// The gRPC address it listens on (kept across restarts).
    pub grpc: SocketAddr,
    /// The HTTP address (gateway only).
    pub http: Option<SocketAddr>,
    /// The Prometheus `/metrics` address (from the `ready` line's `metrics=`).
    pub metrics: Option<SocketAddr>,
    env: Vec<(String, String)>,
    logs: PathBuf,
    starts: u32,
}

impl Service {
    async fn start(
        name: &'static str,
        args: Vec<OsString>,
        env: &[(String, String)],
        logs: &Path,
    ) -> Service {
        let mut s = Service {
            name,
            args,
            child: None,
            grpc: "127.0.0.1:0".parse().unwrap(),
            http: (name == "securellm-gateway").then(|| "127.0.0.1:0".parse().unwrap()),
            metrics: None,
            env: env.to_vec(),
            logs: logs.to_path_buf(),
            starts: 0,
        };
        s.spawn().await;
        s
    }

    fn out_path(&self) -> PathBuf {
        self.logs.join(format!("{}.{}.out", self.name, self.starts))
    }

    fn log_path(&self) -> PathBuf {
        self.logs.join(format!("{}.{}.log", self.name, self.starts))
    }

    /// Start the process and wait for its `ready` line.
    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        self.starts += 1;
        let out = std::fs::File::create(self.out_path()).unwrap();
        let err = std::fs::File::create(self.log_path()).unwrap();
        let mut cmd = Command::new(binary(self.name));
        cmd.arg("--listen").arg(self.grpc.to_string());
        if let Some(h) = self.http {
            cmd.arg("--http-listen").arg(h.to_string());
        }
        // A free port the first time (never the documented default: stacks run in parallel).
        let metrics = self
            .metrics
            .map_or("127.0.0.1:0".to_string(), |m| m.to_string());
        cmd.arg("--metrics-listen").arg(metrics);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // The test's environment must not leak into the services' configuration.
        for (k, _) in std::env::vars_os() {
            let k_ = k.to_string_lossy();
            if k_.starts_with("SECURELLM_") || k_.starts_with("OTEL_") {
                cmd.env_remove(&k);
            }
        }
        cmd.env("RUST_LOG", "info");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Die with the test process, even when it is killed (nextest's timeout).
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.name));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(self.out_path()).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.starts_with("ready ")) {
                for word in line.split_whitespace() {
                    if let Some(a) = word.strip_prefix("grpc=") {
                        self.grpc = a.parse().unwrap();
                    } else if let Some(a) = word.strip_prefix("http=") {
                        self.http = Some(a.parse().unwrap());
                    } else if let Some(a) = word.strip_prefix("metrics=") {
                        self.metrics = a.parse().ok();
                    }
                }
                assert!(
                    line.starts_with(&format!("ready {} ", self.name)),
                    "unexpected ready line {line:?}"
                );
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "{} exited ({st}) before it was ready:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} was not ready within 30 s:\n{}",
                self.name,
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// `kill -9` and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send SIGTERM (without waiting).
    pub fn sigterm(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, libc::SIGTERM);
        }
    }

    /// Wait for the process to exit (after [`Service::sigterm`]); `None` if it is still running
    /// after `timeout` (it is then killed).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut c = self.child.take()?;
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM and wait for the exit.
    pub async fn stop(&mut self) -> Option<ExitStatus> {
        self.sigterm();
        self.wait_exit(Duration::from_secs(20)).await
    }

    /// Start it again with the same flags on the same address(es).
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.kill9();
        }
        self.spawn().await;
    }

    /// The last `n` lines of its log (every start).
    pub fn log_tail(&self, n: usize) -> String {
        let mut out = String::new();
        for i in 1..=self.starts {
            let p = self.logs.join(format!("{}.{i}.log", self.name));
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {} (start {i})\n", self.name));
            for l in &lines[lines.len().saturating_sub(n)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ------------------------------------------------------------------------------------------------
// The stack

/// A model file to generate.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// Its file name without `.gguf` (the registry's name for it).
    pub name: String,
    /// The bigger test model (about 45 MB, slower: for mid-stream faults) instead of the tiny one.
    pub bigger: bool,
}

impl ModelSpec {
    pub fn tiny(name: &str) -> Self {
        Self {
            name: name.into(),
            bigger: false,
        }
    }

    pub fn bigger(name: &str) -> Self {
        Self {
            name: name.into(),
            bigger: true,
        }
    }
}

/// How to start a stack.
#[derive(Clone, Debug)]
pub struct Options {
    /// Model files to generate into the registry's root.
    pub models: Vec<ModelSpec>,
    /// Simulated GPU sizes (`--simulate-gpu`).
    pub gpus: Vec<String>,
    /// Scheduler: time a holder has to release after an eviction notice.
    pub eviction_grace_ms: u64,
    /// Backend manager: lease TTL (renewed at a third of it).
    pub lease_ttl_ms: u64,
    /// Backend manager defaults for every model.
    pub context: u64,
    pub idle_ttl_ms: u64,
    /// Extra TOML appended to the config file (e.g. `[backend.models.x]` sections).
    pub extra_toml: String,
    /// Environment variables for all four services (e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            models: vec![ModelSpec::tiny("tiny"), ModelSpec::tiny("other")],
            gpus: vec!["1GiB".into()],
            eviction_grace_ms: 5_000,
            lease_ttl_ms: 3_000,
            context: 512,
            idle_ttl_ms: 0,
            extra_toml: String::new(),
            env: Vec::new(),
        }
    }
}

/// Adds the admin token to every GatewayAdmin call.
#[derive(Clone)]
pub struct AdminAuth(MetadataValue<Ascii>);

impl Interceptor for AdminAuth {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

pub type AdminClient = GatewayAdminClient<InterceptedService<Channel, AdminAuth>>;

/// The four services, their data, an API key and the admin token.
pub struct Stack {
    // Fields drop in order: the gateway first, the temporary directory last.
    pub gateway: Service,
    pub backend: Service,
    pub registry: Service,
    pub scheduler: Service,
    /// The bootstrap API key (all models, default limits).
    pub api_key: String,
    /// The gateway's admin token (`<gateway data dir>/admin-token`).
    pub admin_token: String,
    pub models_dir: PathBuf,
    pub config: PathBuf,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl Stack {
    /// Generate the models, write the config file, start scheduler → registry → backend-manager
    /// → gateway, each after the previous one is ready.
    pub async fn start(opts: Options) -> Stack {
        securellm_common::tls::install_crypto_provider();
        let dir = tempfile::Builder::new()
            .prefix("securellm-e2e-")
            .tempdir()
            .unwrap();
        let root = dir.path();
        let models_dir = root.join("models");
        let logs = root.join("logs");
        for d in [&models_dir, &logs] {
            std::fs::create_dir_all(d).unwrap();
        }
        for (i, m) in opts.models.iter().enumerate() {
            let base = if m.bigger {
                TinyLlamaOptions::bigger()
            } else {
                TinyLlamaOptions::default()
            };
            write_tiny_llama(
                models_dir.join(format!("{}.gguf", m.name)),
                &TinyLlamaOptions {
                    name: m.name.clone(),
                    seed: 1 + i as u64,
                    ..base
                },
            )
            .unwrap();
        }
        let token_file = root.join("internal-token");
        write_internal_token(&token_file);
        let config = root.join("securellm.toml");
        std::fs::write(
            &config,
            format!(
                "[backend]\n\
                 threads = 1\n\
                 lease_ttl_ms = {lease_ttl}\n\
                 stop_grace_ms = 2000\n\
                 backoff_ms = 100\n\
                 defaults = {{ context = {ctx}, idle_ttl_ms = {idle} }}\n\
                 \n\
                 [gateway]\n\
                 request_timeout_ms = 60000\n\
                 {extra}\n",
                lease_ttl = opts.lease_ttl_ms,
                ctx = opts.context,
                idle = opts.idle_ttl_ms,
                extra = opts.extra_toml,
            ),
        )
        .unwrap();
        let os = |s: &str| OsString::from(s);
        let path = |p: PathBuf| p.into_os_string();
        let mut sched_args = vec![
            os("--internal-token-file"),
            path(token_file.clone()),
            os("--config"),
            path(config.clone()),
            os("--data-dir"),
            path(root.join("scheduler")),
            os("--eviction-grace-ms"),
            os(&opts.eviction_grace_ms.to_string()),
        ];
        for g in &opts.gpus {
            sched_args.push(os("--simulate-gpu"));
            sched_args.push(os(g));
        }
        let scheduler = Service::start("vram-scheduler", sched_args, &opts.env, &logs).await;
        let registry = Service::start(
            "registry",
            vec![
                os("--internal-token-file"),
                path(token_file.clone()),
                os("--config"),
                path(config.clone()),
                os("--data-dir"),
                path(root.join("registry")),
                os("--models"),
                path(models_dir.clone()),
                os("--no-watch"),
            ],
            &opts.env,
            &logs,
        )
        .await;
        let backend = Service::start(
            "backend-manager",
            vec![
                os("--internal-token-file"),
                path(token_file.clone()),
                os("--config"),
                path(config.clone()),
                os("--data-dir"),
                path(root.join("backend")),
                os("--scheduler"),
                os(&scheduler.grpc.to_string()),
                os("--registry"),
                os(&registry.grpc.to_string()),
                os("--llama-server"),
                path(llama_server()),
            ],
            &opts.env,
            &logs,
        )
        .await;
        let gateway_data = root.join("gateway");
        let key_file = root.join("api-key");
        let gateway = Service::start(
            "securellm-gateway",
            vec![
                os("--internal-token-file"),
                path(token_file.clone()),
                os("--config"),
                path(config.clone()),
                os("--data-dir"),
                path(gateway_data.clone()),
                os("--backend"),
                os(&backend.grpc.to_string()),
                os("--registry"),
                os(&registry.grpc.to_string()),
                os("--scheduler"),
                os(&scheduler.grpc.to_string()),
                os("--bootstrap-key-file"),
                path(key_file.clone()),
            ],
            &opts.env,
            &logs,
        )
        .await;
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .trim()
                .to_string()
        };
        let api_key = read(&key_file);
        let admin_token = read(&gateway_data.join("admin-token"));
        assert!(api_key.starts_with("sk-"), "bootstrap key {api_key:?}");
        Stack {
            gateway,
            backend,
            registry,
            scheduler,
            api_key,
            admin_token,
            models_dir,
            config,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
            dir,
        }
    }

    /// The stack's temporary directory (every service's data and logs are under it).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The internal token file the four services share.
    pub fn internal_token_file(&self) -> PathBuf {
        self.root().join("internal-token")
    }

    /// The gateway's data directory (audit log, keys, admin token).
    pub fn gateway_data(&self) -> PathBuf {
        self.root().join("gateway")
    }

    /// The gateway's OpenAI base URL, `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.gateway.http.unwrap())
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    // -- gRPC clients (a fresh connection each time, so restarts are seen) --

    async fn channel(addr: SocketAddr) -> Channel {
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"))
    }

    /// A channel to an internal service whose calls carry `token` (`None`: no token).
    pub async fn channel_with(addr: SocketAddr, token: Option<&InternalToken>) -> AuthChannel {
        authenticated(Self::channel(addr).await, token)
    }

    /// A channel to an internal service whose calls carry the stack's internal token.
    async fn internal(addr: SocketAddr) -> AuthChannel {
        Self::channel_with(addr, Some(internal_token())).await
    }

    pub async fn scheduler_client(&self) -> VramSchedulerClient<AuthChannel> {
        VramSchedulerClient::new(Self::internal(self.scheduler.grpc).await)
    }

    pub async fn registry_client(&self) -> ModelRegistryClient<AuthChannel> {
        ModelRegistryClient::new(Self::internal(self.registry.grpc).await)
    }

    pub async fn backend_client(&self) -> BackendManagerClient<AuthChannel> {
        BackendManagerClient::new(Self::internal(self.backend.grpc).await)
    }

    /// GatewayAdmin with the admin token.
    pub async fn admin(&self) -> AdminClient {
        let auth = AdminAuth(format!("Bearer {}", self.admin_token).parse().unwrap());
        GatewayAdminClient::with_interceptor(Self::channel(self.gateway.grpc).await, auth)
    }

    // -- scheduler / backend state --

    pub async fn status(&self) -> pb::SchedulerStatus {
        self.scheduler_client()
            .await
            .get_status(pb::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn leases(&self) -> Vec<pb::Lease> {
        self.status().await.leases
    }

    pub async fn instances(&self) -> Vec<pb::BackendInstance> {
        self.backend_client()
            .await
            .list_instances(pb::ListInstancesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .instances
    }

    /// The (non-embedding) instance of `model`, if any.
    pub async fn instance(&self, model: &str) -> Option<pb::BackendInstance> {
        self.instances().await.into_iter().find(|i| {
            i.model_name == model
                && !i
                    .settings
                    .as_ref()
                    .and_then(|s| s.embeddings)
                    .unwrap_or(false)
        })
    }

    /// The registry's estimate for `model` at the stack's settings (what the manager asks for).
    pub async fn estimate(&self, model: &str, context: u64) -> pb::MemoryEstimate {
        self.registry_client()
            .await
            .estimate(pb::EstimateRequest {
                model: model.into(),
                context: context as i64,
                parallel: 1,
                cache_type: pb::KvCacheType::F16 as i32,
                gpu_layers: None,
            })
            .await
            .unwrap()
            .into_inner()
    }

    // -- gateway --

    /// Make an API key through GatewayAdmin.
    pub async fn create_key(&self, name: &str, patterns: &[&str], rpm: Option<u32>) -> String {
        self.admin()
            .await
            .create_api_key(pb::CreateApiKeyRequest {
                name: name.into(),
                models: Some(pb::ApiKeyModelPatterns {
                    patterns: patterns.iter().map(|p| p.to_string()).collect(),
                }),
                limits: Some(pb::ApiKeyLimits {
                    requests_per_minute: rpm,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .secret
    }

    /// POST /v1/chat/completions (non-streaming) with `key` (none when empty) and
    /// `x-request-id: rid`.
    pub async fn chat(&self, key: &str, model: &str, max_tokens: u32, rid: &str) -> Reply {
        self.post(
            key,
            "chat/completions",
            rid,
            serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": "hello there"}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }),
        )
        .await
    }

    /// [`Stack::chat`] with extra request headers (e.g. a caller's `traceparent`).
    pub async fn chat_with_headers(
        &self,
        key: &str,
        model: &str,
        max_tokens: u32,
        rid: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        self.post_with_headers(
            key,
            "chat/completions",
            rid,
            serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": "hello there"}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }),
            headers,
        )
        .await
    }

    /// POST `/v1/<path>` with a JSON body.
    pub async fn post(&self, key: &str, path: &str, rid: &str, body: serde_json::Value) -> Reply {
        self.post_with_headers(key, path, rid, body, &[]).await
    }

    /// POST `/v1/<path>` with a JSON body and extra headers.
    pub async fn post_with_headers(
        &self,
        key: &str,
        path: &str,
        rid: &str,
        body: serde_json::Value,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut rq = self
            .http
            .post(format!("{}/{path}", self.base_url()))
            .header("x-request-id", rid)
            .json(&body);
        for (k, v) in headers {
            rq = rq.header(*k, *v);
        }
        if !key.is_empty() {
            rq = rq.bearer_auth(key);
        }
        Reply::from(rq.send().await.expect("gateway reachable")).await
    }

    /// GET /v1/models.
    pub async fn models(&self, key: &str, rid: &str) -> Reply {
        let rq = self
            .http
            .get(format!("{}/models", self.base_url()))
            .header("x-request-id", rid)
            .bearer_auth(key);
        Reply::from(rq.send().await.expect("gateway reachable")).await
    }

    /// A streaming chat request; the response is returned as soon as its headers arrive.
    pub async fn chat_stream(
        &self,
        key: &str,
        model: &str,
        max_tokens: u32,
        rid: &str,
    ) -> reqwest::Response {
        self.http
            .post(format!("{}/chat/completions", self.base_url()))
            .header("x-request-id", rid)
            .bearer_auth(key)
            .json(&serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": "tell me a story"}],
                "max_tokens": max_tokens,
                "stream": true,
            }))
            .send()
            .await
            .expect("gateway reachable")
    }

    /// Every audit row (newest first).
    pub async fn audit_rows(&self) -> Vec<pb::AuditRow> {
        self.admin()
            .await
            .query_audit(pb::QueryAuditRequest {
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .rows
    }

    /// Wait until each request id has its audit row (rows are group-committed just after the
    /// answer), assert there is exactly one per id, and return them in the order of `rids`.
    pub async fn audited(&self, rids: &[&str]) -> Vec<pb::AuditRow> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let rows = self.audit_rows().await;
            let found: Vec<Vec<&pb::AuditRow>> = rids
                .iter()
                .map(|id| rows.iter().filter(|r| r.request_id == *id).collect())
                .collect();
            if found.iter().all(|f| !f.is_empty()) {
                for (id, f) in rids.iter().zip(&found) {
                    assert_eq!(f.len(), 1, "request {id} has {} audit rows", f.len());
                }
                return found.into_iter().map(|f| f[0].clone()).collect();
            }
            assert!(
                Instant::now() < deadline,
                "no audit row for {:?}",
                rids.iter()
                    .zip(&found)
                    .filter(|(_, f)| f.is_empty())
                    .map(|(id, _)| *id)
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Run the `securellm` CLI against this stack (its service addresses set).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(binary("securellm"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SECURELLM_") {
                cmd.env_remove(&k);
            }
        }
        // Never the developer's own `make run` stack (its stack file).
        cmd.env("SECURELLM_STACK_FILE", "/nonexistent/securellm-stack")
            .env("SECURELLM_INTERNAL_TOKEN_FILE", self.internal_token_file())
            .env("SECURELLM_SCHEDULER", self.scheduler.grpc.to_string())
            .env("SECURELLM_REGISTRY", self.registry.grpc.to_string())
            .env("SECURELLM_BACKEND", self.backend.grpc.to_string())
            .args(args)
            .output()
            .expect("run securellm")
    }

    /// The services' pids and all their descendants (llama-server children).
    pub fn pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for s in self.services() {
            if let Some(p) = s.pid() {
                out.push(p);
                out.extend(descendants(p));
            }
        }
        out
    }

    /// GET `/metrics` of one service (its Prometheus text; panics unless 200).
    pub async fn scrape(&self, svc: &Service) -> String {
        let addr = svc
            .metrics
            .unwrap_or_else(|| panic!("{} has no metrics= in its ready line", svc.name));
        let r = self
            .http
            .get(format!("http://{addr}/metrics"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap_or_else(|e| panic!("scrape {}: {e}", svc.name));
        assert_eq!(r.status().as_u16(), 200, "scrape {}", svc.name);
        r.text().await.unwrap()
    }

    /// The four services, scheduler first.
    pub fn services(&self) -> [&Service; 4] {
        [
            &self.scheduler,
            &self.registry,
            &self.backend,
            &self.gateway,
        ]
    }

    /// The last `n` log lines of every service.
    pub fn logs(&self, n: usize) -> String {
        self.services().iter().map(|s| s.log_tail(n)).collect()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "==== service logs ({})\n{}",
                self.root().display(),
                self.logs(60)
            );
        }
    }
}

/// An HTTP answer, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: serde_json::Value,
    pub text: String,
}

impl Reply {
    async fn from(r: reqwest::Response) -> Reply {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        Reply {
            status,
            headers,
            body,
            text,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `error.code` of an OpenAI-shaped error body.
    pub fn error_code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    pub fn error_message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

// ------------------------------------------------------------------------------------------------
// Checks

/// The scheduler's invariant for every GPU: `leased + foreign + reserve <= total`, the leased
/// figure equal to the sum of the leases on it, and no over-commitment flagged.
pub fn check_invariant(st: &pb::SchedulerStatus) -> Result<(), String> {
    for g in &st.gpus {
        let sum: u64 = st
            .leases
            .iter()
            .filter(|l| l.gpu_index == g.index)
            .map(|l| l.bytes)
            .sum();
        if sum != g.leased_bytes {
            return Err(format!(
                "GPU {}: leases sum to {sum} but leased_bytes is {}",
                g.index, g.leased_bytes
            ));
        }
        if g.leased_bytes + g.foreign_bytes + g.reserve_bytes > g.total_bytes {
            return Err(format!(
                "GPU {} over-committed: leased {} + foreign {} + reserve {} > total {}",
                g.index, g.leased_bytes, g.foreign_bytes, g.reserve_bytes, g.total_bytes
            ));
        }
        if g.overcommitted {
            return Err(format!("GPU {} flagged over-committed", g.index));
        }
    }
    Ok(())
}

/// The scheduler's lease events, collected in the background from `WatchEvents` (every holder).
pub struct LeaseEvents {
    events: std::sync::Arc<std::sync::Mutex<Vec<pb::LeaseEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseEvents {
    /// Follow the scheduler at `addr` (the subscription is live when this returns).
    pub async fn follow(addr: SocketAddr) -> LeaseEvents {
        use tokio_stream::StreamExt;
        let mut c = VramSchedulerClient::new(Stack::internal(addr).await);
        let mut stream = c
            .watch_events(pb::WatchEventsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(e)) = stream.next().await {
                sink.lock().unwrap().push(e);
            }
        });
        LeaseEvents { events, task }
    }

    /// Everything seen so far.
    pub fn all(&self) -> Vec<pb::LeaseEvent> {
        self.events.lock().unwrap().clone()
    }

    /// The events of one kind whose lease carries `label` (the model name, for the manager's
    /// leases).
    pub fn of(&self, kind: pb::lease_event::Kind, label: &str) -> Vec<pb::LeaseEvent> {
        self.all()
            .into_iter()
            .filter(|e| e.kind == kind as i32 && e.lease.as_ref().is_some_and(|l| l.label == label))
            .collect()
    }
}

impl Drop for LeaseEvents {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Now, unix ms.
pub fn now_ms() -> u64 {
    securellm_common::time::now_ms()
}

/// Read a streamed (SSE) response: `data:` payloads in order, until the stream ends, fails, or
/// `timeout` passes (`timed_out` set). `on_event` is called with each payload's index as it
/// arrives (e.g. to kill something after the first one).
pub async fn read_sse(
    resp: reqwest::Response,
    timeout: Duration,
    mut on_event: impl FnMut(usize),
) -> SseOutcome {
    use futures::StreamExt;
    let mut out = SseOutcome::default();
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, body.next()).await {
            Err(_) => {
                out.timed_out = true;
                return out;
            }
            Ok(None) => return out,
            Ok(Some(Err(e))) => {
                out.transport_error = Some(e.to_string());
                return out;
            }
            Ok(Some(Ok(bytes))) => {
                buf.push_str(&String::from_utf8_lossy(&bytes));
                while let Some(i) = buf.find("\n\n") {
                    let frame: String = buf.drain(..i + 2).collect();
                    for line in frame.lines() {
                        if let Some(data) = line.strip_prefix("data:") {
                            out.events.push(data.trim().to_string());
                            on_event(out.events.len() - 1);
                        } else if let Some(c) = line.strip_prefix(':') {
                            out.comments.push(c.trim().to_string());
                        }
                    }
                }
            }
        }
    }
}

/// What [`read_sse`] saw.
#[derive(Debug, Default)]
pub struct SseOutcome {
    /// `data:` payloads (`[DONE]` included as is).
    pub events: Vec<String>,
    /// SSE comment lines (`: …`), without the colon.
    pub comments: Vec<String>,
    pub timed_out: bool,
    pub transport_error: Option<String>,
}

impl SseOutcome {
    pub fn done(&self) -> bool {
        self.events.last().is_some_and(|e| e == "[DONE]")
    }

    /// The payloads parsed as JSON (`[DONE]` skipped).
    pub fn json(&self) -> Vec<serde_json::Value> {
        self.events
            .iter()
            .filter(|e| *e != "[DONE]")
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect()
    }
}

// ------------------------------------------------------------------------------------------------
// Metrics

/// One sample of a Prometheus text exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The sample's name as written (`x_bucket`, `x_sum`, `x_count` for a histogram `x`).
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` answer (the text format: `# HELP`/`# TYPE` lines and samples).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    /// `# TYPE` lines: family name → type.
    pub types: std::collections::BTreeMap<String, String>,
}

impl Metrics {
    /// Parse the text format (label values unescaped: `\\`, `\"`, `\n`).
    pub fn parse(text: &str) -> Metrics {
        let mut m = Metrics::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut w = rest.split_whitespace();
                if let (Some(n), Some(t)) = (w.next(), w.next()) {
                    m.types.insert(n.to_string(), t.to_string());
                }
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, mut rest) = match line.find(['{', ' ']) {
                Some(i) => (&line[..i], &line[i..]),
                None => continue,
            };
            let mut labels = std::collections::BTreeMap::new();
            if rest.starts_with('{') {
                let mut chars = rest[1..].char_indices();
                let mut key = String::new();
                let mut end = 0;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '}' => {
                            end = i + 2;
                            break;
                        }
                        ',' | ' ' => {}
                        '=' => {
                            chars.next(); // the opening quote
                            let mut v = String::new();
                            while let Some((_, c)) = chars.next() {
                                match c {
                                    '\\' => match chars.next().map(|(_, c)| c) {
                                        Some('n') => v.push('\n'),
                                        Some(o) => v.push(o),
                                        None => {}
                                    },
                                    '"' => break,
                                    o => v.push(o),
                                }
                            }
                            labels.insert(std::mem::take(&mut key), v);
                        }
                        o => key.push(o),
                    }
                }
                rest = &rest[end..];
            }
            let Some(value) = rest.split_whitespace().next() else {
                continue;
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or(f64::NAN),
            };
            m.samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        m
    }

    /// The sum of the samples named `name` whose labels include every `(key, value)` of `labels`
    /// (`None` when there is no such sample).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for s in &self.samples {
            if s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            {
                *found.get_or_insert(0.0) += s.value;
            }
        }
        found
    }

    /// [`Metrics::get`], 0 when absent.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The metric (family) names present: a histogram `x` as `x` (from its `x_bucket`,
    /// `x_sum`, `x_count` samples) as well as the sample names themselves.
    pub fn names(&self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for s in &self.samples {
            out.insert(s.name.clone());
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = s.name.strip_suffix(suffix)
                    && self
                        .types
                        .get(base)
                        .is_some_and(|t| t == "histogram" || t == "summary")
                {
                    out.insert(base.to_string());
                }
            }
        }
        out
    }
}

/// Prometheus' `promtool` (Debian package `prometheus`; `make test` installs it). `None`, with
/// a loud warning on stderr, when it is not installed: the caller then skips its check.
pub fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("promtool"))
        .chain([PathBuf::from("/usr/bin/promtool")])
        .find(|p| p.is_file());
    if found.is_none() {
        eprintln!(
            "\n\n!!!!!!!! WARNING: promtool is not installed (Debian package `prometheus`; \
             `make promtool` installs it): Prometheus' own checks are SKIPPED !!!!!!!!\n\n"
        );
    }
    found
}

/// Run `promtool <args>` with `stdin` on its standard input; its exit status and output.
pub fn run_promtool(promtool: &Path, args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(promtool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", promtool.display()));
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The metric names `docs/metrics.md` documents (the back-quoted `securellm_*` names of its
/// tables' first column).
pub fn documented_metrics() -> std::collections::BTreeSet<String> {
    let doc = securellm_testkit::workspace_root().join("docs/metrics.md");
    let text = std::fs::read_to_string(&doc).unwrap_or_else(|e| panic!("{}: {e}", doc.display()));
    text.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("securellm_"))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod metrics_tests {
    use super::*;

    #[test]
    fn parses_the_text_format() {
        let m = Metrics::parse(
            "# HELP a_total things\n# TYPE a_total counter\n\
             a_total{model=\"x\",result=\"ok\"} 3\na_total{model=\"y\",result=\"ok\"} 2\n\
             a_total{model=\"q\\\"uo,te\",result=\"failed\"} 1\n\
             # TYPE h_seconds histogram\nh_seconds_bucket{le=\"+Inf\"} 4\nh_seconds_sum 0.5\n\
             h_seconds_count 4\ng 7.5\n",
        );
        assert_eq!(m.get("a_total", &[("result", "ok")]), Some(5.0));
        assert_eq!(m.get("a_total", &[("model", "q\"uo,te")]), Some(1.0));
        assert_eq!(m.get("a_total", &[("model", "z")]), None);
        assert_eq!(m.sum("g", &[]), 7.5);
        assert_eq!(m.get("h_seconds_bucket", &[("le", "+Inf")]), Some(4.0));
        let names = m.names();
        assert!(names.contains("h_seconds") && names.contains("h_seconds_count"));
        assert!(names.contains("a_total") && !names.contains("a"));
    }

    #[test]
    fn the_catalogue_lists_the_metrics() {
        let d = documented_metrics();
        assert!(d.contains("securellm_scheduler_gpu_leased_bytes"), "{d:?}");
        assert!(d.contains("securellm_gateway_audit_rows_dropped_total"));
        assert!(d.len() > 40, "{}", d.len());
    }
}
