//! The local provider end to end, on real PostgreSQL 15 and 17 servers that each test
//! starts under its own root and stops when done.

mod common;

use std::path::Path;

use common::{ensure_postgres, env_file, pgconverge, pgconverge_with, psql, scratch, Servers};
use pgconverge::provider::local::{binaries, server};

fn config(dir: &Path, body: &str) {
    ensure_postgres();
    std::fs::write(dir.join("pgconverge.yaml"), format!("version: 1\nenvironments:\n{body}")).expect("config");
}

fn apply(dir: &Path) -> common::Run {
    let run = pgconverge(&["apply", "--auto-approve"], dir);
    assert_eq!(run.code, 0, "apply failed:\n{}\n{}", run.stdout, run.stderr);
    run
}

/// `rows|major` of table `t` on the server at `url`.
fn rows_and_major(url: &str) -> String {
    psql(url, "SELECT count(*), current_setting('server_version_num')::int / 10000 FROM t").expect("check")
}

fn dsn(dir: &Path, var: &str) -> String {
    env_file(&dir.join(".pgconverge/test.env")).get(var).cloned().unwrap_or_else(|| panic!("{var} not in the env file"))
}

/// A bare server of each major: initdb, start, SQL, stop.
#[test]
fn servers_of_both_majors_start_answer_and_stop() {
    ensure_postgres();
    let run_as = server::RunAs::for_user("postgres").expect("run_as");
    let base = scratch("local_servers");
    for major in [15, 17] {
        let dir = base.join(major.to_string());
        let mut server = server::Server {
            bin: binaries::find(major, &[]).expect("binaries"),
            data_dir: dir.join("data"),
            socket_dir: dir.join("run"),
            log_file: dir.join("log/server.log"),
            port: server::free_port().expect("port"),
            run_as,
        };
        server.init().expect("initdb");
        common::start_on_a_free_port(&mut server);
        assert!(server.is_running());
        let v = server.sql("postgres", "SHOW server_version_num").expect("sql");
        assert_eq!(v.parse::<u32>().expect("number") / 10000, major);
        assert_eq!(server.sql("postgres", "SHOW data_checksums").expect("sql"), "on");
        server.stop().expect("stop");
        assert!(!server.is_running());
    }
}

const SCHEMA: &str = "
    CREATE EXTENSION IF NOT EXISTS pgcrypto;
    CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL, secret bytea, created timestamptz DEFAULT now());
    CREATE INDEX items_name ON items (name);
    INSERT INTO items (name, secret) SELECT 'item ' || g, digest(g::text, 'sha256') FROM generate_series(1, 5000) g;
    CREATE VIEW recent AS SELECT id, name FROM items ORDER BY id DESC LIMIT 10;
    CREATE FUNCTION item_count() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM items';
    SELECT lo_from_bytea(0, 'a large object');";

const CHECK: &str =
    "SELECT current_setting('server_version_num')::int / 10000, (SELECT count(*) FROM items), item_count(), \
     (SELECT count(*) FROM recent), (SELECT count(*) FROM pg_largeobject_metadata), \
     (SELECT count(*) FROM pg_indexes WHERE indexname = 'items_name'), \
     (SELECT bool_and(secret = digest(id::text, 'sha256')) FROM items), nextval('items_id_seq')";

