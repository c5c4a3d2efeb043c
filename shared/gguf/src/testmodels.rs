//! Deterministic test-model generators for other crates' tests and benchmarks.
//!
//! * [`tiny_llama`] builds a random-weight llama model that the real llama.cpp
//!   `llama-server` loads and generates from (the recipe recorded in DEPENDENCIES.md: llama
//!   metadata, a SentencePiece-style vocabulary with byte fallback, ChatML template). The
//!   output layer strongly disfavours control, unknown and byte tokens, so replies are
//!   printable text that runs to `max_tokens`. [`TinyLlamaOptions::bigger`] gives a
//!   tens-of-megabytes variant.
//! * [`realistic_header_model`] builds a file whose *header* looks like a real 7B-class model
//!   (hundreds of tensors, a 32k-entry vocabulary, typical metadata) for scan benchmarks. By
//!   default tensor shapes are shrunk to one block so the file stays under a megabyte and is
//!   fully valid (data inside the file); with `full_shapes` and
//!   [`write_realistic_header_model`] the real shapes are declared and the multi-gigabyte data
//!   section is left as holes in a sparse file.
//!
//! Everything is a pure function of the options (seeded with a small built-in PRNG,
//! splitmix64), so a fixed seed gives byte-identical files.

use std::collections::HashSet;
use std::path::Path;

use crate::error::GgufError;
use crate::info::SplitInfo;
use crate::types::{GgmlType, f32_to_f16_bits};
use crate::writer::GgufWriter;

/// The splitmix64 generator: tiny, fast, and identical on every platform.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform float in `[-1, 1)`.
    pub fn next_signed(&mut self) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        unit * 2.0 - 1.0
    }

    /// A uniform integer in `0..n` (`n > 0`; slightly biased, fine for tests).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Weight storage type for [`tiny_llama`] matrices (norms are always F32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightType {
    /// 32-bit floats (`general.file_type` 0).
    F32,
    /// Half floats (`general.file_type` 1).
    F16,
}

/// Shape and content options for [`tiny_llama`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyLlamaOptions {
    /// `general.name`.
    pub name: String,
    /// Embedding length (n_embd); a multiple of `n_head` with an even head size.
    pub n_embd: u32,
    /// Number of layers (blocks).
    pub n_layer: u32,
    /// Attention heads.
    pub n_head: u32,
    /// KV heads (divides `n_head`).
    pub n_head_kv: u32,
    /// Feed-forward length.
    pub n_ff: u32,
    /// Trained context length (`llama.context_length`).
    pub context_length: u32,
    /// Vocabulary size, at least [`TINY_MIN_VOCAB`].
    pub vocab_size: u32,
    /// Matrix storage type.
    pub weight_type: WeightType,
    /// PRNG seed for the weights.
    pub seed: u64,
}

/// Smallest vocabulary [`tiny_llama`] accepts: 5 special tokens, 256 byte tokens, `▁` and the
/// 94 printable ASCII characters.
pub const TINY_MIN_VOCAB: u32 = 5 + 256 + 1 + 94;
/// Largest vocabulary [`tiny_llama`] accepts.
pub const TINY_MAX_VOCAB: u32 = 65_536;

impl Default for TinyLlamaOptions {
    /// n_embd 64, 2 layers, 4 heads (4 KV heads), n_ff 256, context 2048, 512 tokens, F32:
    /// about 0.7 MB.
    fn default() -> Self {
        Self {
            name: "tiny-llama".to_owned(),
            n_embd: 64,
            n_layer: 2,
            n_head: 4,
            n_head_kv: 4,
            n_ff: 256,
            context_length: 2048,
            vocab_size: 512,
            weight_type: WeightType::F32,
            seed: 0x5ec0_11a3,
        }
    }
}

impl TinyLlamaOptions {
    /// A bigger variant for benchmarks: n_embd 512, 8 layers, 8 heads (4 KV heads), n_ff
    /// 1536, F16 weights: about 45 MB.
    pub fn bigger() -> Self {
        Self {
            name: "tiny-llama-bigger".to_owned(),
            n_embd: 512,
            n_layer: 8,
            n_head: 8,
            n_head_kv: 4,
            n_ff: 1536,
            weight_type: WeightType::F16,
            ..Self::default()
        }
    }

