//! One PostgreSQL server (cluster) on this machine: initdb, start, stop, SQL.
//!
//! Servers are started in a process group of their own, so that killing pgconverge (or
//! its whole process group) never kills a database. As root, every server program runs
//! as the configured OS user, since initdb and postgres refuse to run as root.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::binaries::Binaries;
use super::error::{Error, Result};
use crate::process::{last_lines, output_fed};

/// The OS identity server processes run as; `None` means "as this process".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// `user` when this process is root (looked up in /etc/passwd), else `None`.
    pub fn for_user(user: &str) -> Result<Option<RunAs>> {
        if effective_uid() != Some(0) {
            return Ok(None);
        }
        let passwd = std::fs::read_to_string("/etc/passwd").map_err(Error::io("read", "/etc/passwd"))?;
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 3 && f[0] == user {
                if let (Ok(uid), Ok(gid)) = (f[2].parse::<u32>(), f[3].parse()) {
                    if uid == 0 {
                        return Err(Error::Setup(format!(
                            "OS user `{user}` (provider.local.run_as) is root (uid 0): PostgreSQL servers must run as an unprivileged user, such as postgres"
                        )));
                    }
                    return Ok(Some(RunAs { uid, gid }));
                }
            }
        }
        Err(Error::Setup(format!(
            "pgconverge runs as root, and PostgreSQL servers may not: OS user `{user}` (provider.local.run_as) does not exist; create it or name another"
        )))
    }

    /// Gives `path` to this user.
    pub fn own(&self, path: &Path) -> std::io::Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
    }
}

pub fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Whether `dir` is a socket directory made for one server alone: `Ok(true)` when it is
/// (a directory, not a symlink, owned by `owner`, mode 0700), `Ok(false)` when it is
/// missing, an error naming what is wrong otherwise (someone else made or changed it).
pub fn check_private_dir(dir: &Path, owner: u32) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let m = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("look at the socket directory", dir)(e)),
    };
    if m.file_type().is_symlink() || !m.is_dir() || m.uid() != owner || m.mode() & 0o077 != 0 {
        return Err(Error::Untrusted(format!(
            "{} is not a private socket directory of pgconverge's (want a directory of uid {owner} with mode 0700; found {}uid {}, mode {:o}): someone else made or changed it, so no password goes through it; remove it and run pgconverge again",
            dir.display(),
            if m.file_type().is_symlink() { "a symlink, " } else { "" },
            m.uid(),
            m.mode() & 0o7777
        )));
    }
    Ok(true)
}

/// What initdb fixes for good in a cluster. The default is what pgconverge gives every
/// server it makes: UTF-8, locale C, data checksums, 16 MB WAL segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub encoding: String,
    pub collate: String,
    pub ctype: String,
    pub checksums: bool,
    pub wal_segment_mb: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            encoding: "UTF8".into(),
            collate: "C".into(),
            ctype: "C".into(),
            checksums: true,
            wal_segment_mb: 16,
        }
    }
}

/// A server's files and address.
#[derive(Clone, Debug)]
pub struct Server {
    pub bin: Binaries,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub log_file: PathBuf,
    pub port: u16,
    pub run_as: Option<RunAs>,
}

/// The superuser pgconverge itself connects as (over the socket, trusted locally).
pub const SUPERUSER: &str = "postgres";

/// The role restores run as (over the socket, trusted locally): never a superuser, so
/// that the application's code a restore runs (check constraints, functions in index
/// expressions) has no more rights than the roles that own the objects. It exists only
/// while a restore runs.
pub const RESTORER: &str = "pgconverge_restore";

/// `PGCONVERGE_UNSAFE_NO_FSYNC=1`: servers made and started without waiting for the disk
/// (`initdb --no-sync`, `fsync`, `synchronous_commit` and `full_page_writes` off). What
/// they hold survives any process's crash, pgconverge's or PostgreSQL's, but not the
/// machine's: for the test suites and throwaway demos, never for data anyone keeps.
pub fn throwaway() -> bool {
    std::env::var_os("PGCONVERGE_UNSAFE_NO_FSYNC").is_some_and(|v| v == "1")
}

