//! The backend manager's spans, captured in-process by a `tracing` layer while the kit's stack
//! (real llama-server, scheduler, registry) serves: the load path that runs in the instance
//! actor's tasks is traced under the span of the request that caused the load, the forward span
//! carries the `gen_ai` / HTTP attributes, and a stream's first token is an event in it.

use backend_manager::config::ModelSettings;
use securellm_common::time::now_ms;
use securellm_testkit::chat_request as chat;
use securellm_testkit::spans::{Capture, Captured, Event};
use tokio_stream::StreamExt;
use tracing::Instrument;
use tracing_subscriber::prelude::*;

#[tokio::test]
async fn a_load_is_traced_under_the_request_that_caused_it_and_forwards_carry_gen_ai_attributes() {
    let capture = Capture::default();
    tracing_subscriber::registry().with(capture.clone()).init();
    let kit = securellm_testkit::Stack::new()
        .models(&["tiny"])
        .start()
        .await;
    let manager = kit.manager().manager.clone();

    // A request (its own span) that finds the model cold: resolve, lease wait and load are its
    // descendants, though the load runs in the instance actor's tasks.
    let request = tracing::info_span!("test.request");
    let (_, ticket) = manager
        .acquire(
            "tiny",
            false,
            &ModelSettings::default(),
            now_ms() + 60_000,
            None,
            None,
        )
        .instrument(request)
        .await
        .unwrap();
    drop(ticket);
    let resolve = capture.one("backend.resolve");
    assert_eq!(resolve.ancestors, ["test.request"], "{resolve:?}");
    assert_eq!(resolve.fields["gen_ai.request.model"], "tiny");
    assert!(!resolve.fields["backend.model_id"].is_empty());
    let lease = capture.one("backend.lease_wait");
    assert_eq!(lease.ancestors, ["test.request"], "{lease:?}");
    assert_eq!(lease.fields["gen_ai.request.model"], "tiny");
    assert!(lease.fields["backend.lease.bytes"].parse::<u64>().unwrap() > 0);
    assert!(!lease.fields.contains_key("error.type"), "{lease:?}");
    let load = capture.one("backend.load");
    assert_eq!(load.ancestors, ["test.request"], "{load:?}");
    assert_eq!(load.fields["backend.engine"], "llama.cpp");
    assert!(load.fields["backend.pid"].parse::<u32>().unwrap() > 0);
    // The registry's own estimate span saw the same model.
    let est = capture.one("registry.estimate");
    assert!(
        est.fields["registry.estimate.gpu_bytes"]
            .parse::<u64>()
            .unwrap()
            > 0
    );

    // The request's span closes when it ends (the actor does not hold it), and so do the load's.
    for _ in 0..100 {
        if capture.one("test.request").closed {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for name in ["test.request", "backend.lease_wait", "backend.load"] {
        assert!(capture.one(name).closed, "{name} is still open");
    }

    // A warm request: no second load.
    let (_, ticket) = manager
        .acquire(
            "tiny",
            false,
            &ModelSettings::default(),
            now_ms() + 60_000,
            None,
            None,
        )
        .instrument(tracing::info_span!("test.warm"))
        .await
        .unwrap();
    drop(ticket);
    assert_eq!(capture.named("backend.load").len(), 1);
    assert_eq!(capture.named("backend.lease_wait").len(), 1);

    // Forwards: the HTTP call to the engine with its status and the token usage.
    let mut client = kit.backend_client().await;
    client.chat(chat("tiny", 4)).await.unwrap();
    let fwd = capture.one("backend.forward");
    assert_eq!(fwd.fields["otel.kind"], "client");
    assert_eq!(fwd.fields["otel.name"], "POST /v1/chat/completions");
    assert_eq!(fwd.fields["gen_ai.request.model"], "tiny");
    assert_eq!(fwd.fields["gen_ai.operation.name"], "chat");
    assert_eq!(fwd.fields["http.response.status_code"], "200");
    assert_eq!(fwd.fields["gen_ai.usage.output_tokens"], "4");
    assert!(
        fwd.fields["gen_ai.usage.input_tokens"]
            .parse::<u32>()
            .unwrap()
            > 0
    );

    // A stream: the first token is an event in its forward span.
    let mut st = client
        .chat_stream(chat("tiny", 8))
        .await
        .unwrap()
        .into_inner();
    while let Some(c) = st.next().await {
        c.unwrap();
    }
    let fwds = capture.named("backend.forward");
    assert_eq!(fwds.len(), 2);
    assert_eq!(fwds[1].fields["backend.stream"], "true");
    assert_eq!(fwds[1].fields["gen_ai.usage.output_tokens"], "8");
    let firsts: Vec<Event> = capture
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.message == "first token")
        .cloned()
        .collect();
    assert_eq!(firsts.len(), 1, "{firsts:?}");
    assert_eq!(firsts[0].span, Some("backend.forward"));
    assert!(firsts[0].fields.contains_key("ttft_ms"));

    // A model nobody knows: the resolve span says why.
    assert!(client.chat(chat("no-such-model", 2)).await.is_err());
    let failed: Vec<Captured> = capture
        .named("backend.resolve")
        .into_iter()
        .filter(|s| s.fields["gen_ai.request.model"] == "no-such-model")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].fields["error.type"], "model_not_found");
}
