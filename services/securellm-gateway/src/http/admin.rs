//! The HTTP management API under `/admin/v1/`, on the same listener as the OpenAI API, and its
//! OpenAPI 3.1 document (`GET /admin/v1/openapi.json`, generated from these handlers and types
//! with `utoipa`; it describes the OpenAI-compatible endpoints too).
//!
//! Every operation is one call into [`crate::management`] (the same functions the gRPC
//! `GatewayAdmin` service calls), so both doors authenticate (admin token or admin-scoped JWT,
//! `Authorization: Bearer …`), audit and fail alike. This file only turns HTTP into those calls
//! and their answers into JSON: errors in the OpenAI shape (`{"error": {"message", "type",
//! "param", "code"}}`), bad input (a body that is not the documented JSON, an unknown field, a bad
//! query) a 4xx naming what is wrong, never a 5xx.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{
    ConnectInfo, FromRequest, FromRequestParts, MatchedPath, Path, Query, Request, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use securellm_proto::v1 as pb;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, ResponseBuilder};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::error::ApiError;
use crate::management::{
    AdminError, AuditQuery, Caller, CatalogueEntry, KeyChange, KeyLimits, Management,
    NewKeyRequest, StackStatus,
};
use securellm_client::{instances, models};

/// The routes under `/admin/v1` (nested by [`super::router`]).
pub fn router<S: Clone + Send + Sync + 'static>(ops: Management) -> Router<S> {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/status", get(status))
        .route("/models", get(catalogue))
        .route("/instances", get(list_instances))
        .route("/instances/load", post(load))
        .route("/instances/unload", post(unload))
        .route("/keys", get(list_keys).post(create_key))
        .route("/keys/{id}", delete(revoke_key).patch(update_key))
        .route("/audit", get(query_audit))
        .with_state(ops)
}

/// An error body in the OpenAI shape.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    /// `invalid_request_error` (the caller's fault) or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

fn admin_error(e: AdminError) -> ApiError {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let kind = if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    let mut out = ApiError::new(status, kind, e.to_string()).code(e.code());
    if let AdminError::TooManyFailures { retry_after_s } = &e {
        out = out.header("retry-after", retry_after_s.to_string());
    }
    out
}

/// A body, query or path the extractor refused: the caller's 4xx (415 without a JSON content
/// type, 413 too large, 400 otherwise), in the OpenAI shape.
fn rejected(status: StatusCode, what: &str, text: String) -> ApiError {
    let status = if status.is_client_error() {
        status
    } else {
        StatusCode::BAD_REQUEST
    };
    ApiError::new(
        status,
        "invalid_request_error",
        format!("invalid {what}: {text}"),
    )
    .code("invalid_request")
}

/// A JSON object body of type `T`: 415 without a JSON content type, 400 for anything that is not
/// a JSON object or does not fit `T` (an unknown field, a wrong type), naming what is wrong.
fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            let v = v.trim().to_ascii_lowercase();
            v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
        });
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "the request body must be JSON (Content-Type: application/json)",
        )
        .code("invalid_request"));
    }
    let body = body.map_err(super::body_error)?;
    let bad = |m: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("invalid request body: {m}"),
        )
        .code("invalid_request")
    };
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| bad(format!("not JSON: {e}")))?;
    if !value.is_object() {
        return Err(bad("must be a JSON object".into()));
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

/// Input the edge could not decode: the caller is authenticated and the refusal audited first
/// (a wrong token is a 401 whatever the body), then `e` is the answer.
async fn refused(ops: &Management, who: &Caller, e: ApiError) -> Response {
    let why = AdminError::Rejected {
        http_status: e.status.as_u16(),
        message: e.message.clone(),
    };
    match ops.refuse(who, why).await {
        AdminError::Rejected { .. } => e.into_response(),
        other => admin_error(other).into_response(),
    }
}

fn answer<T: Serialize>(r: Result<T, AdminError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => admin_error(e).into_response(),
    }
}

/// Who calls: the bearer credential, the client address, the route (for the audit row).
pub struct Who(Caller);

impl<S: Send + Sync> FromRequestParts<S> for Who {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let client = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string())
            .unwrap_or_default();
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map_or("/admin/v1", MatchedPath::as_str);
        let endpoint = format!("{} {route}", parts.method);
        let authz = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        Ok(Who(Caller::new(authz, client, endpoint)))
    }
}