    fn validate(&self) -> Result<(), GgufError> {
        let bad = |reason: String| Err(GgufError::InvalidInput { reason });
        if self.n_embd == 0 || self.n_head == 0 || self.n_head_kv == 0 {
            return bad("n_embd, n_head and n_head_kv must be positive".to_owned());
        }
        if !self.n_embd.is_multiple_of(self.n_head)
            || !(self.n_embd / self.n_head).is_multiple_of(2)
        {
            return bad(format!(
                "n_embd {} must be a multiple of n_head {} with an even head size",
                self.n_embd, self.n_head
            ));
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad(format!(
                "n_head_kv {} must divide n_head {}",
                self.n_head_kv, self.n_head
            ));
        }
        if self.n_layer == 0 || self.n_layer > 256 || self.n_ff == 0 || self.context_length == 0 {
            return bad("n_layer must be 1..=256, n_ff and context_length positive".to_owned());
        }
        if self.n_embd > 8192 || self.n_ff > 65_536 {
            return bad("n_embd must be at most 8192 and n_ff at most 65536".to_owned());
        }
        if !(TINY_MIN_VOCAB..=TINY_MAX_VOCAB).contains(&self.vocab_size) {
            return bad(format!(
                "vocab_size {} must be in {TINY_MIN_VOCAB}..={TINY_MAX_VOCAB}",
                self.vocab_size
            ));
        }
        Ok(())
    }
}

/// SentencePiece token types (`tokenizer.ggml.token_type`).
mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const BYTE: i32 = 6;
}

/// The ChatML template written as `tokenizer.chat_template`.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const SPECIAL_TOKENS: [(&str, i32); 5] = [
    ("<unk>", token_type::UNKNOWN),
    ("<s>", token_type::CONTROL),
    ("</s>", token_type::CONTROL),
    ("<|im_start|>", token_type::CONTROL),
    ("<|im_end|>", token_type::CONTROL),
];

const COMMON_WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are",
    "as", "with", "his", "they", "at", "be", "this", "have", "from", "or", "one", "had", "by",
    "word", "but", "not", "what", "all", "were", "we", "when", "your", "can", "said", "there",
    "use", "an", "each", "which", "she", "do", "how", "their", "if", "will", "up", "other",
    "about", "out", "many", "then", "them", "these", "so", "some", "her", "would", "make", "like",
    "him", "into", "time", "has", "look", "two", "more", "write", "go", "see", "number", "no",
    "way", "could", "people", "my", "than", "first", "water", "been", "call", "who", "oil", "its",
    "now", "find", "long", "down", "day", "did", "get", "come", "made", "may", "part", "hello",
    "world", "model", "server", "token", "secure", "local", "data", "test", "answer", "question",
    "ing", "ed", "er", "ly", "es", "th", "he", "in", "an", "re", "on", "at", "en", "nd", "st",
    "or", "te", "ti", "ar", "al", "ou", "it", "is", "le", "ve",
];

