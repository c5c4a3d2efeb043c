//! ModelInfo tests: metadata extraction, per-layer values, sliding windows, splits, tensor
//! byte accounting, and the test-model generators seen through the reader.

mod common;

use common::Raw;
use securellm_gguf::testmodels::{
    self, RealisticHeaderOptions, TinyLlamaOptions, WeightType, tiny_llama, tiny_llama_writer,
};
use securellm_gguf::types::f16_bits_to_f32;
use securellm_gguf::{
    GgmlType, GgufError, GgufHeader, GgufWriter, MetadataValue, ModelInfo, SplitInfo,
};

fn info_of(w: &GgufWriter) -> Result<ModelInfo, GgufError> {
    ModelInfo::from_header(&GgufHeader::from_bytes(&w.to_bytes().unwrap()).unwrap())
}

#[test]
fn tiny_llama_info() {
    let bytes = tiny_llama(&TinyLlamaOptions::default()).unwrap();
    let h = GgufHeader::from_bytes(&bytes).unwrap();
    let info = ModelInfo::from_header(&h).unwrap();
    assert_eq!(info.architecture.as_deref(), Some("llama"));
    assert_eq!(info.name.as_deref(), Some("tiny-llama"));
    assert_eq!(info.file_type, Some(0));
    assert_eq!(info.file_type_name, Some("F32"));
    assert_eq!(info.quantization(), Some("F32"));
    assert_eq!(info.context_length, Some(2048));
    assert_eq!(info.block_count, Some(2));
    assert_eq!(info.embedding_length, Some(64));
    assert_eq!(info.feed_forward_length, Some(256));
    assert_eq!(info.head_count, Some(4));
    assert_eq!(info.head_count_kv, vec![4, 4]);
    assert_eq!(info.key_length, Some(16));
    assert_eq!(info.value_length, Some(16));
    assert_eq!(info.vocab_size, Some(512));
    assert!(info.has_chat_template);
    assert_eq!(info.tensor_count, 3 + 2 * 9);
    assert_eq!(info.sliding_window, None);
    assert!(info.sliding_window_layers.is_empty());
    assert_eq!(info.split, None);
    let expected_params = 2 * 64 * 512 + 64 + 2 * (2 * 64 + 4 * 64 * 64 + 3 * 64 * 256);
    assert_eq!(info.parameter_count, expected_params);
    assert_eq!(info.total_tensor_bytes, expected_params * 4);
    assert_eq!(info.layer_tensor_bytes.len(), 2);
    assert_eq!(info.layer_tensor_bytes[0], info.layer_tensor_bytes[1]);
    assert_eq!(
        info.layer_tensor_bytes.iter().sum::<u64>() + info.non_layer_tensor_bytes,
        info.total_tensor_bytes
    );
    assert_eq!(info.token_embd_bytes, 64 * 512 * 4);
    assert_eq!(info.output_bytes, 64 * 512 * 4 + 64 * 4);
    assert_eq!(info.offloaded_layer_bytes(1), info.layer_tensor_bytes[1]);
    assert_eq!(
        info.offloaded_layer_bytes(99),
        info.layer_tensor_bytes.iter().sum::<u64>()
    );
    assert_eq!(info.offloaded_layer_bytes(0), 0);
    // 2 layers × 4 kv heads × (16 + 16).
    assert_eq!(info.kv_elements_per_token(), Some(2 * 4 * 32));

    // Tokenizer facts llama.cpp needs.
    assert_eq!(h.get_str("tokenizer.ggml.model"), Some("llama"));
    let tokens = h.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
    assert_eq!(tokens.len(), 512);
    let types = h
        .get("tokenizer.ggml.token_type")
        .unwrap()
        .as_array()
        .unwrap();
    let types = types.values().unwrap();
    assert_eq!(types[1], MetadataValue::I32(3), "<s> is CONTROL");
    assert_eq!(types[5], MetadataValue::I32(6), "<0x00> is BYTE");
    assert_eq!(types[300], MetadataValue::I32(1));
    assert_eq!(h.get_u64("tokenizer.ggml.bos_token_id"), Some(1));
    assert_eq!(h.get_u64("tokenizer.ggml.eos_token_id"), Some(2));
    assert_eq!(h.get_u64("llama.rope.dimension_count"), Some(16));
    assert!(
        h.get_str("tokenizer.chat_template")
            .unwrap()
            .contains("<|im_start|>")
    );
}