/// A management call's JSON object body of type `T`, with who calls. Input that cannot be
/// decoded is refused after the caller was authenticated and the refusal audited (see
/// [`refused`]), so handlers see only good input.
pub struct Input<T>(Caller, T);

impl<T: DeserializeOwned + Send> FromRequest<Management> for Input<T> {
    type Rejection = Response;

    async fn from_request(req: Request, ops: &Management) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let Ok(Who(who)) = Who::from_request_parts(&mut parts, ops).await;
        let headers = parts.headers.clone();
        let bytes = Bytes::from_request(Request::from_parts(parts, body), ops).await;
        match json_body::<T>(&headers, bytes) {
            Ok(v) => Ok(Input(who, v)),
            Err(e) => Err(refused(ops, &who, e).await),
        }
    }
}

/// A key id from the path (`/keys/{id}`), refused like [`Input`] when it cannot be decoded.
pub struct KeyId(String);

impl FromRequestParts<Management> for KeyId {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        ops: &Management,
    ) -> Result<Self, Self::Rejection> {
        match Path::<String>::from_request_parts(parts, ops).await {
            Ok(Path(id)) => Ok(KeyId(id)),
            Err(r) => {
                let Ok(Who(who)) = Who::from_request_parts(parts, ops).await;
                let e = rejected(r.status(), "key id", r.body_text());
                Err(refused(ops, &who, e).await)
            }
        }
    }
}

/// A query string of type `T`, refused like [`Input`] when it cannot be decoded.
pub struct QueryOf<T>(Caller, T);

impl<T: DeserializeOwned + Send> FromRequestParts<Management> for QueryOf<T> {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        ops: &Management,
    ) -> Result<Self, Self::Rejection> {
        let Ok(Who(who)) = Who::from_request_parts(parts, ops).await;
        match Query::<T>::from_request_parts(parts, ops).await {
            Ok(Query(q)) => Ok(QueryOf(who, q)),
            Err(r) => {
                let e = rejected(r.status(), "query", r.body_text());
                Err(refused(ops, &who, e).await)
            }
        }
    }
}

// ---- Views: what the JSON answers look like (the schema of the OpenAPI document). ----

/// A key's limits; `null` = no limit.
#[derive(Serialize, ToSchema)]
pub struct KeyLimitsView {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub max_tokens: Option<u32>,
}

/// An API key (never its secret; `secret_prefix` to recognise it).
#[derive(Serialize, ToSchema)]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub secret_prefix: String,
    pub subject: String,
    pub models: Vec<String>,
    pub limits: KeyLimitsView,
    /// `active`, `revoked` or `expired`.
    pub state: String,
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub revoked_at_ms: Option<u64>,
    pub priority: Option<i32>,
}

impl KeyView {
    fn of(k: &crate::auth::keys::KeyRecord, now: u64) -> Self {
        let state = if k.revoked_ms.is_some() {
            "revoked"
        } else if !k.active(now) {
            "expired"
        } else {
            "active"
        };
        Self {
            id: k.id.clone(),
            name: k.name.clone(),
            secret_prefix: k.prefix.clone(),
            subject: k.subject.clone(),
            models: k.models.clone(),
            limits: KeyLimitsView {
                requests_per_minute: k.rpm,
                tokens_per_minute: k.tpm,
                max_concurrent: k.concurrent,
                max_tokens: k.max_tokens,
            },
            state: state.into(),
            created_at_ms: k.created_ms,
            expires_at_ms: k.expires_ms,
            revoked_at_ms: k.revoked_ms,
            priority: k.priority,
        }
    }
}

/// A new key: its secret (shown this once) and its record.
#[derive(Serialize, ToSchema)]
pub struct CreatedKey {
    pub secret: String,
    pub key: KeyView,
}

#[derive(Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyView>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct KeyListQuery {
    /// Revoked and expired keys too.
    #[serde(default)]
    pub include_inactive: bool,
}

