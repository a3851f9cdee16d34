//! The agent's authorization by role: a tower layer in front of every gRPC service. Calls on TLS
//! connections need a verified certificate whose role may call the method; calls on the unix
//! socket and loopback plain TCP carry no certificate and are not checked here.

use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use tonic::Status;
use tracing::info;

use crate::server::{ConnInfo, Peer};

#[derive(Debug, Clone, Copy, Default)]
pub struct AuthorizeLayer;

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
}

/// Why the call on a connection `info` to `path` is refused, if it is.
pub fn check(info: &ConnInfo, path: &str) -> Result<(), Status> {
    match &info.peer {
        Peer::Refused(why) => Err(Status::unauthenticated(why.clone())),
        Peer::Verified(role) => role
            .authorize(path)
            .map_err(|d| Status::permission_denied(d.to_string())),
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let verdict = req
            .extensions()
            .get::<ConnInfo>()
            .map_or(Ok(()), |info| check(info, req.uri().path()));
        match verdict {
            Ok(()) => Either::Left(self.inner.call(req)),
            Err(status) => {
                info!(method = req.uri().path(), "refused: {}", status.message());
                Either::Right(ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::Role;
    use tonic::Code;

    fn info(peer: Peer) -> ConnInfo {
        ConnInfo {
            remote: "127.0.0.1:1".parse().unwrap(),
            peer,
        }
    }

    #[test]
    fn refused_certificates_are_unauthenticated_with_the_reason() {
        let s = check(&info(Peer::Refused("expired".into())), "/x.Y/Z").unwrap_err();
        assert_eq!((s.code(), s.message()), (Code::Unauthenticated, "expired"));
    }

    #[test]
    fn wrong_roles_are_denied_naming_role_and_method() {
        let agent = info(Peer::Verified(Role::Agent("n1".into())));
        let delete = "/hypersdk.agent.v1.AgentService/DeleteVm";
        let s = check(&agent, delete).unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied);
        assert!(s.message().contains("hypersdk://agent/n1") && s.message().contains(delete));
        assert!(check(&agent, "/hypersdk.agent.v1.AgentService/PrepareIncoming").is_ok());
        let admin = info(Peer::Verified(Role::Admin("a".into())));
        assert!(check(&admin, delete).is_ok());
    }
}
