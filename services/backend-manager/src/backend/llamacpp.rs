//! llama.cpp: one `llama-server` child per instance.
//!
//! Started with `-m MODEL --host 127.0.0.1 --port 0 -c CONTEXT×PARALLEL -np PARALLEL -t THREADS
//! --alias NAME --fit off -lv 4` plus the cache type, GPU layers, embeddings and flash-attention
//! flags the instance asks for. `--port 0` lets llama-server pick a free port; it prints
//! `listening on http://127.0.0.1:PORT` once the model is loaded. `--fit off` because the lease,
//! not llama.cpp's own fitting, decides the memory budget (with `--fit on` it would silently change
//! the context or layers; see ARCHITECTURE.md). `CUDA_VISIBLE_DEVICES` pins it to the leased GPU
//! (empty on a simulated GPU: CPU only). `-lv 4` makes it log its buffer sizes ("model buffer
//! size", "KV buffer size", "compute buffer size"), parsed here to settle the lease.
//!
//! Each child gets a random API key in `LLAMA_API_KEY` (llama-server's `--api-key`, through the
//! environment so that it is not on the command line): without it the child answers 401 to
//! everything but `/health` (and its model list), so nobody on the machine can skip the gateway by
//! calling the child's loopback port.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use securellm_proto::v1 as pb;
use tokio::sync::mpsc;

use super::{Backend, BackendError, Measured, StartSpec, Started};
use crate::process::{self, ChildSpec};

/// llama-server reads `--api-key` from this variable.
pub const API_KEY_ENV: &str = "LLAMA_API_KEY";

/// The llama.cpp backend.
pub struct LlamaCpp {
    pub binary: PathBuf,
    pub threads: u32,
    /// No output for this long during start = stalled.
    pub stall_timeout: Duration,
    pub http: reqwest::Client,
}

/// `listening on http://127.0.0.1:41234` → 41234.
pub fn parse_listening(line: &str) -> Option<u16> {
    let rest = &line[line.find("listening on http://")? + "listening on http://".len()..];
    let hostport = rest.split(|c: char| c.is_whitespace() || c == '/').next()?;
    hostport.rsplit_once(':')?.1.parse().ok()
}

/// Add a `... <kind> buffer size =   12.34 MiB` line to `m`.
pub fn parse_buffer_line(line: &str, m: &mut Measured) -> bool {
    let Some(idx) = line.find(" buffer size =") else {
        return false;
    };
    let before = &line[..idx];
    let after = line[idx + " buffer size =".len()..].trim();
    let mut parts = after.split_whitespace();
    let (Some(num), Some(unit)) = (parts.next(), parts.next()) else {
        return false;
    };
    let Ok(v) = num.parse::<f64>() else {
        return false;
    };
    let mult = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return false,
    };
    let bytes = (v * mult).round() as u64;
    let kind = before.split_whitespace().last().unwrap_or("");
    match kind {
        "model" => m.model += bytes,
        "KV" => m.kv += bytes,
        "compute" => m.compute += bytes,
        "output" => m.output += bytes,
        _ => return false,
    }
    true
}

impl LlamaCpp {
    /// The command line for `spec`.
    pub fn args(&self, spec: &StartSpec) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-m".into(),
            spec.model_path.display().to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            "0".into(),
            "-c".into(),
            (spec.context * u64::from(spec.parallel)).to_string(),
            "-np".into(),
            spec.parallel.to_string(),
            "-t".into(),
            self.threads.to_string(),
            "--alias".into(),
            spec.alias.clone(),
            "--fit".into(),
            "off".into(),
            "-lv".into(),
            "4".into(),
            "--cache-type-k".into(),
            spec.cache_type.into(),
            "--cache-type-v".into(),
            spec.cache_type.into(),
            "-ngl".into(),
            match (spec.gpu, spec.gpu_layers) {
                (None, _) => "0".into(),
                (Some(_), Some(n)) => n.to_string(),
                (Some(_), None) => "999".into(),
            },
        ];
        if spec.embeddings {
            a.extend(["--embeddings".into(), "--pooling".into(), "mean".into()]);
        }
        if let Some(fa) = spec.flash_attention {
            a.extend(["-fa".into(), if fa { "on" } else { "off" }.into()]);
        }
        a
    }
}

