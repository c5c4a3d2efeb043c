//! Bounded, deterministic mutation fuzzing of the header reader, run as an ordinary test.
//!
//! A seed corpus of generated files (tiny llama, realistic header, split shard, edge cases)
//! goes through a few thousand mutations each run: bit flips, overwrites with interesting
//! values, length fields inflated to 2^32/2^40/2^60/u64::MAX, truncations, insertions and
//! deletions. Each parse must return (Ok or Err) without panicking, within a time bound, and
//! without allocating more than a small multiple of the input (measured by a counting global
//! allocator in this test binary). The seed is fixed so failures reproduce; set
//! `GGUF_FUZZ_ITERS` to run longer locally. The cargo-fuzz target in `fuzz/` covers the same
//! entry point with coverage guidance.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use securellm_gguf::testmodels::{
    RealisticHeaderOptions, SplitMix64, TinyLlamaOptions, realistic_header_model, tiny_llama,
};
use securellm_gguf::{GgmlType, GgufHeader, GgufWriter, ModelInfo, SplitInfo};

/// Counts live and peak bytes allocated by the current thread.
struct CountingAlloc;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LIVE.try_with(|live| {
            let now = live.get() + layout.size();
            live.set(now);
            let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
        });
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(layout.size())));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Runs `f` and returns its result with the peak bytes it allocated beyond what was live.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get).saturating_sub(base);
    (out, peak)
}

fn corpus() -> Vec<(&'static str, Vec<u8>)> {
    let tiny = tiny_llama(&TinyLlamaOptions {
        n_embd: 8,
        n_layer: 2,
        n_head: 2,
        n_head_kv: 1,
        n_ff: 16,
        ..TinyLlamaOptions::default()
    })
    .unwrap();
    let realistic = realistic_header_model(&RealisticHeaderOptions {
        vocab_size: 3000,
        n_layer: 6,
        ..RealisticHeaderOptions::default()
    })
    .unwrap();
    let shard = realistic_header_model(&RealisticHeaderOptions {
        vocab_size: 300,
        n_layer: 2,
        architecture: "qwen2".to_owned(),
        split: Some(SplitInfo {
            index: 1,
            count: 4,
            total_tensors: Some(100),
        }),
        ..RealisticHeaderOptions::default()
    })
    .unwrap();
    let mut aligned = GgufWriter::new();
    aligned.set_alignment(64).unwrap();
    aligned
        .add_metadata("general.architecture", "gemma3")
        .unwrap()
        .add_metadata("gemma3.block_count", 2u32)
        .unwrap()
        .add_metadata("gemma3.attention.head_count_kv", vec![1u32, 2])
        .unwrap()
        .add_metadata("gemma3.attention.sliding_window_pattern", vec![true, false])
        .unwrap()
        .add_tensor_zeroed("blk.0.x", &[256], GgmlType::Q4K)
        .unwrap()
        .add_tensor_zeroed("blk.1.x", &[32], GgmlType::Q8_0)
        .unwrap();
    vec![
        ("tiny_llama", tiny),
        ("realistic", realistic),
        ("split_shard", shard),
        ("all_value_types", common::small_valid_file()),
        ("aligned_per_layer", aligned.to_bytes().unwrap()),
        ("empty", GgufWriter::new().to_bytes().unwrap()),
    ]
}

const INTERESTING_U64: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 60,
    i64::MAX as u64,
    u64::MAX,
];

/// Positions worth aiming at: the counts, and the length prefixes of the first strings.
fn length_field_positions(data: &[u8]) -> Vec<usize> {
    let mut out = vec![8, 16, 24];
    let mut i = 24;
    // Walk a few key/length fields heuristically: any u64 whose value is a small length.
    while i + 8 <= data.len().min(4096) {
        let v = u64::from_le_bytes(data[i..i + 8].try_into().unwrap());
        if (1..=200).contains(&v) {
            out.push(i);
        }
        i += 1;
    }
    out
}

