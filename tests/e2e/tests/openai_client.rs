//! Scenario 1: the official `openai` Python client against the whole stack (four processes, the
//! real llama-server): list models, chat (non-streaming and streaming) against a model that is not
//! loaded yet, embeddings. Around it: the load happened on demand, a lease appeared in the
//! scheduler, and it was requested at the registry's estimate, then settled to the measured size.

use std::time::Duration;

use securellm_e2e::v1 as pb;
use securellm_e2e::{LeaseEvents, Stack, check_invariant, script, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_lists_chats_streams_and_embeds_loading_on_demand() {
    let s = Stack::start(Default::default()).await;
    // Nothing is loaded and nothing is leased yet.
    assert!(
        s.leases().await.is_empty(),
        "no lease before the first request"
    );
    assert!(
        s.instances().await.is_empty(),
        "no instance before the first request"
    );
    // What the registry estimates for the settings the manager uses (context 512, 1 slot, f16).
    let est = s.estimate("tiny", 512).await;
    assert!(!est.from_measurement, "a computed estimate: {est:?}");
    assert!(est.gpu_bytes > 0);
    let events = LeaseEvents::follow(s.scheduler.grpc).await;

    let base_url = s.base_url();
    securellm_testkit::run_python_client(
        &script("openai_e2e.py"),
        &[
            ("BASE_URL", &base_url),
            ("API_KEY", &s.api_key),
            ("MODEL", "tiny"),
            ("OTHER", "other"),
            ("RID", "e2e-py"),
        ],
    )
    .await;

    // A lease appeared for the chat instance, and it was asked for at the registry's estimate.
    let inst = s.instance("tiny").await.expect("the chat instance of tiny");
    assert_eq!(inst.state, pb::InstanceState::Ready as i32, "{inst:?}");
    assert_eq!(
        inst.estimated_bytes, est.gpu_bytes,
        "the manager used the registry's estimate"
    );
    let granted = wait_until("a GRANTED event", Duration::from_secs(2), || async {
        let g = events.of(pb::lease_event::Kind::Granted, "tiny");
        (!g.is_empty()).then_some(g)
    })
    .await;
    let first = granted[0].lease.clone().unwrap();
    assert_eq!(
        first.bytes, est.gpu_bytes,
        "the first lease was requested at the estimate"
    );
    assert_eq!(first.holder, "backend-manager");
    // ... then settled to what llama-server reported allocating.
    let measured = inst
        .measured_bytes
        .expect("measured from llama-server's log");
    let st = s.status().await;
    check_invariant(&st).unwrap();
    let lease = st
        .leases
        .iter()
        .find(|l| l.id == inst.lease_id)
        .unwrap_or_else(|| panic!("lease {} not in the scheduler: {st:?}", inst.lease_id));
    assert_eq!(lease.bytes, inst.lease_bytes);
    assert_eq!(
        lease.bytes, measured,
        "the lease was settled to the measurement"
    );
    assert_eq!(lease.label, "tiny");
    // The manager reports the child's pid with its next renewal (every TTL/3).
    let lease_id = inst.lease_id.clone();
    wait_until(
        "the lease names llama-server's pid",
        Duration::from_secs(5),
        || async {
            let st = s.status().await;
            st.leases
                .iter()
                .any(|l| l.id == lease_id && l.pids == [inst.pid])
                .then_some(())
        },
    )
    .await;
    // The measurement went back to the registry: the same estimate now comes from it.
    let again = s.estimate("tiny", 512).await;
    assert!(again.from_measurement, "{again:?}");
    // Embeddings ran in their own `--embeddings` instance with its own lease; "other" never
    // loaded.
    let all = s.instances().await;
    let emb = all
        .iter()
        .find(|i| {
            i.model_name == "tiny" && i.settings.as_ref().and_then(|s| s.embeddings) == Some(true)
        })
        .expect("an embeddings instance");
    assert!(st.leases.iter().any(|l| l.id == emb.lease_id));
    assert_eq!(st.leases.len(), 2, "{:?}", st.leases);
    assert!(all.iter().all(|i| i.model_name != "other"));
    assert_eq!(inst.requests_total, 2, "chat + stream");
    assert_eq!(inst.crash_count, 0);

    // Each request left its audit row.
    let rows = s
        .audited(&[
            "e2e-py-models",
            "e2e-py-chat",
            "e2e-py-stream",
            "e2e-py-embeddings",
        ])
        .await;
    let endpoints: Vec<&str> = rows.iter().map(|r| r.endpoint.as_str()).collect();
    assert_eq!(
        endpoints,
        [
            "/v1/models",
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/embeddings"
        ]
    );
    assert!(rows.iter().all(|r| r.status == 200), "{rows:?}");
    assert!(rows[1..].iter().all(|r| r.model == "tiny"));
    assert!(!rows[1].streamed && rows[2].streamed);
    assert!(rows[1].completion_tokens.unwrap_or(0) >= 1);
    assert!(rows[2].completion_tokens.unwrap_or(0) >= 1, "{:?}", rows[2]);
}
