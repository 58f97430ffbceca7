//! `pgconverge.yaml` (format 1): the types (serde + schemars), loading with errors that
//! point at file:line:col and the key path, and the checks serde cannot make.
//!
//! Invariant: a `Config` that `parse` returns is valid; everything downstream may rely on
//! prefixes being well-formed, versions positive, rollout naming declared environments
//! and declared prefixes never colliding with the temporary or retired ones.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::model::{shorten, EnvName, Major, Prefix};

/// Config files larger than this are refused before parsing: a real one is a few KiB, and
/// the bound keeps megabytes of garbage from costing memory or time.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// The whole file.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "pgconverge.yaml",
    description = "Desired PostgreSQL major versions per environment, for pgconverge (format 1)."
)]
pub struct Config {
    /// Format of this file; only 1 exists.
    pub version: FormatVersion,
    /// Where the services live. Default: the local provider with its defaults.
    #[serde(default)]
    pub provider: ProviderConfig,
    /// How upgrades are carried out; any key may be overridden per environment.
    #[serde(default)]
    pub upgrade: UpgradeConfig,
    /// Apply order; later environments wait for earlier ones. Environments not listed
    /// follow in file order.
    #[serde(default)]
    pub rollout: Vec<EnvName>,
    /// The environments, each with its declared services.
    pub environments: OrderedMap<EnvName, EnvironmentConfig>,
    /// A docker compose file for local development whose database image follows the
    /// major of an environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_dev: Option<LocalDevConfig>,
    /// Where apply keeps its lock and the records of what the platform cannot show.
    /// Default: files under the provider's root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<StateConfig>,
}

/// Where apply's lock and records live.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// A PostgreSQL database shared by every runner that applies this config: the lock is
    /// a session advisory lock there, and the records are rows of its `pgconverge` schema.
    pub postgres: PostgresState,
}

/// A PostgreSQL database for apply's state.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresState {
    /// The environment variable that holds its DSN (`postgres://…` or `key=value …`); the
    /// DSN itself never goes in this file. Connect directly, never through a pooler: the
    /// lock lives as long as the connection.
    pub dsn_env: String,
}

/// Keeps the database image of a compose file on the major an environment runs.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalDevConfig {
    /// The compose file, relative to this file (e.g. `docker-compose.yml`).
    pub compose_file: PathBuf,
    /// The compose service that runs PostgreSQL (e.g. `db`).
    pub service: String,
    /// The environment whose major the image follows (e.g. `live`).
    pub follows: EnvName,
    /// The prefix of that environment the image follows. Default: DEFAULT.
    #[serde(default = "default_prefix")]
    pub prefix: Prefix,
}

fn default_prefix() -> Prefix {
    Prefix::parse("DEFAULT").expect("DEFAULT is a valid prefix")
}

/// `version: 1`.
#[derive(Clone, Copy, Debug, Serialize, JsonSchema)]
#[serde(transparent)]
pub struct FormatVersion(#[schemars(range(min = 1, max = 1))] u32);

impl<'de> Deserialize<'de> for FormatVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        if n != 1 {
            return Err(serde::de::Error::custom(format!(
                "config format version {n} is not supported: this build reads version 1"
            )));
        }
        Ok(Self(1))
    }
}

/// Exactly one provider section; none means `local` with its defaults.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Real PostgreSQL servers on this machine, one per service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalConfig>,
    /// The Divio Control Panel API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub divio: Option<DivioConfig>,
}

/// The local provider.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// Where servers, metadata and backups live, relative to this file. Default `.pgconverge`.
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// Directories searched first for PostgreSQL binaries.
    #[serde(default)]
    pub bin_dirs: Vec<PathBuf>,
    /// OS user for server processes when pgconverge runs as root. Default `postgres`.
    #[serde(default)]
    pub run_as: Option<String>,
    /// What deploy does.
    #[serde(default)]
    pub deploy: LocalDeployConfig,
    /// A connection pooler in front of each environment's servers: the application's DSNs
    /// name it and never change; the fence pauses it, the deploy points it at the new
    /// server and resumes it. Absent: the DSNs name the servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooler: Option<PoolerKind>,
}

/// How long the pooler lets a client's query wait beyond `max_pause_seconds` before it
/// fails it (PgBouncer's `query_wait_timeout`): pgconverge gives a pause up first.
pub const POOLER_WAIT_MARGIN_SECONDS: u32 = 60;

/// The connection pooler the local provider runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PoolerKind {
    /// PgBouncer (Debian's `pgbouncer` package), transaction pooling.
    Pgbouncer,
}

/// Deploy on the local provider: write the environment's env file, then run a command.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalDeployConfig {
    /// Env file, relative to root; `{env}` is the environment's name. Default `{env}.env`.
    #[serde(default)]
    pub env_file: Option<String>,
    /// Shell command run after the env file is written; its exit status counts.
    #[serde(default)]
    pub command: Option<String>,
}

