//! Reader tests: value types, versions, endianness, truncation, hostile counts and lengths,
//! nesting, alignment, tensor validation, and skipping large arrays.

mod common;

use std::io::{Cursor, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use common::{Raw, all_value_types, find, small_valid_file};
use securellm_gguf::{
    GgmlType, GgufError, GgufHeader, GgufWriter, MetadataArray, MetadataValue, ReadLimits,
    ValueType,
};

fn quick<T>(f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );
    out
}

#[test]
fn all_value_types_round_trip() {
    let bytes = small_valid_file();
    let h = GgufHeader::from_bytes(&bytes).unwrap();
    assert_eq!(h.version(), 3);
    for (k, v) in all_value_types() {
        assert_eq!(h.get(k), Some(&v), "{k}");
    }
    assert_eq!(h.metadata().len(), all_value_types().len());
    assert_eq!(h.metadata()[0].0, "t.u8", "file order kept");
    let nested = h.get("t.arr.nested").unwrap().as_array().unwrap();
    assert_eq!(nested.element_type(), ValueType::Array);
    assert_eq!(nested.len(), 2);
    assert_eq!(h.get_u64("t.u32"), Some(4_000_000_000));
    assert_eq!(h.get_str("t.string"), Some("héllo ▁ world"));
    assert_eq!(h.get("missing"), None);

    assert_eq!(h.tensors().len(), 3);
    let a = h.tensor("a").unwrap();
    assert_eq!(
        (a.dims.as_slice(), a.ggml_type),
        (&[2u64, 2][..], GgmlType::F32)
    );
    assert_eq!((a.n_elements, a.n_bytes, a.offset), (4, 16, 0));
    let b = h.tensor("blk.0.b").unwrap();
    assert_eq!((b.n_bytes, b.offset), (6, 32));
    let c = h.tensor("c").unwrap();
    assert_eq!((c.n_bytes, c.offset, c.ggml_type), (34, 64, GgmlType::Q8_0));
    assert_eq!(h.data_offset() % 32, 0);
    assert_eq!(a.file_offset, h.data_offset());
    assert_eq!(
        &bytes[a.file_offset as usize..a.file_offset as usize + 4],
        &1.0f32.to_le_bytes()
    );
    assert_eq!(h.total_tensor_bytes(), 16 + 6 + 34);
    assert_eq!(h.file_len(), bytes.len() as u64);
}

#[test]
fn open_read_and_from_bytes_agree() {
    let bytes = small_valid_file();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let a = GgufHeader::open(&path).unwrap();
    let b = GgufHeader::read(Cursor::new(&bytes)).unwrap();
    let c = GgufHeader::from_bytes(&bytes).unwrap();
    for h in [&a, &b] {
        assert_eq!(h.metadata(), c.metadata());
        assert_eq!(h.tensors(), c.tensors());
        assert_eq!(h.data_offset(), c.data_offset());
    }

    // A GGUF embedded after a prefix, with the reader positioned at its start.
    let mut cur = Cursor::new(Vec::new());
    cur.write_all(b"some prefix").unwrap();
    cur.write_all(&bytes).unwrap();
    cur.seek(SeekFrom::Start(11)).unwrap();
    let d = GgufHeader::read(cur).unwrap();
    assert_eq!(d.tensors(), c.tensors());
    assert_eq!(d.file_len(), bytes.len() as u64);
}

#[test]
fn open_refuses_what_is_not_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    // A FIFO: opening it for reading would block until a writer came (the test would hang).
    let fifo = dir.path().join("pipe.gguf");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success());
    let mut refused = vec![dir.path().to_path_buf()];
    if made {
        refused.push(fifo);
    }
    for p in refused {
        let e = quick(|| GgufHeader::open(&p)).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{p:?}: {e}");
    }
}

