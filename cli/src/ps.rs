//! `securellm ps` (like `ollama ps`), `securellm load NAME`, `securellm unload NAME`: the backend
//! manager's instances.

use securellm_client::{connect_to, instances};
use securellm_common::time::now_ms;
use securellm_proto::v1 as pb;
use securellm_proto::v1::backend_manager_client::BackendManagerClient;
use tonic::transport::Channel;

async fn connect(endpoint: &str) -> anyhow::Result<BackendManagerClient<Channel>> {
    Ok(BackendManagerClient::new(
        connect_to("backend manager", endpoint, None).await?,
    ))
}

pub async fn ps(endpoint: &str) -> anyhow::Result<()> {
    let mut c = connect(endpoint).await?;
    let l = c
        .list_instances(pb::ListInstancesRequest::default())
        .await?
        .into_inner();
    print!("{}", instances::render(&l.instances, now_ms()));
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
    println!("{}", instances::loaded(&i));
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
    println!("{}", instances::unloaded(model, &r));
    Ok(())
}
