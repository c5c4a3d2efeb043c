//! Nobody walks around the gateway (the four real binaries): the vram-scheduler, the registry and
//! the backend manager refuse every call without the internal token, or with another one, and
//! answer nothing, load nothing, lease nothing for it; their health checks stay open. The backend
//! manager's llama-server child refuses requests without its own key. The same request through
//! the gateway, with an API key, is answered and audited. The CLI presents the token file.

use securellm_common::internal_auth::InternalToken;
use securellm_e2e::{Stack, v1 as pb};
use securellm_proto::v1::backend_manager_client::BackendManagerClient;
use securellm_proto::v1::model_registry_client::ModelRegistryClient;
use securellm_proto::v1::vram_scheduler_client::VramSchedulerClient;
use tonic::Code;

fn chat(rid: &str) -> pb::InferenceRequest {
    pb::InferenceRequest {
        request_id: rid.into(),
        model: "tiny".into(),
        body_json: br#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}"#
            .to_vec(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_services_and_the_engine_refuse_callers_without_their_credentials() {
    let s = Stack::start(Default::default()).await;
    let wrong = InternalToken::generate();
    for (what, t) in [("no token", None), ("a wrong token", Some(&wrong))] {
        let ch = Stack::channel_with(s.backend.grpc, t).await;
        let mut b = BackendManagerClient::new(ch);
        let e = b.chat(chat("bypass-unary")).await.unwrap_err();
        assert_eq!(
            e.code(),
            Code::Unauthenticated,
            "manager Chat, {what}: {e:?}"
        );
        let e = b.chat_stream(chat("bypass-stream")).await.unwrap_err();
        assert_eq!(
            e.code(),
            Code::Unauthenticated,
            "manager ChatStream, {what}"
        );
        let e = b
            .list_instances(pb::ListInstancesRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "manager, {what}");

        let mut sch = VramSchedulerClient::new(Stack::channel_with(s.scheduler.grpc, t).await);
        let e = sch.get_status(pb::GetStatusRequest {}).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "scheduler, {what}");
        let e = sch
            .acquire_lease(pb::AcquireLeaseRequest {
                holder: "intruder".into(),
                bytes: 1 << 20,
                priority: 100,
                ttl_ms: 60_000,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "scheduler, {what}");

        let mut reg = ModelRegistryClient::new(Stack::channel_with(s.registry.grpc, t).await);
        let e = reg
            .list_models(pb::ListModelsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "registry, {what}");
    }
    // Health checks need no token (container probes).
    for addr in [s.scheduler.grpc, s.registry.grpc, s.backend.grpc] {
        let st = tonic_health::pb::health_client::HealthClient::new(
            Stack::channel_with(addr, None).await,
        )
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
        assert_eq!(
            st.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{addr}"
        );
    }
    assert!(
        s.leases().await.is_empty(),
        "nothing leased for the refused calls"
    );
    assert!(s.instances().await.is_empty(), "nothing loaded for them");

    // Through the gateway with an API key: answered and audited.
    let r = s.chat(&s.api_key, "tiny", 2, "through-the-gateway").await;
    assert_eq!(r.status, 200, "{r:?}");
    s.audited(&["through-the-gateway"]).await;
    let rows = s.audit_rows().await;
    assert!(
        !rows.iter().any(|r| r.request_id.starts_with("bypass-")),
        "the refused calls never became answers: {rows:?}"
    );

    // The engine's loopback port wants the engine's own key: not none, not the internal token,
    // not an API key.
    let i = s.instance("tiny").await.expect("tiny is loaded");
    let base = format!("http://127.0.0.1:{}", i.port);
    let body = serde_json::json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2
    });
    let token = securellm_e2e::internal_token().expose().to_string();
    for (what, key) in [
        ("no key", None),
        ("the internal token", Some(token.as_str())),
        ("an API key", Some(s.api_key.as_str())),
    ] {
        let mut req = s
            .http()
            .post(format!("{base}/v1/chat/completions"))
            .json(&body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "llama-server with {what}");
    }
    let r = s.http().get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // The CLI reads the token file; without it, it says what is missing.
    let out = s.cli(&["vram"]);
    assert!(out.status.success(), "{out:?}");
    let out = s.cli(&["--internal-token-file", "/nonexistent/internal-token", "ps"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("internal token") && err.contains("/nonexistent"),
        "{out:?}"
    );
}