/// The members of an audit row as the log serializes it (`crate::audit::AuditRow`): name, JSON
/// type, meaning. The answer is that serialization itself, so this table describes it and the
/// schemathesis run checks that it does.
const AUDIT_ROW_MEMBERS: &[(&str, Type, &str)] = &[
    (
        "id",
        Type::Integer,
        "The row's place in its chain (1, 2, 3, ...)",
    ),
    ("time_ms", Type::Integer, "Unix milliseconds"),
    ("request_id", Type::String, ""),
    (
        "subject",
        Type::String,
        "Who: the key's subject, a JWT's `sub`, `admin`",
    ),
    (
        "key_id",
        Type::String,
        "The API key concerned (never the key)",
    ),
    ("client_addr", Type::String, ""),
    (
        "endpoint",
        Type::String,
        "e.g. `/v1/chat/completions`, `POST /admin/v1/keys`",
    ),
    ("model", Type::String, ""),
    ("upstream", Type::String, ""),
    (
        "status",
        Type::Integer,
        "The HTTP status the client got (499: it went away)",
    ),
    ("error_code", Type::String, "Empty on success"),
    ("prompt_tokens", Type::Integer, ""),
    ("completion_tokens", Type::Integer, ""),
    ("latency_us", Type::Integer, ""),
    (
        "redactions",
        Type::Integer,
        "Secrets redacted (never the secret)",
    ),
    ("streamed", Type::Boolean, ""),
    ("trace_id", Type::String, "W3C trace id, empty when none"),
    ("prev_hash", Type::String, "The previous row's hash (hex)"),
    ("row_hash", Type::String, "This row's hash (hex)"),
];

/// One audit row: who, what, the outcome, and its place in the hash chain. Never a key, never a
/// prompt. (More members may appear, e.g. `chain_id` on a shared log.)
pub struct AuditRowSchema;

impl utoipa::PartialSchema for AuditRowSchema {
    fn schema() -> RefOr<Schema> {
        let mut o = ObjectBuilder::new();
        for (name, ty, what) in AUDIT_ROW_MEMBERS {
            let member = ObjectBuilder::new()
                .schema_type(ty.clone())
                .description((!what.is_empty()).then_some(*what));
            o = o.property(*name, member).required(*name);
        }
        RefOr::T(Schema::Object(o.build()))
    }
}

impl ToSchema for AuditRowSchema {}

#[derive(Serialize, ToSchema)]
pub struct AuditPageView {
    #[schema(value_type = Vec<AuditRowSchema>)]
    pub rows: Vec<crate::audit::AuditRow>,
    /// More rows match (page on with `after_id` = the last row's id).
    pub truncated: bool,
}

