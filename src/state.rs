//! Apply's state in a PostgreSQL database that every runner of a config shares
//! (`state.postgres`), so that a runner that is new every time finds what the last one
//! recorded and cannot apply beside another one:
//!
//! - the lock is a session advisory lock held by a `psql` session that lives as long as
//!   the apply: however the apply ends, its `psql` reads end-of-input and leaves, and the
//!   server ends the lock with the session;
//! - records are rows of `pgconverge.records`, keyed by the config's identity (so several
//!   projects can share one database) and a name;
//! - the schema is pgconverge's own, created on first use and versioned: a database whose
//!   schema is newer than this binary knows is refused rather than written to.
//!
//! The DSN comes from the variable `dsn_env` names and reaches `psql` as libpq's `PG*`
//! variables, never on a command line and never in a message.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::config::PostgresState;

/// The version of the `pgconverge` schema this binary writes.
pub const SCHEMA_VERSION: u32 = 1;

/// What goes wrong with the state database. No variant holds the DSN or a part of it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `state.postgres` cannot be used as configured: the variable, the DSN's form, psql.
    #[error("state.postgres: {0}")]
    Setup(String),
    /// psql could not be started or talked to.
    #[error("the state database: psql: {0}")]
    Psql(#[source] std::io::Error),
    /// The database refused or failed what was asked: what it said.
    #[error("the state database: {0}")]
    Database(String),
    /// Its schema was written by a newer pgconverge.
    #[error(
        "the state database's pgconverge schema is version {found}, newer than this pgconverge knows \
         ({SCHEMA_VERSION}): a newer pgconverge uses it; upgrade pgconverge rather than let an older one write there"
    )]
    Newer { found: u32 },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A PostgreSQL database holding apply's state for one config identity.
#[derive(Debug)]
pub struct PgState {
    psql: PathBuf,
    /// libpq's variables for the DSN. Not shown by `Debug`: the password is among them.
    vars: Secret,
    identity: String,
    migrated: OnceLock<()>,
}

