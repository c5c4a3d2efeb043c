//! GGUF parsing and writing (in progress).
