//! Rate limits shared by every gateway on one PostgreSQL database (`[storage] url`): requests per
//! minute, tokens per minute and concurrency per key hold across replicas, with no
//! check-then-increment anywhere.
//!
//! **The decision is pure** ([`decide`], [`settle`]): a subject's state (the GCRA theoretical
//! arrival time of its requests-per-minute limit, the level of its token bucket and when that was
//! last brought up to date) plus its live concurrency slots, the time and the request's quotas in;
//! admit (with the new state) or refuse (with which limit and when to retry) out. Property tests
//! drive it with a fake clock and random interleavings.
//!
//! **The I/O is one statement per admission** (or per batch, below; [`SharedLimiter::admit`]):
//! `SELECT … FROM securellm_admit_many(…)`, a PL/pgSQL function
//! (`migrations-postgres/0004_group_admission.sql`; `securellm_admit` in 0002 is its single form) that is
//! [`decide`] operation for operation (tested to agree with it bit for bit on random inputs
//! against the real database). Inside it, `SELECT … FOR UPDATE` takes the subject's row lock and
//! state, so every admission of one key, from any gateway, is serialized on that row; the live
//! slots are counted, and the new state and (when a concurrency limit applies) this replica's
//! hold are written before the statement commits. A refused request writes nothing but the row's creation. The
//! lock is held for the function's microseconds, not for round trips (a first version with one
//! transaction of five statements admitted 443 requests/s on one key; see BENCHMARKS.md).
//!
//! * requests per minute: GCRA with burst = rpm (the same semantics as the in-process limiter: a
//!   minute's allowance at once, then one request per `60 s / rpm`);
//! * tokens per minute: a token bucket of capacity tpm refilled at tpm / 60 s; the estimate is
//!   reserved at admission and [`SharedLimiter::reconcile`] charges the real usage (a refund, or
//!   debt that delays the next requests);
//! * concurrency: each gateway's slots in flight per subject, one row per (subject, replica)
//!   whose expiry every admission through that replica pushes to now + the whole-request time
//!   limit + a margin (so it covers all its requests in flight); ends give slots back; a crashed
//!   gateway's row expires and its slots come back.
//!
//! **Batches.** The admissions of one subject (with the same limits) that arrive in one gateway
//! while its previous call for that subject is in flight queue, and the next call decides them
//! all: `securellm_admit_many` takes the row lock once and applies `decide` to each in arrival
//! order, each seeing the state (and the slots) the previous left, so the outcome is what one
//! call per request in that order would give — only the round trips and the lock hand-overs
//! are shared (as the audit writer's group commit shares fsyncs). A lone request is one call as
//! before. Freed slots and token settlements queue the same way and go in one statement each.
//!
//! **When the database cannot be reached** the configured choice applies
//! ([`Unreachable`]): `local` — each gateway enforces its own in-process limits at
//! limit ÷ live replicas (the count last seen in the replica heartbeat table), or `closed` — 503.
//! Either way the metric `securellm_gateway_limit_store_unavailable_total` counts it and one
//! warning per outage goes to the log.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use serde::Deserialize;
use sqlx::postgres::{PgPool, PgPoolOptions};

use super::ratelimit::{Headers, LimitKind, Limits, retry_headers};

const MINUTE_MS: f64 = 60_000.0;
/// A replica counts as live this long after its last heartbeat.
const REPLICA_LIVE_MS: i64 = 10_000;
const HEARTBEAT: Duration = Duration::from_secs(2);

/// What to do when the shared store cannot be reached for a decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unreachable {
    /// Each gateway applies its in-process limits at limit ÷ live replicas.
    #[default]
    Local,
    /// Refuse with 503 until the store answers again.
    Closed,
}

/// A subject's shared state.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SubjectState {
    /// GCRA theoretical arrival time of the next request (ms since the epoch).
    pub rpm_tat_ms: f64,
    /// Tokens in the bucket's debt: 0 = full allowance; above tpm = in debt.
    pub tpm_level: f64,
    /// When `tpm_level` was last brought up to date (ms since the epoch).
    pub at_ms: i64,
}

