//! `upgrade.strategy: pg_upgrade` on the local provider, with real servers: the data
//! directory upgraded in place of a dump and restore, the old server startable as it was
//! until it is deleted, and pg_upgrade's refusals said before anything is fenced.

mod common;

use std::path::Path;

use common::{ensure_postgres, env_file, pgconverge, psql, scratch, Servers};

fn config(dir: &Path, upgrade: &str, major: u32) {
    ensure_postgres();
    let text = format!(
        "version: 1\nupgrade: {{strategy: pg_upgrade, verify: checksums, {upgrade}}}\nenvironments:\n  test:\n    postgres:\n      DEFAULT: {major}\n"
    );
    std::fs::write(dir.join("pgconverge.yaml"), text).expect("config");
}

fn apply(dir: &Path) -> common::Run {
    let run = pgconverge(&["apply", "--auto-approve"], dir);
    assert_eq!(run.code, 0, "apply failed:\n{}\n{}", run.stdout, run.stderr);
    run
}

fn dsn(dir: &Path) -> String {
    env_file(&dir.join(".pgconverge/test.env"))["DATABASE_URL"].clone()
}

const SCHEMA: &str = "
    CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL);
    CREATE INDEX items_name ON items (name);
    INSERT INTO items (name) SELECT 'item ' || g FROM generate_series(1, 5000) g;
    CREATE FUNCTION item_count() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM items';
    SELECT lo_from_bytea(0, 'a large object');";

const CHECK: &str = "SELECT current_setting('server_version_num')::int / 10000, (SELECT count(*) FROM items), \
     item_count(), (SELECT count(*) FROM pg_largeobject_metadata), \
     (SELECT count(*) FROM pg_indexes WHERE indexname = 'items_name'), nextval('items_id_seq')";

/// The major of the server at `url`.
fn major(url: &str) -> String {
    psql(url, "SELECT current_setting('server_version_num')::int / 10000").expect("major")
}

#[test]
fn pg_upgrade_carries_everything_over_and_the_old_server_stays_as_it_was() {
    let dir = scratch("upgrade_in_place");
    let root = dir.join(".pgconverge");
    let _servers = Servers(root.clone());
    config(&dir, "keep_old: true", 15);
    apply(&dir);
    let old = dsn(&dir);
    psql(&old, SCHEMA).expect("load");
    assert_eq!(psql(&old, CHECK).expect("check"), "15|5000|5000|1|1|5001");

    config(&dir, "keep_old: true", 17);
    let plan = pgconverge(&["plan"], &dir);
    assert!(plan.stdout.contains("upgrade +1 from"), "{}", plan.stdout);
    assert!(!plan.stdout.contains("backup") && !plan.stdout.contains("restore"), "{}", plan.stdout);
    let run = apply(&dir);
    assert!(run.stderr.contains("upgraded"), "{}", run.stderr);
    assert!(run.stdout.contains("Writes were blocked for"), "{}", run.stdout);

    let new = dsn(&dir);
    assert_ne!(new, old, "the env file names the new server");
    assert_eq!(psql(&new, CHECK).expect("check"), "17|5000|5000|1|1|5002", "sequence, index, function, large object");
    let stats = psql(&new, "SELECT count(*) FROM pg_stats WHERE tablename = 'items'").expect("stats");
    assert_ne!(stats, "0", "the upgraded server has planner statistics");
    // The application's role logs in to the copy: the fence did not come along.
    psql(&new, "INSERT INTO items (name) VALUES ('after')").expect("the application writes to the new server");

    // keep_old: the original is kept, detached, and still the server it was: PostgreSQL
    // 15 with its data (the transfer consumed nothing), fenced from the application.
    let kept = pgconverge(&["show", "--format", "json"], &dir);
    let live: serde_json::Value = serde_json::from_str(&kept.stdout).expect("show json");
    let services = live["environments"]["test"]["services"].as_array().expect("services").clone();
    let old_one = services.iter().find(|s| s["prefix"] == "OLD").expect("the kept original");
    assert_eq!(old_one["version"], 15, "{old_one}");
    assert_eq!(old_one["status"], "detached", "{old_one}");
    assert!(psql(&old, "SELECT 1").is_err(), "the application cannot log in to the kept original");
    let id = old_one["id"].as_str().expect("id");
    let data = root.join("servers").join(id).join("data");
    assert_eq!(std::fs::read_to_string(data.join("PG_VERSION")).expect("PG_VERSION").trim(), "15");
    assert!(data.join("global/pg_control").exists(), "the original's control file is in place: it can start");
    assert_eq!(major(&new), "17");
    let plan = pgconverge(&["plan", "--detailed-exitcode"], &dir);
    assert_eq!(plan.code, 0, "converged: {}", plan.stdout);
}

