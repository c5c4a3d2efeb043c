//! TLS: one crypto provider (ring) for the whole process. reqwest and rustls panic when a client
//! is built before a provider is installed, so every binary (and every `start` function) calls
//! [`install_crypto_provider`] first. Idempotent.

/// Install ring as the process-wide rustls provider (no-op when one is installed).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
