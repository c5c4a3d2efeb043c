//! Several gateways on one real PostgreSQL (a throw-away cluster per test, `securellm_testkit::
//! postgres`): API keys shared and revoked everywhere within a second (LISTEN/NOTIFY), requests
//! per minute and concurrency held exactly across gateways under a concurrent flood, a crashed
//! gateway's concurrency slots returning after their expiry, and the database going away (cached
//! keys keep answering; limits fall back as configured) and coming back.
//!
//! The gateways here are full gateways (their own listeners, pools and listeners on the
//! database) in one test process, in front of a fake OpenAI upstream; skipped LOUDLY where no
//! PostgreSQL can be started (`make postgres` installs it).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use securellm_gateway::RunningGateway;
use securellm_gateway::cloud::CloudConfig;
use securellm_gateway::config::{GatewayConfig, StorageConfig};
use securellm_gateway::keys::{KeyUpdate, NewKey};
use securellm_gateway::limits::shared::{Shared, SharedLimiter, Unreachable};
use securellm_gateway::ratelimit::Limits;
use securellm_testkit::gateway::standalone_gateway;
use securellm_testkit::postgres::Postgres;

/// A fake OpenAI upstream answering every chat completion at once; counts what it served.
async fn fake_upstream() -> (String, Arc<AtomicUsize>) {
    use axum::routing::post;
    let served = Arc::new(AtomicUsize::new(0));
    let s = served.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move |body: axum::Json<serde_json::Value>| {
            let s = s.clone();
            async move {
                s.fetch_add(1, Ordering::Relaxed);
                axum::Json(serde_json::json!({
                    "id": "c", "object": "chat.completion", "created": 1, "model": body.0["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "ok"}}],
                    "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
                }))
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (format!("http://{addr}/v1"), served)
}

async fn gateway(
    dir: &std::path::Path,
    url: &str,
    upstream: &str,
    when_unreachable: Unreachable,
) -> RunningGateway {
    let (url, upstream) = (url.to_string(), upstream.to_string());
    standalone_gateway(dir, move |c: &mut GatewayConfig| {
        c.storage = StorageConfig {
            url: Some(url),
            when_unreachable,
            ..Default::default()
        };
        c.upstreams.insert(
            "fake".into(),
            CloudConfig {
                base_url: upstream,
                api_key_env: None,
                api_key_file: None,
                models: vec!["gpt-*".into()],
                redaction: Default::default(),
            },
        );
    })
    .await
}

async fn chat(http: &reqwest::Client, g: &RunningGateway, key: &str) -> reqwest::StatusCode {
    http.post(format!("http://{}/v1/chat/completions", g.http_addr))
        .bearer_auth(key)
        .json(&serde_json::json!({"model": "gpt-x", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .map(|r| r.status())
        .unwrap_or(reqwest::StatusCode::BAD_GATEWAY)
}

/// Whether `g`'s copy of the keys has `secret` revoked.
fn revoked(g: &RunningGateway, secret: &str) -> bool {
    g.state
        .keys
        .lookup(secret)
        .is_some_and(|r| r.revoked_ms.is_some())
}

/// Poll `f` every 20 ms until it holds or `limit` passes; how long it took.
async fn within(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_created_or_revoked_through_one_gateway_hold_on_all_within_a_second() {
    let Some(pg) = Postgres::start_or_skip("keys across gateways") else {
        return;
    };
    let url = pg.create_database("keys");
    let (upstream, _) = fake_upstream().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut gws = Vec::new();
    for d in &dirs {
        gws.push(gateway(d.path(), &url, &upstream, Unreachable::Local).await);
    }
    let http = reqwest::Client::new();
    let (secret, rec) = gws[0]
        .state
        .keys
        .create(NewKey {
            name: "shared".into(),
            models: vec!["*".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    for (i, g) in gws.iter().enumerate() {
        let took = within(Duration::from_secs(1), async || {
            chat(&http, g, &secret).await == reqwest::StatusCode::OK
        })
        .await;
        assert!(
            took.is_some(),
            "gateway {i} does not know the new key after 1 s"
        );
    }
    // Revoked through the third: refused by all within 1 s.
    gws[2].state.keys.revoke(&rec.id).await.unwrap();
    for (i, g) in gws.iter().enumerate() {
        let took = within(Duration::from_secs(1), async || {
            chat(&http, g, &secret).await == reqwest::StatusCode::UNAUTHORIZED
        })
        .await;
        assert!(
            took.is_some(),
            "gateway {i} still serves a revoked key after 1 s"
        );
    }
    // A limit change through one applies on another.
    let (secret2, rec2) = gws[1]
        .state
        .keys
        .create(NewKey {
            name: "later".into(),
            models: vec!["*".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    gws[1]
        .state
        .keys
        .update(
            &rec2.id,
            KeyUpdate {
                models: Some(vec!["other-*".into()]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let took = within(Duration::from_secs(1), async || {
        chat(&http, &gws[0], &secret2).await == reqwest::StatusCode::NOT_FOUND
    })
    .await;
    assert!(
        took.is_some(),
        "a scope change did not reach gateway 0 within 1 s"
    );

    // The database restarts: every gateway's listener reconnects; a key made after it is known
    // everywhere and its revocation reaches all again.
    pg.stop();
    assert!(pg.restart().is_ok());
    assert!(pg.wait_ready(Duration::from_secs(20)));
    let (secret5, rec5) = gws[0]
        .state
        .keys
        .create(NewKey {
            name: "after-restart".into(),
            models: vec!["*".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    for (i, g) in gws.iter().enumerate() {
        let took = within(Duration::from_secs(5), async || {
            chat(&http, g, &secret5).await == reqwest::StatusCode::OK
        })
        .await;
        assert!(
            took.is_some(),
            "gateway {i}: the key made after the database restart is unknown"
        );
    }
    gws[1].state.keys.revoke(&rec5.id).await.unwrap();
    for (i, g) in gws.iter().enumerate() {
        let took = within(Duration::from_secs(1), async || revoked(g, &secret5)).await;
        assert!(
            took.is_some(),
            "gateway {i}: revocation after the restart not seen within 1 s"
        );
    }
    for g in gws {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_the_database_is_away_cached_keys_answer_and_limits_fall_back() {
    let Some(pg) = Postgres::start_or_skip("database away") else {
        return;
    };
    let url = pg.create_database("away");
    let (upstream, _) = fake_upstream().await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let local = gateway(d1.path(), &url, &upstream, Unreachable::Local).await;
    let closed = gateway(d2.path(), &url, &upstream, Unreachable::Closed).await;
    let http = reqwest::Client::new();
    let (secret, _) = local
        .state
        .keys
        .create(NewKey {
            name: "limited".into(),
            models: vec!["*".into()],
            rpm: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap();
    within(Duration::from_secs(1), async || {
        chat(&http, &closed, &secret).await == reqwest::StatusCode::OK
    })
    .await
    .expect("both know the key");
    pg.stop();
    // Cached key, local limits at limit / live replicas: served.
    assert_eq!(chat(&http, &local, &secret).await, reqwest::StatusCode::OK);
    // Fail-closed: 503 for a limited key.
    assert_eq!(
        chat(&http, &closed, &secret).await,
        reqwest::StatusCode::SERVICE_UNAVAILABLE
    );
    pg.restart().unwrap();
    assert!(pg.wait_ready(Duration::from_secs(20)));
    within(Duration::from_secs(10), async || {
        chat(&http, &closed, &secret).await == reqwest::StatusCode::OK
    })
    .await
    .expect("the fail-closed gateway serves again once the database is back");
    local.shutdown().await;
    closed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rpm_holds_across_three_gateways_under_a_concurrent_flood() {
    let Some(pg) = Postgres::start_or_skip("rpm across gateways") else {
        return;
    };
    let url = pg.create_database("rpm");
    let (upstream, served) = fake_upstream().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut gws = Vec::new();
    for d in &dirs {
        gws.push(Arc::new(
            gateway(d.path(), &url, &upstream, Unreachable::Closed).await,
        ));
    }
    let (secret, _) = gws[0]
        .state
        .keys
        .create(NewKey {
            name: "flood".into(),
            models: vec!["*".into()],
            rpm: Some(50),
            ..Default::default()
        })
        .await
        .unwrap();
    for g in &gws {
        within(Duration::from_secs(1), async || {
            g.state.keys.lookup(&secret).is_some()
        })
        .await
        .expect("every gateway knows the key");
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(200)
        .build()
        .unwrap();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..500 {
        let (http, g, secret) = (http.clone(), gws[i % 3].clone(), secret.clone());
        tasks.push(tokio::spawn(async move { chat(&http, &g, &secret).await }));
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        match t.await.unwrap() {
            reqwest::StatusCode::OK => ok += 1,
            reqwest::StatusCode::TOO_MANY_REQUESTS => limited += 1,
            other => panic!("unexpected {other}"),
        }
    }
    let elapsed = start.elapsed();
    // Burst = 50, plus one more per 1.2 s of flood.
    let bound = 50 + (elapsed.as_millis() / 1200) as usize + 1;
    assert!(
        ok <= bound,
        "{ok} admitted in {elapsed:?} with rpm = 50 over three gateways (bound {bound})"
    );
    assert!(ok >= 50, "only {ok} admitted: the burst should be 50");
    assert_eq!(ok + limited, 500);
    assert_eq!(
        served.load(Ordering::Relaxed),
        ok,
        "the upstream saw only the admitted"
    );
    // A refused answer says when to retry (one request per 1.2 s comes back: the second of two
    // quick ones is refused).
    let mut refused = None;
    for _ in 0..3 {
        let r = http
            .post(format!("http://{}/v1/chat/completions", gws[1].http_addr))
            .bearer_auth(&secret)
            .json(&serde_json::json!({"model": "gpt-x", "max_tokens": 4,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("no 429 after the flood");
    assert!(r.headers().contains_key("retry-after"));
    eprintln!("rpm flood: {ok} admitted, {limited} refused in {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_slots_are_shared_and_a_crashed_gateways_slots_expire() {
    let Some(pg) = Postgres::start_or_skip("concurrency across gateways") else {
        return;
    };
    let url = pg.create_database("slots");
    let a = SharedLimiter::open(&url, Duration::from_secs(1), Unreachable::Closed)
        .await
        .unwrap();
    let b = SharedLimiter::open(&url, Duration::from_secs(1), Unreachable::Closed)
        .await
        .unwrap();
    let l = Limits {
        concurrent: Some(2),
        ..Default::default()
    };
    let allowed = |s: Shared| match s {
        Shared::Allowed { ticket, .. } => Some(ticket),
        _ => None,
    };
    let t1 = allowed(a.admit("k", &l, 1).await).expect("first slot");
    let t2 = allowed(b.admit("k", &l, 1).await).expect("second slot, other gateway");
    assert!(allowed(a.admit("k", &l, 1).await).is_none(), "a third");
    assert!(allowed(b.admit("k", &l, 1).await).is_none(), "a third");
    // A request ends: its slot frees (in the background).
    drop(t1);
    let mut held = Vec::new();
    let t3 = within(Duration::from_secs(2), async || {
        match allowed(b.admit("k", &l, 1).await) {
            Some(t) => {
                held.push(t);
                true
            }
            None => false,
        }
    })
    .await;
    assert!(t3.is_some(), "the freed slot is not reusable");
    // The gateway holding t2 and the leaked one "crashes": its slots stay until they expire
    // (request timeout 1 s + 30 s margin here); expire them and they come back.
    std::mem::forget(t2);
    held.into_iter().for_each(std::mem::forget);
    assert!(allowed(a.admit("k", &l, 1).await).is_none());
    pg.psql("slots", "UPDATE concurrency_holds SET expires_ms = 0")
        .unwrap();
    assert!(allowed(a.admit("k", &l, 1).await).is_some());
    // Unreachable store: the decision says so (the gateway then applies its fallback).
    pg.stop();
    assert!(matches!(a.admit("k", &l, 1).await, Shared::Unreachable));
}

/// Tokens per minute with concurrent requests on three gateways: every reservation and every
/// settlement lands, none is lost to a race: the final bucket level is exactly the sum of the
/// real usages minus the refill between the first and the last update.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpm_reconciles_exactly_under_concurrency() {
    let Some(pg) = Postgres::start_or_skip("tpm across gateways") else {
        return;
    };
    let url = pg.create_database("tpm");
    let mut limiters = Vec::new();
    for _ in 0..3 {
        limiters.push(
            SharedLimiter::open(&url, Duration::from_secs(5), Unreachable::Closed)
                .await
                .unwrap(),
        );
    }
    // 6 000 tokens per minute = 0.1 per ms: a refill that shows in the sum, but never empties
    // the bucket during the test (which would make the check inexact).
    let l = Limits {
        tpm: Some(6_000),
        ..Default::default()
    };
    // The first admission alone fixes the start of the accounting.
    let Shared::Allowed { ticket, .. } = limiters[0].admit("t", &l, 100).await else {
        panic!("first admission")
    };
    drop(ticket);
    limiters[0].reconcile_now("t", &l, 100, 30).await.unwrap();
    let first = limiters[0].state("t").await.unwrap().unwrap();
    let mut tasks = Vec::new();
    for i in 0..60u32 {
        let lim = limiters[(i % 3) as usize].clone();
        tasks.push(tokio::spawn(async move {
            match lim.admit("t", &l, 20).await {
                Shared::Allowed { ticket, .. } => {
                    drop(ticket);
                    lim.reconcile_now("t", &l, 20, 7 + i % 5).await.unwrap();
                    7 + i % 5
                }
                _ => panic!("refused or unreachable: the limit is far above the load"),
            }
        }));
    }
    let mut used = 0f64;
    for t in tasks {
        used += f64::from(t.await.unwrap());
    }
    let last = limiters[0].state("t").await.unwrap().unwrap();
    let drained = (last.at_ms - first.at_ms) as f64 * 0.1;
    let expected = first.tpm_level + used - drained;
    assert!(
        expected > 0.0,
        "the bucket drained to empty during the test: not an exact check (used {used}, drained {drained})"
    );
    assert!(
        (last.tpm_level - expected).abs() < 1e-6,
        "level {} != {expected} (first {}, used {used}, drained {drained})",
        last.tpm_level,
        first.tpm_level
    );
}

/// The database's admission (`securellm_admit`, PL/pgSQL) is the Rust model (`decide`) bit for
/// bit: random states, times, limits and estimates through both, the same decision, the same
/// stored state, the same retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_decides_exactly_as_the_model() {
    use securellm_gateway::limits::shared::{Decision, SubjectState, decide};
    let Some(pg) = Postgres::start_or_skip("admission model vs database") else {
        return;
    };
    let url = pg.create_database("model");
    let lim = SharedLimiter::open(&url, Duration::from_secs(5), Unreachable::Closed)
        .await
        .unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut admitted = 0;
    for case in 0..400 {
        let base: i64 = 1_796_000_000_000 + next(1_000_000) as i64;
        let state = SubjectState {
            rpm_tat_ms: if next(3) == 0 {
                0.0
            } else {
                base as f64 + next(120_000) as f64 - 30_000.0 + next(1000) as f64 / 7.0
            },
            tpm_level: next(20_000) as f64 / 3.0,
            at_ms: base - next(90_000) as i64,
        };
        let now = base + next(5_000) as i64 - 1_000;
        let pick = |v: u64| (v > 0).then_some(v as u32);
        let l = Limits {
            rpm: pick(next(4) * next(200)),
            tpm: pick(next(3) * next(10_000)),
            concurrent: None,
        };
        let est = next(3_000) as u32;
        let model = decide(&state, now, &l, est, 0);
        let (db, after) = lim.admit_at("m", state, now, &l, est).await.unwrap();
        match (model, db) {
            (
                Decision::Admit {
                    state: m,
                    remaining: mr,
                },
                Decision::Admit { remaining: dr, .. },
            ) => {
                admitted += 1;
                assert_eq!(m, after, "case {case}: stored state");
                assert_eq!(mr, dr, "case {case}: remaining");
            }
            (m, d) => {
                assert_eq!(m, d, "case {case}: {state:?} now {now} {l:?} est {est}");
                assert_eq!(after, state, "case {case}: a refusal wrote the state");
            }
        }
    }
    assert!(
        (50..350).contains(&admitted),
        "{admitted} of 400 admitted: the cases do not exercise both outcomes"
    );
}

/// A batch (`securellm_admit_many`: the admissions of one key queued in one gateway, decided in
/// one call) is the model applied in order: random states, limits (concurrency included) and
/// batches of estimates, each decision and the final stored state bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_decides_exactly_as_the_model_in_order() {
    use securellm_gateway::limits::shared::{Decision, SubjectState, decide};
    let Some(pg) = Postgres::start_or_skip("batch admission model vs database") else {
        return;
    };
    let url = pg.create_database("batch");
    let lim = SharedLimiter::open(&url, Duration::from_secs(5), Unreachable::Closed)
        .await
        .unwrap();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let (mut admitted, mut refused) = (0, 0);
    for case in 0..150 {
        let base: i64 = 1_796_000_000_000 + next(1_000_000) as i64;
        let mut state = SubjectState {
            rpm_tat_ms: if next(3) == 0 {
                0.0
            } else {
                base as f64 + next(120_000) as f64 - 60_000.0 + next(1000) as f64 / 7.0
            },
            tpm_level: next(20_000) as f64 / 3.0,
            at_ms: base - next(90_000) as i64,
        };
        let start = state;
        let now = base + next(5_000) as i64 - 1_000;
        let pick = |v: u64| (v > 0).then_some(v as u32);
        let l = Limits {
            rpm: pick(next(3) * next(40)),
            tpm: pick(next(3) * next(10_000)),
            concurrent: pick(next(2) * next(12)),
        };
        let ests: Vec<u32> = (0..1 + next(24)).map(|_| next(2_000) as u32).collect();
        let (db, after) = lim.admit_many_at("m", start, now, &l, &ests).await.unwrap();
        assert_eq!(
            db.len(),
            ests.len(),
            "case {case}: one answer per admission"
        );
        let mut in_flight = 0;
        for (i, (&est, d)) in ests.iter().zip(&db).enumerate() {
            match (decide(&state, now, &l, est, in_flight), d) {
                (
                    Decision::Admit {
                        state: m,
                        remaining: mr,
                    },
                    Decision::Admit { remaining: dr, .. },
                ) => {
                    admitted += 1;
                    assert_eq!(mr, *dr, "case {case} #{i}: remaining");
                    state = m;
                    in_flight += 1;
                }
                (m, d) => {
                    refused += 1;
                    assert_eq!(
                        &m, d,
                        "case {case} #{i}: {start:?} now {now} {l:?} {ests:?}"
                    );
                }
            }
        }
        assert_eq!(
            state, after,
            "case {case}: the stored state after the batch"
        );
    }
    assert!(
        admitted > 200 && refused > 200,
        "{admitted} admitted, {refused} refused: the cases do not exercise both outcomes"
    );
}
