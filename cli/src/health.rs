//! `securellm health ADDR [--service NAME]`: a gRPC health check (exit 0 when SERVING), for
//! container healthchecks and scripts.

use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub async fn run(endpoint: &str, service: &str) -> anyhow::Result<()> {
    let ch = tonic::transport::Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("{endpoint}: cannot connect: {e}"))?;
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{endpoint}: {}", s.message()))?
        .into_inner();
    let status = ServingStatus::try_from(r.status).unwrap_or(ServingStatus::Unknown);
    anyhow::ensure!(
        status == ServingStatus::Serving,
        "{endpoint}: {}",
        status.as_str_name()
    );
    println!("{endpoint}: SERVING");
    Ok(())
}