/// The Divio provider.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DivioConfig {
    /// Application slug or uuid.
    pub application: String,
    /// Control Panel zone, or a full http(s) URL. Default `divio.com`.
    #[serde(default)]
    pub zone: Option<String>,
    /// Environment variable holding the API token. Default `DIVIO_TOKEN`; when it is unset,
    /// the password of `machine control.<zone>` in `~/.netrc` (or `$NETRC_PATH`).
    #[serde(default)]
    pub token_env: Option<String>,
    /// Where the lock and the records of fences and restores live, relative to this file.
    /// Default `.pgconverge`.
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// Shell command that stops the application writing (e.g. turns maintenance mode on).
    /// Without it the API cannot fence, and plans that fence are refused.
    #[serde(default)]
    pub fence_command: Option<String>,
    /// Shell command that lets the application write again.
    #[serde(default)]
    pub unfence_command: Option<String>,
    /// Shell command that compares a restored copy with its source (exit 0: the same).
    /// Without it the API cannot verify, and plans that verify are refused.
    #[serde(default)]
    pub verify_command: Option<String>,
    /// Seconds between looks at something the platform does in its own time (a backup,
    /// restore or deployment, an instance provisioning, detaching, renamed or removed);
    /// the first looks come sooner. Default 3.
    #[serde(default)]
    pub poll_seconds: Option<f64>,
    /// Minutes to wait for one such operation or state change before apply stops. Default
    /// 60.
    #[serde(default)]
    pub wait_minutes: Option<f64>,
}

/// How a service is copied to its new version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Back up the old service and restore into the new one (the runbook's way).
    DumpRestore,
    /// Copy by logical replication while the application keeps writing; the cutover
    /// blocks writes only while the last changes arrive.
    Logical,
    /// Upgrade the old server's data directory with `pg_upgrade` into the new server
    /// (local provider): no dump, no restore, no rebuilt index; the old server is stopped
    /// while it runs.
    PgUpgrade,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::DumpRestore => "dump_restore",
            Strategy::Logical => "logical",
            Strategy::PgUpgrade => "pg_upgrade",
        }
    }
}

/// How `pg_upgrade` moves the data files. All but `link` leave the old server as it was:
/// until it is deleted, it can be started again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Transfer {
    /// `clone` where the file system can reflink, else `copy_file_range` where the new
    /// major's pg_upgrade has it (17+), else `copy`.
    Auto,
    /// Copy every file.
    Copy,
    /// Copy with the kernel's `copy_file_range` (PostgreSQL 17+).
    CopyFileRange,
    /// Reflink every file (Btrfs, XFS with reflink, APFS): near-instant, no extra space
    /// until either side writes.
    Clone,
    /// Hard-link every file: near-instant whatever the size, no extra space, but the new
    /// server takes the old one's files: once it has started, the old server can never
    /// start again (no way back but a backup). Refused with `keep_old`.
    Link,
}

impl Transfer {
    pub fn as_str(self) -> &'static str {
        match self {
            Transfer::Auto => "auto",
            Transfer::Copy => "copy",
            Transfer::CopyFileRange => "copy_file_range",
            Transfer::Clone => "clone",
            Transfer::Link => "link",
        }
    }

    /// The new server takes the old one's files.
    pub fn consumes(self) -> bool {
        self == Transfer::Link
    }
}

/// How a restored copy is checked against its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verify {
    /// No check.
    None,
    /// Row counts, sequences and the lists of schema objects.
    Counts,
    /// Counts, plus an ordered hash of every table's rows.
    Checksums,
}

impl Verify {
    pub fn as_str(self) -> &'static str {
        match self {
            Verify::None => "none",
            Verify::Counts => "counts",
            Verify::Checksums => "checksums",
        }
    }
}

/// Upgrade settings as written: every key optional, so that an environment overrides only
/// what it names.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpgradeConfig {
    /// Default `dump_restore`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// With `strategy: pg_upgrade`: how the data files move. Default `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<Transfer>,
    /// Block writes to the old service from backup to cutover. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_writes: Option<bool>,
    /// Default `counts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verify>,
    /// Prefix of the new service during an upgrade. Default `NEW`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temporary_prefix: Option<Prefix>,
    /// Prefix of the old service once retired. Default `OLD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_prefix: Option<Prefix>,
    /// Keep the retired service, detached, instead of deleting it. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_old: Option<bool>,
    /// Allow restoring into an older major. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_downgrade: Option<bool>,
    /// With a pooler: the longest the application's queries may wait at the fence's pause.
    /// A pause that cannot begin within it (a transaction held open) is given up, the
    /// pooler resumed on the old server. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pause_seconds: Option<u32>,
}

