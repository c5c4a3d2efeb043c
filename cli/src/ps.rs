//! `securellm ps` (like `ollama ps`), `securellm load NAME`, `securellm unload NAME`: the backend
//! manager's instances.

use anyhow::Context;
use securellm_common::format_bytes;
use securellm_common::time::now_ms;
use securellm_proto::v1 as pb;
use securellm_proto::v1::backend_manager_client::BackendManagerClient;
use tonic::transport::Channel;

async fn connect(endpoint: &str) -> anyhow::Result<BackendManagerClient<Channel>> {
    BackendManagerClient::connect(endpoint.to_string())
        .await
        .with_context(|| format!("cannot reach the backend manager at {endpoint}"))
}

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

fn ago(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m", s / 60)
    } else {
        format!("{}h", s / 3600)
    }
}

/// The instance table.
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
            ago(now.saturating_sub(i.last_used_ms))
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
        if !i.last_error.is_empty() && i.state == pb::InstanceState::Failed as i32 {
            out += &format!(
                "  last error: {}\n",
                i.last_error.lines().next().unwrap_or("")
            );
        }
    }
    out
}

pub async fn ps(endpoint: &str) -> anyhow::Result<()> {
    let mut c = connect(endpoint).await?;
    let l = c
        .list_instances(pb::ListInstancesRequest::default())
        .await?
        .into_inner();
    print!("{}", render(&l.instances, now_ms()));
    Ok(())
}

pub async fn load(endpoint: &str, model: &str) -> anyhow::Result<()> {
    let mut c = connect(endpoint).await?;
    let i = c
        .load(pb::LoadRequest {
            model: model.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    println!(
        "{} {} on {} (pid {})",
        i.model_name,
        state(i.state),
        i.endpoint,
        i.pid
    );
    Ok(())
}

pub async fn unload(endpoint: &str, model: &str) -> anyhow::Result<()> {
    let mut c = connect(endpoint).await?;
    let r = c
        .unload(pb::UnloadRequest {
            model: model.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    println!(
        "{}",
        if r.was_loaded {
            format!("{model} unloaded")
        } else {
            format!("{model} was not loaded")
        }
    );
    Ok(())
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
}
