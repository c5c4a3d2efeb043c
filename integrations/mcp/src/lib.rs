//! `securellm-mcp`: the SecureLLM stack's tools for AI assistants, as one MCP (Model Context
//! Protocol) server built on the official Rust SDK (`rmcp`).
//!
//! Every tool is a thin client call with a timeout: gRPC to the vram-scheduler, the registry, the
//! backend manager and the gateway's admin API, and HTTP to the gateway's OpenAI API for `chat`
//! (so a chat from an assistant is authenticated, rate-limited and audited like any client's).
//! A failure (a service down, a timeout, an unknown model, a bad argument) is a tool error whose
//! text says what went wrong; the server keeps serving. The text the tools return is the text the
//! `securellm` CLI prints (`securellm_client`). Calls to the scheduler, the registry and the
//! backend manager carry the internal token (read from its file at each call).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    Implementation, ProgressNotificationParam, RequestMetaObject, ServerCapabilities, ServerConfig,
};
use rmcp::{Peer, RoleServer, ServerHandler, schemars, tool, tool_handler, tool_router};
use securellm_client::{admin, connect_internal, connect_to, instances, models, status_text, vram};
use securellm_common::internal_auth::AuthChannel;
use securellm_common::time::now_ms;
use securellm_proto::v1 as pb;
use securellm_proto::v1::backend_manager_client::BackendManagerClient;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;
use serde::Deserialize;
use serde_json::{Value, json};

/// `max_tokens` when a `chat` call gives none.
pub const DEFAULT_MAX_TOKENS: u32 = 256;

/// Where the services are and how long a call may take.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC addresses (`HOST:PORT` or URL).
    pub scheduler: String,
    pub registry: String,
    pub backend: String,
    /// The gateway's gRPC address (its admin API).
    pub gateway: String,
    /// The gateway's OpenAI HTTP API: `HOST:PORT` or a base URL (`https://host:8088`).
    pub gateway_http: String,
    /// The API key file for `chat`; `None`: `$SECURELLM_API_KEY`, else `<data dir>/api-key`.
    pub api_key_file: Option<PathBuf>,
    /// The admin token file for `audit_verify` (see `securellm_client::admin::token`).
    pub admin_token_file: Option<PathBuf>,
    /// The internal token file for the scheduler, the registry and the backend manager (see
    /// `securellm_client::internal_token_path`), read at each call (so a token created after the
    /// MCP server started is found); `None`, or no such file: no token is sent, and services that
    /// require one refuse the call.
    pub internal_token_file: Option<PathBuf>,
    /// The limit of a status or catalogue call.
    pub timeout: Duration,
    /// The limit of `load_model`, `unload_model` and `chat` (a load may wait for GPU memory).
    pub long_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            scheduler: securellm_client::DEFAULT_SCHEDULER.into(),
            registry: securellm_client::DEFAULT_REGISTRY.into(),
            backend: securellm_client::DEFAULT_BACKEND.into(),
            gateway: securellm_client::DEFAULT_GATEWAY.into(),
            gateway_http: securellm_client::DEFAULT_GATEWAY_HTTP.into(),
            api_key_file: None,
            admin_token_file: None,
            internal_token_file: None,
            timeout: Duration::from_secs(5),
            long_timeout: Duration::from_secs(120),
        }
    }
}

/// A tool's outcome: text for the assistant, or the error text (an MCP tool error).
type ToolResult = Result<String, String>;

/// `{name}` of a model.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ModelName {
    /// The model: its registry id, alias or name, as `list_models` shows it.
    pub name: String,
}

/// A one-turn chat.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ChatArgs {
    /// The model: a local one from `list_models` (loaded on demand) or a cloud one the gateway routes.
    pub model: String,
    /// The user message.
    pub prompt: String,
    /// The most tokens to generate (default 256).
    #[schemars(range(min = 1))]
    pub max_tokens: Option<u32>,
}

/// The MCP server: one instance per session (cheap to clone).
#[derive(Clone)]
pub struct SecureLlmMcp {
    cfg: Arc<Config>,
    http: reqwest::Client,
    tool_router: ToolRouter<Self>,
}

