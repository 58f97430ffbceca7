//! The local provider: real PostgreSQL servers on this machine, one per service, under
//! `root`:
//!
//! ```text
//! root/state/<env>/<id>.json     the provider's record of each service (written atomically)
//! root/ledger.json               the core's ledger, unless a state database holds it
//! root/servers/<id>/data         the server's data directory (owned by run_as)
//! root/backups/<id>/<ms>.*       dumps, their roles and a manifest; kept after delete
//! root/secrets/<env>.json        the application role's password (mode 0600)
//! root/<env>.env                 what deploy writes for the application (mode 0600)
//! root/lock                      held by the apply in progress
//! ```
//!
//! The metadata files are the provider's memory of what a server cannot show (prefix,
//! status, the replication it set up); `observe` checks them against the servers and
//! starts any server that is down. What a copy holds (which dataset, complete, verified)
//! is the core's ledger's to know (`crate::ledger`), not this provider's.
//!
//! One file per concern: `root` (the directory is ours), `records` (service records and
//! secrets), `servers` (each service's server), `checks` (refusals before anything is
//! touched), `backup`, `restore`, `replica` (the logical copy), `tidy` (crash leftovers);
//! below them `server`, `logical`, `stream`, `fingerprint`, `private`, `quote`. This file
//! holds the `Provider` methods.

mod backup;
pub use crate::binaries;
mod checks;
pub mod error;
pub mod fingerprint;
mod logical;
mod pooler;
mod private;
pub mod quote;
mod records;
mod replica;
mod restore;
mod root;
pub mod server;
mod servers;
mod stream;
mod tidy;
mod upgrade;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use super::{Backup, Provider, ProviderError, Result};
use crate::atomic::write_atomically;
use crate::config::{LocalConfig, Verify};
use crate::model::{EnvLive, EnvName, Live, Major, Prefix, Service, ServiceId, Status, FORMAT_VERSION};
use backup::*;
use checks::*;
use records::*;
use restore::*;
use server::{RunAs, Server};
use servers::*;

/// The role and database the application uses on every server of an environment.
pub const APP_ROLE: &str = "app";
pub const APP_DB: &str = "app";

/// Real PostgreSQL servers under `root`.
#[derive(Debug)]
pub struct LocalProvider {
    root: PathBuf,
    bin_dirs: Vec<PathBuf>,
    run_as: Option<RunAs>,
    env_file: String,
    /// The environments whose copies are made by pg_upgrade, with its transfer: their
    /// new servers are provisioned bare, as pg_upgrade needs them.
    pg_upgrades: BTreeMap<EnvName, crate::config::Transfer>,
    command: Option<String>,
    /// Postmaster pids whose server answered with its recorded major: observe asks a
    /// server once per start, not after every action.
    answered: std::collections::BTreeSet<i32>,
    /// The pooler in front of each environment's servers, if any.
    pooler: Option<crate::config::PoolerKind>,
    /// Each environment's `upgrade.max_pause_seconds`.
    pause_bounds: BTreeMap<EnvName, u32>,
    /// The environments whose paused pooler this process has warned of.
    told_paused: std::collections::BTreeSet<EnvName>,
    /// The environments whose pooler's pauses this process has made agree with the fences.
    pooler_checked: std::collections::BTreeSet<EnvName>,
    /// Fingerprints taken ahead of a verify, while the copy streamed: each of a service
    /// that nothing can change until the verify (a fenced source, an unattached copy).
    fingerprints: BTreeMap<ServiceId, (Verify, fingerprint::Fingerprint)>,
    /// `recover` ran, with apply's lock held: observe may repair what it finds (finish or
    /// undo an interrupted link, start a server or pooler that is down, make the pauses
    /// agree with the fences). Without it (plan, show, init) observe only reads and says
    /// what the next apply will do: repairing beside a running apply could undo its work.
    writable: bool,
}

fn failed(e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Failed(e.to_string())
}