/// `PGOPTIONS` of every session pgconverge opens: a database's or role's settings, which
/// the application sets, never decide which function a name in pgconverge's own SQL
/// means (`search_path`), nor cut its work short or make it read-only (a client's
/// options override both).
pub const SESSION_OPTIONS: &str = "-c search_path=pg_catalog -c statement_timeout=0 -c lock_timeout=0 \
     -c idle_in_transaction_session_timeout=0 -c default_transaction_read_only=off";

impl Server {
    /// `program` of this server's major, run as the server's user from `/`, with no
    /// `PGDATA`, `PGPORT` or `PGHOST` of this process's.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.program(program));
        c.current_dir("/").env_remove("PGDATA").env_remove("PGPORT").env_remove("PGHOST").env("LC_ALL", "C");
        if let Some(r) = self.run_as {
            c.uid(r.uid).gid(r.gid);
        }
        c
    }

    /// Runs `c` (one of `command`'s) to its end; a failure keeps the last `lines` lines it
    /// wrote.
    pub fn run(&self, mut c: Command, what: &str, lines: usize) -> Result<Output> {
        let out = c.stdin(Stdio::null()).output().map_err(Error::spawn(what))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let output = last_lines(&format!("{stdout}{stderr}"), lines);
            return Err(Error::Program { what: what.to_owned(), status: out.status, output });
        }
        Ok(out)
    }

    /// The OS user the server's files belong to.
    fn owner(&self) -> u32 {
        self.run_as.map(|r| r.uid).or_else(effective_uid).unwrap_or(0)
    }

    /// initdb: UTF-8, data checksums, local superuser trusted over the socket only. The
    /// server's directories are made for its user alone (mode 0700, whatever the umask).
    pub fn init(&self) -> Result<()> {
        self.init_like(&Settings::default())
    }

    /// initdb with `settings` (a cluster pg_upgrade can fill from one that has them).
    pub fn init_like(&self, settings: &Settings) -> Result<()> {
        let log_dir = self.log_file.parent().unwrap_or(&self.data_dir);
        for dir in [&self.data_dir, &self.socket_dir, &log_dir.to_path_buf()] {
            if !dir.exists() {
                std::fs::DirBuilder::new().recursive(true).create(dir).map_err(Error::io("create", dir))?;
                std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                    .map_err(Error::io("protect", dir))?;
            }
            if let Some(r) = self.run_as {
                r.own(dir).map_err(Error::io("give the server user", dir))?;
            }
        }
        let mut c = self.command("initdb");
        c.arg("-D")
            .arg(&self.data_dir)
            .arg(format!("--encoding={}", settings.encoding))
            .arg(format!("--lc-collate={}", settings.collate))
            .arg(format!("--lc-ctype={}", settings.ctype))
            .args(["--locale=C", "--username", SUPERUSER])
            .arg(format!("--wal-segsize={}", settings.wal_segment_mb))
            .args(["--auth-local=trust", "--auth-host=scram-sha-256", "--no-instructions"]);
        if settings.checksums {
            c.arg("--data-checksums");
        } else if self.bin.major >= 18 {
            c.arg("--no-data-checksums"); // on by default from 18
        }
        if throwaway() {
            c.arg("--no-sync");
        }
        self.run(c, "initdb", 6).map(drop)
    }

    /// Starts the server detached from pgconverge's process group, listening on
    /// 127.0.0.1:port and on a socket in `socket_dir`; waits until it accepts connections.
    /// `wal_level = logical`, so that any server can be the source of the logical
    /// strategy without a restart then (it costs a few bytes of WAL per update).
    pub fn start(&self) -> Result<()> {
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c unix_socket_permissions=0700 -c wal_level=logical",
            self.port,
            self.socket_dir.display()
        );
        if throwaway() {
            options.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let mut c = self.command("pg_ctl");
        c.arg("-D").arg(&self.data_dir).arg("-l").arg(&self.log_file).args(["-o", &options, "-w", "-t", "60", "start"]);
        c.process_group(0);
        // pg_ctl's server inherits stdout/stderr: give it none, or a caller reading our
        // output would wait for the server to exit.
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        let out = c.stdin(Stdio::null()).output().map_err(Error::spawn("pg_ctl start"))?;
        // A start begun by a killed apply may win the race (its pg_ctl and server live on
        // in a process group of their own): the server runs, as asked.
        if !out.status.success() && !self.is_running() {
            let log = std::fs::read_to_string(&self.log_file).unwrap_or_default();
            return Err(Error::Server(format!(
                "the PostgreSQL {} server in {} did not start: {}{}",
                self.bin.major,
                self.data_dir.display(),
                String::from_utf8_lossy(&out.stderr).trim(),
                if log.is_empty() { String::new() } else { format!("; its log ends: {}", last_lines(&log, 4)) }
            )));
        }
        Ok(())
    }

    /// The postmaster's pid, while it runs: what `pg_ctl status` checks, without
    /// starting a program (observe asks after every action).
    pub fn postmaster(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok().filter(|p| *p > 0)?;
        alive(pid).then_some(pid)
    }

    /// The postmaster runs. One still recovering (it restarts itself after a backend
    /// crashes, on a full disk for one, and replays its WAL before it takes connections
    /// again, while `postmaster.pid` still says ready) is waited for, up to a minute, so
    /// that whoever asks can connect.
    pub fn is_running(&self) -> bool {
        if self.postmaster().is_none() {
            return false;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while self.postmaster().is_some() && self.refusing() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        self.postmaster().is_some()
    }

    /// The server cannot take connections for now: no socket yet, or it answers and
    /// refuses (starting up, recovering: what `pg_isready` reports as 1, SQLSTATE 57P03
    /// to a startup packet). Asked here rather than by starting a program, since every
    /// action asks it of each server. The packet names the superuser, trusted over the
    /// socket, so the server logs nothing.
    fn refusing(&self) -> bool {
        use std::io::{Read, Write};
        if !check_private_dir(&self.socket_dir, self.owner()).unwrap_or(false) {
            return false;
        }
        let path = self.socket_dir.join(format!(".s.PGSQL.{}", self.port));
        // A live postmaster without its socket yet is still starting (a start that a
        // killed apply began): not taking connections either.
        let Ok(mut socket) = std::os::unix::net::UnixStream::connect(&path) else { return true };
        let limit = Some(std::time::Duration::from_secs(10));
        let _ = socket.set_read_timeout(limit).and_then(|()| socket.set_write_timeout(limit));
        let mut body = 196_608u32.to_be_bytes().to_vec(); // protocol 3.0
        for (key, value) in [("user", SUPERUSER), ("database", "postgres")] {
            body.extend_from_slice(key.as_bytes());
            body.push(0);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        let mut head = [0u8; 5];
        if socket.write_all(&packet).and_then(|()| socket.read_exact(&mut head)).is_err() {
            return false;
        }
        if head[0] != b'E' {
            let _ = socket.write_all(&[b'X', 0, 0, 0, 4]); // Terminate
            return false;
        }
        let length = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut fields = vec![0u8; length.saturating_sub(4).min(64 * 1024)];
        socket.read_exact(&mut fields).is_ok() && fields.split(|b| *b == 0).any(|f| f == b"C57P03")
    }

    /// Stops the server (fast shutdown: sessions are ended, nothing committed is lost)
    /// and waits until it is gone, polling more often than `pg_ctl stop -w` does.
    pub fn stop(&self) -> Result<()> {
        let Some(pid) = self.postmaster() else { return Ok(()) };
        let mut c = self.command("pg_ctl");
        c.args(["kill", "INT", &pid.to_string()]);
        self.run(c, "pg_ctl kill INT", 6)
            .map_err(|e| Error::Server(format!("cannot stop the server in {}: {e}", self.data_dir.display())))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while alive(pid) {
            if std::time::Instant::now() > deadline {
                return Err(Error::Server(format!(
                    "the server in {} (pid {pid}) did not stop within 60 s",
                    self.data_dir.display()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(())
    }

    /// What initdb fixed for good in this (running) server's cluster, which pg_upgrade
    /// needs equal on both sides.
    pub fn settings(&self) -> Result<Settings> {
        let out = self.sql(
            "postgres",
            "SELECT current_setting('server_encoding'), datcollate, datctype, current_setting('data_checksums'), \
             pg_size_bytes(current_setting('wal_segment_size')) / 1048576 FROM pg_database WHERE datname = 'template1'",
        )?;
        let f: Vec<&str> = out.trim().split('|').collect();
        let wal = f.get(4).and_then(|w| w.parse().ok());
        match (f.as_slice(), wal) {
            ([encoding, collate, ctype, checksums, _], Some(wal_segment_mb)) => Ok(Settings {
                encoding: encoding.to_string(),
                collate: collate.to_string(),
                ctype: ctype.to_string(),
                checksums: *checksums == "on",
                wal_segment_mb,
            }),
            _ => Err(Error::Server(format!("unexpected answer `{out}` about the cluster's settings"))),
        }
    }

    /// Runs SQL as the superuser in `db`; returns unaligned, tuples-only output.
    /// The SQL goes through stdin, never the command line, where other users of the
    /// machine could read it (it may set a password).
    pub fn sql(&self, db: &str, sql: &str) -> Result<String> {
        if !check_private_dir(&self.socket_dir, self.owner())? {
            return Err(Error::Server(format!("the socket directory {} is gone", self.socket_dir.display())));
        }
        let mut c = Command::new(self.bin.program("psql"));
        c.current_dir("/")
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGOPTIONS", SESSION_OPTIONS)
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-U", SUPERUSER, "-d", db])
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", "-"]);
        let out = output_fed(c, sql).map_err(Error::spawn("psql"))?;
        if !out.status.success() {
            let output = last_lines(&String::from_utf8_lossy(&out.stderr), 6);
            return Err(Error::Program { what: "psql".into(), status: out.status, output });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    }

    /// Runs each statement on its own (some, like CREATE DATABASE, refuse to share one).
    pub fn sql_each(&self, db: &str, statements: &[&str]) -> Result<()> {
        statements.iter().try_for_each(|s| self.sql(db, s).map(drop))
    }

    /// Arguments that make a client program reach this server as the superuser.
    pub fn conn_args(&self, db: &str) -> Vec<String> {
        vec![
            "-h".into(),
            self.socket_dir.display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-U".into(),
            SUPERUSER.into(),
            "-d".into(),
            db.into(),
        ]
    }
}

/// Whether process `pid` runs (a zombie, waiting to be reaped, does not).
pub(crate) fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses, which may hold spaces.
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// A TCP port on 127.0.0.1 that is free right now.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(Error::io("bind a free port on", "127.0.0.1"))?;
    l.local_addr().map(|a| a.port()).map_err(Error::io("bind a free port on", "127.0.0.1"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;

    /// A server that answers every startup packet with `reply`, on a socket in a private
    /// directory.
    fn answering(reply: Vec<u8>) -> (tempfile::TempDir, Server) {
        let dir = tempfile::Builder::new().prefix("pgconverge-refusing-").tempdir().expect("dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("mode");
        let listener =
            std::os::unix::net::UnixListener::bind(dir.path().join(".s.PGSQL.5999")).expect("bind the socket");
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut length = [0u8; 4];
                conn.read_exact(&mut length).expect("length");
                let mut rest = vec![0u8; u32::from_be_bytes(length) as usize - 4];
                conn.read_exact(&mut rest).expect("startup packet");
                assert!(rest.windows(9).any(|w| w == b"postgres\0"), "names the superuser");
                let _ = conn.write_all(&reply);
            }
        });
        let server = Server {
            bin: Binaries { major: 17, dir: PathBuf::from("/nonexistent") },
            data_dir: dir.path().join("data"),
            socket_dir: dir.path().to_owned(),
            log_file: dir.path().join("log"),
            port: 5999,
            run_as: None,
        };
        (dir, server)
    }

    fn error(code: &str) -> Vec<u8> {
        let fields = format!("SFATAL\0C{code}\0Mthe database system is starting up\0\0");
        let mut out = vec![b'E'];
        out.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(fields.as_bytes());
        out
    }

    #[test]
    fn a_server_that_cannot_take_connections_yet_is_told_from_one_that_can() {
        let (_dir, starting) = answering(error("57P03"));
        assert!(starting.refusing());
        let (_dir, no_role) = answering(error("28000"));
        assert!(!no_role.refusing(), "any other error means it takes connections");
        let (_dir, ready) = answering(vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0]);
        assert!(!ready.refusing());
        let (dir, silent) = answering(Vec::new());
        std::fs::remove_file(dir.path().join(".s.PGSQL.5999")).expect("remove the socket");
        assert!(silent.refusing(), "no socket yet: not taking connections either");
    }
}
