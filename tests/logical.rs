//! The logical strategy on real PostgreSQL 15 → 17 servers: the copy streams while a
//! writer keeps committing through the env file's DSN, the cutover blocks writes only for
//! the catch-up, and no committed write is lost, through crashes and schema changes.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ensure_postgres, env_file, pgconverge, pgconverge_with, psql, scratch, Servers};

fn config(dir: &Path, major: u32) {
    config_verifying(dir, major, "counts");
}

fn config_verifying(dir: &Path, major: u32, verify: &str) {
    ensure_postgres();
    let text = format!(
        "version: 1\nupgrade: {{strategy: logical, verify: {verify}}}\nenvironments:\n  test:\n    postgres:\n      DEFAULT: {major}\n"
    );
    std::fs::write(dir.join("pgconverge.yaml"), text).expect("config");
}

/// A PostgreSQL 15 environment holding `sql`'s data, its config already asking for 17.
fn loaded(name: &str, sql: &str) -> (common::Scratch, Servers) {
    let dir = scratch(name);
    let servers = Servers(dir.join(".pgconverge"));
    config(&dir, 15);
    assert_eq!(pgconverge(&["apply", "--auto-approve"], &dir).code, 0);
    psql(&url(&dir), sql).expect("load");
    config(&dir, 17);
    (dir, servers)
}

fn url(dir: &Path) -> String {
    env_file(&dir.join(".pgconverge/test.env"))["DATABASE_URL"].clone()
}

const SCHEMA: &str = "
    CREATE TABLE w (n bigint PRIMARY KEY, at timestamptz DEFAULT clock_timestamp());
    CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL);
    INSERT INTO items (name) SELECT 'item ' || g FROM generate_series(1, 20000) g;
    CREATE TABLE nopk (k int, v text);
    INSERT INTO nopk SELECT g, 'v' || g FROM generate_series(1, 1000) g;";

/// A writer committing one row at a time through the env file's DSN, reconnecting with
/// the file's new DSN after the cutover; returns what it saw committed and the longest
/// gap between two commits.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(Vec<u64>, Duration)>,
}

impl Writer {
    fn start(dir: &Path) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let env = dir.join(".pgconverge/test.env");
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut committed, mut longest, mut last, started) =
                (Vec::new(), Duration::ZERO, Instant::now(), Instant::now());
            while !flag.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                let url = env_file(&env)["DATABASE_URL"].clone();
                let n = committed.len() as u64 + 1;
                // Updates and deletes on the table without a primary key travel too.
                let sql = format!(
                    "INSERT INTO w (n) VALUES ({n}); UPDATE nopk SET v = 'w{n}' WHERE k = {k}; DELETE FROM nopk WHERE k = {d}",
                    k = n % 1000,
                    d = 1000 - (n % 500)
                );
                if psql(&url, &format!("BEGIN; {sql}; COMMIT")).is_ok() {
                    committed.push(n);
                    longest = longest.max(last.elapsed());
                    last = Instant::now();
                } else {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            (committed, longest)
        });
        std::thread::sleep(Duration::from_millis(300));
        Writer { stop, handle }
    }

    fn finish(self) -> (Vec<u64>, Duration) {
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("writer")
    }
}

fn assert_nothing_lost(dir: &Path, committed: &[u64]) {
    let url = url(dir);
    assert_eq!(psql(&url, "SELECT current_setting('server_version_num')::int / 10000").expect("version"), "17");
    let present: Vec<u64> =
        psql(&url, "SELECT n FROM w ORDER BY n").expect("rows").lines().map(|l| l.parse().expect("number")).collect();
    let missing: Vec<&u64> = committed.iter().filter(|n| present.binary_search(n).is_err()).collect();
    assert!(committed.len() > 10, "the writer committed only {} rows", committed.len());
    assert!(missing.is_empty(), "{} committed writes lost: {:?}", missing.len(), &missing[..missing.len().min(10)]);
    // The table without a primary key took every update and delete.
    let last = *committed.last().expect("a write");
    let v = psql(&url, &format!("SELECT v FROM nopk WHERE k = {}", last % 1000)).expect("nopk");
    assert!(v.is_empty() || v == format!("w{last}"), "nopk row {}: {v}", last % 1000);
    assert_eq!(psql(&url, "SELECT count(*) FROM items").expect("items"), "20000");
}

