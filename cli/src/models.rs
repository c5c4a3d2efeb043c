//! `securellm models`: the registry's catalogue as a table, one model in detail, and rescans with a
//! progress line.

use std::io::Write;

use anyhow::Context;
use clap::Subcommand;
use securellm_common::format_bytes;
use securellm_proto::v1 as pb;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

#[derive(Debug, Subcommand)]
pub enum ModelsAction {
    /// One model in detail, with estimates at a few context sizes.
    Show {
        /// Id, alias or name.
        name: String,
    },
    /// Scan the model roots now (progress bar).
    Rescan {
        /// Re-parse every file, even unchanged ones.
        #[arg(long)]
        full: bool,
    },
}

/// Context used for the table's estimate column.
const DEFAULT_CONTEXT: i64 = 4096;

pub async fn run(endpoint: &str, action: Option<ModelsAction>) -> anyhow::Result<()> {
    let mut c = ModelRegistryClient::connect(endpoint.to_string())
        .await
        .with_context(|| format!("cannot reach the registry at {endpoint}"))?;
    match action {
        None => table(&mut c).await,
        Some(ModelsAction::Show { name }) => show(&mut c, &name).await,
        Some(ModelsAction::Rescan { full }) => rescan(&mut c, full).await,
    }
}

fn format_name(f: i32) -> &'static str {
    match pb::ModelFormat::try_from(f) {
        Ok(pb::ModelFormat::Gguf) => "gguf",
        Ok(pb::ModelFormat::GgufSplit) => "gguf-split",
        Ok(pb::ModelFormat::Ollama) => "ollama",
        Ok(pb::ModelFormat::Safetensors) => "safetensors",
        _ => "?",
    }
}

fn status_word(s: i32) -> &'static str {
    match pb::ModelStatus::try_from(s) {
        Ok(pb::ModelStatus::Ok) => "ok",
        Ok(pb::ModelStatus::Incomplete) => "incomplete",
        Ok(pb::ModelStatus::Error) => "error",
        _ => "?",
    }
}

fn params(n: Option<u64>) -> String {
    match n {
        None => "-".into(),
        Some(n) if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        Some(n) if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        Some(n) if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        Some(n) => n.to_string(),
    }
}

async fn estimate(
    c: &mut ModelRegistryClient<Channel>,
    id: &str,
    context: i64,
) -> Option<pb::MemoryEstimate> {
    c.estimate(pb::EstimateRequest {
        model: id.to_string(),
        context,
        parallel: 1,
        cache_type: pb::KvCacheType::F16 as i32,
        gpu_layers: None,
    })
    .await
    .ok()
    .map(|r| r.into_inner())
}

async fn table(c: &mut ModelRegistryClient<Channel>) -> anyhow::Result<()> {
    let models = c
        .list_models(pb::ListModelsRequest::default())
        .await?
        .into_inner()
        .models;
    if models.is_empty() {
        println!("no models (configure roots with --models DIR, SECURELLM_MODELS or models.roots)");
        return Ok(());
    }
    println!(
        "{:<32} {:<11} {:>7} {:<8} {:>10} {:>8} {:>12}  STATUS",
        "NAME", "FORMAT", "PARAMS", "QUANT", "SIZE", "CONTEXT", "EST@4096"
    );
    for m in &models {
        let est = if m.status == pb::ModelStatus::Ok as i32 {
            estimate(c, &m.id, DEFAULT_CONTEXT)
                .await
                .map_or("-".to_string(), |e| format_bytes(e.total_bytes))
        } else {
            "-".into()
        };
        let status = match pb::ModelStatus::try_from(m.status) {
            Ok(pb::ModelStatus::Ok) => "ok".to_string(),
            _ => format!("{}: {}", status_word(m.status), m.status_reason),
        };
        let mut name = m.name.clone();
        if !m.aliases.is_empty() {
            name = format!("{name} ({})", m.aliases.join(", "));
        }
        println!(
            "{:<32} {:<11} {:>7} {:<8} {:>10} {:>8} {:>12}  {}",
            name,
            format_name(m.format),
            params(m.parameter_count),
            if m.quantization.is_empty() {
                "-"
            } else {
                &m.quantization
            },
            format_bytes(m.size_bytes),
            m.context_length.map_or("-".into(), |c| c.to_string()),
            est,
            status
        );
    }
    Ok(())
}