/// One environment.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentConfig {
    /// Overrides of the top-level `upgrade` settings.
    #[serde(default)]
    pub upgrade: UpgradeConfig,
    /// Declared services: prefix → PostgreSQL major version.
    pub postgres: OrderedMap<Prefix, Major>,
}

/// Upgrade settings with every default filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upgrade {
    pub strategy: Strategy,
    pub transfer: Transfer,
    pub fence_writes: bool,
    pub verify: Verify,
    pub temporary_prefix: Prefix,
    pub retired_prefix: Prefix,
    pub keep_old: bool,
    pub allow_downgrade: bool,
    pub max_pause_seconds: u32,
}

impl Default for Upgrade {
    fn default() -> Self {
        UpgradeConfig::default().resolve(&UpgradeConfig::default())
    }
}

impl UpgradeConfig {
    /// These settings, overridden by `over`, defaults for what neither names.
    pub fn resolve(&self, over: &UpgradeConfig) -> Upgrade {
        let fixed = |s: &str| Prefix::parse(s).unwrap_or_else(|_| unreachable!("constant prefix"));
        Upgrade {
            strategy: over.strategy.or(self.strategy).unwrap_or(Strategy::DumpRestore),
            transfer: over.transfer.or(self.transfer).unwrap_or(Transfer::Auto),
            fence_writes: over.fence_writes.or(self.fence_writes).unwrap_or(true),
            verify: over.verify.or(self.verify).unwrap_or(Verify::Counts),
            temporary_prefix: over
                .temporary_prefix
                .clone()
                .or_else(|| self.temporary_prefix.clone())
                .unwrap_or_else(|| fixed("NEW")),
            retired_prefix: over
                .retired_prefix
                .clone()
                .or_else(|| self.retired_prefix.clone())
                .unwrap_or_else(|| fixed("OLD")),
            keep_old: over.keep_old.or(self.keep_old).unwrap_or(false),
            allow_downgrade: over.allow_downgrade.or(self.allow_downgrade).unwrap_or(false),
            max_pause_seconds: over.max_pause_seconds.or(self.max_pause_seconds).unwrap_or(5),
        }
    }
}

/// What the planner needs of one environment: its declared services and settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredEnv {
    pub name: EnvName,
    pub postgres: Vec<(Prefix, Major)>,
    pub upgrade: Upgrade,
}

impl Config {
    /// The major the local development image follows: the followed prefix's declared one.
    pub fn local_dev_major(&self) -> Option<Major> {
        let dev = self.local_dev.as_ref()?;
        let (_, env) = self.environments.0.iter().find(|(n, _)| *n == dev.follows)?;
        env.postgres.0.iter().find(|(p, _)| *p == dev.prefix).map(|(_, m)| *m)
    }

    /// Environments in apply order: `rollout` first, then the rest in file order.
    pub fn desired(&self) -> Vec<DesiredEnv> {
        let mut order: Vec<&EnvName> = self.rollout.iter().collect();
        for (name, _) in &self.environments.0 {
            if !order.contains(&name) {
                order.push(name);
            }
        }
        order
            .into_iter()
            .filter_map(|name| {
                let env = self.environments.get(name)?;
                Some(DesiredEnv {
                    name: name.clone(),
                    postgres: env.postgres.0.clone(),
                    upgrade: self.upgrade.resolve(&env.upgrade),
                })
            })
            .collect()
    }
}

/// A map that keeps file order and refuses duplicate keys (serde's maps keep the last).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OrderedMap<K, V>(pub Vec<(K, V)>);

impl<K: PartialEq, V> OrderedMap<K, V> {
    pub fn get(&self, key: &K) -> Option<&V> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

impl<'de, K, V> Deserialize<'de> for OrderedMap<K, V>
where
    K: Deserialize<'de> + PartialEq + fmt::Display,
    V: Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MapVisitor<K, V>(std::marker::PhantomData<(K, V)>);
        impl<'de, K, V> Visitor<'de> for MapVisitor<K, V>
        where
            K: Deserialize<'de> + PartialEq + fmt::Display,
            V: Deserialize<'de>,
        {
            type Value = OrderedMap<K, V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(K, V)> = Vec::new();
                while let Some(key) = map.next_key::<K>()? {
                    if out.iter().any(|(k, _)| *k == key) {
                        return Err(serde::de::Error::custom(format!("duplicate key `{key}`")));
                    }
                    let value = map.next_value::<V>()?;
                    out.push((key, value));
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_map(MapVisitor(std::marker::PhantomData))
    }
}

impl<K: JsonSchema, V: JsonSchema> JsonSchema for OrderedMap<K, V> {
    fn schema_name() -> String {
        format!("Map_of_{}", V::schema_name())
    }
    fn json_schema(gen: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
        let value = gen.subschema_for::<V>();
        let mut key = K::json_schema(gen).into_object();
        key.metadata = None;
        schemars::schema::SchemaObject {
            instance_type: Some(schemars::schema::InstanceType::Object.into()),
            object: Some(Box::new(schemars::schema::ObjectValidation {
                additional_properties: Some(Box::new(value)),
                property_names: Some(Box::new(key.into())),
                ..Default::default()
            })),
            ..Default::default()
        }
        .into()
    }
}

/// A place in the config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    /// 1-based line and column, where the YAML has one.
    pub line_col: Option<(usize, usize)>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.line_col {
            write!(f, ":{line}:{col}")?;
        }
        Ok(())
    }
}

