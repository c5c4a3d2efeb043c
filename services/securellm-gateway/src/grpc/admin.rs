//! The `securellm.v1.GatewayAdmin` gRPC service: API keys and the audit log.
//!
//! Every call needs `authorization: Bearer <admin token>` metadata. The token lives in a file
//! (`<data-dir>/admin-token`, created with a random value and mode 0600 on first start) and is
//! compared in constant time. API keys never grant admin.

use securellm_proto::v1 as pb;
use securellm_proto::v1::gateway_admin_server::{GatewayAdmin, GatewayAdminServer};
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};

use crate::audit::{AuditEntry, AuditFilter, TamperKind};
use crate::auth::keys::{KeyError, KeyRecord, KeyUpdate, NewKey};
use crate::state::Shared;
use secrecy::{ExposeSecret, SecretString};

pub struct AdminService {
    state: Shared,
    /// Never printed, wiped when dropped (`secrecy`); shared by the per-request copies.
    token: std::sync::Arc<SecretString>,
}

impl AdminService {
    pub fn new(state: Shared, token: SecretString) -> GatewayAdminServer<Self> {
        GatewayAdminServer::new(Self {
            state,
            token: std::sync::Arc::new(token),
        })
    }

    /// Authenticate an admin call: the admin token, or a JWT whose `scope` includes `admin`.
    /// A refusal is audited and counts against the client address's failed-authentication limit.
    fn begin<T>(&self, r: &Request<T>, method: &'static str) -> Result<AdminCall, Status> {
        let client = r
            .remote_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let mut call = AdminCall {
            method,
            subject: String::new(),
            client,
            started: std::time::Instant::now(),
        };
        let given = r
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .trim();
        let refused = if given.is_empty() {
            Some(Status::unauthenticated(
                "an admin token is required (authorization: Bearer <admin token>)",
            ))
        } else if !self.token.expose_secret().is_empty()
            && bool::from(
                given
                    .as_bytes()
                    .ct_eq(self.token.expose_secret().as_bytes()),
            )
        {
            call.subject = "admin".into();
            None
        } else {
            match &self.state.jwt {
                Some(v) if crate::auth::jwt::JwtVerifier::looks_like_jwt(given) => {
                    match v.verify(given) {
                        Ok(k) if k.admin => {
                            call.subject = k.subject;
                            None
                        }
                        Ok(k) => {
                            call.subject = k.subject;
                            Some(Status::permission_denied(
                                "this token's scope does not include `admin`",
                            ))
                        }
                        Err(why) => Some(Status::unauthenticated(format!(
                            "invalid bearer token: {why}"
                        ))),
                    }
                }
                _ => Some(Status::unauthenticated("invalid admin token")),
            }
        };
        match refused {
            None => Ok(call),
            // Failed attempts from an address past its limit: refused without saying why.
            Some(_) if let Some(wait) = self.state.limits.auth_blocked(&call.client) => {
                let mut st = Status::resource_exhausted("too many failed authentication attempts");
                if let Ok(v) = wait.as_secs().max(1).to_string().parse() {
                    st.metadata_mut().insert("retry-after", v);
                }
                self.finish(&call, "", Err(&st));
                Err(st)
            }
            Some(st) => {
                if st.code() == tonic::Code::Unauthenticated {
                    self.state.limits.auth_failed(&call.client);
                }
                self.finish(&call, "", Err(&st));
                Err(st)
            }
        }
    }

    /// Audit an admin call, then give its outcome. With `audit_mode = "sync"` a successful call
    /// waits for its row's commit (`UNAVAILABLE` if the row cannot be committed).
    async fn done<T>(
        &self,
        call: &AdminCall,
        key_id: &str,
        out: Result<T, Status>,
    ) -> Result<T, Status> {
        if self.state.audit_sync && out.is_ok() {
            let entry = self.entry(call, key_id, Ok(()));
            self.state.audit.append(entry).await.map_err(|e| {
                Status::unavailable(format!("the audit row could not be committed: {e}"))
            })?;
            return out;
        }
        self.finish(call, key_id, out.as_ref().map(|_| ()));
        out
    }

    /// Queue the audit row of an admin call. A refusal before any caller was known (no valid
    /// token) is aggregated per address and window, as for the API.
    fn finish(&self, call: &AdminCall, key_id: &str, outcome: Result<(), &Status>) {
        let anonymous = outcome.is_err() && call.subject.is_empty();
        let entry = self.entry(call, key_id, outcome);
        if anonymous {
            self.state.audit.append_auth_failure(entry);
        } else {
            self.state.audit.append_nowait(entry);
        }
    }