#[test]
fn runbook_upgrade_carries_everything_over() {
    let dir = scratch("local_runbook");
    let _servers = Servers(dir.join(".pgconverge"));
    config(&dir, "  test:\n    upgrade: {verify: checksums}\n    postgres:\n      DEFAULT: 15\n");
    apply(&dir);
    let old = dsn(&dir, "DEFAULT_DATABASE_DSN");
    assert_eq!(dsn(&dir, "DATABASE_URL"), old);
    psql(&old, SCHEMA).expect("load data");
    let before = psql(&old, CHECK).expect("check");
    assert!(before.starts_with("15|5000|5000|10|1|1|t|5001"), "{before}");

    config(&dir, "  test:\n    upgrade: {verify: checksums}\n    postgres:\n      DEFAULT: 17\n");
    let plan = pgconverge(&["plan", "--detailed-exitcode"], &dir);
    assert_eq!(plan.code, 2, "{}", plan.stderr);
    let run = apply(&dir);
    assert!(run.stderr.contains("[test 11/11] delete"), "{}", run.stderr);
    assert!(run.stderr.contains("dumped, streamed into +1"), "the dump is streamed into the restore: {}", run.stderr);
    assert!(run.stdout.contains("Writes were blocked for"), "{}", run.stdout);

    let new = dsn(&dir, "DEFAULT_DATABASE_DSN");
    assert_ne!(new, old, "the env file names the new server");
    let after = psql(&new, CHECK).expect("check");
    assert!(after.starts_with("17|5000|5000|10|1|1|t|5002"), "{after}");
    let owner = psql(&new, "SELECT tableowner FROM pg_tables WHERE tablename = 'items'").expect("owner");
    assert_eq!(owner, "app", "ownership is preserved");
    let settings = psql(&new, "SELECT current_setting('max_wal_size') || ' ' || current_setting('checkpoint_timeout')");
    assert_eq!(settings.expect("settings"), "1GB 5min", "the load settings are gone once the copy is in use");

    // The backup streamed into the copy is kept, whole: pg_restore reads every item of it.
    let backups: Vec<_> = std::fs::read_dir(dir.join(".pgconverge/backups"))
        .expect("backups")
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).expect("backup dir").flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "dump"))
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    let list = std::process::Command::new(binaries::find(17, &[]).expect("17").program("pg_restore"))
        .arg("--list")
        .arg(&backups[0])
        .output()
        .expect("pg_restore --list");
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains("TABLE DATA public items"), "{list}");
    assert!(psql(&old, "SELECT 1").is_err(), "the old server is gone");
    let servers: Vec<_> = std::fs::read_dir(dir.join(".pgconverge/servers")).expect("servers").collect();
    assert_eq!(servers.len(), 1, "only the new server's files remain");

    let replan = pgconverge(&["plan", "--detailed-exitcode"], &dir);
    assert_eq!(replan.code, 0, "{}{}", replan.stdout, replan.stderr);
    let again = apply(&dir);
    assert!(again.stdout.contains("No changes"), "{}", again.stdout);

    let secret: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(".pgconverge/secrets/test.json")).expect("secret"))
            .expect("json");
    let password = secret["password"].as_str().expect("password");
    assert!(old.contains(password), "the DSN carries the password");
    for (what, r) in [("plan", &plan), ("apply", &run), ("replan", &replan), ("apply again", &again)] {
        assert!(!r.stdout.contains(password) && !r.stderr.contains(password), "{what} printed the password");
    }
    for server in std::fs::read_dir(dir.join(".pgconverge/servers")).expect("servers").flatten() {
        let log = std::fs::read_to_string(server.path().join("log/server.log")).unwrap_or_default();
        assert!(!log.contains(password), "a server log holds the password");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join(".pgconverge/test.env")).expect("env file").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn fresh_environment_with_two_prefixes_and_an_undeclared_service() {
    let dir = scratch("local_two_prefixes");
    let _servers = Servers(dir.join(".pgconverge"));
    config(&dir, "  test:\n    postgres:\n      DEFAULT: 15\n      ANALYTICS: 17\n      SCRATCH: 15\n");
    apply(&dir);
    let vars = env_file(&dir.join(".pgconverge/test.env"));
    assert_eq!(vars.len(), 4, "{vars:?}");
    for (var, major) in
        [("DEFAULT_DATABASE_DSN", "15"), ("ANALYTICS_DATABASE_DSN", "17"), ("SCRATCH_DATABASE_DSN", "15")]
    {
        let v = psql(&vars[var], "SELECT current_setting('server_version_num')::int / 10000").expect("connect");
        assert_eq!(v, major, "{var}");
    }
    psql(&vars["SCRATCH_DATABASE_DSN"], "CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)").expect("write");
    // SCRATCH leaves the config: its service is no longer pgconverge's to touch.
    config(&dir, "  test:\n    postgres:\n      DEFAULT: 15\n      ANALYTICS: 17\n");
    let plan = pgconverge(&["plan", "--detailed-exitcode"], &dir);
    assert_eq!(plan.code, 0, "{}", plan.stdout);
    assert!(plan.stdout.contains("never touched"), "{}", plan.stdout);
    assert_eq!(psql(&vars["SCRATCH_DATABASE_DSN"], "SELECT x FROM kept").expect("still there"), "1");
}

