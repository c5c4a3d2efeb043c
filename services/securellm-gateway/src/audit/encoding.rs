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
//!     [|| s(trace_id)]              (only in version 2, below)
//! i64(x) = x as 8 bytes, big-endian two's complement (the value exactly as SQLite stores it)
//! s(x)   = the UTF-8 byte length of x as 8 bytes, big-endian, then those bytes
//! ```
//!
//! Version 2 adds the request's trace id: a row WITH a trace id is encoded with the tag
//! `"SLAUDIT2"` and `s(trace_id)` appended at the end; a row without one (the trace id is empty,
//! as in every row written before the field existed) is encoded exactly as version 1, tag
//! `"SLAUDIT1"` included. So old chains keep verifying unchanged, and the two forms can never
//! encode to the same bytes (the tag differs).
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

/// First bytes of the canonical encoding of a row without a trace id (format tag, version 1).
pub const ENCODING_TAG: &[u8; 8] = b"SLAUDIT1";

/// First bytes of the canonical encoding of a row with a trace id (version 2).
pub const ENCODING_TAG_V2: &[u8; 8] = b"SLAUDIT2";

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
    pub(crate) trace_id: String,
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
            trace_id: clip(e.trace_id),
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
            &self.trace_id,
        ];
        let mut out =
            Vec::with_capacity(8 + 7 * 8 + strings.iter().map(|s| 8 + s.len()).sum::<usize>());
        let v2 = !self.trace_id.is_empty();
        out.extend_from_slice(if v2 { ENCODING_TAG_V2 } else { ENCODING_TAG });
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
        if v2 {
            text(&mut out, &self.trace_id);
        }
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

/// The test vector: fixed rows and their exact encodings and hashes, computed once (by an
/// independent implementation of the format above, in Python with `hashlib`) and written down.
/// A change to the encoding breaks these tests; an outside verifier checks its port against them.
#[cfg(test)]
mod vector {
    use super::*;

    /// Row 1 of a log.
    pub(super) fn row1() -> AuditEntry {
        AuditEntry {
            time_ms: 1_700_000_000_123,
            request_id: "req_0123456789abcdef".into(),
            subject: "alice".into(),
            key_id: "key_7f3a".into(),
            client_addr: "192.0.2.10".into(),
            endpoint: "/v1/chat/completions".into(),
            model: "llama-3-8b".into(),
            upstream: "local".into(),
            status: 200,
            error_code: String::new(),
            prompt_tokens: 12,
            completion_tokens: 34,
            latency_us: 56_789,
            redactions: 1,
            streamed: true,
            trace_id: String::new(),
        }
    }

    /// Row 2: empty fields, non-ASCII text (lengths count UTF-8 bytes), an error.
    fn row2() -> AuditEntry {
        AuditEntry {
            time_ms: 1_700_000_000_456,
            request_id: "req_2".into(),
            subject: String::new(),
            key_id: String::new(),
            client_addr: "2001:db8::1".into(),
            endpoint: "grpc:/securellm.v1.Gateway/Chat".into(),
            model: "modèle-π".into(),
            upstream: "acme".into(),
            status: 429,
            error_code: "rate_limit_exceeded".into(),
            prompt_tokens: 0,
            completion_tokens: 0,
            latency_us: 0,
            redactions: 0,
            streamed: false,
            trace_id: String::new(),
        }
    }

    const ROW1_ENCODING: &str = "534c4155444954310000018bcfe5687b00000000000000147265715f3031323334\
        35363738396162636465660000000000000005616c69636500000000000000086b65795f37663361000000\
        000000000a3139322e302e322e313000000000000000142f76312f636861742f636f6d706c6574696f6e73\
        000000000000000a6c6c616d612d332d386200000000000000056c6f63616c00000000000000c800000000\
        00000000000000000000000c0000000000000022000000000000ddd5000000000000000100000000000000\
        01";
    const ROW1_HASH: &str = "fc91810d8470044f674def484f03aba520b0e0848c018c444e07c0b4679db026";
    const ROW2_HASH: &str = "45f96daf975541651984907b2cc392bb4f300eedc232184f26cea27812442c9f";

    #[test]
    fn a_fixed_row_encodes_and_hashes_to_the_written_down_bytes() {
        let e = canonical_encoding(&row1());
        assert_eq!(e.len(), 206);
        assert_eq!(&e[..8], ENCODING_TAG);
        assert_eq!(hex::encode(&e), ROW1_ENCODING);
        assert_eq!(
            chain_hash(GENESIS_HASH, &row1()).as_deref(),
            Some(ROW1_HASH)
        );
    }

    #[test]
    fn the_next_row_chains_onto_the_first() {
        assert_eq!(chain_hash(ROW1_HASH, &row2()).as_deref(), Some(ROW2_HASH));
        // The previous hash is part of the input: the same row after another hash differs.
        assert_ne!(
            chain_hash(GENESIS_HASH, &row2()).as_deref(),
            Some(ROW2_HASH)
        );
        // A previous hash that is not 64 lowercase hex digits is refused.
        assert_eq!(chain_hash(&ROW1_HASH.to_uppercase(), &row2()), None);
        assert_eq!(chain_hash("00", &row2()), None);
    }

    /// Row 1 with a trace id: version 2 (its own tag, the trace id appended).
    const ROW1_TRACED_HASH: &str =
        "3567e97cad205f2a424ee38003797f933b71bb2d9287a1437daa8b73090e02ed";

    #[test]
    fn a_row_with_a_trace_id_is_version_2_and_a_row_without_is_unchanged() {
        // Without a trace id the encoding is version 1, byte for byte (the vector above): rows
        // written before the field existed verify as they did.
        assert_eq!(hex::encode(canonical_encoding(&row1())), ROW1_ENCODING);
        let mut traced = row1();
        traced.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736".into();
        let e = canonical_encoding(&traced);
        assert_eq!(&e[..8], ENCODING_TAG_V2);
        // The v1 body after the tag, then s(trace_id).
        let v1 = canonical_encoding(&row1());
        assert_eq!(&e[8..206], &v1[8..]);
        assert_eq!(&e[206..214], &32u64.to_be_bytes());
        assert_eq!(&e[214..], traced.trace_id.as_bytes());
        assert_eq!(
            chain_hash(GENESIS_HASH, &traced).as_deref(),
            Some(ROW1_TRACED_HASH)
        );
        // Another trace id is another hash.
        let mut other = traced.clone();
        other.trace_id = "4bf92f3577b34da6a3ce929d0e0e4737".into();
        assert_ne!(
            chain_hash(GENESIS_HASH, &other),
            chain_hash(GENESIS_HASH, &traced)
        );
    }

    #[test]
    fn stored_values_are_what_is_hashed() {
        // Text past MAX_FIELD_BYTES is cut (at a character boundary) before encoding, so the
        // hash of an over-long entry is the hash of the row as stored.
        let mut long = row1();
        long.model = "é".repeat(MAX_FIELD_BYTES);
        let mut cut = row1();
        cut.model = "é".repeat(MAX_FIELD_BYTES / 2);
        assert_eq!(canonical_encoding(&long), canonical_encoding(&cut));
        let mut big = row1();
        big.latency_us = u64::MAX;
        let mut clamped = row1();
        clamped.latency_us = i64::MAX as u64;
        assert_eq!(
            chain_hash(GENESIS_HASH, &big),
            chain_hash(GENESIS_HASH, &clamped)
        );
    }
}
