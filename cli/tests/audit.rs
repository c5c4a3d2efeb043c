//! `securellm audit verify` and `securellm audit gpu`, the built binary on a data directory laid
//! out as `make run` does, with a decision log written by a real in-process scheduler.

use std::path::Path;
use std::process::Output;

use vram_scheduler::config::{InventoryMode, SchedulerConfig};
use vram_scheduler::decisions::{self, DecisionKind};
use vram_scheduler::table::{AcquireOutcome, AcquireRequest, WaiterNotice};

const GIB: u64 = 1 << 30;
const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

fn cli(data_dir: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_securellm"))
        .env("SECURELLM_STACK_FILE", "/nonexistent/securellm-stack")
        .arg("audit")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn req(holder: &str, model: &str, bytes: u64, priority: i32) -> AcquireRequest {
    AcquireRequest {
        holder: holder.into(),
        label: model.into(),
        bytes,
        priority,
        gpu: None,
        ttl_ms: 60_000,
        wait_ms: 30_000,
    }
}

/// A scheduler in `<data>/scheduler` makes a grant, then evicts it for a traced request.
async fn make_decisions(data: &Path) {
    let s = vram_scheduler::start(&SchedulerConfig {
        listen: "127.0.0.1:0".into(),
        inventory: InventoryMode::Simulated,
        simulate_gpus: vec![securellm_common::ByteSize(24 * GIB)],
        data_dir: Some(data.join("scheduler")),
        ..SchedulerConfig::default()
    })
    .await
    .unwrap();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let AcquireOutcome::Granted(qwen) = s
        .handle
        .acquire(req("backend-manager", "qwen", 16 * GIB, 0), tx)
        .await
        .unwrap()
    else {
        panic!("qwen must be granted");
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let out = s
        .handle
        .acquire_traced(
            req("gateway-user", "llama", 12 * GIB, 10),
            Some(TRACE.into()),
            tx,
        )
        .await
        .unwrap();
    assert!(matches!(out, AcquireOutcome::Queued(_)), "{out:?}");
    s.handle.release(qwen.id).await.unwrap();
    loop {
        match rx.recv().await.unwrap() {
            WaiterNotice::Granted { .. } => break,
            WaiterNotice::Position(_) => {}
            WaiterNotice::TimedOut { .. } => panic!("llama timed out"),
        }
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_checks_the_gpu_decision_chain_and_gpu_shows_who_evicted_whom() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();

    // Nothing to verify at all is an error.
    let out = cli(data, &["verify"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no GPU decision log"),
        "{}",
        text(&out)
    );

    make_decisions(data).await;
    let path = data.join("scheduler").join(decisions::FILE_NAME);
    let rows = decisions::read_rows(&path).unwrap();

    let out = cli(data, &["verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout.contains("audit chain: no gateway audit log"),
        "a missing log is reported: {stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "GPU decision chain OK: {} rows verified",
            rows.len()
        )),
        "{stdout}"
    );

    let out = cli(data, &["gpu", "-n", "50"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout.lines().count(), rows.len(), "{stdout}");
    let notice = stdout
        .lines()
        .find(|l| l.contains(" eviction-notice "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        notice.contains(
            "holder backend-manager model qwen 16 GiB GPU0 prio 0 — for request: holder \
             gateway-user model llama prio 10 needs 12 GiB trace 0af7651916cd43dd8448eb211c80319c"
        ),
        "{notice}"
    );
    // The newest decision about llama: its grant.
    let out = cli(data, &["gpu", "-n", "1", "--model", "llama"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains(" granted ") && stdout.contains("model llama"),
        "{stdout}"
    );

    // Tampering: the evicted model's name in the notice is changed.
    let (i, notice_row) = rows
        .iter()
        .enumerate()
        .find(|(_, r)| r.decision.kind == DecisionKind::EvictionNotice)
        .unwrap();
    let text_before = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text_before.lines().map(str::to_string).collect();
    lines[i] = lines[i].replace("\"model\":\"qwen\"", "\"model\":\"phi\"");
    assert_ne!(lines[i], text_before.lines().nth(i).unwrap());
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let out = cli(data, &["verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stdout.contains(&format!(
            "GPU decision chain BROKEN at decision {} (line {}): edited",
            notice_row.seq,
            i + 1
        )),
        "{stdout}"
    );
    // `audit gpu` still shows the rows, and warns.
    let out = cli(data, &["gpu"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not verify"),
        "{}",
        text(&out)
    );
}
