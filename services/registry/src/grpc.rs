//! The gRPC edge of the registry: decode, call the [`Catalog`], encode. [`RegistryError`] becomes a
//! gRPC status here and nowhere else.

use std::path::PathBuf;
use std::pin::Pin;

use futures::Stream;
use securellm_proto::v1 as pb;
use securellm_proto::v1::model_registry_server::{ModelRegistry, ModelRegistryServer};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::catalog::{
    Catalog, ChangeKind, EstimateAnswer, ListFilter, RegistryError, ScanProgress,
};
use crate::estimate::{Breakdown, CacheType, EstimateInput};
use crate::record::{Format, ModelRecord, Role, Status as ModelStatus};

#[derive(Clone)]
pub struct RegistryService {
    catalog: Catalog,
}

impl RegistryService {
    pub fn new(catalog: Catalog) -> Self {
        Self { catalog }
    }

    pub fn into_server(self) -> ModelRegistryServer<Self> {
        ModelRegistryServer::new(self)
    }
}

fn status_of(e: RegistryError) -> Status {
    match &e {
        RegistryError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
        RegistryError::NotFound(m) => securellm_common::errors::status(
            securellm_common::errors::Reason::ModelNotFound,
            m.clone(),
        ),
        RegistryError::FailedPrecondition(m) => Status::failed_precondition(m.clone()),
        RegistryError::Internal(m) => Status::internal(m.clone()),
        RegistryError::Stopped => Status::unavailable(e.to_string()),
    }
}

fn format_to_pb(f: Format) -> pb::ModelFormat {
    match f {
        Format::Gguf => pb::ModelFormat::Gguf,
        Format::GgufSplit => pb::ModelFormat::GgufSplit,
        Format::Ollama => pb::ModelFormat::Ollama,
        Format::Safetensors => pb::ModelFormat::Safetensors,
    }
}

fn status_to_pb(s: ModelStatus) -> pb::ModelStatus {
    match s {
        ModelStatus::Ok => pb::ModelStatus::Ok,
        ModelStatus::Incomplete => pb::ModelStatus::Incomplete,
        ModelStatus::Error => pb::ModelStatus::Error,
    }
}

fn role_to_pb(r: Role) -> pb::ModelFileRole {
    match r {
        Role::Weights => pb::ModelFileRole::Weights,
        Role::Projector => pb::ModelFileRole::Projector,
        Role::Manifest => pb::ModelFileRole::Manifest,
        Role::Config => pb::ModelFileRole::Config,
        Role::Index => pb::ModelFileRole::Index,
        Role::Other => pb::ModelFileRole::Other,
    }
}

/// Proto view of a model.
pub fn model_to_pb(m: &ModelRecord) -> pb::Model {
    let x = &m.meta;
    pb::Model {
        id: m.id.clone(),
        name: m.name.clone(),
        aliases: m.aliases.clone(),
        format: format_to_pb(m.format) as i32,
        status: status_to_pb(m.status) as i32,
        status_reason: m.status_reason.clone(),
        path: m.path.display().to_string(),
        root: m.root.display().to_string(),
        files: m
            .files
            .iter()
            .map(|f| pb::ModelFile {
                path: f.path.display().to_string(),
                role: role_to_pb(f.role) as i32,
                size_bytes: f.size,
                mtime_ms: f.mtime_ms,
            })
            .collect(),
        size_bytes: m.size_bytes,
        mtime_ms: m.mtime_ms,
        first_seen_ms: m.first_seen_ms,
        parsed_at_ms: m.parsed_at_ms,
        architecture: x.architecture.clone().unwrap_or_default(),
        general_name: x.general_name.clone().unwrap_or_default(),
        size_label: x.size_label.clone().unwrap_or_default(),
        parameter_count: x.parameter_count,
        quantization: x.quantization.clone().unwrap_or_default(),
        file_type: x.file_type,
        gguf_version: x.gguf_version,
        context_length: x.context_length,
        block_count: x.block_count,
        embedding_length: x.embedding_length,
        feed_forward_length: x.feed_forward_length,
        feed_forward_length_per_layer: Vec::new(),
        head_count: x.head_count,
        head_count_per_layer: x.head_count_per_layer.clone(),
        head_count_kv: x.head_count_kv,
        head_count_kv_per_layer: x.head_count_kv_per_layer.clone(),
        key_length: x.key_length,
        value_length: x.value_length,
        sliding_window: x.sliding_window,
        expert_count: x.expert_count,
        expert_used_count: x.expert_used_count,
        vocab_size: x.vocab_size,
        chat_template_present: x.chat_template,
        tensor_count: x.tensor_count,
        tensor_bytes: x.tensor_bytes,
        split: m.split.as_ref().map(|s| pb::ModelSplit {
            count: s.count,
            present: s.present,
            missing: s.missing.clone(),
        }),
        ollama: m.ollama.as_ref().map(|o| pb::OllamaInfo {
            name_tag: o.name_tag.clone(),
            host: o.host.clone(),
            namespace: o.namespace.clone(),
            manifest_path: o.manifest_path.display().to_string(),
            model_digest: o.model_digest.clone(),
            projector_digests: o.projector_digests.clone(),
            other_layer_media_types: o.other_layer_media_types.clone(),
        }),
        has_projector: m.has_projector,
    }
}

