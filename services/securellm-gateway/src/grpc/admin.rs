//! The `securellm.v1.GatewayAdmin` gRPC service: API keys and the audit log.
//!
//! Every call needs `authorization: Bearer <admin token>` metadata (or an admin-scoped JWT). The
//! token lives in a file (`<data-dir>/admin-token`, created with a random value and mode 0600 on
//! first start) and is compared in constant time. API keys never grant admin.
//!
//! A thin edge: each call decodes its message, calls the one implementation in
//! [`crate::management`] (shared with the HTTP management API), and encodes the answer.

use securellm_proto::v1 as pb;
use securellm_proto::v1::gateway_admin_server::{GatewayAdmin, GatewayAdminServer};
use tonic::{Request, Response, Status};

use crate::audit::TamperKind;
use crate::auth::keys::KeyRecord;
use crate::management::{
    AdminError, AuditQuery, Call, Caller, KeyChange, KeyLimits, Management, NewKeyRequest,
};
use crate::state::Shared;

pub use crate::management::PRIORITY_RANGE;

pub struct AdminService {
    state: Shared,
    ops: Management,
}

impl AdminService {
    pub fn new(state: Shared, ops: Management) -> GatewayAdminServer<Self> {
        GatewayAdminServer::new(Self { state, ops })
    }

    /// Who calls: the `authorization` metadata, the peer's address, the method for the audit row.
    fn caller<T>(r: &Request<T>, method: &str) -> Caller {
        let client = r
            .remote_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        Caller::new(
            r.metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
            client,
            format!("grpc:/securellm.v1.GatewayAdmin/{method}"),
        )
    }

    /// Authenticate an admin call (see [`Management::begin`]).
    fn begin<T>(&self, r: &Request<T>, method: &'static str) -> Result<Call, Status> {
        self.ops
            .begin(&Self::caller(r, method))
            .map_err(|e| e.status())
    }

    /// Audit an admin call, then give its outcome (see [`Management::done`]).
    async fn done<T>(
        &self,
        call: &Call,
        key_id: &str,
        out: Result<T, Status>,
    ) -> Result<T, Status> {
        self.ops
            .done(call, key_id, out.map_err(AdminError::Status))
            .await
            .map_err(|e| e.status())
    }
}

fn key_pb(k: &KeyRecord, now: u64) -> pb::ApiKey {
    let state = if k.revoked_ms.is_some() {
        pb::ApiKeyState::Revoked
    } else if !k.active(now) {
        pb::ApiKeyState::Expired
    } else {
        pb::ApiKeyState::Active
    };
    pb::ApiKey {
        id: k.id.clone(),
        name: k.name.clone(),
        secret_prefix: k.prefix.clone(),
        subject: k.subject.clone(),
        models: Some(pb::ApiKeyModelPatterns {
            patterns: k.models.clone(),
        }),
        limits: Some(pb::ApiKeyLimits {
            requests_per_minute: k.rpm,
            tokens_per_minute: k.tpm.map(u64::from),
            max_concurrent: k.concurrent,
            max_tokens: k.max_tokens,
        }),
        state: state as i32,
        created_at_ms: k.created_ms,
        expires_at_ms: k.expires_ms,
        revoked_at_ms: k.revoked_ms,
        last_used_at_ms: None,
        priority: k.priority,
    }
}

fn limits_of(l: pb::ApiKeyLimits) -> KeyLimits {
    KeyLimits {
        requests_per_minute: l.requests_per_minute,
        tokens_per_minute: l.tokens_per_minute,
        max_concurrent: l.max_concurrent,
        max_tokens: l.max_tokens,
    }
}

fn key_answer(k: Result<KeyRecord, AdminError>) -> Result<Response<pb::ApiKey>, Status> {
    k.map(|k| Response::new(key_pb(&k, securellm_common::time::now_ms())))
        .map_err(|e| e.status())
}