/// Runs the first `n` actions of the current plan, as a saved plan.
fn apply_first(dir: &Path, n: usize) {
    let plan = pgconverge(&["plan", "--format", "json"], dir);
    assert_eq!(plan.code, 0, "{}", plan.stderr);
    let mut json: serde_json::Value = serde_json::from_str(&plan.stdout).expect("plan");
    let actions = json["environments"][0]["actions"].as_array_mut().expect("actions");
    actions.truncate(n);
    std::fs::write(dir.join("part.json"), json.to_string()).expect("write");
    let run = pgconverge(&["apply", "--auto-approve", "part.json"], dir);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
}

#[test]
fn fence_blocks_writes_and_verify_catches_a_bad_copy() {
    let dir = scratch("local_fence_verify");
    let _servers = Servers(dir.join(".pgconverge"));
    config(&dir, "  test:\n    postgres:\n      DEFAULT: 15\n");
    apply(&dir);
    let old = dsn(&dir, "DEFAULT_DATABASE_DSN");
    psql(&old, "CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 100)").expect("load");
    config(&dir, "  test:\n    postgres:\n      DEFAULT: 17\n");

    apply_first(&dir, 3); // add, provision, fence
    let refused = psql(&old, "INSERT INTO t VALUES (101)").expect_err("writes are fenced");
    assert!(refused.contains("not permitted to log in"), "{refused}");

    apply_first(&dir, 2); // backup, restore
                          // A row goes missing from the copy behind pgconverge's back.
    let state = std::fs::read_dir(dir.join(".pgconverge/state/test")).expect("state");
    let copy: serde_json::Value = state
        .flatten()
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(e.path()).expect("read")).expect("json")
        })
        .find(|m| m["prefix"] == "NEW")
        .expect("the copy");
    let port = copy["port"].as_u64().expect("port");
    let copy_dsn = old.rsplit_once('@').map(|(creds, _)| format!("{creds}@127.0.0.1:{port}/app")).expect("dsn");
    psql(&copy_dsn, "DELETE FROM t WHERE x = 42").expect("tamper");

    let run = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(run.stderr.contains("rows:public.t: 100 in the source, 99 in the copy"), "{}", run.stderr);
    assert_eq!(dsn(&dir, "DEFAULT_DATABASE_DSN"), old, "no cutover after a failed verify");
    assert!(run.stderr.contains("run `pgconverge apply` again"), "{}", run.stderr);

    // The bad copy is marked incomplete, so applying again copies afresh and finishes.
    apply(&dir);
    let new = dsn(&dir, "DEFAULT_DATABASE_DSN");
    assert_eq!(rows_and_major(&new), "100|17");
}

/// Environments are applied in `rollout` order, and a failure in one leaves the ones
/// after it untouched; the next apply finishes both.
#[test]
fn rollout_stops_at_the_first_failing_environment() {
    ensure_postgres();
    let dir = scratch("local_rollout");
    let _servers = Servers(dir.join(".pgconverge"));
    let body = |v: u32| {
        format!("rollout: [test, live]\nenvironments:\n  live:\n    postgres: {{DEFAULT: {v}}}\n  test:\n    postgres: {{DEFAULT: {v}}}\n")
    };
    std::fs::write(dir.join("pgconverge.yaml"), format!("version: 1\n{}", body(15))).expect("config");
    apply(&dir);
    let file_of = |env: &str| dir.join(format!(".pgconverge/{env}.env"));
    let live_before = std::fs::read_to_string(file_of("live")).expect("env file");

    std::fs::write(dir.join("pgconverge.yaml"), format!("version: 1\n{}", body(17))).expect("config");
    let plan = pgconverge(&["plan"], &dir);
    assert!(plan.stdout.contains("Warning: live would run DEFAULT on PostgreSQL 17"), "{}", plan.stdout);
    let run = pgconverge_with(&["apply", "--auto-approve"], &dir, &[("PGCONVERGE_FAILPOINTS", "before:4=error")]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("environment test: action 4"), "test goes first: {}", run.stderr);
    assert!(!run.stderr.contains("[live "), "live was touched: {}", run.stderr);
    assert_eq!(std::fs::read_to_string(file_of("live")).expect("env file"), live_before);

    let run = apply(&dir);
    assert!(run.stderr.contains("[live 11/11]"), "{}", run.stderr);
    for env in ["test", "live"] {
        let url = env_file(&file_of(env)).get("DATABASE_URL").cloned().expect("DATABASE_URL");
        let version = psql(&url, "SELECT current_setting('server_version_num')::int / 10000").expect("version");
        assert_eq!(version, "17", "{env}");
    }
}

