//! Providers: where the services live. Every side effect of `apply` goes through the
//! `Provider` trait: one method to observe, one per action of the rules.

pub mod divio;
pub mod local;

use std::path::{Path, PathBuf};

use crate::config::{Transfer, Verify};
use crate::model::{EnvLive, EnvName, Live, Major, Prefix, ServiceId};
use crate::plan::Plan;

/// Why a provider could not observe or act.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Another apply holds the lock.
    #[error("another apply is running: {holder}")]
    Locked { holder: String },
    /// A service, file or server is not what the provider's records say.
    #[error("{0}")]
    Inconsistent(String),
    /// An action failed; the message says how.
    #[error("{0}")]
    Failed(String),
    /// The state database (`state.postgres`) failed.
    #[error(transparent)]
    State(#[from] crate::state::Error),
    /// The local provider's work on this machine failed, by kind (boxed: every result
    /// of the provider carries this type).
    #[error(transparent)]
    Local(Box<local::error::Error>),
    /// The provider cannot carry out what was asked; nothing was done.
    #[error("{0}")]
    Refused(String),
    /// The provider's API cannot do this action: a person does it by hand, then applies
    /// again. Made by `ProviderError::manual`.
    #[error("{0}")]
    Manual(String),
}

impl ProviderError {
    /// `why` the API could not, and the `step` that does it by hand.
    pub fn manual(why: &str, step: &str) -> ProviderError {
        ProviderError::Manual(format!(
            "the API cannot do this ({why}); do it by hand in the Control Panel: {step}, then run `pgconverge apply` again"
        ))
    }
}

impl<E: Into<local::error::Error>> From<E> for ProviderError {
    fn from(e: E) -> Self {
        ProviderError::Local(Box::new(e.into()))
    }
}

pub type Result<T> = std::result::Result<T, ProviderError>;

/// A backup as the provider that took it finds it again. `backup` returns one and
/// `restore` takes it: apply keeps it from the one to the other, and the rules restore
/// only from a backup taken earlier in the same plan (`plan::rules::Svc::backup`), so a
/// backup never outlives the apply that took it as far as the rules are concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backup {
    /// The service it is a backup of.
    pub of: ServiceId,
    /// Where the provider keeps it (a path, an id on the platform); only the provider that
    /// made it reads it.
    pub handle: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// The live services and the operations of the action rules, and what apply asks of a