#[test]
fn version_2_reads_like_version_3() {
    let mut bytes = small_valid_file();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let h = GgufHeader::from_bytes(&bytes).unwrap();
    assert_eq!(h.version(), 2);
    assert_eq!(h.tensors().len(), 3);
    assert_eq!(h.get("t.u8"), Some(&MetadataValue::U8(200)));
}

#[test]
fn version_1_and_unknown_versions_are_rejected() {
    let mut bytes = small_valid_file();
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    let e = GgufHeader::from_bytes(&bytes).unwrap_err();
    assert!(
        matches!(e, GgufError::UnsupportedVersion { version: 1, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("v1"), "{e}");
    for v in [0u32, 4, 99, u32::MAX] {
        bytes[4..8].copy_from_slice(&v.to_le_bytes());
        let e = GgufHeader::from_bytes(&bytes).unwrap_err();
        assert!(
            matches!(e, GgufError::UnsupportedVersion { .. }),
            "{v}: {e}"
        );
    }
}

#[test]
fn big_endian_files_are_detected() {
    for v in [2u32, 3] {
        let mut bytes = small_valid_file();
        bytes[4..8].copy_from_slice(&v.to_be_bytes());
        let e = GgufHeader::from_bytes(&bytes).unwrap_err();
        assert!(
            matches!(e, GgufError::BigEndian { version } if version == v),
            "{e}"
        );
        assert!(e.to_string().contains("big-endian"), "{e}");
    }
}

#[test]
fn bad_magic_is_rejected() {
    for bytes in [
        &b""[..],
        b"GG",
        b"GGUX\x03\0\0\0",
        b"\x7fELF....",
        b"FUGG\0\0\0\x03",
    ] {
        let e = GgufHeader::from_bytes(bytes).unwrap_err();
        assert!(matches!(e, GgufError::BadMagic { .. }), "{e}");
    }
}

#[test]
fn truncation_at_every_byte_is_an_error() {
    let bytes = small_valid_file();
    let h = GgufHeader::from_bytes(&bytes).unwrap();
    let needed = h
        .tensors()
        .iter()
        .map(|t| t.file_offset + t.n_bytes)
        .max()
        .unwrap() as usize;
    for len in 0..bytes.len() {
        let r = GgufHeader::from_bytes(&bytes[..len]);
        if len < needed {
            assert!(r.is_err(), "prefix of {len} bytes parsed");
        } else {
            // Only the last tensor's padding is missing: still valid.
            assert!(r.is_ok(), "prefix of {len} bytes: {:?}", r.err());
        }
    }
    // Through the BufReader path too, on a sample of cut points.
    for len in (0..needed).step_by(7) {
        assert!(GgufHeader::read(Cursor::new(&bytes[..len])).is_err());
    }
    let e = GgufHeader::from_bytes(&bytes[..40]).unwrap_err();
    assert!(e.to_string().contains("offset"), "{e}");
}

#[test]
fn huge_tensor_count_fails_fast() {
    let bytes = Raw::header(3, 1 << 60, 0).zeros(64).0;
    let e = quick(|| GgufHeader::from_bytes(&bytes)).unwrap_err();
    assert!(
        matches!(e, GgufError::LimitExceeded { offset: 8, .. }),
        "{e}"
    );
    // Under the limit but beyond what the file holds.
    let e = quick(|| GgufHeader::from_bytes(&Raw::header(3, 1000, 0).zeros(64).0)).unwrap_err();
    assert!(
        matches!(e, GgufError::CountTooLarge { offset: 8, .. }),
        "{e}"
    );
    // With limits lifted, the file-size bound still applies.
    let limits = ReadLimits {
        max_tensors: u64::MAX,
        max_metadata: u64::MAX,
        ..ReadLimits::default()
    };
    let e = quick(|| GgufHeader::from_bytes_with(&bytes, &limits)).unwrap_err();
    assert!(matches!(e, GgufError::CountTooLarge { .. }), "{e}");
    let both = Raw::header(3, u64::MAX, u64::MAX).zeros(64).0;
    assert!(quick(|| GgufHeader::from_bytes_with(&both, &limits)).is_err());
}

#[test]
fn huge_kv_count_fails_fast() {
    let bytes = Raw::header(3, 0, 1 << 60).zeros(64).0;
    let e = quick(|| GgufHeader::from_bytes(&bytes)).unwrap_err();
    assert!(
        matches!(e, GgufError::LimitExceeded { offset: 16, .. }),
        "{e}"
    );
    let bytes = Raw::header(3, 0, 100).zeros(64).0;
    let e = quick(|| GgufHeader::from_bytes(&bytes)).unwrap_err();
    assert!(
        matches!(e, GgufError::CountTooLarge { offset: 16, .. }),
        "{e}"
    );
}

#[test]
fn huge_string_lengths_fail_fast() {
    // Key length 2^40.
    let bytes = Raw::header(3, 0, 1).u64(1 << 40).zeros(64).0;
    let e = quick(|| GgufHeader::from_bytes(&bytes)).unwrap_err();
    assert!(
        matches!(e, GgufError::LimitExceeded { offset: 24, .. }),
        "{e}"
    );
    // Value string length 2^40 (above the string limit) and just beyond the file.
    let bytes = Raw::header(3, 0, 1)
        .str("k")
        .u32(ValueType::String.id())
        .u64(1 << 40)
        .zeros(64)
        .0;
    let e = quick(|| GgufHeader::from_bytes(&bytes)).unwrap_err();
    assert!(matches!(e, GgufError::LimitExceeded { .. }), "{e}");
    let bytes = Raw::header(3, 0, 1)
        .str("k")
        .u32(ValueType::String.id())
        .u64(65)
        .zeros(64)
        .0;
    let e = quick(|| GgufHeader::from_bytes(&bytes)).unwrap_err();
    assert!(matches!(e, GgufError::Truncated { needed: 65, .. }), "{e}");
    // Tensor name length 2^40.
    let bytes = Raw::header(3, 1, 0).u64(1 << 40).zeros(64).0;
    assert!(quick(|| GgufHeader::from_bytes(&bytes)).is_err());
}

#[test]
fn huge_array_lengths_fail_fast() {
    for elem in [
        ValueType::U8,
        ValueType::U64,
        ValueType::String,
        ValueType::Array,
    ] {
        for n in [1u64 << 60, u64::MAX, 1 << 32] {
            let bytes = Raw::header(3, 0, 1)
                .str("k")
                .u32(ValueType::Array.id())
                .u32(elem.id())
                .u64(n)
                .zeros(256)
                .0;
            let e = quick(|| GgufHeader::from_bytes(&bytes)).unwrap_err();
            assert!(
                matches!(e, GgufError::CountTooLarge { .. }),
                "{elem} {n}: {e}"
            );
        }
    }
    // A skipped string array whose strings claim huge lengths.
    let mut raw = Raw::header(3, 0, 1)
        .str("k")
        .u32(ValueType::Array.id())
        .u32(ValueType::String.id())
        .u64(100);
    raw = raw.u64(1 << 40);
    let bytes = raw.zeros(1000).0;
    let e = quick(|| GgufHeader::from_bytes(&bytes)).unwrap_err();
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
}

fn nested(depth: usize) -> MetadataValue {
    let mut v = MetadataValue::from(vec![1u8]);
    for _ in 1..depth {
        v = MetadataValue::Array(MetadataArray::new(ValueType::Array, vec![v]).unwrap());
    }
    v
}

#[test]
fn nesting_depth_is_limited() {
    let mut w = GgufWriter::new();
    w.add_metadata("ok", nested(8)).unwrap();
    let h = GgufHeader::from_bytes(&w.to_bytes().unwrap()).unwrap();
    assert_eq!(h.get("ok"), Some(&nested(8)));

    let mut w = GgufWriter::new();
    w.add_metadata("deep", nested(9)).unwrap();
    let e = GgufHeader::from_bytes(&w.to_bytes().unwrap()).unwrap_err();
    assert!(
        matches!(e, GgufError::NestingTooDeep { limit: 8, .. }),
        "{e}"
    );

    // Deep nesting inside a skipped array is limited too (no recursion blow-up).
    let mut raw = Raw::header(3, 0, 1).str("k").u32(ValueType::Array.id());
    for _ in 0..10_000 {
        raw = raw.u32(ValueType::Array.id()).u64(100);
    }
    let bytes = raw.zeros(100).0;
    let e = quick(|| GgufHeader::from_bytes(&bytes)).unwrap_err();
    assert!(matches!(e, GgufError::NestingTooDeep { .. }), "{e}");
}

#[test]
fn empty_key_is_an_error() {
    let bytes = Raw::header(3, 0, 1).kv_u32("", 1).0;
    let e = GgufHeader::from_bytes(&bytes).unwrap_err();
    assert!(e.to_string().contains("empty key at offset 24"), "{e}");
}

#[test]
fn unknown_value_type_is_an_error() {
    let bytes = Raw::header(3, 0, 1).str("k").u32(13).zeros(8).0;
    let e = GgufHeader::from_bytes(&bytes).unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::UnknownValueType {
                type_id: 13,
                offset: 33
            }
        ),
        "{e}"
    );
}

