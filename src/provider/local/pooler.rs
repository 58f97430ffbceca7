//! The environment's PgBouncer (`provider.local.pooler: pgbouncer`): one per environment,
//! in transaction pooling, on a port of its own, with one pooled database per visible
//! prefix (its name in lower case) pointing at the server under that prefix. The env
//! file's DSNs name it, so they never change across upgrades.
//!
//! The fence pauses the prefix's pooled database (the application's queries wait, they
//! do not fail) before it revokes LOGIN, and gives up within `max_pause_seconds` when a
//! transaction held open keeps the pause from beginning (resumed, nothing fenced). The
//! deploy points the pooler at the servers it makes visible, reloads and resumes it.
//!
//! Crash safety: the pooler lives in a process group of its own and outlives pgconverge,
//! so a crash inside the pause leaves it paused (queries wait, nothing lost). Observe
//! starts it when it is down and makes its pauses agree with the fences the records
//! hold: a pooled database whose server is fenced is paused, any other resumed. It does
//! so once per process (and again after starting it): from then on the process's own
//! fences, unfences and deploys keep the two in step.
//!
//! ```text
//! root/poolers/<env>.json           its port and the admin's password (0600)
//! root/poolers/<env>/pgbouncer.ini   its configuration, users.txt its users (0600),
//!                                    its pid and log: the servers' user's directory
//! ```

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;

use super::*;

/// The pooler's admin user (its console: PAUSE, RESUME, RELOAD, SHOW).
const ADMIN: &str = "pgconverge";

use crate::config::POOLER_WAIT_MARGIN_SECONDS;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    port: u16,
    admin_password: String,
}

/// One environment's PgBouncer.
#[derive(Debug)]
pub(super) struct Pooler {
    program: PathBuf,
    /// A psql for its console: that of a major one of the environment's services runs.
    psql: Option<PathBuf>,
    dir: PathBuf,
    record: Record,
    run_as: Option<RunAs>,
}

/// Where PgBouncer is: `PGCONVERGE_PGBOUNCER` if set, else `PATH`, then Debian's
/// `/usr/sbin/pgbouncer`.
pub(super) fn program() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PGCONVERGE_PGBOUNCER") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(ProviderError::Refused(format!(
                "PGCONVERGE_PGBOUNCER names {}, which is not a file: install PgBouncer (`apt-get install pgbouncer`) or unset it",
                p.display()
            )))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("pgbouncer"))
        .chain([PathBuf::from("/usr/sbin/pgbouncer")])
        .find(|p| p.is_file())
        .ok_or_else(|| {
            ProviderError::Refused(
                "provider.local.pooler is pgbouncer, but PgBouncer is not installed (looked in PATH and /usr/sbin): \
                 install it (`apt-get install pgbouncer`), or remove `pooler`"
                    .into(),
            )
        })
}

/// A pooled database's name: the prefix in lower case (prefixes are `[A-Z][A-Z0-9_]*`).
pub(super) fn database(prefix: &Prefix) -> String {
    prefix.as_str().to_ascii_lowercase()
}

impl Pooler {
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The pooler's DSN for the application's role and one prefix.
    pub(super) fn dsn(&self, secret: &Secret, prefix: &Prefix) -> String {
        format!("postgres://{}:{}@127.0.0.1:{}/{}", secret.role, secret.password, self.record.port, database(prefix))
    }

