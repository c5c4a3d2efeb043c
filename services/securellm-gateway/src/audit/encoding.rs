//! The canonical encoding of an audit row and the hash chain over it: the format an outside
//! verifier ports (it needs only SHA-256 and this file). Nothing here touches the database.
//!
//! Row `n` (ids are consecutive from 1) stores `prev_hash` — row `n-1`'s `row_hash`, or 64 zeros
//! for row 1 — and
//!
//! ```text
//! row_hash = lowercase_hex(SHA-256(P || E))
//! P = the 32 bytes that prev_hash (64 lowercase hex digits) decodes to
//! E = "SLAUDIT1"                    (8 ASCII bytes: format tag, version 1)
//!     || i64(time_ms) || s(request_id) || s(subject) || s(key_id) || s(client_addr)
//!     || s(endpoint) || s(model) || s(upstream) || i64(status) || s(error_code)
//!     || i64(prompt_tokens) || i64(completion_tokens) || i64(latency_us)
//!     || i64(redactions) || i64(streamed: 1 or 0)
//! i64(x) = x as 8 bytes, big-endian two's complement (the value exactly as SQLite stores it)
//! s(x)   = the UTF-8 byte length of x as 8 bytes, big-endian, then those bytes
//! ```
//!
//! Fields come in this fixed order with fixed widths or length prefixes, so no two different rows
//! encode to the same bytes (no field-boundary confusion: `("ab", "c")` and `("a", "bc")` differ
//! in their length prefixes). The row id is not hashed: the chain itself fixes each row's
//! position (row `n` is the `n`-th link), and `verify` checks that ids run 1, 2, 3, … .
//! [`canonical_encoding`] and [`chain_hash`] compute it; the test vector at the end of this file
//! (one fixed row and its hash) pins it: a port agrees with it, and any change to the format
//! fails it.
//!
//!
//! Before encoding, a row is stored as SQLite keeps it: each text field cut to
//! [`MAX_FIELD_BYTES`] bytes at a character boundary, a time or latency above `i64::MAX` clamped
//! to `i64::MAX`. The hash of a stored row is recomputed from its columns exactly as read.

use sha2::{Digest, Sha256};

use super::AuditEntry;

/// `prev_hash` of row 1: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// First bytes of every canonical encoding (format tag and version).
pub const ENCODING_TAG: &[u8; 8] = b"SLAUDIT1";

/// Longest stored text field, in bytes; longer values are cut at a character boundary.
pub const MAX_FIELD_BYTES: usize = 1024;

/// The canonical encoding `E` of `entry` as it would be stored (text fields cut, counts
/// clamped); see the module doc.
pub fn canonical_encoding(entry: &AuditEntry) -> Vec<u8> {
    Fields::from_entry(entry.clone()).encode()
}

/// `row_hash` of `entry` stored after a row whose hash is `prev_hash`; `None` if `prev_hash` is
/// not 64 lowercase hex digits.
pub fn chain_hash(prev_hash: &str, entry: &AuditEntry) -> Option<String> {
    Fields::from_entry(entry.clone()).chain_hash(prev_hash)
}

pub(crate) fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn clip(mut s: String) -> String {
    if s.len() > MAX_FIELD_BYTES {
        let mut cut = MAX_FIELD_BYTES;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

pub(crate) fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A row's hashed fields exactly as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fields {
    pub(crate) time_ms: i64,
    pub(crate) request_id: String,
    pub(crate) subject: String,
    pub(crate) key_id: String,
    pub(crate) client_addr: String,
    pub(crate) endpoint: String,
    pub(crate) model: String,
    pub(crate) upstream: String,
    pub(crate) status: i64,
    pub(crate) error_code: String,
    pub(crate) prompt_tokens: i64,
    pub(crate) completion_tokens: i64,
    pub(crate) latency_us: i64,
    pub(crate) redactions: i64,
    pub(crate) streamed: i64,
}

impl Fields {
    pub(crate) fn from_entry(e: AuditEntry) -> Self {
        Self {
            time_ms: clamp_i64(e.time_ms),
            request_id: clip(e.request_id),
            subject: clip(e.subject),
            key_id: clip(e.key_id),
            client_addr: clip(e.client_addr),
            endpoint: clip(e.endpoint),
            model: clip(e.model),
            upstream: clip(e.upstream),
            status: i64::from(e.status),
            error_code: clip(e.error_code),
            prompt_tokens: i64::from(e.prompt_tokens),
            completion_tokens: i64::from(e.completion_tokens),
            latency_us: clamp_i64(e.latency_us),
            redactions: i64::from(e.redactions),
            streamed: i64::from(e.streamed),
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        fn int(out: &mut Vec<u8>, v: i64) {
            out.extend_from_slice(&v.to_be_bytes());
        }
        fn text(out: &mut Vec<u8>, s: &str) {
            // usize -> u64 is lossless on every supported target.
            out.extend_from_slice(&(s.len() as u64).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        let strings = [
            &self.request_id,
            &self.subject,
            &self.key_id,
            &self.client_addr,
            &self.endpoint,
            &self.model,
            &self.upstream,
            &self.error_code,
        ];
        let mut out =
            Vec::with_capacity(8 + 7 * 8 + strings.iter().map(|s| 8 + s.len()).sum::<usize>());
        out.extend_from_slice(ENCODING_TAG);
        int(&mut out, self.time_ms);
        text(&mut out, &self.request_id);
        text(&mut out, &self.subject);
        text(&mut out, &self.key_id);
        text(&mut out, &self.client_addr);
        text(&mut out, &self.endpoint);
        text(&mut out, &self.model);
        text(&mut out, &self.upstream);
        int(&mut out, self.status);
        text(&mut out, &self.error_code);
        int(&mut out, self.prompt_tokens);
        int(&mut out, self.completion_tokens);
        int(&mut out, self.latency_us);
        int(&mut out, self.redactions);
        int(&mut out, self.streamed);
        out
    }

    pub(crate) fn chain_hash(&self, prev_hash: &str) -> Option<String> {
        if !is_hash(prev_hash) {
            return None;
        }
        let prev = hex::decode(prev_hash).ok()?;
        let mut h = Sha256::new();
        h.update(&prev);
        h.update(self.encode());
        Some(hex::encode(h.finalize()))
    }
}