#[derive(Serialize, ToSchema)]
pub struct ServiceView {
    pub name: String,
    pub address: String,
    pub up: bool,
    pub latency_ms: Option<f64>,
    pub error: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct GpuView {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub simulated: bool,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub leased_bytes: u64,
    pub foreign_bytes: u64,
    pub reserve_bytes: u64,
    pub grantable_bytes: u64,
    pub overcommitted: bool,
}

#[derive(Serialize, ToSchema)]
pub struct LeaseView {
    pub id: String,
    pub holder: String,
    /// What the memory is for (the model).
    pub label: String,
    pub gpu_index: u32,
    pub bytes: u64,
    pub priority: i32,
    pub idle: bool,
    pub granted_at_ms: u64,
    pub expires_at_ms: u64,
    pub last_used_ms: u64,
    /// Set while an eviction notice is pending.
    pub evict_by_ms: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct QueuedView {
    pub ticket: String,
    pub holder: String,
    pub label: String,
    pub bytes: u64,
    pub priority: i32,
    pub gpu_index: Option<u32>,
    pub position: u32,
    pub queued_at_ms: u64,
    pub wait_until_ms: u64,
}

#[derive(Serialize, ToSchema)]
pub struct InstanceView {
    pub id: String,
    pub model_id: String,
    pub model_name: String,
    /// `unloaded`, `leasing`, `starting`, `ready`, `busy`, `draining`, `stopped` or `failed`.
    pub state: String,
    pub gpu_index: Option<u32>,
    pub lease_bytes: u64,
    pub estimated_bytes: u64,
    pub measured_bytes: Option<u64>,
    pub pid: u32,
    pub in_flight: u32,
    pub waiting: u32,
    pub requests_total: u64,
    pub last_used_ms: u64,
    pub started_at_ms: Option<u64>,
    pub ready_at_ms: Option<u64>,
    pub crash_count: u32,
    pub last_error: String,
}

impl From<pb::BackendInstance> for InstanceView {
    fn from(i: pb::BackendInstance) -> Self {
        Self {
            state: instances::state(i.state).into(),
            id: i.id,
            model_id: i.model_id,
            model_name: i.model_name,
            gpu_index: i.gpu_index,
            lease_bytes: i.lease_bytes,
            estimated_bytes: i.estimated_bytes,
            measured_bytes: i.measured_bytes,
            pid: i.pid,
            in_flight: i.in_flight,
            waiting: i.waiting,
            requests_total: i.requests_total,
            last_used_ms: i.last_used_ms,
            started_at_ms: i.started_at_ms,
            ready_at_ms: i.ready_at_ms,
            crash_count: i.crash_count,
            last_error: i.last_error,
        }
    }
}

/// The stack at a glance. A part whose service did not answer is `null`, with the reason under
/// `unknown`.
#[derive(Serialize, ToSchema)]
pub struct StatusView {
    /// Every internal service answered.
    pub up: bool,
    pub services: Vec<ServiceView>,
    /// `nvml` or `simulated`.
    pub inventory: Option<String>,
    pub gpus: Option<Vec<GpuView>>,
    pub leases: Option<Vec<LeaseView>>,
    /// Lease requests waiting for memory, in queue order.
    pub queue: Option<Vec<QueuedView>>,
    /// Loaded (and recently unloaded) models.
    pub instances: Option<Vec<InstanceView>>,
    /// Models in the registry's catalogue.
    pub models_found: Option<u64>,
    pub unknown: BTreeMap<String, String>,
}

fn status_view(s: StackStatus) -> StatusView {
    let mut unknown = BTreeMap::new();
    let services: Vec<ServiceView> = s
        .services
        .into_iter()
        .map(|v| ServiceView {
            name: v.name.into(),
            address: v.address,
            up: v.up.is_ok(),
            latency_ms: v.up.as_ref().ok().map(|d| d.as_secs_f64() * 1000.0),
            error: v.up.err(),
        })
        .collect();
    let (inventory, gpus, leases, queue) = match s.scheduler {
        Ok(st) => (
            Some(st.inventory),
            Some(
                st.gpus
                    .into_iter()
                    .map(|g| GpuView {
                        index: g.index,
                        uuid: g.uuid,
                        name: g.name,
                        simulated: g.simulated,
                        total_bytes: g.total_bytes,
                        used_bytes: g.used_bytes,
                        free_bytes: g.free_bytes,
                        leased_bytes: g.leased_bytes,
                        foreign_bytes: g.foreign_bytes,
                        reserve_bytes: g.reserve_bytes,
                        grantable_bytes: g.grantable_bytes,
                        overcommitted: g.overcommitted,
                    })
                    .collect(),
            ),
            Some(
                st.leases
                    .into_iter()
                    .map(|l| LeaseView {
                        id: l.id,
                        holder: l.holder,
                        label: l.label,
                        gpu_index: l.gpu_index,
                        bytes: l.bytes,
                        priority: l.priority,
                        idle: l.idle,
                        granted_at_ms: l.granted_at_ms,
                        expires_at_ms: l.expires_at_ms,
                        last_used_ms: l.last_used_ms,
                        evict_by_ms: l.evict_by_ms,
                    })
                    .collect(),
            ),
            Some(
                st.queue
                    .into_iter()
                    .map(|q| QueuedView {
                        ticket: q.ticket,
                        holder: q.holder,
                        label: q.label,
                        bytes: q.bytes,
                        priority: q.priority,
                        gpu_index: q.gpu_index,
                        position: q.position,
                        queued_at_ms: q.queued_at_ms,
                        wait_until_ms: q.wait_until_ms,
                    })
                    .collect(),
            ),
        ),
        Err(e) => {
            unknown.insert("gpus".to_string(), e);
            (None, None, None, None)
        }
    };
    let instances = match s.instances {
        Ok(i) => Some(i.into_iter().map(InstanceView::from).collect()),
        Err(e) => {
            unknown.insert("instances".to_string(), e);
            None
        }
    };
    let models_found = match s.models_found {
        Ok(n) => Some(n as u64),
        Err(e) => {
            unknown.insert("models".to_string(), e);
            None
        }
    };
    StatusView {
        up: services.iter().all(|s| s.up),
        services,
        inventory,
        gpus,
        leases,
        queue,
        instances,
        models_found,
        unknown,
    }
}

/// What a model needs in one configuration (bytes); `gpu_bytes` is what a lease must cover.
#[derive(Serialize, ToSchema)]
pub struct EstimateView {
    pub context: i64,
    pub parallel: i32,
    pub gpu_layers: u32,
    pub gpu_bytes: u64,
    pub total_bytes: u64,
    pub weights_gpu_bytes: u64,
    pub weights_host_bytes: u64,
    pub kv_cache_bytes: u64,
    pub compute_buffer_bytes: u64,
    pub runtime_overhead_bytes: u64,
    /// From a recorded measurement rather than computed.
    pub from_measurement: bool,
}

/// A model the registry found, with its estimate at 4096 tokens of context (one slot, f16 KV
/// cache, every layer on the GPU); `estimate` is `null` when the registry cannot estimate it.
#[derive(Serialize, ToSchema)]
pub struct ModelView {
    pub id: String,
    pub name: String,
    pub aliases: Vec<String>,
    /// `gguf`, `gguf-split`, `ollama` or `safetensors`.
    pub format: String,
    /// `ok`, `incomplete` or `error`.
    pub status: String,
    pub status_reason: String,
    pub path: String,
    pub size_bytes: u64,
    pub architecture: String,
    pub parameter_count: Option<u64>,
    pub quantization: String,
    pub context_length: Option<u64>,
    pub estimate: Option<EstimateView>,
}

impl From<CatalogueEntry> for ModelView {
    fn from(c: CatalogueEntry) -> Self {
        let m = c.model;
        Self {
            format: models::format_name(m.format).into(),
            status: models::status_word(m.status).into(),
            id: m.id,
            name: m.name,
            aliases: m.aliases,
            status_reason: m.status_reason,
            path: m.path,
            size_bytes: m.size_bytes,
            architecture: m.architecture,
            parameter_count: m.parameter_count,
            quantization: m.quantization,
            context_length: m.context_length,
            estimate: c.estimate.map(|e| EstimateView {
                context: e.context,
                parallel: e.parallel,
                gpu_layers: e.gpu_layers,
                gpu_bytes: e.gpu_bytes,
                total_bytes: e.total_bytes,
                weights_gpu_bytes: e.weights_gpu_bytes,
                weights_host_bytes: e.weights_host_bytes,
                kv_cache_bytes: e.kv_cache_bytes,
                compute_buffer_bytes: e.compute_buffer_bytes,
                runtime_overhead_bytes: e.runtime_overhead_bytes,
                from_measurement: e.from_measurement,
            }),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ModelList {
    pub models: Vec<ModelView>,
}

#[derive(Serialize, ToSchema)]
pub struct InstanceList {
    pub instances: Vec<InstanceView>,
}

/// The model a load or unload is for.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelRequest {
    /// Registry id, alias or name.
    pub model: String,
}

#[derive(Serialize, ToSchema)]
pub struct UnloadView {
    /// False when the model was not loaded (nothing to do).
    pub was_loaded: bool,
    pub instance: Option<InstanceView>,
}

// ---- Handlers ----

/// The stack at a glance: each service, the GPUs, the leases and who holds them, the queue, the
/// loaded models.
#[utoipa::path(get, path = "/admin/v1/status", tag = "admin",
    responses((status = 200, description = "The stack's state", body = StatusView)))]
async fn status(State(ops): State<Management>, Who(who): Who) -> Response {
    answer(ops.status(who).await.map(status_view))
}

/// The registry's catalogue, each model with its memory estimate.
#[utoipa::path(get, path = "/admin/v1/models", tag = "admin",
    responses((status = 200, description = "The catalogue", body = ModelList)))]
