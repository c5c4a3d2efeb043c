//! The backend manager's instances as text (`securellm ps` / `load` / `unload`, the MCP
//! `loaded_models` / `load_model` / `unload_model` tools).

use securellm_common::format_bytes;
use securellm_proto::v1 as pb;

use crate::age;

/// An instance state as a word.
pub fn state(s: i32) -> &'static str {
    match pb::InstanceState::try_from(s) {
        Ok(pb::InstanceState::Unloaded) => "unloaded",
        Ok(pb::InstanceState::Leasing) => "leasing",
        Ok(pb::InstanceState::Starting) => "starting",
        Ok(pb::InstanceState::Ready) => "ready",
        Ok(pb::InstanceState::Busy) => "busy",
        Ok(pb::InstanceState::Draining) => "draining",
        Ok(pb::InstanceState::Stopped) => "stopped",
        Ok(pb::InstanceState::Failed) => "failed",
        _ => "?",
    }
}

/// The instance table (like `ollama ps`); `now` (unix ms) for idle times.
pub fn render(instances: &[pb::BackendInstance], now: u64) -> String {
    if instances.is_empty() {
        return "no models loaded\n".into();
    }
    let mut out = format!(
        "{:<28} {:<9} {:>4} {:>10} {:>10} {:>6} {:>7} {:>8} {:>6}\n",
        "NAME", "STATE", "GPU", "LEASE", "MEASURED", "PID", "IN-FL", "IDLE", "CRASH"
    );
    for i in instances {
        let idle = if i.in_flight == 0 && i.last_used_ms > 0 && i.pid > 0 {
            age(now.saturating_sub(i.last_used_ms))
        } else {
            "-".into()
        };
        out += &format!(
            "{:<28} {:<9} {:>4} {:>10} {:>10} {:>6} {:>7} {:>8} {:>6}\n",
            i.id,
            state(i.state),
            i.gpu_index.map_or("-".into(), |g| g.to_string()),
            if i.lease_bytes > 0 {
                format_bytes(i.lease_bytes)
            } else {
                "-".into()
            },
            i.measured_bytes.map_or("-".into(), format_bytes),
            if i.pid > 0 {
                i.pid.to_string()
            } else {
                "-".into()
            },
            i.in_flight,
            idle,
            i.crash_count
        );
        if i.waiting > 0 {
            let why = i.load_progress.as_ref().map_or(String::new(), |p| {
                let mut t = progress(p);
                t.insert_str(0, ": ");
                t
            });
            out += &format!("  {} request(s) waiting{why}\n", i.waiting);
        }
        if !i.last_error.is_empty() && i.state == pb::InstanceState::Failed as i32 {
            out += &format!(
                "  last error: {}\n",
                i.last_error.lines().next().unwrap_or("")
            );
        }
    }
    out
}

/// What a `Load` answered, as one line.
pub fn loaded(i: &pb::BackendInstance) -> String {
    format!(
        "{} {} on {} (pid {})",
        i.model_name,
        state(i.state),
        i.endpoint,
        i.pid
    )
}

/// What an `Unload` answered, as one line.
pub fn unloaded(model: &str, r: &pb::UnloadResponse) -> String {
    if r.was_loaded {
        format!("{model} unloaded")
    } else {
        format!("{model} was not loaded")
    }
}

/// Where a request that waits for its model stands, in words.
pub fn progress(p: &pb::LoadProgress) -> String {
    use pb::load_progress::Phase;
    match Phase::try_from(p.phase).unwrap_or(Phase::Unspecified) {
        Phase::Queued => format!(
            "queued for GPU memory, position {} of {}{}",
            p.position + 1,
            p.queue_length.max(p.position + 1),
            if p.evictions_requested {
                " (other models asked to make room)"
            } else {
                ""
            }
        ),
        Phase::Unloading => "waiting for the previous process to stop".into(),
        Phase::Leasing => "asking for GPU memory".into(),
        Phase::Starting => "starting the engine".into(),
        Phase::Ready => "ready".into(),
        Phase::Unspecified => "waiting".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_state_memory_and_idle_time() {
        let i = pb::BackendInstance {
            id: "tiny-abc".into(),
            state: pb::InstanceState::Ready as i32,
            gpu_index: Some(0),
            lease_bytes: 6 << 20,
            measured_bytes: Some(6 << 20),
            pid: 42,
            last_used_ms: 1_000,
            ..Default::default()
        };
        let s = render(&[i], 91_000);
        assert!(
            s.contains("tiny-abc")
                && s.contains("ready")
                && s.contains("6 MiB")
                && s.contains("1m"),
            "{s}"
        );
        assert_eq!(render(&[], 0), "no models loaded\n");
    }

    #[test]
    fn waiting_requests_say_where_they_stand() {
        let i = pb::BackendInstance {
            id: "model-b".into(),
            state: pb::InstanceState::Leasing as i32,
            waiting: 2,
            load_progress: Some(pb::LoadProgress {
                phase: pb::load_progress::Phase::Queued as i32,
                model: "model-b".into(),
                position: 0,
                queue_length: 1,
                evictions_requested: true,
            }),
            ..Default::default()
        };
        let s = render(&[i], 0);
        assert!(
            s.contains(
                "2 request(s) waiting: queued for GPU memory, position 1 of 1 (other models asked to make room)"
            ),
            "{s}"
        );
        let p = pb::LoadProgress {
            phase: pb::load_progress::Phase::Starting as i32,
            ..Default::default()
        };
        assert_eq!(progress(&p), "starting the engine");
    }

    #[test]
    fn load_and_unload_lines() {
        let i = pb::BackendInstance {
            model_name: "tiny".into(),
            state: pb::InstanceState::Ready as i32,
            endpoint: "http://127.0.0.1:9".into(),
            pid: 7,
            ..Default::default()
        };
        assert_eq!(loaded(&i), "tiny ready on http://127.0.0.1:9 (pid 7)");
        let r = pb::UnloadResponse {
            was_loaded: false,
            ..Default::default()
        };
        assert_eq!(unloaded("tiny", &r), "tiny was not loaded");
    }
}