fn mutate(rng: &mut SplitMix64, seed: &[u8], hot: &[usize], header_end: usize) -> Vec<u8> {
    let mut data = seed.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        if data.is_empty() {
            data.push(rng.next_u64() as u8);
        }
        // Most mutations land in the header, where the parser looks.
        let span = header_end.clamp(1, data.len());
        let pos = rng.below(span as u64) as usize;
        match rng.below(8) {
            0 => data[pos] ^= 1 << rng.below(8),
            1 => data[pos] = [0u8, 0xff, 0x7f, 0x80, 1][rng.below(5) as usize],
            2 | 3 => {
                let at = if rng.below(2) == 0 && !hot.is_empty() {
                    hot[rng.below(hot.len() as u64) as usize]
                } else {
                    pos
                };
                let v = INTERESTING_U64[rng.below(INTERESTING_U64.len() as u64) as usize];
                let width = [4usize, 8][rng.below(2) as usize];
                let bytes = v.to_le_bytes();
                for (k, &byte) in bytes.iter().enumerate().take(width) {
                    if let Some(b) = data.get_mut(at + k) {
                        *b = byte;
                    }
                }
            }
            4 => data.truncate(rng.below(data.len() as u64 + 1) as usize),
            5 => {
                let n = 1 + rng.below(16) as usize;
                let insert: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                data.splice(pos..pos, insert);
            }
            6 => {
                let n = (1 + rng.below(16) as usize).min(data.len() - pos);
                data.drain(pos..pos + n);
            }
            _ => {
                // Copy a chunk from elsewhere (duplicates keys, tensor infos).
                let from = rng.below(span as u64) as usize;
                let n = (1 + rng.below(64) as usize)
                    .min(data.len() - from)
                    .min(data.len() - pos);
                let chunk = data[from..from + n].to_vec();
                data[pos..pos + n].copy_from_slice(&chunk);
            }
        }
    }
    data
}

fn iterations() -> u64 {
    std::env::var("GGUF_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

#[test]
fn corpus_is_valid() {
    for (name, bytes) in corpus() {
        let h = GgufHeader::from_bytes(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        ModelInfo::from_header(&h).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn mutated_headers_never_panic_and_stay_bounded() {
    let corpus = corpus();
    let mut rng = SplitMix64::new(0x00f0_22ed);
    let iters = iterations();
    let started = Instant::now();
    let (mut ok, mut err, mut worst_time, mut worst_mem) = (0u64, 0u64, Duration::ZERO, 0usize);
    for (name, seed) in &corpus {
        let header_end = GgufHeader::from_bytes(seed)
            .map(|h| h.data_offset() as usize + 64)
            .unwrap_or(seed.len());
        let hot = length_field_positions(seed);
        for i in 0..iters / corpus.len() as u64 {
            let input = mutate(&mut rng, seed, &hot, header_end);
            let t = Instant::now();
            let (result, peak) = measure(|| {
                let r = GgufHeader::from_bytes(&input);
                if let Ok(h) = &r {
                    // ModelInfo must also cope with whatever a mutated header holds.
                    let _ = ModelInfo::from_header(h);
                }
                r.is_ok()
            });
            let elapsed = t.elapsed();
            if i % 8 == 0 {
                // The buffered Read + Seek path must reach the same verdict.
                let via_reader = GgufHeader::read(std::io::Cursor::new(&input));
                assert_eq!(via_reader.is_ok(), result, "{name} iteration {i}");
            }
            if result {
                ok += 1;
            } else {
                err += 1;
            }
            worst_time = worst_time.max(elapsed);
            worst_mem = worst_mem.max(peak);
            // Memory: a few times the input, plus fixed overhead.
            assert!(
                peak <= 8 * input.len() + (1 << 20),
                "{name} iteration {i}: {peak} bytes allocated for a {}-byte input",
                input.len()
            );
            assert!(
                elapsed < Duration::from_secs(2),
                "{name} iteration {i}: took {elapsed:?}"
            );
        }
    }
    eprintln!(
        "fuzz: {iters} inputs in {:?} ({ok} ok, {err} err); worst parse {worst_time:?}, \
         worst peak allocation {worst_mem} bytes",
        started.elapsed()
    );
    assert!(err > 0 && ok > 0, "mutations should produce both outcomes");
}

#[test]
fn skipping_a_large_vocabulary_allocates_little() {
    let bytes = realistic_header_model(&RealisticHeaderOptions {
        vocab_size: 150_000,
        n_layer: 2,
        ..RealisticHeaderOptions::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vocab.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let (h, peak) = measure(|| GgufHeader::open(&path).unwrap());
    assert_eq!(
        h.get("tokenizer.ggml.tokens")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        150_000
    );
    // 150k tokens take ~2.5 MB on disk; the reader needs its 64 KiB buffer and small
    // metadata only.
    assert!(bytes.len() > 2_000_000, "{}", bytes.len());
    assert!(peak < 300_000, "peak allocation {peak} bytes");
    let (_, peak) = measure(|| GgufHeader::from_bytes(&bytes).unwrap());
    assert!(peak < 300_000, "peak allocation {peak} bytes (slice)");
}

#[test]
fn inflated_counts_allocate_little() {
    let seed = common::small_valid_file();
    for at in length_field_positions(&seed) {
        for v in INTERESTING_U64 {
            let mut data = seed.clone();
            data[at..at + 8].copy_from_slice(&v.to_le_bytes());
            let (_, peak) = measure(|| GgufHeader::from_bytes(&data).is_ok());
            assert!(peak < 64 * 1024, "offset {at} = {v}: {peak} bytes");
        }
    }
}