/// A pure decision.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// Admit; store `state` (and take a concurrency slot if a concurrency limit applies).
    Admit {
        state: SubjectState,
        remaining: Option<u32>,
    },
    /// Refuse; store nothing.
    Refuse {
        which: LimitKind,
        retry_after: Duration,
    },
}

fn nz(v: Option<u32>) -> Option<u32> {
    v.filter(|&x| x > 0)
}

/// The bucket level at `now`: drained at tpm per minute since `at_ms`, never below 0. (Callers
/// pass `now.max(at_ms)`: a gateway whose clock reads earlier than the last update must not move
/// the bucket's time back, or the interval would drain twice.)
fn level_at(s: &SubjectState, now_ms: i64, tpm: u32) -> f64 {
    let elapsed = (now_ms - s.at_ms).max(0) as f64;
    (s.tpm_level - elapsed * f64::from(tpm) / MINUTE_MS).max(0.0)
}

fn ms(d: f64) -> Duration {
    Duration::from_millis(d.ceil().max(1.0) as u64)
}

/// Decide one admission. Order: concurrency, then tokens, then requests; a refusal by one
/// consumes nothing from the others.
pub fn decide(
    s: &SubjectState,
    now_ms: i64,
    l: &Limits,
    estimate: u32,
    in_flight: u32,
) -> Decision {
    if let Some(c) = nz(l.concurrent)
        && in_flight >= c
    {
        return Decision::Refuse {
            which: LimitKind::Concurrency,
            retry_after: Duration::from_secs(1),
        };
    }
    let now_ms = now_ms.max(s.at_ms);
    let mut next = SubjectState {
        at_ms: now_ms,
        ..*s
    };
    if let Some(tpm) = nz(l.tpm) {
        if estimate > tpm {
            return Decision::Refuse {
                which: LimitKind::Tpm,
                retry_after: Duration::from_secs(60),
            };
        }
        let level = level_at(s, now_ms, tpm);
        let over = level + f64::from(estimate) - f64::from(tpm);
        if over > 0.0 {
            return Decision::Refuse {
                which: LimitKind::Tpm,
                retry_after: ms(over * MINUTE_MS / f64::from(tpm)),
            };
        }
        next.tpm_level = level + f64::from(estimate);
    } else {
        next.tpm_level = s.tpm_level;
        next.at_ms = s.at_ms;
    }
    let mut remaining = None;
    if let Some(rpm) = nz(l.rpm) {
        let t = MINUTE_MS / f64::from(rpm);
        let now = now_ms as f64;
        let tat = s.rpm_tat_ms.max(now) + t;
        // Allowed while the debt stays within one minute (burst = rpm).
        let over = tat - now - MINUTE_MS;
        if over > 1e-6 {
            return Decision::Refuse {
                which: LimitKind::Rpm,
                retry_after: ms(over),
            };
        }
        next.rpm_tat_ms = tat;
        remaining = Some(((MINUTE_MS - (tat - now)) / t + 1e-9).floor().max(0.0) as u32);
    }
    Decision::Admit {
        state: next,
        remaining,
    }
}

/// Charge the real usage of an admitted request that reserved `estimate` tokens.
pub fn settle(
    s: &SubjectState,
    now_ms: i64,
    l: &Limits,
    estimate: u32,
    actual: u32,
) -> SubjectState {
    let Some(tpm) = nz(l.tpm) else {
        return *s;
    };
    let now_ms = now_ms.max(s.at_ms);
    let level = level_at(s, now_ms, tpm) + f64::from(actual) - f64::from(estimate);
    SubjectState {
        tpm_level: level.max(0.0),
        at_ms: now_ms,
        ..*s
    }
}

/// What [`SharedLimiter::admit`] answers.
pub enum Shared {
    /// Admitted; keep the ticket until the request ends (it frees the concurrency slot).
    Allowed { ticket: Ticket, headers: Headers },
    /// Refused: answer 429 with these headers.
    Limited {
        which: LimitKind,
        retry_after: Duration,
        headers: Headers,
    },
    /// The store could not be reached; apply [`SharedLimiter::when_unreachable`].
    Unreachable,
}

/// An admitted request's concurrency slot (the subject it counts against); given back (in the
/// background, with the other slots freed meanwhile) when dropped.
pub struct Ticket {
    slot: Option<String>,
    release: mpsc::UnboundedSender<String>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(subject) = self.slot.take() {
            // If the releaser is gone (or its UPDATE fails) the slot expires with this replica's
            // hold.
            let _ = self.release.send(subject);
        }
    }
}