/// `transfer: link`: the new server takes the old one's files (hard links: no copy), the
/// plan says there is no way back, verify compares with the fingerprint taken before the
/// old server was consumed, and the consumed server, never started again, is deleted.
#[test]
fn link_gives_the_old_servers_files_to_the_new_one() {
    let dir = scratch("upgrade_link");
    let root = dir.join(".pgconverge");
    let _servers = Servers(root.clone());
    config(&dir, "transfer: link", 15);
    apply(&dir);
    let old = dsn(&dir);
    psql(&old, SCHEMA).expect("load");
    let table = psql(&old, "SELECT pg_relation_filepath('items')").expect("file");
    let servers = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(root.join("servers")).expect("servers").flatten().map(|e| e.path()).collect()
    };
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).expect("stat"));
    let before = inode(&servers()[0].join("data").join(&table));

    config(&dir, "transfer: link", 17);
    let plan = pgconverge(&["plan"], &dir);
    assert!(plan.stdout.contains("[no way back]"), "{}", plan.stdout);
    assert!(plan.stdout.contains("no way back to the old server"), "{}", plan.stdout);
    let markdown = pgconverge(&["plan", "--format", "markdown"], &dir);
    assert!(markdown.stdout.contains("`no-way-back`"), "{}", markdown.stdout);
    let run = apply(&dir);
    assert!(run.stderr.contains("verify +1 against"), "{}", run.stderr);

    let new = dsn(&dir);
    assert_eq!(psql(&new, CHECK).expect("check"), "17|5000|5000|1|1|5001", "sequence, index, function, large object");
    psql(&new, "INSERT INTO items (name) VALUES ('after')").expect("the application writes to the new server");
    // The table's file is the one the old server wrote, linked, not copied; the old
    // server's directory is gone, the file is the new server's alone.
    let dirs = servers();
    assert_eq!(dirs.len(), 1, "the consumed server was deleted");
    let moved = psql(&new, "SELECT pg_relation_filepath('items')").expect("file");
    let file = dirs[0].join("data").join(&moved);
    assert_eq!(inode(&file), before, "{} is {table} of the old server", file.display());
    let plan = pgconverge(&["plan", "--detailed-exitcode"], &dir);
    assert_eq!(plan.code, 0, "converged: {}", plan.stdout);
}

/// Into PostgreSQL 18, pg_upgrade carries the planner's statistics: the upgraded table
/// has them without an ANALYZE (none ran on it), where into 17 they are made afresh.
#[test]
fn into_18_the_statistics_come_along() {
    let dir = scratch("upgrade_stats");
    let _servers = Servers(dir.join(".pgconverge"));
    config(&dir, "transfer: link", 16);
    apply(&dir);
    psql(&dsn(&dir), &format!("{SCHEMA}; ANALYZE items")).expect("load");
    config(&dir, "transfer: link", 18);
    apply(&dir);
    let url = dsn(&dir);
    assert_eq!(major(&url), "18");
    let stats = psql(&url, "SELECT count(*) FROM pg_stats WHERE tablename = 'items'").expect("stats");
    assert_ne!(stats, "0", "the statistics came along");
    let analyzed = "SELECT analyze_count FROM pg_stat_user_tables WHERE relname = 'items'";
    assert_eq!(psql(&url, analyzed).expect("analyze count"), "0", "and were not made again");
    assert_eq!(psql(&url, CHECK).expect("check"), "18|5000|5000|1|1|5001");
}

/// pg_upgrade refuses reg* columns (their values are OIDs that the new cluster does not
/// keep): `apply` says so before it fences anything, and the application keeps writing.
#[test]
fn what_pg_upgrade_refuses_is_refused_before_the_fence() {
    let dir = scratch("upgrade_refused");
    let _servers = Servers(dir.join(".pgconverge"));
    config(&dir, "transfer: copy", 15);
    apply(&dir);
    let url = dsn(&dir);
    psql(&url, "CREATE TABLE handlers (name text, handler regproc); INSERT INTO handlers VALUES ('now', 'now')")
        .expect("load");

    config(&dir, "transfer: copy", 16);
    let run = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("pg_upgrade refuses to upgrade"), "{}", run.stderr);
    assert!(run.stderr.contains("reg*"), "pg_upgrade's own reason is shown: {}", run.stderr);
    assert!(!run.stderr.contains("[test 1/"), "no action ran: {}", run.stderr);
    psql(&url, "INSERT INTO handlers VALUES ('again', 'now')").expect("the application still writes");
    assert_eq!(major(&url), "15");

    // Without the reg* column the same config upgrades, copying every file.
    psql(&url, "ALTER TABLE handlers ALTER COLUMN handler TYPE text").expect("fix");
    apply(&dir);
    let url = dsn(&dir);
    assert_eq!(psql(&url, "SELECT count(*) FROM handlers").expect("rows"), "2");
    assert_eq!(major(&url), "16");
}

