//! Memory-estimate accuracy: the registry's estimate (`registry::estimate`) against what the real
//! llama-server allocates, as it logs it with `-lv 4` (`model buffer size`, `KV buffer size`,
//! `compute buffer size`, `output buffer size`, summed over devices).
//!
//! Generates tiny llama GGUF files of several shapes (MHA, GQA, F16, a 32k vocabulary) into a
//! temporary directory and starts llama-server once per configuration — context per slot ×
//! parallel slots × KV cache type, plus flash attention off for f16 caches — exactly as the
//! backend does (`-c context×parallel -np parallel`, `--fit off` so nothing is changed behind our
//! back). Each server is stopped as soon as it listens (SIGTERM, then SIGKILL after 2 s).
//!
//! A configuration llama-server refuses (a q8_0 cache on a model whose head size is not a multiple
//! of 32) must be refused by the registry too; such cases count as `refused_cases`, and any
//! disagreement fails the run.
//!
//! The error of a case is on the total of the three logged terms (weights + KV + compute, the
//! output buffer counted with compute); the runtime overhead is not part of it (0 by default and
//! not logged).

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use registry::estimate::{Breakdown, CacheType, EstimateInput, EstimateParams, estimate};
use registry::record::gguf_meta;
use securellm_gguf::GgufHeader;
use securellm_gguf::testmodels::{TinyLlamaOptions, WeightType, write_tiny_llama};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The llama-server binary; else `scripts/install-llama-server.sh` (which reuses its cached
    /// build), else `llama-server` on PATH.
    #[arg(long, env = "LLAMA_SERVER")]
    llama_server: Option<PathBuf>,
    /// Tokens per slot (the registry's `context`), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [512u64, 1000, 2048, 8192])]
    contexts: Vec<u64>,
    /// Parallel slots, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 4])]
    parallel: Vec<u32>,
    /// KV cache types (f16, q8_0, q4_0), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = ["f16".to_string(), "q8_0".to_string()])]
    cache_types: Vec<String>,
    /// Skip the flash-attention-off cases.
    #[arg(long)]
    no_fa_off: bool,
    /// Write the models here (kept) instead of a temporary directory.
    #[arg(long)]
    models_dir: Option<PathBuf>,
    /// Seconds one llama-server may take to load.
    #[arg(long, default_value_t = 60)]
    start_timeout_s: u64,
    /// Exit non-zero when a case's total error exceeds this (percent).
    #[arg(long)]
    fail_above_pct: Option<f64>,
}

const MIB: f64 = (1u64 << 20) as f64;

fn cache_type(s: &str) -> anyhow::Result<CacheType> {
    Ok(match s {
        "f16" => CacheType::F16,
        "q8_0" => CacheType::Q8_0,
        "q4_0" => CacheType::Q4_0,
        _ => bail!("unknown cache type `{s}` (f16, q8_0, q4_0)"),
    })
}

/// The test models: (label, options).
fn models() -> Vec<(&'static str, TinyLlamaOptions)> {
    let tiny = TinyLlamaOptions::default();
    vec![
        ("tiny", tiny.clone()),
        (
            "tiny-gqa",
            TinyLlamaOptions {
                name: "tiny-gqa".into(),
                n_embd: 256,
                n_layer: 4,
                n_head: 8,
                n_head_kv: 2,
                n_ff: 768,
                ..tiny.clone()
            },
        ),
        ("bigger-f16", TinyLlamaOptions::bigger()),
        (
            "vocab32k-f16",
            TinyLlamaOptions {
                name: "vocab32k".into(),
                n_embd: 128,
                n_layer: 2,
                n_head: 4,
                n_head_kv: 4,
                n_ff: 512,
                vocab_size: 32_000,
                weight_type: WeightType::F16,
                ..tiny
            },
        ),
    ]
}

/// Find llama-server: the flag / `$LLAMA_SERVER`, else the install script, else PATH.
fn find_llama_server(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        ensure!(p.is_file(), "llama-server `{}` does not exist", p.display());
        return Ok(p);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-llama-server.sh");
    if script.is_file() {
        eprintln!(
            "finding llama-server with {} (builds it if it is not cached: minutes)",
            script.display()
        );
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if let Some(last) = stdout.lines().rev().find(|l| !l.trim().is_empty()) {
            let p = PathBuf::from(last.trim());
            if out.status.success() && p.is_file() {
                return Ok(p);
            }
        }
        eprintln!("install script failed ({}); trying PATH", out.status);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("llama-server"))
        .find(|p| p.is_file())
        .context("no llama-server: pass --llama-server PATH or set LLAMA_SERVER")
}

/// A running llama-server; stopped (and reaped) on drop, so none outlives the bench.
struct Server {
    child: Child,
}

