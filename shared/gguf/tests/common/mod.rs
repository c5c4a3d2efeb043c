//! Helpers shared by the integration tests: a raw byte builder for hand-made (often
//! malformed) GGUF files, and small valid fixtures.

#![allow(dead_code)]

use securellm_gguf::{GgmlType, GgufWriter, MetadataArray, MetadataValue, ValueType};

/// Builds GGUF bytes field by field, so tests can write what the writer refuses to.
#[derive(Debug, Clone, Default)]
pub struct Raw(pub Vec<u8>);

impl Raw {
    pub fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        Raw(Vec::new())
            .bytes(b"GGUF")
            .u32(version)
            .u64(n_tensors)
            .u64(n_kv)
    }
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn u8(self, v: u8) -> Self {
        self.bytes(&[v])
    }
    pub fn u32(self, v: u32) -> Self {
        self.bytes(&v.to_le_bytes())
    }
    pub fn u64(self, v: u64) -> Self {
        self.bytes(&v.to_le_bytes())
    }
    pub fn str(self, s: &str) -> Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    pub fn kv_u32(self, key: &str, v: u32) -> Self {
        self.str(key).u32(ValueType::U32.id()).u32(v)
    }
    pub fn kv_str(self, key: &str, v: &str) -> Self {
        self.str(key).u32(ValueType::String.id()).str(v)
    }
    pub fn tensor(self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> Self {
        let mut r = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            r = r.u64(d);
        }
        r.u32(type_id).u64(offset)
    }
    pub fn pad_to(mut self, align: usize) -> Self {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        self
    }
    pub fn zeros(mut self, n: usize) -> Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

/// Every scalar type, a string, and arrays (flat, nested, empty, of strings).
pub fn all_value_types() -> Vec<(&'static str, MetadataValue)> {
    vec![
        ("t.u8", MetadataValue::U8(200)),
        ("t.i8", MetadataValue::I8(-100)),
        ("t.u16", MetadataValue::U16(60_000)),
        ("t.i16", MetadataValue::I16(-30_000)),
        ("t.u32", MetadataValue::U32(4_000_000_000)),
        ("t.i32", MetadataValue::I32(-2_000_000_000)),
        ("t.f32", MetadataValue::F32(1.5)),
        ("t.bool", MetadataValue::Bool(true)),
        ("t.string", MetadataValue::from("héllo ▁ world")),
        ("t.u64", MetadataValue::U64(u64::MAX)),
        ("t.i64", MetadataValue::I64(i64::MIN)),
        ("t.f64", MetadataValue::F64(-2.25e300)),
        ("t.arr.u8", MetadataValue::from(vec![1u8, 2, 3])),
        ("t.arr.f32", MetadataValue::from(vec![0.5f32, -1.0])),
        ("t.arr.bool", MetadataValue::from(vec![true, false, true])),
        ("t.arr.str", MetadataValue::from(vec!["a", "", "ccc"])),
        ("t.arr.empty", MetadataValue::from(Vec::<i64>::new())),
        (
            "t.arr.nested",
            MetadataValue::Array(
                MetadataArray::new(
                    ValueType::Array,
                    vec![
                        MetadataValue::from(vec![1i32, 2]),
                        MetadataValue::from(vec![3i32]),
                    ],
                )
                .unwrap(),
            ),
        ),
    ]
}

/// A small valid file: all value types and two tensors.
pub fn small_valid_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    for (k, v) in all_value_types() {
        w.add_metadata(k, v).unwrap();
    }
    w.add_tensor_f32("a", &[2, 2], &[1.0, 2.0, 3.0, 4.0])
        .unwrap();
    w.add_tensor_f16("blk.0.b", &[3], &[1.0, 2.0, 3.0]).unwrap();
    w.add_tensor_zeroed("c", &[32], GgmlType::Q8_0).unwrap();
    w.to_bytes().unwrap()
}

/// Offset of the first occurrence of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present")
}
