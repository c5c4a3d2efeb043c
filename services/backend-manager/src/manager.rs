//! The manager: resolves model references through the registry, owns the routing table from
//! instance id to [`InstanceHandle`], and listens to the scheduler for what concerns its leases
//! (eviction notices, revocations, expiries) — re-attaching its leases when the scheduler restarts.
//!
//! The routing table is the only shared structure (a map of handles behind a mutex that is never
//! held across an `.await`); all instance state lives in the instance actors.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use securellm_common::time::now_ms;
use securellm_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tracing::Instrument;

use crate::backend::Backend;
use crate::config::{Effective, ModelSettings};
use crate::instance::{self, InstanceError, InstanceHandle, ModelRef, Shared};

/// The backend manager's core.
#[derive(Clone)]
pub struct Manager {
    pub shared: Arc<Shared>,
    instances: Arc<Mutex<BTreeMap<String, InstanceHandle>>>,
    /// Recently resolved references (name / alias / id, embeddings?) → instance, so a warm request
    /// does not ask the registry every time. Entries older than [`RESOLVE_TTL`] are resolved again.
    resolved: Arc<Mutex<ResolvedCache>>,
}

/// (reference, embeddings?) → when it was resolved, and its instance.
type ResolvedCache =
    std::collections::HashMap<(String, bool), (std::time::Instant, InstanceHandle)>;

