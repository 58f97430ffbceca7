//! The pg_upgrade strategy's copy: the old server's data directory upgraded into the new
//! server's with `pg_upgrade`, the old server stopped meanwhile. The new server was
//! provisioned bare (only the bootstrap superuser, as pg_upgrade needs) and is made again
//! with the old cluster's initdb settings should they differ; `pg_upgrade --check` runs
//! against the running old server before anything is fenced (`check_upgrade`).
//!
//! Crash safety: the new server's record says `untouched` while its cluster is as initdb
//! left it; the upgrade clears it before pg_upgrade writes there, and an upgrade that
//! finds it cleared makes the cluster afresh first. Every transfer but `link` leaves the
//! old server as it was: it is started again, and observe starts it after any crash.
//!
//! `link` gives the old server's files to the new one. pg_upgrade renames the old
//! cluster's `global/pg_control` away before it links, and renaming it back undoes the
//! upgrade for as long as nothing has started the new cluster. So the commit is the old
//! server's record saying `consumed_by` the new one, written after pg_upgrade and before
//! the new server's first start: a linked server (`link_from`) whose source's record does
//! not say so was never started, and `settle_links` rolls it back (the old server serves
//! again, the new one is made afresh); one whose source's does is finished (started,
//! LOGIN given back, ANALYZE) and its source is never started again. The ledger learns
//! of the copy from the same record (`ledger::Ledger::merge`).

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
        verify: Verify,
    ) -> Result<u64> {
        let (mut source, old) = self.running_server(env, from)?;
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
            self.make_afresh(env, &mut meta, &new, &like)?;
        }
        let transfer = resolve(transfer, &old, &new);
        let size = super::checks::database_size(&old)?;
        let link = transfer.consumes();
        if link && verify != Verify::None {
            // Verify compares the copy with its source, which will be gone: the source's
            // side is taken now, fenced, and kept in its record.
            source.fingerprint =
                Some((verify, fingerprint::timed(&old, APP_DB, verify, fingerprint::Part::All, "source")?));
            self.store(env, &source)?;
        }
        // Sessions of the superuser or of anyone else end with the server: the fence
        // already ended the application's.
        let t = std::time::Instant::now();
        old.stop()?;
        crate::failpoint::hit("upgrade:stopped")?;
        meta.untouched = false;
        meta.link_from = link.then(|| from.clone());
        self.store(env, &meta)?;
        let ports = (server::free_port()?, server::free_port()?);
        let stopped = t.elapsed().as_secs_f64();
        if let Err(e) = pg_upgrade(&old, &new, transfer, false, &new.socket_dir, ports) {
            // The old server serves again (fenced) while whoever runs apply reads why.
            if link {
                self.roll_back_link(env, meta, source)?;
            } else {
                let _ = old.start();
            }
            return Err(e.into());
        }
        crate::failpoint::hit("upgrade:transferred")?;
        let upgraded = t.elapsed().as_secs_f64();
        if link {
            // The commit: from here on the old server's files are the new one's.
            source.service.consumed_by = Some(id.clone());
            self.store(env, &source)?;
            crate::failpoint::hit("upgrade:consumed")?;
        }
        new.start()?;
        crate::failpoint::hit("upgrade:started")?;
        let started = t.elapsed().as_secs_f64();
        self.finish_upgrade(env, meta, &new)?;
        let analyzed = t.elapsed().as_secs_f64();
        if !link {
            old.start()?;
        }
        tracing::info!(service = %id, from = %from, transfer = transfer.as_str(), "upgraded with pg_upgrade");
        // Seconds since the old server began to stop, at the end of each step.
        tracing::debug!(stopped, upgraded, started, analyzed, restarted = t.elapsed().as_secs_f64(), "upgrade steps");
        Ok(size)
    }

    /// What follows the upgraded server's start: the application's role may log in again
    /// (it came over fenced, NOLOGIN as the fence left it on the old server; the copy is
    /// not fenced), and the planner's statistics are made. Then a linked server is done.
    fn finish_upgrade(&self, env: &EnvName, mut meta: Meta, new: &Server) -> Result<()> {
        new.sql("postgres", &format!("ALTER ROLE {} LOGIN", quote::ident(APP_ROLE)))?;
        analyze(new)?;
        if meta.link_from.take().is_some() {
            self.store(env, &meta)?;
        }
        Ok(())
    }

    /// Finishes or undoes what a crash left of a `link` upgrade in `env` (see the module
    /// text), before observe starts any server.
    pub(super) fn settle_links(&self, env: &EnvName) -> Result<()> {
        for meta in self.metas(env)? {
            let Some(from) = meta.link_from.clone() else { continue };
            let source = self.load(env, &from).ok();
            // A source whose record is gone was deleted, which only a consumed one may be.
            if source.as_ref().is_none_or(|s| s.service.consumed_by.as_ref() == Some(&meta.service.id)) {
                tracing::warn!(service = %meta.service.id, "finishing an upgrade that a crash interrupted");
                let (_, new) = self.running_server(env, &meta.service.id)?;
                self.finish_upgrade(env, meta, &new)?;
            } else if let Some(source) = source {
                tracing::warn!(service = %meta.service.id, from = %from, "undoing a pg_upgrade --link that did not finish");
                self.roll_back_link(env, meta, source)?;
            }
        }
        Ok(())
    }

    /// What `settle_links` would do, said and not done (observe without the lock).
    pub(super) fn tell_links(&self, env: &EnvName) -> Result<()> {
        for meta in self.metas(env)? {
            let Some(from) = meta.link_from.clone() else { continue };
            let source = self.load(env, &from).ok();
            let finish = source.as_ref().is_none_or(|s| s.service.consumed_by.as_ref() == Some(&meta.service.id));
            let what = if finish { "finishes" } else { "undoes" };
            tracing::warn!(service = %meta.service.id, from = %from, "a pg_upgrade --link was interrupted here (or an apply is running it): the next apply {what} it first; this shows the records as they are");
        }
        Ok(())
    }

    /// Undoes a `link` upgrade into `meta`'s server from `source`'s, which nothing has
    /// started since: the old cluster gets its `pg_control` back and serves again, the
    /// new one is made afresh (removing its links leaves the old files as they are).
    fn roll_back_link(&self, env: &EnvName, mut meta: Meta, source: Meta) -> Result<()> {
        let new = self.server(&meta)?;
        if let Some(pid) = upgrading(&new.data_dir) {
            return Err(ProviderError::Failed(format!(
                "pg_upgrade (pid {pid}) still runs into {}: wait for it to end, then run pgconverge again",
                meta.service.id
            )));
        }
        let old = self.server(&source)?;
        new.stop()?;
        old.stop()?; // a killed pg_upgrade may leave it running on a port of its own
        let global = old.data_dir.join("global");
        let (control, renamed) = (global.join("pg_control"), global.join("pg_control.old"));
        if !control.exists() && renamed.exists() {
            std::fs::rename(&renamed, &control).map_err(|e| io_err("rename", &renamed, e))?;
        }
        old.start()?;
        meta.link_from = None;
        self.make_afresh(env, &mut meta, &new, &old.settings()?)?;
        new.start()?;
        Ok(())
    }

    /// Makes `meta`'s stopped cluster again, bare, with `like`'s initdb settings.
    fn make_afresh(&self, env: &EnvName, meta: &mut Meta, new: &Server, like: &server::Settings) -> Result<()> {
        std::fs::remove_dir_all(&new.data_dir).map_err(|e| io_err("remove", &new.data_dir, e))?;
        new.init_like(like)?;
        meta.untouched = true;
        self.store(env, meta)
    }

    /// `pg_upgrade --check` of `from`'s running server against a new cluster of `major`,
    /// made for the check in a directory of its own and removed after: what pg_upgrade
    /// refuses (an extension the new major lacks, reg* columns, settings of the clusters)
    /// is said before the plan fences anything.
    pub(super) fn check_upgrade(
        &self,
        env: &EnvName,
        from: &ServiceId,
        major: Major,
        transfer: Transfer,
    ) -> Result<()> {
        let meta = self.load(env, from)?;
        let old = self.server(&meta)?;
        if !old.is_running() {
            return Ok(()); // observe starts it; the upgrade itself checks again
        }
        let slots = old.sql(
            "postgres",
            "SELECT current_setting('server_version_num') || '|' || setting FROM pg_settings WHERE name = 'max_slot_wal_keep_size'",
        )?;
        if let Some(why) = slot_keep_trap(&slots) {
            return Err(ProviderError::Refused(format!(
                "environment {env}: pg_upgrade cannot upgrade {from} to PostgreSQL {major}: {why}; nothing was touched"
            )));
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
                let ports = (old.port, server::free_port()?);
                Ok(pg_upgrade(&old, &scratch, transfer, true, &old.socket_dir, ports)?)
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

/// PostgreSQL 17.0 to 17.5 refuse to start in pg_upgrade's binary-upgrade mode when
/// their configuration sets `max_slot_wal_keep_size` (anything but -1): an old server of
/// those releases so configured would fail pg_upgrade inside the outage, and the live
/// `--check` never starts it. `answer` is the old server's `version_num|setting`.
fn slot_keep_trap(answer: &str) -> Option<String> {
    let (version, setting) = answer.trim().split_once('|')?;
    let version: u32 = version.parse().ok()?;
    ((170000..170006).contains(&version) && setting != "-1").then(|| {
        format!(
            "its server, release {}.{}, sets max_slot_wal_keep_size ({setting} MB), with which releases 17.0 to 17.5 \
             do not start for pg_upgrade; remove the setting from its postgresql.conf and postgresql.auto.conf for \
             the upgrade, or update it to 17.6 or later first",
            version / 10000,
            version % 100
        )
    })
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
/// stopped, unless `check`: then `--check` against `old` running on `ports.0`, with the
/// transfer's own checks). Its servers listen on `ports` and on a socket in `socket_dir`
/// only.
fn pg_upgrade(
    old: &Server,
    new: &Server,
    transfer: Transfer,
    check: bool,
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
        Transfer::Clone => c.arg("--clone"),
        Transfer::CopyFileRange => c.arg("--copy-file-range"),
        Transfer::Link => c.arg("--link"),
        // `auto` is resolved before; a check of it checks a plain copy.
        Transfer::Copy | Transfer::Auto => c.arg("--copy"),
    };
    if check {
        c.arg("--check");
    } else if server::throwaway() {
        c.arg("--no-sync");
    } else if new.bin.major >= 17 {
        // One syncfs per file system instead of an fsync per file.
        c.arg("--sync-method=syncfs");
    }
    // pg_upgrade says what failed last, after its list of passed checks, in up to 8 lines.
    new.run(c, "pg_upgrade", 8).map(drop)
}

/// The pid of a pg_upgrade still running into `data_dir` (one whose apply was killed
/// alone), read from /proc.
fn upgrading(data_dir: &Path) -> Option<u32> {
    let wanted = data_dir.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let pid: u32 = p.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
        let mut args = cmdline.split(|b| *b == 0);
        let program = args.next()?;
        let named = program.ends_with(b"pg_upgrade") && args.any(|a| a == wanted);
        named.then_some(pid)
    })
}