fn non_empty<'a>(field: &str, v: &'a str) -> Result<&'a str, String> {
    let v = v.trim();
    if v.is_empty() {
        Err(format!("`{field}` must not be empty"))
    } else {
        Ok(v)
    }
}

/// The API key for `chat`: the file when one is given, else `$SECURELLM_API_KEY`, else
/// `<data dir>/api-key` (where `make run` keeps the first key).
fn api_key(file: Option<&PathBuf>) -> Result<String, String> {
    if file.is_none()
        && let Ok(k) = std::env::var("SECURELLM_API_KEY")
        && !k.trim().is_empty()
    {
        return Ok(k.trim().to_string());
    }
    let path = file
        .cloned()
        .unwrap_or_else(|| securellm_client::data_dir(None).join("api-key"));
    let key = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "no API key for the gateway: cannot read {} ({e}); set --api-key-file or SECURELLM_API_KEY",
            path.display()
        )
    })?;
    let key = key.lines().next().unwrap_or("").trim().to_string();
    if key.is_empty() {
        return Err(format!("the API key file {} is empty", path.display()));
    }
    Ok(key)
}

/// The gateway's OpenAI base URL (`http://HOST:PORT/v1`).
fn openai_base(addr: &str) -> String {
    let url = securellm_client::endpoint(addr);
    let url = url.trim_end_matches('/');
    if url.ends_with("/v1") {
        url.to_string()
    } else {
        format!("{url}/v1")
    }
}

/// The assistant's text and the usage line from an OpenAI chat completion.
fn chat_text(model: &str, v: &Value) -> Result<String, String> {
    let choice = &v["choices"][0];
    let Some(text) = choice["message"]["content"].as_str() else {
        return Err(format!(
            "the gateway's answer has no choices[0].message.content: {}",
            truncate(&v.to_string(), 300)
        ));
    };
    let u = &v["usage"];
    let n = |k: &str| u[k].as_u64().map_or("?".to_string(), |n| n.to_string());
    Ok(format!(
        "{text}\n\n[model {}; finish_reason {}; tokens: prompt {}, completion {}, total {}]",
        v["model"].as_str().unwrap_or(model),
        choice["finish_reason"].as_str().unwrap_or("?"),
        n("prompt_tokens"),
        n("completion_tokens"),
        n("total_tokens"),
    ))
}

/// An OpenAI-shaped error body's message, else the body itself (shortened).
fn openai_error(status: reqwest::StatusCode, body: &str) -> String {
    let msg = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| truncate(body.trim(), 300));
    format!("the gateway answered {status}: {msg}")
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn audit_text(r: &pb::VerifyAuditResponse) -> String {
    if r.ok && r.head_hash.is_empty() {
        format!("audit chain OK: {} rows verified", r.rows_checked)
    } else if r.ok {
        format!(
            "audit chain OK: {} rows verified; head: row {} hash {} (record it elsewhere to detect a later cut)",
            r.rows_checked, r.head_row_id, r.head_hash
        )
    } else {
        let kind = pb::AuditTamperKind::try_from(r.reason)
            .map(|k| k.as_str_name().to_string())
            .unwrap_or_else(|_| format!("KIND_{}", r.reason));
        format!(
            "audit chain BROKEN at row {}: {} ({}); {} rows checked",
            r.first_bad_row_id.map_or("-".into(), |i| i.to_string()),
            kind,
            r.detail,
            r.rows_checked
        )
    }
}

#[tool_router]
impl SecureLlmMcp {
    pub fn new(cfg: Config) -> anyhow::Result<Self> {
        securellm_common::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(securellm_client::CONNECT_TIMEOUT)
            .timeout(cfg.long_timeout)
            .build()?;
        Ok(Self {
            cfg: Arc::new(cfg),
            http,
            tool_router: Self::tool_router(),
        })
    }

    /// A channel to an internal service, its calls carrying the internal token.
    async fn connect(
        &self,
        service: &str,
        addr: &str,
        timeout: Option<Duration>,
    ) -> anyhow::Result<AuthChannel> {
        let token = match &self.cfg.internal_token_file {
            Some(f) => securellm_client::read_internal_token_if_present(f)?,
            None => None,
        };
        connect_internal(service, addr, token.as_ref(), timeout).await
    }