/// Why a config file was refused. Every variant carries where, what and a hint.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read the config file: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not YAML of the config's shape: syntax, unknown or duplicate keys, wrong
    /// types, values out of range.
    #[error("{at}: {}{message}", key_prefix(key_path))]
    Parse { at: Location, key_path: Option<String>, message: String, hint: &'static str },
    /// Well-formed YAML whose values contradict each other.
    #[error("{at}: {}{message}", key_prefix(key_path))]
    Invalid { at: Location, key_path: Option<String>, message: String, hint: &'static str },
}

fn key_prefix(key_path: &Option<String>) -> String {
    key_path.as_deref().map(|p| format!("{p}: ")).unwrap_or_default()
}

impl ConfigError {
    /// A suggestion for the user, shown under the error.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            ConfigError::Read { .. } => Some("pass the config file with -f FILE (default ./pgconverge.yaml)"),
            ConfigError::Parse { hint, .. } | ConfigError::Invalid { hint, .. } => Some(hint),
        }
    }
}

/// Reads and parses a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let read_err = |source| ConfigError::Read { file: path.display().to_string(), source };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if meta.len() > MAX_CONFIG_BYTES as u64 {
        return Err(ConfigError::Parse {
            at: Location { file: path.to_owned(), line_col: None },
            key_path: None,
            message: format!("the file is {} bytes; a config file may be at most {MAX_CONFIG_BYTES}", meta.len()),
            hint: "is this the right file? pgconverge.yaml holds a few lines per environment",
        });
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    let text = String::from_utf8(bytes).map_err(|e| ConfigError::Parse {
        at: Location { file: path.to_owned(), line_col: None },
        key_path: None,
        message: format!("the file is not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()),
        hint: "save the file as UTF-8",
    })?;
    parse(path, &text)
}

const SCHEMA_HINT: &str = "see `pgconverge schema` for every key and its type";

/// Parses config text; `file` is only used to name the file in errors.
pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
    let at = |line_col| Location { file: file.to_owned(), line_col };
    if text.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::Parse {
            at: at(None),
            key_path: None,
            message: format!("the text is {} bytes; a config file may be at most {MAX_CONFIG_BYTES}", text.len()),
            hint: "is this the right file? pgconverge.yaml holds a few lines per environment",
        });
    }
    if let Some(offset) = text.find('\t') {
        return Err(ConfigError::Parse {
            at: at(Some(line_col(text, offset))),
            key_path: None,
            message: "tab character: YAML indentation must use spaces".into(),
            hint: "replace tabs with spaces",
        });
    }
    if text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "---" || t == "..."
    }) {
        return Err(ConfigError::Parse {
            at: at(None),
            key_path: None,
            message: "the file is empty".into(),
            hint: "start from examples/pgconverge.yaml; a config needs `version: 1` and `environments`",
        });
    }
    let de = serde_yaml::Deserializer::from_str(text);
    let config: Config = serde_path_to_error::deserialize(de).map_err(|e| parse_error(file, text, e))?;
    validate(&config).and_then(|()| decimal_versions(&config, text)).map_err(|(path, message, hint)| {
        ConfigError::Invalid { at: at(locate(text, &path, 0)), key_path: Some(path.join(".")), message, hint }
    })?;
    Ok(config)
}

/// Refuses a version written other than in decimal (`0x11` is 17 to YAML, and to no
/// reader of the file).
fn decimal_versions(config: &Config, text: &str) -> Result<(), Invalid> {
    for (name, env) in &config.environments.0 {
        for (prefix, _) in &env.postgres.0 {
            let path = vec!["environments".to_owned(), name.to_string(), "postgres".to_owned(), prefix.to_string()];
            let Some((line, col)) = locate(text, &path, 0) else { continue };
            let Some(written) = text.lines().nth(line - 1) else { continue };
            let after_key: String = written.chars().skip(col - 1 + prefix.as_str().len()).collect();
            let Some(value) = after_key.trim_start().strip_prefix(':') else { continue };
            let token = value.split([',', '}', '#']).next().unwrap_or("").trim().trim_matches(['"', '\'']);
            if !token.is_empty() && !token.bytes().all(|b| b.is_ascii_digit()) {
                return Err((
                    path,
                    format!("`{}` is not a major version written in decimal", shorten(token)),
                    "write the major as a decimal number such as 17",
                ));
            }
        }
    }
    Ok(())
}