async fn catalogue(State(ops): State<Management>, Who(who): Who) -> Response {
    answer(ops.models(who).await.map(|ms| ModelList {
        models: ms.into_iter().map(ModelView::from).collect(),
    }))
}

/// The backend manager's instances (what `securellm ps` shows).
#[utoipa::path(get, path = "/admin/v1/instances", tag = "admin",
    responses((status = 200, description = "The instances", body = InstanceList)))]
async fn list_instances(State(ops): State<Management>, Who(who): Who) -> Response {
    answer(ops.instances(who).await.map(|is| InstanceList {
        instances: is.into_iter().map(InstanceView::from).collect(),
    }))
}

/// Load a model with its configured settings; answers when it is ready.
#[utoipa::path(post, path = "/admin/v1/instances/load", tag = "admin",
    request_body = ModelRequest,
    responses((status = 200, description = "The instance, ready", body = InstanceView)))]
async fn load(State(ops): State<Management>, Input(who, r): Input<ModelRequest>) -> Response {
    answer(ops.load(who, r.model).await.map(InstanceView::from))
}

/// Unload a model (requests in flight drain first).
#[utoipa::path(post, path = "/admin/v1/instances/unload", tag = "admin",
    request_body = ModelRequest,
    responses((status = 200, description = "The instance after the unload", body = UnloadView)))]