    fn err(&self, s: tonic::Status, timeout: Duration) -> String {
        status_text(&s, timeout)
    }

    #[tool(
        description = "GPU memory as the vram-scheduler sees it: per GPU total, used, free, leased, foreign (used by processes no lease names), reserve and grantable bytes; the lease table (holder, size, priority, age, expiry, idle/evicting) and the wait queue.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn vram_status(&self) -> ToolResult {
        let t = self.cfg.timeout;
        let ch = self
            .connect("vram-scheduler", &self.cfg.scheduler, Some(t))
            .await
            .map_err(|e| e.to_string())?;
        let st = VramSchedulerClient::new(ch)
            .get_status(pb::GetStatusRequest {})
            .await
            .map_err(|s| format!("vram-scheduler: {}", self.err(s, t)))?
            .into_inner();
        Ok(vram::render_status(&st, now_ms()))
    }

    #[tool(
        description = "The models the registry found on disk: name (aliases), format, parameter count, quantization, file size, context length, estimated memory at 4096 tokens of context, status.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list_models(&self) -> ToolResult {
        let t = self.cfg.timeout;
        let ch = self
            .connect("registry", &self.cfg.registry, Some(t))
            .await
            .map_err(|e| e.to_string())?;
        models::table(&mut ModelRegistryClient::new(ch))
            .await
            .map_err(|s| format!("registry: {}", self.err(s, t)))
    }

    #[tool(
        description = "One model in detail (path, architecture, parameters, quantization, layers, heads, context, files) with memory estimates at 2k, 4k, 8k and 32k tokens of context.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn show_model(&self, Parameters(a): Parameters<ModelName>) -> ToolResult {
        let name = non_empty("name", &a.name)?;
        let t = self.cfg.timeout;
        let ch = self
            .connect("registry", &self.cfg.registry, Some(t))
            .await
            .map_err(|e| e.to_string())?;
        models::detail(&mut ModelRegistryClient::new(ch), name)
            .await
            .map_err(|s| format!("registry: {}", self.err(s, t)))
    }

    #[tool(
        description = "The models the backend manager has loaded (like `ollama ps`): state, GPU, lease size, measured memory, pid, requests in flight, idle time, crash count.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn loaded_models(&self) -> ToolResult {
        let t = self.cfg.timeout;
        let ch = self
            .connect("backend manager", &self.cfg.backend, Some(t))
            .await
            .map_err(|e| e.to_string())?;
        let l = BackendManagerClient::new(ch)
            .list_instances(pb::ListInstancesRequest::default())
            .await
            .map_err(|s| format!("backend manager: {}", self.err(s, t)))?
            .into_inner();
        Ok(instances::render(&l.instances, now_ms()))
    }

    #[tool(
        description = "Load a model now: the backend manager gets a GPU memory lease from the vram-scheduler (waiting in its queue if needed) and starts the model's server. Returns the state, endpoint and pid.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn load_model(
        &self,
        Parameters(a): Parameters<ModelName>,
        meta: RequestMetaObject,
        peer: Peer<RoleServer>,
    ) -> ToolResult {
        let name = non_empty("name", &a.name)?;
        let t = self.cfg.long_timeout;
        let ch = self
            .connect("backend manager", &self.cfg.backend, Some(t))
            .await
            .map_err(|e| e.to_string())?;
        let mut client = BackendManagerClient::new(ch);
        let load = client.load(pb::LoadRequest {
            model: name.to_string(),
            deadline_ms: now_ms() + t.as_millis() as u64,
            ..Default::default()
        });
        let i = self
            .with_load_progress(name, &meta, &peer, load)
            .await
            .map_err(|s| format!("cannot load {name}: {}", self.err(s, t)))?
            .into_inner();
        Ok(instances::loaded(&i))
    }

    #[tool(
        description = "Unload a model: drain its in-flight requests, stop its server and release its GPU memory lease.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn unload_model(&self, Parameters(a): Parameters<ModelName>) -> ToolResult {
        let name = non_empty("name", &a.name)?;
        let t = self.cfg.long_timeout;
        let ch = self
            .connect("backend manager", &self.cfg.backend, Some(t))
            .await
            .map_err(|e| e.to_string())?;
        let r = BackendManagerClient::new(ch)
            .unload(pb::UnloadRequest {
                model: name.to_string(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("cannot unload {name}: {}", self.err(s, t)))?
            .into_inner();
        Ok(instances::unloaded(name, &r))
    }

    #[tool(
        description = "Ask a model one question through the SecureLLM gateway's OpenAI API (authenticated with the configured API key, rate-limited and audited like any client). Returns the assistant's reply and the token usage.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            open_world_hint = true
        )
    )]
    async fn chat(
        &self,
        Parameters(a): Parameters<ChatArgs>,
        meta: RequestMetaObject,
        peer: Peer<RoleServer>,
    ) -> ToolResult {
        let model = non_empty("model", &a.model)?;
        if a.prompt.trim().is_empty() {
            return Err("`prompt` must not be empty".into());
        }
        let max_tokens = a.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        if max_tokens == 0 {
            return Err("`max_tokens` must be at least 1".into());
        }
        let key = api_key(self.cfg.api_key_file.as_ref())?;
        let url = format!("{}/chat/completions", openai_base(&self.cfg.gateway_http));
        let body = json!({
            "model": model,
            "messages": [{"role": "user", "content": a.prompt}],
            "max_tokens": max_tokens,
        });
        let send = self.http.post(&url).bearer_auth(key).json(&body).send();
        let r = self
            .with_load_progress(model, &meta, &peer, send)
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    format!(
                        "the gateway gave no answer within {} s ({url})",
                        self.cfg.long_timeout.as_secs()
                    )
                } else {
                    format!("cannot reach the gateway at {url}: {}", root_cause(&e))
                }
            })?;
        let status = r.status();
        let text = r
            .text()
            .await
            .map_err(|e| format!("reading the gateway's answer: {}", root_cause(&e)))?;
        if !status.is_success() {
            return Err(openai_error(status, &text));
        }
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            format!(
                "the gateway's answer is not JSON ({e}): {}",
                truncate(&text, 300)
            )
        })?;
        chat_text(model, &v)
    }

    #[tool(
        description = "Verify the gateway's tamper-evident audit log (a hash chain, one row per request): OK with the number of rows checked, or the first edited, inserted, deleted or truncated row. Needs the gateway's admin token.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn audit_verify(&self) -> ToolResult {
        let t = self.cfg.long_timeout;
        let token =
            admin::token(self.cfg.admin_token_file.clone()).map_err(|e| format!("{e:#}"))?;
        let ch = connect_to("gateway", &self.cfg.gateway, Some(t))
            .await
            .map_err(|e| e.to_string())?;
        let r = admin::admin_client(ch, &token)
            .map_err(|e| format!("{e:#}"))?
            .verify_audit(pb::VerifyAuditRequest { from_id: 0 })
            .await
            .map_err(|s| format!("gateway: {}", self.err(s, t)))?
            .into_inner();
        Ok(audit_text(&r))
    }
}