fn io_err(action: &'static str, path: &Path, source: std::io::Error) -> ProviderError {
    error::Error::Io { action, path: path.to_owned(), source }.into()
}

fn now_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").map_err(failed)?, &mut buf).map_err(failed)?;
    Ok(crate::model::hex(&buf))
}

impl LocalProvider {
    /// The provider of a config file at `config_path`.
    pub fn new(config: &LocalConfig, config_path: &Path) -> Result<Self> {
        let base = config_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let base = std::fs::canonicalize(base).map_err(|e| io_err("resolve", base, e))?;
        let root = base.join(config.root.clone().unwrap_or_else(|| PathBuf::from(".pgconverge")));
        let run_as = RunAs::for_user(config.run_as.as_deref().unwrap_or("postgres"))?;
        Ok(Self {
            root,
            bin_dirs: config.bin_dirs.clone(),
            run_as,
            env_file: config.deploy.env_file.clone().unwrap_or_else(|| "{env}.env".into()),
            command: config.deploy.command.clone(),
            answered: Default::default(),
            pg_upgrades: Default::default(),
            pooler: config.pooler,
            pause_bounds: Default::default(),
            told_paused: Default::default(),
            pooler_checked: Default::default(),
            fingerprints: Default::default(),
            writable: false,
        })
    }

    /// Provisions bare servers in the environments whose strategy is pg_upgrade.
    pub fn for_envs(mut self, envs: &[crate::config::DesiredEnv]) -> Self {
        let upgrades = envs.iter().filter(|d| d.upgrade.strategy == crate::config::Strategy::PgUpgrade);
        self.pg_upgrades = upgrades.map(|d| (d.name.clone(), d.upgrade.transfer)).collect();
        self.pause_bounds = envs.iter().map(|d| (d.name.clone(), d.upgrade.max_pause_seconds)).collect();
        self
    }

    /// The root holds services of this provider (an apply has recorded some).
    pub fn holds_services(&self) -> bool {
        self.root.join("state").is_dir()
    }

    /// The env file deploy writes for `env`.
    pub fn env_file_path(&self, env: &EnvName) -> PathBuf {
        self.root.join(self.env_file.replace("{env}", env.as_str()))
    }
}

/// The copy steps are `*_now` in `backup`, `restore` and `replica`; the methods here add
/// what a full disk explains (`checks`).
impl Provider for LocalProvider {
    fn root(&self) -> &Path {
        &self.root
    }

    /// This machine and the root.
    fn identity(&self) -> String {
        let host = crate::state::hostname();
        // The same before and after root is first made: its parent resolved, its name kept.
        let parent = self
            .root
            .parent()
            .and_then(|p| std::fs::canonicalize(if p.as_os_str().is_empty() { Path::new(".") } else { p }).ok());
        let root = match (parent, self.root.file_name()) {
            (Some(parent), Some(name)) => parent.join(name),
            _ => self.root.clone(),
        };
        format!("local {}:{}", host, root.display())
    }

    fn preflight(&self) -> Result<()> {
        if self.pooler.is_some() {
            pooler::program()?;
        }
        self.check_root()
    }

    fn recover(&mut self) -> Result<()> {
        self.claim_root()?;
        self.writable = true;
        self.tidy()
    }

    fn recover_observed(&mut self) -> Result<()> {
        self.tidy_replication()
    }

    fn check(&self, plan: &crate::plan::Plan) -> Result<()> {
        self.check_plan(plan)
    }

    fn env_file(&self, env: &EnvName) -> Option<PathBuf> {
        Some(self.env_file_path(env))
    }

