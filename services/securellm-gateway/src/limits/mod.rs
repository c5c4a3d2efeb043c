//! How much a caller may ask for: requests / tokens per minute and concurrency per key, and
//! failed-authentication limits per address ([`ratelimit`]); requests in progress per key and per
//! address, capped on the headers before any body is read ([`inflight`]); the same three per-key
//! limits held across every gateway on one PostgreSQL database ([`shared`]).

pub mod inflight;
pub mod ratelimit;
pub mod shared;