fn output_rows(bytes: &[u8], h: &GgufHeader) -> Vec<Vec<f32>> {
    let t = h.tensor("output.weight").unwrap();
    let (n_embd, n_vocab) = (t.dims[0] as usize, t.dims[1] as usize);
    let start = t.file_offset as usize;
    let value = |i: usize| match t.ggml_type {
        GgmlType::F32 => {
            f32::from_le_bytes(bytes[start + 4 * i..start + 4 * i + 4].try_into().unwrap())
        }
        _ => f16_bits_to_f32(u16::from_le_bytes(
            bytes[start + 2 * i..start + 2 * i + 2].try_into().unwrap(),
        )),
    };
    (0..n_vocab)
        .map(|r| (0..n_embd).map(|c| value(r * n_embd + c)).collect())
        .collect()
}

#[test]
fn tiny_llama_output_disfavours_control_and_byte_tokens() {
    for weight_type in [WeightType::F32, WeightType::F16] {
        let opts = TinyLlamaOptions {
            weight_type,
            ..TinyLlamaOptions::default()
        };
        let bytes = tiny_llama(&opts).unwrap();
        let h = GgufHeader::from_bytes(&bytes).unwrap();
        let rows = output_rows(&bytes, &h);
        for (i, row) in rows.iter().enumerate() {
            let expected = if i < 261 { -8.0 } else { 1.0 };
            assert_eq!(row[0], expected, "token {i}");
        }
        let embd = h.tensor("token_embd.weight").unwrap();
        let first = embd.file_offset as usize;
        let v = match weight_type {
            WeightType::F32 => f32::from_le_bytes(bytes[first..first + 4].try_into().unwrap()),
            WeightType::F16 => f16_bits_to_f32(u16::from_le_bytes(
                bytes[first..first + 2].try_into().unwrap(),
            )),
        };
        assert_eq!(v, 4.0);
    }
}

#[test]
fn tiny_llama_is_deterministic_and_seeded() {
    let a = tiny_llama(&TinyLlamaOptions::default()).unwrap();
    let b = tiny_llama(&TinyLlamaOptions::default()).unwrap();
    assert_eq!(a, b);
    let c = tiny_llama(&TinyLlamaOptions {
        seed: 1,
        ..TinyLlamaOptions::default()
    })
    .unwrap();
    assert_eq!(a.len(), c.len());
    assert_ne!(a, c);
}

#[test]
fn tiny_llama_options_are_validated_and_applied() {
    for bad in [
        TinyLlamaOptions {
            n_head: 5,
            ..TinyLlamaOptions::default()
        },
        TinyLlamaOptions {
            n_head_kv: 3,
            ..TinyLlamaOptions::default()
        },
        TinyLlamaOptions {
            vocab_size: 100,
            ..TinyLlamaOptions::default()
        },
        TinyLlamaOptions {
            n_layer: 0,
            ..TinyLlamaOptions::default()
        },
    ] {
        assert!(matches!(
            tiny_llama(&bad),
            Err(GgufError::InvalidInput { .. })
        ));
    }
    let opts = TinyLlamaOptions {
        name: "gqa".to_owned(),
        n_embd: 128,
        n_layer: 3,
        n_head: 8,
        n_head_kv: 2,
        n_ff: 64,
        context_length: 4096,
        vocab_size: 1000,
        weight_type: WeightType::F16,
        seed: 9,
    };
    let bytes = tiny_llama(&opts).unwrap();
    let h = GgufHeader::from_bytes(&bytes).unwrap();
    let info = ModelInfo::from_header(&h).unwrap();
    assert_eq!(info.head_count_kv, vec![2, 2, 2]);
    assert_eq!(info.file_type_name, Some("F16"));
    assert_eq!(info.vocab_size, Some(1000));
    assert_eq!(info.context_length, Some(4096));
    assert_eq!(h.tensor("blk.2.attn_k.weight").unwrap().dims, vec![128, 32]);
    assert_eq!(
        h.tensor("blk.0.attn_q.weight").unwrap().ggml_type,
        GgmlType::F16
    );
    assert_eq!(
        h.tensor("blk.0.attn_norm.weight").unwrap().ggml_type,
        GgmlType::F32
    );
}

#[test]
fn bigger_tiny_llama_is_tens_of_megabytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bigger.gguf");
    let len = testmodels::write_tiny_llama(&path, &TinyLlamaOptions::bigger()).unwrap();
    assert!((20_000_000..100_000_000).contains(&len), "{len}");
    let info = ModelInfo::from_header(&GgufHeader::open(&path).unwrap()).unwrap();
    assert_eq!(info.block_count, Some(8));
    assert_eq!(info.embedding_length, Some(512));
    assert!(info.total_tensor_bytes < len);
}

#[test]
fn writer_allows_adjusting_generated_models() {
    let mut w = tiny_llama_writer(&TinyLlamaOptions::default()).unwrap();
    w.set_metadata("general.name", "renamed").unwrap();
    w.add_metadata("split.count", 1u16).unwrap();
    let info = info_of(&w).unwrap();
    assert_eq!(info.name.as_deref(), Some("renamed"));
    assert_eq!(
        info.split,
        Some(SplitInfo {
            index: 0,
            count: 1,
            total_tensors: None
        })
    );
}