/// One database answer for one admission of a batch: admitted, which limit refused, retry (ms),
/// the slot, the requests remaining.
type Answer = (bool, Option<String>, f64, Option<i64>, Option<i64>);

/// A row of `securellm_admit_many`: the admission's place in the batch (from 1), then its answer.
type BatchRow = (i32, bool, Option<String>, f64, Option<i64>, Option<i64>);

/// A queued admission: its estimate and where its answer goes.
struct Waiter {
    estimate: u32,
    reply: oneshot::Sender<Result<Answer, String>>,
}

/// Admissions of one subject with the same limits (rpm, tpm, concurrency) batch together.
type BatchKey = (String, [i64; 3]);

/// Most admissions one call decides.
const MAX_BATCH: usize = 256;

/// The limiter on PostgreSQL.
pub struct SharedLimiter {
    pool: PgPool,
    /// A slot outlives any request by this (the whole-request time limit plus a margin).
    slot_ttl_ms: i64,
    pub when_unreachable: Unreachable,
    /// Live gateways, from the heartbeat table (at least 1).
    replicas: Arc<AtomicU32>,
    /// An outage is being reported (one warning per outage).
    down: AtomicBool,
    /// Admissions waiting for their subject's call in flight (an entry exists while a batch
    /// runner is active for that key).
    pending: std::sync::Mutex<HashMap<BatchKey, Vec<Waiter>>>,
    /// This replica's id (its heartbeat row and its concurrency holds).
    replica: String,
    /// Freed concurrency slots (their subjects), given back in batches.
    release: mpsc::UnboundedSender<String>,
    /// Token settlements (subject, tpm, estimate, actual), applied in batches.
    settlements: mpsc::UnboundedSender<(String, i64, i64, i64)>,
}

