//! Writer tests: input validation, layout, file writing, and round trips through the reader
//! (including property tests over arbitrary metadata and tensor shapes).

mod common;

use proptest::prelude::*;
use securellm_gguf::{
    GgmlType, GgufError, GgufHeader, GgufWriter, MetadataArray, MetadataValue, ReadLimits,
    ValueType,
};

#[test]
fn writer_rejects_bad_input() {
    let mut w = GgufWriter::new();
    w.add_metadata("k", 1u8).unwrap();
    assert!(matches!(
        w.add_metadata("k", 2u8),
        Err(GgufError::InvalidInput { .. })
    ));
    assert!(w.add_metadata("general.alignment", 64u32).is_err());
    assert!(w.add_metadata("", 1u8).is_err());
    assert!(w.set_alignment(48).is_err());
    assert!(w.set_alignment(0).is_err());
    assert!(
        w.add_metadata("skipped", MetadataArray::skipped(ValueType::U8, 3))
            .is_err()
    );
    w.add_tensor_f32("t", &[2], &[1.0, 2.0]).unwrap();
    assert!(
        w.add_tensor_f32("t", &[2], &[1.0, 2.0]).is_err(),
        "dup name"
    );
    assert!(w.add_tensor_f32("u", &[3], &[1.0, 2.0]).is_err(), "size");
    assert!(
        w.add_tensor_f32("v", &[1, 1, 1, 1, 1], &[1.0]).is_err(),
        "dims"
    );
    assert!(
        w.add_tensor_zeroed("q", &[100], GgmlType::Q4_0).is_err(),
        "block multiple"
    );
    assert!(
        w.add_tensor_zeroed("huge", &[u64::MAX / 2, 4], GgmlType::F32)
            .is_err()
    );
    assert_eq!((w.metadata_count(), w.tensor_count()), (1, 1));
}

#[test]
fn set_and_remove_metadata() {
    let mut w = GgufWriter::new();
    w.add_metadata("a", 1u32).unwrap();
    w.set_metadata("a", "now a string").unwrap();
    w.set_metadata("b", 2u8).unwrap();
    assert_eq!(w.remove_metadata("b"), Some(MetadataValue::U8(2)));
    assert_eq!(w.remove_metadata("b"), None);
    let h = GgufHeader::from_bytes(&w.to_bytes().unwrap()).unwrap();
    assert_eq!(h.get_str("a"), Some("now a string"));
    assert_eq!(h.metadata().len(), 1);
}

#[test]
fn empty_file_layout() {
    let bytes = GgufWriter::new().to_bytes().unwrap();
    assert_eq!(&bytes[..4], b"GGUF");
    assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
    assert_eq!(bytes.len(), 32, "24-byte header padded to 32");
    let h = GgufHeader::from_bytes(&bytes).unwrap();
    assert_eq!(h.data_offset(), 32);
}

#[test]
fn tensor_offsets_are_contiguous_and_padded_like_llama_cpp() {
    let mut w = GgufWriter::new();
    w.add_tensor_f32("a", &[5], &[0.0; 5]).unwrap();
    w.add_tensor_f16("b", &[40], &[0.5; 40]).unwrap();
    w.add_tensor_zeroed("c", &[256, 2], GgmlType::Q4K).unwrap();
    w.add_tensor_f32("d", &[1], &[9.0]).unwrap();
    let bytes = w.to_bytes().unwrap();
    assert_eq!(w.file_len().unwrap(), bytes.len() as u64);
    let h = GgufHeader::from_bytes(&bytes).unwrap();
    let mut expected = 0;
    for t in h.tensors() {
        assert_eq!(t.offset, expected, "{}", t.name);
        expected += t.n_bytes.next_multiple_of(32);
    }
    assert_eq!(h.data_offset() + expected, bytes.len() as u64);
    let b = h.tensor("b").unwrap().file_offset as usize;
    assert_eq!(&bytes[b..b + 2], &0x3800u16.to_le_bytes(), "0.5 in f16");
}

#[test]
fn write_file_matches_to_bytes_and_is_sparse_for_zeroed_tensors() {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama").unwrap();
    w.add_tensor_f32("a", &[3], &[1.0, 2.0, 3.0]).unwrap();
    w.add_tensor_zeroed("big", &[256, 4096], GgmlType::Q8_0)
        .unwrap();
    w.add_tensor_f32("c", &[2], &[7.0, 8.0]).unwrap();
    w.add_tensor_zeroed("tail", &[1000], GgmlType::F32).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.gguf");
    let len = w.write_file(&path).unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(on_disk.len() as u64, len);
    assert_eq!(on_disk, w.to_bytes().unwrap());
    // Overwriting an existing file truncates it.
    std::fs::write(&path, vec![0xAAu8; len as usize + 1000]).unwrap();
    w.write_file(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), on_disk);
}

