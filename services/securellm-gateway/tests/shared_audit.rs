//! The audit log shared by several gateways on one real PostgreSQL (a throw-away cluster per
//! test, `securellm_testkit::postgres`): one chain per writer plus signed checkpoints.
//!
//! - every kind of tampering is named by `verify`: a row edited, a chain's tail deleted together
//!   with its head record, a whole chain rewritten with valid hashes, a chain deleted, a
//!   checkpoint deleted (caught by the export file), a checkpoint forged with another key;
//! - three gateway PROCESSES on one database in fail-closed audit mode, one `kill -9`'d
//!   mid-flood and restarted: every chain and every checkpoint verifies and each chain holds at
//!   least the 2xx its gateway acknowledged;
//! - PostgreSQL restarted under load: the gateway keeps answering and its audit catches up, no
//!   row lost.
//!
//! Skipped LOUDLY where no PostgreSQL can be started (`make postgres` installs it).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use securellm_gateway::audit::checkpoint::SigningKey;
use securellm_gateway::audit::{
    self, AuditEntry, AuditLog, AuditOptions, PgAuditOptions, TamperKind, VerifyReport,
};
use securellm_gateway::cloud::CloudConfig;
use securellm_gateway::config::StorageConfig;
use securellm_testkit::gateway::standalone_gateway;
use securellm_testkit::postgres::Postgres;
use securellm_testkit::{ready_word, spawn_ready};

const SEED: [u8; 32] = [42; 32];

fn entry(i: usize) -> AuditEntry {
    AuditEntry {
        request_id: format!("r{i}"),
        subject: "alice".into(),
        key_id: "k1".into(),
        endpoint: "/v1/chat/completions".into(),
        model: "gpt-x".into(),
        status: 200,
        prompt_tokens: 3,
        completion_tokens: 5,
        ..Default::default()
    }
}

async fn open(url: &str, chain: &str, export: Option<&Path>) -> AuditLog {
    AuditLog::open_postgres(
        url,
        PgAuditOptions {
            chain_id: chain.into(),
            signing_key: Some(SigningKey::from_seed(&SEED)),
            trusted_key: None,
            checkpoint_interval: Duration::ZERO,
            export_file: export.map(Path::to_path_buf),
        },
        AuditOptions::default(),
    )
    .await
    .expect("the shared audit log opens")
}