struct Secret(Vec<(&'static str, String)>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl PgState {
    /// `identity` names what is applied (e.g. the Divio application and its zone): one
    /// lock and one set of records per identity.
    pub fn new(config: &PostgresState, identity: String) -> Result<PgState> {
        let var = &config.dsn_env;
        let dsn = std::env::var(var).ok().filter(|d| !d.trim().is_empty()).ok_or_else(|| {
            Error::Setup(format!("the variable {var} that should hold the state database's DSN is not set"))
        })?;
        let vars = libpq_vars(&dsn).map_err(|e| Error::Setup(format!("the DSN in {var} {e}")))?;
        let psql = psql()?;
        Ok(PgState { psql, vars: Secret(vars), identity, migrated: OnceLock::new() })
    }

    /// `psql` reaching the state database, quiet and unaligned, stopping at the first error,
    /// with `vars` set as psql variables for the SQL to quote (`:'name'`).
    fn command(&self, vars: &[(&str, &str)]) -> Command {
        let mut c = Command::new(&self.psql);
        c.current_dir("/")
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGAPPNAME", "pgconverge")
            .env_remove("PGSERVICE")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]);
        for (k, v) in &self.vars.0 {
            c.env(k, v);
        }
        // Every name is schema-qualified; nothing of the database's may come first.
        let options = self.vars.0.iter().find(|(k, _)| *k == "PGOPTIONS").map(|(_, v)| v.clone()).unwrap_or_default();
        c.env("PGOPTIONS", format!("{options} -c search_path=pg_catalog").trim());
        for (k, v) in vars {
            c.arg("-v").arg(format!("{k}={v}"));
        }
        c
    }

    /// Runs `sql` (through stdin) with psql variables; returns its output.
    fn run(&self, vars: &[(&str, &str)], sql: &str) -> Result<String> {
        let mut c = self.command(vars);
        c.arg("-f").arg("-");
        let out = crate::process::output_fed(c, sql).map_err(Error::Psql)?;
        if !out.status.success() {
            let said = String::from_utf8_lossy(&out.stderr);
            return Err(Error::Database(crate::model::printable(said.trim())));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Creates the schema on first use; refuses one newer than this binary knows.
    fn migrate(&self) -> Result<()> {
        if self.migrated.get().is_some() {
            return Ok(());
        }
        let version = self.run(
            &[],
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('pgconverge schema'));
             CREATE SCHEMA IF NOT EXISTS pgconverge;
             CREATE TABLE IF NOT EXISTS pgconverge.meta (
                 one boolean PRIMARY KEY DEFAULT true CHECK (one),
                 version integer NOT NULL);
             INSERT INTO pgconverge.meta (version) VALUES (1) ON CONFLICT DO NOTHING;
             CREATE TABLE IF NOT EXISTS pgconverge.records (
                 identity text NOT NULL,
                 name text NOT NULL,
                 value text NOT NULL,
                 written timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (identity, name));
             CREATE TABLE IF NOT EXISTS pgconverge.locks (
                 identity text PRIMARY KEY,
                 holder text NOT NULL,
                 since timestamptz NOT NULL DEFAULT now());
             COMMIT;
             SELECT version FROM pgconverge.meta;",
        )?;
        newer(version.lines().last().and_then(|v| v.trim().parse().ok()).unwrap_or(0))?;
        let _ = self.migrated.set(());
        Ok(())
    }

    /// Refuses a schema newer than this binary knows; `false`: there is no schema yet
    /// (nothing was ever written), which reading leaves so.
    fn readable(&self) -> Result<bool> {
        if self.migrated.get().is_some() {
            return Ok(true);
        }
        if self.run(&[], "SELECT to_regclass('pgconverge.meta') IS NOT NULL;")? != "t" {
            return Ok(false);
        }
        let version: u32 = self.run(&[], "SELECT version FROM pgconverge.meta;")?.trim().parse().unwrap_or(0);
        newer(version)?;
        Ok(true)
    }

    /// The record called `name`, if one was written. Writes nothing, not even the schema.
    pub fn get(&self, name: &str) -> Result<Option<String>> {
        if !self.readable()? {
            return Ok(None);
        }
        let vars = [("id", self.identity.as_str()), ("name", name)];
        let sql = "SELECT encode(convert_to(value, 'UTF8'), 'base64') FROM pgconverge.records \
                   WHERE identity = :'id' AND name = :'name';";
        let out = self.run(&vars, sql)?;
        if out.is_empty() {
            return Ok(None);
        }
        let text: String = out.split_whitespace().collect();
        base64_decode(&text)
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .map(Some)
            .ok_or_else(|| Error::Database(format!("the record {name} is not readable")))
    }

    /// Writes the record called `name`.
    pub fn put(&self, name: &str, value: &str) -> Result<()> {
        self.migrate()?;
        let vars = [("id", self.identity.as_str()), ("name", name), ("value", value)];
        let sql = "INSERT INTO pgconverge.records (identity, name, value) VALUES (:'id', :'name', :'value') \
                   ON CONFLICT (identity, name) DO UPDATE SET value = EXCLUDED.value, written = now();";
        self.run(&vars, sql).map(drop)
    }

    /// Takes the lock of this identity, waiting up to `timeout` while another session
    /// holds it; `holder` says who takes it, for the message another apply gets.
    pub fn lock(&self, timeout: Duration, holder: &str) -> std::result::Result<PgLock, LockRefused> {
        self.migrate().map_err(LockRefused::Failed)?;
        let mut child = self
            .command(&[("id", &self.identity), ("holder", holder)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| LockRefused::Failed(Error::Psql(e)))?;
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(LockRefused::Failed(Error::Database("psql has no pipes".into())));
        };
        let mut answers = BufReader::new(stdout);
        let deadline = Instant::now() + timeout;
        let mut ask = |sql: &str| -> Result<String> {
            writeln!(stdin, "{sql}").and_then(|()| stdin.flush()).map_err(Error::Psql)?;
            let mut line = String::new();
            answers.read_line(&mut line).map_err(Error::Psql)?;
            Ok(line.trim().to_owned())
        };
        loop {
            match ask("SELECT pg_try_advisory_lock(hashtextextended(:'id', 0));") {
                Ok(t) if t == "t" => {
                    let wrote = ask("INSERT INTO pgconverge.locks (identity, holder) VALUES (:'id', :'holder') \
                         ON CONFLICT (identity) DO UPDATE SET holder = EXCLUDED.holder, since = now() RETURNING 1;");
                    return match wrote {
                        Ok(_) => Ok(PgLock { child, _stdin: stdin }),
                        Err(e) => Err(LockRefused::Failed(e)),
                    };
                }
                Ok(f) if f == "f" && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(500)),
                Ok(f) if f == "f" => {
                    let holder = self
                        .run(
                            &[("id", &self.identity)],
                            "SELECT holder || ', since ' || since FROM pgconverge.locks WHERE identity = :'id';",
                        )
                        .unwrap_or_default();
                    let holder = if holder.is_empty() { "an apply that has not said who it is".into() } else { holder };
                    return Err(LockRefused::Held(format!("{holder} (the state database's lock)")));
                }
                other => {
                    drop(stdin);
                    let out = child.wait_with_output().ok();
                    let said = out.map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned()).unwrap_or_default();
                    let said = if said.is_empty() { format!("{other:?}") } else { said };
                    return Err(LockRefused::Failed(Error::Database(format!(
                        "cannot take the lock: {}",
                        crate::model::printable(&said)
                    ))));
                }
            }
        }
    }
}