/// provider around them, in this order: `preflight`, then (with the lock held) `recover`,
/// `observe`, `recover_observed`, `check`, and the actions, each followed by `settle`.
pub trait Provider {
    /// Where the lock and the provider's records live, unless a state database holds them.
    fn root(&self) -> &Path;
    /// What is applied, naming its lock and records in a state database.
    fn identity(&self) -> String;
    /// Keeps the provider's records in the state database from now on, and reads them
    /// from there. Default: a provider whose records live beside what it runs keeps them
    /// there.
    fn keep_records_in(&mut self, state: crate::state::PgState) -> Result<()> {
        let _ = state;
        Ok(())
    }
    /// Before the lock: refuses what apply must not touch. Writes nothing.
    fn preflight(&self) -> Result<()> {
        Ok(())
    }
    /// With the lock held, before observing: takes possession of what apply writes and
    /// removes what a crashed apply left behind. Only after it may the provider write its
    /// records (`plan` and `show` never call it).
    fn recover(&mut self) -> Result<()> {
        Ok(())
    }
    /// With the lock held, after observing: leftovers that only the live state tells apart.
    fn recover_observed(&mut self) -> Result<()> {
        Ok(())
    }
    /// Refuses, before anything is touched, a plan the provider could not carry out.
    fn check(&self, plan: &Plan) -> Result<()> {
        let _ = plan;
        Ok(())
    }
    /// The env file a deploy writes for `env`, if the provider writes one.
    fn env_file(&self, env: &EnvName) -> Option<PathBuf> {
        let _ = env;
        None
    }
    /// The live state of every environment the provider knows.
    fn observe(&mut self) -> Result<Live>;
    /// Observes after an action whose prediction for `env` is `expected`. A provider whose
    /// platform carries actions out in its own time waits here, polling, while what the
    /// action moves is still on its way to the prediction, and fails once that takes too
    /// long; anything else that differs is returned at once for apply to report.
    fn settle(&mut self, env: &EnvName, expected: &EnvLive) -> Result<Live> {
        let _ = (env, expected);
        self.observe()
    }
    /// Records a new service; returns its id.
    fn add(&mut self, env: &EnvName, prefix: &Prefix, version: Major) -> Result<ServiceId>;
    fn provision(&mut self, env: &EnvName, id: &ServiceId) -> Result<()>;
    fn fence(&mut self, env: &EnvName, id: &ServiceId) -> Result<()>;
    fn unfence(&mut self, env: &EnvName, id: &ServiceId) -> Result<()>;
    /// With a pooler in front, the longest its pause may last (`upgrade.max_pause_seconds`):
    /// apply gives the pause up, unfencing, rather than start an action past it.
    fn pause_bound(&self, env: &EnvName) -> Option<std::time::Duration> {
        let _ = env;
        None
    }
    fn backup(&mut self, env: &EnvName, id: &ServiceId) -> Result<Backup>;
    /// Replaces what `id` holds with `backup`; returns the size restored, in bytes.
    fn restore(&mut self, env: &EnvName, id: &ServiceId, backup: &Backup) -> Result<u64>;
    /// `backup from` then `restore id from`, as one step: a provider that can stream the
    /// dump into the restore while it writes the backup overrides this. `verify` says how
    /// a later `verify id against from` will compare them, so that the provider may take
    /// fingerprints while it is at it. After a failure either, both or neither may have
    /// happened, as after the two one by one.
    fn backup_and_restore(
        &mut self,
        env: &EnvName,
        from: &ServiceId,
        id: &ServiceId,
        verify: Verify,
    ) -> Result<Backup> {
        let _ = verify;
        let backup = self.backup(env, from)?;
        self.restore(env, id, &backup)?;
        Ok(backup)
    }
    /// Logical strategy: copies `from` into `id`, subscribes `id` to every later change
    /// of `from`, and returns once the copy streams (its size in bytes); changes keep
    /// streaming until `catch_up`. `verify` says how a later verify will compare the two,
    /// so that the provider may compare the rows where the stream starts.
    fn replicate(&mut self, env: &EnvName, id: &ServiceId, from: &ServiceId, verify: Verify) -> Result<u64> {
        let _ = (env, id, from, verify);
        Err(ProviderError::Refused("this provider cannot copy by logical replication".into()))
    }
    /// With the source quiet: waits until `id` holds every change its source committed,
    /// brings its sequences level, and ends the replication. `verify` says how a later
    /// verify will compare the two, so that the provider may take fingerprints meanwhile.
    fn catch_up(&mut self, env: &EnvName, id: &ServiceId, verify: Verify) -> Result<()> {
        let _ = (env, id, verify);
        Err(ProviderError::Refused("this provider cannot copy by logical replication".into()))
    }
    /// pg_upgrade strategy: with `from` quiet (fenced), upgrades its data into the
    /// provisioned `id` with `transfer`, starts `id`, and leaves `from` as it was (started
    /// again, still fenced), or with `link` consumed (its snapshot's `consumed_by`: `id`,
    /// its fingerprint for `verify` kept); returns the bytes of data moved. A failure
    /// leaves `from` startable and the next attempt starts afresh.
    fn upgrade(
        &mut self,
        env: &EnvName,
        id: &ServiceId,
        from: &ServiceId,
        transfer: Transfer,
        verify: Verify,
    ) -> Result<u64> {
        let _ = (env, id, from, transfer, verify);
        Err(ProviderError::Refused("this provider cannot upgrade data directories with pg_upgrade".into()))
    }
    fn verify(&mut self, env: &EnvName, id: &ServiceId, against: &ServiceId, how: Verify) -> Result<()>;
    fn rename(&mut self, env: &EnvName, id: &ServiceId, to: &Prefix) -> Result<()>;
    fn detach(&mut self, env: &EnvName, id: &ServiceId) -> Result<()>;
    fn deploy(&mut self, env: &EnvName) -> Result<()>;
    fn delete(&mut self, env: &EnvName, id: &ServiceId) -> Result<()>;
}
