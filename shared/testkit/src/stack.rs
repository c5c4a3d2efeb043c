//! The in-process stack: scheduler → registry → backend manager (→ gateway), each on a loopback
//! port with real gRPC, in one temporary directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use backend_manager::config::{BackendConfig, ModelSettings};
use securellm_common::ByteSize;
use securellm_common::internal_auth::{AuthChannel, InternalToken};
use securellm_proto::v1 as pb;
use securellm_proto::v1::backend_manager_client::BackendManagerClient;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;

use crate::connect;

/// A GPU size: bytes, or text as the config files write it (`"24GiB"`).
pub trait Size {
    fn bytes(&self) -> u64;
}

impl Size for u64 {
    fn bytes(&self) -> u64 {
        *self
    }
}

impl Size for &str {
    fn bytes(&self) -> u64 {
        securellm_common::bytesize::parse_bytes(self)
            .unwrap_or_else(|e| panic!("GPU size {self:?}: {e}"))
    }
}

type Tweak<C> = Box<dyn FnOnce(&mut C) + Send>;
type Writer = Box<dyn FnOnce(&Path) + Send>;

enum Gpu {
    Bytes(u64),
    /// Sized from the registry's estimate of a model (context 512, one slot, F16 cache).
    FromEstimate(String, Box<dyn FnOnce(&pb::MemoryEstimate) -> u64 + Send>),
}

/// How to start a [`Stack`]; [`Stack::new`] makes one.
pub struct StackBuilder {
    gpus: Vec<Gpu>,
    eviction_grace_ms: Option<u64>,
    writers: Vec<Writer>,
    token: Option<Option<InternalToken>>,
    external_scheduler: Option<SocketAddr>,
    scheduler_only: bool,
    manager: Vec<Tweak<BackendConfig>>,
    #[cfg(feature = "gateway")]
    gateway: Option<Vec<Tweak<securellm_gateway::config::GatewayConfig>>>,
}

/// The running services (those the builder asked for) and their directory. Dropping it stops
/// them (the backend manager's children with it) and removes the directory.
pub struct Stack {
    #[cfg(feature = "gateway")]
    gateway: Option<securellm_gateway::RunningGateway>,
    manager: Option<backend_manager::RunningManager>,
    registry: Option<registry::RunningRegistry>,
    scheduler: Option<vram_scheduler::RunningScheduler>,
    scheduler_addr: SocketAddr,
    manager_config: Option<BackendConfig>,
    gpus: Vec<u64>,
    token: Option<InternalToken>,
    models: PathBuf,
    dir: tempfile::TempDir,
}

impl StackBuilder {
    /// Add a simulated GPU of `size` (default: one of 1 GiB).
    pub fn gpu(mut self, size: impl Size) -> Self {
        self.gpus.push(Gpu::Bytes(size.bytes()));
        self
    }

    /// Add a simulated GPU sized by `f` from the registry's estimate for `model` (context 512,
    /// one slot, F16 cache): e.g. room for one model and not two.
    pub fn gpu_for(
        mut self,
        model: &str,
        f: impl FnOnce(&pb::MemoryEstimate) -> u64 + Send + 'static,
    ) -> Self {
        self.gpus.push(Gpu::FromEstimate(model.into(), Box::new(f)));
        self
    }

    /// The scheduler's eviction grace (time a holder has to release after a notice).
    pub fn eviction_grace_ms(mut self, ms: u64) -> Self {
        self.eviction_grace_ms = Some(ms);
        self
    }

    /// Tiny llamas `<name>.gguf` in the models directory, seeds 1, 2, 3, ...
    pub fn models(self, names: &[&str]) -> Self {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        self.write_models(move |dir| {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            crate::models::write_tinies(dir, &names);
        })
    }

    /// Write model files into the models directory (before the registry scans it).
    pub fn write_models(mut self, write: impl FnOnce(&Path) + Send + 'static) -> Self {
        self.writers.push(Box::new(write));
        self
    }

    /// Every service requires an internal token (`<dir>/internal-token`); the stack's clients
    /// present it. Without this the services are open.
    pub fn internal_token(mut self) -> Self {
        self.token = Some(None);
        self
    }

    /// [`Self::internal_token`] with this token (whose file the test wrote itself).
    pub fn with_token(mut self, token: InternalToken) -> Self {
        self.token = Some(Some(token));
        self
    }

    /// No scheduler of the stack's own: the backend manager uses the one at `addr` (e.g. a
    /// scheduler process the test kills and restarts).
    pub fn external_scheduler(mut self, addr: &str) -> Self {
        self.external_scheduler = Some(addr.parse().expect("a host:port address"));
        self
    }

    /// The scheduler alone (no registry, no backend manager).
    pub fn scheduler_only(mut self) -> Self {
        self.scheduler_only = true;
        self
    }