async fn unload(State(ops): State<Management>, Input(who, r): Input<ModelRequest>) -> Response {
    answer(ops.unload(who, r.model).await.map(|u| UnloadView {
        was_loaded: u.was_loaded,
        instance: u.instance.map(InstanceView::from),
    }))
}

/// The API keys, newest first.
#[utoipa::path(get, path = "/admin/v1/keys", tag = "keys", params(KeyListQuery),
    responses((status = 200, description = "The keys", body = KeyList)))]
async fn list_keys(
    State(ops): State<Management>,
    QueryOf(who, q): QueryOf<KeyListQuery>,
) -> Response {
    let now = securellm_common::time::now_ms();
    answer(
        ops.list_keys(who, q.include_inactive)
            .await
            .map(|ks| KeyList {
                keys: ks.iter().map(|k| KeyView::of(k, now)).collect(),
            }),
    )
}

/// Create an API key; the answer holds its secret, shown only this once.
#[utoipa::path(post, path = "/admin/v1/keys", tag = "keys", request_body = NewKeyRequest,
    responses((status = 200, description = "The new key and its secret", body = CreatedKey)))]
async fn create_key(
    State(ops): State<Management>,
    Input(who, r): Input<NewKeyRequest>,
) -> Response {
    answer(ops.create_key(who, r).await.map(|(secret, k)| CreatedKey {
        secret,
        key: KeyView::of(&k, securellm_common::time::now_ms()),
    }))
}

/// Change a key's name, model patterns, limits, priority or expiry (effective for its next
/// request).
#[utoipa::path(patch, path = "/admin/v1/keys/{id}", tag = "keys", request_body = KeyChange,
    params(("id" = String, Path, description = "The key's id")),
    responses((status = 200, description = "The key after the change", body = KeyView)))]
async fn update_key(
    State(ops): State<Management>,
    KeyId(id): KeyId,
    Input(who, change): Input<KeyChange>,
) -> Response {
    let now = securellm_common::time::now_ms();
    answer(
        ops.update_key(who, id, change)
            .await
            .map(|k| KeyView::of(&k, now)),
    )
}

/// Revoke a key (effective for its next request).
#[utoipa::path(delete, path = "/admin/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "The key's id")),
    responses((status = 200, description = "The key, revoked", body = KeyView)))]
async fn revoke_key(State(ops): State<Management>, KeyId(id): KeyId, Who(who): Who) -> Response {
    let now = securellm_common::time::now_ms();
    answer(ops.revoke_key(who, id).await.map(|k| KeyView::of(&k, now)))
}

/// Rows of the audit log, oldest first.
#[utoipa::path(get, path = "/admin/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, description = "The matching rows", body = AuditPageView)))]
async fn query_audit(
    State(ops): State<Management>,
    QueryOf(who, q): QueryOf<AuditQuery>,
) -> Response {
    answer(ops.query_audit(who, q).await.map(|p| AuditPageView {
        truncated: p.truncated,
        rows: p.rows,
    }))
}

/// This document.
#[utoipa::path(get, path = "/admin/v1/openapi.json", tag = "admin", security(),
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi() -> Response {
    Json(ApiDoc::openapi()).into_response()
}

// ---- The OpenAI-compatible endpoints, described (served by `super`). ----

/// An OpenAI request or answer body (validated against OpenAI's schema by the gateway; see the
/// OpenAI API reference).
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(value_type = Object)]
pub struct OpenAiObject(serde_json::Map<String, serde_json::Value>);