/// Refuses a schema version newer than this binary knows.
fn newer(version: u32) -> Result<()> {
    if version > SCHEMA_VERSION {
        return Err(Error::Newer { found: version });
    }
    Ok(())
}

/// Why the lock was not taken.
#[derive(Debug)]
pub enum LockRefused {
    /// Another apply holds it: who.
    Held(String),
    Failed(Error),
}

/// The lock, held by a `psql` session; dropping it ends the session.
#[derive(Debug)]
pub struct PgLock {
    child: Child,
    _stdin: std::process::ChildStdin,
}

impl Drop for PgLock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// This machine's name, for a lock's holder and a local root's identity.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
}

/// A `psql` of any major this machine has (the newest), for the state database.
fn psql() -> Result<PathBuf> {
    (12..=18).rev().find_map(|major| crate::binaries::find(major, &[]).ok()).map(|b| b.program("psql")).ok_or_else(
        || {
            Error::Setup(
                "psql is needed: install a PostgreSQL client (e.g. apt-get install postgresql-client) or \
                 run scripts/fetch-postgres 17"
                    .into(),
            )
        },
    )
}

/// libpq's environment variables for a DSN: a URI (`postgres://user:pw@host:port/db?k=v`)
/// or `key=value` pairs. Errors name what is wrong, never a value.
pub fn libpq_vars(dsn: &str) -> std::result::Result<Vec<(&'static str, String)>, String> {
    let dsn = dsn.trim();
    let mut pairs: Vec<(String, String)> = Vec::new();
    if let Some(rest) = dsn.strip_prefix("postgresql://").or_else(|| dsn.strip_prefix("postgres://")) {
        let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = main.split_once('/').unwrap_or((main, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        if let Some(userinfo) = userinfo {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                pairs.push(("user".into(), decode(user)?));
            }
            if let Some(p) = password {
                pairs.push(("password".into(), decode(p)?));
            }
        }
        if !hosts.is_empty() {
            let (mut names, mut ports) = (Vec::new(), Vec::new());
            for host in hosts.split(',') {
                let (name, port) = match host.strip_prefix('[') {
                    Some(v6) => {
                        let (name, after) = v6.split_once(']').ok_or("has an unclosed [ in its host")?;
                        (name, after.strip_prefix(':').unwrap_or(""))
                    }
                    None => host.rsplit_once(':').unwrap_or((host, "")),
                };
                names.push(decode(name)?);
                ports.push(port.to_owned());
            }
            pairs.push(("host".into(), names.join(",")));
            if ports.iter().any(|p| !p.is_empty()) {
                pairs.push(("port".into(), ports.join(",")));
            }
        }
        if !path.is_empty() {
            pairs.push(("dbname".into(), decode(path)?));
        }
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or("has a query parameter without a value")?;
            pairs.push((decode(k)?, decode(v)?));
        }
    } else if dsn.contains('=') {
        let mut chars = dsn.chars().peekable();
        loop {
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && !c.is_whitespace())).collect();
            if key.is_empty() {
                break;
            }
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            if chars.next() != Some('=') {
                return Err(format!("has `{key}` without `=`"));
            }
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            let mut value = String::new();
            if chars.next_if_eq(&'\'').is_some() {
                loop {
                    match chars.next() {
                        Some('\\') => value.extend(chars.next()),
                        Some('\'') => break,
                        Some(c) => value.push(c),
                        None => return Err(format!("has an unclosed quote in `{key}`")),
                    }
                }
            } else {
                while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                    if c == '\\' {
                        value.extend(chars.next());
                    } else {
                        value.push(c);
                    }
                }
            }
            pairs.push((key, value));
        }
    } else {
        return Err("is neither a postgres:// URI nor key=value pairs".into());
    }
    pairs
        .into_iter()
        .map(|(k, v)| {
            let var = match k.as_str() {
                "host" => "PGHOST",
                "hostaddr" => "PGHOSTADDR",
                "port" => "PGPORT",
                "dbname" => "PGDATABASE",
                "user" => "PGUSER",
                "password" => "PGPASSWORD",
                "passfile" => "PGPASSFILE",
                "options" => "PGOPTIONS",
                "sslmode" => "PGSSLMODE",
                "sslrootcert" => "PGSSLROOTCERT",
                "sslcert" => "PGSSLCERT",
                "sslkey" => "PGSSLKEY",
                "sslcrl" => "PGSSLCRL",
                "channel_binding" => "PGCHANNELBINDING",
                "gssencmode" => "PGGSSENCMODE",
                "connect_timeout" => "PGCONNECT_TIMEOUT",
                "target_session_attrs" => "PGTARGETSESSIONATTRS",
                "require_auth" => "PGREQUIREAUTH",
                "application_name" => "PGAPPNAME",
                other => {
                    return Err(format!(
                        "has a parameter pgconverge does not pass on: `{}`",
                        crate::model::printable(other)
                    ))
                }
            };
            Ok((var, v))
        })
        .collect()
}

