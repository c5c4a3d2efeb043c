//! The gateway's `/metrics` and audit trace ids, against the real stack (scheduler, registry,
//! backend manager with the real llama-server, in-process over loopback gRPC): requests over HTTP
//! (reqwest) and gRPC, the scrape over HTTP, and Prometheus' own `promtool check metrics` when it
//! is installed.

use std::time::Duration;

use securellm_proto::v1 as pb;
use securellm_proto::v1::gateway_client::GatewayClient;
use securellm_testkit::Stack;
use securellm_testkit::gateway::{audit_rows, create_key};
use securellm_testkit::prom::{promtool_check, scrape, sum as value};

const REQUESTS: &str = "securellm_gateway_requests_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic_and_audit_rows_carry_the_callers_trace() {
    let s = Stack::new()
        .models(&["tiny"])
        .gateway_with(|cfg| cfg.metrics_listen = Some("127.0.0.1:0".into()))
        .start()
        .await;
    let g = s.gateway();
    let maddr = g.metrics.as_ref().expect("a metrics listener").addr;
    let keys = &g.state.keys;
    let (key, key_id) = create_key(keys, "metrics", &["*"], None).await;
    let (limited, _) = create_key(keys, "one-a-minute", &["*"], Some(1)).await;
    let before = scrape(maddr).await;
    // The closed label sets exist from the start, at 0.
    for reason in ["missing", "invalid", "revoked", "expired", "jwt"] {
        assert!(
            before.contains(&format!(
                "securellm_gateway_auth_failures_total{{reason=\"{reason}\"}} 0"
            )),
            "{before}"
        );
    }
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", g.http_addr);
    let chat = |model: &str| {
        serde_json::json!({"model": model, "max_tokens": 4,
            "messages": [{"role": "user", "content": "Say hi"}]})
    };

    // A served request, sent in a caller's trace.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = http
        .post(&url)
        .bearer_auth(&key)
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .header("x-request-id", "traced-1")
        .json(&chat("tiny"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // A streamed one (time to first byte, the stream's row at its end).
    let r = http
        .post(&url)
        .bearer_auth(&key)
        .json(
            &serde_json::json!({"model": "tiny", "max_tokens": 4, "stream": true,
            "messages": [{"role": "user", "content": "Say hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));

    // Refused credentials: a wrong key and none.
    let r = http
        .post(&url)
        .bearer_auth("sk-not-a-key")
        .json(&chat("tiny"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http.post(&url).json(&chat("tiny")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // Random model names: answered 404, counted under `_other`, never as series of their own.
    for i in 0..3 {
        let r = http
            .post(&url)
            .bearer_auth(&key)
            .json(&chat(&format!("zz-random-{i}-{}", std::process::id())))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{}", r.text().await.unwrap());
    }

    // One request a minute: the second is a 429 of the `requests` limit.
    for want in [404, 429] {
        let r = http
            .post(&url)
            .bearer_auth(&limited)
            .json(&chat("zz-limited"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want);
    }

    // gRPC: a model list in a caller's trace.
    let grpc_trace = "0af7651916cd43dd8448eb211c80319c";
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", g.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut req = tonic::Request::new(pb::GatewayListModelsRequest {});
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{grpc_trace}-b7ad6b7169203331-01")
            .parse()
            .unwrap(),
    );
    req.metadata_mut()
        .insert("x-request-id", "grpc-traced".parse().unwrap());
    req.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let models = GatewayClient::new(ch)
        .list_models(req)
        .await
        .unwrap()
        .into_inner();
    assert!(models.models.iter().any(|m| m.id == "tiny"));

    // The rows are committed; the next scrape reads the writer's count.
    let rows = audit_rows(g).await;
    let after = scrape(maddr).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    let served = [
        ("endpoint", "chat"),
        ("model", "tiny"),
        ("status", "2xx"),
        ("transport", "http"),
    ];
    assert_eq!(delta(REQUESTS, &served), 2.0, "{after}");
    // The refused credentials: no body was read, so no model (`_none`).
    assert_eq!(
        delta(
            REQUESTS,
            &[
                ("endpoint", "chat"),
                ("model", "_none"),
                ("status", "4xx"),
                ("transport", "http")
            ]
        ),
        2.0,
        "{after}"
    );
    // Three random names and the limited key's two requests: `_other`.
    assert_eq!(
        delta(REQUESTS, &[("model", "_other"), ("status", "4xx")]),
        5.0,
        "{after}"
    );
    assert!(!after.contains("zz-random"), "{after}");
    assert!(!after.contains("zz-limited"), "{after}");
    assert_eq!(
        delta(
            REQUESTS,
            &[
                ("endpoint", "models"),
                ("model", "_none"),
                ("status", "2xx"),
                ("transport", "grpc")
            ]
        ),
        1.0,
        "{after}"
    );
    let auth = "securellm_gateway_auth_failures_total";
    assert_eq!(delta(auth, &[("reason", "invalid")]), 1.0, "{after}");
    assert_eq!(delta(auth, &[("reason", "missing")]), 1.0, "{after}");
    assert_eq!(
        delta(
            "securellm_gateway_rate_limited_total",
            &[("limit", "requests")]
        ),
        1.0,
        "{after}"
    );
    assert!(
        delta(
            "securellm_gateway_tokens_total",
            &[("model", "tiny"), ("direction", "completion")]
        ) >= 2.0,
        "{after}"
    );
    assert!(
        delta(
            "securellm_gateway_tokens_total",
            &[("model", "tiny"), ("direction", "prompt")]
        ) >= 2.0,
        "{after}"
    );
    assert!(
        delta(
            "securellm_gateway_request_duration_seconds_count",
            &[("endpoint", "chat"), ("transport", "http")]
        ) >= 9.0,
        "{after}"
    );
    assert!(
        delta(
            "securellm_gateway_time_to_first_byte_seconds_count",
            &[("endpoint", "chat"), ("transport", "http")]
        ) >= 2.0,
        "{after}"
    );
    assert!(
        delta(
            "securellm_gateway_upstream_errors_total",
            &[("upstream", "local"), ("class", "status_4xx")]
        ) >= 4.0,
        "{after}"
    );
    // Rows written: at least the requests above (refused credentials from one address are
    // aggregated into fewer rows), and exactly what the writer committed.
    let written = value(&after, "securellm_gateway_audit_rows_written_total", &[]);
    assert!(
        written - value(&before, "securellm_gateway_audit_rows_written_total", &[]) >= 7.0,
        "{after}"
    );
    assert_eq!(written, g.state.audit.stats().rows as f64);
    assert_eq!(
        value(&after, "securellm_gateway_audit_rows_dropped_total", &[]),
        0.0
    );
    assert!(
        after.contains("securellm_gateway_audit_queue_depth "),
        "{after}"
    );
    assert!(
        value(
            &after,
            "securellm_gateway_connections",
            &[("listener", "http")]
        ) >= 1.0,
        "{after}"
    );
    // No secret, key id or request id in any label.
    for secret in [
        key.as_str(),
        key_id.as_str(),
        "traced-1",
        "grpc-traced",
        trace,
    ] {
        assert!(!after.contains(secret), "{secret} in the scrape");
    }

    // The audit rows name the callers' traces (export off: the `traceparent` they sent).
    let row = |rid: &str| {
        rows.iter()
            .find(|r| r.entry.request_id == rid)
            .unwrap_or_else(|| panic!("no audit row for {rid}"))
    };
    assert_eq!(row("traced-1").entry.status, 200);
    assert_eq!(row("traced-1").entry.trace_id, trace);
    assert_eq!(row("grpc-traced").entry.trace_id, grpc_trace);
    assert!(
        rows.iter()
            .filter(|r| !["traced-1", "grpc-traced"].contains(&r.entry.request_id.as_str()))
            .all(|r| r.entry.trace_id.is_empty())
    );
    let report = g.state.audit.verify().await.unwrap();
    assert!(report.ok, "{report:?}");

    // The gateway's families (the in-process services share the process-wide recorder; their
    // own tests check theirs).
    let gateway_only: String = after
        .lines()
        .filter(|l| {
            let name = l
                .strip_prefix("# HELP ")
                .or_else(|| l.strip_prefix("# TYPE "))
                .unwrap_or(l);
            name.is_empty() || name.starts_with("securellm_gateway_")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(gateway_only.contains("# HELP securellm_gateway_requests_total "));
    promtool_check(&gateway_only);
    s.shutdown().await;
}

#[tokio::test]
async fn without_a_metrics_listener_nothing_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let g = securellm_testkit::gateway::standalone_gateway(dir.path(), |_| {}).await;
    assert!(g.metrics.is_none());
    // Requests are answered as ever.
    let r = reqwest::Client::new()
        .get(format!("http://{}/v1/models", g.http_addr))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    g.shutdown().await;
}
