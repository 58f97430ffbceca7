//! What a crash leaves behind, removed with the lock held: servers no record names,
//! half-written files, and replication slots and subscriptions nothing streams through.

use super::*;

/// Removes the `.name.tmp-PID` and `.name.partial` files of writes a crash cut short.
pub(super) fn remove_temporary_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && (name.contains(".tmp-") || name.ends_with(".partial")) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether `id` is a name `add` gives: `pg<major>-<8 hex digits>`.
pub(super) fn made_here(id: &str) -> bool {
    let Some((major, tail)) = id.strip_prefix("pg").and_then(|rest| rest.split_once('-')) else { return false };
    !major.is_empty()
        && major.bytes().all(|b| b.is_ascii_digit())
        && tail.len() == 8
        && tail.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Removes the roles dumps of backups that never got their manifest.
pub(super) fn remove_unfinished_backups(dir: &Path) {
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

impl LocalProvider {
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
                    orphan.stop()?;
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
                // A server provisioned bare for pg_upgrade has no application database yet.
                let app_db =
                    server.sql("postgres", &format!("SELECT count(*) FROM pg_database WHERE datname = '{APP_DB}'"))?;
                let ours = |kind: &str, table: &str, column: &str| -> Result<Vec<String>> {
                    if kind != "slot" && app_db == "0" {
                        return Ok(Vec::new());
                    }
                    let sql = format!("SELECT {column} FROM {table} WHERE {column} LIKE 'pgconverge\\_%'");
                    let db = if kind == "slot" { "postgres" } else { APP_DB };
                    Ok(server.sql(db, &sql)?.lines().map(str::to_owned).collect())
                };
                let own_name = logical::name(&meta.service.id);
                for sub in ours("subscription", "pg_subscription", "subname")? {
                    if !streaming.iter().any(|(n, _)| *n == sub && *n == own_name) {
                        tracing::warn!(server = %meta.service.id, subscription = %sub, "dropping a subscription left behind");
                        logical::drop_replication(None, Some(&server), &sub)?;
                    }
                }
                let feeds = |n: &String| streaming.iter().any(|(s, from)| s == n && *from == meta.service.id);
                let mut left: Vec<String> = ours("slot", "pg_replication_slots", "slot_name")?;
                left.extend(ours("publication", "pg_publication", "pubname")?);
                left.sort();
                left.dedup();
                for name in left.iter().filter(|n| !feeds(n)) {
                    tracing::warn!(server = %meta.service.id, slot = %name, "dropping a replication slot left behind");
                    logical::drop_replication(Some(&server), None, name)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tidy_up_knows_the_servers_it_named() {
        assert!(made_here("pg17-3fa9b0c1"));
        for other in ["web1", "pg17-3fa9", "pg-3fa9b0c1", "pg17-3fa9b0cz", "nginx"] {
            assert!(!made_here(other), "{other}");
        }
    }
}
