//! Memory estimates: what a model needs in one configuration, term by term. Pure functions.
//!
//! - **Weights**: exact, from the tensor infos. llama.cpp offloads the *last* `n` blocks with
//!   `--n-gpu-layers n`; the output layer goes to the GPU only when `n > block_count`; the token
//!   embedding table stays in host memory.
//! - **KV cache**: per layer `cells × (key_len + value_len) × kv_heads(layer) × bytes/element`,
//!   with `cells = round256(context) × parallel` (llama-server gives each slot `context` cells,
//!   rounded up to 256). Per-layer `head_count_kv` arrays are honoured (0 = no cache); sliding-window
//!   layers hold at most `round256(window × parallel + ubatch)` cells.
//! - **Compute buffer**: approximate — the largest intermediate tensors of one micro-batch
//!   (`ubatch` = 512 tokens): the attention scores `ubatch × cells_per_slot × heads` and the logits
//!   `ubatch × vocab`, in f32, plus activations. Calibrated against llama-server's own log lines by
//!   `securellm-bench estimate`.
//! - **Runtime overhead**: a fixed configurable amount (CUDA context, cuBLAS workspace).

use serde::{Deserialize, Serialize};

use crate::record::Meta;

/// KV cache element types llama.cpp supports for `--cache-type-k/v`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CacheType {
    F16,
    Q8_0,
    Q4_0,
}

impl CacheType {
    /// Bytes per 32 elements.
    fn bytes_per_32(self) -> u64 {
        match self {
            CacheType::F16 => 64,
            CacheType::Q8_0 => 34,
            CacheType::Q4_0 => 18,
        }
    }

    /// The llama.cpp flag value.
    pub fn as_flag(self) -> &'static str {
        match self {
            CacheType::F16 => "f16",
            CacheType::Q8_0 => "q8_0",
            CacheType::Q4_0 => "q4_0",
        }
    }
}

/// A configuration to estimate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EstimateInput {
    /// Tokens per slot.
    pub context: u64,
    pub parallel: u32,
    pub cache: CacheType,
    /// `--n-gpu-layers`; `None` = all (block_count + 1).
    pub gpu_layers: Option<u32>,
}

/// Tunables that are not properties of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EstimateParams {
    /// Micro-batch size (llama.cpp `-ub`, default 512).
    pub ubatch: u64,
    /// Fixed runtime overhead on the GPU.
    pub runtime_overhead: u64,
}

impl Default for EstimateParams {
    fn default() -> Self {
        Self {
            ubatch: 512,
            runtime_overhead: 0,
        }
    }
}

/// The answer, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Breakdown {
    pub gpu_layers: u32,
    pub block_count: u32,
    pub weights_gpu: u64,
    pub weights_host: u64,
    pub kv_cache: u64,
    pub kv_cache_gpu: u64,
    pub compute_buffer: u64,
    pub runtime_overhead: u64,
}

impl Breakdown {
    pub fn total(&self) -> u64 {
        self.weights_gpu
            .saturating_add(self.weights_host)
            .saturating_add(self.kv_cache)
            .saturating_add(self.compute_buffer)
            .saturating_add(self.runtime_overhead)
    }

    /// What a lease must cover.
    pub fn gpu_bytes(&self) -> u64 {
        if self.gpu_layers == 0 {
            return 0;
        }
        self.weights_gpu
            .saturating_add(self.kv_cache_gpu)
            .saturating_add(self.compute_buffer)
            .saturating_add(self.runtime_overhead)
    }
}

/// Why an estimate cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EstimateError {
    #[error("invalid `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("the model's metadata lacks {0}, which the estimate needs")]
    Missing(&'static str),
}

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to).saturating_mul(to)
}

/// The largest context accepted (tokens per slot).
pub const MAX_CONTEXT: u64 = 1 << 24;
/// The most parallel slots accepted.
pub const MAX_PARALLEL: u32 = 1024;

