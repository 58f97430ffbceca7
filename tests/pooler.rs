//! `provider.local.pooler: pgbouncer`, with real servers and Debian's PgBouncer: writers on
//! long-lived connections through the pooler see no failed statement across an upgrade
//! and keep their DSN; a transaction held open past `max_pause_seconds` makes the fence
//! give the pause up, nothing failed; a crash inside the pause leaves the pooler paused,
//! and the next apply finishes with the waiting statement's row on the new server.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ensure_postgres, env_file, pgconverge, pgconverge_with, psql, scratch, Servers};

fn config(dir: &Path, major: u32, upgrade: &str) {
    ensure_postgres();
    common::ensure_pgbouncer();
    let text = format!(
        "version: 1\nprovider:\n  local:\n    pooler: pgbouncer\nupgrade: {{{upgrade}}}\nenvironments:\n  test:\n    postgres:\n      DEFAULT: {major}\n"
    );
    std::fs::write(dir.join("pgconverge.yaml"), text).expect("config");
}

fn dsn(root: &Path) -> String {
    env_file(&root.join("test.env"))["DATABASE_URL"].clone()
}

/// An environment on PostgreSQL 16 behind the pooler, with an empty table `w`: its root's
/// guard, the scratch directory, the application's DSN. (Fields drop in order: the guard
/// stops the servers and the pooler before the directory goes.)
struct On16 {
    _servers: Servers,
    dir: common::Scratch,
    root: std::path::PathBuf,
    url: String,
}

fn on_16(name: &str, upgrade: &str) -> On16 {
    let dir = scratch(name);
    let root = dir.join(".pgconverge");
    let servers = Servers(root.clone());
    config(&dir, 16, upgrade);
    let first = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(first.code, 0, "{}{}", first.stdout, first.stderr);
    let url = dsn(&root);
    psql(&url, "CREATE TABLE w (n bigint PRIMARY KEY)").expect("table");
    On16 { _servers: servers, dir, root, url }
}

/// The major of the server behind `url`.
fn major(url: &str) -> String {
    psql(url, "SELECT current_setting('server_version_num')::int / 10000").expect("major")
}