/// The innermost cause of an error ("Connection refused (os error 111)").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

impl SecureLlmMcp {
    /// Run `fut`; meanwhile, if the client asked for progress (`_meta.progressToken`), tell it
    /// where a request waiting for `model` stands (queue position, loading phase), from the
    /// backend manager's instance list, each time that changes.
    async fn with_load_progress<F: std::future::Future>(
        &self,
        model: &str,
        meta: &RequestMetaObject,
        peer: &Peer<RoleServer>,
        fut: F,
    ) -> F::Output {
        let Some(token) = meta.get_progress_token() else {
            return fut.await;
        };
        tokio::pin!(fut);
        let mut tick = tokio::time::interval(PROGRESS_POLL);
        let (mut sent, mut last) = (0u32, String::new());
        loop {
            tokio::select! {
                r = &mut fut => return r,
                _ = tick.tick() => {
                    let Some(text) = self.load_progress(model).await else { continue };
                    if text != last {
                        sent += 1;
                        let note = ProgressNotificationParam::new(token.clone(), f64::from(sent))
                            .with_message(text.clone());
                        let _ = peer.notify_progress(note).await;
                        last = text;
                    }
                }
            }
        }
    }

    /// `model-b: queued for GPU memory, position 1 of 2`, while requests wait for the model.
    async fn load_progress(&self, model: &str) -> Option<String> {
        let ch = self
            .connect("backend manager", &self.cfg.backend, Some(self.cfg.timeout))
            .await
            .ok()?;
        let l = BackendManagerClient::new(ch)
            .list_instances(pb::ListInstancesRequest {
                model: model.to_string(),
                states: Vec::new(),
            })
            .await
            .ok()?
            .into_inner();
        l.instances.iter().find_map(|i| {
            let p = i.load_progress.as_ref()?;
            Some(format!("{}: {}", i.model_name, instances::progress(p)))
        })
    }
}