impl SharedLimiter {
    /// Connect, create the tables if missing (under the schema lock) and start this replica's
    /// heartbeat.
    pub async fn open(
        url: &str,
        request_timeout: Duration,
        when_unreachable: Unreachable,
    ) -> Result<Arc<Self>, sqlx::Error> {
        // Limiter state is soft: its tables are UNLOGGED and its commits do not wait for the WAL
        // (a database crash forgets recent admissions: keys get a fresh allowance, held slots
        // vanish), which keeps the row lock of a hot key short.
        let pool = PgPoolOptions::new()
            // Few connections: admissions of a hot key queue in the pool (cheap) rather than on
            // its row lock in the database (a wake-up per hand-over).
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(2))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("SET synchronous_commit = off")
                        .execute(conn)
                        .await
                        .map(drop)
                })
            })
            .connect(url)
            .await?;
        crate::auth::keys::PG_MIGRATOR
            .run(&pool)
            .await
            .map_err(sqlx::Error::from)?;
        let replica = {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
            hex::encode(b)
        };
        let (release, released) = mpsc::unbounded_channel();
        let (settlements, settling) = mpsc::unbounded_channel();
        tokio::spawn(release_slots(pool.clone(), replica.clone(), released));
        tokio::spawn(apply_settlements(pool.clone(), settling));
        let me = Arc::new(Self {
            pool,
            slot_ttl_ms: request_timeout.as_millis() as i64 + 30_000,
            when_unreachable,
            replicas: Arc::new(AtomicU32::new(1)),
            down: AtomicBool::new(false),
            pending: Default::default(),
            replica,
            release,
            settlements,
        });
        tokio::spawn(heartbeat(
            me.pool.clone(),
            me.replica.clone(),
            me.replicas.clone(),
        ));
        Ok(me)
    }

    /// Live gateways on this database, as last seen (at least 1).
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    fn unreachable(&self, e: &sqlx::Error) -> Shared {
        crate::observe::limit_store_unavailable();
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "rate limits: PostgreSQL unreachable ({e}); {}",
                match self.when_unreachable {
                    Unreachable::Local => "applying local limits at limit / live replicas",
                    Unreachable::Closed => "refusing limited requests with 503 (fail-closed)",
                }
            );
        }
        Shared::Unreachable
    }

    /// One admission, atomically across every gateway on the database (batched with the other
    /// admissions of `subject` queued here meanwhile; see the module doc).
    pub async fn admit(self: &Arc<Self>, subject: &str, l: &Limits, estimate: u32) -> Shared {
        match self.try_admit(subject, l, estimate).await {
            Ok(s) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!("rate limits: PostgreSQL answers again; shared limits apply");
                }
                s
            }
            Err(e) => self.unreachable(&e),
        }
    }

    async fn try_admit(
        self: &Arc<Self>,
        subject: &str,
        l: &Limits,
        estimate: u32,
    ) -> Result<Shared, sqlx::Error> {
        let o = |v: Option<u32>| i64::from(nz(v).unwrap_or(0));
        let key: BatchKey = (subject.to_string(), [o(l.rpm), o(l.tpm), o(l.concurrent)]);
        let (reply, answer) = oneshot::channel();
        let lead = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let waiter = Waiter { estimate, reply };
            match pending.get_mut(&key) {
                Some(queue) => {
                    queue.push(waiter);
                    false
                }
                None => {
                    pending.insert(key.clone(), vec![waiter]);
                    true
                }
            }
        };
        if lead {
            // A task of its own: a caller that goes away must not strand the others.
            tokio::spawn(self.clone().run_batches(key));
        }
        let (admitted, which, retry_ms, slot, remaining) = answer
            .await
            .map_err(|_| sqlx::Error::WorkerCrashed)?
            .map_err(sqlx::Error::Protocol)?;
        let mut headers = limit_headers(l);
        if !admitted {
            let which = match which.as_deref() {
                Some("concurrency") => LimitKind::Concurrency,
                Some("tpm") => LimitKind::Tpm,
                _ => LimitKind::Rpm,
            };
            let retry_after = ms(retry_ms);
            headers.extend(retry_headers(retry_after));
            return Ok(Shared::Limited {
                which,
                retry_after,
                headers,
            });
        }
        if let Some(r) = remaining {
            headers.push(("x-ratelimit-remaining-requests", r.to_string()));
        }
        Ok(Shared::Allowed {
            ticket: Ticket {
                slot: slot.map(|_| subject.to_string()),
                release: self.release.clone(),
            },
            headers,
        })
    }

    /// Decide `key`'s queued admissions, one call per batch, until none is left.
    async fn run_batches(self: Arc<Self>, key: BatchKey) {
        loop {
            let batch: Vec<Waiter> = {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                let Some(queue) = pending.get_mut(&key) else {
                    return;
                };
                if queue.is_empty() {
                    pending.remove(&key);
                    return;
                }
                let n = queue.len().min(MAX_BATCH);
                queue.drain(..n).collect()
            };
            let ests: Vec<i64> = batch.iter().map(|w| i64::from(w.estimate)).collect();
            let now = securellm_common::time::now_ms() as i64;
            let [rpm, tpm, conc] = key.1;
            let rows: Result<Vec<BatchRow>, _> = sqlx::query_as(
                "SELECT idx, admitted, which, retry_ms, slot, remaining \
                     FROM securellm_admit_many($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&key.0)
            .bind(now)
            .bind(rpm)
            .bind(tpm)
            .bind(conc)
            .bind(&ests)
            .bind(now + self.slot_ttl_ms)
            .bind(&self.replica)
            .fetch_all(&self.pool)
            .await;
            match rows {
                Ok(rows) => {
                    let mut answers: Vec<Option<Answer>> = vec![None; batch.len()];
                    for (idx, a, w, r, slot, rem) in rows {
                        if let Some(x) = usize::try_from(idx - 1)
                            .ok()
                            .and_then(|i| answers.get_mut(i))
                        {
                            *x = Some((a, w, r, slot, rem));
                        }
                    }
                    for (waiter, answer) in batch.into_iter().zip(answers) {
                        let answer = answer.ok_or_else(|| "no answer for an admission".to_string());
                        if let Err(Ok((_, _, _, Some(_), _))) = waiter.reply.send(answer) {
                            // Its caller left: free the slot it would have held.
                            let _ = self.release.send(key.0.clone());
                        }
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    for waiter in batch {
                        let _ = waiter.reply.send(Err(message.clone()));
                    }
                }
            }
        }
    }

    /// Charge the real usage (in the background; a failure leaves the estimate charged).
    pub fn reconcile(self: &Arc<Self>, subject: &str, l: &Limits, estimate: u32, actual: u32) {
        if nz(l.tpm).is_none() || estimate == actual {
            return;
        }
        if let Some(tpm) = nz(l.tpm) {
            let _ = self.settlements.send((
                subject.to_string(),
                i64::from(tpm),
                i64::from(estimate),
                i64::from(actual),
            ));
        }
    }

    /// [`Self::reconcile`], waiting for it: one `UPDATE` ([`settle`] in SQL).
    pub async fn reconcile_now(
        &self,
        subject: &str,
        l: &Limits,
        estimate: u32,
        actual: u32,
    ) -> Result<(), sqlx::Error> {
        let Some(tpm) = nz(l.tpm) else {
            return Ok(());
        };
        sqlx::query("SELECT securellm_settle($1, $2, $3, $4, $5)")
            .bind(subject)
            .bind(securellm_common::time::now_ms() as i64)
            .bind(i64::from(tpm))
            .bind(i64::from(estimate))
            .bind(i64::from(actual))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Run the database's admission for a given stored state and time (the differential test
    /// against [`decide`]): writes `state` for `subject`, admits, returns what it decided and the
    /// stored state after. Concurrency is not part of it (no slots).
    #[doc(hidden)]
    pub async fn admit_at(
        &self,
        subject: &str,
        state: SubjectState,
        now_ms: i64,
        l: &Limits,
        estimate: u32,
    ) -> Result<(Decision, SubjectState), sqlx::Error> {
        sqlx::query(
            "INSERT INTO rate_limits (subject, rpm_tat_ms, tpm_level, at_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (subject) DO UPDATE SET rpm_tat_ms = $2, tpm_level = $3, at_ms = $4",
        )
        .bind(subject)
        .bind(state.rpm_tat_ms)
        .bind(state.tpm_level)
        .bind(state.at_ms)
        .execute(&self.pool)
        .await?;
        let o = |v: Option<u32>| i64::from(nz(v).unwrap_or(0));
        let (admitted, which, retry_ms, remaining): (bool, Option<String>, f64, Option<i64>) =
            sqlx::query_as(
                "SELECT admitted, which, retry_ms, remaining FROM securellm_admit($1, $2, $3, $4, 0, $5, 0)",
            )
            .bind(subject)
            .bind(now_ms)
            .bind(o(l.rpm))
            .bind(o(l.tpm))
            .bind(i64::from(estimate))
            .fetch_one(&self.pool)
            .await?;
        let after = self.state(subject).await?.unwrap_or_default();
        let d = if admitted {
            Decision::Admit {
                state: after,
                remaining: remaining.map(|r| r as u32),
            }
        } else {
            Decision::Refuse {
                which: match which.as_deref() {
                    Some("tpm") => LimitKind::Tpm,
                    Some("concurrency") => LimitKind::Concurrency,
                    _ => LimitKind::Rpm,
                },
                retry_after: ms(retry_ms),
            }
        };
        Ok((d, after))
    }

    /// The batch admission for a given stored state and time (the differential test against
    /// [`decide`] applied in order): writes `state` for `subject` with no live slots, decides
    /// `estimates` in one call, returns each decision and the stored state after.
    #[doc(hidden)]
    pub async fn admit_many_at(
        &self,
        subject: &str,
        state: SubjectState,
        now_ms: i64,
        l: &Limits,
        estimates: &[u32],
    ) -> Result<(Vec<Decision>, SubjectState), sqlx::Error> {
        sqlx::query(
            "INSERT INTO rate_limits (subject, rpm_tat_ms, tpm_level, at_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (subject) DO UPDATE SET rpm_tat_ms = $2, tpm_level = $3, at_ms = $4",
        )
        .bind(subject)
        .bind(state.rpm_tat_ms)
        .bind(state.tpm_level)
        .bind(state.at_ms)
        .execute(&self.pool)
        .await?;
        sqlx::query("DELETE FROM concurrency_holds WHERE subject = $1")
            .bind(subject)
            .execute(&self.pool)
            .await?;
        let o = |v: Option<u32>| i64::from(nz(v).unwrap_or(0));
        let ests: Vec<i64> = estimates.iter().map(|&e| i64::from(e)).collect();
        let rows: Vec<BatchRow> = sqlx::query_as(
            "SELECT idx, admitted, which, retry_ms, slot, remaining \
             FROM securellm_admit_many($1, $2, $3, $4, $5, $6, $7, $8) ORDER BY idx",
        )
        .bind(subject)
        .bind(now_ms)
        .bind(o(l.rpm))
        .bind(o(l.tpm))
        .bind(o(l.concurrent))
        .bind(&ests)
        .bind(now_ms + 3_600_000)
        .bind(&self.replica)
        .fetch_all(&self.pool)
        .await?;
        let after = self.state(subject).await?.unwrap_or_default();
        let decisions = rows
            .into_iter()
            .map(|(_, admitted, which, retry_ms, _, remaining)| {
                if admitted {
                    // The state each admission left is not returned; the last one's is `after`.
                    Decision::Admit {
                        state: after,
                        remaining: remaining.map(|r| r as u32),
                    }
                } else {
                    Decision::Refuse {
                        which: match which.as_deref() {
                            Some("tpm") => LimitKind::Tpm,
                            Some("concurrency") => LimitKind::Concurrency,
                            _ => LimitKind::Rpm,
                        },
                        retry_after: ms(retry_ms),
                    }
                }
            })
            .collect();
        Ok((decisions, after))
    }

    /// A subject's stored state (tests, diagnostics).
    pub async fn state(&self, subject: &str) -> Result<Option<SubjectState>, sqlx::Error> {
        let row: Option<(f64, f64, i64)> = sqlx::query_as(
            "SELECT rpm_tat_ms, tpm_level, at_ms FROM rate_limits WHERE subject = $1",
        )
        .bind(subject)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(rpm_tat_ms, tpm_level, at_ms)| SubjectState {
            rpm_tat_ms,
            tpm_level,
            at_ms,
        }))
    }
}