/// A psql session on one long-lived connection, fed statements one at a time.
struct Session {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Session {
    fn open(dsn: &str, name: &str) -> Session {
        let bin = pgconverge::provider::local::binaries::find(17, &[]).expect("psql");
        let mut child = Command::new(bin.program("psql"))
            .args(["-X", "-q", "-A", "-t", dsn])
            .env("PGAPPNAME", name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("psql");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        Session { child, out }
    }

    /// Runs `sql` (one statement that returns one row), `Err` if it returned none.
    fn run(&mut self, sql: &str) -> Result<String, ()> {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{sql};\n\\echo --end").map_err(drop)?;
        stdin.flush().map_err(drop)?;
        let mut got = None;
        loop {
            let mut line = String::new();
            if self.out.read_line(&mut line).map_err(drop)? == 0 {
                return Err(());
            }
            match line.trim_end() {
                "--end" => return got.ok_or(()),
                l => got = Some(l.to_owned()),
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Four writers, each on one connection through the pooler, inserting until `stop`:
/// what each saw committed, its failures, its slowest statement.
fn writers(dsn: &str, stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<(Vec<i64>, u32, Duration)>> {
    (0..4)
        .map(|w| {
            let (dsn, stop) = (dsn.to_owned(), stop.clone());
            std::thread::spawn(move || {
                let mut s = Session::open(&dsn, &format!("writer{w}"));
                let (mut committed, mut failed, mut slowest) = (Vec::new(), 0, Duration::ZERO);
                let started = Instant::now();
                let mut n = 0i64;
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                    n += 1;
                    let id = w * 1_000_000 + n;
                    let t = Instant::now();
                    match s.run(&format!("INSERT INTO w (n) VALUES ({id}) RETURNING n")) {
                        Ok(_) => committed.push(id),
                        Err(()) => {
                            failed += 1;
                            s = Session::open(&dsn, &format!("writer{w}"));
                        }
                    }
                    slowest = slowest.max(t.elapsed());
                }
                (committed, failed, slowest)
            })
        })
        .collect()
}

#[test]
fn writers_through_the_pooler_see_no_failure_and_keep_their_dsn() {
    let On16 { dir, root, url, .. } = &on_16("pooler_upgrade", "strategy: logical");

    let stop = Arc::new(AtomicBool::new(false));
    let handles = writers(url, &stop);
    std::thread::sleep(Duration::from_millis(500));
    config(dir, 17, "strategy: logical");
    let run = pgconverge(&["apply", "--auto-approve"], dir);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let results: Vec<_> = handles.into_iter().map(|h| h.join().expect("writer")).collect();
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);

    assert_eq!(&dsn(root), url, "the application's DSN did not change");
    assert_eq!(major(url), "17");
    let failed: u32 = results.iter().map(|r| r.1).sum();
    assert_eq!(failed, 0, "statements failed through the pooler");
    let committed: Vec<i64> = results.iter().flat_map(|r| r.0.iter().copied()).collect();
    assert!(committed.len() > 20, "the writers wrote: {}", committed.len());
    let present = psql(url, "SELECT count(*) FROM w").expect("count");
    assert_eq!(present, committed.len().to_string(), "every committed row is on the new server");
    let slowest = results.iter().map(|r| r.2).max().unwrap_or_default();
    eprintln!("{} rows, 0 failed, slowest statement {:.3} s", committed.len(), slowest.as_secs_f64());
}

#[test]
fn a_transaction_held_open_makes_the_fence_give_up_and_nothing_fails() {
    let On16 { dir, url, .. } = &on_16("pooler_held", "strategy: logical, max_pause_seconds: 1");
    // The copy streams first (its start waits for transactions open then), up to the fence.
    config(dir, 17, "strategy: logical, max_pause_seconds: 1");
    let streaming = pgconverge_with(&["apply", "--auto-approve"], dir, &[("PGCONVERGE_FAILPOINTS", "before:4=error")]);
    assert_eq!(streaming.code, 1, "{}{}", streaming.stdout, streaming.stderr);
    assert!(streaming.stderr.contains("[test 4/"), "stopped before the fence: {}", streaming.stderr);
    let mut holder = Session::open(url, "holder");
    holder.run("BEGIN; INSERT INTO w (n) VALUES (1) RETURNING n").expect("held open");

    let t = Instant::now();
    let refused = pgconverge(&["apply", "--auto-approve"], dir);
    assert_eq!(refused.code, 1, "{}{}", refused.stdout, refused.stderr);
    assert!(refused.stderr.contains("could not pause DEFAULT within"), "{}", refused.stderr);
    assert!(refused.stderr.contains("holder idle in transaction"), "the holder is named: {}", refused.stderr);
    eprintln!("the pause was given up, apply ended {:.2} s after it began", t.elapsed().as_secs_f64());
    // Resumed on the old server: the application writes, nothing failed meanwhile.
    psql(url, "INSERT INTO w (n) VALUES (2)").expect("writes go on");
    assert_eq!(major(url), "16");

    holder.run("COMMIT; SELECT 1").expect("commit");
    // A bound a loaded machine's catch-up fits in.
    config(dir, 17, "strategy: logical, max_pause_seconds: 30");
    let run = pgconverge(&["apply", "--auto-approve"], dir);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(psql(url, "SELECT string_agg(n::text, ',' ORDER BY n) FROM w").expect("rows"), "1,2");
    assert_eq!(major(url), "17");
}

/// Work inside the pause that runs past `max_pause_seconds` (the catch-up made slow by a
/// failpoint): no further action starts; the pause is given up, the old server unfenced
/// and the pooler resumed on it, nothing failed; the next apply finishes.
#[test]
fn a_pause_that_would_run_past_its_bound_is_given_up() {
    let On16 { dir, url, .. } = &on_16("pooler_bound", "strategy: logical, max_pause_seconds: 1");
    config(dir, 17, "strategy: logical, max_pause_seconds: 1");
    let slow = pgconverge_with(&["apply", "--auto-approve"], dir, &[("PGCONVERGE_FAILPOINTS", "after:5=sleep1500")]);
    assert_eq!(slow.code, 1, "{}{}", slow.stdout, slow.stderr);
    assert!(slow.stderr.contains("past upgrade.max_pause_seconds (1 s)"), "{}", slow.stderr);
    assert!(slow.stderr.contains("catch up"), "the catch-up ran, the next action did not: {}", slow.stderr);
    psql(url, "INSERT INTO w (n) VALUES (1)").expect("the application writes to the old server again");
    assert_eq!(major(url), "16");
    config(dir, 17, "strategy: logical, max_pause_seconds: 30");
    let run = pgconverge(&["apply", "--auto-approve"], dir);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(psql(url, "SELECT count(*) FROM w").expect("rows"), "1");
    assert_eq!(major(url), "17");
}

/// Crashes at each place inside the pause: in the fence, after it, after the catch-up,
/// before the deploy that points the pooler at the new server.
#[test]
fn a_crash_inside_the_pause_leaves_queries_waiting_and_the_next_apply_finishes() {
    for failpoint in ["fence:paused", "after:4", "after:5", "before:10"] {
        crash_inside_the_pause(failpoint);
    }
}

fn crash_inside_the_pause(failpoint: &str) {
    let On16 { dir, root, url, .. } =
        &on_16(&format!("pooler_crash_{}", failpoint.replace(':', "_")), "strategy: logical");

    config(dir, 17, "strategy: logical");
    let spec = format!("{failpoint}=crash");
    let crashed = pgconverge_with(&["apply", "--auto-approve"], dir, &[("PGCONVERGE_FAILPOINTS", &spec)]);
    assert_eq!(crashed.code, 137, "{spec}: {}{}", crashed.stdout, crashed.stderr);
    // The pooler outlived apply, paused: a statement now waits rather than fails.
    let waiting = {
        let url = url.clone();
        std::thread::spawn(move || psql(&url, "INSERT INTO w (n) VALUES (7)"))
    };
    let show = pgconverge(&["show"], dir);
    assert_eq!(show.code, 0, "{spec}: {}{}", show.stdout, show.stderr);
    // Paused with its server fenced: said; paused on a server not yet recorded fenced
    // (the crash came between the two, where a running apply also is): said, and left to
    // the next apply, since show cannot tell the two apart.
    assert!(
        show.stderr.contains("the pooler is paused")
            || show.stderr.contains("left paused on a server that is not fenced"),
        "{spec}: show says so: {}",
        show.stderr
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!waiting.is_finished(), "{spec}: show resumed the pooler (the statement ran)");
    let run = pgconverge(&["apply", "--auto-approve"], dir);
    assert_eq!(run.code, 0, "{spec}: {}{}", run.stdout, run.stderr);
    waiting.join().expect("waiting statement").unwrap_or_else(|e| panic!("{spec}: the waiting statement failed: {e}"));
    assert_eq!(psql(url, "SELECT count(*) FROM w WHERE n = 7").expect("row"), "1", "{spec}");
    assert_eq!(major(url), "17");
    assert_eq!(&dsn(root), url, "{spec}: the DSN did not change");
}

/// The pooler outlives pgconverge; killed, `show` says so (it changes nothing) and the
/// next apply starts it again, on the same port, so the DSN still works.
#[test]
fn a_pooler_that_died_is_started_again() {
    let On16 { dir, root, url, .. } = &on_16("pooler_restart", "strategy: logical");
    let pidfile = root.join("poolers/test/pgbouncer.pid");
    let pid = std::fs::read_to_string(&pidfile).expect("the pooler runs after apply");
    assert!(Command::new("kill").args(["-KILL", pid.trim()]).status().expect("kill").success());
    // Gone, or a zombie nobody reaps (PID 1 of a container may not).
    let gone = || {
        std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
            .map_or(true, |s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
    };
    while !gone() {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(psql(url, "SELECT 1").is_err(), "no pooler, no connection");
    let show = pgconverge(&["show"], dir);
    assert!(show.stderr.contains("the pooler is down"), "{}", show.stderr);
    assert!(psql(url, "SELECT 1").is_err(), "show started nothing");
    let apply = pgconverge(&["apply", "--auto-approve"], dir);
    assert_eq!(apply.code, 0, "{}{}", apply.stdout, apply.stderr);
    assert!(apply.stderr.contains("the pooler was down; starting it"), "{}", apply.stderr);
    assert_eq!(psql(url, "SELECT 1").expect("the same DSN works again"), "1");
}

#[test]
fn a_missing_pgbouncer_is_a_plan_time_error() {
    let dir = scratch("pooler_missing");
    let _servers = Servers(dir.join(".pgconverge"));
    config(&dir, 16, "strategy: logical");
    let plan = common::pgconverge_with(&["plan"], &dir, &[("PGCONVERGE_PGBOUNCER", "/nonexistent/pgbouncer")]);
    assert_eq!(plan.code, 1, "{}{}", plan.stdout, plan.stderr);
    assert!(plan.stderr.contains("apt-get install pgbouncer"), "{}", plan.stderr);
}
