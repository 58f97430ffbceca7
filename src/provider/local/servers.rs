//! Each service's server: where it lives, its socket, starting it, making it.

use super::*;

/// The longest socket directory: a socket path (`dir/.s.PGSQL.<port>`) may be at most
/// 107 bytes.
pub(super) const SOCKET_DIR_MAX: usize = 80;

/// Settings of a server while a copy is restored into it and verified: no checkpoint
/// until the application uses it. Checkpoints in the middle of a load write pages twice,
/// and make the first read of every page after them (verify's counts, ANALYZE) log a
/// full page image while setting hint bits. Durability is untouched: every commit is
/// flushed to the WAL as always; only the WAL is kept longer, up to the size of the copy.
pub(super) const LOAD_SETTINGS: [(&str, &str); 2] = [("max_wal_size", "64GB"), ("checkpoint_timeout", "1d")];

/// Puts `LOAD_SETTINGS` on a server, or takes them off; both take effect at once.
pub(super) fn load_settings(server: &Server, on: bool) -> Result<()> {
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
        .map_err(ProviderError::from)
}

impl LocalProvider {
    pub(super) fn server(&self, meta: &Meta) -> Result<Server> {
        let id = meta.service.id.as_str();
        let bin = binaries::find(meta.service.version.get(), &self.bin_dirs)?;
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
    pub(super) fn socket_dir(&self, meta: &Meta) -> PathBuf {
        let short = self.root.join("run").join(meta.service.id.as_str());
        match &meta.socket_dir {
            Some(dir) if short.as_os_str().len() > SOCKET_DIR_MAX => dir.clone(),
            _ => short,
        }
    }

    /// The socket directory of `meta`'s server is there, and one pgconverge made for it.
    pub(super) fn socket_dir_ok(&self, meta: &Meta) -> Result<bool> {
        let owner = self.run_as.map(|r| r.uid).or_else(server::effective_uid).unwrap_or(0);
        server::check_private_dir(&self.socket_dir(meta), owner).map_err(|e| ProviderError::Inconsistent(e.to_string()))
    }

    /// Makes sure the socket directory of `meta`'s server is one pgconverge made for it
    /// alone (owned by the server's user, mode 0700, no symlink), and makes one when it is
    /// missing: a new random one under the temporary directory when the root is deep (the
    /// system may have cleaned it), the server restarted into it if it was running.
    pub(super) fn private_socket_dir(&self, env: &EnvName, meta: &mut Meta) -> Result<()> {
        if self.socket_dir_ok(meta)? {
            return Ok(());
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
        private::new_dir(&dir, 0o700)?;
        if let Some(r) = self.run_as {
            r.own(&dir).map_err(|e| io_err("give to the server user", &dir, e))?;
        }
        if meta.service.status != Status::New || meta.port.is_some() {
            self.store(env, meta)?;
        }
        if running {
            tracing::warn!(service = %meta.service.id, dir = %dir.display(), "the socket directory was gone; restarting the server into a new one");
            let server = self.server(meta)?;
            server.stop()?;
            server.start()?;
        }
        Ok(())
    }

    pub(super) fn running_server(&self, env: &EnvName, id: &ServiceId) -> Result<(Meta, Server)> {
        let mut meta = self.load(env, id)?;
        self.private_socket_dir(env, &mut meta)?;
        let server = self.server(&meta)?;
        if !server.is_running() {
            server.start()?;
        }
        Ok((meta, server))
    }

    /// The application's role and database on `server`, where they are missing.
    pub(super) fn create_app_database(&self, env: &EnvName, server: &Server) -> Result<()> {
        let secret = self.secret(env)?;
        let role = quote::ident(&secret.role);
        let exists = |sql: &str| server.sql("postgres", sql).map(|n| n.trim() != "0");
        let mut statements = Vec::new();
        if !exists(&format!("SELECT count(*) FROM pg_roles WHERE rolname = {}", quote::literal(&secret.role)))? {
            // The server must not log the statement (and the password) if it fails.
            statements.push(format!(
                "SET log_min_error_statement = 'panic'; CREATE ROLE {role} LOGIN PASSWORD {}",
                quote::literal(&secret.password)
            ));
        }
        if !exists(&format!("SELECT count(*) FROM pg_database WHERE datname = {}", quote::literal(APP_DB)))? {
            statements.push(format!("CREATE DATABASE {APP_DB} OWNER {role}"));
        }
        let statements: Vec<&str> = statements.iter().map(String::as_str).collect();
        server
            .sql_each("postgres", &statements)
            .map_err(|e| ProviderError::Failed(redact(&e.to_string(), &secret.password)))
    }

    /// Creates, starts and prepares the server of `meta` (role and database; `bare`: only
    /// the bootstrap superuser, as pg_upgrade needs its new cluster), from scratch: a
    /// half-made server left by a crash is removed first.
    pub(super) fn create_server(&self, env: &EnvName, meta: &mut Meta, bare: bool) -> Result<()> {
        let dir = self.subdir("servers", None)?.join(meta.service.id.as_str());
        if dir.exists() {
            if let Ok(old) = self.server(meta) {
                let _ = old.stop();
            }
            std::fs::remove_dir_all(&dir).map_err(|e| io_err("remove", &dir, e))?;
        }
        let mut last = None;
        for _ in 0..3 {
            meta.port = Some(server::free_port()?);
            self.private_socket_dir(env, meta)?;
            let server = self.server(meta)?;
            if !server.data_dir.join("PG_VERSION").exists() {
                server.init()?;
            }
            match server.start() {
                Ok(()) => {
                    crate::failpoint::hit("provision:started")?;
                    if !bare {
                        self.create_app_database(env, &server)?;
                    }
                    return Ok(());
                }
                Err(e) => last = Some(e), // most likely the port was taken meanwhile: try another
            }
        }
        Err(last.map_or_else(|| ProviderError::Failed("the server did not start".into()), ProviderError::from))
    }
}