/// `x-ratelimit-limit-*` for the limits that apply.
fn limit_headers(l: &Limits) -> Headers {
    let mut h = Headers::new();
    if let Some(r) = nz(l.rpm) {
        h.push(("x-ratelimit-limit-requests", r.to_string()));
    }
    if let Some(t) = nz(l.tpm) {
        h.push(("x-ratelimit-limit-tokens", t.to_string()));
    }
    h
}

/// Limits for the local fallback: each of `replicas` gateways gets limit ÷ replicas (rounded
/// up, at least 1), so together they stay near the shared limit while the store is away.
pub fn divided(l: &Limits, replicas: u32) -> Limits {
    let d = |v: Option<u32>| nz(v).map(|x| x.div_ceil(replicas.max(1)).max(1));
    Limits {
        rpm: d(l.rpm),
        tpm: d(l.tpm),
        concurrent: d(l.concurrent),
    }
}

/// Give freed slots back: whatever has queued, counted per subject, in one statement (a failure
/// leaves them held until this replica's hold expires).
async fn release_slots(pool: PgPool, replica: String, mut rx: mpsc::UnboundedReceiver<String>) {
    let mut freed = Vec::new();
    while rx.recv_many(&mut freed, 1024).await > 0 {
        let mut counts: HashMap<String, i64> = HashMap::new();
        for subject in freed.drain(..) {
            *counts.entry(subject).or_default() += 1;
        }
        let (subjects, n): (Vec<String>, Vec<i64>) = counts.into_iter().unzip();
        if let Err(e) = sqlx::query("SELECT securellm_release_many($1, $2, $3)")
            .bind(&replica)
            .bind(&subjects)
            .bind(&n)
            .execute(&pool)
            .await
        {
            tracing::debug!(
                "rate limits: giving back {} slots failed: {e}",
                n.iter().sum::<i64>()
            );
        }
    }
}