#[test]
fn large_arrays_are_skipped_not_materialised() {
    let tokens: Vec<String> = (0..150_000).map(|i| format!("tok{i}")).collect();
    let scores: Vec<f32> = (0..150_000).map(|i| i as f32).collect();
    let per_layer: Vec<u32> = (0..80).collect();
    let mut w = GgufWriter::new();
    w.add_metadata("tokenizer.ggml.tokens", tokens)
        .unwrap()
        .add_metadata("tokenizer.ggml.scores", scores)
        .unwrap()
        .add_metadata("per_layer", per_layer.clone())
        .unwrap()
        .add_metadata("after", "still read")
        .unwrap();
    let bytes = w.to_bytes().unwrap();
    let h = GgufHeader::from_bytes(&bytes).unwrap();
    let t = h.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
    assert_eq!(
        (t.element_type(), t.len(), t.values()),
        (ValueType::String, 150_000, None)
    );
    let s = h.get("tokenizer.ggml.scores").unwrap().as_array().unwrap();
    assert_eq!((s.len(), s.values().is_none()), (150_000, true));
    let p = h.get("per_layer").unwrap().as_array().unwrap();
    assert_eq!(
        p.to_u64_vec(),
        Some(per_layer.iter().map(|&x| u64::from(x)).collect())
    );
    assert_eq!(h.get_str("after"), Some("still read"));

    // The same through a file (BufReader + seek_relative).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let h2 = GgufHeader::open(&path).unwrap();
    assert_eq!(h2.metadata(), h.metadata());

    // With a larger keep limit the values are kept.
    let limits = ReadLimits {
        keep_other_array_max: 200_000,
        ..ReadLimits::default()
    };
    let h3 = GgufHeader::from_bytes_with(&bytes, &limits).unwrap();
    let t3 = h3.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
    assert_eq!(t3.values().map(|v| v[7].as_str()), Some(Some("tok7")));
}