    /// Change the backend manager's configuration. The base: loopback, the stack's scheduler and
    /// registry, the internal token, defaults context 512 and idle TTL 0 (never idle-unloaded);
    /// `llama_server` left `None` becomes [`crate::llama_server`].
    pub fn manager(mut self, tweak: impl FnOnce(&mut BackendConfig) + Send + 'static) -> Self {
        self.manager.push(Box::new(tweak));
        self
    }

    /// Also start the gateway in front of the backend manager and the registry.
    #[cfg(feature = "gateway")]
    pub fn gateway(self) -> Self {
        self.gateway_with(|_| {})
    }

    /// [`Self::gateway`], with its configuration changed by `tweak`. The base: both listeners on
    /// loopback, data directory `<dir>/gateway`, the stack's backend manager and registry, the
    /// internal token.
    #[cfg(feature = "gateway")]
    pub fn gateway_with(
        mut self,
        tweak: impl FnOnce(&mut securellm_gateway::config::GatewayConfig) + Send + 'static,
    ) -> Self {
        self.gateway
            .get_or_insert_with(Vec::new)
            .push(Box::new(tweak));
        self
    }

    /// Write the models, start the services (each ready before the next one starts).
    pub async fn start(self) -> Stack {
        securellm_common::tls::install_crypto_provider();
        let dir = tempfile::Builder::new()
            .prefix("securellm-test-")
            .tempdir()
            .expect("a temporary directory");
        let models = dir.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        for w in self.writers {
            w(&models);
        }
        let token = self.token.map(|t| {
            t.unwrap_or_else(|| {
                securellm_common::internal_auth::load_or_create(&dir.path().join("internal-token"))
                    .expect("the internal token")
            })
        });
        let registry = if self.scheduler_only {
            None
        } else {
            Some(
                registry::start(&registry::config::RegistryConfig {
                    registry: registry::config::RegistrySection {
                        listen: "127.0.0.1:0".into(),
                        watch: false,
                        internal_token: token.clone(),
                        ..Default::default()
                    },
                    roots: vec![models.clone()],
                    aliases: Default::default(),
                    data_dir: dir.path().join("registry"),
                })
                .await
                .expect("the registry starts"),
            )
        };
        let mut gpus = Vec::new();
        for g in if self.gpus.is_empty() {
            vec![Gpu::Bytes(1 << 30)]
        } else {
            self.gpus
        } {
            gpus.push(match g {
                Gpu::Bytes(b) => b,
                Gpu::FromEstimate(model, f) => {
                    let r = registry.as_ref().expect("gpu_for needs the registry");
                    let mut c = ModelRegistryClient::new(connect(r.addr, token.as_ref()).await);
                    let e = c
                        .estimate(pb::EstimateRequest {
                            model,
                            context: 512,
                            parallel: 1,
                            cache_type: pb::KvCacheType::F16 as i32,
                            gpu_layers: None,
                        })
                        .await
                        .expect("the estimate that sizes the GPU")
                        .into_inner();
                    f(&e)
                }
            });
        }
        let mut sched_cfg = vram_scheduler::config::SchedulerConfig {
            listen: "127.0.0.1:0".into(),
            inventory: vram_scheduler::config::InventoryMode::Simulated,
            simulate_gpus: gpus.iter().map(|b| ByteSize(*b)).collect(),
            internal_token: token.clone(),
            ..Default::default()
        };
        if let Some(ms) = self.eviction_grace_ms {
            sched_cfg.eviction_grace_ms = ms;
        }
        let scheduler = match self.external_scheduler {
            Some(_) => None,
            None => Some(
                vram_scheduler::start(&sched_cfg)
                    .await
                    .expect("the scheduler starts"),
            ),
        };
        let scheduler_addr = match (&scheduler, self.external_scheduler) {
            (Some(s), _) => s.addr,
            (None, Some(a)) => a,
            (None, None) => unreachable!(),
        };
        let (manager, manager_config) = match &registry {
            None => (None, None),
            Some(reg) => {
                let mut cfg = BackendConfig {
                    listen: "127.0.0.1:0".into(),
                    scheduler: scheduler_addr.to_string(),
                    registry: reg.addr.to_string(),
                    defaults: ModelSettings {
                        context: Some(512),
                        idle_ttl_ms: Some(0),
                        ..Default::default()
                    },
                    internal_token: token.clone(),
                    ..BackendConfig::default()
                };
                for t in self.manager {
                    t(&mut cfg);
                }
                if cfg.llama_server.is_none() {
                    cfg.llama_server = Some(crate::llama_server());
                }
                let m = backend_manager::start(&cfg)
                    .await
                    .expect("the backend manager starts");
                (Some(m), Some(cfg))
            }
        };
        #[cfg(feature = "gateway")]
        let gateway = match (self.gateway, &manager, &registry) {
            (Some(tweaks), Some(m), Some(r)) => {
                let mut cfg = securellm_gateway::config::GatewayConfig {
                    listen: "127.0.0.1:0".into(),
                    http_listen: "127.0.0.1:0".into(),
                    data_dir: Some(dir.path().join("gateway")),
                    backend: m.addr.to_string(),
                    registry: r.addr.to_string(),
                    scheduler: scheduler_addr.to_string(),
                    internal_token: token.clone(),
                    ..Default::default()
                };
                for t in tweaks {
                    t(&mut cfg);
                }
                Some(
                    securellm_gateway::start(&cfg)
                        .await
                        .expect("the gateway starts"),
                )
            }
            (Some(_), _, _) => panic!("the gateway needs the backend manager (not scheduler_only)"),
            (None, _, _) => None,
        };
        Stack {
            #[cfg(feature = "gateway")]
            gateway,
            manager,
            registry,
            scheduler,
            scheduler_addr,
            manager_config,
            gpus,
            token,
            models,
            dir,
        }
    }
}

