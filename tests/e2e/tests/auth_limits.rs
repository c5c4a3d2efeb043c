//! Scenario 2: authentication, model scopes and rate limits through the whole stack (raw HTTP
//! against the gateway process, so status codes and headers are seen exactly).

use securellm_e2e::Stack;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_is_401_an_out_of_scope_model_is_404_and_too_many_requests_are_429_with_retry_after()
{
    let s = Stack::start(Default::default()).await;

    // No key, and a key the gateway never issued: 401 in OpenAI's shape.
    let r = s.chat("", "tiny", 2, "auth-none").await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.error_code(), "invalid_api_key", "{r:?}");
    let r = s
        .chat(
            "sk-slm-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "tiny",
            2,
            "auth-bogus",
        )
        .await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(
        s.instances().await.is_empty(),
        "nothing reached the backend"
    );

    // A key scoped to `tiny`: `other` does not exist for it (404, as OpenAI answers), it does
    // not see `other` in the model list, and `tiny` works.
    let scoped = s.create_key("scoped", &["tiny"], None).await;
    let r = s.chat(&scoped, "other", 2, "auth-scope-404").await;
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.error_code(), "model_not_found", "{r:?}");
    assert!(r.error_message().contains("other"), "{r:?}");
    let r = s.models(&scoped, "auth-scope-models").await;
    assert_eq!(r.status, 200, "{r:?}");
    let ids: Vec<&str> = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny"]);
    let r = s.chat(&scoped, "tiny", 2, "auth-scope-ok").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        s.instance("other").await.is_none(),
        "the refused request never reached the backend"
    );

    // Two requests per minute: the third is refused with Retry-After.
    let limited = s.create_key("limited", &["*"], Some(2)).await;
    for i in 1..=2 {
        let r = s.chat(&limited, "tiny", 2, &format!("auth-rpm-{i}")).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
    }
    let r = s.chat(&limited, "tiny", 2, "auth-rpm-3").await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.body["error"]["type"], "rate_limit_error", "{r:?}");
    let retry: u64 = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After: {:?}", r.headers))
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    // The limit is per key: the bootstrap key is not affected.
    let r = s.chat(&s.api_key, "tiny", 2, "auth-other-key").await;
    assert_eq!(r.status, 200, "{r:?}");

    // Every request above has its audit row with the status answered — but for `auth-bogus`: a
    // second refusal without a valid credential from the same address in the same window is
    // counted in the window's summary row, not written on its own (nobody fills the disk without
    // a key).
    let expect = [
        ("auth-none", 401),
        ("auth-scope-404", 404),
        ("auth-scope-models", 200),
        ("auth-scope-ok", 200),
        ("auth-rpm-1", 200),
        ("auth-rpm-2", 200),
        ("auth-rpm-3", 429),
        ("auth-other-key", 200),
    ];
    let ids: Vec<&str> = expect.iter().map(|(id, _)| *id).collect();
    let rows = s.audited(&ids).await;
    for ((id, status), row) in expect.iter().zip(&rows) {
        assert_eq!(row.status, *status, "{id}: {row:?}");
    }
    assert_eq!(rows[0].key_id, "", "no key, no key id");
    assert!(!rows[1].key_id.is_empty() && rows[1].model == "other");
    assert_eq!(rows[6].error_code, "rate_limit_exceeded", "{:?}", rows[6]);
    assert_eq!(rows[6].key_id, rows[5].key_id);
    assert!(
        s.audit_rows()
            .await
            .iter()
            .all(|r| r.request_id != "auth-bogus"),
        "the second refusal is aggregated"
    );
}