/// Percent-decoding, for the parts of a URI.
fn decode(text: &str) -> std::result::Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or("has a bad %-escape")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "has a %-escape that is not UTF-8".to_owned())
}

/// Standard base64, as PostgreSQL's `encode(…, 'base64')` writes it (newlines removed).
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let text = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for &c in text {
        acc = (acc << 6) | u32::from(value(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(dsn: &str) -> Vec<(&'static str, String)> {
        libpq_vars(dsn).unwrap_or_else(|e| panic!("{dsn}: {e}"))
    }

    #[test]
    fn dsns_become_libpq_variables() {
        let v = |pairs: &[(&'static str, &str)]| pairs.iter().map(|(k, v)| (*k, v.to_string())).collect::<Vec<_>>();
        assert_eq!(
            vars("postgres://st:p%40ss@db.example:5433/state?sslmode=require"),
            v(&[
                ("PGUSER", "st"),
                ("PGPASSWORD", "p@ss"),
                ("PGHOST", "db.example"),
                ("PGPORT", "5433"),
                ("PGDATABASE", "state"),
                ("PGSSLMODE", "require")
            ])
        );
        assert_eq!(vars("postgresql://[::1]:5432/x"), v(&[("PGHOST", "::1"), ("PGPORT", "5432"), ("PGDATABASE", "x")]));
        assert_eq!(
            vars("host=127.0.0.1 port = 5432 password='it\\'s' user=st dbname=a\\ b"),
            v(&[
                ("PGHOST", "127.0.0.1"),
                ("PGPORT", "5432"),
                ("PGPASSWORD", "it's"),
                ("PGUSER", "st"),
                ("PGDATABASE", "a b")
            ])
        );
        assert_eq!(vars("password='a\\'b c'"), v(&[("PGPASSWORD", "a'b c")]));
        for bad in ["mysql://x", "host", "password='s3cret", "postgres://h/db?evil=s3cret", "postgres://h/%zz"] {
            let e = libpq_vars(bad).expect_err(bad);
            assert!(!e.contains("s3cret"), "a value is never shown: {e}");
        }
    }

    #[test]
    fn base64_round_trips_what_postgresql_writes() {
        assert_eq!(base64_decode("aGVsbG8gd29ybGQ=").as_deref(), Some(&b"hello world"[..]));
        assert_eq!(base64_decode("eyJhIjoxfQ==").as_deref(), Some(&br#"{"a":1}"#[..]));
        assert_eq!(base64_decode("").as_deref(), Some(&b""[..]));
        assert_eq!(base64_decode("a$b"), None);
    }
}
