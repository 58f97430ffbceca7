//! What is refused before anything is touched (a missing major, a copy the disk cannot
//! hold, objects owned by a superuser), and what a full disk explains after a failure.

use super::*;

/// How many times a database's size a copy of it needs free: its data on the new server,
/// the WAL written while it is loaded (kept whole: no checkpoint runs meanwhile), and the
/// kept dump, which is at most as large as the data.
pub(super) const COPY_SPACE_FACTOR: u64 = 3;

pub(super) fn database_size(server: &Server) -> Result<u64> {
    let out = server.sql(APP_DB, "SELECT pg_database_size(current_database())")?;
    out.trim().parse().map_err(|_| failed(format!("unexpected database size `{out}`")))
}

/// Bytes free for this process's user on the file system that holds `path` (or its
/// nearest existing parent), as `df` reports them.
pub(super) fn free_bytes(path: &Path) -> Result<u64> {
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
pub(super) fn superuser_owned(server: &Server) -> Result<Vec<String>> {
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
    let out = server.sql(APP_DB, &sql)?;
    Ok(out.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect())
}

impl LocalProvider {
    /// Fails with where it looked when `major`'s binaries are missing.
    pub fn check_binaries(&self, major: Major) -> Result<()> {
        binaries::find(major.get(), &self.bin_dirs).map(drop).map_err(ProviderError::from)
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
                    Action::Upgrade { service, from } => {
                        if let Some(major) = version_of(service) {
                            self.check_upgrade(&env_plan.name, from, major, self.transfer(&env_plan.name))?;
                        }
                    }
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
                    Action::Replicate { from, .. } | Action::Upgrade { from, .. } => from,
                    _ => continue,
                };
                let Ok(meta) = self.load(&env_plan.name, source) else { continue };
                let Ok(server) = self.server(&meta) else { continue };
                if !server.is_running() {
                    continue;
                }
                let size = database_size(&server)?;
                // pg_upgrade writes the data once more, or with `link` only its catalog.
                let factor = match action {
                    Action::Upgrade { .. } if self.transfer(&env_plan.name).consumes() => 0,
                    Action::Upgrade { .. } => 1,
                    _ => COPY_SPACE_FACTOR,
                };
                needed += size.saturating_mul(factor);
                let free = free_bytes(&self.root)?;
                if needed > free {
                    return Err(ProviderError::Refused(format!(
                        "environment {}: copying {source}'s database ({}) needs about {} free on the disk that holds {} (a dump and restore needs {COPY_SPACE_FACTOR} × the database: the new server's data, the WAL written while it is loaded, and the kept dump; pg_upgrade 1 ×, or nothing with `transfer: link`), and it has {}; free some space or point provider.local.root at a larger disk",
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

    /// How pg_upgrade moves files in `env`.
    fn transfer(&self, env: &EnvName) -> crate::config::Transfer {
        self.pg_upgrades.get(env).copied().unwrap_or(crate::config::Transfer::Auto)
    }

    /// Adds to a failed copy step what a full disk explains: PostgreSQL names the file it
    /// could not write only in its log, and a client then sees a lost connection.
    pub(super) fn disk_full(&self, e: ProviderError) -> ProviderError {
        let message = match &e {
            ProviderError::Failed(m) => m.clone(),
            ProviderError::Local(l) => l.to_string(),
            _ => return e,
        };
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
            return e;
        }
        ProviderError::Failed(format!(
            "{message}; the disk that holds {} is full ({} free){}: free some space, then run `pgconverge apply` again",
            self.root.display(),
            free.map_or_else(|| "unknown".into(), crate::model::human_bytes),
            seen.first().map(|l| format!(", the server said: {l}")).unwrap_or_default()
        ))
    }
}