/// `local_dev`: apply moves the compose file's image to the followed environment's major,
/// touching nothing else, and says what to run next.
#[test]
fn apply_moves_the_compose_image_and_says_what_to_run() {
    let dir = scratch("local_compose");
    let _servers = Servers(dir.join(".pgconverge"));
    let compose = "# dev stack\nservices:\n  db:\n    image: \"postgres:13-alpine\"\n    volumes: [pg:/var/lib/postgresql/data]\nvolumes:\n  pg: {}\n";
    let path = dir.join("docker-compose.yml");
    std::fs::write(&path, compose).expect("compose");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o640)).expect("mode");
    config(
        &dir,
        "  test:\n    postgres:\n      DEFAULT: 15\nlocal_dev:\n  compose_file: docker-compose.yml\n  service: db\n  follows: test\n",
    );
    let run = apply(&dir);
    assert_eq!(
        std::fs::read_to_string(&path).expect("compose"),
        compose.replace("postgres:13-alpine", "postgres:15-alpine")
    );
    assert!(
        run.stdout.contains("now runs postgres:15-alpine for service db (was postgres:13-alpine)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("down -v") && run.stdout.contains("pull db") && run.stdout.contains("up -d"),
        "{}",
        run.stdout
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).expect("compose").permissions());
    assert_eq!(mode & 0o777, 0o640, "the file keeps its mode");
    let again = apply(&dir);
    assert!(again.stdout.contains("No changes") && !again.stdout.contains("Local development"), "{}", again.stdout);

    // The compose file alone differs: apply still asks first, and without a terminal
    // it refuses and leaves the file alone.
    std::fs::write(&path, compose).expect("compose");
    let asked = pgconverge(&["apply"], &dir);
    assert_eq!(asked.code, 1, "{}{}", asked.stdout, asked.stderr);
    assert!(asked.stdout.contains("+    image: \"postgres:15-alpine\""), "the diff is shown: {}", asked.stdout);
    assert_eq!(std::fs::read_to_string(&path).expect("compose"), compose);
}

/// Two upgrades in a row: the second starts from a copy whose source is gone.
#[test]
fn upgrades_in_a_row_keep_every_row() {
    let dir = scratch("local_twice");
    let _servers = Servers(dir.join(".pgconverge"));
    config(&dir, "  test:\n    postgres:\n      DEFAULT: 15\n");
    apply(&dir);
    psql(&dsn(&dir, "DATABASE_URL"), "CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 1000)")
        .expect("load");
    for major in [16, 17] {
        config(&dir, &format!("  test:\n    postgres:\n      DEFAULT: {major}\n"));
        apply(&dir);
        let url = dsn(&dir, "DATABASE_URL");
        psql(&url, "INSERT INTO t VALUES (0)").expect("the application writes to the new server");
        let check = rows_and_major(&url);
        assert_eq!(check, format!("{}|{major}", 1000 + major - 15), "after the upgrade to {major}");
    }
}

#[test]
fn a_second_apply_is_refused_and_a_dead_lock_is_taken_over() {
    let dir = scratch("local_lock");
    let root = dir.join(".pgconverge");
    let _servers = Servers(root.clone());
    config(&dir, "  test:\n    postgres:\n      DEFAULT: 15\n");
    // A live holder: this test process, through the same lock apply takes.
    let held = pgconverge::apply::Lock::acquire(&root, std::time::Duration::ZERO).expect("lock");
    let run = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains(&format!("another apply is running: pid {}", std::process::id())), "{}", run.stderr);
    assert!(run.stderr.contains("since 20") && run.stderr.contains("--lock-timeout"), "{}", run.stderr);
    assert!(!root.join("state").exists(), "nothing was touched");
    drop(held);
    // What a holder that is gone left behind (the kernel ended its lock with it).
    std::fs::write(root.join("lock"), "pid 4194305\nhost gone\n").expect("lock");
    apply(&dir);
    assert!(!root.join("lock").exists(), "the lock is released");
}

