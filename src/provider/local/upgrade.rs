//! The pg_upgrade strategy's copy: the old server's data directory upgraded into the new
//! server's with `pg_upgrade`, the old server stopped meanwhile and started again after,
//! as it was (no transfer offered here consumes it). The new server was provisioned bare
//! (only the bootstrap superuser, as pg_upgrade needs) and is made again with the old
//! cluster's initdb settings should they differ; `pg_upgrade --check` runs against the
//! running old server before anything is fenced (`check_upgrade`).
//!
//! Crash safety: the new server's record says `untouched` while its cluster is as initdb
//! left it; the upgrade clears it before pg_upgrade writes there, and an upgrade that
//! finds it cleared makes the cluster afresh first. The old server is only ever stopped
//! and started: observe starts it again after any crash.

use super::error::Error;
use super::*;
use crate::config::Transfer;

impl LocalProvider {
    /// `Provider::upgrade`: returns the bytes of the application's database moved.
    pub(super) fn upgrade_now(
        &mut self,
        env: &EnvName,
        id: &ServiceId,
        from: &ServiceId,
        transfer: Transfer,
    ) -> Result<u64> {
        let (_, old) = self.running_server(env, from)?;
        let like = old.settings()?;
        let mut meta = self.load(env, id)?;
        let new = self.server(&meta)?;
        // Bare: only what initdb makes (a server provisioned for another strategy has the
        // application's role and database, which pg_upgrade refuses to overwrite).
        let bare = meta.untouched
            && new.is_running()
            && new.sql(
                "postgres",
                "SELECT count(*) FROM pg_database WHERE datname NOT IN ('postgres', 'template0', 'template1')",
            )? == "0"
            && new.sql("postgres", "SELECT count(*) FROM pg_roles WHERE rolname !~ '^pg_'")? == "1"
            // initdb's settings as the old cluster's (provision, not knowing the source,
            // gave it pgconverge's own).
            && new.settings()? == like;
        new.stop()?;
        if !bare {
            // An earlier attempt got as far as pg_upgrade: its files are no start.
            std::fs::remove_dir_all(&new.data_dir).map_err(|e| io_err("remove", &new.data_dir, e))?;
            new.init_like(&like)?;
            meta.untouched = true;
            self.store(env, &meta)?;
        }
        let transfer = resolve(transfer, &old, &new);
        let size = super::checks::database_size(&old)?;
        // Sessions of the superuser or of anyone else end with the server: the fence
        // already ended the application's.
        let t = std::time::Instant::now();
        old.stop()?;
        crate::failpoint::hit("upgrade:stopped")?;
        meta.untouched = false;
        self.store(env, &meta)?;
        let ports = (server::free_port()?, server::free_port()?);
        let stopped = t.elapsed().as_secs_f64();
        if let Err(e) = pg_upgrade(&old, &new, Some(transfer), &new.socket_dir, ports) {
            // Nothing of the old server was changed: it serves again (fenced) while
            // whoever runs apply reads why.
            let _ = old.start();
            return Err(e.into());
        }
        crate::failpoint::hit("upgrade:transferred")?;
        let upgraded = t.elapsed().as_secs_f64();
        new.start()?;
        crate::failpoint::hit("upgrade:started")?;
        // The application's role came over fenced (NOLOGIN, as the fence left it on the
        // old server); the copy is not fenced.
        new.sql("postgres", &format!("ALTER ROLE {} LOGIN", quote::ident(APP_ROLE)))?;
        let started = t.elapsed().as_secs_f64();
        analyze(&new)?;
        let analyzed = t.elapsed().as_secs_f64();
        old.start()?;
        tracing::info!(service = %id, from = %from, transfer = transfer.as_str(), "upgraded with pg_upgrade");
        // Seconds since the old server began to stop, at the end of each step.
        tracing::debug!(stopped, upgraded, started, analyzed, restarted = t.elapsed().as_secs_f64(), "upgrade steps");
        Ok(size)
    }

    /// `pg_upgrade --check` of `from`'s running server against a new cluster of `major`,
    /// made for the check in a directory of its own and removed after: what pg_upgrade
    /// refuses (an extension the new major lacks, reg* columns, settings of the clusters)
    /// is said before the plan fences anything.
    pub(super) fn check_upgrade(&self, env: &EnvName, from: &ServiceId, major: Major) -> Result<()> {
        let meta = self.load(env, from)?;
        let old = self.server(&meta)?;
        if !old.is_running() {
            return Ok(()); // observe starts it; the upgrade itself checks again
        }
        // Named as `add` names servers, so that tidy removes what a crash leaves of it.
        let id = format!("pg{major}-{}", random_hex(4)?);
        let dir = self.subdir("servers", None)?.join(&id);
        let scratch = Server {
            bin: binaries::find(major.get(), &self.bin_dirs)?,
            data_dir: dir.join("data"),
            socket_dir: old.socket_dir.clone(),
            log_file: dir.join("log").join("server.log"),
            port: 0,
            run_as: self.run_as,
        };
        let checked =
            old.settings().and_then(|like| scratch.init_like(&like)).map_err(ProviderError::from).and_then(|()| {
                missing_extensions(&old, &scratch)?;
                // A live check reaches the old server where it listens; the new cluster's
                // short start shares its socket directory.
                Ok(pg_upgrade(&old, &scratch, None, &old.socket_dir, (old.port, server::free_port()?))?)
            });
        let _ = scratch.stop();
        let _ = std::fs::remove_dir_all(&dir);
        checked.map_err(|e| {
            ProviderError::Refused(format!(
                "environment {env}: pg_upgrade refuses to upgrade {from} to PostgreSQL {major}: {e}; nothing was touched. \
                 Fix what it names, or use `upgrade.strategy: dump_restore` for this upgrade"
            ))
        })
    }
}

