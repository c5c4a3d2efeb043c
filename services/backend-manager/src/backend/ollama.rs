//! Ollama: drives an Ollama daemon that already runs (`[backend.ollama] url`) through its HTTP API;
//! nothing is spawned.
//!
//! - **Load**: `POST /api/generate {"model": NAME, "prompt": "", "keep_alive": -1, "stream": false}`
//!   (an empty prompt makes Ollama load the model and answer `{"done": true, ...}`; `keep_alive: -1`
//!   keeps it loaded until the manager unloads it).
//! - **Usage**: `GET /api/ps`; the model's `size_vram` (else `size`) is the measured size, and the
//!   lease is settled to it.
//! - **Unload**: `POST /api/generate {"model": NAME, "keep_alive": 0}`, then `/api/ps` is polled
//!   until the model is gone (so the lease is released after Ollama freed the memory).
//! - Requests go to Ollama's OpenAI-compatible `/v1/...` endpoints with `model` = `name:tag`.
//!
//! No `options.num_ctx` is sent with the load: Ollama's OpenAI-compatible endpoints cannot carry
//! `num_ctx`, and Ollama reloads a model whose options differ from the loaded ones, so a load with
//! another context would be undone (and re-sized) by the first chat request. The context is the
//! daemon's (`OLLAMA_CONTEXT_LENGTH`, the Modelfile's `num_ctx`); `/api/ps` reports what it
//! allocated, and that is what the lease covers.
//!
//! Not run for real here: tested against `tests/fakes/fake_ollama.py`, which speaks this API.

use std::time::{Duration, Instant};

use securellm_proto::v1 as pb;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Backend, BackendError, Measured, StartSpec, Started, base_url, url_port};

const WHAT: &str = "the Ollama daemon";

/// The Ollama backend (`[backend.ollama]`).
pub struct Ollama {
    pub url: String,
    pub http: reqwest::Client,
}

/// One entry of `GET /api/ps`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct PsModel {
    pub name: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub size_vram: Option<u64>,
}

impl PsModel {
    /// What the model occupies on the GPU: `size_vram`, else `size`.
    pub fn bytes(&self) -> Option<u64> {
        self.size_vram.or(self.size)
    }
}

#[derive(Deserialize)]
struct Ps {
    #[serde(default)]
    models: Vec<PsModel>,
}

/// `name` and `name:latest` are the same model to Ollama.
pub fn same_model(a: &str, b: &str) -> bool {
    fn norm(n: &str) -> String {
        let last = n.rsplit('/').next().unwrap_or(n);
        if last.contains(':') {
            n.to_string()
        } else {
            format!("{n}:latest")
        }
    }
    norm(a) == norm(b)
}

/// An error and its causes, on one line (reqwest's own message omits them).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Ollama's `{"error": "..."}`, else the body as text.
fn error_text(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}

impl Ollama {
    fn base(&self) -> String {
        base_url(&self.url)
    }

    fn unreachable(&self, e: reqwest::Error) -> BackendError {
        BackendError::Unreachable {
            what: WHAT,
            url: self.base(),
            reason: if e.is_timeout() {
                "no answer before the start timeout".into()
            } else {
                chain(&e)
            },
        }
    }

    /// `POST /api/generate`; the final JSON object of the answer.
    async fn generate(
        &self,
        model: &str,
        body: Value,
        timeout: Duration,
    ) -> Result<Value, BackendError> {
        let r = self
            .http
            .post(format!("{}/api/generate", self.base()))
            .header("content-type", "application/json")
            .body(body.to_string())
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = r.status().as_u16();
        let bytes = r.bytes().await.map_err(|e| self.unreachable(e))?;
        if status == 404 {
            return Err(BackendError::ModelNotFound {
                what: WHAT,
                url: self.base(),
                model: model.to_string(),
                detail: error_text(&bytes),
            });
        }
        if !(200..300).contains(&status) {
            return Err(BackendError::Upstream {
                what: WHAT,
                url: self.base(),
                status,
                body: error_text(&bytes),
            });
        }
        // A streamed answer is NDJSON; the last object is the one with `done`.
        let text = String::from_utf8_lossy(&bytes);
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        let v: Value = serde_json::from_str(last).map_err(|e| BackendError::Upstream {
            what: WHAT,
            url: self.base(),
            status,
            body: format!(
                "not JSON ({e}): {}",
                last.chars().take(200).collect::<String>()
            ),
        })?;
        if let Some(err) = v.get("error") {
            return Err(BackendError::Upstream {
                what: WHAT,
                url: self.base(),
                status,
                body: err.as_str().map_or_else(|| err.to_string(), str::to_string),
            });
        }
        Ok(v)
    }