#[test]
fn a_server_that_is_down_is_started_by_apply_never_plan_and_deploy_runs_its_command() {
    let dir = scratch("local_down");
    let _servers = Servers(dir.join(".pgconverge"));
    let body = "  test:\n    postgres:\n      DEFAULT: 15\n";
    std::fs::write(
        dir.join("pgconverge.yaml"),
        format!("version: 1\nprovider:\n  local:\n    deploy:\n      command: 'cp \"$PGCONVERGE_ENV_FILE\" deployed-$PGCONVERGE_ENV.env'\nenvironments:\n{body}"),
    )
    .expect("config");
    ensure_postgres();
    apply(&dir);
    assert_eq!(
        std::fs::read_to_string(dir.join("deployed-test.env")).expect("the deploy command ran"),
        std::fs::read_to_string(dir.join(".pgconverge/test.env")).expect("env file")
    );
    drop(Servers(dir.join(".pgconverge"))); // stops every server
    let url = dsn(&dir, "DATABASE_URL");
    assert!(psql(&url, "SELECT 1").is_err(), "the server is down");
    // plan and show change nothing (an apply may be running beside them): they say
    // what the next apply does; apply starts it.
    let show = pgconverge(&["show"], &dir);
    assert_eq!(show.code, 0, "{}", show.stderr);
    assert!(show.stderr.contains("server is down") && show.stderr.contains("the next apply starts it"));
    let plan = pgconverge(&["plan", "--detailed-exitcode"], &dir);
    assert_eq!(plan.code, 0, "{}{}", plan.stdout, plan.stderr);
    assert!(psql(&url, "SELECT 1").is_err(), "plan and show started nothing");
    let again = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
    assert!(again.stderr.contains("server was down; starting it"), "{}", again.stderr);
    assert_eq!(psql(&url, "SELECT 1").expect("started again"), "1");

    std::fs::write(
        dir.join("pgconverge.yaml"),
        "version: 1\nprovider:\n  local:\n    deploy:\n      command: 'exit 3'\nenvironments:\n  test:\n    postgres:\n      DEFAULT: 17\n",
    )
    .expect("config");
    let run = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("the deploy command failed"), "{}", run.stderr);
    // The deploy did not count: statuses stay, and the next apply deploys again.
    let show = pgconverge(&["show", "--format", "json"], &dir);
    let live: serde_json::Value = serde_json::from_str(&show.stdout).expect("json");
    let statuses: Vec<&str> = live["environments"]["test"]["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| s["status"].as_str().expect("status"))
        .collect();
    assert!(statuses.contains(&"pending_detachment") && statuses.contains(&"provisioned"), "{statuses:?}");
    let plan = pgconverge(&["plan"], &dir);
    assert!(plan.stdout.contains("1. deploy"), "{}", plan.stdout);
}

#[test]
fn a_missing_major_is_a_plan_time_error() {
    let dir = scratch("local_missing_major");
    config(&dir, "  test:\n    postgres:\n      DEFAULT: 9\n");
    let run = pgconverge(&["plan"], &dir);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("no PostgreSQL 9 binaries found") && run.stderr.contains("/usr/lib/postgresql/9/bin"),
        "{}",
        run.stderr
    );
    assert!(!dir.join(".pgconverge/state").exists(), "nothing was touched");
}