#[test]
fn kept_metadata_budget_is_enforced() {
    let mut w = GgufWriter::new();
    w.add_metadata("big", "x".repeat(10_000)).unwrap();
    let bytes = w.to_bytes().unwrap();
    let limits = ReadLimits {
        max_kept_metadata_bytes: 1000,
        ..ReadLimits::default()
    };
    let e = GgufHeader::from_bytes_with(&bytes, &limits).unwrap_err();
    assert!(matches!(e, GgufError::LimitExceeded { .. }), "{e}");
    let limits = ReadLimits {
        max_string_len: 100,
        ..ReadLimits::default()
    };
    assert!(GgufHeader::from_bytes_with(&bytes, &limits).is_err());
}

#[test]
fn utf8_policy_strict_for_names_lossy_for_values() {
    let bad_key = Raw::header(3, 0, 1)
        .u64(2)
        .bytes(&[0xff, 0xfe])
        .u32(ValueType::U8.id())
        .u8(1)
        .0;
    let e = GgufHeader::from_bytes(&bad_key).unwrap_err();
    assert!(
        matches!(e, GgufError::InvalidUtf8 { offset: 32, .. }),
        "{e}"
    );

    let bad_value = Raw::header(3, 0, 1)
        .str("k")
        .u32(ValueType::String.id())
        .u64(3)
        .bytes(&[b'a', 0xff, b'b'])
        .0;
    let h = GgufHeader::from_bytes(&bad_value).unwrap();
    assert_eq!(h.get_str("k"), Some("a\u{fffd}b"));

    let bad_tensor = Raw::header(3, 1, 0)
        .u64(1)
        .u8(0x80)
        .u32(1)
        .u64(1)
        .u32(0)
        .u64(0)
        .pad_to(32)
        .zeros(32)
        .0;
    let e = GgufHeader::from_bytes(&bad_tensor).unwrap_err();
    assert!(matches!(e, GgufError::InvalidUtf8 { .. }), "{e}");
}

