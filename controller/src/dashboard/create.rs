//! Actions of the page: the object is created through the API, as `kubectl apply` of a hand-written
//! manifest would, so admission, validation and history apply to it.

use kube::api::{Api, DynamicObject, PostParams};
use kube::core::ApiResource;
use tracing::{info, instrument};

use super::{Action, ActionError};
use crate::crd::{VMOperation, VMSnapshot};
use crate::standalone::api_message;

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Action(#[from] ActionError),
    /// Refused by the API (validation, a name taken, RBAC): its message names the field.
    #[error("{}", api_message(.0))]
    Api(#[source] kube::Error),
}

/// Creates the object of `action`; returns its kind and name.
#[instrument(skip_all, fields(vm = action.vm()))]
pub async fn create(
    client: &kube::Client,
    action: &Action,
) -> Result<(String, String), CreateError> {
    let suffix = format!("{:x}", unique());
    let doc = action.object(&suffix)?;
    let ar = match action {
        Action::Operation { .. } => ApiResource::erase::<VMOperation>(&()),
        Action::Snapshot { .. } => ApiResource::erase::<VMSnapshot>(&()),
    };
    let obj: DynamicObject = serde_json::from_value(doc).expect("built from a JSON object");
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), action.namespace(), &ar);
    let made = api
        .create(&PostParams::default(), &obj)
        .await
        .map_err(CreateError::Api)?;
    let name = made.metadata.name.unwrap_or_default();
    info!(kind = ar.kind, name, "created from the dashboard");
    Ok((ar.kind, name))
}

/// Milliseconds since the epoch: two clicks on one VM a millisecond apart are not a concern.
fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}
