//! The one vocabulary of actions. `Action` is generic over how it names services,
//! prefixes and versions: the plan format names them as a person and the provider do
//! (`Action`, the default), the rules by small indexes into their compact state
//! (`rules::Op`). Everything that depends only on the kind of action (its name in the
//! plan format, its risk, its one-line summary) is defined here, once; `try_map`
//! translates between the two namings. Adding an op: a variant here (and its line in
//! `op_name`, `risk`, `service`, `try_map` and `Display`), its precondition and effect in `rules.rs`, its reason
//! in `plan::reason`, and its call in `apply::run`.

use serde::{Deserialize, Serialize};

use crate::model::{Major, Prefix, ServiceId};

/// One action. As plan format 1 writes it with the default parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action<S = ServiceId, P = Prefix, V = Major> {
    /// A new service at `version` under `prefix`; `service` is the name the plan gives it
    /// (`+1`, `+2`, …) until the provider gives it an id.
    Add {
        service: S,
        prefix: P,
        version: V,
    },
    Provision {
        service: S,
    },
    Fence {
        service: S,
    },
    Unfence {
        service: S,
    },
    Backup {
        service: S,
    },
    Restore {
        service: S,
        from: S,
    },
    /// Logical strategy: copy the schema, subscribe, wait for the initial copy; the copy
    /// then streams every change of `from` until `CatchUp`.
    Replicate {
        service: S,
        from: S,
    },
    /// With the source quiet, wait until the copy holds every change, then end the
    /// subscription: the copy is as complete as its source.
    CatchUp {
        service: S,
    },
    /// pg_upgrade strategy: with the source quiet, upgrade its data directory into the
    /// provisioned `service`: the copy is as complete as its source.
    Upgrade {
        service: S,
        from: S,
    },
    Verify {
        service: S,
        against: S,
    },
    Rename {
        service: S,
        to: P,
    },
    Detach {
        service: S,
    },
    Deploy,
    Delete {
        service: S,
    },
}

/// What makes an action risky for the application.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Risk {
    /// The application cannot write to this database until the deploy.
    BlocksWrites,
    /// A database server and its data are removed.
    DeletesService,
    /// The application's view of its databases changes.
    Cutover,
    /// The source's files become the copy's: the old server can never start again.
    ConsumesSource,
}

impl<S, P, V> Action<S, P, V> {
    /// The action's `op` in the plan format.
    pub fn op_name(&self) -> &'static str {
        match self {
            Action::Add { .. } => "add",
            Action::Provision { .. } => "provision",
            Action::Fence { .. } => "fence",
            Action::Unfence { .. } => "unfence",
            Action::Backup { .. } => "backup",
            Action::Restore { .. } => "restore",
            Action::Replicate { .. } => "replicate",
            Action::CatchUp { .. } => "catch_up",
            Action::Upgrade { .. } => "upgrade",
            Action::Verify { .. } => "verify",
            Action::Rename { .. } => "rename",
            Action::Detach { .. } => "detach",
            Action::Deploy => "deploy",
            Action::Delete { .. } => "delete",
        }
    }

    /// What the action risks for the application, whatever the state it runs in.
    pub fn risk(&self) -> Option<Risk> {
        match self {
            Action::Fence { .. } => Some(Risk::BlocksWrites),
            Action::Delete { .. } => Some(Risk::DeletesService),
            Action::Deploy => Some(Risk::Cutover),
            _ => None,
        }
    }

    /// The service the action works on (none for a deploy, which works on the
    /// environment).
    pub fn service(&self) -> Option<&S> {
        match self {
            Action::Add { service, .. }
            | Action::Provision { service }
            | Action::Fence { service }
            | Action::Unfence { service }
            | Action::Backup { service }
            | Action::Restore { service, .. }
            | Action::Replicate { service, .. }
            | Action::CatchUp { service }
            | Action::Upgrade { service, .. }
            | Action::Verify { service, .. }
            | Action::Rename { service, .. }
            | Action::Detach { service }
            | Action::Delete { service } => Some(service),
            Action::Deploy => None,
        }
    }

    /// The same action with its names translated; the first failing translation is the
    /// error.
    pub fn try_map<S2, P2, V2, E>(
        &self,
        mut service: impl FnMut(&S) -> Result<S2, E>,
        mut prefix: impl FnMut(&P) -> Result<P2, E>,
        version: impl FnOnce(&V) -> Result<V2, E>,
    ) -> Result<Action<S2, P2, V2>, E> {
        Ok(match self {
            Action::Add { service: s, prefix: p, version: v } => {
                Action::Add { service: service(s)?, prefix: prefix(p)?, version: version(v)? }
            }
            Action::Provision { service: s } => Action::Provision { service: service(s)? },
            Action::Fence { service: s } => Action::Fence { service: service(s)? },
            Action::Unfence { service: s } => Action::Unfence { service: service(s)? },
            Action::Backup { service: s } => Action::Backup { service: service(s)? },
            Action::Restore { service: s, from } => Action::Restore { service: service(s)?, from: service(from)? },
            Action::Replicate { service: s, from } => Action::Replicate { service: service(s)?, from: service(from)? },
            Action::CatchUp { service: s } => Action::CatchUp { service: service(s)? },
            Action::Upgrade { service: s, from } => Action::Upgrade { service: service(s)?, from: service(from)? },
            Action::Verify { service: s, against } => {
                Action::Verify { service: service(s)?, against: service(against)? }
            }
            Action::Rename { service: s, to } => Action::Rename { service: service(s)?, to: prefix(to)? },
            Action::Detach { service: s } => Action::Detach { service: service(s)? },
            Action::Deploy => Action::Deploy,
            Action::Delete { service: s } => Action::Delete { service: service(s)? },
        })
    }
}

impl Action {
    /// For an add, the name the added service has in the plan (`+1`), which stands in for
    /// the id it gets only when it is added: what a replay of the plan passes to
    /// `Prediction::advance`.
    pub fn stand_in(&self) -> Option<ServiceId> {
        match self {
            Action::Add { service, .. } => Some(service.clone()),
            _ => None,
        }
    }
}

/// The compact form of an action, for people: `rename svc-1 → OLD`.
impl<S: std::fmt::Display, P: std::fmt::Display, V: std::fmt::Display> std::fmt::Display for Action<S, P, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Add { service, prefix, version } => write!(f, "add {service} as {prefix} (PostgreSQL {version})"),
            Action::Provision { service } => write!(f, "provision {service}"),
            Action::Fence { service } => write!(f, "fence {service}"),
            Action::Unfence { service } => write!(f, "unfence {service}"),
            Action::Backup { service } => write!(f, "backup {service}"),
            Action::Restore { service, from } => write!(f, "restore {service} from {from}"),
            Action::Replicate { service, from } => write!(f, "replicate {service} from {from}"),
            Action::CatchUp { service } => write!(f, "catch up {service}"),
            Action::Upgrade { service, from } => write!(f, "upgrade {service} from {from}"),
            Action::Verify { service, against } => write!(f, "verify {service} against {against}"),
            Action::Rename { service, to } => write!(f, "rename {service} → {to}"),
            Action::Detach { service } => write!(f, "detach {service}"),
            Action::Deploy => write!(f, "deploy"),
            Action::Delete { service } => write!(f, "delete {service}"),
        }
    }
}
