//! What the spawned OpenAI-compatible engines (vLLM, TGI) share: the command from config, a free
//! loopback port, the memory fraction, "spawn and wait for `/health`" (with a per-instance API
//! key in the engine's environment), and attaching to an engine that already runs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{BackendError, StartSpec, Started, base_url, url_port};
use crate::config::EngineConfig;
use crate::process::{self, ChildSpec};

/// A free loopback port: bind `127.0.0.1:0`, read the port, close. (Another process could take it
/// before the engine binds it; the engine then fails to start and the error says so.)
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// `lease / total`, rounded down to 4 decimals so the engine stays inside the lease, clamped to
/// `0.01..=0.99`. `what` names the engine in the error when the total is unknown.
pub fn memory_fraction(what: &str, lease: u64, total: u64) -> Result<String, BackendError> {
    if total == 0 {
        return Err(BackendError::Config(format!(
            "the leased GPU's total memory is unknown, so {what}'s memory cannot be bounded to the \
             lease"
        )));
    }
    let f = (lease as f64 / total as f64 * 10_000.0).floor() / 10_000.0;
    Ok(format!("{:.4}", f.clamp(0.01, 0.99)))
}

/// Program and leading arguments: `[backend.<engine>] command`, else `default`.
pub fn command(cfg: &EngineConfig, default: &[&str]) -> (PathBuf, Vec<String>) {
    let words: Vec<String> = match &cfg.command {
        Some(c) if !c.is_empty() => c.clone(),
        _ => default.iter().map(|s| s.to_string()).collect(),
    };
    let mut it = words.into_iter();
    let program = PathBuf::from(it.next().unwrap_or_default());
    (program, it.collect())
}

/// `CUDA_VISIBLE_DEVICES` for the leased GPU (empty on a simulated GPU), as for llama.cpp.
pub fn cuda_env(spec: &StartSpec) -> Vec<(String, String)> {
    vec![
        // NVML numbers GPUs in PCI bus order; CUDA's default is fastest first.
        ("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into()),
        (
            "CUDA_VISIBLE_DEVICES".into(),
            spec.gpu.map(|g| g.to_string()).unwrap_or_default(),
        ),
    ]
}

async fn healthy(http: &reqwest::Client, endpoint: &str) -> bool {
    http.get(format!("{endpoint}/health"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// Spawn `program args` (own process group, dies with the manager) that will listen on
/// `127.0.0.1:port`, and wait until `GET /health` answers 2xx. Fails fast, with the last lines of
/// its output, if the child exits first; stops it on a timeout. A fresh API key is put in the
/// child's environment as `api_key_env` (the variable the engine reads its `--api-key` from).
pub async fn launch(
    http: &reqwest::Client,
    spec: &StartSpec,
    program: PathBuf,
    args: Vec<String>,
    port: u16,
    api_key_env: &str,
) -> Result<Started, BackendError> {
    let api_key = super::new_api_key();
    let mut env = cuda_env(spec);
    env.push((api_key_env.to_string(), api_key.to_string()));
    let child = process::spawn(
        &ChildSpec {
            program: program.clone(),
            args,
            env,
        },
        None,
    )
    .map_err(|e| BackendError::Spawn {
        program: program.display().to_string(),
        reason: e.to_string(),
    })?;
    let endpoint = format!("http://127.0.0.1:{port}");
    let began = Instant::now();
    let mut exit = child.exit.clone();
    loop {
        if healthy(http, &endpoint).await {
            break;
        }
        if child.exited().is_some() {
            let e = child.wait().await;
            // Let the pumps flush the last lines.
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Err(BackendError::ExitedDuringStart {
                exit: e.to_string(),
                tail: child.tail.last(10),
            });
        }
        if began.elapsed() >= spec.start_timeout {
            child.stop(Duration::from_secs(2)).await;
            return Err(BackendError::Timeout {
                secs: spec.start_timeout.as_secs(),
                tail: child.tail.last(10),
            });
        }
        tokio::select! {
            _ = exit.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    Ok(Started {
        endpoint,
        port,
        process: Some(child),
        measured: None,
        served_name: spec.alias.clone(),
        api_key: Some(api_key),
    })
}

/// Attach to an engine that already runs at `endpoint`: wait for `/health`, then serve under the
/// first name its `/v1/models` lists (an attached engine was started with its own name), else
/// `spec.alias`.
pub async fn attach(
    http: &reqwest::Client,
    what: &'static str,
    spec: &StartSpec,
    endpoint: &str,
) -> Result<Started, BackendError> {
    let endpoint = base_url(endpoint);
    let began = Instant::now();
    while !healthy(http, &endpoint).await {
        if began.elapsed() >= spec.start_timeout {
            return Err(BackendError::Unreachable {
                what,
                url: endpoint,
                reason: format!(
                    "GET /health did not succeed within {} s",
                    spec.start_timeout.as_secs()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listed = async {
        let r = http
            .get(format!("{endpoint}/v1/models"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.ok()?).ok()?;
        v["data"][0]["id"].as_str().map(str::to_string)
    }
    .await;
    Ok(Started {
        port: url_port(&endpoint),
        endpoint,
        process: None,
        measured: None,
        served_name: listed.unwrap_or_else(|| spec.alias.clone()),
        // Started by someone else, with whatever key they gave it (none known here).
        api_key: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_is_floored_and_clamped() {
        const GIB: u64 = 1 << 30;
        assert_eq!(memory_fraction("x", 20 * GIB, 80 * GIB).unwrap(), "0.2500");
        // 1/3 rounds down, never up past the lease.
        assert_eq!(memory_fraction("x", GIB, 3 * GIB).unwrap(), "0.3333");
        assert_eq!(memory_fraction("x", 2 * GIB, 3 * GIB).unwrap(), "0.6666");
        assert_eq!(memory_fraction("x", 1, 80 * GIB).unwrap(), "0.0100");
        assert_eq!(memory_fraction("x", 80 * GIB, 80 * GIB).unwrap(), "0.9900");
        let e = memory_fraction("vLLM", 1, 0).unwrap_err().to_string();
        assert!(e.contains("vLLM") && e.contains("unknown"), "{e}");
    }

    #[test]
    fn command_from_config_or_default() {
        let (p, a) = command(&EngineConfig::default(), &["vllm", "serve"]);
        assert_eq!((p, a), (PathBuf::from("vllm"), vec!["serve".to_string()]));
        let cfg = EngineConfig {
            command: Some(vec!["python3".into(), "fake.py".into(), "serve".into()]),
            endpoint: None,
        };
        let (p, a) = command(&cfg, &["vllm", "serve"]);
        assert_eq!(p, PathBuf::from("python3"));
        assert_eq!(a, vec!["fake.py".to_string(), "serve".to_string()]);
    }
}