fn scalar_strategy() -> impl Strategy<Value = MetadataValue> {
    prop_oneof![
        any::<u8>().prop_map(MetadataValue::U8),
        any::<i8>().prop_map(MetadataValue::I8),
        any::<u16>().prop_map(MetadataValue::U16),
        any::<i16>().prop_map(MetadataValue::I16),
        any::<u32>().prop_map(MetadataValue::U32),
        any::<i32>().prop_map(MetadataValue::I32),
        any::<f32>()
            .prop_filter("NaN != NaN", |f| !f.is_nan())
            .prop_map(MetadataValue::F32),
        any::<bool>().prop_map(MetadataValue::Bool),
        ".{0,40}".prop_map(MetadataValue::String),
        any::<u64>().prop_map(MetadataValue::U64),
        any::<i64>().prop_map(MetadataValue::I64),
        any::<f64>()
            .prop_filter("NaN != NaN", |f| !f.is_nan())
            .prop_map(MetadataValue::F64),
    ]
}

/// Arrays whose elements share the first element's type, nested up to three levels.
fn value_strategy() -> impl Strategy<Value = MetadataValue> {
    scalar_strategy().prop_recursive(3, 64, 8, |inner| {
        (inner, 0usize..8).prop_map(|(first, n)| {
            let ty = first.value_type();
            // Repeat the element; arrays of arrays must share the element type only.
            let values = vec![first; n];
            MetadataValue::Array(MetadataArray::new(ty, values).unwrap())
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn metadata_round_trips(values in prop::collection::vec(value_strategy(), 0..12)) {
        let mut w = GgufWriter::new();
        for (i, v) in values.iter().enumerate() {
            w.add_metadata(format!("k{i}"), v.clone()).unwrap();
        }
        let bytes = w.to_bytes().unwrap();
        let h = GgufHeader::from_bytes(&bytes).unwrap();
        prop_assert_eq!(h.metadata().len(), values.len());
        for (i, v) in values.iter().enumerate() {
            prop_assert_eq!(h.get(&format!("k{i}")), Some(v));
        }
    }

    #[test]
    fn tensors_round_trip(
        shapes in prop::collection::vec(
            (prop::collection::vec(1u64..6, 0..=4), 0usize..6, 1u32..5), 0..8),
    ) {
        let types = [GgmlType::F32, GgmlType::F16, GgmlType::Q4_0, GgmlType::Q4K,
            GgmlType::I8, GgmlType::BF16];
        let mut w = GgufWriter::new();
        let mut expected = Vec::new();
        for (i, (dims, ty_i, align_pow)) in shapes.iter().enumerate() {
            let ty = types[*ty_i];
            let mut dims = dims.clone();
            if let Some(d) = dims.first_mut() {
                *d *= ty.block_size();
            } else if ty.block_size() > 1 {
                dims.push(ty.block_size());
            }
            if i == 0 {
                w.set_alignment(1 << (3 + align_pow)).unwrap();
            }
            w.add_tensor_zeroed(format!("t{i}"), &dims, ty).unwrap();
            expected.push((dims, ty));
        }
        let bytes = w.to_bytes().unwrap();
        let h = GgufHeader::from_bytes(&bytes).unwrap();
        prop_assert_eq!(h.tensors().len(), expected.len());
        for (t, (dims, ty)) in h.tensors().iter().zip(&expected) {
            prop_assert_eq!(&t.dims, dims);
            prop_assert_eq!(t.ggml_type, *ty);
            prop_assert_eq!(t.n_bytes, ty.tensor_bytes(dims).unwrap());
            prop_assert_eq!(t.file_offset % h.alignment(), 0);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = GgufHeader::from_bytes(&data);
        let mut with_magic = b"GGUF\x03\0\0\0".to_vec();
        with_magic.extend_from_slice(&data);
        let _ = GgufHeader::from_bytes(&with_magic);
    }

    #[test]
    fn tight_limits_never_panic(
        data in prop::collection::vec(any::<u8>(), 0..256),
        depth in 0u32..3,
        keep in 0u64..4,
    ) {
        let limits = ReadLimits {
            max_array_depth: depth,
            keep_numeric_array_max: keep,
            keep_other_array_max: keep,
            max_kept_metadata_bytes: 200,
            max_string_len: 16,
            ..ReadLimits::default()
        };
        let file = common::small_valid_file();
        let _ = GgufHeader::from_bytes_with(&file, &limits);
        let mut mutated = file.clone();
        for (i, b) in data.iter().enumerate() {
            let at = (i * 31 + usize::from(*b)) % mutated.len();
            mutated[at] ^= b;
        }
        let _ = GgufHeader::from_bytes_with(&mutated, &limits);
    }
}
