//! kill -9 under live writes: a writer commits rows through the env file's DSN (reading
//! the file again whenever it reconnects) while apply upgrades the database; apply's whole
//! process group is killed at several moments, then apply runs again. Every row the
//! writer saw committed must be in the final database.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ensure_postgres, env_file, pgconverge, psql, scratch, Servers};

/// A moment of an apply to kill it at: its name, how long after it was seen (ms), and how
/// it is seen in the services' records and the ledger's entries, or under `root`.
type Phase = (&'static str, u64, fn(&[serde_json::Value], &std::path::Path) -> bool);

/// The NEW service's record.
fn new_service(s: &[serde_json::Value]) -> Option<&serde_json::Value> {
    s.iter().find(|v| v["prefix"] == "NEW" && v["status"].is_string())
}

#[test]
fn kill_apply_under_live_writes_and_lose_nothing() {
    // New server provisioned, old one fenced, copy restored (as the ledger records it),
    // old one retired.
    let phases: [Phase; 4] = [
        ("new server provisioned", 0, |s, _| s.iter().any(|v| v["prefix"] == "NEW" && v["status"] == "provisioned")),
        ("old server fenced", 30, |s, _| s.iter().any(|v| v["fenced"] == true)),
        ("copy restored", 0, |s, _| {
            let new = new_service(s).map(|v| &v["id"]);
            s.iter().any(|e| Some(&e["service"]) == new && !e["data"]["restored_from"].is_null())
        }),
        ("old server retired", 0, |s, _| s.iter().any(|v| v["prefix"] == "OLD")),
    ];
    kill_under_writes("dump_restore", "strategy: dump_restore", &phases);
}

/// The same with pg_upgrade, killed also while pg_upgrade itself runs (its report
/// directory exists in the new server's data directory): the whole process group dies,
/// pg_upgrade and the servers it started with it.
#[test]
fn kill_a_pg_upgrade_under_live_writes_and_lose_nothing() {
    let phases: [Phase; 4] = [
        ("old server fenced", 0, |s, _| s.iter().any(|v| v["fenced"] == true)),
        ("pg_upgrade running", 0, |s, root| {
            new_service(s)
                .and_then(|v| v["id"].as_str())
                .is_some_and(|id| root.join("servers").join(id).join("data/pg_upgrade_output.d").exists())
        }),
        ("copy upgraded", 0, |s, _| {
            let new = new_service(s).map(|v| &v["id"]);
            s.iter().any(|e| Some(&e["service"]) == new && !e["data"]["restored_from"].is_null())
        }),
        ("old server retired", 0, |s, _| s.iter().any(|v| v["prefix"] == "OLD")),
    ];
    kill_under_writes("pg_upgrade", "strategy: pg_upgrade", &phases);
}

/// The same with `transfer: link`, killed also once the old server is recorded consumed
/// (its files are the new one's): the next apply must never start it again. (What
/// follows takes a few milliseconds, too short to be caught in the act.)
#[test]
fn kill_a_linking_pg_upgrade_under_live_writes_and_lose_nothing() {
    let phases: [Phase; 3] = [
        ("old server fenced", 0, |s, _| s.iter().any(|v| v["fenced"] == true)),
        ("pg_upgrade running", 0, |s, root| {
            new_service(s)
                .and_then(|v| v["id"].as_str())
                .is_some_and(|id| root.join("servers").join(id).join("data/pg_upgrade_output.d").exists())
        }),
        ("old server consumed", 0, |s, _| s.iter().any(|v| v["consumed_by"].is_string())),
    ];
    kill_under_writes("pg_upgrade_link", "strategy: pg_upgrade, transfer: link", &phases);
}

/// The processes with `path` open, as `pid command`.
fn holders(path: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let fds = std::fs::read_dir(p.path().join("fd")).into_iter().flatten().flatten();
        if fds.filter_map(|fd| std::fs::read_link(fd.path()).ok()).any(|l| l == path) {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            found.push(format!("{} {}", p.file_name().to_string_lossy(), comm.trim()));
        }
    }
    found
}