fn arch_writer(block_count: u32) -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "gemma3")
        .unwrap()
        .add_metadata("gemma3.block_count", block_count)
        .unwrap()
        .add_metadata("gemma3.embedding_length", 1024u32)
        .unwrap()
        .add_metadata("gemma3.attention.head_count", 8u32)
        .unwrap();
    w
}

#[test]
fn per_layer_head_count_kv() {
    let mut w = arch_writer(4);
    w.add_metadata("gemma3.attention.head_count_kv", vec![1u32, 2, 4, 8])
        .unwrap();
    let info = info_of(&w).unwrap();
    assert_eq!(info.head_count_kv, vec![1, 2, 4, 8]);
    assert_eq!(info.key_length, Some(128));
    assert_eq!(info.kv_elements_per_token(), Some((1 + 2 + 4 + 8) * 256));

    // Wrong length, wrong element type, wrong type.
    let mut w = arch_writer(3);
    w.add_metadata("gemma3.attention.head_count_kv", vec![1u32, 2, 4, 8])
        .unwrap();
    let e = info_of(&w).unwrap_err();
    assert!(
        e.to_string().contains("4 entries but the model has 3"),
        "{e}"
    );
    let mut w = arch_writer(2);
    w.add_metadata("gemma3.attention.head_count_kv", vec![1.0f32, 2.0])
        .unwrap();
    assert!(matches!(
        info_of(&w),
        Err(GgufError::InvalidMetadata { .. })
    ));
    let mut w = arch_writer(2);
    w.add_metadata("gemma3.attention.head_count_kv", "eight")
        .unwrap();
    assert!(info_of(&w).is_err());
    let mut w = arch_writer(2);
    w.add_metadata("gemma3.attention.head_count_kv", -1i32)
        .unwrap();
    assert!(info_of(&w).is_err());

    // Per-layer head count: the maximum is reported.
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "openelm")
        .unwrap()
        .add_metadata("openelm.block_count", 3u32)
        .unwrap()
        .add_metadata("openelm.attention.head_count", vec![12u32, 16, 20])
        .unwrap()
        .add_metadata("openelm.feed_forward_length", vec![768u32, 1024, 1280])
        .unwrap();
    let info = info_of(&w).unwrap();
    assert_eq!(info.head_count, Some(20));
    assert_eq!(info.head_count_per_layer, vec![12, 16, 20]);
    assert_eq!(info.feed_forward_length, Some(1280));
}

#[test]
fn explicit_key_value_lengths_and_sliding_window() {
    let mut w = arch_writer(6);
    w.add_metadata("gemma3.attention.key_length", 256u32)
        .unwrap()
        .add_metadata("gemma3.attention.value_length", 192u32)
        .unwrap()
        .add_metadata("gemma3.attention.sliding_window", 1024u32)
        .unwrap()
        .add_metadata("gemma3.attention.sliding_window_pattern", 3u32)
        .unwrap()
        .add_metadata("gemma3.attention.head_count_kv", 4u32)
        .unwrap();
    let info = info_of(&w).unwrap();
    assert_eq!((info.key_length, info.value_length), (Some(256), Some(192)));
    assert_eq!(info.sliding_window, Some(1024));
    assert_eq!(
        info.sliding_window_layers,
        vec![true, true, false, true, true, false]
    );
    assert_eq!(info.kv_elements_per_token(), Some(6 * 4 * (256 + 192)));

    let mut w = arch_writer(3);
    w.add_metadata(
        "gemma3.attention.sliding_window_pattern",
        vec![true, false, true],
    )
    .unwrap();
    assert_eq!(
        info_of(&w).unwrap().sliding_window_layers,
        vec![true, false, true]
    );
    let mut w = arch_writer(3);
    w.add_metadata("gemma3.attention.sliding_window_pattern", vec![true])
        .unwrap();
    assert!(info_of(&w).is_err());
    // llama.cpp's saver writes u32 flags, possibly covering extra layers.
    let mut w = arch_writer(3);
    w.add_metadata(
        "gemma3.attention.sliding_window_pattern",
        vec![1u32, 1, 0, 0],
    )
    .unwrap();
    assert_eq!(
        info_of(&w).unwrap().sliding_window_layers,
        vec![true, true, false]
    );
}