    /// The audit row of an admin call (the key concerned, never a secret).
    fn entry(&self, call: &AdminCall, key_id: &str, outcome: Result<(), &Status>) -> AuditEntry {
        // The one table (`securellm_common::errors`): the row says what the HTTP API would.
        let (status, code) = match outcome {
            Ok(()) => (200, String::new()),
            Err(s) => (
                securellm_common::errors::http_status(s.code()),
                format!("{:?}", s.code()),
            ),
        };
        AuditEntry {
            time_ms: securellm_common::time::now_ms(),
            request_id: String::new(),
            subject: call.subject.clone(),
            key_id: key_id.to_string(),
            client_addr: call.client.clone(),
            endpoint: format!("grpc:/securellm.v1.GatewayAdmin/{}", call.method),
            upstream: "admin".into(),
            status,
            error_code: code,
            latency_us: call.started.elapsed().as_micros() as u64,
            ..AuditEntry::default()
        }
    }
}

/// An authenticated admin call in progress.
struct AdminCall {
    method: &'static str,
    subject: String,
    client: String,
    started: std::time::Instant,
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

/// The range a key's priority may take.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;

fn check_priority(p: Option<i32>) -> Result<Option<i32>, Status> {
    match p {
        Some(v) if !PRIORITY_RANGE.contains(&v) => Err(Status::invalid_argument(format!(
            "invalid `priority`: {v} is outside {}..={}",
            PRIORITY_RANGE.start(),
            PRIORITY_RANGE.end()
        ))),
        p => Ok(p),
    }
}

fn key_status(e: KeyError) -> Status {
    match e {
        KeyError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        KeyError::NotFound(_) => Status::not_found(e.to_string()),
        KeyError::Revoked(_) => Status::failed_precondition(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

impl AdminService {
    /// A copy that can outlive the request (for work that must finish).
    fn detached(&self) -> Self {
        Self {
            state: self.state.clone(),
            token: self.token.clone(),
        }
    }

    async fn create_api_key_inner(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let call = self.begin(&request, "CreateApiKey")?;
        let key_id = String::new();
        let out: Result<Response<pb::CreateApiKeyResponse>, Status> = async {
            let r = request.into_inner();
            let now = securellm_common::time::now_ms();
            if r.expires_at_ms.is_some_and(|e| e <= now) {
                return Err(Status::invalid_argument(
                    "invalid `expires_at_ms`: in the past",
                ));
            }
            let limits = r.limits.unwrap_or_default();
            let (secret, rec) = self
                .state
                .keys
                .create(NewKey {
                    name: r.name,
                    subject: Some(r.subject).filter(|s| !s.is_empty()),
                    models: r.models.map(|m| m.patterns).unwrap_or_default(),
                    rpm: limits.requests_per_minute,
                    tpm: limits
                        .tokens_per_minute
                        .map(|t| u32::try_from(t).unwrap_or(u32::MAX)),
                    concurrent: limits.max_concurrent,
                    max_tokens: limits.max_tokens,
                    priority: check_priority(r.priority)?,
                    expires_ms: r.expires_at_ms,
                })
                .await
                .map_err(key_status)?;
            Ok(Response::new(pb::CreateApiKeyResponse {
                secret,
                key: Some(key_pb(&rec, now)),
            }))
        }
        .await;
        let key_id = out
            .as_ref()
            .ok()
            .and_then(|r| r.get_ref().key.as_ref())
            .map_or(key_id, |k| k.id.clone());
        self.done(&call, &key_id, out).await
    }

    async fn revoke_api_key_inner(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let call = self.begin(&request, "RevokeApiKey")?;
        let key_id = request.get_ref().id.clone();
        let out: Result<Response<pb::ApiKey>, Status> = async {
            let rec = self
                .state
                .keys
                .revoke(&request.into_inner().id)
                .await
                .map_err(key_status)?;
            Ok(Response::new(key_pb(
                &rec,
                securellm_common::time::now_ms(),
            )))
        }
        .await;
        self.done(&call, &key_id, out).await
    }

    async fn update_api_key_inner(
        &self,
        request: Request<pb::UpdateApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let call = self.begin(&request, "UpdateApiKey")?;
        let key_id = request.get_ref().id.clone();
        let out: Result<Response<pb::ApiKey>, Status> = async {
            let r = request.into_inner();
            let tpm = |t: Option<u64>| t.map(|t| u32::try_from(t).unwrap_or(u32::MAX));
            // Present limits replace all of them, `max_tokens` included (absent = none).
            let max_tokens = r.limits.as_ref().map(|l| l.max_tokens.unwrap_or(0));
            let priority = match (r.priority, r.clear_priority) {
                (Some(_), true) => {
                    return Err(Status::invalid_argument(
                        "invalid `clear_priority`: give either `priority` or `clear_priority`",
                    ));
                }
                (Some(p), false) => Some(check_priority(Some(p))?),
                (None, true) => Some(None),
                (None, false) => None,
            };
            let rec = self
                .state
                .keys
                .update(
                    &r.id,
                    KeyUpdate {
                        name: r.name,
                        models: r.models.map(|m| m.patterns),
                        limits: r.limits.map(|l| {
                            (
                                l.requests_per_minute,
                                tpm(l.tokens_per_minute),
                                l.max_concurrent,
                            )
                        }),
                        max_tokens,
                        priority,
                        expires_ms: r.expires_at_ms,
                    },
                )
                .await
                .map_err(key_status)?;
            Ok(Response::new(key_pb(
                &rec,
                securellm_common::time::now_ms(),
            )))
        }
        .await;
        self.done(&call, &key_id, out).await
    }
}

/// Run a key change to completion (change, reload, audit row) even if the caller cancels
/// meanwhile: a half-done change would leave the key table and its in-memory copy apart.
async fn to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, Status>> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(work)
        .await
        .unwrap_or_else(|e| Err(Status::internal(format!("admin call failed: {e}"))))
}

#[tonic::async_trait]
impl GatewayAdmin for AdminService {
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let me = self.detached();
        to_completion(async move { me.create_api_key_inner(request).await }).await
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let call = self.begin(&request, "ListApiKeys")?;
        let key_id = String::new();
        let out: Result<Response<pb::ListApiKeysResponse>, Status> = async {
            let all = request.into_inner().include_inactive;
            let now = securellm_common::time::now_ms();
            let mut keys: Vec<pb::ApiKey> = self
                .state
                .keys
                .list()
                .iter()
                .filter(|k| all || k.active(now))
                .map(|k| key_pb(k, now))
                .collect();
            keys.reverse();
            Ok(Response::new(pb::ListApiKeysResponse { keys }))
        }
        .await;
        self.done(&call, &key_id, out).await
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let me = self.detached();
        to_completion(async move { me.revoke_api_key_inner(request).await }).await
    }

    async fn update_api_key(
        &self,
        request: Request<pb::UpdateApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let me = self.detached();
        to_completion(async move { me.update_api_key_inner(request).await }).await
    }

    async fn query_audit(
        &self,
        request: Request<pb::QueryAuditRequest>,
    ) -> Result<Response<pb::QueryAuditResponse>, Status> {
        let call = self.begin(&request, "QueryAudit")?;
        let key_id = String::new();
        let out: Result<Response<pb::QueryAuditResponse>, Status> = async {
            let r = request.into_inner();
            if r.limit > 10_000 {
                return Err(Status::invalid_argument("invalid `limit`: at most 10000"));
            }
            if let (Some(a), Some(b)) = (r.since_ms, r.until_ms)
                && a > b
            {
                return Err(Status::invalid_argument(
                    "invalid `since_ms`: after `until_ms`",
                ));
            }
            if let (Some(a), Some(b)) = (r.status_min, r.status_max)
                && a > b
            {
                return Err(Status::invalid_argument(
                    "invalid `status_min`: above `status_max`",
                ));
            }
            let opt = |s: String| Some(s).filter(|s| !s.is_empty());
            // One row more than asked tells whether there are more.
            let limit = if r.limit == 0 { 100 } else { r.limit };
            let rows = self
                .state
                .audit
                .query(AuditFilter {
                    since_ms: r.since_ms,
                    until_ms: r.until_ms.map(|u| u.saturating_add(1)),
                    subject: opt(r.subject),
                    key_id: opt(r.key_id),
                    model: opt(r.model),
                    status_min: r.status_min.map(|s| s.min(u32::from(u16::MAX)) as u16),
                    status_max: r.status_max.map(|s| s.min(u32::from(u16::MAX)) as u16),
                    after_id: r.after_id.map(|a| i64::try_from(a).unwrap_or(i64::MAX)),
                    limit: Some(limit + 1),
                    ..Default::default()
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            let truncated = rows.len() as u32 > limit;
            let mut rows = rows;
            rows.truncate(limit as usize);
            Ok(Response::new(pb::QueryAuditResponse {
                rows: rows
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
                truncated,
            }))
        }
        .await;
        self.done(&call, &key_id, out).await
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