fn cache_from_pb(v: i32) -> Result<CacheType, Status> {
    match pb::KvCacheType::try_from(v) {
        Ok(pb::KvCacheType::Unspecified | pb::KvCacheType::F16) => Ok(CacheType::F16),
        Ok(pb::KvCacheType::Q80) => Ok(CacheType::Q8_0),
        Ok(pb::KvCacheType::Q40) => Ok(CacheType::Q4_0),
        Err(_) => Err(Status::invalid_argument(format!(
            "invalid `cache_type`: {v} is not a known KV cache type (f16, q8_0, q4_0)"
        ))),
    }
}

fn cache_to_pb(c: CacheType) -> pb::KvCacheType {
    match c {
        CacheType::F16 => pb::KvCacheType::F16,
        CacheType::Q8_0 => pb::KvCacheType::Q80,
        CacheType::Q4_0 => pb::KvCacheType::Q40,
    }
}

/// Validate the configuration fields shared by Estimate and RecordMeasurement.
fn input_from_pb(
    model: &str,
    context: i64,
    parallel: i32,
    cache_type: i32,
    gpu_layers: Option<u32>,
) -> Result<EstimateInput, Status> {
    if model.trim().is_empty() {
        return Err(Status::invalid_argument(
            "invalid `model`: must not be empty",
        ));
    }
    if context <= 0 {
        return Err(Status::invalid_argument(format!(
            "invalid `context`: must be greater than 0, got {context}"
        )));
    }
    if parallel < 0 {
        return Err(Status::invalid_argument(format!(
            "invalid `parallel`: must not be negative, got {parallel}"
        )));
    }
    Ok(EstimateInput {
        context: context as u64,
        parallel: parallel.max(1) as u32,
        cache: cache_from_pb(cache_type)?,
        gpu_layers,
    })
}

/// Proto view of an estimate.
pub fn estimate_to_pb(a: &EstimateAnswer) -> pb::MemoryEstimate {
    let t = &a.terms;
    pb::MemoryEstimate {
        model_id: a.model_id.clone(),
        context: a.input.context as i64,
        parallel: a.input.parallel as i32,
        cache_type: cache_to_pb(a.input.cache) as i32,
        gpu_layers: t.gpu_layers,
        block_count: t.block_count,
        weights_gpu_bytes: t.weights_gpu,
        weights_host_bytes: t.weights_host,
        kv_cache_bytes: t.kv_cache,
        kv_cache_gpu_bytes: t.kv_cache_gpu,
        compute_buffer_bytes: t.compute_buffer,
        runtime_overhead_bytes: t.runtime_overhead,
        total_bytes: t.total(),
        gpu_bytes: t.gpu_bytes(),
        from_measurement: a.measured_ms.is_some(),
        measured_at_ms: a.measured_ms,
    }
}