/// Chat completion (`stream: true` answers `text/event-stream`, ending `data: [DONE]`).
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    security(("api_key" = [])), request_body = OpenAiObject,
    responses(
        (status = 200, description = "The completion (JSON), or its events (SSE)",
         content((OpenAiObject = "application/json"), (String = "text/event-stream")))))]
#[allow(dead_code)]
fn chat_completions() {}

/// Text completion (`stream: true` answers `text/event-stream`).
#[utoipa::path(post, path = "/v1/completions", tag = "openai",
    security(("api_key" = [])), request_body = OpenAiObject,
    responses(
        (status = 200, description = "The completion (JSON), or its events (SSE)",
         content((OpenAiObject = "application/json"), (String = "text/event-stream")))))]
#[allow(dead_code)]
fn completions() {}

/// Embeddings.
#[utoipa::path(post, path = "/v1/embeddings", tag = "openai",
    security(("api_key" = [])), request_body = OpenAiObject,
    responses((status = 200, description = "The embeddings", body = OpenAiObject)))]
#[allow(dead_code)]
fn embeddings() {}

/// The models the key may use.
#[utoipa::path(get, path = "/v1/models", tag = "openai", security(("api_key" = [])),
    responses((status = 200, description = "The model list", body = OpenAiObject)))]
#[allow(dead_code)]
fn list_models() {}

/// Liveness.
#[utoipa::path(get, path = "/health", tag = "service", security(),
    responses((status = 200, description = "Up", body = OpenAiObject)))]
#[allow(dead_code)]
fn health() {}

/// Readiness: the registry and the backend manager answer (503 naming what does not).
#[utoipa::path(get, path = "/ready", tag = "service", security(),
    responses((status = 200, description = "Ready", body = OpenAiObject)))]
#[allow(dead_code)]
fn ready() {}

/// Adds the security schemes, the admin token as the default requirement, and the error
/// answers every operation may give (in the OpenAI shape).
struct Common;

impl utoipa::Modify for Common {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let bearer = |what: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(what.to_string()))
                    .build(),
            )
        };
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            bearer(
                "The admin token (<data-dir>/admin-token), or a JWT whose `scope` includes `admin`",
            ),
        );
        components.add_security_scheme("api_key", bearer("An API key (sk-slm-…) or a JWT"));
        let error = |what: &str| {
            ResponseBuilder::new()
                .description(what)
                .content(
                    "application/json",
                    utoipa::openapi::ContentBuilder::new()
                        .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                            "ErrorBody",
                        ))))
                        .build(),
                )
                .build()
        };
        let errors = [
            ("400", "Bad input (the field named)"),
            ("401", "No or a wrong credential"),
            ("403", "A credential without the scope"),
            ("404", "Unknown key, model or endpoint"),
            ("408", "The request body did not arrive in time"),
            ("409", "Conflict with the current state"),
            ("413", "The request body is too large"),
            ("415", "The body is not JSON (Content-Type)"),
            ("422", "Unprocessable"),
            ("429", "Too many requests or failed authentications"),
            ("500", "The gateway's own failure"),
            ("502", "Another service failed"),
            ("503", "Another service is unreachable, or no GPU memory"),
            ("504", "Another service was too slow"),
        ];
        for item in doc.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.patch,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                for (code, what) in errors {
                    op.responses
                        .responses
                        .entry(code.to_string())
                        .or_insert_with(|| RefOr::T(error(what)));
                }
                if op.security.is_none() {
                    op.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
                        "admin_token",
                        Vec::<String>::new(),
                    )]);
                }
            }
        }
    }
}

/// The OpenAPI 3.1 document of the gateway's HTTP API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "SecureLLM gateway",
        description = "The management API (`/admin/v1`, admin token or admin-scoped JWT) and the OpenAI-compatible API (`/v1`, API key or JWT) of securellm-gateway. Errors: `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`."
    ),
    paths(
        status, catalogue, list_instances, load, unload, list_keys, create_key, update_key,
        revoke_key, query_audit, openapi, chat_completions, completions, embeddings, list_models,
        health, ready
    ),
    components(schemas(ErrorBody, ErrorDetail, KeyLimits)),
    modifiers(&Common)
)]
pub struct ApiDoc;
