//! Per-subject rate limits — requests per minute, tokens per minute, concurrent
//! requests — and a failed-authentication limiter per client address.
//!
//! Limits arrive with every call ([`Limits`], taken from the caller's key
//! record), so keys with different quotas coexist; `None` or `0` means
//! unlimited. [`RateLimiter::admit`] decides in one critical section and
//! returns [`Admission::Allowed`] with a RAII [`Permit`] (dropping it frees the
//! concurrency slot) or [`Admission::Limited`] saying which limit tripped and
//! when to retry; both carry OpenAI-style `x-ratelimit-*` headers, and limited
//! answers add `retry-after` (whole seconds, at least 1) and `retry-after-ms`.
//! A refused request consumes nothing from any limit.
//!
//! * **Requests per minute** use `governor` (GCRA): one keyed limiter per
//!   distinct rpm value, keyed by subject, with burst = rpm (a full minute's
//!   allowance may be spent at once, then one request per `60 s / rpm`). A
//!   subject whose rpm changes moves to the limiter for the new value and
//!   starts there with a full allowance. `x-ratelimit-remaining-requests` is
//!   governor's exact remaining burst capacity after an admitted request; on
//!   answers refused for another reason it is extrapolated from the last
//!   admitted request (approximate).
//! * **Tokens per minute** use a token bucket of our own (capacity = tpm,
//!   refilled continuously at tpm / 60 s), not governor, because the token
//!   count is only known after the fact: the prompt is estimated up front
//!   (bytes / 4, at least 1 — see [`estimate_prompt_tokens`]) and charged at
//!   admission, and [`RateLimiter::reconcile`] later charges the real usage.
//!   Governor can neither refund an over-estimate nor take more than its
//!   capacity (`check_n` refuses, so a long completion's extra tokens would be
//!   forgiven); this bucket refunds the difference (up to capacity) and can go
//!   into debt, which then delays the subject's next requests — the usual TPM
//!   semantics. Being our own state it can also be inspected without being
//!   consumed, so an RPM cell is never spent on a request the TPM check
//!   refuses. A single request estimated above the whole tpm can never fit
//!   and is refused as `Tpm` with a 60 s retry hint. The bucket belongs to the
//!   subject, not to the quota: a quota change keeps what was spent (the new
//!   bucket starts `spent` below its capacity), and requests made without a
//!   token limit leave it in place, so alternating quotas never refills it.
//! * **Concurrency** is a per-subject in-flight counter; the permit decrements it on drop.
//! * **Failed authentication** is counted per client IP (IPv4, or the /64 of
//!   an IPv6 address; a `host:port` string is reduced to its host) with a
//!   governor limiter (default 10 per minute). When a failure uses up the
//!   allowance, the address is blocked for one replenish interval
//!   (`60 s / n`, an upper bound on GCRA's own wait) so that the next attempt —
//!   right or wrong — is answered 429 *before* the key is checked, and
//!   guessing cannot continue.
//!
//! Call [`RateLimiter::retain_recent`] periodically: it drops governor state
//! and per-subject entries indistinguishable from fresh ones.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter as Gcra};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Failed authentication attempts allowed per client address per minute by [`RateLimiter::new`].
pub const DEFAULT_AUTH_FAILURES_PER_MINUTE: u32 = 10;

/// Retry hint when the concurrency limit is reached (no way to know when a slot frees).
const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);

/// A key's quotas. `None` or `Some(0)` means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens (prompt + completion) per minute.
    pub tpm: Option<u32>,
    /// Requests in flight at once.
    pub concurrent: Option<u32>,
}

impl Limits {
    /// True when no limit applies.
    pub fn is_unlimited(&self) -> bool {
        nz(self.rpm).is_none() && nz(self.tpm).is_none() && nz(self.concurrent).is_none()
    }
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// Requests per minute.
    Rpm,
    /// Tokens per minute.
    Tpm,
    /// Concurrent requests.
    Concurrency,
}