/// Saved plans that were tampered with, cut short or made elsewhere are refused before
/// anything is touched.
#[test]
fn tampered_truncated_and_foreign_plans_are_refused() {
    let dir = scratch("local_saved_plans");
    let _servers = Servers(dir.join(".pgconverge"));
    config(&dir, "  test:\n    postgres:\n      DEFAULT: 15\n");
    apply(&dir);
    config(&dir, "  test:\n    postgres:\n      DEFAULT: 17\n");
    let plan = pgconverge(&["plan", "--format", "json", "--out", "plan.json"], &dir);
    assert_eq!(plan.code, 0, "{}", plan.stderr);
    let good: serde_json::Value = serde_json::from_str(&plan.stdout).expect("plan");
    let old = good["environments"][0]["actions"][2]["service"].as_str().expect("the fenced service").to_owned();
    let before = pgconverge(&["show", "--format", "json"], &dir).stdout;

    let mut tampered = good.clone();
    tampered["environments"][0]["actions"][0] = serde_json::json!({"op": "delete", "service": old});
    let mut foreign = good.clone();
    foreign["observed"] = serde_json::json!(format!("sha256:{}", "0".repeat(64)));
    let mut unknown_op = good.clone();
    unknown_op["environments"][0]["actions"][0] = serde_json::json!({"op": "drop_everything"});
    let cases = [
        ("tampered", tampered.to_string(), "is not allowed now"),
        ("truncated", plan.stdout[..plan.stdout.len() / 2].to_owned(), "plan.json:"),
        ("foreign", foreign.to_string(), "the plan is stale"),
        ("unknown op", unknown_op.to_string(), "unknown variant `drop_everything`"),
    ];
    for (what, text, want) in cases {
        std::fs::write(dir.join("plan.json"), text).expect("write");
        let run = pgconverge(&["apply", "--auto-approve", "plan.json"], &dir);
        assert_eq!(run.code, 1, "{what}: {}", run.stdout);
        assert!(run.stderr.contains(want), "{what}: want {want:?} in {}", run.stderr);
        assert_eq!(pgconverge(&["show", "--format", "json"], &dir).stdout, before, "{what}: something was touched");
    }
}

/// The stored record of the service under `prefix` in environment `test`.
fn record(dir: &Path, prefix: &str) -> serde_json::Value {
    std::fs::read_dir(dir.join(".pgconverge/state/test"))
        .expect("state")
        .flatten()
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(e.path()).expect("read")).expect("json")
        })
        .find(|r| r["prefix"] == prefix)
        .expect("a record")
}

/// A missing pg_dump, a port taken while the server was down, a server that will not
/// start: each a clear error and exit 1, and once the cause is gone apply finishes.
#[test]
fn broken_machines_give_clear_errors_and_recover() {
    let dir = scratch("local_broken");
    let _servers = Servers(dir.join(".pgconverge"));
    config(&dir, "  test:\n    postgres:\n      DEFAULT: 15\n");
    apply(&dir);
    let url = dsn(&dir, "DATABASE_URL");
    psql(&url, "CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 10)").expect("load");

    // A PostgreSQL 17 installation without pg_dump, found first.
    let real = binaries::find(17, &[]).expect("17");
    let partial = dir.join("pg17-without-pg_dump");
    std::fs::create_dir_all(&partial).expect("dir");
    for e in std::fs::read_dir(&real.dir).expect("bin").flatten() {
        if e.file_name() != "pg_dump" {
            std::os::unix::fs::symlink(e.path(), partial.join(e.file_name())).expect("link");
        }
    }
    let with_bin_dirs = |dirs: &str| {
        std::fs::write(
            dir.join("pgconverge.yaml"),
            format!("version: 1\nprovider:\n  local:\n    bin_dirs: [{dirs}]\nenvironments:\n  test:\n    postgres:\n      DEFAULT: 17\n"),
        )
        .expect("config");
    };
    with_bin_dirs(&partial.display().to_string());
    let run = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("cannot run") && run.stderr.contains("pg_dump"), "{}", run.stderr);
    with_bin_dirs("");

    // The old server is down and its port taken: observe cannot start it.
    drop(Servers(dir.join(".pgconverge")));
    let port = url.rsplit_once(':').and_then(|(_, rest)| rest.split('/').next()).expect("port");
    let squatter = std::net::TcpListener::bind(format!("127.0.0.1:{port}")).expect("take the port");
    let run = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("did not start"), "{}", run.stderr);
    drop(squatter);

    // A server whose configuration is broken will not start either.
    let id = record(&dir, "DEFAULT")["id"].as_str().expect("id").to_owned();
    let conf = dir.join(".pgconverge/servers").join(id).join("data/postgresql.auto.conf");
    let original = std::fs::read_to_string(&conf).expect("conf");
    std::fs::write(&conf, format!("{original}\nshared_buffers = 'plenty'\n")).expect("break");
    let run = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("did not start") && run.stderr.contains("shared_buffers"), "{}", run.stderr);
    std::fs::write(&conf, original).expect("mend");

    apply(&dir);
    let url = dsn(&dir, "DATABASE_URL");
    assert_eq!(rows_and_major(&url), "10|17");
}