/// Refuses extensions of the old server that the new major's installation lacks:
/// pg_upgrade's own check finds only missing libraries, and a missing SQL-only extension
/// would fail it halfway, inside the outage. `new` is started on a free port for the
/// question and stopped again.
fn missing_extensions(old: &Server, new: &Server) -> Result<()> {
    let mut asked = new.clone();
    asked.port = server::free_port()?;
    asked.start()?;
    let available = asked.sql("postgres", "SELECT name FROM pg_available_extensions");
    asked.stop()?;
    let available = available?;
    let mut missing = Vec::new();
    for db in ["postgres", APP_DB] {
        let installed = old.sql(db, "SELECT extname FROM pg_extension ORDER BY 1")?;
        let lacking = installed.lines().filter(|n| !n.is_empty() && !available.lines().any(|a| a == *n));
        missing.extend(lacking.map(|n| format!("{n} (database {db})")));
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(ProviderError::Failed(format!(
        "extension {} is not installed for PostgreSQL {} on this machine (install it for that major first, or drop it)",
        missing.join(", "),
        new.bin.major
    )))
}

/// What `auto` means for these two servers: `clone` where the file system reflinks
/// (tried with `cp --reflink=always` on a file of the old cluster), else `copy_file_range`
/// where the new pg_upgrade has it (17+), else `copy`.
fn resolve(transfer: Transfer, old: &Server, new: &Server) -> Transfer {
    if transfer != Transfer::Auto {
        return transfer;
    }
    let probe = new.data_dir.join(".pgconverge-reflink");
    let reflinks = Command::new("cp")
        .arg("--reflink=always")
        .arg(old.data_dir.join("PG_VERSION"))
        .arg(&probe)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _ = std::fs::remove_file(&probe);
    if reflinks {
        Transfer::Clone
    } else if new.bin.major >= 17 {
        Transfer::CopyFileRange
    } else {
        Transfer::Copy
    }
}

/// Runs the new major's pg_upgrade as the servers' user, from `old` into `new` (both
/// stopped, unless `transfer` is `None`: then `--check` against `old` running on
/// `ports.0`). Its servers listen on `ports` and on a socket in `socket_dir` only.
fn pg_upgrade(
    old: &Server,
    new: &Server,
    transfer: Option<Transfer>,
    socket_dir: &Path,
    ports: (u16, u16),
) -> std::result::Result<(), Error> {
    let mut c = new.command("pg_upgrade");
    // pg_upgrade writes its reports into the new cluster (15+), but also wants a working
    // directory its user can write.
    c.current_dir(socket_dir)
        .arg("--old-bindir")
        .arg(&old.bin.dir)
        .arg("--new-bindir")
        .arg(&new.bin.dir)
        .arg("--old-datadir")
        .arg(&old.data_dir)
        .arg("--new-datadir")
        .arg(&new.data_dir)
        .arg("--socketdir")
        .arg(socket_dir)
        .args(["--old-port", &ports.0.to_string(), "--new-port", &ports.1.to_string()])
        .args(["--username", server::SUPERUSER]);
    c.args(["--jobs", &jobs()]);
    match transfer {
        None => {
            c.arg("--check");
        }
        Some(t) => {
            c.arg(match t {
                Transfer::Clone => "--clone",
                Transfer::CopyFileRange => "--copy-file-range",
                Transfer::Copy | Transfer::Auto => "--copy",
            });
            if server::throwaway() {
                c.arg("--no-sync");
            } else if new.bin.major >= 17 {
                // One syncfs per file system instead of an fsync per file.
                c.arg("--sync-method=syncfs");
            }
        }
    }
    // pg_upgrade says what failed last, after its list of passed checks, in up to 8 lines.
    new.run(c, "pg_upgrade", 8).map(drop)
}

/// `--jobs` for pg_upgrade and vacuumdb: one per core.
fn jobs() -> String {
    std::thread::available_parallelism().map_or(1, |n| n.get()).to_string()
}

/// Fresh planner statistics on the upgraded server (pg_upgrade carries none before 18),
/// inside the outage, so that the application's first queries are planned as before.
/// Run as the superuser, with the search path pinned; ANALYZE evaluates the
/// application's index expressions as each table's owner.
fn analyze(server: &Server) -> Result<()> {
    let mut c = server.command("vacuumdb");
    c.env("PGOPTIONS", server::SESSION_OPTIONS)
        .args(["--all", "--analyze-only", "--quiet", "--host"])
        .arg(&server.socket_dir)
        .args(["--port", &server.port.to_string(), "--username", server::SUPERUSER])
        .args(["--jobs", &jobs()]);
    server.run(c, "vacuumdb --analyze-only", 6)?;
    Ok(())
}