    fn observe(&mut self) -> Result<Live> {
        let mut live = Live { format_version: FORMAT_VERSION, environments: BTreeMap::new() };
        self.preflight()?;
        let Ok(entries) = std::fs::read_dir(self.root.join("state")) else { return Ok(live) };
        for e in entries.flatten() {
            let Ok(env) = EnvName::parse(&e.file_name().to_string_lossy()) else { continue };
            if self.writable {
                self.settle_links(&env)?;
            } else {
                self.tell_links(&env)?;
            }
            let mut services = Vec::new();
            for mut meta in self.metas(&env)? {
                // A consumed server's files are another's: it is never started again.
                if meta.service.status != Status::New && meta.service.consumed_by.is_none() {
                    let socket = self.writable || self.socket_dir_ok(&meta)?;
                    if self.writable {
                        self.private_socket_dir(&env, &mut meta)?;
                    }
                    let server = self.server(&meta)?;
                    if !server.data_dir.join("PG_VERSION").exists() {
                        return Err(ProviderError::Inconsistent(format!(
                            "{} is recorded as {} but its data directory {} is missing",
                            meta.service.id,
                            meta.service.status.as_str(),
                            server.data_dir.display()
                        )));
                    }
                    let reachable = socket && server.is_running();
                    if !(self.writable || reachable) {
                        tracing::warn!(service = %meta.service.id, "server is down (or its socket directory gone); the next apply starts it");
                        services.push(meta.service);
                        continue;
                    }
                    if !server.is_running() {
                        tracing::warn!(service = %meta.service.id, "server was down; starting it");
                        server.start()?;
                    }
                    let pid = server.postmaster().unwrap_or(0);
                    if !self.answered.contains(&pid) {
                        let num = server.sql("postgres", "SHOW server_version_num")?;
                        let major = num.parse::<u32>().map(|n| n / 10000).unwrap_or(0);
                        if major != meta.service.version.get() {
                            return Err(ProviderError::Inconsistent(format!(
                                "{} is recorded as PostgreSQL {} but its server answers as {major}",
                                meta.service.id, meta.service.version
                            )));
                        }
                        self.answered.insert(pid);
                    }
                }
                services.push(meta.service);
            }
            if self.writable {
                self.settle_pooler(&env, &self.metas(&env)?)?;
            } else {
                self.tell_pooler(&env, &self.metas(&env)?)?;
            }
            if !services.is_empty() {
                live.environments.insert(env, EnvLive { services });
            }
        }
        Ok(live)
    }

    fn add(&mut self, env: &EnvName, prefix: &Prefix, version: Major) -> Result<ServiceId> {
        self.check_binaries(version)?;
        let id = ServiceId::observed(&format!("pg{version}-{}", random_hex(4)?)).map_err(failed)?;
        let service = Service {
            id: id.clone(),
            version,
            prefix: prefix.clone(),
            status: Status::New,
            fenced: false,
            data: None,
            consumed_by: None,
        };
        let meta = Meta {
            service,
            streaming_from: None,
            port: None,
            untouched: false,
            loading: false,
            socket_dir: None,
            link_from: None,
            fingerprint: None,
            matched: None,
        };
        self.store(env, &meta)?;
        Ok(id)
    }

    fn provision(&mut self, env: &EnvName, id: &ServiceId) -> Result<()> {
        let mut meta = self.load(env, id)?;
        self.create_server(env, &mut meta, self.pg_upgrades.contains_key(env))?;
        meta.service.status = Status::Provisioned;
        meta.untouched = true;
        self.store(env, &meta)
    }

    fn fence(&mut self, env: &EnvName, id: &ServiceId) -> Result<()> {
        let (meta, server) = self.running_server(env, id)?;
        // With a pooler, its queries wait from here on, none running on the server.
        self.pause(env, &meta, &server)?;
        crate::failpoint::hit("fence:paused")?;
        // No new sessions, then end the ones there are: their uncommitted work rolls
        // back, and nothing can commit after this returns.
        let sql = format!(
            "ALTER ROLE {APP_ROLE} NOLOGIN; SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = '{APP_ROLE}';"
        );
        server.sql("postgres", &sql)?;
        self.update(env, id, |m| m.service.fenced = true)
    }

    fn unfence(&mut self, env: &EnvName, id: &ServiceId) -> Result<()> {
        self.fingerprints.remove(id);
        let (meta, server) = self.running_server(env, id)?;
        server.sql("postgres", &format!("ALTER ROLE {APP_ROLE} LOGIN"))?;
        self.update(env, id, |m| m.service.fenced = false)?;
        self.unpause(env, &meta)
    }