fn progress_to_pb(p: &ScanProgress) -> pb::RescanProgress {
    pb::RescanProgress {
        files_seen: p.files_seen,
        files_parsed: p.files_parsed,
        files_unchanged: p.files_unchanged,
        files_failed: p.files_failed,
        files_total: p.files_total,
        models_added: p.added,
        models_changed: p.changed,
        models_removed: p.removed,
        current_path: p.current.clone(),
        failures: p
            .failures
            .iter()
            .map(|(path, reason)| pb::RescanFailure {
                path: path.clone(),
                reason: reason.clone(),
            })
            .collect(),
        elapsed_ms: p.elapsed_ms,
        done: p.done,
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn model_event(kind: pb::ModelEventKind, m: Option<&ModelRecord>, at_ms: u64) -> pb::ModelEvent {
    pb::ModelEvent {
        kind: kind as i32,
        model: m.map(model_to_pb),
        at_ms,
    }
}

#[tonic::async_trait]
impl ModelRegistry for RegistryService {
    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let r = request.into_inner();
        let format = match pb::ModelFormat::try_from(r.format) {
            Ok(pb::ModelFormat::Unspecified) => None,
            Ok(pb::ModelFormat::Gguf) => Some(Format::Gguf),
            Ok(pb::ModelFormat::GgufSplit) => Some(Format::GgufSplit),
            Ok(pb::ModelFormat::Ollama) => Some(Format::Ollama),
            Ok(pb::ModelFormat::Safetensors) => Some(Format::Safetensors),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "invalid `format`: {}",
                    r.format
                )));
            }
        };
        let status = match pb::ModelStatus::try_from(r.status) {
            Ok(pb::ModelStatus::Unspecified) => None,
            Ok(pb::ModelStatus::Ok) => Some(ModelStatus::Ok),
            Ok(pb::ModelStatus::Incomplete) => Some(ModelStatus::Incomplete),
            Ok(pb::ModelStatus::Error) => Some(ModelStatus::Error),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "invalid `status`: {}",
                    r.status
                )));
            }
        };
        let f = ListFilter {
            format,
            status,
            architecture: Some(r.architecture).filter(|s| !s.is_empty()),
            name_contains: Some(r.name_contains).filter(|s| !s.is_empty()),
        };
        let models = self.catalog.list(f).await.map_err(status_of)?;
        Ok(Response::new(pb::ListModelsResponse {
            models: models.iter().map(model_to_pb).collect(),
        }))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        let m = self
            .catalog
            .get(&request.into_inner().model)
            .await
            .map_err(status_of)?;
        Ok(Response::new(model_to_pb(&m)))
    }

    async fn estimate(
        &self,
        request: Request<pb::EstimateRequest>,
    ) -> Result<Response<pb::MemoryEstimate>, Status> {
        let r = request.into_inner();
        let span = tracing::info_span!(
            "registry.estimate",
            otel.name = "registry.estimate",
            gen_ai.request.model = %r.model,
            registry.model_id = tracing::field::Empty,
            registry.estimate.context = r.context,
            registry.estimate.parallel = r.parallel,
            registry.estimate.gpu_bytes = tracing::field::Empty,
            registry.estimate.total_bytes = tracing::field::Empty,
            registry.estimate.from_measurement = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let input = input_from_pb(&r.model, r.context, r.parallel, r.cache_type, r.gpu_layers)
            .inspect_err(|_| {
                span.record("error.type", "invalid_argument");
            })?;
        let a = self
            .catalog
            .estimate(&r.model, input)
            .instrument(span.clone())
            .await
            .map_err(|e| {
                span.record("error.type", e.kind());
                status_of(e)
            })?;
        let pb = estimate_to_pb(&a);
        span.record("registry.model_id", pb.model_id.as_str());
        span.record("registry.estimate.gpu_bytes", pb.gpu_bytes);
        span.record("registry.estimate.total_bytes", pb.total_bytes);
        span.record("registry.estimate.from_measurement", pb.from_measurement);
        crate::metrics::estimate_answered();
        Ok(Response::new(pb))
    }

    type RescanStream = BoxStream<pb::RescanProgress>;

    async fn rescan(
        &self,
        request: Request<pb::RescanRequest>,
    ) -> Result<Response<Self::RescanStream>, Status> {
        let r = request.into_inner();
        let roots: Vec<PathBuf> = r.roots.iter().map(PathBuf::from).collect();
        for root in &roots {
            if !self.catalog.roots().contains(root) {
                return Err(Status::invalid_argument(format!(
                    "invalid `roots`: {} is not a configured model root",
                    root.display()
                )));
            }
        }
        let (out, rx) = mpsc::channel::<Result<pb::RescanProgress, Status>>(64);
        let catalog = self.catalog.clone();
        tokio::spawn(async move {
            let (ptx, mut prx) = mpsc::channel::<ScanProgress>(64);
            let scan = catalog.rescan(roots, r.full, Some(ptx));
            tokio::pin!(scan);
            loop {
                tokio::select! {
                    res = &mut scan => {
                        while let Ok(p) = prx.try_recv() {
                            let _ = out.send(Ok(progress_to_pb(&p))).await;
                        }
                        if let Err(e) = res {
                            let _ = out.send(Err(status_of(e))).await;
                        }
                        return;
                    }
                    Some(p) = prx.recv() => {
                        let _ = out.send(Ok(progress_to_pb(&p))).await;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchModelsStream = BoxStream<pb::ModelEvent>;

    async fn watch_models(
        &self,
        request: Request<pb::WatchModelsRequest>,
    ) -> Result<Response<Self::WatchModelsStream>, Status> {
        let live = BroadcastStream::new(self.catalog.subscribe()).filter_map(|e| match e {
            Ok(c) => {
                let kind = match c.kind {
                    ChangeKind::Added => pb::ModelEventKind::Added,
                    ChangeKind::Changed => pb::ModelEventKind::Changed,
                    ChangeKind::Removed => pb::ModelEventKind::Removed,
                };
                Some(Ok(model_event(kind, Some(&c.model), c.at_ms)))
            }
            Err(_) => None,
        });
        if !request.into_inner().include_existing {
            return Ok(Response::new(Box::pin(live)));
        }
        let now = securellm_common::time::now_ms();
        let existing = self
            .catalog
            .list(ListFilter::default())
            .await
            .map_err(status_of)?;
        let mut first: Vec<Result<pb::ModelEvent, Status>> = existing
            .iter()
            .map(|m| Ok(model_event(pb::ModelEventKind::Added, Some(m), now)))
            .collect();
        first.push(Ok(model_event(pb::ModelEventKind::SnapshotEnd, None, now)));
        Ok(Response::new(Box::pin(
            tokio_stream::iter(first).chain(live),
        )))
    }

    async fn record_measurement(
        &self,
        request: Request<pb::RecordMeasurementRequest>,
    ) -> Result<Response<pb::RecordMeasurementResponse>, Status> {
        let r = request.into_inner();
        let input = input_from_pb(&r.model, r.context, r.parallel, r.cache_type, r.gpu_layers)?;
        let any = [
            r.weights_gpu_bytes,
            r.weights_host_bytes,
            r.kv_cache_bytes,
            r.kv_cache_gpu_bytes,
            r.compute_buffer_bytes,
            r.gpu_used_bytes,
        ]
        .iter()
        .any(Option::is_some);
        if !any {
            return Err(Status::invalid_argument(
                "invalid measurement: no measured term is present",
            ));
        }
        // Terms not measured come from the computed estimate.
        let computed = self
            .catalog
            .estimate(&r.model, input)
            .await
            .map_err(status_of)?
            .terms;
        let mut t = Breakdown {
            weights_gpu: r.weights_gpu_bytes.unwrap_or(computed.weights_gpu),
            weights_host: r.weights_host_bytes.unwrap_or(computed.weights_host),
            kv_cache: r.kv_cache_bytes.unwrap_or(computed.kv_cache),
            kv_cache_gpu: r.kv_cache_gpu_bytes.unwrap_or(computed.kv_cache_gpu),
            compute_buffer: r.compute_buffer_bytes.unwrap_or(computed.compute_buffer),
            ..computed
        };
        if let Some(used) = r.gpu_used_bytes {
            t.runtime_overhead =
                used.saturating_sub(t.weights_gpu + t.kv_cache_gpu + t.compute_buffer);
        }
        let (a, replaced) = self
            .catalog
            .record_measurement(&r.model, input, t, r.source)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::RecordMeasurementResponse {
            estimate: Some(estimate_to_pb(&a)),
            replaced,
        }))
    }
}