/// Apply queued token settlements in order, in one statement (a failure leaves the estimates
/// charged).
async fn apply_settlements(pool: PgPool, mut rx: mpsc::UnboundedReceiver<(String, i64, i64, i64)>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 1024).await > 0 {
        let (mut subjects, mut tpms, mut ests, mut actuals) = (vec![], vec![], vec![], vec![]);
        for (s, t, e, a) in batch.drain(..) {
            subjects.push(s);
            tpms.push(t);
            ests.push(e);
            actuals.push(a);
        }
        if let Err(e) = sqlx::query("SELECT securellm_settle_many($1, $2, $3, $4, $5)")
            .bind(securellm_common::time::now_ms() as i64)
            .bind(&subjects)
            .bind(&tpms)
            .bind(&ests)
            .bind(&actuals)
            .execute(&pool)
            .await
        {
            tracing::debug!("rate limits: {} settlements failed: {e}", subjects.len());
        }
    }
}

/// This replica's heartbeat: every 2 s, upsert its row and count the replicas seen recently.
async fn heartbeat(pool: PgPool, id: String, replicas: Arc<AtomicU32>) {
    loop {
        let now = securellm_common::time::now_ms() as i64;
        let r: Result<i64, sqlx::Error> = async {
            sqlx::query(
                "INSERT INTO gateway_replicas (id, seen_ms) VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET seen_ms = EXCLUDED.seen_ms",
            )
            .bind(&id)
            .bind(now)
            .execute(&pool)
            .await?;
            sqlx::query("DELETE FROM gateway_replicas WHERE seen_ms < $1")
                .bind(now - 10 * REPLICA_LIVE_MS)
                .execute(&pool)
                .await?;
            let (n,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM gateway_replicas WHERE seen_ms >= $1")
                    .bind(now - REPLICA_LIVE_MS)
                    .fetch_one(&pool)
                    .await?;
            Ok(n)
        }
        .await;
        if let Ok(n) = r {
            replicas.store(n.clamp(1, u32::MAX as i64) as u32, Ordering::Relaxed);
        }
        tokio::time::sleep(HEARTBEAT).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lim(rpm: u32, tpm: u32, c: u32) -> Limits {
        Limits {
            rpm: Some(rpm),
            tpm: Some(tpm),
            concurrent: Some(c),
        }
    }

    fn admit(s: &mut SubjectState, now: i64, l: &Limits, est: u32, in_flight: u32) -> bool {
        match decide(s, now, l, est, in_flight) {
            Decision::Admit { state, .. } => {
                *s = state;
                true
            }
            Decision::Refuse { .. } => false,
        }
    }

    #[test]
    fn a_minutes_requests_at_once_then_one_per_interval() {
        let l = Limits {
            rpm: Some(60),
            ..Default::default()
        };
        let mut s = SubjectState::default();
        let t0 = 1_000_000;
        for i in 0..60 {
            assert!(admit(&mut s, t0, &l, 1, 0), "request {i}");
        }
        match decide(&s, t0, &l, 1, 0) {
            Decision::Refuse { which, retry_after } => {
                assert_eq!(which, LimitKind::Rpm);
                assert_eq!(retry_after, Duration::from_millis(1000));
            }
            d => panic!("{d:?}"),
        }
        assert!(!admit(&mut s, t0 + 999, &l, 1, 0));
        assert!(admit(&mut s, t0 + 1000, &l, 1, 0));
        assert!(!admit(&mut s, t0 + 1000, &l, 1, 0));
    }

    #[test]
    fn tokens_are_reserved_refunded_and_can_go_into_debt() {
        let l = Limits {
            tpm: Some(600),
            ..Default::default()
        };
        let mut s = SubjectState::default();
        let t0 = 5_000_000;
        assert!(admit(&mut s, t0, &l, 500, 0));
        assert!(!admit(&mut s, t0, &l, 200, 0), "500 + 200 > 600");
        // The request used 100: 400 come back.
        s = settle(&s, t0, &l, 500, 100);
        assert!(admit(&mut s, t0, &l, 200, 0));
        // A request that used far more than reserved puts the key into debt.
        s = settle(&s, t0, &l, 200, 1200);
        assert!(s.tpm_level > 600.0);
        match decide(&s, t0, &l, 1, 0) {
            Decision::Refuse { which, retry_after } => {
                assert_eq!(which, LimitKind::Tpm);
                // level 1300 + 1 - 600 = 701 tokens at 10 per second.
                assert_eq!(retry_after, Duration::from_millis(70_100));
            }
            d => panic!("{d:?}"),
        }
        // A request bigger than the whole limit can never fit.
        assert!(matches!(
            decide(&SubjectState::default(), t0, &l, 601, 0),
            Decision::Refuse { which: LimitKind::Tpm, retry_after } if retry_after == Duration::from_secs(60)
        ));
    }

    #[test]
    fn a_refusal_consumes_nothing() {
        let l = lim(1, 100, 1);
        let s = SubjectState::default();
        // Concurrency full: no token and no request spent.
        assert!(matches!(
            decide(&s, 10, &l, 50, 1),
            Decision::Refuse {
                which: LimitKind::Concurrency,
                ..
            }
        ));
        let mut s2 = s;
        assert!(admit(&mut s2, 10, &l, 50, 0));
    }

    #[test]
    fn an_earlier_clock_never_moves_the_bucket_back() {
        let l = Limits {
            tpm: Some(60_000),
            ..Default::default()
        };
        let s = SubjectState {
            tpm_level: 500.0,
            at_ms: 10_000,
            ..Default::default()
        };
        // A gateway whose clock reads 1 s earlier: no refill, and the time stays.
        let Decision::Admit { state, .. } = decide(&s, 9_000, &l, 10, 0) else {
            panic!()
        };
        assert_eq!((state.tpm_level, state.at_ms), (510.0, 10_000));
        let after = settle(&state, 9_500, &l, 10, 4);
        assert_eq!((after.tpm_level, after.at_ms), (504.0, 10_000));
        // Then 100 ms later by the store's time: 100 tokens drained, once.
        let Decision::Admit { state, .. } = decide(&after, 10_100, &l, 1, 0) else {
            panic!()
        };
        assert_eq!(state.tpm_level, 405.0);
    }

    #[test]
    fn fallback_divides_each_limit_among_live_replicas() {
        let l = lim(50, 1000, 3);
        assert_eq!(divided(&l, 3), lim(17, 334, 1));
        assert_eq!(divided(&l, 0), l);
        assert_eq!(divided(&Limits::default(), 3), Limits::default());
    }

    proptest! {
        /// Any interleaving of admissions from any number of gateways (they are serialized on
        /// the subject's row, so the order is all that varies) admits at most rpm + the
        /// requests whose interval has passed, at most tpm + the refill in tokens, and never
        /// more than the concurrency limit at once.
        #[test]
        fn limits_hold_under_any_interleaving(
            rpm in 1u32..100,
            tpm in 50u32..5000,
            conc in 1u32..10,
            steps in proptest::collection::vec((0u64..400, 1u32..60, any::<bool>(), 0u32..80), 1..300),
        ) {
            let l = lim(rpm, tpm, conc);
            let mut s = SubjectState::default();
            let t0: i64 = 10_000_000;
            let mut now = t0;
            let mut in_flight: Vec<(u32, u32)> = Vec::new(); // (estimate, actual)
            let mut admitted = 0u64;
            let mut reserved_net = 0f64;
            for (dt, est, finish, actual) in steps {
                now += dt as i64;
                if finish && !in_flight.is_empty() {
                    let (e, a) = in_flight.remove(0);
                    s = settle(&s, now, &l, e, a);
                    reserved_net += f64::from(a) - f64::from(e);
                }
                let before = s;
                match decide(&s, now, &l, est, in_flight.len() as u32) {
                    Decision::Admit { state, .. } => {
                        prop_assert!((in_flight.len() as u32) < conc);
                        prop_assert!(state.tpm_level <= f64::from(tpm) + 1e-6);
                        s = state;
                        admitted += 1;
                        reserved_net += f64::from(est);
                        in_flight.push((est, actual));
                    }
                    Decision::Refuse { retry_after, .. } => {
                        prop_assert_eq!(s, before);
                        prop_assert!(retry_after > Duration::ZERO);
                    }
                }
                let elapsed = (now - t0) as f64;
                let t = 60_000.0 / f64::from(rpm);
                prop_assert!(admitted as f64 <= f64::from(rpm) + elapsed / t + 1e-6,
                    "admitted {} rpm {} elapsed {}", admitted, rpm, elapsed);
                let _ = reserved_net;
                prop_assert!(s.tpm_level >= 0.0);
            }
        }
    }
}