    /// The models the daemon has loaded (`GET /api/ps`).
    pub async fn ps(&self) -> Result<Vec<PsModel>, BackendError> {
        let r = self
            .http
            .get(format!("{}/api/ps", self.base()))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = r.status().as_u16();
        let bytes = r.bytes().await.map_err(|e| self.unreachable(e))?;
        if !(200..300).contains(&status) {
            return Err(BackendError::Upstream {
                what: WHAT,
                url: self.base(),
                status,
                body: error_text(&bytes),
            });
        }
        serde_json::from_slice::<Ps>(&bytes)
            .map(|p| p.models)
            .map_err(|e| BackendError::Upstream {
                what: WHAT,
                url: self.base(),
                status,
                body: format!("/api/ps is not what Ollama answers: {e}"),
            })
    }

    fn find(models: &[PsModel], name: &str) -> Option<PsModel> {
        models
            .iter()
            .find(|m| same_model(&m.name, name) || same_model(&m.model, name))
            .cloned()
    }
}

#[tonic::async_trait]
impl Backend for Ollama {
    fn name(&self) -> &'static str {
        "ollama"
    }

    fn kind(&self) -> pb::BackendKind {
        pb::BackendKind::Ollama
    }

    async fn start(&self, spec: &StartSpec) -> Result<Started, BackendError> {
        let name = spec.alias.as_str();
        self.generate(
            name,
            json!({"model": name, "prompt": "", "keep_alive": -1, "stream": false}),
            spec.start_timeout,
        )
        .await?;
        let measured = match Self::find(&self.ps().await?, name) {
            Some(m) => m.bytes().map(|b| Measured {
                model: b,
                total_only: true,
                ..Measured::default()
            }),
            None => {
                tracing::warn!(
                    model = name,
                    "Ollama loaded the model but /api/ps does not list it; the lease stays at the estimate"
                );
                None
            }
        };
        Ok(Started {
            endpoint: self.base(),
            port: url_port(&self.url),
            process: None,
            measured,
            served_name: name.to_string(),
            // The daemon is shared and has no API keys of its own.
            api_key: None,
        })
    }

    async fn stop(&self, started: &Started, grace: Duration) {
        let name = started.served_name.as_str();
        let began = Instant::now();
        if let Err(e) = self
            .generate(
                name,
                json!({"model": name, "keep_alive": 0, "stream": false}),
                grace.max(Duration::from_secs(5)),
            )
            .await
        {
            tracing::warn!(model = name, "Ollama unload failed: {e}");
            return;
        }
        // Ollama frees the memory shortly after answering: wait until /api/ps no longer lists it.
        while began.elapsed() < grace {
            match self.ps().await {
                Ok(models) if Self::find(&models, name).is_some() => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                _ => return,
            }
        }
        tracing::warn!(
            model = name,
            "Ollama still lists the model after the unload"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sizes() {
        assert!(same_model("llama3.2", "llama3.2:latest"));
        assert!(same_model("llamette:3b", "llamette:3b"));
        assert!(!same_model("llamette:3b", "llamette:7b"));
        assert!(same_model("host:5000/me/m", "host:5000/me/m:latest"));
        let ps: Ps = serde_json::from_str(
            r#"{"models":[{"name":"a:1","model":"a:1","size":10,"size_vram":7,"expires_at":"x"},
                          {"name":"b:1","model":"b:1","size":10}]}"#,
        )
        .unwrap();
        assert_eq!(Ollama::find(&ps.models, "a:1").unwrap().bytes(), Some(7));
        assert_eq!(
            Ollama::find(&ps.models, "b:1").unwrap().bytes(),
            Some(10),
            "falls back to size"
        );
        assert!(Ollama::find(&ps.models, "c").is_none());
        assert_eq!(
            error_text(br#"{"error":"model 'x' not found"}"#),
            "model 'x' not found"
        );
    }
}