/// Token strings, scores and types of the tiny byte-level SentencePiece vocabulary:
/// specials, the 256 `<0xNN>` byte tokens, then `▁`, printable ASCII, `▁`-prefixed letters and
/// words, and letter pairs and triples until `size` tokens. Longer pieces score higher.
fn tiny_vocab(size: usize) -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens: Vec<String> = Vec::with_capacity(size);
    let mut types: Vec<i32> = Vec::with_capacity(size);
    for (t, ty) in SPECIAL_TOKENS {
        tokens.push(t.to_owned());
        types.push(ty);
    }
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(token_type::BYTE);
    }
    let first_normal = tokens.len();
    let mut seen: HashSet<String> = HashSet::new();
    let letters: Vec<char> = ('a'..='z').collect();
    let mut candidates: Vec<String> = vec!["\u{2581}".to_owned()];
    candidates.extend((0x21u8..=0x7e).map(|b| char::from(b).to_string()));
    candidates.extend(letters.iter().map(|c| format!("\u{2581}{c}")));
    for w in COMMON_WORDS {
        candidates.push(format!("\u{2581}{w}"));
        candidates.push((*w).to_owned());
    }
    'fill: for prefix in ["\u{2581}", ""] {
        for a in &letters {
            for b in &letters {
                if candidates.len() >= size * 2 {
                    break 'fill;
                }
                candidates.push(format!("{prefix}{a}{b}"));
            }
        }
    }
    'fill3: for a in &letters {
        for b in &letters {
            for c in &letters {
                if candidates.len() >= size * 2 {
                    break 'fill3;
                }
                candidates.push(format!("\u{2581}{a}{b}{c}"));
            }
        }
    }
    // Then any number of further unique pieces, for large vocabularies.
    let more = (0u64..).flat_map(|k| {
        let w = letters_for(k);
        [format!("\u{2581}{w}"), w]
    });
    for c in candidates.into_iter().chain(more) {
        if tokens.len() >= size {
            break;
        }
        if seen.insert(c.clone()) {
            tokens.push(c);
            types.push(token_type::NORMAL);
        }
    }
    let n = tokens.len().max(1) as f32;
    let scores = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if i < first_normal {
                0.0
            } else {
                // Longer pieces first; earlier pieces win ties.
                t.chars().count() as f32 * 10.0 - i as f32 / n
            }
        })
        .collect();
    (tokens, scores, types)
}

fn random_matrix(
    rng: &mut SplitMix64,
    n: usize,
    scale: f32,
    weight_type: WeightType,
) -> (GgmlType, Vec<u8>) {
    match weight_type {
        WeightType::F32 => {
            let mut out = Vec::with_capacity(n * 4);
            for _ in 0..n {
                out.extend_from_slice(&(rng.next_signed() * scale).to_le_bytes());
            }
            (GgmlType::F32, out)
        }
        WeightType::F16 => {
            let mut out = Vec::with_capacity(n * 2);
            for _ in 0..n {
                out.extend_from_slice(&f32_to_f16_bits(rng.next_signed() * scale).to_le_bytes());
            }
            (GgmlType::F16, out)
        }
    }
}

fn size_label(params: u64) -> String {
    let p = params as f64;
    if p >= 1e9 {
        format!("{:.0}B", (p / 1e9).round())
    } else if p >= 1e6 {
        format!("{:.0}M", (p / 1e6).round())
    } else {
        format!("{:.0}K", (p / 1e3).round().max(1.0))
    }
}