#[test]
fn moe_and_vocab_size_fallback() {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "qwen3moe")
        .unwrap()
        .add_metadata("qwen3moe.expert_count", 128u32)
        .unwrap()
        .add_metadata("qwen3moe.expert_used_count", 8u32)
        .unwrap()
        .add_metadata("qwen3moe.vocab_size", 151_936u32)
        .unwrap();
    let info = info_of(&w).unwrap();
    assert_eq!(info.expert_count, Some(128));
    assert_eq!(info.expert_used_count, Some(8));
    assert_eq!(info.vocab_size, Some(151_936));
    assert!(!info.has_chat_template);
    assert_eq!(info.block_count, None);
    assert!(info.head_count_kv.is_empty());
    assert_eq!(info.kv_elements_per_token(), None);
}

#[test]
fn implausible_block_count_is_an_error() {
    let e = info_of(&arch_writer(1_000_000)).unwrap_err();
    assert!(e.to_string().contains("gemma3.block_count"), "{e}");
}

#[test]
fn wrong_types_for_general_keys_are_errors() {
    let bytes = Raw::header(3, 0, 1).kv_u32("general.architecture", 5).0;
    let h = GgufHeader::from_bytes(&bytes).unwrap();
    let e = ModelInfo::from_header(&h).unwrap_err();
    assert!(e.to_string().contains("general.architecture"), "{e}");
    let mut w = GgufWriter::new();
    w.add_metadata("general.file_type", "Q4_K_M").unwrap();
    assert!(info_of(&w).is_err());
}

#[test]
fn quantization_falls_back_to_dominant_tensor_type() {
    let mut w = GgufWriter::new();
    w.add_tensor_zeroed("blk.0.a.weight", &[256, 4], GgmlType::Q6K)
        .unwrap()
        .add_tensor_zeroed("blk.0.b.weight", &[256, 8], GgmlType::Q4K)
        .unwrap()
        .add_tensor_zeroed("blk.1.norm.weight", &[256], GgmlType::F32)
        .unwrap()
        .add_tensor_zeroed("blk.99999.x", &[4], GgmlType::F32)
        .unwrap();
    let info = info_of(&w).unwrap();
    assert_eq!(info.file_type_name, None);
    assert_eq!(info.dominant_tensor_type, Some(GgmlType::Q4K));
    assert_eq!(info.quantization(), Some("Q4_K"));
    assert_eq!(info.layer_tensor_bytes, vec![4 * 210 + 8 * 144, 1024]);
    assert_eq!(info.non_layer_tensor_bytes, 16, "implausible layer index");
}

#[test]
fn realistic_header_model_small_and_valid() {
    let opts = RealisticHeaderOptions::default();
    let bytes = testmodels::realistic_header_model(&opts).unwrap();
    assert!(bytes.len() < 2_000_000, "{}", bytes.len());
    let h = GgufHeader::from_bytes(&bytes).unwrap();
    assert_eq!(h.tensors().len(), 291);
    let info = ModelInfo::from_header(&h).unwrap();
    assert_eq!(info.vocab_size, Some(32_000));
    assert_eq!(info.file_type_name, Some("Q4_K_M"));
    assert_eq!(info.size_label.as_deref(), Some("7B"));
    assert_eq!(info.block_count, Some(32));
    assert_eq!(info.layer_tensor_bytes.len(), 32);
    let tokens = h.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
    assert!(tokens.values().is_none(), "large vocab is skipped");
    assert_eq!(
        testmodels::realistic_header_model(&opts).unwrap(),
        bytes,
        "deterministic"
    );
    let other = testmodels::realistic_header_model(&RealisticHeaderOptions {
        seed: 8,
        ..opts.clone()
    })
    .unwrap();
    assert_ne!(other, bytes);
    assert!(
        testmodels::realistic_header_model(&RealisticHeaderOptions {
            full_shapes: true,
            ..opts
        })
        .is_err()
    );
}

#[test]
fn realistic_header_model_full_shapes_sparse_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("7b.gguf");
    let opts = RealisticHeaderOptions {
        full_shapes: true,
        split: Some(SplitInfo {
            index: 1,
            count: 3,
            total_tensors: Some(291),
        }),
        ..RealisticHeaderOptions::default()
    };
    let len = testmodels::write_realistic_header_model(&path, &opts).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    let h = GgufHeader::open(&path).unwrap();
    let info = ModelInfo::from_header(&h).unwrap();
    // Llama-2-7B has 6.74 B parameters; Q4_K everywhere is 4.5 bits per weight.
    assert_eq!(info.parameter_count, 6_738_415_616);
    let norm_elements = 65 * 4096;
    assert_eq!(
        info.total_tensor_bytes,
        (6_738_415_616 - norm_elements) / 256 * 144 + norm_elements * 4
    );
    assert!(len > info.total_tensor_bytes);
    assert_eq!(
        info.split,
        Some(SplitInfo {
            index: 1,
            count: 3,
            total_tensors: Some(291)
        })
    );
}
