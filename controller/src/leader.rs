//! Leader election over a coordination.k8s.io Lease, so that of several controller replicas only
//! one reconciles. The decision is pure ([`decide`]); [`Elector`] does the API calls.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tracing::{info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Ours already: renew it.
    Renew,
    /// Free or expired: take it.
    Take,
    /// Someone else holds it.
    Wait,
}

/// What `identity` may do with `lease` at `now`.
pub fn decide(lease: &LeaseSpec, identity: &str, now: Timestamp) -> Decision {
    if lease.holder_identity.as_deref() == Some(identity) {
        return Decision::Renew;
    }
    let duration = SignedDuration::from_secs(lease.lease_duration_seconds.unwrap_or(15) as i64);
    let expired = match (&lease.holder_identity, &lease.renew_time) {
        (None, _) | (_, None) => true,
        (Some(_), Some(renewed)) => renewed
            .0
            .checked_add(duration)
            .is_ok_and(|until| until < now),
    };
    if expired {
        Decision::Take
    } else {
        Decision::Wait
    }
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    owner: Option<OwnerReference>,
}

impl Elector {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
            owner: None,
        }
    }

    /// The owner the Lease gets when this replica creates it.
    pub fn with_owner(mut self, owner: Option<OwnerReference>) -> Self {
        self.owner = owner;
        self
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) -> Result<(), kube::Error> {
        loop {
            if self.try_hold().await? {
                info!(lease = self.name, identity = self.identity, "leading");
                return Ok(());
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// Renews the lease until that fails; returns when leadership is lost.
    pub async fn hold(&self) {
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_hold().await {
                Ok(true) => {}
                Ok(false) => {
                    warn!(lease = self.name, "another replica took the lease");
                    return;
                }
                Err(e) => {
                    warn!(lease = self.name, error = %e, "renewing the lease failed");
                    return;
                }
            }
        }
    }

    /// One attempt: true when this replica holds the lease afterwards. Conflicts (another
    /// replica wrote first) are a lost race, not an error.
    async fn try_hold(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let existing = self.api.get_opt(&self.name).await?;
        let mut lease = existing.clone().unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                owner_references: self.owner.clone().map(|o| vec![o]),
                ..Default::default()
            },
            spec: Some(LeaseSpec::default()),
        });
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        match decide(spec, &self.identity, now) {
            Decision::Wait => return Ok(false),
            Decision::Take => {
                spec.holder_identity = Some(self.identity.clone());
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions =
                    Some(spec.lease_transitions.unwrap_or(0) + existing.is_some() as i32);
            }
            Decision::Renew => {}
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(self.duration.as_secs() as i32);
        let written = match existing {
            None => self.api.create(&PostParams::default(), &lease).await,
            Some(_) => {
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed_secs_ago: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            renew_time: Some(MicroTime(
                Timestamp::now() - SignedDuration::from_secs(renewed_secs_ago),
            )),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }
    }

    #[test]
    fn takes_only_free_or_expired_leases() {
        let now = Timestamp::now();
        assert_eq!(decide(&lease(Some("me"), 100), "me", now), Decision::Renew);
        assert_eq!(decide(&lease(Some("other"), 1), "me", now), Decision::Wait);
        assert_eq!(decide(&lease(Some("other"), 20), "me", now), Decision::Take);
        assert_eq!(decide(&lease(None, 1), "me", now), Decision::Take);
    }
}
