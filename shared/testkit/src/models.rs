//! Model files for the registry: tiny GGUF llamas, an Ollama store, a Hugging Face folder.

use std::path::{Path, PathBuf};

use securellm_gguf::testmodels::{TinyLlamaOptions, tiny_llama, write_tiny_llama};

/// The tiny llama named `name` with weights from `seed`.
pub fn tiny(name: &str, seed: u64) -> TinyLlamaOptions {
    TinyLlamaOptions {
        name: name.into(),
        seed,
        ..TinyLlamaOptions::default()
    }
}

/// Write `<dir>/<name>.gguf`: [`tiny`]`(name, seed)`; returns its path.
pub fn write_tiny(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let path = dir.join(format!("{name}.gguf"));
    write_tiny_llama(&path, &tiny(name, seed))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// [`write_tiny`] for each name, with seeds 1, 2, 3, ... (so that every model differs).
pub fn write_tinies(dir: &Path, names: &[&str]) {
    for (i, name) in names.iter().enumerate() {
        write_tiny(dir, name, 1 + i as u64);
    }
}

/// A model in an Ollama store under `root/ollama` (manifest → GGUF blob); returns `name:tag`.
pub fn write_ollama(root: &Path, model: &str, tag: &str, seed: u64) -> String {
    let store = root.join("ollama");
    std::fs::create_dir_all(store.join("blobs")).unwrap();
    let bytes = tiny_llama(&tiny(model, seed)).unwrap();
    let hex = format!("{:064x}", bytes.len() as u128 * 7919 + seed as u128);
    std::fs::write(store.join("blobs").join(format!("sha256-{hex}")), &bytes).unwrap();
    let dir = store
        .join("manifests/registry.ollama.ai/library")
        .join(model);
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{hex}"), "size": bytes.len()},
        ]
    });
    std::fs::write(dir.join(tag), serde_json::to_vec(&manifest).unwrap()).unwrap();
    format!("{model}:{tag}")
}

/// A Hugging Face folder `root/name`: `config.json` + `model.safetensors` (a small Mistral).
pub fn write_safetensors(root: &Path, name: &str) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&serde_json::json!({
            "model_type": "mistral", "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "hidden_size": 64, "intermediate_size": 128,
            "max_position_embeddings": 4096, "vocab_size": 1000, "torch_dtype": "bfloat16"
        }))
        .unwrap(),
    )
    .unwrap();
    registry::safetensors::write_test_file(
        &dir.join("model.safetensors"),
        &[
            ("model.embed_tokens.weight", "BF16", &[1000, 64]),
            ("lm_head.weight", "BF16", &[1000, 64]),
        ],
    )
    .unwrap();
}