#[test]
fn duplicate_keys_and_tensor_names_are_rejected() {
    let dup_key = Raw::header(3, 0, 2).kv_u32("a", 1).kv_u32("a", 2).0;
    let e = GgufHeader::from_bytes(&dup_key).unwrap_err();
    assert!(
        matches!(e, GgufError::DuplicateKey { ref key, .. } if key == "a"),
        "{e}"
    );

    let dup_tensor = Raw::header(3, 2, 0)
        .tensor("t", &[8], 0, 0)
        .tensor("t", &[8], 0, 32)
        .pad_to(32)
        .zeros(64)
        .0;
    let e = GgufHeader::from_bytes(&dup_tensor).unwrap_err();
    assert!(matches!(e, GgufError::DuplicateTensor { .. }), "{e}");
}

#[test]
fn alignment_is_honoured() {
    let mut w = GgufWriter::new();
    w.set_alignment(256).unwrap();
    w.add_metadata("x", 1u8).unwrap();
    w.add_tensor_f32("a", &[3], &[1.0, 2.0, 3.0]).unwrap();
    w.add_tensor_f32("b", &[1], &[4.0]).unwrap();
    let bytes = w.to_bytes().unwrap();
    let h = GgufHeader::from_bytes(&bytes).unwrap();
    assert_eq!(h.alignment(), 256);
    assert_eq!(h.data_offset() % 256, 0);
    assert_eq!(h.tensor("b").unwrap().offset, 256);
    assert_eq!(bytes.len() % 256, 0);
    let b = h.tensor("b").unwrap().file_offset as usize;
    assert_eq!(&bytes[b..b + 4], &4.0f32.to_le_bytes());
}

#[test]
fn bad_alignment_values_are_rejected() {
    for (ty, val) in [(4u32, 0u64), (4, 3), (4, 48), (10, 1 << 40)] {
        let mut raw = Raw::header(3, 0, 1).str("general.alignment").u32(ty);
        raw = if ty == 4 {
            raw.u32(val as u32)
        } else {
            raw.u64(val)
        };
        let e = GgufHeader::from_bytes(&raw.0).unwrap_err();
        assert!(
            matches!(e, GgufError::InvalidAlignment { .. }),
            "{val}: {e}"
        );
    }
    let raw = Raw::header(3, 0, 1).kv_str("general.alignment", "32");
    assert!(matches!(
        GgufHeader::from_bytes(&raw.0).unwrap_err(),
        GgufError::InvalidAlignment { .. }
    ));
    // Like llama.cpp, only a u32 is accepted, even if the value is a power of two.
    let raw = Raw::header(3, 0, 1)
        .str("general.alignment")
        .u32(ValueType::U64.id())
        .u64(64);
    assert!(GgufHeader::from_bytes(&raw.0).is_err());
    let raw = Raw::header(3, 0, 1).kv_u32("general.alignment", 64);
    assert_eq!(GgufHeader::from_bytes(&raw.0).unwrap().alignment(), 64);
}