fn parse_error(file: &Path, text: &str, e: serde_path_to_error::Error<serde_yaml::Error>) -> ConfigError {
    let segments: Vec<String> = e
        .path()
        .iter()
        .filter_map(|s| match s {
            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
            serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
            _ => None,
        })
        .collect();
    let inner = e.into_inner();
    let mut message = inner.to_string();
    // serde_yaml prefixes its own path and suffixes a position that is right only for
    // errors it raised itself; both are shown separately here.
    let trusted = message.contains(" at line ");
    if let Some(i) = message.find(" at line ") {
        message.truncate(i);
    }
    // serde_yaml names its own (parent) path first; the full path is shown separately.
    let joined = segments.join(".");
    if let Some((head, rest)) = message.split_once(": ") {
        if !head.is_empty() && joined.starts_with(head) && !head.contains(' ') {
            message = rest.to_owned();
        }
    }
    let duplicate = ["duplicate field `", "duplicate key `"]
        .iter()
        .find_map(|p| message.strip_prefix(p))
        .and_then(|rest| rest.split('`').next())
        .map(str::to_owned);
    let line_col = match (&duplicate, trusted) {
        (Some(key), _) => {
            let mut path = segments.clone();
            path.push(key.clone());
            locate(text, &path, 1)
        }
        (None, true) => inner.location().map(|l| (l.line(), l.column())),
        (None, false) => locate(text, &segments, 0),
    };
    let hint = if duplicate.is_some() {
        "each key may appear once in a map; remove or merge the repeated one"
    } else if message.starts_with("unknown variant `swap`") {
        // PostgreSQL 18's --swap destroys the old cluster as its transfer begins: a crash
        // then leaves neither server whole, and no backup is taken inside the fence.
        "`swap` is not offered: a crash during it would leave neither server whole; `link` is nearly as fast and can be undone until the new server starts"
    } else if message.starts_with("unknown field") || message.starts_with("unknown variant") {
        "check the spelling; see `pgconverge schema` for every key"
    } else if [
        "did not find expected",
        "found character",
        "mapping values are not allowed",
        "while scanning",
        "while parsing",
        "found unexpected",
    ]
    .iter()
    .any(|m| message.contains(m))
    {
        "the text is not valid YAML at this position; check indentation, brackets and quotes"
    } else if message.contains("invalid prefix") {
        "prefixes are environment-variable prefixes such as DEFAULT or ANALYTICS"
    } else {
        SCHEMA_HINT
    };
    let mut key_path = segments;
    if let Some(key) = duplicate {
        key_path.push(key);
    }
    ConfigError::Parse {
        at: Location { file: file.to_owned(), line_col },
        key_path: (!key_path.is_empty()).then(|| key_path.join(".")),
        message,
        hint,
    }
}