/// How often a waiting tool call looks at where its model stands.
const PROGRESS_POLL: Duration = Duration::from_millis(200);

#[tool_handler(router = self.tool_router)]
impl ServerHandler for SecureLlmMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "securellm-mcp",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(
                "Tools for a local SecureLLM stack: GPU memory (vram_status), the model catalogue \
                 (list_models, show_model), loaded models (loaded_models, load_model, unload_model), \
                 a chat through the secure gateway (chat), and the audit log check (audit_verify).",
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_base_url_ends_in_v1() {
        assert_eq!(openai_base("127.0.0.1:8088"), "http://127.0.0.1:8088/v1");
        assert_eq!(openai_base("https://gw:8443/"), "https://gw:8443/v1");
        assert_eq!(openai_base("http://gw/v1"), "http://gw/v1");
    }

    #[test]
    fn a_completion_becomes_text_and_usage() {
        let v = json!({"model": "tiny", "choices": [{"message": {"content": "hi"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}});
        assert_eq!(
            chat_text("x", &v).unwrap(),
            "hi\n\n[model tiny; finish_reason length; tokens: prompt 3, completion 2, total 5]"
        );
        assert!(
            chat_text("x", &json!({"choices": []}))
                .unwrap_err()
                .contains("no choices")
        );
    }

    #[test]
    fn openai_errors_show_their_message() {
        let s = openai_error(
            reqwest::StatusCode::UNAUTHORIZED,
            r#"{"error": {"message": "Invalid API key", "type": "invalid_request_error"}}"#,
        );
        assert_eq!(s, "the gateway answered 401 Unauthorized: Invalid API key");
        assert!(openai_error(reqwest::StatusCode::BAD_GATEWAY, "oops").ends_with(": oops"));
    }

    #[test]
    fn empty_names_are_refused() {
        assert_eq!(
            non_empty("name", "  ").unwrap_err(),
            "`name` must not be empty"
        );
        assert_eq!(non_empty("name", " tiny ").unwrap(), "tiny");
    }

    #[test]
    fn api_key_file_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "sk-slm-abc\n").unwrap();
        assert_eq!(api_key(Some(&p)).unwrap(), "sk-slm-abc");
        std::fs::write(&p, "\n").unwrap();
        assert!(api_key(Some(&p)).unwrap_err().contains("is empty"));
        let missing = dir.path().join("none");
        assert!(
            api_key(Some(&missing))
                .unwrap_err()
                .contains("--api-key-file")
        );
    }

    #[test]
    fn audit_results_read_as_sentences() {
        let ok = pb::VerifyAuditResponse {
            ok: true,
            rows_checked: 3,
            ..Default::default()
        };
        assert_eq!(audit_text(&ok), "audit chain OK: 3 rows verified");
        let head = pb::VerifyAuditResponse {
            head_row_id: 3,
            head_hash: "ab12".into(),
            ..ok
        };
        assert!(audit_text(&head).contains("head: row 3 hash ab12"));
        let bad = pb::VerifyAuditResponse {
            ok: false,
            rows_checked: 2,
            first_bad_row_id: Some(2),
            reason: 1,
            detail: "hash mismatch".into(),
            ..Default::default()
        };
        assert!(audit_text(&bad).starts_with("audit chain BROKEN at row 2: AUDIT_TAMPER_KIND_"));
    }
}