/// An extension the old server has and the new major's installation lacks (here a
/// SQL-only one, which pg_upgrade's own check would not find before it failed halfway,
/// inside the outage) is refused before anything is fenced.
#[test]
fn an_extension_the_new_major_lacks_is_refused_before_the_fence() {
    use pgconverge::provider::local::binaries;
    ensure_postgres();
    let dir = scratch("upgrade_extension");
    let _servers = Servers(dir.join(".pgconverge"));
    // A PostgreSQL 16 installation of this test's own, with one extension more.
    let installed = binaries::find(16, &[]).expect("16").dir;
    let own = dir.join("pg16");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(installed.parent().expect("installation"))
        .arg(&own)
        .status()
        .expect("cp");
    assert!(copied.success());
    let extensions = own.join("share/extension");
    assert!(extensions.is_dir(), "a relocatable installation keeps its extensions in share/extension");
    std::fs::write(
        extensions.join("pgc_only16.control"),
        "default_version = '1.0'\nrelocatable = true\ntrusted = true\n",
    )
    .expect("control");
    std::fs::write(
        extensions.join("pgc_only16--1.0.sql"),
        "CREATE FUNCTION pgc_only16() RETURNS int LANGUAGE sql AS 'SELECT 16';\n",
    )
    .expect("script");
    let write = |major: u32| {
        let text = format!(
            "version: 1\nprovider:\n  local:\n    bin_dirs: [{}]\nupgrade: {{strategy: pg_upgrade}}\nenvironments:\n  test:\n    postgres:\n      DEFAULT: {major}\n",
            own.join("bin").display()
        );
        std::fs::write(dir.join("pgconverge.yaml"), text).expect("config");
    };
    write(16);
    apply(&dir);
    let url = dsn(&dir);
    psql(&url, "CREATE EXTENSION pgc_only16").expect("the extension, as the database owner");
    write(17);
    let run = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("extension pgc_only16 (database app) is not installed for PostgreSQL 17"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("[test 1/"), "no action ran: {}", run.stderr);
    assert_eq!(psql(&url, "SELECT pgc_only16()").expect("the application still works"), "16");
}

/// What the upgrade matches the new cluster to: initdb's settings, read back from a
/// running server as they were given.
#[test]
fn initdb_settings_are_read_back_as_given() {
    use pgconverge::provider::local::{binaries, server};
    ensure_postgres();
    let base = scratch("upgrade_settings");
    let _servers = Servers(base.to_path_buf());
    let odd = server::Settings {
        encoding: "SQL_ASCII".into(),
        collate: "C".into(),
        ctype: "C".into(),
        checksums: false,
        wal_segment_mb: 32,
    };
    for (n, settings) in [server::Settings::default(), odd].into_iter().enumerate() {
        let dir = base.join("servers").join(n.to_string());
        let mut s = server::Server {
            bin: binaries::find(17, &[]).expect("17"),
            data_dir: dir.join("data"),
            socket_dir: dir.join("run"),
            log_file: dir.join("log/server.log"),
            port: 0,
            run_as: server::RunAs::for_user("postgres").expect("run_as"),
        };
        s.init_like(&settings).expect("initdb");
        common::start_on_a_free_port(&mut s);
        let read = s.settings();
        s.stop().expect("stop");
        assert_eq!(read.expect("settings"), settings);
    }
}

/// `plan` and `show` change nothing, even where apply repairs: beside a running apply,
/// a link that apply has just transferred and not yet committed looks exactly like one a
/// crash left, and undoing it under apply would start two servers on the same files.
/// Here a crash leaves it: plan says the next apply undoes it, leaves the old server's
/// control file renamed away, and the next apply undoes it and finishes.
#[test]
fn plan_never_undoes_a_link_that_only_apply_may_settle() {
    let dir = scratch("upgrade_link_plan");
    let root = dir.join(".pgconverge");
    let _servers = Servers(root.clone());
    config(&dir, "transfer: link", 15);
    apply(&dir);
    psql(&dsn(&dir), SCHEMA).expect("load");
    config(&dir, "transfer: link", 17);
    let crashed = common::pgconverge_with(
        &["apply", "--auto-approve"],
        &dir,
        &[("PGCONVERGE_FAILPOINTS", "upgrade:transferred=crash")],
    );
    assert_eq!(crashed.code, 137, "{}{}", crashed.stdout, crashed.stderr);
    let renamed: Vec<std::path::PathBuf> = std::fs::read_dir(root.join("servers"))
        .expect("servers")
        .flatten()
        .map(|e| e.path().join("data/global/pg_control.old"))
        .filter(|p| p.exists())
        .collect();
    assert_eq!(renamed.len(), 1, "pg_upgrade renamed the old server's control file away");

    for args in [&["plan"][..], &["show"], &["plan", "--format", "json"]] {
        let run = pgconverge(args, &dir);
        assert!(run.code == 0 || run.code == 2, "{args:?}: {}{}", run.stdout, run.stderr);
        assert!(run.stderr.contains("the next apply undoes it first"), "{args:?}: {}", run.stderr);
        assert!(renamed[0].exists(), "{args:?} gave the old server its control file back");
    }
    let again = apply(&dir);
    assert!(again.stderr.contains("undoing a pg_upgrade --link"), "{}", again.stderr);
    assert_eq!(psql(&dsn(&dir), CHECK).expect("check"), "17|5000|5000|1|1|5001");
}
