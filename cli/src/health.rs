//! `securellm health ADDR [--service NAME]`: a gRPC health check (exit 0 when SERVING), for
//! container healthchecks and scripts. [`check`] is shared with `securellm status`.

use std::time::Duration;

use securellm_client::connect;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// `grpc.health.v1.Health/Check` for `service` ("" = the server as a whole).
pub async fn check(channel: Channel, service: &str) -> Result<ServingStatus, tonic::Status> {
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await?
        .into_inner();
    Ok(ServingStatus::try_from(r.status).unwrap_or(ServingStatus::Unknown))
}

pub async fn run(endpoint: &str, service: &str) -> anyhow::Result<()> {
    let ch = connect(
        endpoint,
        Duration::from_secs(2),
        Some(Duration::from_secs(3)),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{endpoint}: cannot connect: {e}"))?;
    let status = check(ch, service)
        .await
        .map_err(|s| anyhow::anyhow!("{endpoint}: {}", s.message()))?;
    anyhow::ensure!(
        status == ServingStatus::Serving,
        "{endpoint}: {}",
        status.as_str_name()
    );
    println!("{endpoint}: SERVING");
    Ok(())
}
