//! Cloud upstreams: OpenAI-compatible HTTP(S) endpoints (`[gateway.upstreams.<name>]`), chosen by
//! model name. The key comes from an environment variable or a file and is never logged. Prompts
//! pass through the redactor with the upstream's policy before they leave (see `redact.rs`).
//! Answers are relayed byte for byte; streams are passed through as they arrive.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;

use crate::error::ApiError;
use crate::keys::glob;
use crate::redact::Policy;
use crate::upstream::{Endpoint, Usage};

/// `[gateway.upstreams.<name>]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Environment variable holding the API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// File holding the API key.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Model names (or `*` patterns) served by this upstream.
    pub models: Vec<String>,
    /// What to do with secrets found in prompts: `redact` (default), `block`, `allow`.
    #[serde(default)]
    pub redaction: Policy,
}

/// Why an upstream's configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[error("invalid `gateway.upstreams.{name}`: {message}")]
pub struct CloudConfigError {
    pub name: String,
    pub message: String,
}

/// A configured cloud upstream.
pub struct Cloud {
    pub name: String,
    base_url: String,
    key: Option<String>,
    pub models: Vec<String>,
    pub policy: Policy,
    http: reqwest::Client,
}

impl std::fmt::Debug for Cloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Cloud")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .finish()
    }
}

/// Build the upstreams from config.
pub fn from_config(
    cfg: &BTreeMap<String, CloudConfig>,
    http: &reqwest::Client,
) -> Result<Vec<Cloud>, CloudConfigError> {
    let mut out = Vec::new();
    for (name, c) in cfg {
        let err = |m: String| CloudConfigError {
            name: name.clone(),
            message: m,
        };
        if !(c.base_url.starts_with("http://") || c.base_url.starts_with("https://")) {
            return Err(err(format!(
                "base_url {:?} must start with http:// or https://",
                c.base_url
            )));
        }
        if c.models.is_empty() {
            return Err(err(
                "models must list at least one model name or pattern".into()
            ));
        }
        let key = match (&c.api_key_env, &c.api_key_file) {
            (Some(_), Some(_)) => {
                return Err(err("set api_key_env or api_key_file, not both".into()));
            }
            (Some(v), None) => Some(
                std::env::var(v)
                    .map_err(|_| err(format!("environment variable {v} is not set")))?,
            ),
            (None, Some(p)) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| err(format!("cannot read api_key_file {}: {e}", p.display())))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        out.push(Cloud {
            name: name.clone(),
            base_url: c.base_url.trim_end_matches('/').to_string(),
            key,
            models: c.models.clone(),
            policy: c.redaction,
            http: http.clone(),
        });
    }
    Ok(out)
}

/// The upstream serving `model`, if a cloud one does.
pub fn route<'a>(clouds: &'a [Cloud], model: &str) -> Option<&'a Cloud> {
    clouds
        .iter()
        .find(|c| c.models.iter().any(|p| glob(p, model)))
}

/// A cloud answer.
pub enum CloudAnswer {
    Complete {
        status: u16,
        body: Bytes,
        usage: Usage,
    },
    Stream {
        status: u16,
        body: reqwest::Response,
    },
}

fn usage_of(body: &[u8]) -> Usage {
    let v: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let n = |k: &str| {
        v.as_ref()
            .and_then(|v| v.get("usage"))
            .and_then(|u| u.get(k))
            .and_then(serde_json::Value::as_u64)
            .map_or(0, |x| x.min(u64::from(u32::MAX)) as u32)
    };
    Usage {
        prompt: n("prompt_tokens"),
        completion: n("completion_tokens"),
    }
}

impl Cloud {
    /// Forward a (redacted) body.
    pub async fn call(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        request_id: &str,
        stream: bool,
        timeout: Duration,
    ) -> Result<CloudAnswer, ApiError> {
        let path = endpoint.path().trim_start_matches("/v1");
        let mut req = self
            .http
            .post(format!("{}{path}", self.base_url))
            .header("content-type", "application/json")
            .header("x-request-id", request_id)
            .body(body);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        if !stream {
            req = req.timeout(timeout);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                ApiError::new(
                    axum::http::StatusCode::GATEWAY_TIMEOUT,
                    "server_error",
                    format!("upstream {} timed out", self.name),
                )
            } else {
                ApiError::new(
                    axum::http::StatusCode::BAD_GATEWAY,
                    "server_error",
                    format!("upstream {} is unreachable", self.name),
                )
                .code("upstream_unreachable")
            }
        })?;
        let status = resp.status().as_u16();
        if stream && status < 400 {
            return Ok(CloudAnswer::Stream { status, body: resp });
        }
        let body = resp.bytes().await.map_err(|_| {
            ApiError::new(
                axum::http::StatusCode::BAD_GATEWAY,
                "server_error",
                format!("upstream {} broke the connection", self.name),
            )
        })?;
        let usage = usage_of(&body);
        Ok(CloudAnswer::Complete {
            status,
            body,
            usage,
        })
    }
}
