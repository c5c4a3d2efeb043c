//! Registry scan speed: 1,000 GGUF files with realistic headers (≈300 tensors, a 50k-token
//! vocabulary) in a temporary directory. Measures a cold full scan into a fresh SQLite database
//! and an unchanged rescan, and — the baseline — the PyPI `gguf` package's `GGUFReader` reading
//! the same files' metadata, in the same run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use registry::catalog;
use registry::estimate::EstimateParams;
use registry::store::Store;
use securellm_gguf::testmodels::{RealisticHeaderOptions, write_realistic_header_model};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of model files.
    #[arg(long, default_value_t = 1000)]
    files: usize,
    /// Vocabulary size of each file.
    #[arg(long, default_value_t = 50_000)]
    vocab: u32,
    /// Files the Python baseline reads (it is slow: ~0.5 s per file with a 50k vocabulary); the
    /// ratio compares per-file rates.
    #[arg(long, default_value_t = 20)]
    python_files: usize,
    /// Python interpreter with the `gguf` package (make bench-registry sets up a venv).
    #[arg(long, default_value = "python3", env = "SECURELLM_BENCH_PYTHON")]
    python: String,
}

const PY: &str = r#"
import sys, time, os
from gguf import GGUFReader
d = sys.argv[1]
files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith('.gguf'))[:int(sys.argv[2])]
t = time.perf_counter()
n = 0
for f in files:
    r = GGUFReader(f)
    n += len(r.fields) + len(r.tensors)
print(time.perf_counter() - t, len(files), n)
"#;

fn python_baseline(python: &str, dir: &Path, files: usize) -> anyhow::Result<(f64, usize)> {
    let out = std::process::Command::new(python)
        .args(["-c", PY])
        .arg(dir)
        .arg(files.to_string())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "python baseline failed (is the `gguf` package installed for {python}? `make bench-registry` installs it): {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );
    let s = String::from_utf8_lossy(&out.stdout);
    let mut it = s.split_whitespace();
    let secs: f64 = it.next().unwrap_or("0").parse()?;
    let files: usize = it.next().unwrap_or("0").parse()?;
    Ok((secs, files))
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root: PathBuf = tmp.path().join("models");
    std::fs::create_dir_all(&root)?;
    let t = Instant::now();
    for i in 0..a.files {
        let opts = RealisticHeaderOptions {
            name: format!("Realistic {i}"),
            seed: i as u64,
            vocab_size: a.vocab,
            ..RealisticHeaderOptions::default()
        };
        write_realistic_header_model(root.join(format!("model-{i:05}.gguf")), &opts)?;
    }
    let bytes: u64 = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "generated {} files ({:.1} MiB, {}-token vocabularies) in {:.1} s",
        a.files,
        bytes as f64 / (1 << 20) as f64,
        a.vocab,
        t.elapsed().as_secs_f64()
    );

    let store = Store::open(&tmp.path().join("registry.db")).await?;
    let cat = catalog::spawn(
        store,
        vec![root.clone()],
        Default::default(),
        EstimateParams::default(),
    )
    .await?;
    let t = Instant::now();
    let cold = cat.rescan(Vec::new(), false, None).await?;
    let cold_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        cold.added as usize == a.files && cold.files_failed == 0,
        "cold scan: {cold:?}"
    );
    println!(
        "cold scan:      {:>8.1} ms  ({:.0} files/s)",
        cold_s * 1e3,
        a.files as f64 / cold_s
    );

    let mut unchanged = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let p = cat.rescan(Vec::new(), false, None).await?;
        unchanged.push(t.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(
            p.files_parsed == 0 && p.files_unchanged as usize == a.files,
            "rescan: {p:?}"
        );
    }
    unchanged.sort_by(f64::total_cmp);
    let rescan_us = unchanged[unchanged.len() / 2];
    println!("unchanged scan: {:>8.1} ms  (median of 5)", rescan_us / 1e3);

    let want = a.python_files.clamp(1, a.files);
    let (py_s, py_files) = python_baseline(&a.python, &root, want)?;
    anyhow::ensure!(py_files == want, "python read {py_files} of {want} files");
    let py_rate = py_files as f64 / py_s;
    let rust_rate = a.files as f64 / cold_s;
    println!(
        "python gguf.GGUFReader: {py_files} files in {:.1} ms  ({py_rate:.1} files/s)",
        py_s * 1e3
    );
    let ratio = rust_rate / py_rate;
    println!(
        "RESULT files={} cold_scan_files_per_s={:.0} cold_scan_ms={:.1} rescan_unchanged_us={:.0} python_files_per_s={:.0} vs_python_x={:.1}",
        a.files,
        a.files as f64 / cold_s,
        cold_s * 1e3,
        rescan_us,
        py_rate,
        ratio
    );
    Ok(())
}
