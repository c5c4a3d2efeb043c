//! `securellm-bench storage`: what shared state in PostgreSQL costs the gateway. The same release
//! gateway binary and the same mock upstream, with a key whose limits are far above what the run
//! reaches (so every request takes a rate-limit decision): keys and limits in this gateway
//! (SQLite + memory: the baseline), in a throw-away PostgreSQL on a unix socket (one
//! transaction per admission), and two gateways sharing that database (the load split between
//! them). Runs interleave (baseline, postgres, two gateways, repeated) at concurrency 64 for
//! throughput and 16 for latency.
//!
//! `RESULT postgres_vs_sqlite_x=… postgres_added_p99_us=… two_gateways_vs_sqlite_x=… …`
//! Targets (issue 16): postgres_vs_sqlite_x ≥ 0.70 and postgres_added_p99_us ≤ 2000.

use std::time::Duration;

use securellm_testkit::postgres::Postgres;

use crate::gateway::{Run, Target, bench_key_with, measured, run_load, spawn_gateway, start_mock};
use crate::stats::Samples;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds of (sqlite, postgres, two gateways).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// The key has no concurrency limit (no slot row per request): requests and tokens per
    /// minute only.
    #[arg(long)]
    no_concurrency_limit: bool,
}

fn field(ready: &str, key: &str) -> String {
    ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_default()
        .to_string()
}

/// Merge the samples of runs made at the same time against different targets.
fn merged(runs: Vec<Run>, elapsed: Duration) -> Samples {
    let all: Vec<f64> = runs
        .into_iter()
        .flat_map(|r| r.s.latencies_us.into_iter())
        .collect();
    Samples::new(all, elapsed)
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let mock_addr = start_mock().await?;

    let pg = Postgres::start().map_err(|e| anyhow::anyhow!("PostgreSQL: {e}"))?;
    let url = pg.create_database("bench");

    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("securellm.toml");
    let gateway_toml = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nmetrics_listen = \"off\"\n[gateway.upstreams.mock]\nbase_url = \"http://{mock_addr}/v1\"\nmodels = [\"mock-model\"]\nredaction = \"allow\"\n"
    );
    std::fs::write(&cfg, &gateway_toml)?;
    let pg_cfg = dir.path().join("securellm-pg.toml");
    std::fs::write(
        &pg_cfg,
        format!("{gateway_toml}[storage]\nurl = \"{url}\"\n"),
    )?;

    let (mut sqlite, ready) = spawn_gateway(&cfg, &dir.path().join("sqlite"), &[]).await?;
    let conc = (!a.no_concurrency_limit).then_some(10_000);
    let sqlite_key =
        bench_key_with(&field(&ready, "grpc="), &dir.path().join("sqlite"), conc).await?;
    let sqlite_t = Target {
        name: "sqlite",
        url: format!("http://{}/v1/chat/completions", field(&ready, "http=")),
        key: Some(sqlite_key),
        pids: vec![sqlite.id().unwrap_or(0)],
    };
    let (mut pg1, ready1) = spawn_gateway(&pg_cfg, &dir.path().join("pg1"), &[]).await?;
    let (mut pg2, ready2) = spawn_gateway(&pg_cfg, &dir.path().join("pg2"), &[]).await?;
    // One key in the shared table, made through the first; the second learns it by NOTIFY.
    let pg_key = bench_key_with(&field(&ready1, "grpc="), &dir.path().join("pg1"), conc).await?;
    let pg_t = |name: &'static str, ready: &str, pid: u32| Target {
        name,
        url: format!("http://{}/v1/chat/completions", field(ready, "http=")),
        key: Some(pg_key.clone()),
        pids: vec![pid],
    };
    let pg1_t = pg_t("postgres", &ready1, pg1.id().unwrap_or(0));
    let pg2_t = pg_t("postgres-2", &ready2, pg2.id().unwrap_or(0));

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()?;
    for t in [&sqlite_t, &pg1_t, &pg2_t] {
        run_load(&http, t, 8, Duration::from_millis(500)).await?;
    }
    let dur = Duration::from_secs_f64(a.seconds);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "{cores} cores; {:.1} s per run, {} rounds; gateway → mock upstream; a limited key (every request takes a rate-limit decision)",
        a.seconds, a.rounds
    );
    let (mut s64, mut p64, mut two64) = (Vec::new(), Vec::new(), Vec::new());
    let (mut s16, mut p16) = (Vec::new(), Vec::new());
    for _ in 0..a.rounds {
        s64.push(
            measured(&sqlite_t, run_load(&http, &sqlite_t, 64, dur))
                .await?
                .s,
        );
        p64.push(measured(&pg1_t, run_load(&http, &pg1_t, 64, dur)).await?.s);
        let start = std::time::Instant::now();
        let (x, y) = tokio::join!(
            measured(&pg1_t, run_load(&http, &pg1_t, 32, dur)),
            measured(&pg2_t, run_load(&http, &pg2_t, 32, dur))
        );
        two64.push(merged(vec![x?, y?], start.elapsed()));
        s16.push(
            measured(&sqlite_t, run_load(&http, &sqlite_t, 16, dur))
                .await?
                .s,
        );
        p16.push(measured(&pg1_t, run_load(&http, &pg1_t, 16, dur)).await?.s);
    }
    let mean = |v: &[Samples], f: &dyn Fn(&Samples) -> f64| {
        v.iter().map(f).sum::<f64>() / v.len().max(1) as f64
    };
    let rps = |v: &[Samples]| mean(v, &|s| s.ops_per_s());
    let p99 = |v: &[Samples]| mean(v, &|s| s.percentile(99.0));
    let p50 = |v: &[Samples]| mean(v, &|s| s.percentile(50.0));
    let (sr, pr, tr) = (rps(&s64), rps(&p64), rps(&two64));
    println!(
        "c=64  sqlite {sr:.0} req/s   postgres {pr:.0} req/s   two gateways on postgres {tr:.0} req/s"
    );
    println!(
        "c=16  p50 sqlite {:.0} µs  postgres {:.0} µs;  p99 sqlite {:.0} µs  postgres {:.0} µs",
        p50(&s16),
        p50(&p16),
        p99(&s16),
        p99(&p16)
    );
    let ratio = pr / sr.max(1.0);
    let added_p99 = p99(&p16) - p99(&s16);
    let met = usize::from(ratio >= 0.70) + usize::from(added_p99 <= 2000.0);
    let _ = (sqlite.kill().await, pg1.kill().await, pg2.kill().await);
    println!(
        "RESULT postgres_vs_sqlite_x={ratio:.2} postgres_added_p99_us={added_p99:.0} postgres_added_p50_us={:.0} two_gateways_vs_sqlite_x={:.2} sqlite_rps_c64={sr:.0} postgres_rps_c64={pr:.0} two_gateways_rps_c64={tr:.0} targets_met={met}/2",
        p50(&p16) - p50(&s16),
        tr / sr.max(1.0)
    );
    Ok(())
}