async fn show(c: &mut ModelRegistryClient<Channel>, name: &str) -> anyhow::Result<()> {
    let m = c
        .get_model(pb::GetModelRequest {
            model: name.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |x| x.to_string());
    println!("id            {}", m.id);
    println!("name          {}", m.name);
    if !m.aliases.is_empty() {
        println!("aliases       {}", m.aliases.join(", "));
    }
    println!("format        {}", format_name(m.format));
    println!(
        "status        {}{}",
        status_word(m.status),
        if m.status_reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", m.status_reason)
        }
    );
    println!("path          {}", m.path);
    println!("size          {}", format_bytes(m.size_bytes));
    println!("architecture  {}", m.architecture);
    println!("parameters    {}", params(m.parameter_count));
    println!("quantization  {}", m.quantization);
    println!("context       {}", opt(m.context_length));
    println!("layers        {}", opt(m.block_count.map(u64::from)));
    println!("embedding     {}", opt(m.embedding_length));
    println!(
        "heads / kv    {} / {}",
        opt(m.head_count.map(u64::from)),
        opt(m.head_count_kv.map(u64::from))
    );
    println!("vocabulary    {}", opt(m.vocab_size));
    println!(
        "chat template {}",
        if m.chat_template_present { "yes" } else { "no" }
    );
    println!(
        "tensors       {} ({})",
        opt(m.tensor_count),
        format_bytes(m.tensor_bytes.unwrap_or(0))
    );
    if let Some(s) = &m.split {
        println!("split         {}/{} parts present", s.present, s.count);
    }
    if let Some(o) = &m.ollama {
        println!("ollama        {} ({})", o.name_tag, o.model_digest);
    }
    for f in &m.files {
        println!("file          {} ({})", f.path, format_bytes(f.size_bytes));
    }
    if m.status == pb::ModelStatus::Ok as i32 {
        println!("\nestimates (1 slot, f16 KV cache, all layers on GPU):");
        println!(
            "  {:>8} {:>10} {:>10} {:>10} {:>10}",
            "CONTEXT", "WEIGHTS", "KV", "COMPUTE", "TOTAL"
        );
        for ctx in [2048, 4096, 8192, 32768] {
            if let Some(e) = estimate(c, &m.id, ctx).await {
                println!(
                    "  {:>8} {:>10} {:>10} {:>10} {:>10}{}",
                    ctx,
                    format_bytes(e.weights_gpu_bytes + e.weights_host_bytes),
                    format_bytes(e.kv_cache_bytes),
                    format_bytes(e.compute_buffer_bytes),
                    format_bytes(e.total_bytes),
                    if e.from_measurement {
                        "  (measured)"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    Ok(())
}

/// `[#####.....] 512/1000 files` on one line, redrawn.
pub fn progress_bar(done: u64, total: u64) -> String {
    const W: u64 = 30;
    let filled = (done.min(total) * W).checked_div(total).unwrap_or(W);
    format!(
        "[{}{}] {done}/{total} files",
        "#".repeat(filled as usize),
        ".".repeat((W - filled) as usize)
    )
}

async fn rescan(c: &mut ModelRegistryClient<Channel>, full: bool) -> anyhow::Result<()> {
    let mut s = c
        .rescan(pb::RescanRequest {
            roots: Vec::new(),
            full,
        })
        .await?
        .into_inner();
    let mut out = std::io::stderr();
    while let Some(p) = s.next().await {
        let p = p?;
        for f in &p.failures {
            let _ = writeln!(out, "\r\x1b[Kfailed: {}: {}", f.path, f.reason);
        }
        let done = p.files_parsed + p.files_unchanged + p.files_failed;
        let _ = write!(
            out,
            "\r\x1b[K{}",
            progress_bar(done, p.files_total.unwrap_or(p.files_seen))
        );
        let _ = out.flush();
        if p.done {
            let _ = writeln!(out);
            println!(
                "scanned {} files: {} parsed, {} unchanged, {} failed; models +{} ~{} -{} in {} ms",
                p.files_seen,
                p.files_parsed,
                p.files_unchanged,
                p.files_failed,
                p.models_added,
                p.models_changed,
                p.models_removed,
                p.elapsed_ms
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_bar_fills_in_proportion() {
        assert_eq!(
            progress_bar(0, 10),
            format!("[{}] 0/10 files", ".".repeat(30))
        );
        assert_eq!(
            progress_bar(5, 10),
            format!("[{}{}] 5/10 files", "#".repeat(15), ".".repeat(15))
        );
        assert!(progress_bar(3, 0).starts_with(&format!("[{}]", "#".repeat(30))));
    }

    #[test]
    fn parameter_counts_read_like_model_cards() {
        assert_eq!(params(Some(8_030_000_000)), "8.0B");
        assert_eq!(params(Some(1_500_000)), "1.5M");
        assert_eq!(params(None), "-");
    }
}