    fn pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.file("pgbouncer.pid")).ok()?;
        let pid: i32 = text.trim().parse().ok().filter(|p| *p > 0)?;
        server::alive(pid).then_some(pid)
    }

    /// Writes its configuration: `targets`, each pooled database's server port.
    fn configure(&self, secret: &Secret, targets: &[(Prefix, u16)], bound: u32) -> Result<()> {
        let mut ini = String::from("[databases]\n");
        for (prefix, port) in targets {
            ini.push_str(&format!("{} = host=127.0.0.1 port={port} dbname={APP_DB}\n", database(prefix)));
        }
        let dir = self.dir.display();
        ini.push_str(&format!(
            "[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {}\nunix_socket_dir =\nauth_type = scram-sha-256\n\
             auth_file = {dir}/users.txt\nadmin_users = {ADMIN}\npool_mode = transaction\nmax_client_conn = 500\n\
             default_pool_size = 20\nquery_wait_timeout = {}\nlogfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n",
            self.record.port,
            bound + POOLER_WAIT_MARGIN_SECONDS
        ));
        // Passwords are letters and digits (records::secret, random_hex): nothing to escape.
        let users =
            format!("\"{}\" \"{}\"\n\"{ADMIN}\" \"{}\"\n", secret.role, secret.password, self.record.admin_password);
        for (name, text) in [("pgbouncer.ini", ini), ("users.txt", users)] {
            let path = self.file(name);
            write_atomically(&path, text.as_bytes(), 0o600).map_err(|e| io_err("write", &path, e))?;
            if let Some(r) = self.run_as {
                r.own(&path).map_err(|e| io_err("give the server user", &path, e))?;
            }
        }
        Ok(())
    }

    /// Starts it, detached in a process group of its own, as the servers' user.
    fn start(&self) -> Result<()> {
        // PgBouncer refuses to start while its pid file names a live process, and a dead
        // one left unreaped (by a container's first process) still counts for it.
        let pidfile = self.file("pgbouncer.pid");
        if self.pid().is_none() && pidfile.exists() {
            std::fs::remove_file(&pidfile).map_err(|e| io_err("remove", &pidfile, e))?;
        }
        let mut c = Command::new(&self.program);
        c.arg("-d").arg(self.file("pgbouncer.ini")).current_dir("/").process_group(0);
        if let Some(r) = self.run_as {
            c.uid(r.uid).gid(r.gid);
        }
        let out =
            c.stdin(Stdio::null()).stdout(Stdio::null()).output().map_err(|e| failed(format!("pgbouncer: {e}")))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.pid().is_none() || self.admin("SHOW VERSION", None).is_err() {
            if !out.status.success() || std::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(self.file("pgbouncer.log")).unwrap_or_default();
                return Err(failed(format!(
                    "PgBouncer did not start: {}{}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    log.lines().last().map(|l| format!("; its log ends: {l}")).unwrap_or_default()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(())
    }

    /// Runs `command` on its admin console; with `deadline`, gives up waiting for it then
    /// (the command may still take effect: PAUSE does, at once).
    fn admin(&self, command: &str, deadline: Option<std::time::Duration>) -> Result<String> {
        let psql = self.psql.as_ref().ok_or_else(|| failed("no PostgreSQL binaries to reach the pooler with"))?;
        let mut c = Command::new(psql);
        c.current_dir("/")
            .env("PGPASSWORD", &self.record.admin_password)
            .env("PGCONNECT_TIMEOUT", "5")
            .args(["-X", "-A", "-t", "-h", "127.0.0.1", "-p", &self.record.port.to_string(), "-U", ADMIN])
            .args(["-d", "pgbouncer", "-c", command])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().map_err(|e| failed(format!("psql: {e}")))?;
        if let Some(limit) = deadline {
            let until = std::time::Instant::now() + limit;
            while child.try_wait().map_err(failed)?.is_none() {
                if std::time::Instant::now() > until {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(ProviderError::Failed(format!("`{command}` did not finish within {limit:?}")));
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        let out = child.wait_with_output().map_err(failed)?;
        if !out.status.success() {
            return Err(failed(format!("PgBouncer's `{command}`: {}", String::from_utf8_lossy(&out.stderr).trim())));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    }

    /// The pooled databases: name, the port of the server it points at, paused.
    fn databases(&self) -> Result<Vec<(String, u16, bool)>> {
        // SHOW DATABASES: name, host, port, …, `paused` twelfth.
        let out = self.admin("SHOW DATABASES", None)?;
        Ok(out
            .lines()
            .map(|l| l.split('|').collect::<Vec<_>>())
            .filter(|f| f.len() > 11 && f[0] != "pgbouncer")
            .filter_map(|f| Some((f[0].to_owned(), f[2].parse().ok()?, f[11] == "1")))
            .collect())
    }

    /// The pooled databases that are paused.
    fn paused(&self) -> Result<Vec<String>> {
        Ok(self.databases()?.into_iter().filter(|d| d.2).map(|d| d.0).collect())
    }

    /// The pooled database that points at the server on `port`, if any.
    fn database_of(&self, port: Option<u16>) -> Result<Option<String>> {
        Ok(self.databases()?.into_iter().find(|d| Some(d.1) == port).map(|d| d.0))
    }

    fn resume(&self, db: &str) -> Result<()> {
        if self.paused()?.iter().any(|p| p == db) {
            self.admin(&format!("RESUME {db}"), None)?;
        }
        Ok(())
    }
}

impl LocalProvider {
    /// `env`'s pooler, if the config asks for one (its record made the first time).
    pub(super) fn pooler(&self, env: &EnvName) -> Result<Option<Pooler>> {
        if self.pooler.is_none() {
            return Ok(None);
        }
        let program = program()?;
        let poolers = self.subdir("poolers", None)?;
        // Its own directory is the servers' user's, as a server's is: PgBouncer runs as
        // that user and writes its pid and log there.
        let dir = poolers.join(env.as_str());
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(ProviderError::Inconsistent(format!("{} is not a directory", dir.display()))),
            Err(_) => {
                std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| io_err("create", &dir, e))?;
                if let Some(r) = self.run_as {
                    r.own(&dir).map_err(|e| io_err("give the server user", &dir, e))?;
                }
            }
        }
        let path = poolers.join(format!("{env}.json"));
        let record = if path.exists() {
            read_record(&path)?
        } else {
            let record = Record { port: server::free_port()?, admin_password: random_hex(24)? };
            self.save_pooler_record(env, &record)?;
            record
        };
        let psql = self
            .metas(env)?
            .iter()
            .find_map(|m| binaries::find(m.service.version.get(), &self.bin_dirs).ok())
            .map(|b| b.program("psql"));
        Ok(Some(Pooler { program, psql, dir, record, run_as: self.run_as }))
    }

    /// The longest pause `env`'s config allows.
    pub(super) fn pause_bound(&self, env: &EnvName) -> u32 {
        self.pause_bounds.get(env).copied().unwrap_or_else(|| crate::config::Upgrade::default().max_pause_seconds)
    }

    /// The pooler's targets: each service in `metas` that the application will see, by
    /// prefix.
    fn targets(metas: &[Meta], visible: impl Fn(&Meta) -> bool) -> Vec<(Prefix, u16)> {
        metas.iter().filter(|m| visible(m)).filter_map(|m| Some((m.service.prefix.clone(), m.port?))).collect()
    }

    /// Observe's part: the pooler runs, and its pauses agree with the fences recorded of
    /// the servers it points at (see the module text).
    pub(super) fn settle_pooler(&mut self, env: &EnvName, metas: &[Meta]) -> Result<()> {
        let Some(mut pooler) = self.pooler(env)? else { return Ok(()) };
        let visible = |m: &Meta| m.service.status.visible();
        if !metas.iter().any(visible) {
            return Ok(()); // nothing to point it at yet: deploy starts it
        }
        if pooler.pid().is_none() {
            tracing::warn!(env = %env, "the pooler was down; starting it");
            self.start_pooler(env, &mut pooler, &Self::targets(metas, visible))?;
            self.pooler_checked.remove(env);
        }
        // Once this process has made the pauses agree with the fences, its own actions
        // keep them so (asking again costs a program start after every action, inside the
        // pause too).
        if !self.pooler_checked.insert(env.clone()) {
            return Ok(());
        }
        for (db, port, paused) in pooler.databases()? {
            let fenced = metas.iter().any(|m| m.port == Some(port) && m.service.fenced);
            if fenced && !paused {
                // Nothing runs on a fenced server: PAUSE returns at once.
                pooler.admin(&format!("PAUSE {db}"), Some(std::time::Duration::from_secs(5)))?;
            } else if fenced && self.told_paused.insert(env.clone()) {
                tracing::warn!(env = %env, database = %db, "the pooler is paused: the application's queries wait until an apply finishes the upgrade or gives it up");
            } else if !fenced && paused {
                tracing::warn!(env = %env, database = %db, "the pooler was left paused on a server that is not fenced; resuming it");
                pooler.admin(&format!("RESUME {db}"), None)?;
            }
        }
        Ok(())
    }

    /// Some environment under the root has a pooler (what `init` declares).
    pub fn has_poolers(&self) -> bool {
        std::fs::read_dir(self.root.join("poolers"))
            .is_ok_and(|d| d.flatten().any(|e| e.path().extension().is_some_and(|x| x == "json")))
    }

    /// What `settle_pooler` would do, said and not done (observe without the lock).
    pub(super) fn tell_pooler(&mut self, env: &EnvName, metas: &[Meta]) -> Result<()> {
        // `pooler` makes the record of one not set up yet: none is made here.
        if !self.root.join("poolers").join(format!("{env}.json")).exists() {
            return Ok(());
        }
        let Some(pooler) = self.pooler(env)? else { return Ok(()) };
        if !metas.iter().any(|m| m.service.status.visible()) {
            return Ok(());
        }
        if pooler.pid().is_none() {
            tracing::warn!(env = %env, "the pooler is down: the application cannot connect until the next apply starts it");
            return Ok(());
        }
        for (db, port, paused) in pooler.databases()? {
            let fenced = metas.iter().any(|m| m.port == Some(port) && m.service.fenced);
            if fenced && !paused {
                tracing::warn!(env = %env, database = %db, "the pooler is not paused on a fenced server: the application's queries fail until the next apply pauses it");
            } else if fenced && self.told_paused.insert(env.clone()) {
                tracing::warn!(env = %env, database = %db, "the pooler is paused: the application's queries wait until an apply finishes the upgrade or gives it up");
            } else if !fenced && paused {
                tracing::warn!(env = %env, database = %db, "the pooler is left paused on a server that is not fenced (or an apply is pausing it): the next apply resumes it");
            }
        }
        Ok(())
    }

    /// The fence's first half: pauses `meta`'s pooled database, waiting at most the bound
    /// for transactions under way to end; one held open gives the pause up, the pooler
    /// resumed and the sessions that held it named.
    pub(super) fn pause(&self, env: &EnvName, meta: &Meta, server: &Server) -> Result<()> {
        let Some(pooler) = self.pooler(env)? else { return Ok(()) };
        let Some(db) = pooler.database_of(meta.port)? else { return Ok(()) };
        let bound = self.pause_bound(env);
        let t = std::time::Instant::now();
        match pooler.admin(&format!("PAUSE {db}"), Some(std::time::Duration::from_secs(bound.into()))) {
            Ok(_) => {
                tracing::info!(env = %env, database = %db, seconds = t.elapsed().as_secs_f64(), "pooler paused");
                Ok(())
            }
            Err(e) => {
                pooler.admin(&format!("RESUME {db}"), None)?;
                let holders = server
                    .sql(
                        "postgres",
                        &format!(
                            "SELECT pid || ' ' || coalesce(nullif(application_name, ''), '-') || ' ' || state || ' since ' || \
                             to_char(coalesce(xact_start, query_start), 'HH24:MI:SS') FROM pg_stat_activity \
                             WHERE usename = '{APP_ROLE}' AND state <> 'idle' ORDER BY xact_start"
                        ),
                    )
                    .unwrap_or_default();
                let holders: Vec<&str> = holders.lines().collect();
                Err(ProviderError::Failed(format!(
                    "environment {env}: the pooler could not pause {} within upgrade.max_pause_seconds ({bound} s): \
                     a transaction was held open; it was resumed on the old server and nothing was fenced ({e}). \
                     Sessions that held it (pid, application_name, state, since): {}. End them, or raise \
                     max_pause_seconds, then run apply again",
                    meta.service.prefix,
                    if holders.is_empty() { "none left".to_owned() } else { holders.join("; ") }
                )))
            }
        }
    }

    /// Unfence's last step: the application's queries reach `meta`'s server again.
    pub(super) fn unpause(&self, env: &EnvName, meta: &Meta) -> Result<()> {
        let Some(pooler) = self.pooler(env)? else { return Ok(()) };
        match pooler.database_of(meta.port)? {
            Some(db) => pooler.resume(&db),
            None => Ok(()),
        }
    }

    /// Deploy's part: the pooler pointed at the servers the application sees from now
    /// on, reloaded, resumed.
    pub(super) fn repoint(&self, env: &EnvName, metas: &[Meta], visible: impl Fn(&Meta) -> bool) -> Result<()> {
        let Some(mut pooler) = self.pooler(env)? else { return Ok(()) };
        if pooler.pid().is_none() {
            return self.start_pooler(env, &mut pooler, &Self::targets(metas, &visible));
        }
        pooler.configure(&self.secret(env)?, &Self::targets(metas, &visible), self.pause_bound(env))?;
        pooler.admin("RELOAD", None)?;
        for db in pooler.paused()? {
            pooler.admin(&format!("RESUME {db}"), None)?;
        }
        Ok(())
    }

    /// Configures and starts `pooler`. Its port, once an env file names it, is the
    /// application's for good; until then a port taken meanwhile is traded for another.
    fn start_pooler(&self, env: &EnvName, pooler: &mut Pooler, targets: &[(Prefix, u16)]) -> Result<()> {
        let mut attempts = 0;
        loop {
            pooler.configure(&self.secret(env)?, targets, self.pause_bound(env))?;
            let started = pooler.start();
            let published = std::fs::read_to_string(self.env_file_path(env))
                .is_ok_and(|t| t.contains(&format!("@127.0.0.1:{}/", pooler.record.port)));
            match started {
                Err(e) if !published && attempts < 3 => {
                    tracing::debug!(error = %e, "the pooler did not start; trying another port");
                    attempts += 1;
                    pooler.record.port = server::free_port()?;
                    self.save_pooler_record(env, &pooler.record)?;
                }
                other => return other,
            }
        }
    }

    fn save_pooler_record(&self, env: &EnvName, record: &Record) -> Result<()> {
        let path = self.subdir("poolers", None)?.join(format!("{env}.json"));
        let text = serde_json::to_vec(record).map_err(failed)?;
        write_atomically(&path, &text, 0o600).map_err(|e| io_err("write", &path, e))
    }

    /// The DSN the application uses for `meta`'s prefix: the pooler's, or its server's.
    pub(super) fn app_dsn(&self, env: &EnvName, meta: &Meta) -> Result<String> {
        match self.pooler(env)? {
            Some(pooler) => Ok(pooler.dsn(&self.secret(env)?, &meta.service.prefix)),
            None => self.dsn(env, meta),
        }
    }
}
