//! Memory estimates: what a model needs in one configuration, term by term. Pure functions.
//!
//! Checked against the real llama-server (llama.cpp b11434) by `securellm-bench estimate`, which
//! compares every term with the buffer sizes llama-server logs (`-lv 4`) over MHA/GQA/F16/32k-vocab
//! models, contexts 512–8192 per slot, 1 and 4 slots, f16/q8_0 caches, flash attention on and off:
//! weights and KV are exact, the total within 0.4 %.
//!
//! - **Weights**: exact, from the tensor infos. llama.cpp offloads the *last* `n` blocks with
//!   `--n-gpu-layers n`; the output layer goes to the GPU only when `n > block_count`; the token
//!   embedding table stays in host memory.
//! - **KV cache**: per layer `cells × (key_len + value_len) × kv_heads(layer) × bytes/element`.
//!   llama-server started with `-c context×parallel -np parallel` does not unify the cache (its
//!   `--kv-unified` default is on only when `-np` is left to auto): each slot is a stream of
//!   `round256(context)` cells, so `cells = round256(context) × parallel`. Per-layer
//!   `head_count_kv` arrays are honoured (0 = no cache); sliding-window layers hold, per slot,
//!   `min(round256(context), round256(window + ubatch))` cells. Quantized caches (q8_0, q4_0) need
//!   head sizes that are whole 32-element blocks; llama.cpp refuses anything else, so do we.
//! - **Compute buffer**: what llama.cpp's scheduler reserves for the worst-case graph — one
//!   micro-batch of `ub = min(ubatch, cells)` tokens (`-ub`, default 512) attending to a full slot —
//!   plus the host buffer the logits land in. The graph allocator reuses memory as tensors die, so
//!   the buffer is the *peak* of what is live at once, not the sum of all intermediates:
//!   - the KQ mask, an input that lives through the whole graph: `ub × cells_per_slot` (and again
//!     for sliding-window layers' own mask), f16 with flash attention, f32 without;
//!   - then the larger of two phases, in f32:
//!     - attention: `ub × (6·n_embd + n_embd_k_gqa + n_embd_v_gqa)` (residual stream, norm, Q/K/V
//!       and their RoPE'd copies, attention output) and, **without flash attention only**, the
//!       score matrix `ub × cells_per_slot × n_head` (softmax runs in place). Flash attention never
//!       materialises the scores, which is why it is the default here (`-fa auto` turns it on on
//!       CPU and CUDA);
//!     - feed-forward: `ub × (3·n_ff·experts_used + 5·n_embd)` (gate, up and their product, plus
//!       the residual-stream tensors still alive);
//!   - the output buffer: `vocab × parallel` f32 logits (the graph is reserved for one output per
//!     sequence, so the `ub × vocab` logits of a whole micro-batch are never allocated).
//!
//!   Fitted coefficients (6, 3, 5) come from llama-server's own log lines and reproduce them to
//!   ≈ 0.02 MiB on dense llama-style models; the small remainder is graph inputs (token ids,
//!   positions). Not checked against a GPU build (CUDA splits the same graph into a device and a
//!   `CUDA_Host` buffer; counted here as one), partial offload, MoE or sliding-window models.
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
    /// Flash attention (llama.cpp `-fa`; its default `auto` turns it on wherever the backend
    /// supports it, which includes CPU and CUDA).
    #[serde(default = "default_true")]
    pub flash_attention: bool,
}

fn default_true() -> bool {
    true
}

