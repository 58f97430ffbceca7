//! Backups: `pg_dump` of the database, its roles and its own properties into
//! `root/backups/<id>/`, named by a manifest that a `Backup` handle points at.

use super::*;

/// A backup on disk, named by the path of its manifest (the `Backup`'s handle). What data
/// it holds and whether it is complete are the rules' to know.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Manifest {
    pub(super) service: ServiceId,
    pub(super) source_version: Major,
    pub(super) dump: PathBuf,
    pub(super) roles: PathBuf,
    /// The database's own properties (settings, comment, privileges); absent in
    /// backups taken before pgconverge kept them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) database: Option<PathBuf>,
    pub(super) bytes: u64,
    pub(super) taken_at_ms: u128,
}

/// The files of a backup being taken.
pub(super) struct BackupFiles {
    pub(super) dump: PathBuf,
    pub(super) roles: PathBuf,
    pub(super) database: PathBuf,
    /// Where the dump is written until it is whole.
    pub(super) partial: PathBuf,
    pub(super) manifest: PathBuf,
    pub(super) stamp: u128,
    /// The programs that dump: the newest major of the environment's servers.
    pub(super) bin: binaries::Binaries,
}

/// pg_dump's archive format: custom, compressed with lz4 where pg_dump has it (16 and
/// later), which costs the least CPU of the methods that shrink a dump well.
pub(super) fn dump_format(bin: &binaries::Binaries) -> [&'static str; 3] {
    ["-Fc", "-Z", if bin.major >= 16 { "lz4" } else { "1" }]
}

/// Makes `path` a new, empty file that only its owner can read, for a client program to
/// write into: it opens what it finds, and would follow a symlink or keep looser modes.
pub(super) fn private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    private::check_if_present(path, false)?;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|e| io_err("create", path, e))
}

impl LocalProvider {
    /// The manifest a backup's handle names, which must be one of this root's backups of
    /// the service the backup is of.
    pub(super) fn manifest(&self, backup: &Backup) -> Result<Manifest> {
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

    /// The newest major among an environment's services: its pg_dump reads them all.
    pub(super) fn newest_binaries(&self, env: &EnvName) -> Result<binaries::Binaries> {
        let newest = self.metas(env)?.iter().map(|m| m.service.version.get()).max().unwrap_or(0);
        binaries::find(newest, &self.bin_dirs).map_err(ProviderError::from)
    }

    /// Names the files of a new backup of `meta`'s service and dumps its roles.
    pub(super) fn start_backup(&self, env: &EnvName, meta: &Meta, server: &Server) -> Result<BackupFiles> {
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
    pub(super) fn dump_database(&self, server: &Server, bin: &binaries::Binaries, to: &Path) -> Result<()> {
        let mut c = Command::new(bin.program("pg_dump"));
        c.env("PGOPTIONS", server::SESSION_OPTIONS)
            .args(server.conn_args(APP_DB))
            .args(["--create", "--schema-only", "--exclude-schema=*", "-Fp", "-f"])
            .arg(to);
        private_file(to)?;
        self.run_client(c, "pg_dump --create")
    }

    pub(super) fn dump_roles(&self, server: &Server, bin: &binaries::Binaries, to: &Path) -> Result<()> {
        let mut c = Command::new(bin.program("pg_dumpall"));
        c.env("PGOPTIONS", server::SESSION_OPTIONS);
        let mut args = server.conn_args("postgres");
        args.truncate(args.len() - 2); // pg_dumpall takes -l, not -d, for its database
        c.args(args).args(["-l", "postgres", "--roles-only", "-f"]).arg(to);
        private_file(to)?;
        self.run_client(c, "pg_dumpall --roles-only")
    }

    /// Makes a dumped backup durable and visible: sync, rename, manifest.
    pub(super) fn finish_backup(&self, meta: &Meta, files: BackupFiles) -> Result<(Backup, Manifest)> {
        // Dumps hold the data and the roles' password hashes: for root's eyes only.
        for f in [&files.partial, &files.roles, &files.database] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).map_err(|e| io_err("protect", f, e))?;
            std::fs::File::open(f).and_then(|f| f.sync_all()).map_err(|e| io_err("sync", f, e))?;
        }
        crate::failpoint::hit("backup:dumped")?;
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

    pub(super) fn run_client(&self, mut c: Command, what: &str) -> Result<()> {
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

    pub(super) fn backup_now(&mut self, env: &EnvName, id: &ServiceId) -> Result<Backup> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