/// `upgrade`: the config's `upgrade` keys, inline (`strategy: logical`).
fn kill_under_writes(name: &str, upgrade: &str, phases: &[Phase]) {
    ensure_postgres();
    let dir = scratch(&format!("kill_under_writes_{name}"));
    let root = dir.join(".pgconverge");
    let _servers = Servers(root.clone());
    let config = |major: u32| {
        std::fs::write(
            dir.join("pgconverge.yaml"),
            format!(
                "version: 1\nupgrade: {{{upgrade}}}\nenvironments:\n  test:\n    postgres:\n      DEFAULT: {major}\n"
            ),
        )
        .expect("config");
    };
    config(15);
    assert_eq!(pgconverge(&["apply", "--auto-approve"], &dir).code, 0);
    let env = root.join("test.env");
    let url = env_file(&env)["DATABASE_URL"].clone();
    psql(
        &url,
        "CREATE TABLE w (n bigint PRIMARY KEY, at timestamptz DEFAULT clock_timestamp()); \
                CREATE TABLE bulk AS SELECT g, md5(g::text) FROM generate_series(1, 100000) g",
    )
    .expect("load");

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let env = env.clone();
        std::thread::spawn(move || {
            let mut committed = Vec::new();
            let mut last = Instant::now();
            let mut longest = Duration::ZERO;
            let started = Instant::now();
            let mut n = 0u64;
            // Bounded in time whatever happens to the test around it.
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                let url = env_file(&env)["DATABASE_URL"].clone();
                if psql(&url, &format!("INSERT INTO w (n) VALUES ({})", n + 1)).is_ok() {
                    n += 1;
                    committed.push(n);
                    longest = longest.max(last.elapsed());
                    last = Instant::now();
                } else {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            (committed, longest)
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    config(17);
    // Kill when apply reaches each phase in turn (plus a little, to land inside the next
    // step). The provider's records, then the ledger's entries.
    let services = || -> Vec<serde_json::Value> {
        let mut found: Vec<serde_json::Value> = std::fs::read_dir(root.join("state/test"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|t| serde_json::from_str(&t).ok())
            .collect();
        let ledger = std::fs::read_to_string(root.join("ledger.json")).ok();
        let ledger: serde_json::Value = ledger.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        found.extend(ledger["entries"].as_array().into_iter().flatten().cloned());
        found
    };
    for &(phase, extra, reached) in phases {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pgconverge"))
            .args(["apply", "--auto-approve"])
            .env(common::THROWAWAY.0, common::THROWAWAY.1)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("apply");
        let waited = Instant::now();
        while !reached(&services(), &root)
            && child.try_wait().expect("wait").is_none()
            && waited.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let was_reached = reached(&services(), &root);
        std::thread::sleep(Duration::from_millis(extra));
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
        let status = child.wait().expect("wait");
        assert!(was_reached, "apply never reached '{phase}' before it was killed");
        eprintln!("{phase}: apply {}", if status.success() { "had finished" } else { "killed" });
        assert!(!status.success(), "apply finished before the kill at '{phase}'");
    }
    // Seen once in CI: the last apply found the killed apply's lock still held. A server
    // start forked just before the kill leaves a child that has moved to a process group
    // of its own (so the group kill missed it) and holds a copy of the lock's descriptor
    // until its exec closes it, which a loaded machine may delay. The wait lets it go;
    // the processes that hold the lock file are named if it is ever held for good.
    let last = pgconverge(&["apply", "--auto-approve", "--lock-timeout", "30s"], &dir);
    assert_eq!(
        last.code,
        0,
        "{}{}\nholding {}: {:?}",
        last.stdout,
        last.stderr,
        root.join("lock").display(),
        holders(&root.join("lock"))
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (committed, longest) = writer.join().expect("writer");

    let url = env_file(&env)["DATABASE_URL"].clone();
    assert_eq!(psql(&url, "SELECT current_setting('server_version_num')::int / 10000").expect("version"), "17");
    let present: Vec<u64> =
        psql(&url, "SELECT n FROM w ORDER BY n").expect("rows").lines().map(|l| l.parse().expect("number")).collect();
    let missing: Vec<&u64> = committed.iter().filter(|n| present.binary_search(n).is_err()).collect();
    assert!(committed.len() > 20, "the writer committed only {} rows", committed.len());
    assert!(missing.is_empty(), "{} committed writes lost: {:?}", missing.len(), &missing[..missing.len().min(10)]);
    assert_eq!(psql(&url, "SELECT count(*) FROM bulk").expect("bulk"), "100000");
    eprintln!(
        "{name}: {} writes committed and all present after {} kills; longest gap between two committed writes: {:.2} s",
        committed.len(),
        phases.len(),
        longest.as_secs_f64()
    );
}