impl Server {
    /// SIGTERM, up to 2 s to exit, then SIGKILL.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One configuration.
#[derive(Clone, Copy, Debug)]
struct Case {
    context: u64,
    parallel: u32,
    cache: CacheType,
    flash_attn: bool,
}

/// What llama-server logged, in MiB, summed over devices.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Logged {
    weights: f64,
    kv: f64,
    compute: f64,
    output: f64,
}

/// Sum the `<device> <term> buffer size = X MiB` lines of a `-lv 4` log.
fn parse_log(text: &str) -> Logged {
    let mut l = Logged::default();
    for line in text.lines() {
        for (key, slot) in [
            (" model buffer size =", &mut l.weights),
            (" KV buffer size =", &mut l.kv),
            (" compute buffer size =", &mut l.compute),
            (" output buffer size =", &mut l.output),
        ] {
            if let Some(i) = line.find(key) {
                let v = line[i + key.len()..]
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<f64>().ok());
                if let Some(v) = v {
                    *slot += v;
                }
            }
        }
    }
    l
}

/// Start llama-server for `case`, wait until it listens, stop it, return its log.
fn run_server(
    bin: &Path,
    model: &Path,
    case: Case,
    log_path: &Path,
    timeout: Duration,
) -> anyhow::Result<String> {
    let log = File::create(log_path)?;
    let ctx = case.context * u64::from(case.parallel);
    let mut cmd = Command::new(bin);
    cmd.arg("-m")
        .arg(model)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "-t",
            "1",
            "--fit",
            "off",
        ])
        .args(["-lv", "4"])
        .args(["-c", &ctx.to_string(), "-np", &case.parallel.to_string()])
        .args(["--cache-type-k", case.cache.as_flag()])
        .args(["--cache-type-v", case.cache.as_flag()])
        .args(["-fa", if case.flash_attn { "auto" } else { "off" }])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut server = Server {
        child: cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
    };
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log_path).unwrap_or_default();
        if text.contains("listening on") {
            server.stop();
            return Ok(std::fs::read_to_string(log_path).unwrap_or(text));
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            bail!(
                "llama-server exited ({status}) before listening:\n{}",
                tail(&text, 15)
            );
        }
        if start.elapsed() > timeout {
            server.stop();
            bail!(
                "llama-server did not listen within {timeout:?}:\n{}",
                tail(&text, 15)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB
}

/// One measured case.
struct Row {
    model: &'static str,
    case: Case,
    est: Breakdown,
    log: Logged,
}

impl Row {
    fn est_total(&self) -> f64 {
        mib(self.est.weights_gpu
            + self.est.weights_host
            + self.est.kv_cache
            + self.est.compute_buffer)
    }
    fn log_compute(&self) -> f64 {
        self.log.compute + self.log.output
    }
    fn log_total(&self) -> f64 {
        self.log.weights + self.log.kv + self.log_compute()
    }
    fn error_pct(&self) -> f64 {
        (self.est_total() - self.log_total()) / self.log_total() * 100.0
    }
    /// Equal to the logged value's printed precision (2 decimals per KV buffer line).
    fn kv_exact(&self) -> bool {
        (mib(self.est.kv_cache) - self.log.kv).abs() <= 0.0051
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let bin = find_llama_server(a.llama_server)?;
    let caches = a
        .cache_types
        .iter()
        .map(|s| cache_type(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tmp = tempfile::tempdir()?;
    let dir = match &a.models_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.path().to_path_buf(),
    };
    let log_path = tmp.path().join("llama-server.log");
    let params = EstimateParams::default();
    println!("llama-server: {}", bin.display());
    println!(
        "estimate params: ubatch {} (llama.cpp default), flash attention {} (llama-server `-fa auto` on CPU)",
        params.ubatch,
        if params.flash_attention { "on" } else { "off" }
    );

    let mut cases = Vec::new();
    for &context in &a.contexts {
        for &parallel in &a.parallel {
            for &cache in &caches {
                cases.push(Case {
                    context,
                    parallel,
                    cache,
                    flash_attn: true,
                });
            }
            if !a.no_fa_off {
                cases.push(Case {
                    context,
                    parallel,
                    cache: CacheType::F16,
                    flash_attn: false,
                });
            }
        }
    }

    let t0 = Instant::now();
    let mut rows = Vec::new();
    let mut refused = 0usize;
    println!(
        "{:<13} {:>6} {:>2} {:<5} {:<3} | {:>17} | {:>17} | {:>17} | {:>17} | {:>7}",
        "model",
        "ctx",
        "np",
        "cache",
        "fa",
        "weights est/log",
        "KV est/log",
        "compute est/log",
        "total est/log",
        "err %"
    );
    for (label, opts) in models() {
        let path = dir.join(format!("{label}.gguf"));
        write_tiny_llama(&path, &opts).with_context(|| format!("writing {}", path.display()))?;
        let header = GgufHeader::open(&path)?;
        let meta = gguf_meta(&header).map_err(anyhow::Error::msg)?;
        for &case in &cases {
            let p = EstimateParams {
                flash_attention: case.flash_attn,
                ..params
            };
            let est = estimate(
                &meta,
                EstimateInput {
                    context: case.context,
                    parallel: case.parallel,
                    cache: case.cache,
                    gpu_layers: None,
                },
                p,
            );
            let served = run_server(
                &bin,
                &path,
                case,
                &log_path,
                Duration::from_secs(a.start_timeout_s),
            );
            let (est, text) = match (est, served) {
                (Ok(est), Ok(text)) => (est, text),
                (Err(e), Err(_)) => {
                    println!(
                        "{:<13} {:>6} {:>2} {:<5} {:<3} | both refuse: {e}",
                        label,
                        case.context,
                        case.parallel,
                        case.cache.as_flag(),
                        if case.flash_attn { "on" } else { "off" },
                    );
                    refused += 1;
                    continue;
                }
                (Ok(_), Err(e)) => {
                    return Err(e.context(format!(
                        "{label} {case:?}: llama-server refuses a configuration the registry estimates"
                    )));
                }
                (Err(e), Ok(_)) => {
                    bail!("{label} {case:?}: the registry refuses ({e}) what llama-server runs")
                }
            };
            let log = parse_log(&text);
            ensure!(
                log.weights > 0.0 && log.kv > 0.0 && log.compute > 0.0,
                "{label} {case:?}: no buffer sizes in the log (is it `-lv 4` capable?):\n{}",
                tail(&text, 15)
            );
            let row = Row {
                model: label,
                case,
                est,
                log,
            };
            println!(
                "{:<13} {:>6} {:>2} {:<5} {:<3} | {:>8.2}/{:>8.2} | {:>8.2}/{:>8.2} | {:>8.2}/{:>8.2} | {:>8.2}/{:>8.2} | {:>+7.2}",
                row.model,
                case.context,
                case.parallel,
                case.cache.as_flag(),
                if case.flash_attn { "on" } else { "off" },
                mib(est.weights_gpu + est.weights_host),
                log.weights,
                mib(est.kv_cache),
                log.kv,
                mib(est.compute_buffer),
                row.log_compute(),
                row.est_total(),
                row.log_total(),
                row.error_pct()
            );
            rows.push(row);
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let n = rows.len();
    ensure!(n > 0, "no cases");
    let errs: Vec<f64> = rows.iter().map(|r| r.error_pct().abs()).collect();
    let max = errs.iter().copied().fold(0.0, f64::max);
    let mean = errs.iter().sum::<f64>() / n as f64;
    let kv_exact = rows.iter().filter(|r| r.kv_exact()).count();
    let compute_errs: Vec<f64> = rows
        .iter()
        .map(|r| ((mib(r.est.compute_buffer) - r.log_compute()) / r.log_compute() * 100.0).abs())
        .collect();
    let compute_max = compute_errs.iter().copied().fold(0.0, f64::max);
    let mut worst = String::new();
    if let Some((i, _)) = errs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)) {
        let r = &rows[i];
        let _ = write!(
            worst,
            "{} ctx {} np {} {} fa {}",
            r.model,
            r.case.context,
            r.case.parallel,
            r.case.cache.as_flag(),
            r.case.flash_attn
        );
    }
    println!(
        "{n} cases in {elapsed:.1} s; worst total error: {worst}; largest compute-term error {compute_max:.1} %"
    );
    println!(
        "RESULT max_error_pct={max:.2} mean_error_pct={mean:.2} cases={n} kv_exact_cases={kv_exact} refused_cases={refused}"
    );
    if let Some(limit) = a.fail_above_pct {
        ensure!(max <= limit, "max error {max:.2} % > {limit} %");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_sums_buffer_lines() {
        let log = "\
0.00.004.900 I load_tensors:   CPU_Mapped model buffer size =     0.75 MiB
0.00.004.900 I load_tensors:        CUDA0 model buffer size =    10.50 MiB
0.00.005.115 I llama_context:        CPU  output buffer size =     0.01 MiB
0.00.005.468 I llama_kv_cache:        CPU KV buffer size =     1.00 MiB
0.00.006.027 I llama_kv_cache: size =    1.00 MiB (   512 cells,   2 layers,  4/4 seqs), K (f16):    0.50 MiB
0.00.006.851 I sched_reserve:        CPU compute buffer size =     4.14 MiB
0.00.006.851 I sched_reserve:      CUDA0 compute buffer size =   100.00 MiB
";
        let l = parse_log(log);
        assert_eq!(
            l,
            Logged {
                weights: 11.25,
                kv: 1.0,
                compute: 104.14,
                output: 0.01
            }
        );
    }
}