#[tonic::async_trait]
impl Backend for LlamaCpp {
    fn name(&self) -> &'static str {
        "llama.cpp"
    }

    fn kind(&self) -> pb::BackendKind {
        pb::BackendKind::LlamaCpp
    }

    async fn start(&self, spec: &StartSpec) -> Result<Started, BackendError> {
        let api_key = super::new_api_key();
        let mut env = super::engine::cuda_env(spec);
        env.push((API_KEY_ENV.into(), api_key.to_string()));
        let child_spec = ChildSpec {
            program: self.binary.clone(),
            args: self.args(spec),
            env,
        };
        let (tx, mut lines) = mpsc::unbounded_channel();
        let child = process::spawn(&child_spec, Some(tx)).map_err(|e| BackendError::Spawn {
            program: self.binary.display().to_string(),
            reason: e.to_string(),
        })?;
        let started = Instant::now();
        let mut measured = Measured::default();
        let mut port = None;
        let mut exit = child.exit.clone();
        while port.is_none() {
            let left = spec.start_timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                child.stop(Duration::from_secs(2)).await;
                return Err(BackendError::Timeout {
                    secs: spec.start_timeout.as_secs(),
                    tail: child.tail.last(10),
                });
            }
            tokio::select! {
                line = tokio::time::timeout(self.stall_timeout.min(left), lines.recv()) => match line {
                    Ok(Some(l)) => {
                        parse_buffer_line(&l, &mut measured);
                        port = parse_listening(&l);
                    }
                    Ok(None) => {
                        let e = child.wait().await;
                        return Err(BackendError::ExitedDuringStart { exit: e.to_string(), tail: child.tail.last(10) });
                    }
                    Err(_) if started.elapsed() >= spec.start_timeout => continue,
                    Err(_) => {
                        child.stop(Duration::from_secs(2)).await;
                        return Err(BackendError::Stalled { secs: self.stall_timeout.as_secs(), tail: child.tail.last(10) });
                    }
                },
                _ = exit.changed() => {
                    let e = child.wait().await;
                    // Let the pumps flush the last lines.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    return Err(BackendError::ExitedDuringStart { exit: e.to_string(), tail: child.tail.last(10) });
                }
            }
        }
        let port = port.unwrap_or(0);
        let endpoint = format!("http://127.0.0.1:{port}");
        // The port is open once it printed the line; /health confirms the model is loaded.
        loop {
            let ok = self
                .http
                .get(format!("{endpoint}/health"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            if child.exited().is_some() || started.elapsed() >= spec.start_timeout {
                child.stop(Duration::from_secs(2)).await;
                return Err(BackendError::Timeout {
                    secs: spec.start_timeout.as_secs(),
                    tail: child.tail.last(10),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Keep draining its output so the pipe never fills (the pumps also feed the tail).
        tokio::spawn(async move { while lines.recv().await.is_some() {} });
        Ok(Started {
            endpoint,
            port,
            process: Some(child),
            measured: (measured.total() > 0).then_some(measured),
            served_name: spec.alias.clone(),
            api_key: Some(api_key),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_lines_llama_server_prints() {
        assert_eq!(
            parse_listening(
                "0.00.017.419 I srv  llama_server: listening on http://127.0.0.1:32891"
            ),
            Some(32891)
        );
        assert_eq!(
            parse_listening("main: server is listening on http://127.0.0.1:8080 - starting"),
            Some(8080)
        );
        assert_eq!(parse_listening("nothing here"), None);
        let mut m = Measured::default();
        for l in [
            "0.00.012.295 I load_tensors:   CPU_Mapped model buffer size =     0.75 MiB",
            "0.00.012.452 I llama_context:        CPU  output buffer size =     0.00 MiB",
            "0.00.012.539 I llama_kv_cache:        CPU KV buffer size =     1.00 MiB",
            "0.00.013.953 I sched_reserve:        CPU compute buffer size =     4.14 MiB",
            "load_tensors:        CUDA0 model buffer size =  4403.50 MiB",
        ] {
            assert!(parse_buffer_line(l, &mut m), "{l}");
        }
        assert_eq!(m.kv, 1 << 20);
        assert_eq!(m.model, ((0.75 + 4403.5) * 1048576.0_f64).round() as u64);
        assert_eq!(m.compute, (4.14 * 1048576.0_f64).round() as u64);
        assert!(!parse_buffer_line("some other line", &mut m));
    }
}