impl LimitKind {
    /// `"requests"`, `"tokens"` or `"concurrent requests"`, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Rpm => "requests",
            LimitKind::Tpm => "tokens",
            LimitKind::Concurrency => "concurrent requests",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// HTTP headers as `(name, value)` pairs.
pub type Headers = Vec<(&'static str, String)>;

/// The rate limiter's decision for one request.
#[derive(Debug)]
#[must_use]
pub enum Admission {
    /// Go ahead; keep `permit` alive until the request is finished.
    Allowed {
        /// Holds the concurrency slot.
        permit: Permit,
        /// `x-ratelimit-*` headers for the limits that apply.
        headers: Headers,
    },
    /// Answer 429.
    Limited {
        /// How long until the request could be admitted (never zero).
        retry_after: Duration,
        /// The limit that refused it.
        which: LimitKind,
        /// `x-ratelimit-*` headers plus `retry-after` and `retry-after-ms`.
        headers: Headers,
    },
}

/// Releases a subject's concurrency slot when dropped.
pub struct Permit {
    ledger: Arc<dyn Release>,
    subject: Arc<str>,
}

impl Permit {
    /// The subject this permit was issued to.
    pub fn subject(&self) -> &str {
        &self.subject
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("subject", &self.subject)
            .finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.ledger.release(&self.subject);
    }
}

/// What a [`Permit`] needs from its limiter (type-erased over the clock).
trait Release: Send + Sync {
    fn release(&self, subject: &str);
}

/// The prompt of an OpenAI request body in tokens, estimated before the engine counts it (the
/// tokens-per-minute limit charges it at admission and reconciles with the real usage later):
/// bytes / 4 of the JSON text of the members that become the prompt (`messages`, `prompt`,
/// `input`, `suffix`, and the tool and format definitions rendered into it), at least 1. It
/// over-estimates rather than under (keys, quotes and image URLs count), so a limit is not
/// overshot before the real count arrives.
pub fn estimate_prompt_tokens(v: &Value) -> u32 {
    /// Bytes of text (strings and keys) in a JSON value, about what its serialisation weighs.
    fn text_bytes(v: &Value) -> usize {
        match v {
            Value::String(s) => s.len() + 2,
            Value::Array(a) => a.iter().map(text_bytes).sum::<usize>() + a.len() + 1,
            Value::Object(m) => {
                m.iter()
                    .map(|(k, v)| k.len() + 3 + text_bytes(v))
                    .sum::<usize>()
                    + 1
            }
            Value::Number(_) => 4,
            Value::Bool(_) | Value::Null => 4,
        }
    }
    // Tool and format definitions are rendered into the prompt too.
    let n = [
        "messages",
        "prompt",
        "input",
        "suffix",
        "tools",
        "functions",
        "response_format",
    ]
    .iter()
    .filter_map(|k| v.get(*k))
    .map(text_bytes)
    .sum::<usize>();
    u32::try_from(n / 4).unwrap_or(u32::MAX).max(1)
}

fn nz(v: Option<u32>) -> Option<u32> {
    v.filter(|&n| n > 0)
}

fn nanos_to_duration(n: Nanos) -> Duration {
    n.into()
}

/// Seconds (possibly fractional, possibly negative or huge) to a `Duration`, saturating.
fn secs(x: f64) -> Duration {
    if x.is_nan() || x <= 0.0 {
        Duration::ZERO
    } else {
        Duration::try_from_secs_f64(x).unwrap_or(Duration::from_secs(u64::from(u32::MAX)))
    }
}

/// A continuously refilled token bucket; `tokens` may go negative (debt).
#[derive(Debug)]
struct TokenBucket<I> {
    capacity: u32,
    tokens: f64,
    last: I,
}

impl<I: Reference> TokenBucket<I> {
    fn full(capacity: u32, now: I) -> Self {
        TokenBucket {
            capacity,
            tokens: f64::from(capacity),
            last: now,
        }
    }

    fn per_sec(&self) -> f64 {
        f64::from(self.capacity) / MINUTE.as_secs_f64()
    }

    fn refill(&mut self, now: I) {
        if now > self.last {
            let dt = nanos_to_duration(now.duration_since(self.last)).as_secs_f64();
            self.tokens = (self.tokens + dt * self.per_sec()).min(f64::from(self.capacity));
            self.last = now;
        }
    }

    /// Time until `cost` tokens are available (zero if they are).
    fn wait_for(&self, cost: u32) -> Duration {
        secs((f64::from(cost) - self.tokens) / self.per_sec())
    }

    fn time_to_full(&self) -> Duration {
        secs((f64::from(self.capacity) - self.tokens) / self.per_sec())
    }

    fn remaining(&self) -> u64 {
        if self.tokens <= 0.0 {
            0
        } else {
            self.tokens.floor() as u64
        }
    }

    fn is_full(&self) -> bool {
        self.tokens >= f64::from(self.capacity)
    }
}

/// The rpm state seen at the last RPM decision, to extrapolate remaining requests.
#[derive(Debug)]
struct RpmSeen<I> {
    rpm: u32,
    remaining: u32,
    at: I,
}

impl<I: Reference> RpmSeen<I> {
    fn remaining_at(&self, now: I) -> u32 {
        let interval = MINUTE.as_nanos() / u128::from(self.rpm.max(1));
        let elapsed = nanos_to_duration(now.duration_since(self.at)).as_nanos();
        let regained = u32::try_from(elapsed / interval.max(1)).unwrap_or(u32::MAX);
        self.remaining.saturating_add(regained).min(self.rpm)
    }
}

#[derive(Debug)]
struct Subject<I> {
    key: Arc<str>,
    in_flight: u32,
    tpm: Option<TokenBucket<I>>,
    rpm_seen: Option<RpmSeen<I>>,
}

type Keyed<K, C> = Gcra<K, DefaultKeyedStateStore<K>, C, StateInformationMiddleware>;

fn keyed<K, C>(quota: Quota, clock: C) -> Keyed<K, C>
where
    K: std::hash::Hash + Eq + Clone,
    C: Clock,
{
    Keyed::<K, C>::new(quota, DefaultKeyedStateStore::<K>::default(), clock)
}

struct Inner<C: Clock> {
    subjects: HashMap<Arc<str>, Subject<C::Instant>>,
    /// One keyed limiter per distinct rpm value.
    rpm: HashMap<u32, Keyed<Arc<str>, C>>,
}

struct Shared<C: Clock> {
    clock: C,
    inner: Mutex<Inner<C>>,
    auth: AuthLimiter<C>,
}

impl<C: Clock> Shared<C> {
    fn lock(&self) -> MutexGuard<'_, Inner<C>> {
        // The state stays consistent across a panic elsewhere; keep serving.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<C> Release for Shared<C>
where
    C: Clock + Send + Sync,
    C::Instant: Send + Sync,
{
    fn release(&self, subject: &str) {
        if let Some(s) = self.lock().subjects.get_mut(subject) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }
}

/// Requests / tokens per minute and concurrency per subject, plus the
/// failed-authentication limiter. Cheap to clone (shared state).
pub struct RateLimiter<C: Clock = DefaultClock> {
    shared: Arc<Shared<C>>,
}

impl<C: Clock> Clone for RateLimiter<C> {
    fn clone(&self) -> Self {
        RateLimiter {
            shared: self.shared.clone(),
        }
    }
}

impl<C: Clock> fmt::Debug for RateLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter").finish_non_exhaustive()
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimiter {
    /// A limiter on the default clock, allowing
    /// [`DEFAULT_AUTH_FAILURES_PER_MINUTE`] failed authentications per address per minute.
    pub fn new() -> Self {
        Self::with_auth_limit(DEFAULT_AUTH_FAILURES_PER_MINUTE)
    }

    /// As [`new`](Self::new) with `failures_per_minute` (0 disables the failed-auth limiter).
    pub fn with_auth_limit(failures_per_minute: u32) -> Self {
        Self::with_clock(DefaultClock::default(), failures_per_minute)
    }
}

impl<C> RateLimiter<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    /// A limiter on `clock` (tests use `governor::clock::FakeRelativeClock`).
    pub fn with_clock(clock: C, auth_failures_per_minute: u32) -> Self {
        RateLimiter {
            shared: Arc::new(Shared {
                auth: AuthLimiter::with_clock(clock.clone(), auth_failures_per_minute),
                clock,
                inner: Mutex::new(Inner {
                    subjects: HashMap::new(),
                    rpm: HashMap::new(),
                }),
            }),
        }
    }

    /// Decides whether `subject` may start a request estimated at
    /// `estimated_tokens` prompt tokens under `limits`.
    ///
    /// Checks concurrency, then tokens, then requests; a refused request
    /// consumes nothing. An admitted one takes a concurrency slot (until the
    /// permit drops), one request and `max(estimated_tokens, 1)` tokens.
    pub fn admit(&self, subject: &str, limits: &Limits, estimated_tokens: u32) -> Admission {
        let sh = &*self.shared;
        let now = sh.clock.now();
        let mut guard = sh.lock();
        let Inner { subjects, rpm } = &mut *guard;
        let st = subjects
            .entry(Arc::from(subject))
            .or_insert_with_key(|k| Subject {
                key: k.clone(),
                in_flight: 0,
                tpm: None,
                rpm_seen: None,
            });

        // Bring the token bucket in line with the quota passed in. Its state follows the
        // subject: a request without a token limit leaves it as it is (refilling), and a new
        // capacity keeps what was spent, so switching quotas back and forth never refills it.
        let tpm = nz(limits.tpm);
        match (tpm, &mut st.tpm) {
            (None, _) => {}
            (Some(cap), Some(b)) if b.capacity == cap => b.refill(now),
            (Some(cap), Some(b)) => {
                b.refill(now);
                let spent = f64::from(b.capacity) - b.tokens;
                *b = TokenBucket {
                    capacity: cap,
                    tokens: f64::from(cap) - spent,
                    last: now,
                };
            }
            (Some(cap), bucket @ None) => *bucket = Some(TokenBucket::full(cap, now)),
        }
        let rpm_limit = nz(limits.rpm);
        if rpm_limit.is_none() {
            st.rpm_seen = None;
        }
        // The request headers as they stand without this request (for refusals).
        let requests_now = |st: &Subject<C::Instant>| {
            rpm_limit.map(|limit| {
                let remaining = st
                    .rpm_seen
                    .as_ref()
                    .filter(|s| s.rpm == limit)
                    .map_or(limit, |s| s.remaining_at(now));
                (limit, remaining, rpm_reset(limit, remaining))
            })
        };
        let tokens_now = |st: &Subject<C::Instant>| {
            st.tpm
                .as_ref()
                .filter(|_| tpm.is_some())
                .map(|b| (b.capacity, b.remaining(), b.time_to_full()))
        };

        if let Some(max) = nz(limits.concurrent)
            && st.in_flight >= max
        {
            return limited(
                LimitKind::Concurrency,
                CONCURRENCY_RETRY,
                requests_now(st),
                tokens_now(st),
            );
        }

        let cost = estimated_tokens.max(1);
        if let Some(b) = st.tpm.as_ref().filter(|_| tpm.is_some()) {
            let wait = if cost > b.capacity {
                Some(MINUTE)
            } else if b.tokens < f64::from(cost) {
                Some(b.wait_for(cost))
            } else {
                None
            };
            if let Some(wait) = wait {
                return limited(LimitKind::Tpm, wait, requests_now(st), tokens_now(st));
            }
        }

        let mut requests = None;
        if let Some(limit) = rpm_limit {
            let limiter = rpm.entry(limit).or_insert_with(|| {
                keyed(
                    Quota::per_minute(NonZeroU32::new(limit).unwrap_or(NonZeroU32::MIN)),
                    sh.clock.clone(),
                )
            });
            match limiter.check_key(&st.key) {
                Ok(snapshot) => {
                    let remaining = snapshot.remaining_burst_capacity().min(limit);
                    st.rpm_seen = Some(RpmSeen {
                        rpm: limit,
                        remaining,
                        at: now,
                    });
                    requests = Some((limit, remaining, rpm_reset(limit, remaining)));
                }
                Err(not_until) => {
                    let wait = not_until.wait_time_from(sh.clock.now());
                    st.rpm_seen = Some(RpmSeen {
                        rpm: limit,
                        remaining: 0,
                        at: now,
                    });
                    return limited(
                        LimitKind::Rpm,
                        wait,
                        Some((limit, 0, rpm_reset(limit, 0))),
                        tokens_now(st),
                    );
                }
            }
        }

        if tpm.is_some()
            && let Some(b) = &mut st.tpm
        {
            b.tokens -= f64::from(cost);
        }
        st.in_flight = st.in_flight.saturating_add(1);
        let headers = ratelimit_headers(requests, tokens_now(st));
        let permit = Permit {
            ledger: self.shared.clone(),
            subject: st.key.clone(),
        };
        Admission::Allowed { permit, headers }
    }

    /// Settles a finished request's tokens: charges `actual_tokens − estimated_tokens`
    /// to the subject's TPM bucket (refunding, up to capacity, when negative).
    ///
    /// `actual_tokens` is the total reported usage (prompt + completion).
    /// `0` means "unknown" (no usage reported) and keeps the estimate. The
    /// bucket may go into debt, which delays the subject's next requests.
    /// No-op if the subject has no TPM limit, or its quota changed since admission.
    pub fn reconcile(
        &self,
        subject: &str,
        limits: &Limits,
        estimated_tokens: u32,
        actual_tokens: u32,
    ) {
        let Some(cap) = nz(limits.tpm) else { return };
        if actual_tokens == 0 {
            return;
        }
        let now = self.shared.clock.now();
        let mut guard = self.shared.lock();
        let Some(b) = guard
            .subjects
            .get_mut(subject)
            .and_then(|s| s.tpm.as_mut())
            .filter(|b| b.capacity == cap)
        else {
            return;
        };
        b.refill(now);
        let delta = f64::from(actual_tokens) - f64::from(estimated_tokens.max(1));
        b.tokens = (b.tokens - delta).min(f64::from(b.capacity));
    }

    /// If `client` is blocked after too many failed authentications, how long it still is.
    pub fn auth_blocked(&self, client: &str) -> Option<Duration> {
        self.shared.auth.blocked(client)
    }

    /// Records a failed authentication from `client`; returns the block
    /// duration if this failure used up the address's allowance.
    pub fn auth_failed(&self, client: &str) -> Option<Duration> {
        self.shared.auth.failed(client)
    }

    /// Memory hygiene: drops governor state and subject entries that are
    /// indistinguishable from fresh ones (nothing in flight, buckets full),
    /// and expired auth blocks. Call every minute or so.
    pub fn retain_recent(&self) {
        let now = self.shared.clock.now();
        {
            let mut guard = self.shared.lock();
            let Inner { subjects, rpm } = &mut *guard;
            for limiter in rpm.values() {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
            rpm.retain(|_, l| !l.is_empty());
            subjects.retain(|_, s| {
                if s.in_flight > 0 {
                    return true;
                }
                if let Some(b) = &mut s.tpm {
                    b.refill(now);
                    if !b.is_full() {
                        return true;
                    }
                }
                s.rpm_seen
                    .as_ref()
                    .is_some_and(|seen| seen.remaining_at(now) < seen.rpm)
            });
            if subjects.capacity() > 64 && subjects.capacity() > 4 * subjects.len() {
                subjects.shrink_to_fit();
            }
        }
        self.shared.auth.retain_recent();
    }

    /// Requests of `subject` now in flight.
    pub fn in_flight(&self, subject: &str) -> u32 {
        self.shared
            .lock()
            .subjects
            .get(subject)
            .map_or(0, |s| s.in_flight)
    }

    /// Number of subjects with retained state (for metrics and tests).
    pub fn tracked_subjects(&self) -> usize {
        self.shared.lock().subjects.len()
    }
}

/// Failed authentication attempts per client address (see the module docs).
pub struct AuthLimiter<C: Clock = DefaultClock> {
    clock: C,
    interval: Duration,
    limiter: Option<Keyed<String, C>>,
    blocked: Mutex<HashMap<String, C::Instant>>,
}

impl<C: Clock> fmt::Debug for AuthLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthLimiter")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl<C: Clock + Clone> AuthLimiter<C> {
    /// `failures_per_minute` failures per address per minute; 0 disables the limiter.
    pub fn with_clock(clock: C, failures_per_minute: u32) -> Self {
        let n = NonZeroU32::new(failures_per_minute);
        let quota = n.map(Quota::per_minute);
        AuthLimiter {
            interval: quota.map_or(MINUTE, |q| q.replenish_interval()),
            limiter: quota.map(|q| keyed(q, clock.clone())),
            clock,
            blocked: Mutex::new(HashMap::new()),
        }
    }

    fn lock_blocked(&self) -> MutexGuard<'_, HashMap<String, C::Instant>> {
        self.blocked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How long `client` remains blocked, if it is.
    pub fn blocked(&self, client: &str) -> Option<Duration> {
        self.limiter.as_ref()?;
        let now = self.clock.now();
        let key = client_key(client);
        self.lock_blocked()
            .get(&key)
            .filter(|&&until| until > now)
            .map(|&until| nanos_to_duration(until.duration_since(now)))
    }

    /// Records one failure; returns the block duration if the allowance is now used up.
    pub fn failed(&self, client: &str) -> Option<Duration> {
        let limiter = self.limiter.as_ref()?;
        let key = client_key(client);
        let now = self.clock.now();
        let block = match limiter.check_key(&key) {
            Ok(snapshot) if snapshot.remaining_burst_capacity() == 0 => self.interval,
            Ok(_) => return None,
            Err(not_until) => not_until
                .wait_time_from(self.clock.now())
                .max(self.interval),
        };
        let until = now + Nanos::from(block);
        let mut blocked = self.lock_blocked();
        let slot = blocked.entry(key).or_insert(until);
        if until > *slot {
            *slot = until;
        }
        Some(block)
    }

    /// Drops expired blocks and stale governor state.
    pub fn retain_recent(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
        let now = self.clock.now();
        self.lock_blocked().retain(|_, until| *until > now);
    }
}

/// The address a failure is counted against: the IP of an `ip` or
/// `ip:port` string (IPv4-mapped IPv6 as IPv4, other IPv6 by /64), else the string itself.
fn client_key(client: &str) -> String {
    let ip = client
        .parse::<SocketAddr>()
        .map(|s| s.ip())
        .or_else(|_| client.parse::<IpAddr>());
    match ip.map(|ip| ip.to_canonical()) {
        Ok(IpAddr::V4(v4)) => v4.to_string(),
        Ok(IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{}/64", Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        Err(_) => client.to_owned(),
    }
}

/// `x-ratelimit-reset-requests`: time until the GCRA bucket is full again (approximate).
fn rpm_reset(limit: u32, remaining: u32) -> Duration {
    let missing = limit.saturating_sub(remaining);
    MINUTE
        .checked_mul(missing)
        .and_then(|d| d.checked_div(limit.max(1)))
        .unwrap_or(MINUTE)
}

type Group = Option<(u32, u64, Duration)>;

fn ratelimit_headers(requests: Option<(u32, u32, Duration)>, tokens: Group) -> Headers {
    let mut h = Vec::with_capacity(8);
    if let Some((limit, remaining, reset)) = requests {
        h.push(("x-ratelimit-limit-requests", limit.to_string()));
        h.push(("x-ratelimit-remaining-requests", remaining.to_string()));
        h.push(("x-ratelimit-reset-requests", format_reset(reset)));
    }
    if let Some((limit, remaining, reset)) = tokens {
        h.push(("x-ratelimit-limit-tokens", limit.to_string()));
        h.push(("x-ratelimit-remaining-tokens", remaining.to_string()));
        h.push(("x-ratelimit-reset-tokens", format_reset(reset)));
    }
    h
}

fn limited(
    which: LimitKind,
    retry_after: Duration,
    requests: Option<(u32, u32, Duration)>,
    tokens: Group,
) -> Admission {
    let retry_after = retry_after.max(Duration::from_millis(1));
    let mut headers = ratelimit_headers(requests, tokens);
    headers.extend(retry_headers(retry_after));
    Admission::Limited {
        retry_after,
        which,
        headers,
    }
}

/// `retry-after` (whole seconds, rounded up, at least 1) and `retry-after-ms`
/// (which the official OpenAI clients prefer) for a 429 answer.
pub fn retry_headers(retry_after: Duration) -> Headers {
    let ms = retry_after.as_millis().max(1);
    let secs = ms.div_ceil(1000).max(1);
    vec![
        ("retry-after", secs.to_string()),
        ("retry-after-ms", ms.to_string()),
    ]
}

/// A duration as OpenAI writes its reset headers (Go style): `0s`, `250ms`, `6s`, `1.5s`, `6m0s`, `1h2m3s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let h = ms / 3_600_000;
    let m = (ms / 60_000) % 60;
    let s = (ms / 1000) % 60;
    let frac = ms % 1000;
    let secs = if frac == 0 {
        s.to_string()
    } else {
        let f = format!("{frac:03}");
        format!("{s}.{}", f.trim_end_matches('0'))
    };
    if h > 0 {
        format!("{h}h{m}m{secs}s")
    } else if m > 0 {
        format!("{m}m{secs}s")
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use serde_json::json;

    fn limiter() -> (RateLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (RateLimiter::with_clock(clock.clone(), 3), clock)
    }

    fn lim(rpm: u32, tpm: u32, concurrent: u32) -> Limits {
        Limits {
            rpm: Some(rpm),
            tpm: Some(tpm),
            concurrent: Some(concurrent),
        }
    }

    fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    #[track_caller]
    fn allowed(a: Admission) -> (Permit, Headers) {
        match a {
            Admission::Allowed { permit, headers } => (permit, headers),
            Admission::Limited {
                which, retry_after, ..
            } => {
                panic!("expected Allowed, got Limited({which:?}, {retry_after:?})")
            }
        }
    }

    #[track_caller]
    fn limited_by(a: Admission, expect: LimitKind) -> (Duration, Headers) {
        match a {
            Admission::Limited {
                retry_after,
                which,
                headers,
            } => {
                assert_eq!(which, expect);
                assert!(retry_after > Duration::ZERO);
                (retry_after, headers)
            }
            Admission::Allowed { .. } => panic!("expected Limited({expect:?}), got Allowed"),
        }
    }

    #[test]
    fn ratelimit_rpm_exceeded() {
        let (rl, clock) = limiter();
        let l = Limits {
            rpm: Some(3),
            ..Limits::default()
        };
        for left in [2, 1, 0] {
            let (_p, h) = allowed(rl.admit("alice", &l, 10));
            assert_eq!(header(&h, "x-ratelimit-limit-requests"), Some("3"));
            let left = left.to_string();
            assert_eq!(
                header(&h, "x-ratelimit-remaining-requests"),
                Some(left.as_str())
            );
            assert_eq!(
                header(&h, "x-ratelimit-limit-tokens"),
                None,
                "no tpm, no token headers"
            );
        }
        let (wait, h) = limited_by(rl.admit("alice", &l, 10), LimitKind::Rpm);
        assert_eq!(wait, Duration::from_secs(20), "one request per 60 s / 3");
        assert_eq!(header(&h, "retry-after"), Some("20"));
        assert_eq!(header(&h, "retry-after-ms"), Some("20000"));
        assert_eq!(header(&h, "x-ratelimit-remaining-requests"), Some("0"));
        clock.advance(Duration::from_secs(19));
        let (wait, _) = limited_by(rl.admit("alice", &l, 10), LimitKind::Rpm);
        assert_eq!(wait, Duration::from_secs(1));
        clock.advance(Duration::from_secs(1));
        allowed(rl.admit("alice", &l, 10));
    }

    #[test]
    fn ratelimit_tpm_big_prompt_and_reconcile() {
        let (rl, clock) = limiter();
        let l = Limits {
            rpm: Some(2),
            tpm: Some(1200),
            concurrent: None,
        };
        // Bigger than a whole minute's budget: can never fit.
        let big = "x".repeat(40_000);
        let (wait, h) = limited_by(
            rl.admit("bob", &l, estimate_prompt_tokens(&json!({ "prompt": big }))),
            LimitKind::Tpm,
        );
        assert_eq!(wait, MINUTE);
        assert_eq!(header(&h, "x-ratelimit-remaining-tokens"), Some("1200"));
        assert_eq!(
            header(&h, "x-ratelimit-remaining-requests"),
            Some("2"),
            "refusal consumed no request"
        );

        let (_p, h) = allowed(rl.admit("bob", &l, 1000));
        assert_eq!(header(&h, "x-ratelimit-limit-tokens"), Some("1200"));
        assert_eq!(header(&h, "x-ratelimit-remaining-tokens"), Some("200"));
        assert_eq!(header(&h, "x-ratelimit-reset-tokens"), Some("50s"));
        assert_eq!(header(&h, "x-ratelimit-remaining-requests"), Some("1"));
        // 500 more needs 300 more tokens at 20/s = 15 s.
        let (wait, h) = limited_by(rl.admit("bob", &l, 500), LimitKind::Tpm);
        assert_eq!(wait, Duration::from_secs(15));
        assert_eq!(header(&h, "retry-after"), Some("15"));
        assert_eq!(
            header(&h, "x-ratelimit-remaining-requests"),
            Some("1"),
            "TPM refusal spends no RPM cell"
        );

        // Real usage was 1100 (prompt + completion): 100 more charged.
        rl.reconcile("bob", &l, 1000, 1100);
        let (wait, _) = limited_by(rl.admit("bob", &l, 150), LimitKind::Tpm);
        assert_eq!(wait, Duration::from_millis(2500));
        // Usage not reported (0): the estimate stands.
        rl.reconcile("bob", &l, 1000, 0);
        limited_by(rl.admit("bob", &l, 150), LimitKind::Tpm);
        // Over-estimate refunded: the 1000-estimate request really used 200.
        rl.reconcile("bob", &l, 1000, 200);
        let (_p2, h) = allowed(rl.admit("bob", &l, 150));
        assert_eq!(header(&h, "x-ratelimit-remaining-tokens"), Some("750"));

        // Debt: a reported usage far above the budget delays the next request.
        rl.reconcile("bob", &l, 150, 3000);
        let (wait, _) = limited_by(rl.admit("bob", &l, 1), LimitKind::Tpm);
        assert!(wait > Duration::from_secs(100), "{wait:?}");
        clock.advance(Duration::from_secs(300));
        allowed(rl.admit("bob", &l, 1));
    }

    #[test]
    fn ratelimit_concurrency_permits() {
        let (rl, _clock) = limiter();
        let l = Limits {
            concurrent: Some(2),
            ..Limits::default()
        };
        let (p1, _) = allowed(rl.admit("carol", &l, 1));
        let (p2, _) = allowed(rl.admit("carol", &l, 1));
        assert_eq!(rl.in_flight("carol"), 2);
        let (wait, h) = limited_by(rl.admit("carol", &l, 1), LimitKind::Concurrency);
        assert_eq!(wait, CONCURRENCY_RETRY);
        assert_eq!(header(&h, "retry-after"), Some("1"));
        drop(p1);
        assert_eq!(rl.in_flight("carol"), 1);
        let (p3, _) = allowed(rl.admit("carol", &l, 1));
        assert_eq!(p3.subject(), "carol");
        drop((p2, p3));
        assert_eq!(rl.in_flight("carol"), 0);
    }

    #[test]
    fn ratelimit_permit_moves_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Permit>();
        send_sync::<RateLimiter>();
        send_sync::<Admission>();
        let rl = RateLimiter::new();
        let l = lim(100, 100_000, 1);
        let (p, _) = allowed(rl.admit("dave", &l, 5));
        let rl2 = rl.clone();
        let handle = std::thread::spawn(move || {
            drop(p);
            rl2.in_flight("dave")
        });
        assert_eq!(handle.join().ok(), Some(0));
    }

    #[test]
    fn ratelimit_independent_subjects() {
        let (rl, _clock) = limiter();
        let l = lim(1, 100, 1);
        let (_a, _) = allowed(rl.admit("a", &l, 10));
        limited_by(rl.admit("a", &l, 10), LimitKind::Concurrency);
        let (_b, h) = allowed(rl.admit("b", &l, 10));
        assert_eq!(header(&h, "x-ratelimit-remaining-requests"), Some("0"));
        assert_eq!(header(&h, "x-ratelimit-remaining-tokens"), Some("90"));
        // A different quota for another key coexists.
        let big = lim(1000, 1_000_000, 100);
        for _ in 0..50 {
            allowed(rl.admit("c", &big, 10));
        }
        assert_eq!(rl.tracked_subjects(), 3);
    }

    #[test]
    fn ratelimit_quota_change_for_a_subject() {
        let (rl, _clock) = limiter();
        let one = Limits {
            rpm: Some(1),
            tpm: Some(100),
            concurrent: None,
        };
        allowed(rl.admit("erin", &one, 100));
        limited_by(rl.admit("erin", &one, 1), LimitKind::Tpm);
        // The admin raises the quotas: new limits apply at once.
        let more = Limits {
            rpm: Some(5),
            tpm: Some(1000),
            concurrent: None,
        };
        let (_p, h) = allowed(rl.admit("erin", &more, 100));
        assert_eq!(header(&h, "x-ratelimit-limit-requests"), Some("5"));
        assert_eq!(header(&h, "x-ratelimit-remaining-requests"), Some("4"));
        assert_eq!(header(&h, "x-ratelimit-limit-tokens"), Some("1000"));
        // The 100 tokens spent under the old quota still count.
        assert_eq!(header(&h, "x-ratelimit-remaining-tokens"), Some("800"));
        // Back to the old rpm: its limiter remembers the request already made.
        limited_by(
            rl.admit("erin", &Limits { tpm: None, ..one }, 1),
            LimitKind::Rpm,
        );
        // Unlimited: no headers, always allowed.
        for _ in 0..100 {
            let (_p, h) = allowed(rl.admit("erin", &Limits::default(), 1_000_000));
            assert!(h.is_empty());
        }
        // Some(0) is unlimited too.
        let zero = Limits {
            rpm: Some(0),
            tpm: Some(0),
            concurrent: Some(0),
        };
        assert!(zero.is_unlimited());
        allowed(rl.admit("erin", &zero, u32::MAX));
    }

    /// Regression (issue 11): a tpm=50 quota used in turns with an unlimited one (two keys that
    /// shared a subject, or two tokens of one subject with different claims) was never limited:
    /// the unlimited request dropped the bucket, the next limited one started a full one.
    #[test]
    fn ratelimit_alternating_quotas_never_refill_the_bucket() {
        let (rl, _clock) = limiter();
        let tight = Limits {
            tpm: Some(50),
            ..Limits::default()
        };
        allowed(rl.admit("shared", &tight, 40));
        allowed(rl.admit("shared", &Limits::default(), 40));
        limited_by(rl.admit("shared", &tight, 40), LimitKind::Tpm);
        // Nor does switching to a bigger capacity and back.
        let loose = Limits {
            tpm: Some(60),
            ..Limits::default()
        };
        allowed(rl.admit("shared", &loose, 15));
        limited_by(rl.admit("shared", &tight, 40), LimitKind::Tpm);
    }

    #[test]
    fn ratelimit_failed_auth_per_address() {
        let (rl, clock) = limiter(); // 3 failures per minute
        assert_eq!(rl.auth_blocked("10.0.0.1:5000"), None);
        assert_eq!(rl.auth_failed("10.0.0.1:5000"), None);
        assert_eq!(rl.auth_failed("10.0.0.1:5001"), None);
        assert_eq!(rl.auth_blocked("10.0.0.1:5002"), None);
        // The third failure uses up the allowance: blocked for 60 s / 3.
        assert_eq!(rl.auth_failed("10.0.0.1"), Some(Duration::from_secs(20)));
        assert_eq!(
            rl.auth_blocked("10.0.0.1:6000"),
            Some(Duration::from_secs(20))
        );
        let h = retry_headers(Duration::from_secs(20));
        assert_eq!(header(&h, "retry-after"), Some("20"));
        // Other addresses are unaffected; IPv6 is grouped by /64.
        assert_eq!(rl.auth_blocked("10.0.0.2:5000"), None);
        for port in 1..=3 {
            rl.auth_failed(&format!("[2001:db8:1:2::{port}]:443"));
        }
        assert!(rl.auth_blocked("[2001:db8:1:2:ffff::9]:80").is_some());
        assert_eq!(rl.auth_blocked("2001:db8:1:3::1"), None);
        // Time heals.
        clock.advance(Duration::from_secs(5));
        assert_eq!(rl.auth_blocked("10.0.0.1"), Some(Duration::from_secs(15)));
        clock.advance(Duration::from_secs(15));
        assert_eq!(rl.auth_blocked("10.0.0.1"), None);
        assert_eq!(rl.auth_failed("10.0.0.1"), Some(Duration::from_secs(20)));
        // Disabled limiter.
        let off = RateLimiter::with_clock(FakeRelativeClock::default(), 0);
        for _ in 0..100 {
            assert_eq!(off.auth_failed("10.0.0.9"), None);
        }
        assert_eq!(off.auth_blocked("10.0.0.9"), None);
    }

    #[test]
    fn ratelimit_headers_present_and_formatted() {
        let (rl, _clock) = limiter();
        let l = lim(60, 6000, 4);
        let (_p, h) = allowed(rl.admit("frank", &l, 600));
        let names: Vec<&str> = h.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ]
        );
        assert_eq!(header(&h, "x-ratelimit-reset-requests"), Some("1s"));
        assert_eq!(header(&h, "x-ratelimit-remaining-tokens"), Some("5400"));
        assert_eq!(header(&h, "x-ratelimit-reset-tokens"), Some("6s"));

        assert_eq!(format_reset(Duration::ZERO), "0s");
        assert_eq!(format_reset(Duration::from_millis(250)), "250ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::from_secs(3723)), "1h2m3s");
        let h = retry_headers(Duration::from_millis(1));
        assert_eq!(header(&h, "retry-after"), Some("1"));
        assert_eq!(header(&h, "retry-after-ms"), Some("1"));
        let h = retry_headers(Duration::from_millis(2001));
        assert_eq!(header(&h, "retry-after"), Some("3"));
    }

    #[test]
    fn ratelimit_retain_recent_drops_idle_state() {
        let (rl, clock) = limiter();
        let l = lim(10, 1000, 5);
        let (held, _) = allowed(rl.admit("busy", &l, 100));
        drop(allowed(rl.admit("idle", &l, 100)));
        rl.auth_failed("10.1.1.1");
        rl.auth_failed("10.1.1.1");
        rl.auth_failed("10.1.1.1");
        rl.retain_recent();
        assert_eq!(rl.tracked_subjects(), 2, "recent state is kept");
        clock.advance(Duration::from_secs(61));
        rl.retain_recent();
        assert_eq!(
            rl.tracked_subjects(),
            1,
            "only the subject with a request in flight stays"
        );
        assert_eq!(rl.auth_blocked("10.1.1.1"), None);
        drop(held);
        rl.retain_recent();
        assert_eq!(rl.tracked_subjects(), 0);
        assert!(rl.shared.lock().rpm.is_empty());
        // Dropped state behaves as fresh.
        let (_p, h) = allowed(rl.admit("idle", &l, 100));
        assert_eq!(header(&h, "x-ratelimit-remaining-requests"), Some("9"));
    }

    #[test]
    fn ratelimit_estimates() {
        let e = |v: Value| estimate_prompt_tokens(&v);
        // About a token per 4 bytes of prompt text, whatever member carries it.
        let text = "x".repeat(4_000);
        for body in [
            json!({"model": "m", "messages": [{"role": "user", "content": text}]}),
            json!({"model": "m", "prompt": text}),
            json!({"model": "m", "input": [text]}),
        ] {
            let n = e(body.clone());
            assert!((1_000..=1_010).contains(&n), "{n} for {body}");
        }
        // Exact for a known body: {"role":"user","content":"abcd"} in an array is 32 bytes.
        assert_eq!(
            e(json!({"messages": [{"role": "user", "content": "abcd"}]})),
            8
        );
        // The model name and sampling settings are not prompt; tools and formats are.
        let base = json!({"messages": [{"role": "user", "content": "hi"}]});
        let mut with_model = base.clone();
        with_model["model"] = json!("a-very-long-model-name".repeat(100));
        with_model["temperature"] = json!(0.5);
        assert_eq!(e(with_model), e(base.clone()));
        let mut with_tools = base.clone();
        with_tools["tools"] = json!([{"type": "function", "function": {"name": "f", "description": "d".repeat(400)}}]);
        assert!(e(with_tools) >= e(base) + 100);
        // Never 0, never a panic or overflow on odd input.
        assert_eq!(e(json!({"model": "m"})), 1);
        assert_eq!(e(json!("not an object")), 1);
        // Token ids count as numbers in the JSON text (4 bytes each, plus the brackets).
        assert_eq!(e(json!({"prompt": [1, 2, 3]})), 4);
    }
}