#[test]
fn logical_upgrade_under_writes_loses_nothing_and_keeps_sequences() {
    let (dir, _servers) = loaded("logical_runbook", SCHEMA);
    let seq_before = psql(&url(&dir), "SELECT last_value FROM items_id_seq").expect("seq");
    let plan = pgconverge(&["plan"], &dir);
    assert!(plan.stdout.contains("3. replicate +1 from") && plan.stdout.contains("5. catch up +1"), "{}", plan.stdout);
    let writer = Writer::start(&dir);
    let run = pgconverge_with(&["apply", "--auto-approve"], &dir, &[("RUST_LOG", "pgconverge=debug")]);
    let (committed, longest) = writer.finish();
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("replicate +1 from") && run.stderr.contains("catch up +1"), "{}", run.stderr);
    // The rows were compared before the fence, where the stream starts: inside the
    // outage only the catalogs are fingerprinted.
    assert!(run.stderr.contains("rows compared where the stream starts"), "{}", run.stderr);
    let taken: Vec<&str> = run.stderr.lines().filter(|l| l.contains("fingerprint taken")).collect();
    assert!(taken.len() >= 2 && taken.iter().all(|l| l.contains("part=Catalog")), "{taken:#?}");
    assert!(run.stdout.contains("Writes were blocked for"), "{}", run.stdout);
    assert_nothing_lost(&dir, &committed);
    let next = psql(&url(&dir), "SELECT nextval('items_id_seq')").expect("nextval");
    assert_eq!(next.parse::<i64>().expect("n"), seq_before.parse::<i64>().expect("n") + 1, "sequence carried over");
    let slots = psql(&url(&dir), "SELECT count(*) FROM pg_replication_slots").expect("slots");
    assert_eq!(slots, "0", "no slot left on the new server");
    let subs = psql(&url(&dir), "SELECT count(*) FROM pg_stat_subscription").expect("subscriptions");
    assert_eq!(subs, "0", "no subscription left on the new server");
    eprintln!("{} writes, longest gap {:.3} s", committed.len(), longest.as_secs_f64());
    let again = pgconverge(&["plan", "--detailed-exitcode"], &dir);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
}

#[test]
fn a_schema_change_during_replication_stops_the_upgrade_with_nothing_lost() {
    let (dir, _servers) = loaded("logical_ddl", SCHEMA);
    // Stop right after the copy started streaming, then change the schema on the source.
    let first = pgconverge_with(&["apply", "--auto-approve"], &dir, &[("PGCONVERGE_FAILPOINTS", "after:3=error")]);
    assert_eq!(first.code, 1, "{}{}", first.stdout, first.stderr);
    psql(&url(&dir), "ALTER TABLE items ADD COLUMN note text; INSERT INTO items (name, note) VALUES ('x', 'after')")
        .expect("ddl");
    let second = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(second.code, 1, "{}{}", second.stdout, second.stderr);
    assert!(second.stderr.contains("the schema changed during replication"), "{}", second.stderr);
    assert!(second.stderr.contains("nothing lost"), "{}", second.stderr);
    let third = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(third.code, 0, "the next apply copies afresh: {}{}", third.stdout, third.stderr);
    let note = psql(&url(&dir), "SELECT note FROM items WHERE name = 'x'").expect("row");
    assert_eq!(note, "after");
}

#[test]
fn crashes_inside_replicate_and_catch_up_are_finished_and_leave_no_slot() {
    for failpoint in [
        "replicate:slot",
        "replicate:copied",
        "replicate:subscribed",
        "after:3",
        "catch_up:caught_up",
        "catch_up:recorded",
        "after:5",
    ] {
        let (dir, _servers) = loaded(&format!("logical_crash_{}", failpoint.replace(':', "_")), SCHEMA);
        let writer = Writer::start(&dir);
        let spec = format!("{failpoint}=crash");
        let crashed = pgconverge_with(&["apply", "--auto-approve"], &dir, &[("PGCONVERGE_FAILPOINTS", &spec)]);
        assert_ne!(crashed.code, 0, "{failpoint}: {}{}", crashed.stdout, crashed.stderr);
        let again = pgconverge(&["apply", "--auto-approve"], &dir);
        let (committed, _) = writer.finish();
        assert_eq!(again.code, 0, "{failpoint}: {}{}", again.stdout, again.stderr);
        if failpoint == "catch_up:recorded" {
            assert!(again.stderr.contains("dropping a replication slot left behind"), "{}", again.stderr);
        }
        assert_nothing_lost(&dir, &committed);
        let servers = std::fs::read_dir(dir.join(".pgconverge/servers")).expect("servers").count();
        assert_eq!(servers, 1, "{failpoint}: one server left");
    }
}