    fn pause_bound(&self, env: &EnvName) -> Option<std::time::Duration> {
        self.pooler.map(|_| std::time::Duration::from_secs(self.pause_bound(env).into()))
    }

    fn backup(&mut self, env: &EnvName, id: &ServiceId) -> Result<Backup> {
        let result = self.backup_now(env, id);
        result.map_err(|e| self.disk_full(e))
    }

    fn restore(&mut self, env: &EnvName, id: &ServiceId, backup: &Backup) -> Result<u64> {
        let result = self.restore_now(env, id, backup);
        result.map_err(|e| self.disk_full(e))
    }

    fn backup_and_restore(
        &mut self,
        env: &EnvName,
        from: &ServiceId,
        id: &ServiceId,
        verify: Verify,
    ) -> Result<Backup> {
        let result = self.backup_and_restore_now(env, from, id, verify);
        result.map_err(|e| self.disk_full(e))
    }

    fn replicate(&mut self, env: &EnvName, id: &ServiceId, from: &ServiceId, verify: Verify) -> Result<u64> {
        let result = self.replicate_now(env, id, from, verify);
        result.map_err(|e| self.disk_full(e))
    }

    fn catch_up(&mut self, env: &EnvName, id: &ServiceId, verify: Verify) -> Result<()> {
        let result = self.catch_up_now(env, id, verify);
        result.map_err(|e| self.disk_full(e))
    }

    fn upgrade(
        &mut self,
        env: &EnvName,
        id: &ServiceId,
        from: &ServiceId,
        transfer: crate::config::Transfer,
        verify: Verify,
    ) -> Result<u64> {
        let result = self.upgrade_now(env, id, from, transfer, verify);
        result.map_err(|e| self.disk_full(e))
    }

