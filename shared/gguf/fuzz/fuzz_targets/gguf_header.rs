//! libFuzzer target: the GGUF header reader (and ModelInfo) on arbitrary bytes must return
//! Ok or Err, never panic, abort, hang or allocate without bound.

#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use securellm_gguf::{GgufHeader, ModelInfo};

fuzz_target!(|data: &[u8]| {
    let from_slice = GgufHeader::from_bytes(data);
    if let Ok(header) = &from_slice {
        let _ = ModelInfo::from_header(header);
    }
    // The buffered (Read + Seek) path must agree with the slice path.
    let from_reader = GgufHeader::read(Cursor::new(data));
    assert_eq!(from_slice.is_ok(), from_reader.is_ok());
    if let (Ok(a), Ok(b)) = (&from_slice, &from_reader) {
        // Compared through Debug so that NaN values compare equal to themselves.
        assert_eq!(format!("{:?}", a.metadata()), format!("{:?}", b.metadata()));
        assert_eq!(a.tensors(), b.tensors());
    }
});
