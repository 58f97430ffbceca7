//! Crash anywhere, run apply again, lose nothing. Every failpoint of the runbook upgrade
//! (before and after each action, and inside the long ones) is tripped in turn, once as
//! a crash (the process dies on the spot) and once as an error; then apply runs again and
//! must converge with every row present and nothing left behind.

mod common;

use std::path::Path;

use common::{ensure_postgres, env_file, pgconverge, pgconverge_with, psql, scratch, Servers};

const ROWS: u32 = 2000;

fn failpoints() -> Vec<String> {
    let mut names: Vec<String> = (1..=11).flat_map(|n| [format!("before:{n}"), format!("after:{n}")]).collect();
    names.extend(pgconverge::failpoint::INSIDE.iter().map(|s| s.to_string()));
    names
}

fn write_config(dir: &Path, major: u32) {
    std::fs::write(
        dir.join("pgconverge.yaml"),
        format!("version: 1\nenvironments:\n  test:\n    postgres:\n      DEFAULT: {major}\n"),
    )
    .expect("config");
}

/// Everything under root whose name says it is half-written.
fn leftovers(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() && name != "data" {
                stack.push(e.path());
            } else if name.contains(".tmp-") || name.ends_with(".partial") || name == "lock" {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

/// Server processes whose data directory lies under `root`.
fn running_servers(root: &Path) -> usize {
    let needle = root.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("bin/postgres") && c.contains(&needle))
        .count()
}

fn trip_each(mode: &str) {
    ensure_postgres();
    let mut tripped = 0;
    for name in failpoints() {
        let dir = scratch(&format!("crash_{mode}_{}", name.replace(':', "_")));
        let root = dir.join(".pgconverge");
        let _servers = Servers(root.clone());
        write_config(&dir, 15);
        assert_eq!(pgconverge(&["apply", "--auto-approve"], &dir).code, 0);
        let url = env_file(&root.join("test.env"))["DATABASE_URL"].clone();
        psql(&url, &format!("CREATE TABLE t (id serial PRIMARY KEY, v text); INSERT INTO t (v) SELECT md5(g::text) FROM generate_series(1, {ROWS}) g"))
            .expect("load");
        write_config(&dir, 17);

        let spec = format!("{name}={mode}");
        let broken = pgconverge_with(&["apply", "--auto-approve"], &dir, &[("PGCONVERGE_FAILPOINTS", &spec)]);
        let want = if mode == "crash" { 137 } else { 1 };
        assert_eq!(broken.code, want, "{spec}: {}{}", broken.stdout, broken.stderr);
        tripped += 1;

        let again = pgconverge(&["apply", "--auto-approve"], &dir);
        assert_eq!(again.code, 0, "{spec}: the second apply failed: {}{}", again.stdout, again.stderr);
        let url = env_file(&root.join("test.env"))["DATABASE_URL"].clone();
        let check = psql(&url, "SELECT count(*), max(id), current_setting('server_version_num')::int / 10000 FROM t")
            .expect("check");
        assert_eq!(check, format!("{ROWS}|{ROWS}|17"), "{spec}: rows after recovery");
        let plan = pgconverge(&["plan", "--detailed-exitcode"], &dir);
        assert_eq!(plan.code, 0, "{spec}: not converged: {}", plan.stdout);
        let dirs = std::fs::read_dir(root.join("servers")).expect("servers").count();
        assert_eq!(dirs, 1, "{spec}: orphan server directories");
        assert_eq!(running_servers(&root), 1, "{spec}: orphan server processes");
        assert_eq!(leftovers(&root), Vec::<String>::new(), "{spec}: files left behind");
    }
    assert_eq!(tripped, failpoints().len());
    eprintln!("{mode}: {tripped} failpoints tripped, {} rows checked after each", ROWS);
}

#[test]
fn crash_at_every_failpoint_then_apply_again() {
    trip_each("crash");
}

#[test]
fn error_at_every_failpoint_then_apply_again() {
    trip_each("error");
}
