//! Who is calling: API keys ([`keys`]: hashed, constant-time lookup, model patterns, limits) and
//! JWT bearer tokens ([`jwt`]: algorithm pinned; exp, nbf, iss, aud checked). The step that
//! turns an `Authorization` header into a caller is [`crate::pipeline::authenticate`].

pub mod jwt;
pub mod keys;
