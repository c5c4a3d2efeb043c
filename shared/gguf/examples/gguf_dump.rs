//! Prints a GGUF file's header: metadata (long values shortened), tensors and model facts.
//!
//! ```text
//! cargo run -p securellm-gguf --example gguf_dump -- MODEL.gguf
//! ```

use securellm_gguf::{GgufHeader, MetadataValue, ModelInfo};

fn show(v: &MetadataValue) -> String {
    match v {
        MetadataValue::Array(a) => match a.values() {
            Some(vals) => format!("[{}]", vals.iter().map(show).collect::<Vec<_>>().join(", ")),
            None => format!("[{} x {} (skipped)]", a.len(), a.element_type()),
        },
        MetadataValue::String(s) if s.len() > 60 => format!(
            "{:?}... ({} bytes)",
            &s[..s.floor_char_boundary(60)],
            s.len()
        ),
        MetadataValue::String(s) => format!("{s:?}"),
        other => format!("{other:?}"),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: gguf_dump MODEL.gguf")?;
    let header = GgufHeader::open(&path)?;
    println!(
        "version {} alignment {} data_offset {} file_len {}",
        header.version(),
        header.alignment(),
        header.data_offset(),
        header.file_len()
    );
    for (k, v) in header.metadata() {
        println!("{k} = {}", show(v));
    }
    for t in header.tensors() {
        println!(
            "tensor {} {:?} {} offset {} bytes {}",
            t.name, t.dims, t.ggml_type, t.offset, t.n_bytes
        );
    }
    println!("{:#?}", ModelInfo::from_header(&header)?);
    Ok(())
}