/// Three writers, `n` rows each (written concurrently), then a checkpoint (exported to
/// `export`).
async fn three_chains(url: &str, n: usize, export: &Path) -> Vec<AuditLog> {
    let mut logs = Vec::new();
    for c in ["gw-a", "gw-b", "gw-c"] {
        logs.push(open(url, c, Some(export)).await);
    }
    let mut tasks = Vec::new();
    for log in &logs {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..n {
                log.append(entry(i)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    logs[0].checkpoint().await.unwrap().expect("signed");
    logs
}

async fn verify(url: &str, export: Option<&Path>, pinned: bool) -> VerifyReport {
    let exported = export
        .map(|p| audit::read_export(p).unwrap())
        .unwrap_or_default();
    let key = SigningKey::from_seed(&SEED).public_key();
    audit::verify_url(url, pinned.then_some(&key), &exported)
        .await
        .unwrap()
}

/// Run `sql` as the superuser with the append-only triggers off (what someone with the
/// database's rights can do).
fn tamper(pg: &Postgres, db: &str, sql: &str) {
    pg.psql(
        db,
        &format!("SET session_replication_role = replica; {sql}"),
    )
    .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn broken(r: &VerifyReport, chain: Option<&str>, kind: TamperKind, words: &str) {
    assert!(!r.ok, "verify passed a tampered log: {r:?}");
    assert_eq!(r.kind, Some(kind), "{r:?}");
    assert_eq!(r.chain_id.as_deref(), chain, "{r:?}");
    assert!(r.detail.contains(words), "{words:?} not in {:?}", r.detail);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_chain_and_checkpoint_verifies_and_each_tampering_is_named() {
    let Some(pg) = Postgres::start_or_skip("shared audit tampering") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();

    // Intact: three chains, one checkpoint, pinned key.
    let url = pg.create_database("intact");
    let export = dir.path().join("intact.jsonl");
    let logs = three_chains(&url, 40, &export).await;
    let r = verify(&url, Some(&export), true).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(
        (r.chains, r.rows_checked, r.checkpoints_checked),
        (3, 120, 1)
    );
    // A restarted writer continues its chain; the final checkpoint comes with close().
    logs[1].close().await;
    let again = open(&url, "gw-b", Some(&export)).await;
    assert_eq!(again.append(entry(99)).await.unwrap(), 41);
    again.close().await;
    let r = verify(&url, Some(&export), true).await;
    assert!(r.ok, "{r:?}");
    assert_eq!((r.rows_checked, r.checkpoints_checked), (121, 3));
    // The triggers refuse edits by mistake.
    assert!(
        pg.psql("intact", "DELETE FROM audit WHERE chain_id = 'gw-a'")
            .unwrap_err()
            .contains("append-only")
    );

    // A row edited in place (its hash now wrong).
    let url = pg.create_database("edited");
    let export = dir.path().join("edited.jsonl");
    three_chains(&url, 20, &export).await;
    tamper(
        &pg,
        "edited",
        "UPDATE audit SET status = 500 WHERE chain_id = 'gw-b' AND seq = 7",
    );
    let r = verify(&url, None, true).await;
    broken(&r, Some("gw-b"), TamperKind::Edited, "row 7");
    assert_eq!(r.first_bad_row_id, Some(7));

    // The tail cut, head record moved back with it: the chain alone is consistent; the
    // checkpoint is not.
    let url = pg.create_database("cut");
    let export = dir.path().join("cut.jsonl");
    three_chains(&url, 20, &export).await;
    tamper(
        &pg,
        "cut",
        "DELETE FROM audit WHERE chain_id = 'gw-c' AND seq > 15; \
         UPDATE audit_heads SET last_id = 15, \
           last_hash = (SELECT row_hash FROM audit WHERE chain_id = 'gw-c' AND seq = 15) \
         WHERE chain_id = 'gw-c'",
    );
    let r = verify(&url, None, true).await;
    broken(
        &r,
        Some("gw-c"),
        TamperKind::Truncated,
        "now ends at row 15",
    );
    assert_eq!(r.first_bad_row_id, Some(20));

    // A whole chain rewritten with valid hashes (and its head): only the checkpoint knows.
    let url = pg.create_database("rewritten");
    let export = dir.path().join("rewritten.jsonl");
    three_chains(&url, 10, &export).await;
    let mut prev = audit::GENESIS_HASH.to_string();
    let mut sql = String::new();
    for seq in 1..=10 {
        let mut e = entry(seq - 1);
        e.status = 403; // the rewrite
        // Read back exactly as stored (time) so only the status differs.
        let t: i64 = pg
            .psql(
                "rewritten",
                &format!("SELECT time_ms FROM audit WHERE chain_id = 'gw-a' AND seq = {seq}"),
            )
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        e.time_ms = t as u64;
        let h = audit::chain_hash(&prev, &e).unwrap();
        sql.push_str(&format!(
            "UPDATE audit SET status = 403, prev_hash = '{prev}', row_hash = '{h}' \
             WHERE chain_id = 'gw-a' AND seq = {seq};"
        ));
        prev = h;
    }
    sql.push_str(&format!(
        "UPDATE audit_heads SET last_hash = '{prev}' WHERE chain_id = 'gw-a';"
    ));
    tamper(&pg, "rewritten", &sql);
    let r = verify(&url, None, true).await;
    broken(&r, Some("gw-a"), TamperKind::Edited, "rewritten");
    assert_eq!(r.first_bad_row_id, Some(10));

    // A chain deleted outright, head and all.
    let url = pg.create_database("gone");
    let export = dir.path().join("gone.jsonl");
    three_chains(&url, 5, &export).await;
    tamper(
        &pg,
        "gone",
        "DELETE FROM audit WHERE chain_id = 'gw-b'; DELETE FROM audit_heads WHERE chain_id = 'gw-b'",
    );
    let r = verify(&url, None, true).await;
    broken(&r, Some("gw-b"), TamperKind::Truncated, "the chain is gone");

    // The newest checkpoint deleted along with the rows it covered: the database alone looks
    // fine; the export file does not.
    let url = pg.create_database("ckpt");
    let export = dir.path().join("ckpt.jsonl");
    let logs = three_chains(&url, 5, &export).await;
    for i in 0..5 {
        logs[0].append(entry(100 + i)).await.unwrap();
    }
    logs[0].checkpoint().await.unwrap();
    tamper(
        &pg,
        "ckpt",
        "DELETE FROM audit_checkpoints WHERE id = (SELECT max(id) FROM audit_checkpoints); \
         DELETE FROM audit WHERE chain_id = 'gw-a' AND seq > 5; \
         UPDATE audit_heads SET last_id = 5, \
           last_hash = (SELECT row_hash FROM audit WHERE chain_id = 'gw-a' AND seq = 5) \
         WHERE chain_id = 'gw-a'",
    );
    assert!(
        verify(&url, None, true).await.ok,
        "the database alone is consistent"
    );
    let r = verify(&url, Some(&export), true).await;
    broken(&r, None, TamperKind::Deleted, "not in the database");

    // A checkpoint forged with another key (after rewriting a chain): fine against the key it
    // states, refused against the pinned one.
    let url = pg.create_database("forged");
    let export = dir.path().join("forged.jsonl");
    three_chains(&url, 5, &export).await;
    let forger = SigningKey::from_seed(&[1; 32]);
    let heads: Vec<audit::checkpoint::ChainHead> = pg
        .psql(
            "forged",
            "SELECT chain_id || ' ' || last_id || ' ' || last_hash FROM audit_heads",
        )
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some(audit::checkpoint::ChainHead {
                chain_id: w.next()?.into(),
                last_id: w.next()?.parse().ok()?,
                last_hash: w.next()?.into(),
            })
        })
        .collect();
    assert_eq!(heads.len(), 3);
    let cp = forger.sign(1, "gw-a", heads).unwrap();
    tamper(
        &pg,
        "forged",
        &format!(
            "INSERT INTO audit_checkpoints (time_ms, signer, public_key, heads, signature) \
             VALUES (1, 'gw-a', '{}', '{}', '{}')",
            cp.public_key,
            serde_json::to_string(&cp.heads).unwrap(),
            cp.signature
        ),
    );
    let r = verify(&url, None, false).await;
    assert!(r.ok && r.detail.contains("pin"), "{r:?}");
    let r = verify(&url, None, true).await;
    broken(&r, None, TamperKind::Edited, "not by the trusted key");
}

/// A fake OpenAI upstream answering every chat completion at once.
async fn fake_upstream() -> String {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(|body: axum::Json<serde_json::Value>| async move {
            axum::Json(serde_json::json!({
                "id": "c", "object": "chat.completion", "created": 1, "model": body.0["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
            }))
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    format!("http://{addr}/v1")
}

/// A gateway process on the shared database: fail-closed audit, its own chain, signing a
/// checkpoint every 300 ms. Returns the child and its HTTP address.
async fn spawn_gateway(
    dir: &Path,
    name: &str,
    url: &str,
    upstream: &str,
) -> (tokio::process::Child, String) {
    let data = dir.join(name);
    std::fs::create_dir_all(&data).unwrap();
    let key = dir.join("signing-key");
    if !key.exists() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&key, hex::encode(SEED)).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let config = data.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\naudit_mode = \"sync\"\n\
             [gateway.upstreams.fake]\nbase_url = \"{upstream}\"\nmodels = [\"gpt-*\"]\n\
             [storage]\nurl = \"{url}\"\nreplica_id = \"{name}\"\n\
             audit_signing_key_file = \"{}\"\ncheckpoint_interval_ms = 300\n\
             checkpoint_export_file = \"{}\"\n",
            key.display(),
            dir.join("checkpoints.jsonl").display()
        ),
    )
    .unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_securellm-gateway"));
    cmd.args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(["--backend", "127.0.0.1:1", "--registry", "127.0.0.1:1"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .arg("--bootstrap-key-file")
        .arg(dir.join("api-key"))
        .env("RUST_LOG", "warn")
        .env_remove("SECURELLM_DATABASE_URL")
        .env_remove("SECURELLM_REPLICA_ID")
        .stderr(std::process::Stdio::null());
    let (child, ready) = spawn_ready(cmd, Duration::from_secs(30)).await;
    (child, ready_word(&ready, "http="))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateway_processes_one_killed_mid_flood_all_chains_and_checkpoints_verify() {
    let Some(pg) = Postgres::start_or_skip("shared audit across gateway processes") else {
        return;
    };
    securellm_common::tls::install_crypto_provider();
    let url = pg.create_database("flood");
    let dir = tempfile::tempdir().unwrap();
    let upstream = fake_upstream().await;
    let mut gws = Vec::new();
    for name in ["gw-1", "gw-2", "gw-3"] {
        gws.push(spawn_gateway(dir.path(), name, &url, &upstream).await);
    }
    let key = std::fs::read_to_string(dir.path().join("api-key"))
        .unwrap()
        .trim()
        .to_string();
    // Four clients per gateway send until told to stop; each counts the 2xx it got.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Vec<AtomicUsize>> = Arc::new((0..3).map(|_| AtomicUsize::new(0)).collect());
    let addrs: Arc<std::sync::Mutex<Vec<String>>> = Arc::new(std::sync::Mutex::new(
        gws.iter().map(|g| g.1.clone()).collect(),
    ));
    let mut clients = Vec::new();
    for g in 0..3 {
        for _ in 0..4 {
            let (http, key, stop, acked, addrs) = (
                http.clone(),
                key.clone(),
                stop.clone(),
                acked.clone(),
                addrs.clone(),
            );
            clients.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let addr = addrs.lock().unwrap()[g].clone();
                    let r = http
                        .post(format!("http://{addr}/v1/chat/completions"))
                        .bearer_auth(&key)
                        .json(&serde_json::json!({"model": "gpt-x", "max_tokens": 4,
                            "messages": [{"role": "user", "content": "hi"}]}))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().is_success() => {
                            // The body arrives whole: the answer was given.
                            if r.bytes().await.is_ok() {
                                acked[g].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // kill -9 the second gateway mid-flood, then restart it on its chain.
    let killed_at = acked[1].load(Ordering::Relaxed);
    gws[1].0.start_kill().unwrap();
    gws[1].0.wait().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let restarted = spawn_gateway(dir.path(), "gw-2", &url, &upstream).await;
    addrs.lock().unwrap()[1] = restarted.1.clone();
    gws[1] = restarted;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    // Let a checkpoint cover the end, then crash every gateway too.
    tokio::time::sleep(Duration::from_millis(700)).await;
    for g in &mut gws {
        g.0.start_kill().unwrap();
        g.0.wait().await.unwrap();
    }

    let exported = audit::read_export(&dir.path().join("checkpoints.jsonl")).unwrap();
    assert!(
        exported.len() >= 6,
        "checkpoints every 300 ms: {}",
        exported.len()
    );
    let key = SigningKey::from_seed(&SEED).public_key();
    let r = audit::verify_url(&url, Some(&key), &exported)
        .await
        .unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(r.chains, 3, "{r:?}");
    assert!(r.checkpoints_checked >= exported.len() as u64, "{r:?}");
    // Each chain holds at least the 2xx its gateway acknowledged (fail-closed mode).
    let reader = audit::pg::open_reader(&url).await.unwrap();
    let mut per_chain: HashMap<String, usize> = HashMap::new();
    for row in reader
        .query(audit::AuditFilter {
            limit: Some(audit::MAX_QUERY_LIMIT),
            status_min: Some(200),
            status_max: Some(299),
            ..Default::default()
        })
        .await
        .unwrap()
    {
        *per_chain.entry(row.chain_id).or_default() += 1;
    }
    for (g, name) in ["gw-1", "gw-2", "gw-3"].iter().enumerate() {
        let acked = acked[g].load(Ordering::Relaxed);
        let rows = per_chain.get(*name).copied().unwrap_or(0);
        assert!(acked > 0, "{name} answered nothing");
        assert!(
            rows >= acked,
            "{name}: {rows} 2xx rows < {acked} acknowledged"
        );
    }
    assert!(killed_at > 0, "the kill came before any answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restarted_under_load_the_audit_catches_up_and_loses_nothing() {
    let Some(pg) = Postgres::start_or_skip("shared audit across a database restart") else {
        return;
    };
    let url = pg.create_database("restart");
    let dir = tempfile::tempdir().unwrap();
    let upstream = fake_upstream().await;
    let (u, up) = (url.clone(), upstream.clone());
    let g = standalone_gateway(dir.path(), move |c| {
        c.storage = StorageConfig {
            url: Some(u),
            replica_id: Some("solo".into()),
            ..Default::default()
        };
        c.upstreams.insert(
            "fake".into(),
            CloudConfig {
                base_url: up,
                api_key_env: None,
                api_key_file: None,
                models: vec!["gpt-*".into()],
                redaction: Default::default(),
            },
        );
    })
    .await;
    let (secret, _) =
        securellm_testkit::gateway::create_key(&g.state.keys, "k", &["*"], None).await;
    let http = reqwest::Client::new();
    let answered = AtomicUsize::new(0);
    let send = async || {
        let r = http
            .post(format!("http://{}/v1/chat/completions", g.http_addr))
            .bearer_auth(&secret)
            .json(&serde_json::json!({"model": "gpt-x", "max_tokens": 4,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "cached key, local limits: still served");
        answered.fetch_add(1, Ordering::Relaxed);
    };
    for _ in 0..30 {
        send().await;
    }
    pg.stop();
    for _ in 0..30 {
        send().await;
    }
    assert!(pg.restart().is_ok());
    assert!(pg.wait_ready(Duration::from_secs(20)));
    for _ in 0..30 {
        send().await;
    }
    // The writer retried through the outage: every answered request has its row.
    g.state.audit.flush().await;
    let stats = g.state.audit.stats();
    assert_eq!(stats.dropped, 0);
    let rows = g
        .state
        .audit
        .query(audit::AuditFilter {
            chain_id: Some("solo".into()),
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        rows.iter().filter(|r| r.entry.status == 200).count(),
        answered.load(Ordering::Relaxed)
    );
    let r = g.state.audit.verify().await.unwrap();
    assert!(r.ok, "{r:?}");
}