#[test]
fn large_objects_and_unlogged_tables_are_refused_and_dump_restore_then_finishes_the_job() {
    let (dir, _servers) = loaded(
        "logical_large_objects",
        "CREATE TABLE t (id int PRIMARY KEY); SELECT lo_from_bytea(0, 'x'); CREATE UNLOGGED TABLE \"Scratch\" (n int)",
    );
    let refused = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(refused.code, 1, "{}{}", refused.stdout, refused.stderr);
    assert!(refused.stderr.contains("large objects") && refused.stderr.contains("dump_restore"), "{}", refused.stderr);
    psql(&url(&dir), "SELECT lo_unlink(oid) FROM pg_largeobject_metadata").expect("unlink");
    let refused = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(refused.code, 1, "{}{}", refused.stdout, refused.stderr);
    assert!(refused.stderr.contains(r#"unlogged tables (public."Scratch")"#), "{}", refused.stderr);
    psql(&url(&dir), "SELECT lo_from_bytea(0, 'x')").expect("a large object again");
    let text = std::fs::read_to_string(dir.join("pgconverge.yaml")).expect("config");
    std::fs::write(dir.join("pgconverge.yaml"), text.replace("strategy: logical", "strategy: dump_restore"))
        .expect("config");
    let finished = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(finished.code, 0, "{}{}", finished.stdout, finished.stderr);
    let lo = psql(&url(&dir), "SELECT count(*) FROM pg_largeobject_metadata").expect("lo");
    assert_eq!(lo, "1");
}

/// A table whose initial copy takes seconds: long enough that an apply stopped inside it
/// finds it still running when it is run again.
const BIG: &str = "
    CREATE TABLE big (id bigint PRIMARY KEY, pad text NOT NULL);
    INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 1500000) g;
    CREATE TABLE small (id int PRIMARY KEY);
    INSERT INTO small SELECT generate_series(1, 10);";

/// PostgreSQL 15 holding `BIG`, its config asking for 17 with `verify: none`.
fn big_unverified(name: &str) -> (common::Scratch, Servers) {
    let dir = scratch(name);
    let servers = Servers(dir.join(".pgconverge"));
    config_verifying(&dir, 15, "none");
    assert_eq!(pgconverge(&["apply", "--auto-approve"], &dir).code, 0);
    psql(&url(&dir), BIG).expect("load");
    config_verifying(&dir, 17, "none");
    (dir, servers)
}

/// With `verify: none`, nothing but the copy's own bookkeeping stands between an
/// unfinished initial copy and the deletion of the old server.
fn assert_big_copied(dir: &Path, small: u32) {
    let url = url(dir);
    assert_eq!(psql(&url, "SELECT current_setting('server_version_num')::int / 10000").expect("version"), "17");
    assert_eq!(psql(&url, "SELECT count(*) FROM big").expect("big"), "1500000", "rows lost from the big table");
    assert_eq!(psql(&url, "SELECT count(*) FROM small").expect("small"), small.to_string());
}

#[test]
fn an_apply_crashed_between_the_copy_and_its_subscription_copies_afresh() {
    let (dir, _servers) = big_unverified("logical_crash_initial_copy");
    let crashed =
        pgconverge_with(&["apply", "--auto-approve"], &dir, &[("PGCONVERGE_FAILPOINTS", "replicate:copied=crash")]);
    assert_eq!(crashed.code, 137, "{}{}", crashed.stdout, crashed.stderr);
    // The copy holds every row, but nothing streams the writes that follow into it: the
    // next apply must not take it for a copy that does.
    psql(&url(&dir), "INSERT INTO small VALUES (11)").expect("a write after the crash");
    let plan = pgconverge(&["plan"], &dir);
    assert!(plan.stdout.contains("replicate"), "the interrupted copy is made again: {}", plan.stdout);
    let again = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
    assert!(again.stderr.contains("dropping a replication slot left behind"), "{}", again.stderr);
    assert_big_copied(&dir, 11);
}

#[test]
fn sigterm_inside_the_initial_copy_stops_cleanly_and_the_next_apply_copies_afresh() {
    let (dir, _servers) = big_unverified("logical_sigterm_initial_copy");
    let (code, stderr, sent) = common::apply_watching(&dir, "replicate +1", |pid| {
        std::thread::sleep(Duration::from_millis(1500));
        common::terminate(pid);
    });
    assert!(sent, "apply never reached replicate: {stderr}");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("interrupted by a signal"), "{stderr}");
    assert!(stderr.contains("nothing is fenced"), "{stderr}");
    assert!(!dir.join(".pgconverge/lock").exists(), "the lock is released");
    let again = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
    assert_big_copied(&dir, 10);
}