/// Estimate `meta` in configuration `input`.
pub fn estimate(
    meta: &Meta,
    input: EstimateInput,
    params: EstimateParams,
) -> Result<Breakdown, EstimateError> {
    if input.context == 0 || input.context > MAX_CONTEXT {
        return Err(EstimateError::Invalid {
            field: "context",
            message: format!("must be 1..={MAX_CONTEXT} tokens, got {}", input.context),
        });
    }
    if input.parallel == 0 || input.parallel > MAX_PARALLEL {
        return Err(EstimateError::Invalid {
            field: "parallel",
            message: format!("must be 1..={MAX_PARALLEL}, got {}", input.parallel),
        });
    }
    let blocks = meta
        .block_count
        .ok_or(EstimateError::Missing("block_count"))?;
    let embd = meta
        .embedding_length
        .ok_or(EstimateError::Missing("embedding_length"))?;
    let heads = u64::from(
        meta.head_count
            .ok_or(EstimateError::Missing("head_count"))?
            .max(1),
    );
    let tensor_bytes = meta
        .tensor_bytes
        .ok_or(EstimateError::Missing("tensor infos"))?;
    let k_len = meta.key_length.map_or(embd / heads, u64::from);
    let v_len = meta.value_length.map_or(embd / heads, u64::from);
    let kv_heads_default = u64::from(meta.head_count_kv.unwrap_or(heads as u32));
    let per_slot = round_up(input.context, 256);
    let cells = per_slot.saturating_mul(u64::from(input.parallel));
    let swa_cells = meta.sliding_window.map(|w| {
        cells.min(round_up(
            u64::from(w) * u64::from(input.parallel) + params.ubatch,
            256,
        ))
    });
    let n_gpu = input
        .gpu_layers
        .unwrap_or(blocks.saturating_add(1))
        .min(blocks.saturating_add(1));
    let first_gpu_block = blocks.saturating_sub(n_gpu.min(blocks));

    let mut kv = 0u64;
    let mut kv_gpu = 0u64;
    let mut weights_gpu = 0u64;
    for layer in 0..blocks as usize {
        let kvh = meta
            .head_count_kv_per_layer
            .get(layer)
            .map_or(kv_heads_default, |&h| u64::from(h));
        let is_swa = swa_cells.is_some()
            && (meta.sliding_window_layers.is_empty()
                || meta
                    .sliding_window_layers
                    .get(layer)
                    .copied()
                    .unwrap_or(false));
        let c = if is_swa {
            swa_cells.unwrap_or(cells)
        } else {
            cells
        };
        let bytes = c
            .saturating_mul((k_len + v_len).saturating_mul(kvh))
            .saturating_mul(input.cache.bytes_per_32())
            / 32;
        kv = kv.saturating_add(bytes);
        if layer as u32 >= first_gpu_block {
            kv_gpu = kv_gpu.saturating_add(bytes);
            weights_gpu =
                weights_gpu.saturating_add(meta.layer_bytes.get(layer).copied().unwrap_or(0));
        }
    }
    if n_gpu > blocks {
        weights_gpu = weights_gpu.saturating_add(meta.output_bytes);
    }
    let weights_gpu = weights_gpu.min(tensor_bytes);
    let vocab = meta.vocab_size.unwrap_or(32_000);
    let ff = meta.feed_forward_length.unwrap_or(4 * embd);
    let ub = params.ubatch.min(per_slot);
    // Attention scores of one micro-batch against one slot's cells, for all heads (f32), the
    // logits of the micro-batch, and the widest activations (f32).
    let attention = ub
        .saturating_mul(per_slot)
        .saturating_mul(heads)
        .saturating_mul(4);
    let logits = ub.saturating_mul(vocab).saturating_mul(4);
    let activations = ub
        .saturating_mul(embd.saturating_mul(3).saturating_add(ff * 2))
        .saturating_mul(4);
    let compute = attention.saturating_add(logits).saturating_add(activations);
    Ok(Breakdown {
        gpu_layers: n_gpu,
        block_count: blocks,
        weights_gpu,
        weights_host: tensor_bytes - weights_gpu,
        kv_cache: kv,
        kv_cache_gpu: kv_gpu,
        compute_buffer: compute,
        runtime_overhead: params.runtime_overhead,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            block_count: Some(4),
            embedding_length: Some(256),
            head_count: Some(8),
            head_count_kv: Some(2),
            vocab_size: Some(1000),
            feed_forward_length: Some(512),
            tensor_bytes: Some(10_000),
            layer_bytes: vec![2000, 2000, 2000, 2000],
            token_embd_bytes: 1000,
            output_bytes: 1000,
            ..Meta::default()
        }
    }

    fn input(context: u64, parallel: u32) -> EstimateInput {
        EstimateInput {
            context,
            parallel,
            cache: CacheType::F16,
            gpu_layers: None,
        }
    }

    #[test]
    fn kv_cache_follows_the_formula() {
        // 4 layers × 512 cells × (32 + 32) × 2 kv heads × 2 bytes.
        let b = estimate(&meta(), input(500, 1), EstimateParams::default()).unwrap();
        assert_eq!(b.kv_cache, 4 * 512 * 64 * 2 * 2);
        let b2 = estimate(&meta(), input(500, 3), EstimateParams::default()).unwrap();
        assert_eq!(b2.kv_cache, 3 * b.kv_cache);
        let q8 = estimate(
            &meta(),
            EstimateInput {
                cache: CacheType::Q8_0,
                ..input(500, 1)
            },
            EstimateParams::default(),
        )
        .unwrap();
        assert_eq!(q8.kv_cache, 4 * 512 * 64 * 2 * 34 / 32);
    }

    #[test]
    fn per_layer_kv_heads_and_sliding_window_are_honoured() {
        let mut m = meta();
        m.head_count_kv_per_layer = vec![2, 0, 2, 0];
        let b = estimate(&m, input(4096, 1), EstimateParams::default()).unwrap();
        assert_eq!(b.kv_cache, 2 * 4096 * 64 * 2 * 2);
        let mut m = meta();
        m.sliding_window = Some(256);
        m.sliding_window_layers = vec![true, true, true, false];
        let b = estimate(&m, input(8192, 1), EstimateParams::default()).unwrap();
        assert_eq!(b.kv_cache, (3 * 768 + 8192) * 64 * 2 * 2);
    }

    #[test]
    fn gpu_layers_split_weights_like_llama_cpp() {
        let p = EstimateParams::default();
        let all = estimate(&meta(), input(512, 1), p).unwrap();
        assert_eq!((all.weights_gpu, all.weights_host), (9000, 1000));
        let two = estimate(
            &meta(),
            EstimateInput {
                gpu_layers: Some(2),
                ..input(512, 1)
            },
            p,
        )
        .unwrap();
        assert_eq!((two.weights_gpu, two.weights_host), (4000, 6000));
        assert_eq!(two.kv_cache_gpu * 2, two.kv_cache);
        let cpu = estimate(
            &meta(),
            EstimateInput {
                gpu_layers: Some(0),
                ..input(512, 1)
            },
            p,
        )
        .unwrap();
        assert_eq!((cpu.weights_gpu, cpu.gpu_bytes()), (0, 0));
        assert_eq!(
            all.total(),
            cpu.total(),
            "offloading moves memory, it does not create it"
        );
    }

    #[test]
    fn refuses_impossible_configurations_and_missing_metadata() {
        let p = EstimateParams::default();
        assert!(matches!(
            estimate(&meta(), input(0, 1), p),
            Err(EstimateError::Invalid {
                field: "context",
                ..
            })
        ));
        assert!(matches!(
            estimate(&meta(), input(512, 0), p),
            Err(EstimateError::Invalid {
                field: "parallel",
                ..
            })
        ));
        assert!(matches!(
            estimate(&meta(), input(u64::MAX, 1), p),
            Err(EstimateError::Invalid { .. })
        ));
        assert!(matches!(
            estimate(&Meta::default(), input(512, 1), p),
            Err(EstimateError::Missing(_))
        ));
    }
}
