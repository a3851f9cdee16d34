//! Who a certificate speaks for, and what each role may call on an agent.
//!
//! The role is a URI subject alternative name `hypersdk://ROLE/NAME`: `hypersdk://agent/node-1`
//! (the agent of node `node-1`), `hypersdk://controller/NAME`, `hypersdk://admin/NAME`.

use std::fmt;

/// The URI scheme of role names in certificates.
pub const SCHEME: &str = "hypersdk://";

/// gRPC service whose methods agents authorize.
const AGENT_SERVICE: &str = "/hypersdk.agent.v1.AgentService/";

/// What another agent may call: the target side of a live migration, and GetVm, with which the
/// source checks that the target still holds the incoming VM.
const MIGRATION_METHODS: [&str; 4] = [
    "PrepareIncoming",
    "FinishIncoming",
    "AbortIncoming",
    "GetVm",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Controller(String),
    /// The agent of a node, by node name.
    Agent(String),
    Admin(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    #[error("{0:?}: a role is agent, controller or admin")]
    UnknownRole(String),
    #[error("{0:?}: expected hypersdk://ROLE/NAME")]
    Malformed(String),
    #[error("no hypersdk://ROLE/NAME subject alternative name")]
    Missing,
    #[error("name {0:?}: letters, digits, '.', '_' and '-' only")]
    BadName(String),
}

/// A call refused by role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("role {role} may not call {method}: agents may call only {}", MIGRATION_METHODS.join(", "))]
pub struct Denied {
    pub role: Role,
    pub method: String,
}

impl Role {
    /// A role from its kind (`agent`, `controller`, `admin`) and name.
    pub fn new(kind: &str, name: &str) -> Result<Role, RoleError> {
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !valid {
            return Err(RoleError::BadName(name.to_string()));
        }
        let name = name.to_string();
        Ok(match kind {
            "agent" => Role::Agent(name),
            "controller" => Role::Controller(name),
            "admin" => Role::Admin(name),
            other => return Err(RoleError::UnknownRole(other.to_string())),
        })
    }

    /// The role a `hypersdk://ROLE/NAME` URI names.
    pub fn from_uri(uri: &str) -> Result<Role, RoleError> {
        let malformed = || RoleError::Malformed(uri.to_string());
        let rest = uri.strip_prefix(SCHEME).ok_or_else(malformed)?;
        let (kind, name) = rest.split_once('/').ok_or_else(malformed)?;
        Role::new(kind, name)
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Role::Controller(_) => "controller",
            Role::Agent(_) => "agent",
            Role::Admin(_) => "admin",
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Role::Controller(n) | Role::Agent(n) | Role::Admin(n) => n,
        }
    }

    pub fn uri(&self) -> String {
        format!("{SCHEME}{}/{}", self.kind(), self.name())
    }

    /// Whether this role may call the gRPC method at `path` (`/package.Service/Method`).
    /// Admin and controller may call everything; an agent only the migration methods.
    pub fn authorize(&self, path: &str) -> Result<(), Denied> {
        let allowed = match self {
            Role::Controller(_) | Role::Admin(_) => true,
            Role::Agent(_) => path
                .strip_prefix(AGENT_SERVICE)
                .is_some_and(|m| MIGRATION_METHODS.contains(&m)),
        };
        if allowed {
            return Ok(());
        }
        Err(Denied {
            role: self.clone(),
            method: path.to_string(),
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_their_uri() {
        for role in [
            Role::Agent("node-1".into()),
            Role::Controller("ctl".into()),
            Role::Admin("alice".into()),
        ] {
            assert_eq!(Role::from_uri(&role.uri()), Ok(role));
        }
        assert_eq!(Role::Agent("n1".into()).uri(), "hypersdk://agent/n1");
    }

    #[test]
    fn bad_role_uris_name_what_is_wrong() {
        assert_eq!(
            Role::from_uri("hypersdk://root/x"),
            Err(RoleError::UnknownRole("root".into()))
        );
        assert!(matches!(
            Role::from_uri("spiffe://agent/x"),
            Err(RoleError::Malformed(_))
        ));
        assert!(matches!(
            Role::from_uri("hypersdk://agent"),
            Err(RoleError::Malformed(_))
        ));
        for name in ["", "a/b", "a b"] {
            assert_eq!(
                Role::new("agent", name),
                Err(RoleError::BadName(name.into()))
            );
        }
    }

    #[test]
    fn agents_may_call_only_the_migration_methods() {
        let agent = Role::Agent("n1".into());
        for m in [
            "PrepareIncoming",
            "FinishIncoming",
            "AbortIncoming",
            "GetVm",
        ] {
            assert!(
                agent.authorize(&format!("{AGENT_SERVICE}{m}")).is_ok(),
                "{m}"
            );
        }
        for path in [
            "/hypersdk.agent.v1.AgentService/DeleteVm",
            "/hypersdk.agent.v1.AgentService/MigrateVm",
            "/grpc.health.v1.Health/Check",
            "/other.Service/PrepareIncoming",
        ] {
            let denied = agent.authorize(path).unwrap_err();
            assert_eq!(denied.method, path);
            assert!(
                denied.to_string().contains("hypersdk://agent/n1"),
                "{denied}"
            );
        }
    }

    #[test]
    fn admin_and_controller_may_call_everything() {
        for role in [Role::Admin("a".into()), Role::Controller("c".into())] {
            assert!(
                role.authorize("/hypersdk.agent.v1.AgentService/DeleteVm")
                    .is_ok()
            );
            assert!(role.authorize("/grpc.health.v1.Health/Check").is_ok());
        }
    }
}
