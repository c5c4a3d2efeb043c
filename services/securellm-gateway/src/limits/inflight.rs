//! Caps on requests in progress per API key and per client address. They are checked on the
//! request's headers right after authentication, before any of the body is read, and a request
//! holds its place until its response has ended (a stream's last event included). A caller over a
//! cap is answered 429 at once instead of taking a connection and a body buffer: one key (or one
//! address) opening many slow uploads cannot starve everyone else of connections.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use securellm_common::time::now_ms;

use crate::audit::AuditEntry;
use crate::error::ApiError;
use crate::pipeline::Caller;
use crate::state::AppState;

/// The counts of requests in progress.
#[derive(Clone)]
pub struct InFlight {
    inner: Arc<Inner>,
}

struct Inner {
    per_key: usize,
    per_address: usize,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    keys: HashMap<String, usize>,
    addresses: HashMap<String, usize>,
}

/// One request in progress; its place is given back when dropped.
pub struct Slot {
    inner: Arc<Inner>,
    key: String,
    address: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut c) = self.inner.counts.lock() {
            release(&mut c.keys, &self.key);
            release(&mut c.addresses, &self.address);
        }
    }
}

fn release(m: &mut HashMap<String, usize>, k: &str) {
    if let Some(n) = m.get_mut(k) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            m.remove(k);
        }
    }
}

/// Which cap a request ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Over {
    Key(usize),
    Address(usize),
}

impl InFlight {
    /// At most `per_key` requests in progress per API key (or JWT subject) and `per_address` per
    /// client address (0 = no cap).
    pub fn new(per_key: usize, per_address: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                per_key,
                per_address,
                counts: Mutex::new(Counts::default()),
            }),
        }
    }

    /// A place for one more request of `key` from `address`, or the cap it would exceed.
    pub fn enter(&self, key: &str, address: &str) -> Result<Slot, Over> {
        let mut c = self.inner.counts.lock().unwrap_or_else(|p| p.into_inner());
        let k = c.keys.get(key).copied().unwrap_or(0);
        if self.inner.per_key > 0 && k >= self.inner.per_key {
            return Err(Over::Key(self.inner.per_key));
        }
        let a = c.addresses.get(address).copied().unwrap_or(0);
        if self.inner.per_address > 0 && a >= self.inner.per_address {
            return Err(Over::Address(self.inner.per_address));
        }
        c.keys.insert(key.to_string(), k + 1);
        c.addresses.insert(address.to_string(), a + 1);
        Ok(Slot {
            inner: self.inner.clone(),
            key: key.to_string(),
            address: address.to_string(),
        })
    }

    /// Requests in progress for `key`.
    pub fn of_key(&self, key: &str) -> usize {
        self.inner
            .counts
            .lock()
            .map(|c| c.keys.get(key).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

/// Admit an authenticated request of `caller`, or refuse it with 429 (audited, with the caller's
/// key: an authenticated refusal is not aggregated).
pub fn admit(
    st: &AppState,
    caller: &Caller,
    request_id: &str,
    endpoint: &str,
) -> Result<Slot, ApiError> {
    let over = match st.inflight.enter(&caller.key.id, &caller.client) {
        Ok(slot) => return Ok(slot),
        Err(over) => over,
    };
    let message = match over {
        Over::Key(n) => format!(
            "Too many requests in progress for this API key (at most {n}). Retry when one has finished."
        ),
        Over::Address(n) => format!(
            "Too many requests in progress from your address (at most {n}). Retry when one has finished."
        ),
    };
    let e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        .code("rate_limit_exceeded")
        .header("retry-after", "1".to_string());
    let entry = AuditEntry {
        time_ms: now_ms(),
        request_id: request_id.to_string(),
        subject: caller.key.subject.clone(),
        key_id: caller.key.id.clone(),
        client_addr: caller.client.clone(),
        endpoint: endpoint.to_string(),
        status: e.status.as_u16(),
        error_code: "too_many_requests_in_progress".into(),
        trace_id: caller.trace_id.clone(),
        ..AuditEntry::default()
    };
    crate::observe::rate_limited("in_progress");
    crate::observe::request(&entry);
    st.audit.append_nowait(entry);
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_key_and_per_address_and_places_come_back() {
        let f = InFlight::new(2, 3);
        let a1 = f.enter("k1", "10.0.0.1").unwrap();
        let _a2 = f.enter("k1", "10.0.0.1").unwrap();
        assert_eq!(f.enter("k1", "10.0.0.2").err(), Some(Over::Key(2)));
        // Another key from the same address: the address cap (3) applies.
        let _b1 = f.enter("k2", "10.0.0.1").unwrap();
        assert_eq!(f.enter("k2", "10.0.0.1").err(), Some(Over::Address(3)));
        // From elsewhere, k2 still has room.
        let _b2 = f.enter("k2", "10.0.0.2").unwrap();
        drop(a1);
        assert_eq!(f.of_key("k1"), 1);
        let _a3 = f.enter("k1", "10.0.0.1").unwrap();
        // No cap.
        let f = InFlight::new(0, 0);
        let all: Vec<_> = (0..1000).map(|_| f.enter("k", "a").unwrap()).collect();
        assert_eq!(f.of_key("k"), 1000);
        drop(all);
        assert_eq!(f.of_key("k"), 0);
    }
}