#[tonic::async_trait]
impl GatewayAdmin for AdminService {
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let who = Self::caller(&request, "CreateApiKey");
        let r = request.into_inner();
        let new = NewKeyRequest {
            name: r.name,
            subject: Some(r.subject),
            models: r.models.map(|m| m.patterns).unwrap_or_default(),
            limits: r.limits.map(limits_of),
            priority: r.priority,
            expires_at_ms: r.expires_at_ms,
        };
        let (secret, rec) = self
            .ops
            .create_key(who, new)
            .await
            .map_err(|e| e.status())?;
        Ok(Response::new(pb::CreateApiKeyResponse {
            secret,
            key: Some(key_pb(&rec, securellm_common::time::now_ms())),
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let who = Self::caller(&request, "ListApiKeys");
        let keys = self
            .ops
            .list_keys(who, request.into_inner().include_inactive)
            .await
            .map_err(|e| e.status())?;
        let now = securellm_common::time::now_ms();
        Ok(Response::new(pb::ListApiKeysResponse {
            keys: keys.iter().map(|k| key_pb(k, now)).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let who = Self::caller(&request, "RevokeApiKey");
        key_answer(self.ops.revoke_key(who, request.into_inner().id).await)
    }

    async fn update_api_key(
        &self,
        request: Request<pb::UpdateApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let who = Self::caller(&request, "UpdateApiKey");
        let r = request.into_inner();
        let change = KeyChange {
            name: r.name,
            models: r.models.map(|m| m.patterns),
            limits: r.limits.map(limits_of),
            priority: r.priority,
            clear_priority: r.clear_priority,
            expires_at_ms: r.expires_at_ms,
        };
        key_answer(self.ops.update_key(who, r.id, change).await)
    }

    async fn query_audit(
        &self,
        request: Request<pb::QueryAuditRequest>,
    ) -> Result<Response<pb::QueryAuditResponse>, Status> {
        let who = Self::caller(&request, "QueryAudit");
        let r = request.into_inner();
        let opt = |s: String| Some(s).filter(|s| !s.is_empty());
        let q = AuditQuery {
            since_ms: r.since_ms,
            until_ms: r.until_ms,
            subject: opt(r.subject),
            key_id: opt(r.key_id),
            model: opt(r.model),
            status_min: r.status_min,
            status_max: r.status_max,
            after_id: r.after_id,
            limit: Some(r.limit),
        };
        let page = self.ops.query_audit(who, q).await.map_err(|e| e.status())?;
        Ok(Response::new(pb::QueryAuditResponse {
            rows: page
                .rows
                .into_iter()
                .map(|r| {
                    let e = r.entry;
                    pb::AuditRow {
                        id: u64::try_from(r.id).unwrap_or(0),
                        time_ms: e.time_ms,
                        request_id: e.request_id,
                        subject: e.subject,
                        key_id: e.key_id,
                        client_addr: e.client_addr,
                        endpoint: e.endpoint,
                        model: e.model,
                        upstream: e.upstream,
                        status: u32::from(e.status),
                        error_code: e.error_code,
                        prompt_tokens: Some(e.prompt_tokens),
                        completion_tokens: Some(e.completion_tokens),
                        latency_us: e.latency_us,
                        redaction_count: e.redactions,
                        streamed: e.streamed,
                        prev_hash: r.prev_hash,
                        row_hash: r.row_hash,
                        trace_id: e.trace_id,
                    }
                })
                .collect(),
            truncated: page.truncated,
        }))
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let call = self.begin(&request, "VerifyAudit")?;
        let key_id = String::new();
        let out: Result<Response<pb::VerifyAuditResponse>, Status> = async {
            let v = self
                .state
                .audit
                .verify()
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            let head = self
                .state
                .audit
                .head()
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            let reason = match v.kind {
                Some(TamperKind::Edited) => pb::AuditTamperKind::Edited,
                Some(TamperKind::Inserted) => pb::AuditTamperKind::Inserted,
                Some(TamperKind::Deleted | TamperKind::Truncated) => pb::AuditTamperKind::Deleted,
                None => pb::AuditTamperKind::Unspecified,
            };
            Ok(Response::new(pb::VerifyAuditResponse {
                ok: v.ok,
                rows_checked: v.rows_checked,
                first_bad_row_id: v.first_bad_row_id.and_then(|i| u64::try_from(i).ok()),
                reason: reason as i32,
                detail: v.detail,
                head_row_id: u64::try_from(head.last_id).unwrap_or(0),
                head_hash: head.last_hash,
                chain_id: v.chain_id,
                chains: v.chains,
                checkpoints_checked: v.checkpoints_checked,
            }))
        }
        .await;
        self.done(&call, &key_id, out).await
    }
}
