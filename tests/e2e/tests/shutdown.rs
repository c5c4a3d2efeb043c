//! Scenario 6: graceful shutdown. SIGTERM to all four services at once: each exits with status 0
//! within a few seconds, and no process of the stack (llama-server children included) is left in
//! the process table; the audit log was flushed and verifies.

use std::time::Duration;

use securellm_e2e::{Stack, in_process_table, processes_mentioning, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_all_four_leaves_no_process_behind() {
    let mut s = Stack::start(Default::default()).await;
    // Three llama-server children: tiny, tiny's embeddings instance, other.
    assert_eq!(s.chat(&s.api_key, "tiny", 2, "down-1").await.status, 200);
    assert_eq!(s.chat(&s.api_key, "other", 2, "down-2").await.status, 200);
    let r = s
        .post(
            &s.api_key,
            "embeddings",
            "down-3",
            serde_json::json!({"model": "tiny", "input": "hello"}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let children: Vec<u32> = s.instances().await.iter().map(|i| i.pid).collect();
    assert_eq!(children.len(), 3);
    let pids = s.pids();
    for c in &children {
        assert!(
            pids.contains(c),
            "llama-server {c} is a child of the manager"
        );
    }
    assert_eq!(
        pids.len(),
        4 + 3,
        "four services and three children: {pids:?}"
    );
    let root = s.root().to_str().unwrap().to_string();
    assert!(processes_mentioning(&root).len() >= 7);

    // All four at once.
    for svc in [&s.gateway, &s.backend, &s.registry, &s.scheduler] {
        svc.sigterm();
    }
    for svc in [
        &mut s.gateway,
        &mut s.backend,
        &mut s.registry,
        &mut s.scheduler,
    ] {
        let st = svc
            .wait_exit(Duration::from_secs(15))
            .await
            .unwrap_or_else(|| panic!("{} did not stop within 15 s of SIGTERM", svc.name));
        assert!(st.success(), "{} exited with {st}", svc.name);
    }
    // Nothing left: not running, not a zombie.
    wait_until(
        "every process of the stack gone from the process table",
        Duration::from_secs(5),
        || async { pids.iter().all(|p| !in_process_table(*p)).then_some(()) },
    )
    .await;
    let left = processes_mentioning(&root);
    assert!(left.is_empty(), "left behind: {left:?}");

    // The audit log was flushed on the way out: every request is in the verified chain.
    let data = s.gateway_data();
    let out = s.cli(&["audit", "--data-dir", data.to_str().unwrap(), "verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let n: u64 = stdout
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(n >= 3, "{stdout}");
}