/// `--jobs` for pg_upgrade and vacuumdb: one per core.
fn jobs() -> String {
    std::thread::available_parallelism().map_or(1, |n| n.get()).to_string()
}

/// Planner statistics on the upgraded server, inside the outage, so that the
/// application's first queries are planned as before: pg_upgrade carries none before 18,
/// and from 18 on all but extended statistics, so only what is missing is made then.
/// Run as the superuser, with the search path pinned; ANALYZE evaluates the
/// application's index expressions as each table's owner.
fn analyze(server: &Server) -> Result<()> {
    let mut c = server.command("vacuumdb");
    c.env("PGOPTIONS", server::SESSION_OPTIONS)
        .args(["--all", "--analyze-only", "--quiet", "--host"])
        .arg(&server.socket_dir)
        .args(["--port", &server.port.to_string(), "--username", server::SUPERUSER])
        .args(["--jobs", &jobs()]);
    if server.bin.major >= 18 {
        c.arg("--missing-stats-only");
    }
    server.run(c, "vacuumdb --analyze-only", 6)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::slot_keep_trap;

    #[test]
    fn only_17_0_to_17_5_with_the_setting_fall_into_the_slot_trap() {
        let cases = [
            ("170000|1024", true),
            ("170005|1", true),
            ("170005|-1", false),
            ("170006|1024", false),
            ("160009|1024", false),
            ("180001|1024", false),
            ("garbage", false),
        ];
        for (answer, trapped) in cases {
            assert_eq!(slot_keep_trap(answer).is_some(), trapped, "{answer}");
        }
        let why = slot_keep_trap("170002|2048").expect("trapped");
        assert!(why.contains("17.2") && why.contains("2048 MB") && why.contains("17.6"), "{why}");
    }
}
