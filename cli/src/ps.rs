//! `securellm ps` (like `ollama ps`), `securellm load NAME`, `securellm unload NAME`: the backend
//! manager's instances.

use securellm_client::{connect_internal, instances};
use securellm_common::internal_auth::{AuthChannel, InternalToken};
use securellm_common::time::now_ms;
use securellm_proto::v1 as pb;
use securellm_proto::v1::backend_manager_client::BackendManagerClient;

async fn connect(
    endpoint: &str,
    token: &InternalToken,
) -> anyhow::Result<BackendManagerClient<AuthChannel>> {
    Ok(BackendManagerClient::new(
        connect_internal("backend manager", endpoint, Some(token), None).await?,
    ))
}

pub async fn ps(endpoint: &str, token: &InternalToken) -> anyhow::Result<()> {
    let mut c = connect(endpoint, token).await?;
    let l = c
        .list_instances(pb::ListInstancesRequest::default())
        .await?
        .into_inner();
    print!("{}", instances::render(&l.instances, now_ms()));
    Ok(())
}

pub async fn load(endpoint: &str, token: &InternalToken, model: &str) -> anyhow::Result<()> {
    let mut c = connect(endpoint, token).await?;
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

pub async fn unload(endpoint: &str, token: &InternalToken, model: &str) -> anyhow::Result<()> {
    let mut c = connect(endpoint, token).await?;
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
