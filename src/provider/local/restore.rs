//! Restores: into an emptied database, roles first, in one transaction as a role that
//! is not a superuser; and a backup streamed straight into its restore.

use super::*;

/// pg_restore into the application database, all or nothing, as `RESTORER` (never a
/// superuser), with memory enough to sort most indexes without spilling to disk (a
/// session setting: the server's stay as they are).
pub(super) fn restore_command(server: &Server) -> Command {
    let mut c = Command::new(server.bin.program("pg_restore"));
    let mut args = server.conn_args(APP_DB);
    if let Some(user) = args.iter().position(|a| a == "-U") {
        args[user + 1] = server::RESTORER.into();
    }
    c.args(args).args(["--exit-on-error", "--single-transaction", "--no-password", "--no-subscriptions"]);
    c.env("PGOPTIONS", format!("{} -c maintenance_work_mem=512MB", server::SESSION_OPTIONS));
    c
}

pub(super) fn restorer_exists(server: &Server) -> Result<bool> {
    let sql = format!("SELECT count(*) FROM pg_roles WHERE rolname = {}", quote::literal(server::RESTORER));
    Ok(server.sql("postgres", &sql)?.trim() != "0")
}

/// Creates `RESTORER` on a server whose roles were just restored: a login without any
/// attribute of its own, a member of every other role that is not a superuser (so that
/// it may create objects for their owners and fill their tables), nothing more.
pub(super) fn create_restorer(server: &Server) -> Result<()> {
    let r = quote::ident(server::RESTORER);
    if !restorer_exists(server)? {
        server.sql(
            "postgres",
            &format!("CREATE ROLE {r} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"),
        )?;
    }
    let roles = server.sql(
        "postgres",
        &format!(
            "SELECT quote_ident(rolname) FROM pg_roles WHERE NOT rolsuper AND rolname !~ '^pg_' AND rolname <> {}",
            quote::literal(server::RESTORER)
        ),
    )?;
    let grants: String = roles.lines().filter(|l| !l.is_empty()).map(|role| format!("GRANT {role} TO {r};")).collect();
    if !grants.is_empty() {
        server.sql("postgres", &grants)?;
    }
    Ok(())
}

/// Gives a restored database the properties of its source's (`dump_database`), as the
/// superuser: the statements are pg_dump's, one per property, with every name and value
/// quoted by it; nothing else of the file is run.
pub(super) fn restore_database(server: &Server, dumped: &Path) -> Result<()> {
    let statements = database_script(dumped)?;
    if statements.is_empty() {
        return Ok(());
    }
    server.sql(APP_DB, &statements).map(drop).map_err(ProviderError::from)
}

/// `restore_database`'s statements, to run with others.
pub(super) fn database_script(dumped: &Path) -> Result<String> {
    let text = std::fs::read_to_string(dumped).map_err(|e| io_err("read", dumped, e))?;
    Ok(database_statements(&text).join("\n"))
}

/// The statements of a `pg_dump --create` script that set properties of the database
/// itself: its settings, its roles' settings in it, comment, privileges and connection
/// limit. Its creation, its owner (the copy's is pgconverge's to set) and the session
/// settings and psql commands around them are left out.
pub(super) fn database_statements(script: &str) -> Vec<String> {
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
pub(super) fn drop_restorer(server: &Server) -> Result<()> {
    let r = quote::ident(server::RESTORER);
    if !restorer_exists(server)? {
        return Ok(());
    }
    server
        .sql(APP_DB, &format!("REASSIGN OWNED BY {r} TO {}; DROP OWNED BY {r};", quote::ident(APP_ROLE)))
        .and_then(|_| server.sql("postgres", &format!("DROP ROLE {r}")))
        .map(drop)
        .map_err(ProviderError::from)
}

impl LocalProvider {
    /// Empties the application database of `id`'s server and restores the roles of a
    /// backup.
    pub(super) fn prepare_restore(&self, env: &EnvName, id: &ServiceId, server: &Server, roles: &Path) -> Result<()> {
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
            server.sql_each("postgres", &[&drop_db, &create])?;
        }
        // Roles first, so that ownership is preserved; existing roles only raise notices.
        let mut c = Command::new(server.bin.program("psql"));
        c.env("PGOPTIONS", server::SESSION_OPTIONS)
            .args(server.conn_args("postgres"))
            .args(["-X", "-q", "-f"])
            .arg(roles);
        self.run_client(c, "psql (roles)")?;
        crate::failpoint::hit("restore:roles")?;
        // The source may have been fenced when its roles were dumped.
        server.sql("postgres", &format!("ALTER ROLE {APP_ROLE} LOGIN"))?;
        create_restorer(server)
    }

    /// Ends a restore: statistics, so that the application's first queries on the copy
    /// are planned as well as on the source. With `verify`, the copy's fingerprint is
    /// taken at the same time, on the other core.
    pub(super) fn finish_restore(&mut self, id: &ServiceId, server: &Server, verify: Verify) -> Result<()> {
        let started = std::time::Instant::now();
        let (analyzed, copy_fp) = std::thread::scope(|s| {
            let fp = (verify != Verify::None).then(|| s.spawn(|| fingerprint::take(server, APP_DB, verify)));
            let analyzed = server.sql(APP_DB, "ANALYZE");
            (analyzed, fp.and_then(|h| h.join().ok()).and_then(|r| r.ok()))
        });
        analyzed?;
        tracing::debug!(seconds = started.elapsed().as_secs_f64(), "copy analyzed");
        crate::failpoint::hit("restore:restored")?;
        if let Some(fp) = copy_fp {
            self.fingerprints.insert(id.clone(), (verify, fp));
        }
        Ok(())
    }

    pub(super) fn restore_now(&mut self, env: &EnvName, id: &ServiceId, backup: &Backup) -> Result<u64> {
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

    pub(super) fn backup_and_restore_now(
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
        let streamed = streamed?;
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
        crate::failpoint::hit("copy:backed_up")?;
        self.finish_restore(id, &target, verify)?;
        Ok(backup)
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
}
