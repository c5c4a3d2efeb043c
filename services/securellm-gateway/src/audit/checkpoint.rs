//! Signed checkpoints over every audit chain's head: the part of the shared audit (PostgreSQL,
//! several gateways, one chain each) that catches what a chain cannot catch on its own — a
//! chain's tail deleted together with its head record, or a whole chain rewritten with valid
//! hashes. Nothing here touches the database: the signed message, signing, and the check of a
//! checkpoint against the chains as they are now are pure functions (`pg.rs` does the I/O).
//!
//! # The signed message
//!
//! ```text
//! M = "SLCKPT01"                      (8 ASCII bytes: format tag, version 1)
//!     || i64(time_ms) || s(signer) || i64(n)
//!     || for each of the n heads, in ascending byte order of chain_id:
//!          s(chain_id) || i64(last_id) || the 32 bytes last_hash (64 hex digits) decodes to
//! i64, s: as in the row encoding (encoding.rs): 8 bytes big-endian; a length-prefixed UTF-8 string
//! signature = Ed25519(signing key, M), stored as 128 lowercase hex digits
//! ```
//!
//! The signing key is a file holding the 32-byte Ed25519 seed as 64 hex digits (`securellm audit
//! keygen` writes one), readable by its owner only. Verifiers pin the public key (64 hex digits):
//! a checkpoint row carries its signer's public key too, but someone who can rewrite the
//! database can also sign with a key of their own, so a check against the stored key alone
//! proves less (and `verify` says so).

use std::path::Path;

use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

use super::TamperKind;
use super::encoding::is_hash;

/// First bytes of the signed message (format tag, version 1).
pub const CHECKPOINT_TAG: &[u8; 8] = b"SLCKPT01";

/// Checkpoint errors: a signing or public key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("audit signing key {path}: {message}")]
    Key { path: String, message: String },
    #[error("audit public key: {0}")]
    PublicKey(String),
}

/// One chain's head as a checkpoint signs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    pub chain_id: String,
    pub last_id: i64,
    pub last_hash: String,
}

/// A signed statement "at `time_ms`, these were every chain's heads".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The database row id (0 for one not stored, e.g. read from an export file).
    #[serde(default)]
    pub id: i64,
    pub time_ms: i64,
    /// The replica that signed (informational; it is part of the signed message).
    pub signer: String,
    /// The signer's Ed25519 public key, 64 hex digits.
    pub public_key: String,
    /// Sorted by chain id.
    pub heads: Vec<ChainHead>,
    /// 128 hex digits.
    pub signature: String,
}

/// The message a checkpoint signs (see the module doc); `None` if a head's hash is not 64
/// lowercase hex digits. `heads` must be sorted by chain id (as [`sorted`] leaves them).
pub fn message(time_ms: i64, signer: &str, heads: &[ChainHead]) -> Option<Vec<u8>> {
    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend_from_slice(&(v.len() as u64).to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    let mut m = Vec::with_capacity(32 + heads.len() * 64);
    m.extend_from_slice(CHECKPOINT_TAG);
    m.extend_from_slice(&time_ms.to_be_bytes());
    s(&mut m, signer);
    m.extend_from_slice(&(heads.len() as i64).to_be_bytes());
    for h in heads {
        if !is_hash(&h.last_hash) {
            return None;
        }
        s(&mut m, &h.chain_id);
        m.extend_from_slice(&h.last_id.to_be_bytes());
        m.extend_from_slice(&hex::decode(&h.last_hash).ok()?);
    }
    Some(m)
}

/// `heads` in the signed order: ascending byte order of the chain id.
pub fn sorted(mut heads: Vec<ChainHead>) -> Vec<ChainHead> {
    heads.sort_by(|a, b| a.chain_id.as_bytes().cmp(b.chain_id.as_bytes()));
    heads
}

/// An Ed25519 signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey(public {})", self.public_key_hex())
    }
}