type Invalid = (Vec<String>, String, &'static str);

fn validate(config: &Config) -> Result<(), Invalid> {
    if let Some(state) = &config.state {
        let name = &state.postgres.dsn_env;
        let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err((
                vec!["state".into(), "postgres".into(), "dsn_env".into()],
                // Not echoed: someone may have put the DSN itself here.
                if name.contains("://") || name.contains('=') {
                    "this is a DSN, not the name of an environment variable; it must not be written here".into()
                } else {
                    "this is not the name of an environment variable".into()
                },
                "name the variable that holds the DSN, e.g. PGCONVERGE_STATE_DSN; never the DSN itself",
            ));
        }
    }
    let names: Vec<&EnvName> = config.environments.0.iter().map(|(n, _)| n).collect();
    if names.is_empty() {
        return Err((
            vec!["environments".into()],
            "no environments are declared".into(),
            "declare at least one environment, e.g. `environments: {test: {postgres: {DEFAULT: 17}}}`",
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, name) in config.rollout.iter().enumerate() {
        if !names.contains(&name) {
            return Err((
                vec!["rollout".into(), i.to_string()],
                format!("`{name}` is not a declared environment"),
                "rollout lists environment names from `environments`",
            ));
        }
        if !seen.insert(name) {
            return Err((
                vec!["rollout".into(), i.to_string()],
                format!("`{name}` appears twice"),
                "list each environment once",
            ));
        }
    }
    if let Some(dev) = &config.local_dev {
        let Some((_, env)) = config.environments.0.iter().find(|(n, _)| *n == dev.follows) else {
            return Err((
                vec!["local_dev".into(), "follows".into()],
                format!("`{}` is not a declared environment", dev.follows),
                "local_dev.follows names an environment from `environments`",
            ));
        };
        if !env.postgres.0.iter().any(|(p, _)| *p == dev.prefix) {
            return Err((
                vec!["local_dev".into(), "prefix".into()],
                format!("environment `{}` declares no prefix {}", dev.follows, dev.prefix),
                "local_dev.prefix names a prefix the followed environment declares (default DEFAULT)",
            ));
        }
        if dev.service.trim().is_empty() {
            return Err((
                vec!["local_dev".into(), "service".into()],
                "the service name is empty".into(),
                "name the compose service that runs PostgreSQL",
            ));
        }
    }
    if config.provider.local.is_some() && config.provider.divio.is_some() {
        return Err((
            vec!["provider".into()],
            "both `local` and `divio` are set".into(),
            "choose one provider per file",
        ));
    }
    if let Some(divio) = &config.provider.divio {
        validate_divio(divio)?;
    }
    if let Some(local) = &config.provider.local {
        validate_local(local, names.len())?;
    }
    for (name, env) in &config.environments.0 {
        let upgrade = config.upgrade.resolve(&env.upgrade);
        let env_path = |rest: &[&str]| {
            let mut p = vec!["environments".to_owned(), name.to_string()];
            p.extend(rest.iter().map(|s| s.to_string()));
            p
        };
        if upgrade.strategy == Strategy::Logical && !upgrade.fence_writes {
            return Err((
                env_path(&["upgrade"]),
                "strategy logical needs fence_writes: the cutover waits, with writes blocked, until the copy holds every change".into(),
                "remove `fence_writes: false`, or use `strategy: dump_restore`",
            ));
        }
        if upgrade.strategy == Strategy::PgUpgrade && upgrade.allow_downgrade {
            return Err((
                env_path(&["upgrade"]),
                "strategy pg_upgrade cannot downgrade: pg_upgrade only moves data to the same or a newer major".into(),
                "remove `allow_downgrade: true`, or use `strategy: dump_restore` for a downgrade",
            ));
        }
        if upgrade.max_pause_seconds == 0 {
            return Err((
                env_path(&["upgrade"]),
                "max_pause_seconds is 0: no pause could ever begin".into(),
                "give the pooler's pause at least 1 second (the default is 5)",
            ));
        }
        if upgrade.strategy == Strategy::PgUpgrade && upgrade.transfer.consumes() && upgrade.keep_old {
            return Err((
                env_path(&["upgrade"]),
                "transfer link gives the old server's files to the new one: the old server kept by keep_old could never start again".into(),
                "remove `keep_old: true`, or use `transfer: auto` (the old server is left as it was)",
            ));
        }
        if upgrade.strategy == Strategy::PgUpgrade && config.provider.divio.is_some() {
            let at = if env.upgrade.strategy.is_some() {
                env_path(&["upgrade", "strategy"])
            } else {
                vec!["upgrade".to_owned(), "strategy".to_owned()]
            };
            return Err((
                at,
                "strategy pg_upgrade needs the servers' data directories, which Divio does not give".into(),
                "use `strategy: dump_restore` with the Divio provider",
            ));
        }
        if upgrade.temporary_prefix == upgrade.retired_prefix {
            return Err((
                env_path(&["upgrade"]),
                format!("temporary_prefix and retired_prefix are both {}", upgrade.temporary_prefix),
                "the new and the old service need different prefixes during an upgrade",
            ));
        }
        if env.postgres.0.is_empty() {
            return Err((
                env_path(&["postgres"]),
                "no services are declared".into(),
                "declare at least one prefix, e.g. `DEFAULT: 17`",
            ));
        }
        let declared: Vec<&Prefix> = env.postgres.0.iter().map(|(p, _)| p).collect();
        for p in &declared {
            let reserved = [&upgrade.temporary_prefix, &upgrade.retired_prefix]
                .into_iter()
                .any(|r| *p == r || declared.iter().any(|q| p.as_str() == format!("{r}_{q}")));
            if reserved {
                return Err((
                    env_path(&["postgres", p.as_str()]),
                    format!(
                        "prefix {p} is reserved: {} and {} (and their `_<PREFIX>` forms) name the services of an upgrade in progress",
                        upgrade.temporary_prefix, upgrade.retired_prefix
                    ),
                    "rename the service, or change upgrade.temporary_prefix / upgrade.retired_prefix",
                ));
            }
        }
    }
    Ok(())
}

fn validate_local(local: &LocalConfig, environments: usize) -> Result<(), Invalid> {
    let at = |keys: &[&str]| {
        let mut p = vec!["provider".to_owned(), "local".to_owned()];
        p.extend(keys.iter().map(|k| k.to_string()));
        p
    };
    if let Some(root) = &local.root {
        if root.is_absolute() && !root.components().any(|c| matches!(c, std::path::Component::Normal(_))) {
            return Err((
                at(&["root"]),
                "`/` cannot be pgconverge's root".into(),
                "name a directory of pgconverge's own, such as .pgconverge (the default)",
            ));
        }
    }
    if let Some(user) = &local.run_as {
        if user == "root" || user.trim().is_empty() || user.bytes().all(|b| b.is_ascii_digit()) {
            return Err((
                at(&["run_as"]),
                format!("`{}` cannot run the servers", shorten(user)),
                "name an unprivileged OS user by name, such as postgres (the default): PostgreSQL refuses to run as root",
            ));
        }
    }
    if let Some(file) = &local.deploy.env_file {
        if environments > 1 && !file.contains("{env}") {
            return Err((
                at(&["deploy", "env_file"]),
                format!("every environment would write the same env file `{}`", shorten(file)),
                "put `{env}` in the name, e.g. `{env}.env`, so that each environment has its own",
            ));
        }
    }
    Ok(())
}

/// 1-based line and column of a byte offset.
fn validate_divio(divio: &DivioConfig) -> Result<(), Invalid> {
    let at = |key: &str| vec!["provider".to_owned(), "divio".to_owned(), key.to_owned()];
    let slug_like = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if divio.application.is_empty() || !divio.application.chars().all(slug_like) {
        return Err((
            at("application"),
            format!("`{}` is not an application slug or uuid", crate::model::shorten(&divio.application)),
            "name the application by its slug (letters, digits, `-`) or its uuid",
        ));
    }
    if let Some(zone) = &divio.zone {
        divio_base_url(zone).map_err(|m| (at("zone"), m, "e.g. `divio.com`"))?;
    }
    if divio.fence_command.is_some() != divio.unfence_command.is_some() {
        return Err((
            at(if divio.fence_command.is_some() { "fence_command" } else { "unfence_command" }),
            "fence_command and unfence_command go together: set both or neither".into(),
            "a fence that nothing lifts would keep the application from writing for good",
        ));
    }
    if let Some(p) = divio.poll_seconds.filter(|p| !(p.is_finite() && *p > 0.0 && *p <= 600.0)) {
        return Err((at("poll_seconds"), format!("{p} is not between 0 and 600"), "the default is 3"));
    }
    if let Some(m) = divio.wait_minutes.filter(|m| !(m.is_finite() && *m > 0.0 && *m <= 24.0 * 60.0)) {
        return Err((at("wait_minutes"), format!("{m} is not between 0 and a day"), "the default is 60"));
    }
    Ok(())
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Finds where the key path `path` is written, for errors serde_yaml cannot place
/// (it gives positions only for errors it raised itself). Follows block mappings by
/// indentation and flow mappings by text; `nth` picks a repeated last key (0 = first).
/// Best effort: `None` when the text is too unusual to follow.
fn locate(text: &str, path: &[String], nth: usize) -> Option<(usize, usize)> {
    let mut start = 0;
    let mut end = text.len();
    let mut found = None;
    for (depth, seg) in path.iter().enumerate() {
        let last = depth + 1 == path.len();
        let mut skip = if last { nth } else { 0 };
        if seg.parse::<usize>().is_ok() {
            continue; // sequence index: stay on the parent key
        }
        let mut from = start;
        let hit = loop {
            let i = find_key(&text[from..end], seg)? + from;
            if skip == 0 {
                break i;
            }
            skip -= 1;
            from = i + seg.len();
        };
        found = Some(hit);
        let indent = hit - text[..hit].rfind('\n').map_or(0, |n| n + 1);
        start = hit + seg.len();
        // The key's block ends at the next non-blank, non-comment line indented no deeper.
        let mut block_end = end;
        let mut pos = text[start..end].find('\n').map_or(end, |n| start + n + 1);
        while pos < end {
            let line_end = text[pos..end].find('\n').map_or(end, |n| pos + n);
            let line = &text[pos..line_end];
            let trimmed = line.trim_start();
            if !trimmed.is_empty() && !trimmed.starts_with('#') && line.len() - trimmed.len() <= indent {
                block_end = pos;
                break;
            }
            pos = line_end + 1;
        }
        end = block_end;
    }
    found.map(|i| line_col(text, i))
}

/// Offset of `key` written as a mapping key (plain or quoted, followed by `:`).
fn find_key(hay: &str, key: &str) -> Option<usize> {
    let bytes = hay.as_bytes();
    for quote in ["", "\"", "'"] {
        let needle = format!("{quote}{key}{quote}");
        let mut from = 0;
        while let Some(i) = hay[from..].find(&needle).map(|i| i + from) {
            let before_ok = i == 0 || matches!(bytes[i - 1], b' ' | b'\n' | b'{' | b',' | b'-');
            let after = hay[i + needle.len()..].trim_start_matches(' ');
            let after_ok = after.starts_with(':')
                && after[1..].chars().next().is_none_or(|c| c.is_whitespace() || matches!(c, ',' | '}'));
            if before_ok && after_ok {
                return Some(i);
            }
            from = i + needle.len();
        }
    }
    None
}

/// The user-facing form of a config error: the message, then the hint.
pub fn report(e: &ConfigError) -> String {
    match e.hint() {
        Some(h) => format!("error: {e}\n  hint: {h}"),
        None => format!("error: {e}"),
    }
}

/// The Divio API's base URL for a zone: `divio.com` → `https://api.divio.com`; a full
/// `http(s)://` URL (an emulator's, in tests) is used as it is, without a trailing `/`.
pub fn divio_base_url(zone: &str) -> Result<String, String> {
    let zone = zone.trim();
    if zone.starts_with("https://") || zone.starts_with("http://") {
        return Ok(zone.trim_end_matches('/').to_owned());
    }
    let valid = !zone.is_empty()
        && zone.split('.').all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if valid {
        Ok(format!("https://api.{zone}"))
    } else {
        Err(format!("`{zone}` is neither a zone (e.g. divio.com) nor an http(s) URL"))
    }
}

#[cfg(test)]
mod tests {
    use super::{divio_base_url, parse, ConfigError};

    /// serde_yaml has no error kinds to match, only messages: the hint for each is chosen
    /// from its text. This pins every text matched, so that a serde_yaml whose messages
    /// change fails here rather than giving the catch-all hint.
    #[test]
    fn each_parse_hint_is_reached_by_the_error_it_is_for() {
        let env = "environments:\n  test:\n    postgres:\n";
        let cases = [
            (format!("version: 1\nversion: 1\n{env}      DEFAULT: 17\n"), "each key may appear once"),
            (format!("version: 1\nverzion: 2\n{env}      DEFAULT: 17\n"), "check the spelling"),
            (format!("version: 1\n{env}      DEFAULT: \"17\n"), "not valid YAML"),
            (format!("version: 1\n{env}      DEFAULT: 17\n  x: : :\n"), "not valid YAML"),
            (format!("version: 1\n{env}      lower-case: 17\n"), "environment-variable prefixes"),
            // Nesting never reaches serde_yaml's recursion limit: the typed config
            // refuses the first level that has the wrong shape.
            (
                format!("version: 1\n{env}      DEFAULT: {}17{}\n", "[".repeat(200), "]".repeat(200)),
                "see `pgconverge schema`",
            ),
            (format!("version: 1\n{env}      DEFAULT: {{}}\n"), "see `pgconverge schema`"),
        ];
        for (text, want) in cases {
            let e = parse(std::path::Path::new("c.yaml"), &text).expect_err(&text);
            assert!(matches!(e, ConfigError::Parse { .. }), "{text}: {e:?}");
            let hint = e.hint().unwrap_or_default();
            assert!(hint.contains(want), "{text}\n{e}\nhint: {hint}, wanted one with {want:?}");
        }
    }

    #[test]
    fn pg_upgrade_is_for_the_local_provider_and_never_downgrades() {
        let env = "environments:\n  live:\n    postgres: {DEFAULT: 17}\n";
        let ok =
            parse(std::path::Path::new("c.yaml"), &format!("version: 1\nupgrade: {{strategy: pg_upgrade}}\n{env}"));
        let up = &ok.expect("local pg_upgrade").desired()[0].upgrade;
        assert_eq!((up.strategy, up.transfer), (super::Strategy::PgUpgrade, super::Transfer::Auto));
        let divio =
            format!("version: 1\nprovider:\n  divio: {{application: a}}\nupgrade:\n  strategy: pg_upgrade\n{env}");
        let e = parse(std::path::Path::new("c.yaml"), &divio).expect_err("divio pg_upgrade");
        assert!(e.to_string().contains("c.yaml:5:") && e.to_string().contains("Divio does not give"), "{e}");
        let link = format!("version: 1\nupgrade: {{strategy: pg_upgrade, transfer: link}}\n{env}");
        let up = &parse(std::path::Path::new("c.yaml"), &link).expect("link").desired()[0].upgrade;
        assert!(up.transfer.consumes());
        let kept = format!("version: 1\nupgrade: {{strategy: pg_upgrade, transfer: link, keep_old: true}}\n{env}");
        let e = parse(std::path::Path::new("c.yaml"), &kept).expect_err("link with keep_old");
        assert!(e.to_string().contains("could never start again"), "{e}");
        let swap = format!("version: 1\nupgrade: {{strategy: pg_upgrade, transfer: swap}}\n{env}");
        let e = parse(std::path::Path::new("c.yaml"), &swap).expect_err("swap is not offered");
        assert!(e.to_string().contains("unknown variant `swap`"), "{e}");
        assert!(e.hint().is_some_and(|h| h.contains("`link`")), "{e:?}");
    }

    #[test]
    fn divio_zones_and_urls() {
        assert_eq!(divio_base_url("divio.com").as_deref(), Ok("https://api.divio.com"));
        assert_eq!(divio_base_url("http://127.0.0.1:8080/").as_deref(), Ok("http://127.0.0.1:8080"));
        assert!(divio_base_url("divio .com").is_err() && divio_base_url("").is_err());
        assert!(divio_base_url("a..b").is_err());
    }
}
