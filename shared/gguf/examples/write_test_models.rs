//! Writes the generated test models into a directory, for manual checks with llama.cpp or
//! gguf-py, and for seeding the cargo-fuzz corpus:
//!
//! ```text
//! cargo run -p securellm-gguf --example write_test_models -- OUT_DIR
//! llama-server -m OUT_DIR/tiny-llama-f32.gguf --host 127.0.0.1 --port 0 -c 512 -np 1 -t 1
//! ```

use std::path::PathBuf;

use securellm_gguf::testmodels::{
    RealisticHeaderOptions, TinyLlamaOptions, WeightType, write_realistic_header_model,
    write_tiny_llama,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or("usage: write_test_models OUT_DIR")?,
    );
    std::fs::create_dir_all(&dir)?;
    let tiny = TinyLlamaOptions::default();
    let files = [
        ("tiny-llama-f32.gguf", tiny.clone()),
        (
            "tiny-llama-f16-gqa.gguf",
            TinyLlamaOptions {
                n_head_kv: 2,
                weight_type: WeightType::F16,
                ..tiny
            },
        ),
        ("tiny-llama-bigger.gguf", TinyLlamaOptions::bigger()),
    ];
    for (name, opts) in files {
        let len = write_tiny_llama(dir.join(name), &opts)?;
        println!("{name}: {len} bytes");
    }
    let len = write_realistic_header_model(
        dir.join("realistic-header.gguf"),
        &RealisticHeaderOptions::default(),
    )?;
    println!("realistic-header.gguf: {len} bytes");
    let len = write_realistic_header_model(
        dir.join("realistic-7b-sparse.gguf"),
        &RealisticHeaderOptions {
            full_shapes: true,
            ..RealisticHeaderOptions::default()
        },
    )?;
    println!("realistic-7b-sparse.gguf: {len} bytes (sparse)");
    Ok(())
}