fn one_tensor(dims: &[u64], type_id: u32, offset: u64, data: usize) -> Vec<u8> {
    Raw::header(3, 1, 0)
        .tensor("t", dims, type_id, offset)
        .pad_to(32)
        .zeros(data)
        .0
}

#[test]
fn tensor_infos_are_validated() {
    // Valid baseline.
    assert!(GgufHeader::from_bytes(&one_tensor(&[8], 0, 0, 32)).is_ok());
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (one_tensor(&[1, 1, 1, 1, 1], 0, 0, 32), "5 dimensions"),
        (
            one_tensor(&[8], 0, 16, 64),
            "not a multiple of the alignment",
        ),
        (one_tensor(&[8], 0, 32, 32), "beyond the end"),
        (one_tensor(&[9], 0, 0, 32), "beyond the end"),
        (
            one_tensor(&[100], GgmlType::Q4K.id(), 0, 1000),
            "block size",
        ),
        (one_tensor(&[1 << 63], 0, 0, 32), "above i64::MAX"),
        (one_tensor(&[1 << 40, 1 << 40], 0, 0, 32), "overflows"),
        (one_tensor(&[u64::MAX / 4, 2], 0, 0, 32), "overflows"),
        (one_tensor(&[1 << 62], 28, 0, 32), "overflows"),
        (one_tensor(&[1 << 60], 0, 0, 32), "beyond the end"),
        (one_tensor(&[8], 77, 0, 32), "unknown ggml type id 77"),
        (one_tensor(&[8], 31, 0, 32), "Q4_0_4_4"),
        (one_tensor(&[8], 0, u64::MAX - 31, 32), "beyond the end"),
    ];
    for (bytes, want) in cases {
        let e = quick(|| GgufHeader::from_bytes(&bytes)).unwrap_err();
        assert!(e.to_string().contains(want), "want {want:?}, got {e}");
    }
    // A zero dimension is an empty tensor, which is allowed.
    let h = GgufHeader::from_bytes(&one_tensor(&[0, 5], 0, 0, 0)).unwrap();
    assert_eq!(h.tensors()[0].n_bytes, 0);
}

#[test]
fn overlapping_tensors_are_rejected() {
    let bytes = Raw::header(3, 2, 0)
        .tensor("a", &[16], 0, 0)
        .tensor("b", &[8], 0, 32)
        .pad_to(32)
        .zeros(128)
        .0;
    let e = GgufHeader::from_bytes(&bytes).unwrap_err();
    assert!(e.to_string().contains("overlaps"), "{e}");
}

#[test]
fn no_tensors_no_data_is_fine() {
    let bytes = Raw::header(3, 0, 1)
        .kv_str("general.architecture", "llama")
        .0;
    let h = GgufHeader::from_bytes(&bytes).unwrap();
    assert!(h.tensors().is_empty());
    assert_eq!(h.total_tensor_bytes(), 0);
    assert_eq!(h.get_str("general.architecture"), Some("llama"));
}

#[test]
fn error_messages_name_field_and_offset() {
    let mut bytes = small_valid_file();
    let key_at = find(&bytes, b"t.u16") - 8;
    bytes[key_at..key_at + 8].copy_from_slice(&10_000u64.to_le_bytes());
    let e = GgufHeader::from_bytes(&bytes).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("metadata key"), "{msg}");
    assert!(msg.contains(&format!("offset {}", key_at + 8)), "{msg}");
    assert!(msg.contains("needs 10000 bytes"), "{msg}");
}