    fn verify(&mut self, env: &EnvName, id: &ServiceId, against: &ServiceId, how: Verify) -> Result<()> {
        let (_, copy) = self.running_server(env, id)?;
        // A consumed source cannot be asked: its fingerprint was kept before the transfer.
        let meta = self.load(env, against)?;
        let kept = match meta.fingerprint.clone().filter(|(h, _)| *h == how) {
            Some((_, fp)) if meta.service.consumed_by.is_some() => Some(fp),
            None if meta.service.consumed_by.is_some() => {
                return Err(ProviderError::Failed(format!(
                    "{against}'s files are {id}'s now and no {} fingerprint of it was kept to compare with: set `upgrade.verify: none`, or compare by hand",
                    how.as_str()
                )));
            }
            _ => None,
        };
        let source = if kept.is_some() { self.server(&meta)? } else { self.running_server(env, against)?.1 };
        let mut taken = |id: &ServiceId| match self.fingerprints.remove(id) {
            Some((h, fp)) if h == how => Some(fp),
            _ => None,
        };
        let (a, b) = (taken(against).or(kept), taken(id));
        // What is missing is taken now, both servers at once.
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| {
                a.map_or_else(|| fingerprint::timed(&source, APP_DB, how, fingerprint::Part::All, "source"), Ok)
            });
            let b = b.map_or_else(|| fingerprint::timed(&copy, APP_DB, how, fingerprint::Part::All, "copy"), Ok);
            (error::joined(a, "fingerprint"), b)
        });
        let (a, b) = (a?, b?);
        let diff = fingerprint::differences(&a, &b);
        if !diff.is_empty() {
            return Err(replica::differ(id, against, "", &diff));
        }
        tracing::info!(service = %id, against = %against, objects = a.len(), "copy verified");
        Ok(())
    }

    fn rename(&mut self, env: &EnvName, id: &ServiceId, to: &Prefix) -> Result<()> {
        self.update(env, id, |m| m.service.prefix = to.clone())
    }

    fn detach(&mut self, env: &EnvName, id: &ServiceId) -> Result<()> {
        self.update(env, id, |m| m.service.status = Status::PendingDetachment)
    }

    fn deploy(&mut self, env: &EnvName) -> Result<()> {
        let mut metas = self.metas(env)?;
        for meta in metas.iter_mut().filter(|m| m.service.status == Status::New) {
            self.create_server(env, meta, false)?;
        }
        // A server provisioned bare for pg_upgrade that is attached as it is (a new
        // database): the application's role and database first.
        for meta in metas.iter().filter(|m| m.service.status == Status::Provisioned && m.untouched) {
            let (_, server) = self.running_server(env, &meta.service.id)?;
            self.create_app_database(env, &server)?;
        }
        let visible_after = |m: &Meta| matches!(m.service.status, Status::New | Status::Provisioned | Status::Attached);
        // The pooler's DSNs never change: it is the pooler that moves to the new servers,
        // before the env file names it (the first time, it may still change its port).
        self.repoint(env, &metas, visible_after)?;
        let mut lines = Vec::new();
        let mut default = None;
        for meta in metas.iter().filter(|m| visible_after(m)) {
            let dsn = self.app_dsn(env, meta)?;
            if meta.service.prefix.as_str() == "DEFAULT" {
                default = Some(dsn.clone());
            }
            lines.push(format!("{}_DATABASE_DSN={dsn}", meta.service.prefix));
        }
        lines.sort();
        if let Some(d) = default {
            lines.push(format!("DATABASE_URL={d}"));
        }
        for meta in metas.iter_mut().filter(|m| visible_after(m) && m.loading) {
            let server = self.server(meta)?;
            load_settings(&server, false)?;
            meta.loading = false;
            self.store(env, meta)?;
        }
        let path = self.env_file_path(env);
        let text = lines.join("\n") + "\n";
        write_atomically(&path, text.as_bytes(), 0o600).map_err(|e| io_err("write", &path, e))?;
        crate::failpoint::hit("deploy:env_written")?;
        if let Some(cmd) = &self.command {
            let status = Command::new("sh")
                .args(["-c", cmd])
                .env("PGCONVERGE_ENV", env.as_str())
                .env("PGCONVERGE_ENV_FILE", &path)
                .stdin(Stdio::null())
                .status()
                .map_err(|e| ProviderError::Failed(format!("deploy command: {e}")))?;
            if !status.success() {
                return Err(ProviderError::Failed(format!("the deploy command failed ({status})")));
            }
        }
        for mut meta in metas {
            match meta.service.status {
                Status::New | Status::Provisioned => meta.service.status = Status::Attached,
                Status::PendingDetachment => meta.service.status = Status::Detached,
                Status::Attached | Status::Detached => continue,
            }
            self.store(env, &meta)?;
        }
        Ok(())
    }

    fn delete(&mut self, env: &EnvName, id: &ServiceId) -> Result<()> {
        self.fingerprints.remove(id);
        let meta = self.load(env, id)?;
        if let Some(from) = &meta.streaming_from {
            // Its subscription goes first, and the slot it holds on the source with it.
            let source = self.load(env, from).ok().and_then(|m| self.server(&m).ok()).filter(Server::is_running);
            let target = self.server(&meta).ok().filter(Server::is_running);
            logical::drop_replication(source.as_ref(), target.as_ref(), &logical::name(id))?;
        }
        // The record goes first: a crash after it leaves only a server and files that no
        // record names, which `tidy` removes.
        let path = self.meta_path(env, id);
        std::fs::remove_file(&path).map_err(|e| io_err("remove", &path, e))?;
        crate::failpoint::hit("delete:record_removed")?;
        if meta.service.status != Status::New {
            self.server(&meta)?.stop()?;
            crate::failpoint::hit("delete:stopped")?;
        }
        let dir = self.root.join("servers").join(id.as_str());
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| io_err("remove", &dir, e))?;
        }
        if let Ok(server) = self.server(&meta) {
            let _ = std::fs::remove_dir_all(server.socket_dir);
        }
        Ok(())
    }
}