/// A [`GgufWriter`] holding the tiny llama model, for callers that want to adjust metadata
/// (e.g. add `split.*` keys) before writing.
pub fn tiny_llama_writer(opts: &TinyLlamaOptions) -> Result<GgufWriter, GgufError> {
    opts.validate()?;
    let n_embd = u64::from(opts.n_embd);
    let n_vocab = u64::from(opts.vocab_size);
    let n_ff = u64::from(opts.n_ff);
    let head_dim = n_embd / u64::from(opts.n_head);
    let n_embd_kv = head_dim * u64::from(opts.n_head_kv);
    let (tokens, scores, types) = tiny_vocab(opts.vocab_size as usize);
    let mut rng = SplitMix64::new(opts.seed);
    let ne = n_embd as usize;

    let params = 2 * n_embd * n_vocab
        + n_embd
        + u64::from(opts.n_layer)
            * (2 * n_embd + 2 * n_embd * n_embd + 2 * n_embd * n_embd_kv + 3 * n_embd * n_ff);

    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama")?
        .add_metadata("general.name", opts.name.as_str())?
        .add_metadata("general.size_label", size_label(params))?
        .add_metadata(
            "general.file_type",
            match opts.weight_type {
                WeightType::F32 => 0u32,
                WeightType::F16 => 1u32,
            },
        )?
        .add_metadata("llama.context_length", opts.context_length)?
        .add_metadata("llama.embedding_length", opts.n_embd)?
        .add_metadata("llama.block_count", opts.n_layer)?
        .add_metadata("llama.feed_forward_length", opts.n_ff)?
        .add_metadata("llama.attention.head_count", opts.n_head)?
        .add_metadata("llama.attention.head_count_kv", opts.n_head_kv)?
        .add_metadata("llama.attention.layer_norm_rms_epsilon", 1e-5f32)?
        .add_metadata("llama.rope.dimension_count", head_dim as u32)?
        .add_metadata("llama.rope.freq_base", 10_000f32)?
        .add_metadata("llama.vocab_size", opts.vocab_size)?
        .add_metadata("tokenizer.ggml.model", "llama")?
        .add_metadata("tokenizer.ggml.tokens", tokens)?
        .add_metadata("tokenizer.ggml.scores", scores)?
        .add_metadata("tokenizer.ggml.token_type", types.clone())?
        .add_metadata("tokenizer.ggml.bos_token_id", 1u32)?
        .add_metadata("tokenizer.ggml.eos_token_id", 2u32)?
        .add_metadata("tokenizer.ggml.unknown_token_id", 0u32)?
        .add_metadata("tokenizer.ggml.add_bos_token", true)?
        .add_metadata("tokenizer.ggml.add_eos_token", false)?
        .add_metadata("tokenizer.chat_template", CHATML_TEMPLATE)?;

    // Embeddings: dimension 0 is a large constant in every token, so after RMS norm the
    // hidden state always has a big positive component 0 that the output layer can use as a
    // bias. The layers' random weights are small, so they cannot flip it.
    let mut embd = Vec::with_capacity(ne * n_vocab as usize);
    for _ in 0..n_vocab {
        embd.extend(std::iter::once(4.0f32).chain((1..ne).map(|_| rng.next_signed() * 0.5)));
    }

    let (embd_type, embd_bytes) = match opts.weight_type {
        WeightType::F32 => (
            GgmlType::F32,
            embd.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        WeightType::F16 => (
            GgmlType::F16,
            embd.iter()
                .flat_map(|&v| f32_to_f16_bits(v).to_le_bytes())
                .collect(),
        ),
    };
    drop(embd);
    w.add_tensor(
        "token_embd.weight",
        &[n_embd, n_vocab],
        embd_type,
        embd_bytes,
    )?;

    let ones = vec![1.0f32; ne];
    let scale = 0.05;
    for l in 0..opts.n_layer {
        let mut matrix = |w: &mut GgufWriter, name: &str, rows: u64, cols: u64| {
            let (ty, data) =
                random_matrix(&mut rng, (rows * cols) as usize, scale, opts.weight_type);
            w.add_tensor(format!("blk.{l}.{name}.weight"), &[rows, cols], ty, data)
                .map(|_| ())
        };
        w.add_tensor_f32(format!("blk.{l}.attn_norm.weight"), &[n_embd], &ones)?;
        matrix(&mut w, "attn_q", n_embd, n_embd)?;
        matrix(&mut w, "attn_k", n_embd, n_embd_kv)?;
        matrix(&mut w, "attn_v", n_embd, n_embd_kv)?;
        matrix(&mut w, "attn_output", n_embd, n_embd)?;
        w.add_tensor_f32(format!("blk.{l}.ffn_norm.weight"), &[n_embd], &ones)?;
        matrix(&mut w, "ffn_gate", n_embd, n_ff)?;
        matrix(&mut w, "ffn_up", n_embd, n_ff)?;
        matrix(&mut w, "ffn_down", n_ff, n_embd)?;
    }
    w.add_tensor_f32("output_norm.weight", &[n_embd], &ones)?;

    // Output: normal tokens read the constant component with +1, every control, unknown and
    // byte token with -8, so the latter sit tens of logits below any printable piece.
    let mut output = Vec::with_capacity(ne * n_vocab as usize);
    for &ty in &types {
        output.push(if ty == token_type::NORMAL {
            1.0f32
        } else {
            -8.0
        });
        for _ in 1..ne {
            output.push(rng.next_signed());
        }
    }
    match opts.weight_type {
        WeightType::F32 => w.add_tensor_f32("output.weight", &[n_embd, n_vocab], &output)?,
        WeightType::F16 => w.add_tensor_f16("output.weight", &[n_embd, n_vocab], &output)?,
    };
    Ok(w)
}

/// The tiny llama model as bytes (see the module docs).
pub fn tiny_llama(opts: &TinyLlamaOptions) -> Result<Vec<u8>, GgufError> {
    tiny_llama_writer(opts)?.to_bytes()
}

/// Writes the tiny llama model to `path`; returns the file length.
pub fn write_tiny_llama(path: impl AsRef<Path>, opts: &TinyLlamaOptions) -> Result<u64, GgufError> {
    tiny_llama_writer(opts)?.write_file(path)
}

/// Options for [`realistic_header_model`]. The default looks like a Llama-2-7B Q4_K_M file:
/// 32 layers (291 tensors), a 32000-token vocabulary, n_embd 4096, n_ff 11008.
#[derive(Debug, Clone, PartialEq)]
pub struct RealisticHeaderOptions {
    /// `general.name`.
    pub name: String,
    /// `general.architecture` (the `{arch}.*` keys use it).
    pub architecture: String,
    /// PRNG seed (vocabulary order, scores).
    pub seed: u64,
    /// Vocabulary size (entries in `tokenizer.ggml.tokens`); at least 262.
    pub vocab_size: u32,
    /// Layers; each has 9 tensors.
    pub n_layer: u32,
    /// Embedding length.
    pub n_embd: u64,
    /// Feed-forward length.
    pub n_ff: u64,
    /// Attention heads.
    pub n_head: u32,
    /// KV heads.
    pub n_head_kv: u32,
    /// Trained context length.
    pub context_length: u32,
    /// Type of the weight matrices (norms are F32).
    pub tensor_type: GgmlType,
    /// `general.file_type` (15 = Q4_K_M).
    pub file_type: u32,
    /// Declare real tensor shapes (only with [`write_realistic_header_model`], which leaves
    /// the data as sparse-file holes). When false, every tensor is shrunk to one block so the
    /// file is small and self-contained.
    pub full_shapes: bool,
    /// Write `split.no` / `split.count` / `split.tensors.count` as a shard would have.
    pub split: Option<SplitInfo>,
}

impl Default for RealisticHeaderOptions {
    fn default() -> Self {
        Self {
            name: "Realistic Llama 7B".to_owned(),
            architecture: "llama".to_owned(),
            seed: 7,
            vocab_size: 32_000,
            n_layer: 32,
            n_embd: 4096,
            n_ff: 11_008,
            n_head: 32,
            n_head_kv: 32,
            context_length: 4096,
            tensor_type: GgmlType::Q4K,
            file_type: 15,
            full_shapes: false,
            split: None,
        }
    }
}

/// A longer, realistic chat template (~1 KB) for realistic headers.
const REALISTIC_TEMPLATE: &str = "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = 'You are a helpful assistant.' %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n{{- '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}\n{%- for message in loop_messages %}\n    {%- if message['role'] == 'user' %}\n        {{- '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n' }}\n    {%- elif message['role'] == 'assistant' %}\n        {{- '<|im_start|>assistant\\n' + message['content'] + '<|im_end|>\\n' }}\n    {%- elif message['role'] == 'tool' %}\n        {{- '<|im_start|>tool\\n' + message['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- raise_exception('Unknown role: ' + message['role']) }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

/// Bijective base-26 letters for `n` (0 → "a", 25 → "z", 26 → "aa", ...).
fn letters_for(mut n: u64) -> String {
    let mut out = Vec::new();
    loop {
        out.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

fn realistic_writer(opts: &RealisticHeaderOptions) -> Result<GgufWriter, GgufError> {
    let arch = opts.architecture.as_str();
    if opts.vocab_size < 262 || opts.n_layer == 0 || opts.n_head == 0 || opts.n_head_kv == 0 {
        return Err(GgufError::InvalidInput {
            reason: "vocab_size must be >= 262 and n_layer, n_head, n_head_kv positive".to_owned(),
        });
    }
    if opts.n_layer > 4096 {
        return Err(GgufError::InvalidInput {
            reason: "n_layer must be at most 4096".to_owned(),
        });
    }
    let mut rng = SplitMix64::new(opts.seed);
    let n = opts.vocab_size as usize;
    let mut tokens: Vec<String> = Vec::with_capacity(n);
    let mut types: Vec<i32> = Vec::with_capacity(n);
    for (t, ty) in SPECIAL_TOKENS {
        tokens.push(t.to_owned());
        types.push(ty);
    }
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(token_type::BYTE);
    }
    // Seeded offset so different seeds give different (still unique) vocabularies.
    let base = rng.below(1 << 20);
    let mut i = 0u64;
    while tokens.len() < n {
        let word = letters_for(base + i / 2);
        tokens.push(if i.is_multiple_of(2) {
            format!("\u{2581}{word}")
        } else {
            word
        });
        types.push(token_type::NORMAL);
        i += 1;
    }
    let scores: Vec<f32> = (0..n).map(|i| -(i as f32)).collect();

    let head_dim = opts.n_embd / u64::from(opts.n_head);
    let n_embd_kv = head_dim * u64::from(opts.n_head_kv);
    let (e, f, v) = (opts.n_embd, opts.n_ff, u64::from(opts.vocab_size));
    let matrices: [(&str, u64, u64); 7] = [
        ("attn_q", e, e),
        ("attn_k", e, n_embd_kv),
        ("attn_v", e, n_embd_kv),
        ("attn_output", e, e),
        ("ffn_gate", e, f),
        ("ffn_up", e, f),
        ("ffn_down", f, e),
    ];
    let params = 2 * e * v
        + e
        + u64::from(opts.n_layer) * (2 * e + matrices.iter().map(|m| m.1 * m.2).sum::<u64>());

    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", arch)?
        .add_metadata("general.type", "model")?
        .add_metadata("general.name", opts.name.as_str())?
        .add_metadata("general.basename", "realistic")?
        .add_metadata("general.size_label", size_label(params))?
        .add_metadata("general.license", "apache-2.0")?
        .add_metadata("general.tags", vec!["text-generation", "test"])?
        .add_metadata("general.languages", vec!["en"])?
        .add_metadata(format!("{arch}.block_count"), opts.n_layer)?
        .add_metadata(format!("{arch}.context_length"), opts.context_length)?
        .add_metadata(format!("{arch}.embedding_length"), opts.n_embd as u32)?
        .add_metadata(format!("{arch}.feed_forward_length"), opts.n_ff as u32)?
        .add_metadata(format!("{arch}.attention.head_count"), opts.n_head)?
        .add_metadata(format!("{arch}.attention.head_count_kv"), opts.n_head_kv)?
        .add_metadata(format!("{arch}.rope.freq_base"), 10_000f32)?
        .add_metadata(format!("{arch}.attention.layer_norm_rms_epsilon"), 1e-5f32)?
        .add_metadata(format!("{arch}.rope.dimension_count"), head_dim as u32)?
        .add_metadata(format!("{arch}.vocab_size"), opts.vocab_size)?
        .add_metadata("general.file_type", opts.file_type)?
        .add_metadata("tokenizer.ggml.model", "llama")?
        .add_metadata("tokenizer.ggml.pre", "default")?
        .add_metadata("tokenizer.ggml.tokens", tokens)?
        .add_metadata("tokenizer.ggml.scores", scores)?
        .add_metadata("tokenizer.ggml.token_type", types)?
        .add_metadata("tokenizer.ggml.bos_token_id", 1u32)?
        .add_metadata("tokenizer.ggml.eos_token_id", 2u32)?
        .add_metadata("tokenizer.ggml.unknown_token_id", 0u32)?
        .add_metadata("tokenizer.ggml.add_bos_token", true)?
        .add_metadata("tokenizer.ggml.add_eos_token", false)?
        .add_metadata("tokenizer.chat_template", REALISTIC_TEMPLATE)?
        .add_metadata("general.quantization_version", 2u32)?;
    if let Some(s) = &opts.split {
        w.add_metadata("split.no", s.index as u16)?
            .add_metadata("split.count", s.count as u16)?
            .add_metadata(
                "split.tensors.count",
                s.total_tensors.unwrap_or(0).min(i32::MAX as u64) as i32,
            )?;
    }

    let ty = opts.tensor_type;
    // Shrunk shapes: one block per matrix, a few floats per norm.
    let shape = |rows: u64, cols: u64| -> Vec<u64> {
        if opts.full_shapes {
            vec![rows, cols]
        } else {
            vec![ty.block_size(), 1]
        }
    };
    let norm = |len: u64| -> Vec<u64> { if opts.full_shapes { vec![len] } else { vec![8] } };
    w.add_tensor_zeroed("token_embd.weight", &shape(e, v), ty)?;
    for l in 0..opts.n_layer {
        w.add_tensor_zeroed(format!("blk.{l}.attn_norm.weight"), &norm(e), GgmlType::F32)?;
        for (name, rows, cols) in &matrices[..4] {
            w.add_tensor_zeroed(format!("blk.{l}.{name}.weight"), &shape(*rows, *cols), ty)?;
        }
        w.add_tensor_zeroed(format!("blk.{l}.ffn_norm.weight"), &norm(e), GgmlType::F32)?;
        for (name, rows, cols) in &matrices[4..] {
            w.add_tensor_zeroed(format!("blk.{l}.{name}.weight"), &shape(*rows, *cols), ty)?;
        }
    }
    w.add_tensor_zeroed("output_norm.weight", &norm(e), GgmlType::F32)?;
    w.add_tensor_zeroed("output.weight", &shape(e, v), ty)?;
    Ok(w)
}

/// A small file with a realistic header (see [`RealisticHeaderOptions`]); tensor shapes are
/// shrunk to one block each, so with the defaults the file is about 0.7 MB, almost all of it
/// vocabulary. Fails if `opts.full_shapes` is set (use [`write_realistic_header_model`]).
pub fn realistic_header_model(opts: &RealisticHeaderOptions) -> Result<Vec<u8>, GgufError> {
    if opts.full_shapes {
        return Err(GgufError::InvalidInput {
            reason: "full_shapes needs a sparse file: use write_realistic_header_model".to_owned(),
        });
    }
    realistic_writer(opts)?.to_bytes()
}

/// Writes a realistic-header model to `path`; returns the file length. With
/// `opts.full_shapes` the tensors have their real shapes and the data section (gigabytes) is
/// a hole in a sparse file, so the header reports real sizes at almost no disk cost.
pub fn write_realistic_header_model(
    path: impl AsRef<Path>,
    opts: &RealisticHeaderOptions,
) -> Result<u64, GgufError> {
    realistic_writer(opts)?.write_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_deterministic_and_in_range() {
        let mut a = SplitMix64::new(1);
        let mut b = SplitMix64::new(1);
        for _ in 0..1000 {
            let x = a.next_signed();
            assert_eq!(x, b.next_signed());
            assert!((-1.0..1.0).contains(&x));
        }
    }

    #[test]
    fn tiny_vocab_has_unique_tokens_and_expected_layout() {
        for size in [
            TINY_MIN_VOCAB as usize,
            512,
            2000,
            20_000,
            TINY_MAX_VOCAB as usize,
        ] {
            let (tokens, scores, types) = tiny_vocab(size);
            assert_eq!(tokens.len(), size);
            assert_eq!(scores.len(), size);
            assert_eq!(types.len(), size);
            let unique: HashSet<&String> = tokens.iter().collect();
            assert_eq!(unique.len(), size);
            assert_eq!(tokens[5], "<0x00>");
            assert_eq!(tokens[260], "<0xFF>");
            assert_eq!(tokens[261], "\u{2581}");
            assert!(tokens.iter().all(|t| !t.contains(' ')));
        }
    }

    #[test]
    fn letters_are_bijective() {
        assert_eq!(letters_for(0), "a");
        assert_eq!(letters_for(25), "z");
        assert_eq!(letters_for(26), "aa");
        assert_eq!(letters_for(27), "ab");
        let all: HashSet<String> = (0..5000).map(letters_for).collect();
        assert_eq!(all.len(), 5000);
    }

    #[test]
    fn size_labels() {
        assert_eq!(size_label(6_738_415_616), "7B");
        assert_eq!(size_label(1_500_000), "2M");
        assert_eq!(size_label(300), "1K");
    }
}
