//! Scenario 3: the audit log through the whole stack. Every request (allowed or denied) leaves
//! exactly one row; `securellm audit verify` (the CLI binary, reading the SQLite file) passes;
//! editing one row directly in the file makes it, and GatewayAdmin.VerifyAudit, fail naming the
//! row.

use std::time::Duration;

use securellm_e2e::v1 as pb;
use securellm_e2e::{Stack, read_sse};
use sqlx::Connection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_one_audit_row_and_verify_catches_an_edited_row() {
    let s = Stack::start(Default::default()).await;
    let scoped = s.create_key("scoped", &["tiny"], None).await;
    let limited = s.create_key("limited", &["*"], Some(1)).await;

    assert_eq!(s.chat(&s.api_key, "tiny", 4, "aud-chat").await.status, 200);
    let st = read_sse(
        s.chat_stream(&s.api_key, "tiny", 6, "aud-stream").await,
        Duration::from_secs(30),
        |_| {},
    )
    .await;
    assert!(st.done(), "{st:?}");
    assert_eq!(s.models(&s.api_key, "aud-models").await.status, 200);
    assert_eq!(s.chat("", "tiny", 4, "aud-nokey").await.status, 401);
    assert_eq!(s.chat(&scoped, "other", 4, "aud-scope").await.status, 404);
    let bad = s
        .post(
            &s.api_key,
            "chat/completions",
            "aud-bad",
            serde_json::json!({"model": "tiny", "messages": "not a list"}),
        )
        .await;
    assert_eq!(bad.status, 400, "{bad:?}");
    assert_eq!(s.chat(&limited, "tiny", 4, "aud-rpm-1").await.status, 200);
    assert_eq!(s.chat(&limited, "tiny", 4, "aud-rpm-2").await.status, 429);

    let expect: [(&str, u32, &str, &str); 8] = [
        ("aud-chat", 200, "/v1/chat/completions", "tiny"),
        ("aud-stream", 200, "/v1/chat/completions", "tiny"),
        ("aud-models", 200, "/v1/models", ""),
        ("aud-nokey", 401, "/v1/chat/completions", ""),
        ("aud-scope", 404, "/v1/chat/completions", "other"),
        ("aud-bad", 400, "/v1/chat/completions", "tiny"),
        ("aud-rpm-1", 200, "/v1/chat/completions", "tiny"),
        ("aud-rpm-2", 429, "/v1/chat/completions", "tiny"),
    ];
    let ids: Vec<&str> = expect.iter().map(|e| e.0).collect();
    let rows = s.audited(&ids).await;
    for ((id, status, endpoint, model), r) in expect.iter().zip(&rows) {
        assert_eq!(
            (r.status, r.endpoint.as_str(), r.model.as_str()),
            (*status, *endpoint, *model),
            "{id}: {r:?}"
        );
        assert!(r.client_addr.starts_with("127.0.0.1"), "{r:?}");
        assert_eq!(r.row_hash.len(), 64);
    }
    assert!(rows[1].streamed && !rows[0].streamed);
    assert!(rows[0].completion_tokens.unwrap_or(0) >= 1, "{:?}", rows[0]);
    assert!(rows[1].completion_tokens.unwrap_or(0) >= 1, "{:?}", rows[1]);
    assert_eq!(rows[3].subject, "", "unauthenticated: no subject");
    assert!(!rows[4].key_id.is_empty() && rows[4].key_id != rows[0].key_id);
    // The rows form one chain: ids without gaps, each row's prev_hash its predecessor's hash.
    let mut all = s.audit_rows().await;
    all.sort_by_key(|r| r.id);
    for (i, w) in all.windows(2).enumerate() {
        assert_eq!(w[1].id, w[0].id + 1, "gap after row {}", w[0].id);
        assert_eq!(w[1].prev_hash, w[0].row_hash, "chain broken at {i}");
    }
    // Never a key, never a prompt, in the file.
    let data = s.gateway_data();
    let mut bytes = std::fs::read(data.join("gateway-audit.db")).unwrap();
    bytes.extend(std::fs::read(data.join("gateway-audit.db-wal")).unwrap_or_default());
    for secret in [&s.api_key, &scoped, &limited] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "a key secret is in the audit file"
        );
    }
    assert!(
        !bytes.windows(11).any(|w| w == b"hello there"),
        "a prompt in the audit file"
    );

    // The chain verifies, through the admin API and with the CLI on the file.
    let v = s
        .admin()
        .await
        .verify_audit(pb::VerifyAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    assert!(v.rows_checked >= expect.len() as u64, "{v:?}");
    let data_arg = data.to_str().unwrap();
    let out = s.cli(&["audit", "--data-dir", data_arg, "verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && stdout.contains("audit chain OK"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s.cli(&["audit", "--data-dir", data_arg, "tail", "-n", "100"]);
    let tail = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tail}");
    assert!(
        tail.lines().filter(|l| l.contains(" 429 ")).count() == 1,
        "{tail}"
    );

    // Edit one row in the file, as someone hiding a failed request would: the append-only
    // trigger is dropped first (it stops mistakes, not an attacker with the file).
    let victim = rows[3].id;
    let path = data.join("gateway-audit.db");
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .busy_timeout(Duration::from_secs(10));
    let mut db = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
    sqlx::query("DROP TRIGGER audit_no_update")
        .execute(&mut db)
        .await
        .unwrap();
    let changed = sqlx::query("UPDATE audit SET status = 200, error_code = '' WHERE id = ?")
        .bind(victim as i64)
        .execute(&mut db)
        .await
        .unwrap();
    assert_eq!(changed.rows_affected(), 1);
    db.close().await.unwrap();

    let out = s.cli(&["audit", "--data-dir", data_arg, "verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "verify must fail: {stdout}");
    assert!(
        stdout.contains(&format!("BROKEN at row {victim}")) && stdout.contains("Edited"),
        "{stdout}"
    );
    let v = s
        .admin()
        .await
        .verify_audit(pb::VerifyAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!v.ok, "{v:?}");
    assert_eq!(v.first_bad_row_id, Some(victim), "{v:?}");
    assert_eq!(v.reason, pb::AuditTamperKind::Edited as i32, "{v:?}");
}
