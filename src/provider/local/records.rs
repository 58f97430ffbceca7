//! The provider's records under `root/state/<env>/<id>.json` and the environment's
//! secret: what a server cannot show of itself.

use super::*;

/// A service as the local provider records it. Its `service.data` is always `None`: a
/// record written before the ledger may hold one, which is read and ignored.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Meta {
    #[serde(flatten)]
    pub(super) service: Service,
    /// The service whose changes a subscription on this server receives, from `replicate`
    /// until the catch-up ends it: what `tidy_replication` keeps and `delete` drops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) streaming_from: Option<ServiceId>,
    /// The server's TCP port, once provisioned.
    pub(super) port: Option<u16>,
    /// The application database is as provisioning made it: empty, never restored into.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) untouched: bool,
    /// The server runs with `LOAD_SETTINGS`, until deploy makes it visible.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) loading: bool,
    /// The server's socket directory when `root/run/<id>` is too long for a socket path:
    /// one made under the system's temporary directory with a random name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) socket_dir: Option<PathBuf>,
    /// The service whose files `pg_upgrade --link` gives this server, until the upgrade is
    /// finished or undone (`upgrade::settle_links`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) link_from: Option<ServiceId>,
    /// This server's fingerprint, taken before a `link` upgrade consumed it, for the
    /// verify of its copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) fingerprint: Option<(Verify, fingerprint::Fingerprint)>,
    /// The rows this copy and its source held alike where its replication starts,
    /// compared before the fence: from `replicate` until the catch-up ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) matched: Option<Matched>,
}

/// Rows compared alike at one point of the source's WAL.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Matched {
    pub(super) source: ServiceId,
    pub(super) lsn: String,
    pub(super) how: Verify,
    /// Both sides' rows part (`fingerprint::Part::Rows`), equal.
    pub(super) rows: fingerprint::Fingerprint,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Secret {
    pub(super) role: String,
    pub(super) password: String,
}

/// Reads one of the provider's JSON files; a file that does not parse is reported as
/// damaged rather than guessed at.
pub(super) fn read_record<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err("read", path, e))?;
    serde_json::from_str(&text).map_err(|e| ProviderError::Inconsistent(format!("{} is damaged: {e}", path.display())))
}

/// Removes a password from a message that might quote it.
pub(super) fn redact(message: &str, password: &str) -> String {
    if password.is_empty() {
        message.to_owned()
    } else {
        message.replace(password, "********")
    }
}

impl LocalProvider {
    pub(super) fn meta_path(&self, env: &EnvName, id: &ServiceId) -> PathBuf {
        self.root.join("state").join(env.as_str()).join(format!("{id}.json"))
    }

    pub(super) fn load(&self, env: &EnvName, id: &ServiceId) -> Result<Meta> {
        let mut meta: Meta = read_record(&self.meta_path(env, id))?;
        meta.service.data = None;
        Ok(meta)
    }

    pub(super) fn store(&self, env: &EnvName, meta: &Meta) -> Result<()> {
        let path = self.meta_path(env, &meta.service.id);
        self.subdir("state", Some(env.as_str()))?;
        let text = serde_json::to_vec_pretty(meta).map_err(failed)?;
        write_atomically(&path, &text, 0o644).map_err(|e| io_err("write", &path, e))
    }

    pub(super) fn metas(&self, env: &EnvName) -> Result<Vec<Meta>> {
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

    pub(super) fn update(&self, env: &EnvName, id: &ServiceId, f: impl FnOnce(&mut Meta)) -> Result<()> {
        let mut meta = self.load(env, id)?;
        f(&mut meta);
        self.store(env, &meta)
    }

    pub(super) fn secret(&self, env: &EnvName) -> Result<Secret> {
        let path = self.root.join("secrets").join(format!("{env}.json"));
        private::check_if_present(&path, false).map_err(|e| ProviderError::Inconsistent(e.to_string()))?;
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
    pub(super) fn dsn(&self, env: &EnvName, meta: &Meta) -> Result<String> {
        let s = self.secret(env)?;
        let port = meta.port.ok_or_else(|| ProviderError::Inconsistent(format!("{} has no port", meta.service.id)))?;
        Ok(format!("postgres://{}:{}@127.0.0.1:{port}/{APP_DB}", s.role, s.password))
    }
}