/// A root that turned read-only: apply fails at once with the reason, touching nothing;
/// once writable again, apply finishes. Needs a read-only bind mount (root on Linux).
#[test]
fn a_read_only_root_is_a_clear_error() {
    if server::RunAs::for_user("postgres").ok().flatten().is_none() {
        eprintln!("not root: cannot mount a read-only root here; CI (root) runs this test");
        return;
    }
    let dir = scratch("local_read_only");
    let root = dir.join(".pgconverge");
    let _servers = Servers(root.clone());
    config(&dir, "  test:\n    postgres:\n      DEFAULT: 15\n");
    apply(&dir);
    config(&dir, "  test:\n    postgres:\n      DEFAULT: 17\n");
    let before = pgconverge(&["show", "--format", "json"], &dir).stdout;
    let mount = |args: &[&str]| std::process::Command::new("mount").args(args).status().is_ok_and(|s| s.success());
    let root_s = root.to_str().expect("utf-8");
    assert!(
        mount(&["--bind", root_s, root_s]) && mount(&["-o", "remount,ro,bind", root_s]),
        "this test needs to mount {root_s} read-only (run the tests as root on Linux)"
    );
    let run = pgconverge(&["apply", "--auto-approve"], &dir);
    let unmounted = std::process::Command::new("umount").arg(root_s).status().is_ok_and(|s| s.success());
    assert!(unmounted, "could not unmount {root_s}");
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(run.stderr.contains("Read-only file system"), "{}", run.stderr);
    assert_eq!(pgconverge(&["show", "--format", "json"], &dir).stdout, before, "nothing was touched");
    apply(&dir);
    assert_eq!(
        psql(&dsn(&dir, "DATABASE_URL"), "SELECT current_setting('server_version_num')::int / 10000").expect("v"),
        "17"
    );
}

/// With a state database, the lock and the ledger live there: an upgrade converges, the
/// ledger's row names the copy, and a held lock refuses a second apply.
#[test]
fn a_local_upgrade_keeps_its_lock_and_ledger_in_a_state_database() {
    let dir = scratch("local_state_db");
    let _servers = Servers(dir.join(".pgconverge"));
    let (_state_server, state_dsn) = common::state_database(&dir);
    let state = "state:\n  postgres:\n    dsn_env: PGCONVERGE_STATE_DSN\n";
    let write = |major: u32| {
        let text = format!("version: 1\n{state}environments:\n  test:\n    postgres:\n      DEFAULT: {major}\n");
        std::fs::write(dir.join("pgconverge.yaml"), text).expect("config");
    };
    ensure_postgres();
    let vars = [("PGCONVERGE_STATE_DSN", state_dsn.as_str())];
    write(15);
    let first = pgconverge_with(&["apply", "--auto-approve"], &dir, &vars);
    assert_eq!(first.code, 0, "{}{}", first.stdout, first.stderr);
    psql(&dsn(&dir, "DATABASE_URL"), "CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 100)")
        .expect("load");
    write(17);
    let upgrade = pgconverge_with(&["apply", "--auto-approve"], &dir, &vars);
    assert_eq!(upgrade.code, 0, "{}{}", upgrade.stdout, upgrade.stderr);
    assert_eq!(rows_and_major(&dsn(&dir, "DATABASE_URL")), "100|17");
    let ledger = psql(&state_dsn, "SELECT value FROM pgconverge.records WHERE name = 'ledger'").expect("ledger row");
    assert!(ledger.contains("\"complete\":true") && ledger.contains("\"verified\":true"), "{ledger}");
    assert!(!dir.join(".pgconverge/ledger.json").exists(), "the ledger is in the database");
    assert!(!dir.join(".pgconverge/lock").exists(), "so is the lock");
    let again = pgconverge_with(&["plan", "--detailed-exitcode"], &dir, &vars);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
}