impl SigningKey {
    /// From a 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        // A 32-byte seed is always a valid Ed25519 private key.
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .unwrap_or_else(|_| unreachable!("every 32-byte seed is an Ed25519 key"));
        Self { pair }
    }

    /// A new random key and its seed (to store).
    pub fn generate() -> Result<(Self, [u8; 32]), CheckpointError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| CheckpointError::Key {
            path: "(new)".into(),
            message: format!("no randomness: {e}"),
        })?;
        Ok((Self::from_seed(&seed), seed))
    }

    /// Read the seed (64 hex digits) from `path`: a regular file that other users cannot read (a
    /// systemd credential excepted).
    pub fn load(path: &Path) -> Result<Self, CheckpointError> {
        use std::os::unix::fs::PermissionsExt;
        let err = |message: String| CheckpointError::Key {
            path: path.display().to_string(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        if !meta.is_file() {
            return Err(err("is not a regular file".into()));
        }
        let mode = meta.permissions().mode() & 0o777;
        if securellm_common::internal_auth::may_be_read_by_others(mode, path) {
            return Err(err(format!(
                "may be read by other users (mode {mode:04o}); `chmod 600` it"
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let seed =
            parse_hex32(text.trim()).ok_or_else(|| {
                err("must hold the 32-byte Ed25519 seed as 64 hex digits (`securellm audit keygen` \
                 writes one)"
                .into())
            })?;
        Ok(Self::from_seed(&seed))
    }

    pub fn public_key(&self) -> [u8; 32] {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        k
    }

    pub fn public_key_hex(&self) -> String {
        hex::encode(self.public_key())
    }

    /// Sign `heads` (any order) at `time_ms`; `None` if a head's hash is malformed.
    pub fn sign(&self, time_ms: i64, signer: &str, heads: Vec<ChainHead>) -> Option<Checkpoint> {
        let heads = sorted(heads);
        let m = message(time_ms, signer, &heads)?;
        Some(Checkpoint {
            id: 0,
            time_ms,
            signer: signer.to_string(),
            public_key: self.public_key_hex(),
            heads,
            signature: hex::encode(self.pair.sign(&m).as_ref()),
        })
    }
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let v = hex::decode(s).ok()?;
    v.try_into().ok()
}

/// A public key given as 64 hex digits, or the path of a file holding them.
pub fn parse_public_key(s: &str) -> Result<[u8; 32], CheckpointError> {
    let s = s.trim();
    if let Some(k) = parse_hex32(s) {
        return Ok(k);
    }
    let text = std::fs::read_to_string(s).map_err(|e| {
        CheckpointError::PublicKey(format!(
            "{s:?} is neither 64 hex digits nor a readable file: {e}"
        ))
    })?;
    parse_hex32(text.trim()).ok_or_else(|| {
        CheckpointError::PublicKey(format!("{s} does not hold 64 hex digits (an Ed25519 key)"))
    })
}

/// Check `cp`'s signature: against `trusted` when given (and its stated key must be that one),
/// else against the key it states. `Err` says what is wrong.
pub fn check_signature(cp: &Checkpoint, trusted: Option<&[u8; 32]>) -> Result<(), String> {
    let stated = parse_hex32(&cp.public_key)
        .ok_or_else(|| format!("its public key {:?} is not 64 hex digits", cp.public_key))?;
    if let Some(t) = trusted
        && &stated != t
    {
        return Err(format!(
            "it was signed by key {}, not by the trusted key {}",
            cp.public_key,
            hex::encode(t)
        ));
    }
    let in_order = cp
        .heads
        .windows(2)
        .all(|w| w[0].chain_id.as_bytes() < w[1].chain_id.as_bytes());
    if !in_order {
        return Err("its chain heads are not in signed order (or a chain is named twice)".into());
    }
    let m = message(cp.time_ms, &cp.signer, &cp.heads)
        .ok_or_else(|| "a chain head's hash is not 64 lowercase hex digits".to_string())?;
    let sig = hex::decode(&cp.signature).map_err(|_| "its signature is not hex".to_string())?;
    signature::UnparsedPublicKey::new(&signature::ED25519, stated)
        .verify(&m, &sig)
        .map_err(|_| "its signature does not match its content".to_string())
}

/// What a checkpoint's claim about one chain found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimBreak {
    pub chain_id: String,
    /// The checkpointed row.
    pub row: i64,
    pub kind: TamperKind,
    pub detail: String,
}

/// Check each head `cp` signed against the chains as they are now: `row_hash(chain, seq)` is the
/// stored hash of that row (`None`: no such row), `chain_end(chain)` the chain's last row now.
/// The chains themselves must already have verified (then a matching hash at the signed row
/// fixes every row up to it). The first head that no longer holds, if any.
pub fn check_claims(
    cp: &Checkpoint,
    row_hash: impl Fn(&str, i64) -> Option<String>,
    chain_end: impl Fn(&str) -> i64,
) -> Option<ClaimBreak> {
    let what = if cp.id > 0 {
        format!(
            "checkpoint #{} (signed by {} at {} ms)",
            cp.id, cp.signer, cp.time_ms
        )
    } else {
        format!(
            "the exported checkpoint signed by {} at {} ms",
            cp.signer, cp.time_ms
        )
    };
    for h in &cp.heads {
        if h.last_id <= 0 {
            continue;
        }
        let c = &h.chain_id;
        match row_hash(c, h.last_id) {
            None => {
                let end = chain_end(c);
                let now = if end == 0 {
                    "the chain is gone".to_string()
                } else {
                    format!("the chain now ends at row {end}")
                };
                return Some(ClaimBreak {
                    chain_id: c.clone(),
                    row: h.last_id,
                    kind: TamperKind::Truncated,
                    detail: format!(
                        "chain {c:?}: {what} saw it end at row {}, but that row is missing \
                         ({now}): rows were deleted from the end of the chain",
                        h.last_id
                    ),
                });
            }
            Some(stored) if stored != h.last_hash => {
                return Some(ClaimBreak {
                    chain_id: c.clone(),
                    row: h.last_id,
                    kind: TamperKind::Edited,
                    detail: format!(
                        "chain {c:?}: row {}'s hash is {stored}, but {what} signed {}: the \
                         chain up to that row was rewritten (with hashes recomputed)",
                        h.last_id, h.last_hash
                    ),
                });
            }
            Some(_) => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads() -> Vec<ChainHead> {
        vec![
            ChainHead {
                chain_id: "gw-b".into(),
                last_id: 7,
                last_hash: "b".repeat(64),
            },
            ChainHead {
                chain_id: "gw-a".into(),
                last_id: 3,
                last_hash: "a".repeat(64),
            },
        ]
    }

    #[test]
    fn a_signed_checkpoint_verifies_and_any_change_breaks_it() {
        let key = SigningKey::from_seed(&[7; 32]);
        let cp = key.sign(1_700_000_000_000, "gw-a", heads()).unwrap();
        assert_eq!(cp.heads[0].chain_id, "gw-a", "heads are signed in order");
        check_signature(&cp, Some(&key.public_key())).unwrap();
        check_signature(&cp, None).unwrap();

        let mut c = cp.clone();
        c.heads[1].last_id = 6;
        assert!(
            check_signature(&c, None)
                .unwrap_err()
                .contains("does not match")
        );
        let mut c = cp.clone();
        c.heads[0].last_hash = "c".repeat(64);
        assert!(check_signature(&c, None).is_err());
        let mut c = cp.clone();
        c.heads.pop();
        assert!(check_signature(&c, None).is_err(), "a chain left out");
        let mut c = cp.clone();
        c.time_ms += 1;
        assert!(check_signature(&c, None).is_err());
        let mut c = cp.clone();
        c.signer = "gw-b".into();
        assert!(check_signature(&c, None).is_err());
        let mut c = cp.clone();
        c.heads.swap(0, 1);
        assert!(check_signature(&c, None).unwrap_err().contains("order"));

        // Re-signed by another key: valid on its own, refused against the pinned key.
        let other = SigningKey::from_seed(&[8; 32]);
        let forged = other.sign(cp.time_ms, "gw-a", heads()).unwrap();
        check_signature(&forged, None).unwrap();
        let e = check_signature(&forged, Some(&key.public_key())).unwrap_err();
        assert!(e.contains("not by the trusted key"), "{e}");
    }

    #[test]
    fn the_message_is_pinned_by_a_test_vector() {
        // Any change to the format changes this; an outside verifier agrees with it.
        let key = SigningKey::from_seed(&[1; 32]);
        let cp = key.sign(1, "r", heads()).unwrap();
        let m = message(cp.time_ms, &cp.signer, &cp.heads).unwrap();
        assert_eq!(&m[..8], b"SLCKPT01");
        assert_eq!(m.len(), 8 + 8 + 8 + 1 + 8 + 2 * (8 + 4 + 8 + 32));
        // Computed independently (Python's hashlib over the bytes the module doc describes).
        use sha2::Digest;
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&m)),
            "d9034312d79536a8a7143f4641fb43e49d9951f51df582b637c32f87888b4d0e"
        );
        // Ed25519 is deterministic: the same key, time and heads sign the same bytes.
        assert_eq!(cp.signature, key.sign(1, "r", heads()).unwrap().signature);
    }

    #[test]
    fn claims_name_a_cut_tail_a_rewritten_chain_and_a_vanished_chain() {
        let key = SigningKey::from_seed(&[7; 32]);
        let mut cp = key.sign(5, "gw-a", heads()).unwrap();
        cp.id = 4;
        let ok = |c: &str, s: i64| match (c, s) {
            ("gw-a", 3) => Some("a".repeat(64)),
            ("gw-b", 7) => Some("b".repeat(64)),
            _ => None,
        };
        assert_eq!(check_claims(&cp, ok, |_| 9), None);

        let cut = |c: &str, s: i64| if c == "gw-b" { None } else { ok(c, s) };
        let b = check_claims(&cp, cut, |c| if c == "gw-b" { 5 } else { 3 }).unwrap();
        assert_eq!(
            (b.chain_id.as_str(), b.row, b.kind),
            ("gw-b", 7, TamperKind::Truncated)
        );
        assert!(b.detail.contains("now ends at row 5"), "{}", b.detail);
        assert!(b.detail.contains("checkpoint #4"), "{}", b.detail);

        let gone = check_claims(&cp, cut, |c| if c == "gw-b" { 0 } else { 3 }).unwrap();
        assert!(gone.detail.contains("the chain is gone"), "{}", gone.detail);

        let rewritten = |c: &str, s: i64| {
            if c == "gw-a" {
                Some("d".repeat(64))
            } else {
                ok(c, s)
            }
        };
        let b = check_claims(&cp, rewritten, |_| 9).unwrap();
        assert_eq!(
            (b.chain_id.as_str(), b.row, b.kind),
            ("gw-a", 3, TamperKind::Edited)
        );
        assert!(b.detail.contains("rewritten"), "{}", b.detail);
    }

    #[test]
    fn keys_load_only_from_private_files_and_public_keys_parse() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, format!("{}\n", hex::encode([9u8; 32]))).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = SigningKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let k = SigningKey::load(&p).unwrap();
        assert_eq!(k.public_key(), SigningKey::from_seed(&[9; 32]).public_key());
        std::fs::write(&p, "not a key").unwrap();
        assert!(
            SigningKey::load(&p)
                .unwrap_err()
                .to_string()
                .contains("64 hex")
        );

        let pk = k.public_key_hex();
        assert_eq!(parse_public_key(&pk).unwrap(), k.public_key());
        let f = dir.path().join("pub");
        std::fs::write(&f, &pk).unwrap();
        assert_eq!(
            parse_public_key(f.to_str().unwrap()).unwrap(),
            k.public_key()
        );
        assert!(parse_public_key("zz").is_err());
    }
}
