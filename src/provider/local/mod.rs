//! The local provider: real PostgreSQL servers on this machine, one per service, under
//! `root`:
//!
//! ```text
//! root/state/<env>/<id>.json     what the rules see of each service (written atomically)
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

pub use crate::binaries;
pub mod fingerprint;
mod logical;
mod private;
pub mod quote;
pub mod server;
mod stream;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use super::{Backup, Provider, ProviderError, Result};
use crate::atomic::write_atomically;
use crate::config::{LocalConfig, Verify};
use crate::model::{EnvLive, EnvName, Live, Major, Prefix, Service, ServiceId, Status, FORMAT_VERSION};
use server::{RunAs, Server};

/// The file that marks a directory as a pgconverge root.
const ROOT_MARKER: &str = ".pgconverge-root";
const ROOT_MARKER_TEXT: &str =
    "This directory is the root of a pgconverge local provider: its servers, records and backups.\n";

/// The longest socket directory: a socket path (`dir/.s.PGSQL.<port>`) may be at most
/// 107 bytes.
const SOCKET_DIR_MAX: usize = 80;

/// Settings of a server while a copy is restored into it and verified: no checkpoint
/// until the application uses it. Checkpoints in the middle of a load write pages twice,
/// and make the first read of every page after them (verify's counts, ANALYZE) log a
/// full page image while setting hint bits. Durability is untouched: every commit is
/// flushed to the WAL as always; only the WAL is kept longer, up to the size of the copy.
const LOAD_SETTINGS: [(&str, &str); 2] = [("max_wal_size", "64GB"), ("checkpoint_timeout", "1d")];

/// The role and database the application uses on every server of an environment.
pub const APP_ROLE: &str = "app";
pub const APP_DB: &str = "app";

/// A service as the local provider records it. Its `service.data` is always `None`: a
/// record written before the ledger may hold one, which is read and ignored.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    #[serde(flatten)]
    service: Service,
    /// The service whose changes a subscription on this server receives, from `replicate`
    /// until the catch-up ends it: what `tidy_replication` keeps and `delete` drops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    streaming_from: Option<ServiceId>,
    /// The server's TCP port, once provisioned.
    port: Option<u16>,
    /// The application database is as provisioning made it: empty, never restored into.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    untouched: bool,
    /// The server runs with `LOAD_SETTINGS`, until deploy makes it visible.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    loading: bool,
    /// The server's socket directory when `root/run/<id>` is too long for a socket path:
    /// one made under the system's temporary directory with a random name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    socket_dir: Option<PathBuf>,
}

/// A backup on disk, named by the path of its manifest (the `Backup`'s handle). What data
/// it holds and whether it is complete are the rules' to know.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Manifest {
    service: ServiceId,
    source_version: Major,
    dump: PathBuf,
    roles: PathBuf,
    /// The database's own properties (settings, comment, privileges); absent in
    /// backups taken before pgconverge kept them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    database: Option<PathBuf>,
    bytes: u64,
    taken_at_ms: u128,
}