/// How long a resolved model reference is reused without asking the registry.
const RESOLVE_TTL: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Manager {
    pub fn new(shared: Arc<Shared>) -> Self {
        let m = Self {
            shared,
            instances: Arc::new(Mutex::new(BTreeMap::new())),
            resolved: Arc::new(Mutex::new(std::collections::HashMap::new())),
        };
        tokio::spawn(m.clone().watch_scheduler());
        m
    }

    /// Resolve a model reference (id, alias or name) through the registry.
    pub async fn resolve(&self, reference: &str) -> Result<(ModelRef, pb::Model), InstanceError> {
        if reference.trim().is_empty() {
            return Err(InstanceError::InvalidArgument(
                "invalid `model`: must not be empty".into(),
            ));
        }
        let span = tracing::info_span!(
            "backend.resolve",
            otel.name = "backend.resolve",
            gen_ai.request.model = securellm_common::telemetry::clip_attr(reference, 256),
            backend.model_id = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let r = self
            .resolve_in_registry(reference)
            .instrument(span.clone())
            .await;
        match &r {
            Ok((m, _)) => span.record("backend.model_id", m.id.as_str()),
            Err(e) => span.record("error.type", e.kind()),
        };
        r
    }

    async fn resolve_in_registry(
        &self,
        reference: &str,
    ) -> Result<(ModelRef, pb::Model), InstanceError> {
        let mut reg = self.shared.registry.clone();
        // The whole call, connecting included: the channel's own timeout does not cover a name
        // lookup that hangs (a registry gone from the network: ~10 s in Docker's resolver).
        let call = reg.get_model(pb::GetModelRequest {
            model: reference.to_string(),
        });
        let m = tokio::time::timeout(crate::REGISTRY_CALL_TIMEOUT, call)
            .await
            .unwrap_or_else(|_| {
                Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {} s",
                    crate::REGISTRY_CALL_TIMEOUT.as_secs()
                )))
            })
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => InstanceError::ModelNotFound(format!(
                    "model {reference:?} not found: {}",
                    s.message()
                )),
                tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument => {
                    InstanceError::FailedPrecondition(s.message().to_string())
                }
                _ => InstanceError::Unavailable(format!(
                    "the registry is unreachable: {}",
                    s.message()
                )),
            })?
            .into_inner();
        if m.status != pb::ModelStatus::Ok as i32 {
            return Err(InstanceError::FailedPrecondition(format!(
                "model {} cannot be served: {}",
                m.name, m.status_reason
            )));
        }
        Ok((
            ModelRef {
                id: m.id.clone(),
                name: m.name.clone(),
                path: m.path.clone().into(),
                served_name: m.name.clone(),
            },
            m,
        ))
    }

    /// The backend for a model, by its format: GGUF (single or split) → llama.cpp; Ollama's store →
    /// the Ollama daemon when `[backend.ollama]` is configured, else llama.cpp on the blob (a GGUF
    /// file); safetensors → vLLM, else TGI, else FAILED_PRECONDITION. Also returns the name the
    /// engine serves the model under.
    pub fn backend_for(&self, m: &pb::Model) -> Result<(Arc<dyn Backend>, String), InstanceError> {
        let b = &self.shared.backends;
        let format = pb::ModelFormat::try_from(m.format).unwrap_or(pb::ModelFormat::Unspecified);
        match format {
            pb::ModelFormat::Ollama => match &b.ollama {
                Some(o) => {
                    let name_tag = m
                        .ollama
                        .as_ref()
                        .map(|o| o.name_tag.clone())
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| m.name.clone());
                    Ok((o.clone(), name_tag))
                }
                None => Ok((b.llamacpp.clone(), m.name.clone())),
            },
            pb::ModelFormat::Safetensors => b
                .vllm
                .as_ref()
                .or(b.tgi.as_ref())
                .map(|e| (e.clone(), m.name.clone()))
                .ok_or_else(|| {
                    InstanceError::FailedPrecondition(format!(
                        "model {} is a safetensors folder, which needs vLLM or TGI: configure \
                         [backend.vllm] or [backend.tgi] (`command` or `endpoint`)",
                        m.name
                    ))
                }),
            _ => Ok((b.llamacpp.clone(), m.name.clone())),
        }
    }

    /// The settings for a model: request over per-model config (by name, alias or id) over
    /// defaults.
    fn settings(
        &self,
        m: &pb::Model,
        request: &ModelSettings,
        embeddings: bool,
    ) -> Result<Effective, InstanceError> {
        let cfg = &self.shared.cfg;
        let per_model = std::iter::once(&m.name)
            .chain(m.aliases.iter())
            .chain(std::iter::once(&m.id))
            .find_map(|k| cfg.models.get(k))
            .cloned()
            .unwrap_or_default();
        let mut s = request.or(&per_model).or(&cfg.defaults);
        if embeddings {
            s.embeddings = Some(true);
        }
        Effective::from(&s).map_err(InstanceError::InvalidArgument)
    }

    /// The instance for a model (created on first use). Embedding requests use a separate
    /// instance started with `--embeddings` (`<model id>-emb`) unless the model's own is one.
    pub async fn instance(
        &self,
        reference: &str,
        embeddings: bool,
        request: &ModelSettings,
    ) -> Result<InstanceHandle, InstanceError> {
        let default_settings = *request == ModelSettings::default();
        let key = (reference.to_string(), embeddings);
        if default_settings
            && let Some((at, h)) = lock(&self.resolved).get(&key).cloned()
            && at.elapsed() < RESOLVE_TTL
            && self.current(&h)
        {
            return Ok(h);
        }
        let h = match self.instance_uncached(reference, embeddings, request).await {
            Ok(h) => h,
            // The registry is unreachable: a reference resolved before keeps its instance (a
            // loaded model goes on answering; an unloaded one fails at its estimate).
            Err(InstanceError::Unavailable(why)) => {
                // The instance now tracked under the id resolved before (a replaced one is not
                // handed out).
                let id = default_settings
                    .then(|| lock(&self.resolved).get(&key).map(|(_, h)| h.id.clone()))
                    .flatten();
                let stale = id.and_then(|id| lock(&self.instances).get(&id).cloned());
                return match stale {
                    Some(h) => {
                        tracing::warn!(model = reference, "{why}; using the last resolution");
                        // For another RESOLVE_TTL: while the registry is away (a network cut
                        // costs a call timeout), one request per TTL waits for it, not every one.
                        lock(&self.resolved).insert(key, (std::time::Instant::now(), h.clone()));
                        Ok(h)
                    }
                    None => Err(InstanceError::Unavailable(why)),
                };
            }
            Err(e) => return Err(e),
        };
        if default_settings && self.current(&h) {
            lock(&self.resolved).insert(key, (std::time::Instant::now(), h.clone()));
        }
        Ok(h)
    }

    async fn instance_uncached(
        &self,
        reference: &str,
        embeddings: bool,
        request: &ModelSettings,
    ) -> Result<InstanceHandle, InstanceError> {
        let (mut model, pbm) = self.resolve(reference).await?;
        let (backend, served_name) = self.backend_for(&pbm)?;
        model.served_name = served_name;
        let base = self.settings(&pbm, request, false)?;
        // Only llama-server is started differently for embeddings; the other engines serve
        // `/v1/embeddings` (or refuse it) from the one instance.
        let split = backend.kind() == pb::BackendKind::LlamaCpp;
        let (id, settings) = if embeddings && !base.embeddings && split {
            (
                format!("{}-emb", model.id),
                self.settings(&pbm, request, true)?,
            )
        } else {
            (model.id.clone(), base)
        };
        let existing = lock(&self.instances).get(&id).cloned();
        if let Some(h) = existing {
            if *request == ModelSettings::default() || h.settings == settings {
                return Ok(h);
            }
            // Explicit settings that differ from the instance's: an unloaded, idle instance is
            // retired and replaced; a loaded one is refused (never silently ignored: the caller
            // would get a model that is not what it asked for).
            if !h.retire().await {
                return Err(InstanceError::FailedPrecondition(format!(
                    "`{reference}` is loaded with other settings ({}); unload it first",
                    settings_diff(&h.settings, &settings)
                )));
            }
            lock(&self.resolved).retain(|_, (_, r)| !r.same(&h));
            let mut map = lock(&self.instances);
            if let Some(cur) = map.get(&id)
                && !cur.same(&h)
            {
                // Someone replaced it meanwhile.
                return if cur.settings == settings {
                    Ok(cur.clone())
                } else {
                    Err(InstanceError::FailedPrecondition(format!(
                        "`{reference}` was just set up with other settings ({}); unload it first",
                        settings_diff(&cur.settings, &settings)
                    )))
                };
            }
            let fresh = instance::spawn(id.clone(), model, settings, backend, self.shared.clone());
            map.insert(id, fresh.clone());
            return Ok(fresh);
        }
        let mut map = lock(&self.instances);
        if let Some(h) = map.get(&id) {
            // Another first use won the race: its settings must be these, or the caller asked
            // for something else.
            if *request != ModelSettings::default() && h.settings != settings {
                return Err(InstanceError::FailedPrecondition(format!(
                    "`{reference}` was just set up with other settings ({}); unload it first",
                    settings_diff(&h.settings, &settings)
                )));
            }
            return Ok(h.clone());
        }
        let h = instance::spawn(id.clone(), model, settings, backend, self.shared.clone());
        map.insert(id, h.clone());
        Ok(h)
    }

    /// Is `h` still the instance the manager tracks under its id (not replaced)?
    fn current(&self, h: &InstanceHandle) -> bool {
        lock(&self.instances)
            .get(&h.id)
            .is_some_and(|cur| cur.same(h))
    }

    /// The instance for `reference` and a ticket on it (loading it if needed). An instance
    /// retired between the lookup and the acquire (replaced to change its settings) is looked up
    /// again once, so callers never see that race.
    pub async fn acquire(
        &self,
        reference: &str,
        embeddings: bool,
        request: &ModelSettings,
        deadline_ms: u64,
        priority: Option<i32>,
        progress: Option<&mpsc::UnboundedSender<pb::LoadProgress>>,
    ) -> Result<(InstanceHandle, instance::Ticket), InstanceError> {
        let mut retried = false;
        loop {
            let h = self.instance(reference, embeddings, request).await?;
            let acquired = h.acquire(deadline_ms, priority);
            let r = match progress {
                None => acquired.await,
                Some(tx) => {
                    // Relay where the request stands until it has its ticket.
                    let mut rx = h.progress();
                    tokio::pin!(acquired);
                    loop {
                        let p = rx.borrow_and_update().clone();
                        if p.phase != pb::load_progress::Phase::Ready as i32 {
                            let _ = tx.send(p);
                        }
                        tokio::select! {
                            biased;
                            r = &mut acquired => break r,
                            c = rx.changed() => if c.is_err() { break acquired.await },
                        }
                    }
                }
            };
            match r {
                Ok(t) => return Ok((h, t)),
                Err(InstanceError::Unavailable(_)) if !retried && !self.current(&h) => {
                    lock(&self.resolved).retain(|_, (_, r)| !r.same(&h));
                    retried = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The registry's name for `reference` when it was resolved recently (the `model` label of a
    /// request that failed after resolving, e.g. in its load).
    pub fn known_name(&self, reference: &str, embeddings: bool) -> Option<String> {
        lock(&self.resolved)
            .get(&(reference.to_string(), embeddings))
            .map(|(_, h)| h.model.name.clone())
    }

    /// Known instances, optionally of one model (id or name).
    pub fn handles(&self) -> Vec<InstanceHandle> {
        lock(&self.instances).values().cloned().collect()
    }

    /// Instances matching a reference: an instance id, or a model id / name.
    pub fn find(&self, reference: &str) -> Vec<InstanceHandle> {
        lock(&self.instances)
            .values()
            .filter(|h| h.id == reference || h.model.id == reference || h.model.name == reference)
            .cloned()
            .collect()
    }

    async fn by_lease(&self, lease_id: &str) -> Option<InstanceHandle> {
        for h in self.handles() {
            if h.lease().await.is_some_and(|l| l.id == lease_id) {
                return Some(h);
            }
        }
        None
    }

    /// Follow the scheduler's events for our holder. When the stream breaks (scheduler restart),
    /// reconnect and re-attach every lease we hold; leases the scheduler cannot restore stop their
    /// instances.
    async fn watch_scheduler(self) {
        let holder = self.shared.cfg.holder.clone();
        let mut first = true;
        loop {
            let mut c = self.shared.scheduler.clone();
            let stream = c
                .watch_events(pb::WatchEventsRequest {
                    holder: holder.clone(),
                })
                .await;
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            if !first {
                self.reattach().await;
            }
            first = false;
            while let Some(Ok(e)) = stream.next().await {
                let Some(lease) = e.lease else { continue };
                let kind = pb::lease_event::Kind::try_from(e.kind)
                    .unwrap_or(pb::lease_event::Kind::Unspecified);
                match kind {
                    pb::lease_event::Kind::EvictionNotice => {
                        if let Some(h) = self.by_lease(&lease.id).await {
                            tracing::info!(instance = %h.id, "eviction notice: {}", e.detail);
                            h.evict(lease.id, lease.evict_by_ms.unwrap_or_else(now_ms))
                                .await;
                        }
                    }
                    pb::lease_event::Kind::EvictionWithdrawn => {
                        if let Some(h) = self.by_lease(&lease.id).await {
                            tracing::info!(instance = %h.id, "eviction notice withdrawn");
                            h.eviction_withdrawn(lease.id).await;
                        }
                    }
                    pb::lease_event::Kind::Revoked | pb::lease_event::Kind::Expired => {
                        if let Some(h) = self.by_lease(&lease.id).await {
                            h.lease_lost(lease.id, e.detail).await;
                        }
                    }
                    _ => {}
                }
            }
            tracing::warn!("lost the scheduler's event stream; reconnecting");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Present every lease we hold to the scheduler.
    pub async fn reattach(&self) {
        let mut leases = Vec::new();
        let mut owners = Vec::new();
        for h in self.handles() {
            if let Some(l) = h.lease().await {
                leases.push(pb::Lease {
                    id: l.id.clone(),
                    holder: self.shared.cfg.holder.clone(),
                    label: h.model.name.clone(),
                    gpu_index: l.gpu,
                    bytes: l.bytes,
                    priority: l.priority,
                    ttl_ms: self.shared.cfg.lease_ttl_ms,
                    pids: l.pids,
                    ..Default::default()
                });
                owners.push((l.id, h));
            }
        }
        if leases.is_empty() {
            return;
        }
        let mut c = self.shared.scheduler.clone();
        match c
            .reattach(pb::ReattachRequest {
                holder: self.shared.cfg.holder.clone(),
                leases,
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                tracing::info!(
                    confirmed = r.confirmed.len(),
                    restored = r.restored.len(),
                    lost = r.lost.len(),
                    "re-attached leases after a scheduler reconnect"
                );
                for lost in r.lost {
                    if let Some((_, h)) = owners.iter().find(|(id, _)| *id == lost.lease_id) {
                        h.lease_lost(lost.lease_id.clone(), lost.reason).await;
                    }
                }
                // Notices (and withdrawals) sent while the event stream was down are not
                // replayed: the confirmed leases carry the current state, so act on that.
                for l in r.confirmed.into_iter().chain(r.restored) {
                    if let Some((_, h)) = owners.iter().find(|(id, _)| *id == l.id) {
                        match l.evict_by_ms {
                            Some(by) => h.evict(l.id.clone(), by).await,
                            None => h.eviction_withdrawn(l.id.clone()).await,
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("re-attach failed: {}", e.message()),
        }
    }

    /// Unload everything (shutdown).
    pub async fn unload_all(&self) {
        let hs = self.handles();
        futures::future::join_all(hs.iter().map(|h| h.shutdown(1_000))).await;
    }
}

/// `field a → b` for each setting that differs.
fn settings_diff(have: &Effective, want: &Effective) -> String {
    let mut out = Vec::new();
    let mut cmp = |name: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{name} {a} → {b}"));
        }
    };
    cmp(
        "context",
        have.context.to_string(),
        want.context.to_string(),
    );
    cmp(
        "parallel",
        have.parallel.to_string(),
        want.parallel.to_string(),
    );
    cmp("cache_type", have.cache_type.into(), want.cache_type.into());
    cmp(
        "gpu_layers",
        format!("{:?}", have.gpu_layers),
        format!("{:?}", want.gpu_layers),
    );
    cmp(
        "embeddings",
        have.embeddings.to_string(),
        want.embeddings.to_string(),
    );
    cmp(
        "flash_attention",
        format!("{:?}", have.flash_attention),
        format!("{:?}", want.flash_attention),
    );
    cmp(
        "priority",
        have.priority.to_string(),
        want.priority.to_string(),
    );
    cmp(
        "gpu_index",
        format!("{:?}", have.gpu_index),
        format!("{:?}", want.gpu_index),
    );
    cmp(
        "idle_ttl_ms",
        have.idle_ttl_ms.to_string(),
        want.idle_ttl_ms.to_string(),
    );
    out.join(", ")
}