impl Stack {
    /// A builder: one 1 GiB GPU, no models, open services, no gateway, until told otherwise.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> StackBuilder {
        StackBuilder {
            gpus: Vec::new(),
            eviction_grace_ms: None,
            writers: Vec::new(),
            token: None,
            external_scheduler: None,
            scheduler_only: false,
            manager: Vec::new(),
            #[cfg(feature = "gateway")]
            gateway: None,
        }
    }

    /// The stack's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The registry's root, where the models were written.
    pub fn models_dir(&self) -> &Path {
        &self.models
    }

    /// The simulated GPUs' sizes.
    pub fn gpus(&self) -> &[u64] {
        &self.gpus
    }

    /// The internal token, when the services require one.
    pub fn token(&self) -> Option<&InternalToken> {
        self.token.as_ref()
    }

    /// The internal token's file (for binaries: `--internal-token-file`).
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("internal-token")
    }

    pub fn scheduler(&self) -> &vram_scheduler::RunningScheduler {
        self.scheduler
            .as_ref()
            .expect("the stack's own scheduler runs")
    }

    pub fn registry(&self) -> &registry::RunningRegistry {
        self.registry.as_ref().expect("the registry was started")
    }

    pub fn manager(&self) -> &backend_manager::RunningManager {
        self.manager
            .as_ref()
            .expect("the backend manager was started")
    }

    /// The configuration the backend manager was started with.
    pub fn manager_config(&self) -> &BackendConfig {
        self.manager_config
            .as_ref()
            .expect("the backend manager was started")
    }

    #[cfg(feature = "gateway")]
    pub fn gateway(&self) -> &securellm_gateway::RunningGateway {
        self.gateway.as_ref().expect("the gateway was started")
    }

    pub fn scheduler_addr(&self) -> SocketAddr {
        self.scheduler_addr
    }

    pub fn registry_addr(&self) -> SocketAddr {
        self.registry().addr
    }

    pub fn manager_addr(&self) -> SocketAddr {
        self.manager().addr
    }

    /// Take the scheduler out (to stop it while the rest runs).
    pub fn take_scheduler(&mut self) -> vram_scheduler::RunningScheduler {
        self.scheduler.take().expect("the scheduler runs")
    }

    /// Take the backend manager out (to stop or drop it while the rest runs).
    pub fn take_manager(&mut self) -> backend_manager::RunningManager {
        self.manager.take().expect("the backend manager runs")
    }

    /// A channel to `addr` presenting the stack's internal token (if any).
    pub async fn channel(&self, addr: impl std::fmt::Display) -> AuthChannel {
        connect(addr, self.token.as_ref()).await
    }

    pub async fn scheduler_client(&self) -> VramSchedulerClient<AuthChannel> {
        VramSchedulerClient::new(self.channel(self.scheduler_addr()).await)
    }

    pub async fn registry_client(&self) -> ModelRegistryClient<AuthChannel> {
        ModelRegistryClient::new(self.channel(self.registry_addr()).await)
    }

    pub async fn backend_client(&self) -> BackendManagerClient<AuthChannel> {
        BackendManagerClient::new(self.channel(self.manager_addr()).await)
    }

    /// Stop everything in order: gateway, backend manager (its children and leases), registry,
    /// scheduler.
    pub async fn shutdown(mut self) {
        #[cfg(feature = "gateway")]
        if let Some(g) = self.gateway.take() {
            g.shutdown().await;
        }
        if let Some(m) = self.manager.take() {
            m.shutdown().await;
        }
        if let Some(r) = self.registry.take() {
            r.shutdown().await;
        }
        if let Some(s) = self.scheduler.take() {
            s.shutdown().await;
        }
    }
}