/// The files of a backup being taken.
struct BackupFiles {
    dump: PathBuf,
    roles: PathBuf,
    database: PathBuf,
    /// Where the dump is written until it is whole.
    partial: PathBuf,
    manifest: PathBuf,
    stamp: u128,
    /// The programs that dump: the newest major of the environment's servers.
    bin: binaries::Binaries,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Secret {
    role: String,
    password: String,
}

/// Real PostgreSQL servers under `root`.
#[derive(Debug)]
pub struct LocalProvider {
    root: PathBuf,
    bin_dirs: Vec<PathBuf>,
    run_as: Option<RunAs>,
    env_file: String,
    command: Option<String>,
    /// Postmaster pids whose server answered with its recorded major: observe asks a
    /// server once per start, not after every action.
    answered: std::collections::BTreeSet<i32>,
    /// Fingerprints taken ahead of a verify, while the copy streamed: each of a service
    /// that nothing can change until the verify (a fenced source, an unattached copy).
    fingerprints: BTreeMap<ServiceId, (Verify, fingerprint::Fingerprint)>,
}

fn failed(e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Failed(e.to_string())
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> ProviderError {
    ProviderError::Failed(format!("cannot {what} {}: {e}", path.display()))
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
        let run_as = RunAs::for_user(config.run_as.as_deref().unwrap_or("postgres")).map_err(ProviderError::Failed)?;
        Ok(Self {
            root,
            bin_dirs: config.bin_dirs.clone(),
            run_as,
            env_file: config.deploy.env_file.clone().unwrap_or_else(|| "{env}.env".into()),
            command: config.deploy.command.clone(),
            answered: Default::default(),
            fingerprints: Default::default(),
        })
    }

    /// Makes sure `root` is pgconverge's own before apply writes, deletes or starts
    /// anything under it: made here (with `ROOT_MARKER` inside), or marked as such, owned
    /// by this user and writable by no one else. `/`, and a directory holding files of
    /// someone else's without the marker, are refused: tidy-up removes what a crash left
    /// under root, which must never be another program's files.
    pub fn claim_root(&self) -> Result<()> {
        self.check_root()?;
        if !self.root.exists() {
            let parent = self.root.parent().unwrap_or(Path::new("/"));
            std::fs::create_dir_all(parent).map_err(|e| io_err("create", parent, e))?;
            private::dir(&self.root, 0o711).map_err(ProviderError::Failed)?;
        }
        let marker = self.root.join(ROOT_MARKER);
        if std::fs::symlink_metadata(&marker).is_err() {
            write_atomically(&marker, ROOT_MARKER_TEXT.as_bytes(), 0o644).map_err(|e| io_err("write", &marker, e))?;
        }
        Ok(())
    }

    /// `root/<name>` (and `root/<name>/<sub>` when given), made with their modes if
    /// missing, checked if present: the servers' user passes through `servers` and `run`
    /// to its own directories; the rest is root's alone.
    fn subdir(&self, name: &str, sub: Option<&str>) -> Result<PathBuf> {
        let mode = if matches!(name, "servers" | "run") { 0o711 } else { 0o700 };
        let mut dir = self.root.join(name);
        private::dir(&dir, mode).map_err(ProviderError::Failed)?;
        if let Some(sub) = sub {
            dir = dir.join(sub);
            private::dir(&dir, 0o700).map_err(ProviderError::Failed)?;
        }
        Ok(dir)
    }

    /// The checks of `claim_root` that write nothing: plan and show make them too.
    pub fn check_root(&self) -> Result<()> {
        let refuse = |why: String| {
            ProviderError::Refused(format!(
                "provider.local.root {}: {why}; point it at a new or empty directory (the default is .pgconverge beside the config file)",
                self.root.display()
            ))
        };
        if self.root.parent().is_none() {
            return Err(refuse("pgconverge does not use / as its root".into()));
        }
        let meta = match std::fs::symlink_metadata(&self.root) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("look at", &self.root, e)),
        };
        private::check(&self.root, &meta, true).map_err(refuse)?;
        if std::fs::symlink_metadata(self.root.join(ROOT_MARKER)).is_ok() {
            return Ok(());
        }
        // A root made before the marker existed holds only what pgconverge writes.
        let entries: Vec<String> = std::fs::read_dir(&self.root)
            .map_err(|e| io_err("read", &self.root, e))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let ours = |name: &String| {
            ["state", "servers", "backups", "secrets", "run", "lock"].contains(&name.as_str())
                || name.ends_with(".env")
                || (name.starts_with('.') && name.contains(".tmp-"))
        };
        let foreign: Vec<&String> = entries.iter().filter(|n| !ours(n)).collect();
        if !foreign.is_empty() {
            let shown: Vec<String> = foreign.iter().take(3).map(|n| crate::model::printable(n)).collect();
            return Err(refuse(format!(
                "it is not empty and not pgconverge's (no {ROOT_MARKER} file{}{})",
                if shown.is_empty() { "" } else { "; it holds " },
                shown.join(", ")
            )));
        }
        Ok(())
    }

    /// The env file deploy writes for `env`.
    pub fn env_file_path(&self, env: &EnvName) -> PathBuf {
        self.root.join(self.env_file.replace("{env}", env.as_str()))
    }

    /// Fails with where it looked when `major`'s binaries are missing.
    pub fn check_binaries(&self, major: Major) -> Result<()> {
        binaries::find(major.get(), &self.bin_dirs).map(drop).map_err(ProviderError::Failed)
    }

    /// Refuses, before anything is touched, a plan this provider cannot carry out safely:
    /// a major without binaries, logical replication into a server older than 16 (whose
    /// subscriptions apply changes with superuser rights), a copy of a database holding
    /// objects that only a superuser could restore.
    pub fn check_plan(&self, plan: &crate::plan::Plan) -> Result<()> {
        use crate::plan::Action;
        let mut needed = 0u64;
        for env_plan in &plan.environments {
            let version_of = |id: &ServiceId| -> Option<Major> {
                env_plan
                    .actions
                    .iter()
                    .find_map(|a| match a {
                        Action::Add { service, version, .. } if service == id => Some(*version),
                        _ => None,
                    })
                    .or_else(|| self.load(&env_plan.name, id).ok().map(|m| m.service.version))
            };
            for action in &env_plan.actions {
                match action {
                    Action::Add { version, .. } => self.check_binaries(*version)?,
                    Action::Replicate { service, .. } if version_of(service).is_some_and(|v| v.get() < 16) => {
                        return Err(ProviderError::Refused(format!(
                            "environment {}: strategy logical needs PostgreSQL 16 or later on the new server: before 16 a subscription applies changes with superuser rights, so the application's triggers and check constraints would run as a superuser; use `upgrade.strategy: dump_restore` for this upgrade",
                            env_plan.name
                        )));
                    }
                    _ => {}
                }
                let source = match action {
                    Action::Backup { service } => service,
                    Action::Replicate { from, .. } => from,
                    _ => continue,
                };
                let Ok(meta) = self.load(&env_plan.name, source) else { continue };
                let Ok(server) = self.server(&meta) else { continue };
                if !server.is_running() {
                    continue;
                }
                let size = database_size(&server)?;
                needed += size.saturating_mul(COPY_SPACE_FACTOR);
                let free = free_bytes(&self.root)?;
                if needed > free {
                    return Err(ProviderError::Refused(format!(
                        "environment {}: copying {source}'s database ({}) needs about {} free on the disk that holds {} ({COPY_SPACE_FACTOR} × the database: the new server's data, the WAL written while it is loaded, and the kept dump), and it has {}; free some space or point provider.local.root at a larger disk",
                        env_plan.name,
                        crate::model::human_bytes(size),
                        crate::model::human_bytes(needed),
                        self.root.display(),
                        crate::model::human_bytes(free)
                    )));
                }
                let owned = superuser_owned(&server)?;
                if !owned.is_empty() {
                    return Err(ProviderError::Refused(format!(
                        "environment {}: {source}'s database holds objects owned by a superuser ({}{}); pgconverge restores as a role that is not a superuser, so that no code of the application's runs with superuser rights. Give them to the application's role (`ALTER … OWNER TO {APP_ROLE}`; trusted extensions can be created by it), or drop them",
                        env_plan.name,
                        owned.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                        if owned.len() > 5 { ", …" } else { "" }
                    )));
                }
            }
        }
        Ok(())
    }

    fn meta_path(&self, env: &EnvName, id: &ServiceId) -> PathBuf {
        self.root.join("state").join(env.as_str()).join(format!("{id}.json"))
    }

    fn load(&self, env: &EnvName, id: &ServiceId) -> Result<Meta> {
        let mut meta: Meta = read_record(&self.meta_path(env, id))?;
        meta.service.data = None;
        Ok(meta)
    }

    fn store(&self, env: &EnvName, meta: &Meta) -> Result<()> {
        let path = self.meta_path(env, &meta.service.id);
        self.subdir("state", Some(env.as_str()))?;
        let text = serde_json::to_vec_pretty(meta).map_err(failed)?;
        write_atomically(&path, &text, 0o644).map_err(|e| io_err("write", &path, e))
    }

    fn metas(&self, env: &EnvName) -> Result<Vec<Meta>> {
        let dir = self.root.join("state").join(env.as_str());
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(out) };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json").filter(|_| !name.starts_with('.')) {
                let id = ServiceId::observed(id).map_err(ProviderError::Inconsistent)?;
                out.push(self.load(env, &id)?);
            }
        }
        out.sort_by(|a, b| a.service.id.cmp(&b.service.id));
        Ok(out)
    }

    fn update(&self, env: &EnvName, id: &ServiceId, f: impl FnOnce(&mut Meta)) -> Result<()> {
        let mut meta = self.load(env, id)?;
        f(&mut meta);
        self.store(env, &meta)
    }

    fn server(&self, meta: &Meta) -> Result<Server> {
        let id = meta.service.id.as_str();
        let bin = binaries::find(meta.service.version.get(), &self.bin_dirs).map_err(ProviderError::Failed)?;
        let dir = self.root.join("servers").join(id);
        Ok(Server {
            bin,
            data_dir: dir.join("data"),
            socket_dir: self.socket_dir(meta),
            log_file: dir.join("log").join("server.log"),
            port: meta.port.unwrap_or(0),
            run_as: self.run_as,
        })
    }

    /// Where the server of `meta` has its socket: `root/run/<id>`, unless that is too
    /// long for a socket path (at most 107 bytes), then the directory recorded for it.
    fn socket_dir(&self, meta: &Meta) -> PathBuf {
        let short = self.root.join("run").join(meta.service.id.as_str());
        match &meta.socket_dir {
            Some(dir) if short.as_os_str().len() > SOCKET_DIR_MAX => dir.clone(),
            _ => short,
        }
    }

    /// Makes sure the socket directory of `meta`'s server is one pgconverge made for it
    /// alone (owned by the server's user, mode 0700, no symlink), and makes one when it is
    /// missing: a new random one under the temporary directory when the root is deep (the
    /// system may have cleaned it), the server restarted into it if it was running.
    fn private_socket_dir(&self, env: &EnvName, meta: &mut Meta) -> Result<()> {
        let owner = self.run_as.map(|r| r.uid).or_else(server::effective_uid).unwrap_or(0);
        let dir = self.socket_dir(meta);
        match server::check_private_dir(&dir, owner) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return Err(ProviderError::Inconsistent(e)),
        }
        let running = self.server(meta)?.postmaster().is_some();
        let short = self.root.join("run").join(meta.service.id.as_str());
        self.subdir("run", None)?;
        let dir = if short.as_os_str().len() > SOCKET_DIR_MAX {
            let dir = std::env::temp_dir().join(format!("pgconverge-{}", random_hex(12)?));
            meta.socket_dir = Some(dir.clone());
            dir
        } else {
            short
        };
        // `create`, not `create_dir_all`: a directory someone else made first is an error.
        private::new_dir(&dir, 0o700).map_err(ProviderError::Failed)?;
        if let Some(r) = self.run_as {
            r.own(&dir).map_err(|e| io_err("give to the server user", &dir, e))?;
        }
        if meta.service.status != Status::New || meta.port.is_some() {
            self.store(env, meta)?;
        }
        if running {
            tracing::warn!(service = %meta.service.id, dir = %dir.display(), "the socket directory was gone; restarting the server into a new one");
            let server = self.server(meta)?;
            server.stop().map_err(ProviderError::Failed)?;
            server.start().map_err(ProviderError::Failed)?;
        }
        Ok(())
    }

    fn running_server(&self, env: &EnvName, id: &ServiceId) -> Result<(Meta, Server)> {
        let mut meta = self.load(env, id)?;
        self.private_socket_dir(env, &mut meta)?;
        let server = self.server(&meta)?;
        if !server.is_running() {
            server.start().map_err(ProviderError::Failed)?;
        }
        Ok((meta, server))
    }

    fn secret(&self, env: &EnvName) -> Result<Secret> {
        let path = self.root.join("secrets").join(format!("{env}.json"));
        private::check_if_present(&path, false).map_err(ProviderError::Inconsistent)?;
        if path.exists() {
            let secret: Secret = read_record(&path)?;
            // The password reaches SQL (quoted) and a DSN: a file someone else wrote or
            // edited is refused rather than trusted.
            let fine = |c: char| c.is_ascii_alphanumeric() || "-_.~".contains(c);
            if secret.role != APP_ROLE || secret.password.len() < 16 || !secret.password.chars().all(fine) {
                return Err(ProviderError::Inconsistent(format!(
                    "{} is not one pgconverge wrote: its role must be `{APP_ROLE}` and its password 16 or more letters, digits, `-`, `_`, `.` or `~`; remove it to have a new password made",
                    path.display()
                )));
            }
            return Ok(secret);
        }
        self.subdir("secrets", None)?;
        let secret = Secret { role: APP_ROLE.into(), password: random_hex(24)? };
        let text = serde_json::to_vec(&secret).map_err(failed)?;
        write_atomically(&path, &text, 0o600).map_err(|e| io_err("write", &path, e))?;
        Ok(secret)
    }

    /// The DSN of a service for the application.
    fn dsn(&self, env: &EnvName, meta: &Meta) -> Result<String> {
        let s = self.secret(env)?;
        let port = meta.port.ok_or_else(|| ProviderError::Inconsistent(format!("{} has no port", meta.service.id)))?;
        Ok(format!("postgres://{}:{}@127.0.0.1:{port}/{APP_DB}", s.role, s.password))
    }

    /// Creates, starts and prepares the server of `meta` (role and database), from
    /// scratch: a half-made server left by a crash is removed first.
    fn create_server(&self, env: &EnvName, meta: &mut Meta) -> Result<()> {
        let dir = self.subdir("servers", None)?.join(meta.service.id.as_str());
        if dir.exists() {
            if let Ok(old) = self.server(meta) {
                let _ = old.stop();
            }
            std::fs::remove_dir_all(&dir).map_err(|e| io_err("remove", &dir, e))?;
        }
        let mut last = String::new();
        for _ in 0..3 {
            meta.port = Some(server::free_port().map_err(ProviderError::Failed)?);
            self.private_socket_dir(env, meta)?;
            let server = self.server(meta)?;
            if !server.data_dir.join("PG_VERSION").exists() {
                server.init().map_err(ProviderError::Failed)?;
            }
            match server.start() {
                Ok(()) => {
                    crate::failpoint::hit("provision:started").map_err(ProviderError::Failed)?;
                    let secret = self.secret(env)?;
                    // The server must not log the statement (and the password) if it fails.
                    let role = format!(
                        "SET log_min_error_statement = 'panic'; CREATE ROLE {} LOGIN PASSWORD {}",
                        quote::ident(&secret.role),
                        quote::literal(&secret.password)
                    );
                    let db = format!("CREATE DATABASE {APP_DB} OWNER {}", quote::ident(&secret.role));
                    server
                        .sql_each("postgres", &[&role, &db])
                        .map_err(|e| ProviderError::Failed(redact(&e, &secret.password)))?;
                    return Ok(());
                }
                Err(e) => last = e, // most likely the port was taken meanwhile: try another
            }
        }
        Err(ProviderError::Failed(last))
    }

    /// The manifest a backup's handle names, which must be one of this root's backups of
    /// the service the backup is of.
    fn manifest(&self, backup: &Backup) -> Result<Manifest> {
        let path = PathBuf::from(&backup.handle);
        let dir = self.root.join("backups").join(backup.of.as_str());
        if path.parent() != Some(dir.as_path()) || path.extension().is_none_or(|e| e != "json") {
            return Err(ProviderError::Inconsistent(format!(
                "{} is not a backup of {} under {}",
                backup.handle,
                backup.of,
                dir.display()
            )));
        }
        let manifest: Manifest = read_record(&path)?;
        if manifest.service != backup.of {
            return Err(ProviderError::Inconsistent(format!("{} is a backup of {}", backup.handle, manifest.service)));
        }
        Ok(manifest)
    }

    /// Removes what a crash can leave behind: servers and data that no record names
    /// (stopped first), half-written dumps and temporary files. Call with the lock held.
    pub fn tidy(&self) -> Result<()> {
        let mut named = std::collections::BTreeSet::new();
        if let Ok(envs) = std::fs::read_dir(self.root.join("state")) {
            for e in envs.flatten() {
                if let Ok(env) = EnvName::parse(&e.file_name().to_string_lossy()) {
                    named.extend(self.metas(&env)?.into_iter().map(|m| m.service.id.to_string()));
                }
                remove_temporary_files(&e.path());
            }
        }
        if let Ok(servers) = std::fs::read_dir(self.root.join("servers")) {
            for e in servers.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                // Only a server pgconverge made (named as `add` names them) is removed.
                if named.contains(&id) || !made_here(&id) {
                    continue;
                }
                let data = e.path().join("data");
                let major = std::fs::read_to_string(data.join("PG_VERSION")).ok().and_then(|v| v.trim().parse().ok());
                if let Some(bin) = major.and_then(|m| binaries::find(m, &self.bin_dirs).ok()) {
                    let orphan = Server {
                        bin,
                        data_dir: data,
                        socket_dir: std::env::temp_dir(),
                        log_file: e.path().join("log/server.log"),
                        port: 0,
                        run_as: self.run_as,
                    };
                    orphan.stop().map_err(ProviderError::Failed)?;
                }
                tracing::warn!(server = %id, "removing a server that no record names (left by a crash)");
                std::fs::remove_dir_all(e.path()).map_err(|err| io_err("remove", &e.path(), err))?;
            }
        }
        if let Ok(backups) = std::fs::read_dir(self.root.join("backups")) {
            for e in backups.flatten() {
                remove_temporary_files(&e.path());
                remove_unfinished_backups(&e.path());
            }
        }
        remove_temporary_files(&self.root);
        Ok(())
    }

    /// The newest major among an environment's services: its pg_dump reads them all.
    fn newest_binaries(&self, env: &EnvName) -> Result<binaries::Binaries> {
        let newest = self.metas(env)?.iter().map(|m| m.service.version.get()).max().unwrap_or(0);
        binaries::find(newest, &self.bin_dirs).map_err(ProviderError::Failed)
    }

    /// Names the files of a new backup of `meta`'s service and dumps its roles.
    fn start_backup(&self, env: &EnvName, meta: &Meta, server: &Server) -> Result<BackupFiles> {
        let bin = self.newest_binaries(env)?;
        let dir = self.subdir("backups", Some(meta.service.id.as_str()))?;
        let stamp = now_ms();
        let files = BackupFiles {
            dump: dir.join(format!("{stamp}.dump")),
            roles: dir.join(format!("{stamp}.roles.sql")),
            database: dir.join(format!("{stamp}.database.sql")),
            partial: dir.join(format!(".{stamp}.dump.partial")),
            manifest: dir.join(format!("{stamp}.json")),
            stamp,
            bin,
        };
        self.dump_roles(server, &files.bin, &files.roles)?;
        self.dump_database(server, &files.bin, &files.database)?;
        Ok(files)
    }

    /// Dumps what belongs to the application database itself rather than to anything in
    /// it (its settings and its roles' settings in it, its comment, privileges and
    /// connection limit): pg_dump writes them only with `--create`, for no schema here.
    fn dump_database(&self, server: &Server, bin: &binaries::Binaries, to: &Path) -> Result<()> {
        let mut c = Command::new(bin.program("pg_dump"));
        c.env("PGOPTIONS", server::SESSION_OPTIONS)
            .args(server.conn_args(APP_DB))
            .args(["--create", "--schema-only", "--exclude-schema=*", "-Fp", "-f"])
            .arg(to);
        private_file(to)?;
        self.run_client(c, "pg_dump --create")
    }

    fn dump_roles(&self, server: &Server, bin: &binaries::Binaries, to: &Path) -> Result<()> {
        let mut c = Command::new(bin.program("pg_dumpall"));
        c.env("PGOPTIONS", server::SESSION_OPTIONS);
        let mut args = server.conn_args("postgres");
        args.truncate(args.len() - 2); // pg_dumpall takes -l, not -d, for its database
        c.args(args).args(["-l", "postgres", "--roles-only", "-f"]).arg(to);
        private_file(to)?;
        self.run_client(c, "pg_dumpall --roles-only")
    }

    /// Drops what a replication left behind on the servers of every environment: a
    /// subscription on a server that no longer streams, a slot or publication on a
    /// source that no copy streams from (a killed apply can leave either). A slot left
    /// behind would keep the source's WAL forever. Call with the lock held, after observe.
    pub fn tidy_replication(&self) -> Result<()> {
        let Ok(envs) = std::fs::read_dir(self.root.join("state")) else { return Ok(()) };
        for e in envs.flatten() {
            let Ok(env) = EnvName::parse(&e.file_name().to_string_lossy()) else { continue };
            let metas = self.metas(&env)?;
            let streaming: Vec<(String, ServiceId)> =
                metas.iter().filter_map(|m| Some((logical::name(&m.service.id), m.streaming_from.clone()?))).collect();
            for meta in metas.iter().filter(|m| m.service.status != Status::New) {
                let server = self.server(meta)?;
                if !server.is_running() {
                    continue;
                }
                let ours = |kind: &str, table: &str, column: &str| -> Result<Vec<String>> {
                    let sql = format!("SELECT {column} FROM {table} WHERE {column} LIKE 'pgconverge\\_%'");
                    let db = if kind == "slot" { "postgres" } else { APP_DB };
                    Ok(server.sql(db, &sql).map_err(ProviderError::Failed)?.lines().map(str::to_owned).collect())
                };
                let own_name = logical::name(&meta.service.id);
                for sub in ours("subscription", "pg_subscription", "subname")? {
                    if !streaming.iter().any(|(n, _)| *n == sub && *n == own_name) {
                        tracing::warn!(server = %meta.service.id, subscription = %sub, "dropping a subscription left behind");
                        logical::drop_replication(None, Some(&server), &sub).map_err(ProviderError::Failed)?;
                    }
                }
                let feeds = |n: &String| streaming.iter().any(|(s, from)| s == n && *from == meta.service.id);
                let mut left: Vec<String> = ours("slot", "pg_replication_slots", "slot_name")?;
                left.extend(ours("publication", "pg_publication", "pubname")?);
                left.sort();
                left.dedup();
                for name in left.iter().filter(|n| !feeds(n)) {
                    tracing::warn!(server = %meta.service.id, slot = %name, "dropping a replication slot left behind");
                    logical::drop_replication(Some(&server), None, name).map_err(ProviderError::Failed)?;
                }
            }
        }
        Ok(())
    }

    /// Makes a dumped backup durable and visible: sync, rename, manifest.
    fn finish_backup(&self, meta: &Meta, files: BackupFiles) -> Result<(Backup, Manifest)> {
        // Dumps hold the data and the roles' password hashes: for root's eyes only.
        for f in [&files.partial, &files.roles, &files.database] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).map_err(|e| io_err("protect", f, e))?;
            std::fs::File::open(f).and_then(|f| f.sync_all()).map_err(|e| io_err("sync", f, e))?;
        }
        crate::failpoint::hit("backup:dumped").map_err(ProviderError::Failed)?;
        std::fs::rename(&files.partial, &files.dump).map_err(|e| io_err("rename", &files.partial, e))?;
        let bytes = std::fs::metadata(&files.dump).map(|m| m.len()).unwrap_or(0);
        let manifest = Manifest {
            service: meta.service.id.clone(),
            source_version: meta.service.version,
            dump: files.dump,
            roles: files.roles,
            database: Some(files.database),
            bytes,
            taken_at_ms: files.stamp,
        };
        let text = serde_json::to_vec_pretty(&manifest).map_err(failed)?;
        tracing::info!(service = %meta.service.id, bytes, "backup taken");
        write_atomically(&files.manifest, &text, 0o644).map_err(|e| io_err("write", &files.manifest, e))?;
        let backup =
            Backup { of: meta.service.id.clone(), handle: files.manifest.to_string_lossy().into_owned(), bytes };
        Ok((backup, manifest))
    }

    /// Empties the application database of `id`'s server and restores the roles of a
    /// backup.
    fn prepare_restore(&self, env: &EnvName, id: &ServiceId, server: &Server, roles: &Path) -> Result<()> {
        load_settings(server, true)?;
        // Start from an empty database, so that a restore cut short by a crash can simply
        // be run again. A database no restore has touched is empty already (making one
        // costs a fifth of a second inside the write outage).
        let meta = self.load(env, id)?;
        self.update(env, id, |m| {
            m.untouched = false;
            m.loading = true;
        })?;
        if !meta.untouched {
            let secret = self.secret(env)?;
            let create = format!("CREATE DATABASE {APP_DB} OWNER {}", quote::ident(&secret.role));
            let drop_db = format!("DROP DATABASE IF EXISTS {APP_DB} WITH (FORCE)");
            server.sql_each("postgres", &[&drop_db, &create]).map_err(ProviderError::Failed)?;
        }
        // Roles first, so that ownership is preserved; existing roles only raise notices.
        let mut c = Command::new(server.bin.program("psql"));
        c.env("PGOPTIONS", server::SESSION_OPTIONS)
            .args(server.conn_args("postgres"))
            .args(["-X", "-q", "-f"])
            .arg(roles);
        self.run_client(c, "psql (roles)")?;
        crate::failpoint::hit("restore:roles").map_err(ProviderError::Failed)?;
        // The source may have been fenced when its roles were dumped.
        server.sql("postgres", &format!("ALTER ROLE {APP_ROLE} LOGIN")).map_err(ProviderError::Failed)?;
        create_restorer(server)
    }

    /// Ends a restore: statistics, so that the application's first queries on the copy
    /// are planned as well as on the source. With `verify`, the copy's fingerprint is
    /// taken at the same time, on the other core.
    fn finish_restore(&mut self, id: &ServiceId, server: &Server, verify: Verify) -> Result<()> {
        let started = std::time::Instant::now();
        let (analyzed, copy_fp) = std::thread::scope(|s| {
            let fp = (verify != Verify::None).then(|| s.spawn(|| fingerprint::take(server, APP_DB, verify)));
            let analyzed = server.sql(APP_DB, "ANALYZE");
            (analyzed, fp.and_then(|h| h.join().ok()).and_then(|r| r.ok()))
        });
        analyzed.map_err(ProviderError::Failed)?;
        tracing::debug!(seconds = started.elapsed().as_secs_f64(), "copy analyzed");
        crate::failpoint::hit("restore:restored").map_err(ProviderError::Failed)?;
        if let Some(fp) = copy_fp {
            self.fingerprints.insert(id.clone(), (verify, fp));
        }
        Ok(())
    }

    /// The catch-up proper: waits until the copy has every change up to the source's
    /// WAL position now, checks the schemas still agree, sets the sequences and ends the
    /// replication.
    fn finish_catch_up(&self, env: &EnvName, id: &ServiceId, source: &Server, target: &Server) -> Result<()> {
        let name = logical::name(id);
        // A copy is whole only when every change up to the fence is in it; anything less
        // is dropped (nothing is lost: the source keeps the data) and copied afresh.
        let give_up = |why: String| -> ProviderError {
            let _ = logical::drop_replication(Some(source), Some(target), &name);
            let _ = self.update(env, id, |m| m.streaming_from = None);
            ProviderError::Failed(format!(
                "{why}; the upgrade stopped with nothing lost, and the next apply copies afresh"
            ))
        };
        if !logical::subscribed(target, &name).map_err(ProviderError::Failed)? {
            return Err(give_up(format!("the replication into {id} ended before its catch-up was recorded")));
        }
        let unsynced = logical::unsynchronized_tables(target, &name).map_err(ProviderError::Failed)?;
        if !unsynced.is_empty() {
            return Err(give_up(format!(
                "the initial copy of {} table{} into {id} never finished ({})",
                unsynced.len(),
                if unsynced.len() == 1 { "" } else { "s" },
                unsynced.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let schema_changed = |diff: Vec<String>| format!("the schema changed during replication ({})", diff.join("; "));
        let lsn = logical::flushed_lsn(source).map_err(ProviderError::Failed)?;
        let waited = match logical::wait_caught_up(source, target, &name, &lsn, logical::CATCH_UP_LIMIT) {
            Ok(waited) => waited,
            Err(e) => {
                let diff = logical::schema_differences(source, target).unwrap_or_default();
                return Err(give_up(if diff.is_empty() { e } else { schema_changed(diff) }));
            }
        };
        let diff = logical::schema_differences(source, target).map_err(ProviderError::Failed)?;
        if !diff.is_empty() {
            return Err(give_up(schema_changed(diff)));
        }
        crate::failpoint::hit("catch_up:caught_up").map_err(ProviderError::Failed)?;
        let sequences = logical::sync_sequences(source, target).map_err(ProviderError::Failed)?;
        // The database's own properties, last: a read-only default or a short statement
        // timeout among them must not stop the copy's workers.
        let database = self.subdir("backups", Some(id.as_str()))?.join("replica.database.sql");
        self.dump_database(source, &self.newest_binaries(env)?, &database)?;
        restore_database(target, &database)?;
        let _ = std::fs::remove_file(&database);
        tracing::info!(service = %id, lsn = %lsn, ms = waited.as_millis() as u64, sequences, "copy caught up");
        self.update(env, id, |m| m.streaming_from = None)?;
        crate::failpoint::hit("catch_up:recorded").map_err(ProviderError::Failed)?;
        logical::drop_replication(Some(source), Some(target), &name).map_err(ProviderError::Failed)
    }

    fn run_client(&self, mut c: Command, what: &str) -> Result<()> {
        let program = c.get_program().to_string_lossy().into_owned();
        let out = c
            .stdin(Stdio::null())
            .output()
            .map_err(|e| ProviderError::Failed(format!("{what}: cannot run {program}: {e}")))?;
        if !out.status.success() {
            let text = String::from_utf8_lossy(&out.stderr);
            return Err(ProviderError::Failed(format!(
                "{what} failed ({}): {}",
                out.status,
                crate::process::last_lines(&text, 5)
            )));
        }
        Ok(())
    }
}

fn timed_fingerprint(
    server: &Server,
    how: Verify,
    what: &str,
) -> std::result::Result<fingerprint::Fingerprint, String> {
    let t = std::time::Instant::now();
    let fp = fingerprint::take(server, APP_DB, how);
    tracing::debug!(what, seconds = t.elapsed().as_secs_f64(), "fingerprint taken");
    fp
}

/// Puts `LOAD_SETTINGS` on a server, or takes them off; both take effect at once.
fn load_settings(server: &Server, on: bool) -> Result<()> {
    let statements: Vec<String> =
        LOAD_SETTINGS
            .iter()
            .map(|(name, value)| {
                if on {
                    format!("ALTER SYSTEM SET {name} = '{value}';")
                } else {
                    format!("ALTER SYSTEM RESET {name};")
                }
            })
            .collect();
    server
        .sql("postgres", &format!("{} SELECT pg_reload_conf();", statements.join(" ")))
        .map(drop)
        .map_err(ProviderError::Failed)
}

/// pg_dump's archive format: custom, compressed with lz4 where pg_dump has it (16 and
/// later), which costs the least CPU of the methods that shrink a dump well.
fn dump_format(bin: &binaries::Binaries) -> [&'static str; 3] {
    ["-Fc", "-Z", if bin.major >= 16 { "lz4" } else { "1" }]
}

/// pg_restore into the application database, all or nothing, as `RESTORER` (never a
/// superuser), with memory enough to sort most indexes without spilling to disk (a
/// session setting: the server's stay as they are).
fn restore_command(server: &Server) -> Command {
    let mut c = Command::new(server.bin.program("pg_restore"));
    let mut args = server.conn_args(APP_DB);
    if let Some(user) = args.iter().position(|a| a == "-U") {
        args[user + 1] = server::RESTORER.into();
    }
    c.args(args).args(["--exit-on-error", "--single-transaction", "--no-password", "--no-subscriptions"]);
    c.env("PGOPTIONS", format!("{} -c maintenance_work_mem=512MB", server::SESSION_OPTIONS));
    c
}

fn restorer_exists(server: &Server) -> Result<bool> {
    let sql = format!("SELECT count(*) FROM pg_roles WHERE rolname = {}", quote::literal(server::RESTORER));
    Ok(server.sql("postgres", &sql).map_err(ProviderError::Failed)?.trim() != "0")
}

/// Creates `RESTORER` on a server whose roles were just restored: a login without any
/// attribute of its own, a member of every other role that is not a superuser (so that
/// it may create objects for their owners and fill their tables), nothing more.
fn create_restorer(server: &Server) -> Result<()> {
    let r = quote::ident(server::RESTORER);
    if !restorer_exists(server)? {
        server
            .sql(
                "postgres",
                &format!("CREATE ROLE {r} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"),
            )
            .map_err(ProviderError::Failed)?;
    }
    let roles = server
        .sql(
            "postgres",
            &format!(
                "SELECT quote_ident(rolname) FROM pg_roles WHERE NOT rolsuper AND rolname !~ '^pg_' AND rolname <> {}",
                quote::literal(server::RESTORER)
            ),
        )
        .map_err(ProviderError::Failed)?;
    let grants: String = roles.lines().filter(|l| !l.is_empty()).map(|role| format!("GRANT {role} TO {r};")).collect();
    if !grants.is_empty() {
        server.sql("postgres", &grants).map_err(ProviderError::Failed)?;
    }
    Ok(())
}

/// How many times a database's size a copy of it needs free: its data on the new server,
/// the WAL written while it is loaded (kept whole: no checkpoint runs meanwhile), and the
/// kept dump, which is at most as large as the data.
const COPY_SPACE_FACTOR: u64 = 3;

fn database_size(server: &Server) -> Result<u64> {
    let out = server.sql(APP_DB, "SELECT pg_database_size(current_database())").map_err(ProviderError::Failed)?;
    out.trim().parse().map_err(|_| failed(format!("unexpected database size `{out}`")))
}

/// Bytes free for this process's user on the file system that holds `path` (or its
/// nearest existing parent), as `df` reports them.
fn free_bytes(path: &Path) -> Result<u64> {
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let out = Command::new("df")
        .arg("-Pk")
        .arg(existing)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| failed(format!("cannot run df: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| failed(format!("cannot read the free space of {} from df: {}", existing.display(), text.trim())))
}

/// The objects of the application database that a superuser owns (an extension is
/// named, not what it holds): restoring them would need superuser rights.
fn superuser_owned(server: &Server) -> Result<Vec<String>> {
    let user = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'";
    let not_extension = |oid: &str, class: &str| {
        format!("NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = {oid} AND d.classid = '{class}'::regclass AND d.deptype = 'e')")
    };
    let sql = format!(
        "SELECT kind || ' ' || name FROM ( \
           SELECT 'relation' AS kind, c.oid::regclass::text AS name, c.relowner AS owner FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {user} AND {} \
           UNION ALL SELECT 'function', p.oid::regprocedure::text, p.proowner FROM pg_proc p \
             JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {user} AND {} \
           UNION ALL SELECT 'type', t.oid::regtype::text, t.typowner FROM pg_type t \
             JOIN pg_namespace n ON n.oid = t.typnamespace WHERE {user} AND t.typrelid = 0 AND {} \
           UNION ALL SELECT 'schema', quote_ident(n.nspname), n.nspowner FROM pg_namespace n WHERE {user} AND n.nspname <> 'public' \
           UNION ALL SELECT 'extension', quote_ident(extname), extowner FROM pg_extension WHERE extname <> 'plpgsql' \
           UNION ALL SELECT 'event trigger', quote_ident(evtname), evtowner FROM pg_event_trigger \
           UNION ALL SELECT 'large object', oid::text, lomowner FROM pg_largeobject_metadata \
         ) o JOIN pg_roles r ON r.oid = o.owner WHERE r.rolsuper ORDER BY 1",
        not_extension("c.oid", "pg_class"),
        not_extension("p.oid", "pg_proc"),
        not_extension("t.oid", "pg_type"),
    );
    let out = server.sql(APP_DB, &sql).map_err(ProviderError::Failed)?;
    Ok(out.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect())
}

/// Gives a restored database the properties of its source's (`dump_database`), as the
/// superuser: the statements are pg_dump's, one per property, with every name and value
/// quoted by it; nothing else of the file is run.
fn restore_database(server: &Server, dumped: &Path) -> Result<()> {
    let text = std::fs::read_to_string(dumped).map_err(|e| io_err("read", dumped, e))?;
    let statements = database_statements(&text);
    if statements.is_empty() {
        return Ok(());
    }
    server.sql(APP_DB, &statements.join("\n")).map(drop).map_err(ProviderError::Failed)
}

/// The statements of a `pg_dump --create` script that set properties of the database
/// itself: its settings, its roles' settings in it, comment, privileges and connection
/// limit. Its creation, its owner (the copy's is pgconverge's to set) and the session
/// settings and psql commands around them are left out.
fn database_statements(script: &str) -> Vec<String> {
    let database = format!(" DATABASE {APP_DB}");
    let wanted = |s: &str| {
        (s.starts_with("ALTER DATABASE ") && !s.contains(" OWNER TO ") && !s.contains(" RENAME TO "))
            || s.starts_with("COMMENT ON DATABASE ")
            || s.starts_with("SECURITY LABEL ")
            || (s.starts_with("ALTER ROLE ") && s.contains(" IN DATABASE "))
            || ((s.starts_with("GRANT ") || s.starts_with("REVOKE ")) && s.contains(" ON DATABASE "))
    };
    let mut out = Vec::new();
    let (mut current, mut quote) = (String::new(), None::<char>);
    for line in script.lines() {
        if quote.is_none() && current.is_empty() && (line.starts_with('\\') || line.starts_with("--")) {
            continue;
        }
        for c in line.chars() {
            current.push(c);
            match (quote, c) {
                (None, '\'' | '"') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (None, ';') => {
                    let statement = std::mem::take(&mut current).trim().to_owned();
                    if wanted(&statement) && statement.contains(&database) {
                        out.push(statement);
                    }
                }
                _ => {}
            }
        }
        current.push('\n');
        if quote.is_none() && current.trim().is_empty() {
            current.clear();
        }
    }
    out
}

/// Gives what `RESTORER` made to the application role and drops it: it must not outlive
/// the restore.
fn drop_restorer(server: &Server) -> Result<()> {
    let r = quote::ident(server::RESTORER);
    if !restorer_exists(server)? {
        return Ok(());
    }
    server
        .sql(APP_DB, &format!("REASSIGN OWNED BY {r} TO {}; DROP OWNED BY {r};", quote::ident(APP_ROLE)))
        .and_then(|_| server.sql("postgres", &format!("DROP ROLE {r}")))
        .map(drop)
        .map_err(ProviderError::Failed)
}

/// Makes `path` a new, empty file that only its owner can read, for a client program to
/// write into: it opens what it finds, and would follow a symlink or keep looser modes.
fn private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    private::check_if_present(path, false).map_err(ProviderError::Failed)?;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|e| io_err("create", path, e))
}

/// Reads one of the provider's JSON files; a file that does not parse is reported as
/// damaged rather than guessed at.
fn read_record<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err("read", path, e))?;
    serde_json::from_str(&text).map_err(|e| ProviderError::Inconsistent(format!("{} is damaged: {e}", path.display())))
}

/// Removes the `.name.tmp-PID` and `.name.partial` files of writes a crash cut short.
fn remove_temporary_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && (name.contains(".tmp-") || name.ends_with(".partial")) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether `id` is a name `add` gives: `pg<major>-<8 hex digits>`.
fn made_here(id: &str) -> bool {
    let Some((major, tail)) = id.strip_prefix("pg").and_then(|rest| rest.split_once('-')) else { return false };
    !major.is_empty()
        && major.bytes().all(|b| b.is_ascii_digit())
        && tail.len() == 8
        && tail.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Removes the roles dumps of backups that never got their manifest.
fn remove_unfinished_backups(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(stamp) = name.strip_suffix(".roles.sql").or_else(|| name.strip_suffix(".database.sql")) {
            if !dir.join(format!("{stamp}.json")).exists() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Removes a password from a message that might quote it.
fn redact(message: &str, password: &str) -> String {
    if password.is_empty() {
        message.to_owned()
    } else {
        message.replace(password, "********")
    }
}

/// The copy steps proper; `Provider`'s methods add what a full disk explains.
impl LocalProvider {
    fn backup_now(&mut self, env: &EnvName, id: &ServiceId) -> Result<Backup> {
        let (meta, server) = self.running_server(env, id)?;
        let files = self.start_backup(env, &meta, &server)?;
        let mut c = Command::new(files.bin.program("pg_dump"));
        c.env("PGOPTIONS", server::SESSION_OPTIONS)
            .args(server.conn_args(APP_DB))
            .args(dump_format(&files.bin))
            .arg("-f")
            .arg(&files.partial);
        private_file(&files.partial)?;
        self.run_client(c, "pg_dump")?;
        Ok(self.finish_backup(&meta, files)?.0)
    }

    fn restore_now(&mut self, env: &EnvName, id: &ServiceId, backup: &Backup) -> Result<u64> {
        let manifest = self.manifest(backup)?;
        let (_, server) = self.running_server(env, id)?;
        self.prepare_restore(env, id, &server, &manifest.roles)?;
        let mut c = restore_command(&server);
        c.arg(&manifest.dump);
        self.run_client(c, "pg_restore")?;
        drop_restorer(&server)?;
        if let Some(database) = &manifest.database {
            restore_database(&server, database)?;
        }
        self.fingerprints.remove(id);
        self.finish_restore(id, &server, Verify::None)?;
        Ok(manifest.bytes)
    }

    fn backup_and_restore_now(
        &mut self,
        env: &EnvName,
        from: &ServiceId,
        id: &ServiceId,
        verify: Verify,
    ) -> Result<Backup> {
        self.fingerprints.remove(id);
        let (meta, source) = self.running_server(env, from)?;
        let (_, target) = self.running_server(env, id)?;
        let files = self.start_backup(env, &meta, &source)?;
        self.prepare_restore(env, id, &target, &files.roles)?;
        let mut dump = Command::new(files.bin.program("pg_dump"));
        dump.env("PGOPTIONS", server::SESSION_OPTIONS).args(source.conn_args(APP_DB)).args(dump_format(&files.bin));
        let restore = restore_command(&target);
        // The copy leaves about half a core idle: the source's fingerprint, which cannot
        // change while it is fenced, is taken meanwhile.
        let quiet = meta.service.fenced || !meta.service.status.visible();
        let fingerprint_source = verify != Verify::None && quiet && !self.fingerprints.contains_key(from);
        let started = std::time::Instant::now();
        let (streamed, source_fp) = std::thread::scope(|s| {
            let fp = fingerprint_source.then(|| s.spawn(|| fingerprint::take(&source, APP_DB, verify)));
            let streamed = stream::tee(dump, restore, &files.partial);
            (streamed, fp.and_then(|h| h.join().ok()).and_then(|r| r.ok()))
        });
        let streamed = streamed.map_err(ProviderError::Failed)?;
        tracing::debug!(seconds = started.elapsed().as_secs_f64(), "dump streamed into the restore");
        if let Some(e) = streamed.producer_error {
            return Err(ProviderError::Failed(e));
        }
        // The dump is whole even when the restore failed: keep it, so that the next apply
        // only has to restore.
        let (backup, manifest) = self.finish_backup(&meta, files)?;
        if let Some(e) = streamed.consumer_error {
            return Err(ProviderError::Failed(e));
        }
        drop_restorer(&target)?;
        if let Some(database) = &manifest.database {
            restore_database(&target, database)?;
        }
        if let Some(fp) = source_fp {
            self.fingerprints.insert(from.clone(), (verify, fp));
        }
        crate::failpoint::hit("copy:backed_up").map_err(ProviderError::Failed)?;
        self.finish_restore(id, &target, verify)?;
        Ok(backup)
    }

    fn replicate_now(&mut self, env: &EnvName, id: &ServiceId, from: &ServiceId) -> Result<u64> {
        self.fingerprints.remove(id);
        let (_, source) = self.running_server(env, from)?;
        let (_, target) = self.running_server(env, id)?;
        let name = logical::name(id);
        let objects =
            source.sql(APP_DB, "SELECT count(*) FROM pg_largeobject_metadata").map_err(ProviderError::Failed)?;
        if target.bin.major < 16 {
            return Err(ProviderError::Refused(format!(
                "strategy logical needs PostgreSQL 16 or later on the new server ({id} runs {}): before 16 a subscription applies changes with superuser rights; use `upgrade.strategy: dump_restore`",
                target.bin.major
            )));
        }
        if objects.trim() != "0" {
            return Err(ProviderError::Refused(format!(
                "{from} holds {} large objects, which logical replication does not carry; use `upgrade.strategy: dump_restore`",
                objects.trim()
            )));
        }
        // Servers started before pgconverge set wal_level = logical need a restart: a
        // second's break in the application's connections, before any write is blocked.
        if !logical::wal_level_is_logical(&source).map_err(ProviderError::Failed)? {
            tracing::warn!(service = %from, "restarting the server with wal_level = logical");
            source.stop().map_err(ProviderError::Failed)?;
            source.start().map_err(ProviderError::Failed)?;
        }
        // Until the initial copy of every table is done the copy is not streaming, and a
        // crash meanwhile leaves a subscription that tidy_replication drops.
        self.update(env, id, |m| m.streaming_from = None)?;
        logical::drop_replication(Some(&source), Some(&target), &name).map_err(ProviderError::Failed)?;
        // The schema first (replication carries rows only), then every row.
        let bin = self.newest_binaries(env)?;
        let work = self.subdir("backups", Some(id.as_str()))?;
        let (roles, schema) = (work.join("replica.roles.sql"), work.join("replica.schema.dump"));
        self.dump_roles(&source, &bin, &roles)?;
        let mut c = Command::new(bin.program("pg_dump"));
        c.env("PGOPTIONS", server::SESSION_OPTIONS)
            .args(source.conn_args(APP_DB))
            .args(["-Fc", "--schema-only", "--no-publications", "--no-subscriptions", "-f"])
            .arg(&schema);
        private_file(&schema)?;
        self.run_client(c, "pg_dump --schema-only")?;
        self.prepare_restore(env, id, &target, &roles)?;
        let mut c = restore_command(&target);
        c.arg(&schema);
        self.run_client(c, "pg_restore --schema-only")?;
        drop_restorer(&target)?;
        let full = logical::replica_identity_full(&source).map_err(ProviderError::Failed)?;
        if !full.is_empty() {
            tracing::info!(tables = %full.join(", "), "tables without a primary key replicate with REPLICA IDENTITY FULL");
        }
        // Half of what is free now: room for what the application writes during the
        // initial copy, and for the copy itself.
        let bound_mb = (free_bytes(&self.root)? / 2 / (1024 * 1024)).max(64);
        logical::subscribe(&source, &target, &name, bound_mb).map_err(ProviderError::Failed)?;
        crate::failpoint::hit("replicate:subscribed").map_err(ProviderError::Failed)?;
        let started = std::time::Instant::now();
        logical::wait_initial_copy(&target, &name).map_err(ProviderError::Failed)?;
        tracing::debug!(seconds = started.elapsed().as_secs_f64(), "initial copy done");
        // Only now is the copy streaming: every table holds its initial copy, and what
        // follows is the stream of changes the catch-up waits for.
        self.update(env, id, |m| m.streaming_from = Some(from.clone()))?;
        crate::failpoint::hit("replicate:streaming").map_err(ProviderError::Failed)?;
        // Statistics for the application's first queries, and the hint bits of every copied
        // row set now: the first read after a copy sets them, and with data checksums logs
        // each page again, which verify's counts would otherwise pay inside the outage.
        target.sql(APP_DB, "VACUUM (ANALYZE)").map_err(ProviderError::Failed)?;
        // Stream what the source wrote meanwhile, so that the catch-up inside the outage
        // has only the last moments' changes to wait for.
        let lsn = logical::flushed_lsn(&source).map_err(ProviderError::Failed)?;
        let lag = logical::wait_caught_up(&source, &target, &name, &lsn, logical::STREAM_LIMIT)
            .map_err(ProviderError::Failed)?;
        tracing::debug!(seconds = lag.as_secs_f64(), "streaming caught up before the fence");
        let _ = std::fs::remove_file(&schema);
        let bytes =
            target.sql(APP_DB, &format!("SELECT pg_database_size('{APP_DB}')")).map_err(ProviderError::Failed)?;
        Ok(bytes.trim().parse().unwrap_or(0))
    }

    fn catch_up_now(&mut self, env: &EnvName, id: &ServiceId, verify: Verify) -> Result<()> {
        self.fingerprints.remove(id);
        let meta = self.load(env, id)?;
        let Some(from) = meta.streaming_from else {
            return Err(ProviderError::Inconsistent(format!("{id} is not streaming a copy")));
        };
        let (_, source) = self.running_server(env, &from)?;
        let (_, target) = self.running_server(env, id)?;
        // The source is quiet from the fence on: its fingerprint for the verify that
        // follows is taken while the copy catches up, and the copy's as soon as it has
        // stopped changing, so that verify itself only compares.
        let fingerprint_source = verify != Verify::None && !self.fingerprints.contains_key(&from);
        let (copy_fp, source_fp) = std::thread::scope(|s| {
            let fp = fingerprint_source.then(|| s.spawn(|| timed_fingerprint(&source, verify, "source")));
            let copy_fp = self.finish_catch_up(env, id, &source, &target).and_then(|()| {
                (verify != Verify::None)
                    .then(|| timed_fingerprint(&target, verify, "copy").map_err(ProviderError::Failed))
                    .transpose()
            });
            (copy_fp, fp.and_then(|h| h.join().ok()).and_then(|r| r.ok()))
        });
        if let Some(fp) = copy_fp? {
            self.fingerprints.insert(id.clone(), (verify, fp));
        }
        if let Some(fp) = source_fp {
            self.fingerprints.insert(from, (verify, fp));
        }
        Ok(())
    }

    /// Adds to a failed copy step what a full disk explains: PostgreSQL names the file it
    /// could not write only in its log, and a client then sees a lost connection.
    fn disk_full(&self, e: ProviderError) -> ProviderError {
        let ProviderError::Failed(message) = e else { return e };
        let mut seen = Vec::new();
        if let Ok(servers) = std::fs::read_dir(self.root.join("servers")) {
            for log in servers.flatten().map(|e| e.path().join("log/server.log")) {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail = &text[text.len().saturating_sub(16 * 1024)..];
                if let Some(line) = tail.lines().rev().find(|l| l.contains("No space left on device")) {
                    seen.push(line.trim().to_owned());
                }
            }
        }
        let free = free_bytes(&self.root).ok();
        if seen.is_empty() && free.is_none_or(|f| f > 64 * 1024 * 1024) && !message.contains("No space left on device")
        {
            return ProviderError::Failed(message);
        }
        ProviderError::Failed(format!(
            "{message}; the disk that holds {} is full ({} free){}: free some space, then run `pgconverge apply` again",
            self.root.display(),
            free.map_or_else(|| "unknown".into(), crate::model::human_bytes),
            seen.first().map(|l| format!(", the server said: {l}")).unwrap_or_default()
        ))
    }
}

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
        self.check_root()
    }

    fn recover(&mut self) -> Result<()> {
        self.claim_root()?;
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
        self.check_root()?;
        let Ok(entries) = std::fs::read_dir(self.root.join("state")) else { return Ok(live) };
        for e in entries.flatten() {
            let Ok(env) = EnvName::parse(&e.file_name().to_string_lossy()) else { continue };
            let mut services = Vec::new();
            for mut meta in self.metas(&env)? {
                if meta.service.status != Status::New {
                    self.private_socket_dir(&env, &mut meta)?;
                    let server = self.server(&meta)?;
                    if !server.data_dir.join("PG_VERSION").exists() {
                        return Err(ProviderError::Inconsistent(format!(
                            "{} is recorded as {} but its data directory {} is missing",
                            meta.service.id,
                            meta.service.status.as_str(),
                            server.data_dir.display()
                        )));
                    }
                    if !server.is_running() {
                        tracing::warn!(service = %meta.service.id, "server was down; starting it");
                        server.start().map_err(ProviderError::Failed)?;
                    }
                    let pid = server.postmaster().unwrap_or(0);
                    if !self.answered.contains(&pid) {
                        let num = server.sql("postgres", "SHOW server_version_num").map_err(ProviderError::Failed)?;
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
            if !services.is_empty() {
                live.environments.insert(env, EnvLive { services });
            }
        }
        Ok(live)
    }

    fn add(&mut self, env: &EnvName, prefix: &Prefix, version: Major) -> Result<ServiceId> {
        self.check_binaries(version)?;
        let id = ServiceId::observed(&format!("pg{version}-{}", random_hex(4)?)).map_err(failed)?;
        let service =
            Service { id: id.clone(), version, prefix: prefix.clone(), status: Status::New, fenced: false, data: None };
        let meta =
            Meta { service, streaming_from: None, port: None, untouched: false, loading: false, socket_dir: None };
        self.store(env, &meta)?;
        Ok(id)
    }

    fn provision(&mut self, env: &EnvName, id: &ServiceId) -> Result<()> {
        let mut meta = self.load(env, id)?;
        self.create_server(env, &mut meta)?;
        meta.service.status = Status::Provisioned;
        meta.untouched = true;
        self.store(env, &meta)
    }

    fn fence(&mut self, env: &EnvName, id: &ServiceId) -> Result<()> {
        let (_, server) = self.running_server(env, id)?;
        // No new sessions, then end the ones there are: their uncommitted work rolls
        // back, and nothing can commit after this returns.
        let sql = format!(
            "ALTER ROLE {APP_ROLE} NOLOGIN; SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = '{APP_ROLE}';"
        );
        server.sql("postgres", &sql).map_err(ProviderError::Failed)?;
        self.update(env, id, |m| m.service.fenced = true)
    }

    fn unfence(&mut self, env: &EnvName, id: &ServiceId) -> Result<()> {
        self.fingerprints.remove(id);
        let (_, server) = self.running_server(env, id)?;
        server.sql("postgres", &format!("ALTER ROLE {APP_ROLE} LOGIN")).map_err(ProviderError::Failed)?;
        self.update(env, id, |m| m.service.fenced = false)
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

    fn replicate(&mut self, env: &EnvName, id: &ServiceId, from: &ServiceId) -> Result<u64> {
        let result = self.replicate_now(env, id, from);
        result.map_err(|e| self.disk_full(e))
    }

    fn catch_up(&mut self, env: &EnvName, id: &ServiceId, verify: Verify) -> Result<()> {
        let result = self.catch_up_now(env, id, verify);
        result.map_err(|e| self.disk_full(e))
    }

    fn verify(&mut self, env: &EnvName, id: &ServiceId, against: &ServiceId, how: Verify) -> Result<()> {
        let (_, copy) = self.running_server(env, id)?;
        let (_, source) = self.running_server(env, against)?;
        let mut taken = |id: &ServiceId| match self.fingerprints.remove(id) {
            Some((h, fp)) if h == how => Some(fp),
            _ => None,
        };
        let (a, b) = (taken(against), taken(id));
        // What is missing is taken now, both servers at once.
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| a.map_or_else(|| timed_fingerprint(&source, how, "source"), Ok));
            let b = b.map_or_else(|| timed_fingerprint(&copy, how, "copy"), Ok);
            (a.join().unwrap_or_else(|_| Err("the fingerprint thread panicked".into())), b)
        });
        let (a, b) = (a.map_err(ProviderError::Failed)?, b.map_err(ProviderError::Failed)?);
        let diff = fingerprint::differences(&a, &b);
        if !diff.is_empty() {
            let shown: Vec<String> = diff.iter().take(20).cloned().collect();
            return Err(ProviderError::Failed(format!(
                "the copy {id} differs from its source {against} ({} difference{}): {}{}",
                diff.len(),
                if diff.len() == 1 { "" } else { "s" },
                shown.join("; "),
                if diff.len() > 20 { "; …" } else { "" }
            )));
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
            self.create_server(env, meta)?;
        }
        let visible_after = |m: &Meta| matches!(m.service.status, Status::New | Status::Provisioned | Status::Attached);
        let mut lines = Vec::new();
        let mut default = None;
        for meta in metas.iter().filter(|m| visible_after(m)) {
            let dsn = self.dsn(env, meta)?;
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
        crate::failpoint::hit("deploy:env_written").map_err(ProviderError::Failed)?;
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
            logical::drop_replication(source.as_ref(), target.as_ref(), &logical::name(id))
                .map_err(ProviderError::Failed)?;
        }
        // The record goes first: a crash after it leaves only a server and files that no
        // record names, which `tidy` removes.
        let path = self.meta_path(env, id);
        std::fs::remove_file(&path).map_err(|e| io_err("remove", &path, e))?;
        crate::failpoint::hit("delete:record_removed").map_err(ProviderError::Failed)?;
        if meta.service.status != Status::New {
            self.server(&meta)?.stop().map_err(ProviderError::Failed)?;
            crate::failpoint::hit("delete:stopped").map_err(ProviderError::Failed)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_databases_own_properties_are_taken_from_a_create_script() {
        let script = r#"\restrict abc
SET statement_timeout = 0;
CREATE DATABASE app WITH TEMPLATE = template0;
ALTER DATABASE app OWNER TO app;
\connect app
COMMENT ON DATABASE app IS 'two;
lines ''quoted''';
ALTER DATABASE app SET search_path TO 'evil', "my;schema";
ALTER ROLE app IN DATABASE app SET lock_timeout TO '3s';
-- a comment; with a semicolon
REVOKE CONNECT,TEMPORARY ON DATABASE app FROM PUBLIC;
CREATE EXTENSION IF NOT EXISTS pgcrypto WITH SCHEMA public;
ALTER ROLE app SET work_mem TO '1MB';
"#;
        assert_eq!(
            database_statements(script),
            [
                "COMMENT ON DATABASE app IS 'two;\nlines ''quoted''';",
                r#"ALTER DATABASE app SET search_path TO 'evil', "my;schema";"#,
                "ALTER ROLE app IN DATABASE app SET lock_timeout TO '3s';",
                "REVOKE CONNECT,TEMPORARY ON DATABASE app FROM PUBLIC;",
            ]
        );
    }

    #[test]
    fn a_restore_takes_only_a_backup_of_its_own_root_and_service() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LocalConfig { root: Some(dir.path().join("root")), ..Default::default() };
        let p = LocalProvider::new(&config, &dir.path().join("pgconverge.yaml")).expect("provider");
        let (a, b) =
            (ServiceId::observed("pg15-00000001").expect("id"), ServiceId::observed("pg17-00000002").expect("id"));
        let backups = p.root.join("backups").join(a.as_str());
        std::fs::create_dir_all(&backups).expect("mkdir");
        let manifest = |of: &ServiceId| Manifest {
            service: of.clone(),
            source_version: Major::new(15).expect("major"),
            dump: backups.join("1.dump"),
            roles: backups.join("1.roles.sql"),
            database: None,
            bytes: 7,
            taken_at_ms: 1,
        };
        std::fs::write(backups.join("1.json"), serde_json::to_vec(&manifest(&a)).expect("json")).expect("write");
        std::fs::write(backups.join("2.json"), serde_json::to_vec(&manifest(&b)).expect("json")).expect("write");
        let handle = |name: &str| backups.join(name).to_string_lossy().into_owned();
        let backup = |of: &ServiceId, handle: String| Backup { of: of.clone(), handle, bytes: 7 };
        assert_eq!(p.manifest(&backup(&a, handle("1.json"))).expect("its own backup").bytes, 7);
        let refused = [
            backup(&b, handle("1.json")),                                   // not under b's backups
            backup(&a, handle("2.json")),                                   // a manifest of another service
            backup(&a, handle("1.dump")),                                   // not a manifest
            backup(&a, dir.path().join("1.json").to_string_lossy().into()), // outside root
        ];
        for (i, b) in refused.iter().enumerate() {
            assert!(matches!(p.manifest(b), Err(ProviderError::Inconsistent(_))), "case {i}");
        }
    }

    #[test]
    fn tidy_up_knows_the_servers_it_named() {
        assert!(made_here("pg17-3fa9b0c1"));
        for other in ["web1", "pg17-3fa9", "pg-3fa9b0c1", "pg17-3fa9b0cz", "nginx"] {
            assert!(!made_here(other), "{other}");
        }
    }
}