impl Default for EstimateParams {
    fn default() -> Self {
        Self {
            ubatch: 512,
            runtime_overhead: 0,
            flash_attention: true,
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
    if input.cache != CacheType::F16 {
        // llama.cpp refuses a quantized cache whose rows are not whole 32-element blocks.
        for (what, len) in [("key", k_len), ("value", v_len)] {
            if len % 32 != 0 {
                return Err(EstimateError::Invalid {
                    field: "cache_type",
                    message: format!(
                        "a {} KV cache needs the {what} head size ({len}) to be a multiple of 32",
                        input.cache.as_flag()
                    ),
                });
            }
        }
    }
    let kv_heads_default = u64::from(meta.head_count_kv.unwrap_or(heads as u32));
    let parallel = u64::from(input.parallel);
    let per_slot = round_up(input.context, 256);
    let cells = per_slot.saturating_mul(parallel);
    // llama.cpp clamps the micro-batch to the batch, and the batch to the context.
    let ub = params.ubatch.clamp(1, cells);
    // Per slot, like the base cache: min(context, round256(window + ubatch)).
    let swa_per_slot = meta
        .sliding_window
        .map(|w| per_slot.min(round_up(u64::from(w).saturating_add(ub), 256)));
    let swa_cells = swa_per_slot.map(|c| c.saturating_mul(parallel));
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
    let q_heads = meta
        .head_count_per_layer
        .iter()
        .copied()
        .max()
        .map_or(heads, |h| u64::from(h).max(heads));
    let kv_heads = meta
        .head_count_kv_per_layer
        .iter()
        .copied()
        .max()
        .map_or(kv_heads_default, u64::from);
    let any_swa = swa_per_slot.is_some()
        && (meta.sliding_window_layers.is_empty() || meta.sliding_window_layers.contains(&true));
    let compute = compute_buffer(&ComputeShape {
        ub,
        per_slot,
        swa_per_slot: swa_per_slot.filter(|_| any_swa),
        parallel,
        embd,
        embd_kv: (k_len + v_len).saturating_mul(kv_heads),
        q_heads,
        ff_per_token: ff.saturating_mul(u64::from(meta.expert_used_count.unwrap_or(1).max(1))),
        vocab,
        flash_attention: params.flash_attention,
    });
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

/// What the compute-buffer model needs.
struct ComputeShape {
    /// Tokens per micro-batch.
    ub: u64,
    /// KV cells one slot's attention spans (non-SWA layers), and for SWA layers.
    per_slot: u64,
    swa_per_slot: Option<u64>,
    parallel: u64,
    embd: u64,
    /// `n_embd_k_gqa + n_embd_v_gqa`.
    embd_kv: u64,
    q_heads: u64,
    /// Feed-forward width a token goes through (× experts used for MoE).
    ff_per_token: u64,
    vocab: u64,
    flash_attention: bool,
}

/// The compute buffer llama.cpp reserves (`sched_reserve`), plus its logits output buffer. See the
/// module documentation.
fn compute_buffer(s: &ComputeShape) -> u64 {
    const F32: u64 = 4;
    let mask_bytes = if s.flash_attention { 2 } else { F32 };
    let mask =
        s.ub.saturating_mul(s.per_slot.saturating_add(s.swa_per_slot.unwrap_or(0)))
            .saturating_mul(mask_bytes);
    let mut attention =
        s.ub.saturating_mul(s.embd.saturating_mul(6).saturating_add(s.embd_kv))
            .saturating_mul(F32);
    if !s.flash_attention {
        attention = attention.saturating_add(
            s.ub.saturating_mul(s.per_slot)
                .saturating_mul(s.q_heads)
                .saturating_mul(F32),
        );
    }
    let ffn =
        s.ub.saturating_mul(
            s.ff_per_token
                .saturating_mul(3)
                .saturating_add(s.embd.saturating_mul(5)),
        )
        .saturating_mul(F32);
    let output = s.vocab.saturating_mul(s.parallel).saturating_mul(F32);
    mask.saturating_add(attention.max(ffn))
        .saturating_add(output)
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
    fn sliding_window_cells_are_per_slot() {
        // llama.cpp sizes each slot's SWA stream as min(context, round256(window + ubatch)).
        let mut m = meta();
        m.sliding_window = Some(300);
        m.sliding_window_layers = vec![true, false, false, false];
        let b = estimate(&m, input(4096, 3), EstimateParams::default()).unwrap();
        assert_eq!(b.kv_cache, (3 * 1024 + 3 * 3 * 4096) * 64 * 2 * 2);
    }

    #[test]
    fn quantized_caches_need_whole_blocks_per_head() {
        let mut m = meta();
        m.embedding_length = Some(128); // head size 16
        for cache in [CacheType::Q8_0, CacheType::Q4_0] {
            let e = estimate(
                &m,
                EstimateInput {
                    cache,
                    ..input(512, 1)
                },
                EstimateParams::default(),
            );
            assert!(
                matches!(
                    e,
                    Err(EstimateError::Invalid {
                        field: "cache_type",
                        ..
                    })
                ),
                "{e:?}"
            );
        }
        assert!(estimate(&m, input(512, 1), EstimateParams::default()).is_ok());
    }

    fn tiny_meta(opts: &securellm_gguf::testmodels::TinyLlamaOptions) -> Meta {
        let bytes = securellm_gguf::testmodels::tiny_llama(opts).unwrap();
        crate::record::gguf_meta(&securellm_gguf::GgufHeader::from_bytes(&bytes).unwrap()).unwrap()
    }

    /// Compute buffers (incl. the output buffer) llama-server b11434 logged for two test models
    /// at 512 tokens per slot, one slot (`securellm-bench estimate`).
    #[test]
    fn compute_buffer_matches_llama_server_logs() {
        use securellm_gguf::testmodels::TinyLlamaOptions;
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        for (opts, fa_on, fa_off) in [
            (TinyLlamaOptions::default(), 2.64, 6.01),
            (TinyLlamaOptions::bigger(), 14.52, 16.01),
        ] {
            let m = tiny_meta(&opts);
            for (fa, logged) in [(true, fa_on), (false, fa_off)] {
                let p = EstimateParams {
                    flash_attention: fa,
                    ..EstimateParams::default()
                };
                let got = mib(estimate(&m, input(512, 1), p).unwrap().compute_buffer);
                assert!(
                    (got - logged).abs() <= 0.03,
                    "{} fa {fa}: {got:.3} MiB vs {logged} MiB logged",
                    opts.name
                );
            }
        }
    }

    #[test]
    fn compute_buffer_scales_like_llama_cpp() {
        let p = EstimateParams::default();
        let no_fa = EstimateParams {
            flash_attention: false,
            ..p
        };
        let c = |ctx, par, p| {
            estimate(&meta(), input(ctx, par), p)
                .unwrap()
                .compute_buffer
        };
        // With flash attention only the f16 mask grows: ubatch × 2 bytes per cell of a slot.
        assert_eq!(c(2048, 1, p) - c(1024, 1, p), 1024 * 512 * 2);
        // Without, the f32 mask and the scores of all 8 query heads.
        assert_eq!(c(2048, 1, no_fa) - c(1024, 1, no_fa), 1024 * 512 * 4 * 9);
        // Slots only add their logits (vocab 1000, f32): each slot attends to its own cells.
        assert_eq!(c(2048, 4, p) - c(2048, 1, p), 3 * 1000 * 4);
        // The micro-batch shrinks to the context.
        let small = EstimateParams { ubatch: 256, ..p };
        assert_eq!(c(256, 1, p), c(256, 1, small));
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
