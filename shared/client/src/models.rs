//! The registry's catalogue as text: the model table with an estimate at 4096 tokens, and one
//! model in detail with estimates at a few context sizes (`securellm models`, the MCP
//! `list_models` / `show_model` tools).

use std::fmt::Write;

use securellm_common::format_bytes;
use securellm_common::internal_auth::AuthChannel;
use securellm_proto::v1 as pb;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;

/// Context used for the table's estimate column.
pub const DEFAULT_CONTEXT: i64 = 4096;

/// A model format as a word.
pub fn format_name(f: i32) -> &'static str {
    match pb::ModelFormat::try_from(f) {
        Ok(pb::ModelFormat::Gguf) => "gguf",
        Ok(pb::ModelFormat::GgufSplit) => "gguf-split",
        Ok(pb::ModelFormat::Ollama) => "ollama",
        Ok(pb::ModelFormat::Safetensors) => "safetensors",
        _ => "?",
    }
}

/// A model status as a word.
pub fn status_word(s: i32) -> &'static str {
    match pb::ModelStatus::try_from(s) {
        Ok(pb::ModelStatus::Ok) => "ok",
        Ok(pb::ModelStatus::Incomplete) => "incomplete",
        Ok(pb::ModelStatus::Error) => "error",
        _ => "?",
    }
}

/// A parameter count as model cards write it: `8.0B`, `1.5M`.
pub fn params(n: Option<u64>) -> String {
    match n {
        None => "-".into(),
        Some(n) if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        Some(n) if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        Some(n) if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        Some(n) => n.to_string(),
    }
}

/// The registry's estimate for one slot, f16 KV cache, all layers on the GPU (`None` when it
/// cannot estimate).
pub async fn estimate(
    c: &mut ModelRegistryClient<AuthChannel>,
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

/// Every model as a table: name (aliases), format, parameters, quantization, size, context,
/// estimate at [`DEFAULT_CONTEXT`], status.
pub async fn table(c: &mut ModelRegistryClient<AuthChannel>) -> Result<String, tonic::Status> {
    let models = c
        .list_models(pb::ListModelsRequest::default())
        .await?
        .into_inner()
        .models;
    if models.is_empty() {
        return Ok(
            "no models (configure roots with --models DIR, SECURELLM_MODELS or models.roots)\n"
                .into(),
        );
    }
    let mut out = format!(
        "{:<32} {:<11} {:>7} {:<8} {:>10} {:>8} {:>12}  STATUS\n",
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
        let _ = writeln!(
            out,
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
    Ok(out)
}

/// One model (id, alias or name) in detail, with estimates at 2k–32k context.
pub async fn detail(
    c: &mut ModelRegistryClient<AuthChannel>,
    name: &str,
) -> Result<String, tonic::Status> {
    let m = c
        .get_model(pb::GetModelRequest {
            model: name.to_string(),
        })
        .await?
        .into_inner();
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |x| x.to_string());
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        let _ = writeln!(out, "{label:<13} {value}");
    };
    line("id", m.id.clone());
    line("name", m.name.clone());
    if !m.aliases.is_empty() {
        line("aliases", m.aliases.join(", "));
    }
    line("format", format_name(m.format).into());
    line(
        "status",
        format!(
            "{}{}",
            status_word(m.status),
            if m.status_reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", m.status_reason)
            }
        ),
    );
    line("path", m.path.clone());
    line("size", format_bytes(m.size_bytes));
    line("architecture", m.architecture.clone());
    line("parameters", params(m.parameter_count));
    line("quantization", m.quantization.clone());
    line("context", opt(m.context_length));
    line("layers", opt(m.block_count.map(u64::from)));
    line("embedding", opt(m.embedding_length));
    line(
        "heads / kv",
        format!(
            "{} / {}",
            opt(m.head_count.map(u64::from)),
            opt(m.head_count_kv.map(u64::from))
        ),
    );
    line("vocabulary", opt(m.vocab_size));
    line(
        "chat template",
        if m.chat_template_present { "yes" } else { "no" }.into(),
    );
    line(
        "tensors",
        format!(
            "{} ({})",
            opt(m.tensor_count),
            format_bytes(m.tensor_bytes.unwrap_or(0))
        ),
    );
    if let Some(s) = &m.split {
        line("split", format!("{}/{} parts present", s.present, s.count));
    }
    if let Some(o) = &m.ollama {
        line("ollama", format!("{} ({})", o.name_tag, o.model_digest));
    }
    for f in &m.files {
        line(
            "file",
            format!("{} ({})", f.path, format_bytes(f.size_bytes)),
        );
    }
    if m.status == pb::ModelStatus::Ok as i32 {
        out += "\nestimates (1 slot, f16 KV cache, all layers on GPU):\n";
        let _ = writeln!(
            out,
            "  {:>8} {:>10} {:>10} {:>10} {:>10}",
            "CONTEXT", "WEIGHTS", "KV", "COMPUTE", "TOTAL"
        );
        for ctx in [2048, 4096, 8192, 32768] {
            if let Some(e) = estimate(c, &m.id, ctx).await {
                let _ = writeln!(
                    out,
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
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_read_like_model_cards() {
        assert_eq!(params(Some(8_030_000_000)), "8.0B");
        assert_eq!(params(Some(1_500_000)), "1.5M");
        assert_eq!(params(None), "-");
    }

    #[test]
    fn formats_and_statuses_are_words() {
        assert_eq!(format_name(pb::ModelFormat::GgufSplit as i32), "gguf-split");
        assert_eq!(
            status_word(pb::ModelStatus::Incomplete as i32),
            "incomplete"
        );
        assert_eq!(status_word(99), "?");
    }
}
