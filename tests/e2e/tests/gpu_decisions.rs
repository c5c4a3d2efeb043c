//! "Who evicted my model, and why?" with the four real binaries: on a GPU that holds one of two
//! models, a chat request to the second model evicts the first; the scheduler's decision log names
//! the eviction's cause (the requesting model, its priority and bytes; with trace export on, the
//! caller's trace id too), `securellm audit gpu` shows it as a readable line, and
//! `securellm audit verify` checks both chains (the gateway's and the scheduler's).

use securellm_e2e::{ModelSpec, Options, Stack};
use securellm_testkit::otlp::OtlpReceiver;

const TRACE_ID: &str = "5bf92f3577b34da6a3ce929d0e0e4737";

fn stdout(o: &std::process::Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A full GPU (two models that fit alone, not together); model-a loaded, then a chat request to
/// model-b (with a caller's `traceparent`) makes model-a yield. Returns the `audit gpu` line of
/// model-a's eviction notice, after checking the rest of the story and both chains.
async fn swap_and_read_the_notice(env: Vec<(String, String)>) -> String {
    let s = Stack::start(Options {
        models: vec![ModelSpec::tiny("model-a"), ModelSpec::tiny("model-b")],
        gpus: vec!["6MiB".into()],
        idle_ttl_ms: 300_000,
        env,
        ..Default::default()
    })
    .await;
    let r = s.chat(&s.api_key, "model-a", 4, "load-a").await;
    assert_eq!(r.status, 200, "{r:?}");
    let tp = format!("00-{TRACE_ID}-00f067aa0ba902b7-01");
    let r = s
        .chat_with_headers(&s.api_key, "model-b", 4, "swap-b", &[("traceparent", &tp)])
        .await;
    assert_eq!(r.status, 200, "{r:?}");

    let data = s.root().to_str().unwrap().to_string();
    let out = s.cli(&["audit", "--data-dir", &data, "gpu", "-n", "100"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    let notice = text
        .lines()
        .find(|l| l.contains(" eviction-notice ") && l.contains("model model-a"))
        .unwrap_or_else(|| panic!("no eviction notice for model-a:\n{text}"))
        .to_string();
    assert!(
        notice.contains("holder backend-manager model model-a")
            && notice.contains("— for request: holder backend-manager model model-b prio 0 needs"),
        "the notice names the request that caused it: {notice}\n{text}"
    );
    // The story in order: a's grant, its notice, its release (for b), b's grant.
    let at = |what: &str, model: &str| {
        text.lines()
            .position(|l| l.contains(what) && l.contains(&format!("model {model}")))
            .unwrap_or_else(|| panic!("no {what} of {model}:\n{text}"))
    };
    assert!(
        at(" granted ", "model-a") < at(" eviction-notice ", "model-a")
            && at(" eviction-notice ", "model-a") < at(" released ", "model-a")
            && at(" released ", "model-a") < at(" granted ", "model-b"),
        "{text}"
    );

    let out = s.cli(&["audit", "--data-dir", &data, "verify"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("audit chain OK") && text.contains("GPU decision chain OK"),
        "{text}"
    );
    notice
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_is_in_the_decision_chain_with_the_request_that_caused_it() {
    let notice = swap_and_read_the_notice(Vec::new()).await;
    // Export off: the services do not carry a trace between them, so no trace id is claimed.
    assert!(!notice.contains(" trace "), "{notice}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_trace_export_on_the_eviction_names_the_callers_trace() {
    let rx = OtlpReceiver::start().await;
    let env = vec![("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), rx.endpoint())];
    let notice = swap_and_read_the_notice(env).await;
    assert!(notice.contains(&format!(" trace {TRACE_ID}")), "{notice}");
}
