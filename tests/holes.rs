//! The holes an attack audit found (issue 13), each tried again as the attacker or the
//! careless user did, through the real binary on real servers.

mod common;

use std::path::{Path, PathBuf};

use common::{ensure_postgres, env_file, pgconverge, psql, scratch, Servers};

fn config(dir: &Path, text: &str) {
    ensure_postgres();
    std::fs::write(dir.join("pgconverge.yaml"), text).expect("config");
}

fn env(major: u32) -> String {
    format!("version: 1\nenvironments:\n  test:\n    postgres:\n      DEFAULT: {major}\n")
}

fn apply(dir: &Path) -> common::Run {
    let run = pgconverge(&["apply", "--auto-approve"], dir);
    assert_eq!(run.code, 0, "apply failed:\n{}\n{}", run.stdout, run.stderr);
    run
}

fn url(dir: &Path) -> String {
    env_file(&dir.join(".pgconverge/test.env"))["DATABASE_URL"].clone()
}

/// An environment applied at PostgreSQL 15 with `sql` loaded through the application's
/// DSN, its config (`config_for` a major) then asking for 17; and the guard that stops
/// its servers.
fn loaded_on_15(name: &str, config_for: impl Fn(u32) -> String, sql: &str) -> (common::Scratch, Servers) {
    let dir = scratch(name);
    let servers = Servers(dir.join(".pgconverge"));
    config(&dir, &config_for(15));
    apply(&dir);
    psql(&url(&dir), sql).expect("load");
    config(&dir, &config_for(17));
    (dir, servers)
}

fn show(dir: &Path) -> String {
    let run = pgconverge(&["show", "--format", "json"], dir);
    assert_eq!(run.code, 0, "{}", run.stderr);
    run.stdout
}

/// Item 6: a saved plan is replayed through the rules before its first action, so one
/// with its verify removed stops with nothing touched, not after five actions with the
/// application fenced.
#[test]
fn a_saved_plan_without_its_verify_is_refused_before_anything_runs() {
    let dir = scratch("holes_saved_plan");
    let _servers = Servers(dir.join(".pgconverge"));
    config(&dir, &env(15));
    apply(&dir);
    config(&dir, &env(17));
    let plan = pgconverge(&["plan", "--format", "json", "--out", "plan.json"], &dir);
    assert_eq!(plan.code, 0, "{}", plan.stderr);
    let mut saved: serde_json::Value = serde_json::from_str(&plan.stdout).expect("plan");
    let actions = saved["environments"][0]["actions"].as_array_mut().expect("actions");
    let verify = actions.iter().position(|a| a["op"] == "verify").expect("a verify");
    assert!(verify > 3, "the verify comes after the fence and the copy");
    actions.remove(verify);
    std::fs::write(dir.join("plan.json"), saved.to_string()).expect("write");
    let before = show(&dir);
    let run = pgconverge(&["apply", "--auto-approve", "plan.json"], &dir);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("nothing was touched"), "{}", run.stderr);
    assert!(!run.stderr.contains("completed before the failure"), "{}", run.stderr);
    assert_eq!(show(&dir), before, "nothing was touched");
    assert!(psql(&url(&dir), "SELECT 1").is_ok(), "the application can still log in: not fenced");
}

/// What the application's role plants to become a superuser and run a program as the
/// server's OS user, should any of its code run with superuser rights: a function in a
/// check constraint (run by whoever fills the table), an ALWAYS trigger (fired by
/// replication too), and a `quote_ident` that the database's search_path puts before
/// pg_catalog's. Each swallows its own failure, as an attacker's would.
fn plant_escalation(dir: &Path, pwned: &Path) {
    let body = format!(
        "BEGIN \
           BEGIN ALTER ROLE app SUPERUSER; EXCEPTION WHEN others THEN NULL; END; \
           BEGIN COPY (SELECT 1) TO PROGRAM 'id > {}'; EXCEPTION WHEN others THEN NULL; END; \
         END;",
        pwned.display()
    );
    let sql = format!(
        "CREATE FUNCTION public.escalate() RETURNS void LANGUAGE plpgsql AS $f$ {body} $f$;
         CREATE FUNCTION public.guard(int) RETURNS boolean LANGUAGE plpgsql AS $f$ BEGIN PERFORM public.escalate(); RETURN true; END $f$;
         CREATE FUNCTION public.fire() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN PERFORM public.escalate(); RETURN NEW; END $f$;
         CREATE TABLE guarded (x int PRIMARY KEY CHECK (public.guard(x)));
         CREATE TRIGGER fire BEFORE INSERT ON guarded FOR EACH ROW EXECUTE FUNCTION public.fire();
         ALTER TABLE guarded ENABLE ALWAYS TRIGGER fire;
         INSERT INTO guarded SELECT generate_series(1, 100);
         CREATE SCHEMA evil;
         CREATE FUNCTION evil.quote_ident(text) RETURNS text LANGUAGE plpgsql AS $f$ BEGIN PERFORM public.escalate(); RETURN pg_catalog.quote_ident($1); END $f$;
         CREATE FUNCTION evil.md5(text) RETURNS text LANGUAGE plpgsql AS $f$ BEGIN PERFORM public.escalate(); RETURN pg_catalog.md5($1); END $f$;
         ALTER DATABASE app SET search_path = evil, pg_catalog, public;"
    );
    psql(&url(dir), &sql).expect("plant");
}

fn assert_not_escalated(dir: &Path, pwned: &Path) {
    let url = url(dir);
    assert_eq!(psql(&url, "SELECT current_setting('server_version_num')::int / 10000").expect("version"), "17");
    assert_eq!(psql(&url, "SELECT count(*) FROM guarded").expect("rows"), "100");
    assert_eq!(
        psql(&url, "SELECT rolsuper FROM pg_roles WHERE rolname = 'app'").expect("role"),
        "f",
        "app became a superuser"
    );
    assert!(!pwned.exists(), "the application ran a program as the server's OS user");
    let restorer = psql(&url, "SELECT count(*) FROM pg_roles WHERE rolname = 'pgconverge_restore'").expect("roles");
    assert_eq!(restorer, "0", "the restore role does not outlive the restore");
}

/// Where an escalated server would leave its mark: a file in a directory of this test's
/// own that the servers' OS user could write to (mode 0777), removed with its guard.
fn pwned_path(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix(&format!("pgconverge-{name}-pwned-")).tempdir().expect("dir");
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("mode");
    let path = dir.path().join("pwned");
    (dir, path)
}

fn escalation_attempt(name: &str, strategy: &str) {
    let dir = scratch(name);
    let _servers = Servers(dir.join(".pgconverge"));
    let (_pwned_dir, pwned) = pwned_path(name);
    let with = |major: u32| {
        format!(
            "version: 1\nupgrade: {{strategy: {strategy}, verify: checksums}}\nenvironments:\n  test:\n    postgres:\n      DEFAULT: {major}\n"
        )
    };
    config(&dir, &with(15));
    apply(&dir);
    plant_escalation(&dir, &pwned);
    config(&dir, &with(17));
    apply(&dir);
    assert_not_escalated(&dir, &pwned);
}

/// Item 2, dump_restore: pg_restore fills the table (running its check constraint) and
/// verify fingerprints both servers (calling quote_ident and md5) without superuser
/// rights reaching the application's functions.
#[test]
fn the_application_cannot_become_superuser_through_a_dump_restore_upgrade() {
    escalation_attempt("holes_escalate_dump", "dump_restore");
}

/// Item 2, logical: the subscription's initial copy and its apply worker run the check
/// constraint and the ALWAYS trigger as the table's owner.
#[test]
fn the_application_cannot_become_superuser_through_a_logical_upgrade() {
    escalation_attempt("holes_escalate_logical", "logical");
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).mode() & 0o7777
}

fn uid(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).uid()
}

fn postgres_uid() -> u32 {
    pgconverge::provider::local::server::RunAs::for_user("postgres").expect("postgres").map(|r| r.uid).unwrap_or(0)
}

/// The socket directory recorded for the only service of environment `test`.
fn recorded_socket_dir(root: &Path) -> std::path::PathBuf {
    let state = root.join("state/test");
    let record = std::fs::read_dir(&state).expect("state").flatten().next().expect("a record").path();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(record).expect("read")).expect("json");
    json["socket_dir"].as_str().expect("a socket_dir for a deep root").into()
}

/// Item 3: with a deep root the socket goes under the temporary directory, in a
/// directory with a random name that pgconverge made (0700, the server's user), checked
/// at every use; gone (the system cleaned /tmp), it is made anew and the server moved.
#[test]
fn sockets_of_a_deep_root_live_in_private_directories_checked_at_every_use() {
    let dir = scratch("holes_sockets");
    let deep = format!("deep-{}", "x".repeat(70));
    let root = dir.join(&deep);
    let _servers = Servers(root.clone());
    let with = |major: u32| {
        format!("version: 1\nprovider:\n  local:\n    root: {deep}\nenvironments:\n  test:\n    postgres:\n      DEFAULT: {major}\n")
    };
    config(&dir, &with(15));
    apply(&dir);
    let socket = recorded_socket_dir(&root);
    assert!(socket.starts_with(std::env::temp_dir()), "{}", socket.display());
    assert!(socket.file_name().expect("name").to_string_lossy().len() >= "pgconverge-".len() + 24, "a random name");
    assert_eq!(mode(&socket), 0o700);
    assert_eq!(uid(&socket), postgres_uid());
    let dsn = env_file(&root.join("test.env"))["DATABASE_URL"].clone();
    psql(&dsn, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)").expect("load");

    // Someone opened it up: nothing goes through it, and the error says why.
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
    let run = pgconverge(&["plan"], &dir);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("not a private socket directory"), "{}", run.stderr);
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o700)).expect("chmod");

    // The system cleaned /tmp: a new directory, the server moved into it, nothing lost.
    std::fs::remove_dir_all(&socket).expect("clean /tmp");
    config(&dir, &with(17));
    apply(&dir);
    let moved = recorded_socket_dir(&root);
    assert_ne!(moved, socket);
    assert_eq!(mode(&moved), 0o700);
    let dsn = env_file(&root.join("test.env"))["DATABASE_URL"].clone();
    assert_eq!(psql(&dsn, "SELECT count(*) FROM t").expect("rows"), "1");
}

/// Item 4: a directory that is not pgconverge's is never its root: nothing in it is
/// deleted, and `/` is refused by validate already.
#[test]
fn a_root_that_is_not_pgconverges_is_refused_with_nothing_deleted() {
    let dir = scratch("holes_foreign_root");
    for (path, text) in
        [("servers/web1/config.ini", "[web]\n"), ("backups/nginx/2024.roles.sql", "--\n"), (".bashrc.tmp-1", "x\n")]
    {
        std::fs::create_dir_all(dir.join(path).parent().expect("parent")).expect("dir");
        std::fs::write(dir.join(path), text).expect("write");
    }
    config(
        &dir,
        "version: 1\nprovider:\n  local:\n    root: .\nenvironments:\n  test:\n    postgres:\n      DEFAULT: 15\n",
    );
    for command in [&["plan"][..], &["apply", "--auto-approve"]] {
        let run = pgconverge(command, &dir);
        assert_eq!(run.code, 1, "{command:?}: {}{}", run.stdout, run.stderr);
        assert!(run.stderr.contains("not empty and not pgconverge's"), "{}", run.stderr);
    }
    for path in ["servers/web1/config.ini", "backups/nginx/2024.roles.sql", ".bashrc.tmp-1"] {
        assert!(dir.join(path).exists(), "{path} was deleted");
    }
    assert!(!dir.join("state").exists() && !dir.join("lock").exists(), "nothing was written");

    config(
        &dir,
        "version: 1\nprovider:\n  local:\n    root: /\nenvironments:\n  test:\n    postgres:\n      DEFAULT: 15\n",
    );
    let run = pgconverge(&["validate"], &dir);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("pgconverge.yaml:4:") && run.stderr.contains("provider.local.root"), "{}", run.stderr);
}

/// Items 4 and 5: under `umask 000` every directory and file pgconverge makes is
/// writable by its owner alone (secrets and dumps readable by it alone), and a symlink
/// planted under root is refused, its target untouched.
#[test]
fn modes_are_explicit_whatever_the_umask_and_no_symlink_is_followed() {
    let dir = scratch("holes_modes");
    let root = dir.join(".pgconverge");
    let _servers = Servers(root.clone());
    config(&dir, &env(15));
    let run = std::process::Command::new("sh")
        .args(["-c", "umask 000; exec \"$0\" apply --auto-approve", env!("CARGO_BIN_EXE_pgconverge")])
        .current_dir(&dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("apply");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let mut checked = 0;
    let mut stack = vec![root.clone()];
    while let Some(path) = stack.pop() {
        let m = std::fs::symlink_metadata(&path).expect("stat");
        if path.starts_with(root.join("servers")) && path != root.join("servers") {
            continue; // the server's own files, made by initdb as the server's user
        }
        assert_eq!(mode(&path) & 0o022, 0, "{} is writable by others ({:o})", path.display(), mode(&path));
        if m.is_dir() {
            stack.extend(std::fs::read_dir(&path).expect("read").flatten().map(|e| e.path()));
        }
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} paths were checked");
    assert_eq!(mode(&root.join("secrets/test.json")), 0o600);
    assert_eq!(mode(&root.join("test.env")), 0o600);

    // A symlink where a backup directory goes: the upgrade stops, the target untouched.
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("dir");
    std::fs::set_permissions(&elsewhere, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let record = std::fs::read_dir(root.join("state/test")).expect("state").flatten().next().expect("record").path();
    let id = record.file_stem().expect("id").to_string_lossy().into_owned();
    std::fs::create_dir_all(root.join("backups")).expect("backups");
    std::fs::set_permissions(root.join("backups"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).expect("chmod");
    std::os::unix::fs::symlink(&elsewhere, root.join("backups").join(&id)).expect("symlink");
    config(&dir, &env(17));
    let run = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("follows no link"), "{}", run.stderr);
    assert_eq!(mode(&elsewhere), 0o755, "the link's target was chmodded");
    assert_eq!(std::fs::read_dir(&elsewhere).expect("read").count(), 0, "something was written through the link");
    // Gone, the next apply finishes the job.
    std::fs::remove_file(root.join("backups").join(&id)).expect("unlink");
    apply(&dir);
}

/// Item 5: a secrets file that pgconverge did not write never reaches SQL: not in a
/// root that belongs to someone else, not with SQL in its password.
#[test]
fn a_planted_secrets_file_is_refused_and_never_reaches_sql() {
    let (_pwned_dir, pwned) = pwned_path("holes_secrets");
    let planted = format!(
        "{{\"role\": \"app\", \"password\": \"x' SUPERUSER; COPY (SELECT 1) TO PROGRAM 'id > {}'; --\"}}",
        pwned.display()
    );
    let dir = scratch("holes_secrets");
    let root = dir.join(".pgconverge");
    let _servers = Servers(root.clone());
    config(&dir, &env(15));
    std::fs::create_dir_all(root.join("secrets")).expect("dirs");
    std::fs::write(root.join("secrets/test.json"), &planted).expect("plant");
    std::fs::set_permissions(root.join("secrets/test.json"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");

    // In a root someone else owns.
    std::os::unix::fs::chown(&root, Some(postgres_uid()), None).expect("chown");
    let run = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("belongs to uid"), "{}", run.stderr);
    std::os::unix::fs::chown(&root, Some(0), None).expect("chown");

    // In our own root, with SQL in its password.
    let run = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("is not one pgconverge wrote"), "{}", run.stderr);
    assert!(!run.stderr.contains("SUPERUSER"), "the planted password is not echoed: {}", run.stderr);
    assert!(!pwned.exists(), "the planted password ran as SQL");
}

/// Item 9: validate refuses what would run the servers as root, write two environments'
/// DSNs into one file, or read a version no person reads as written.
#[test]
fn validate_refuses_root_servers_shared_env_files_and_hex_versions() {
    let dir = scratch("holes_validate");
    let cases = [
        (
            "provider:\n  local:\n    run_as: root\n",
            "  test:\n    postgres:\n      DEFAULT: 15\n",
            "pgconverge.yaml:4:5",
            "provider.local.run_as",
        ),
        (
            "provider:\n  local:\n    deploy:\n      env_file: app.env\n",
            "  test:\n    postgres:\n      DEFAULT: 15\n  live:\n    postgres:\n      DEFAULT: 15\n",
            "pgconverge.yaml:5:7",
            "same env file",
        ),
        ("", "  test:\n    postgres:\n      DEFAULT: 0x11\n", "pgconverge.yaml:5:7", "written in decimal"),
        ("", "  test:\n    postgres: {DEFAULT: 0o21}\n", "pgconverge.yaml:4:16", "written in decimal"),
    ];
    for (provider, envs, at, want) in cases {
        std::fs::write(dir.join("pgconverge.yaml"), format!("version: 1\n{provider}environments:\n{envs}"))
            .expect("config");
        let run = pgconverge(&["validate"], &dir);
        assert_eq!(run.code, 1, "{want}: {}{}", run.stdout, run.stderr);
        assert!(run.stderr.contains(at) && run.stderr.contains(want), "want {at} and {want:?} in {}", run.stderr);
    }
    std::fs::write(dir.join("pgconverge.yaml"), "version: 1\nenvironments:\n  test:\n    postgres: {DEFAULT: '17'}\n")
        .expect("config");
    assert_eq!(pgconverge(&["validate"], &dir).code, 0, "a quoted decimal version is fine");
}

/// Item 9: control bytes from input (an escape sequence that would clear the screen or
/// retitle the terminal) are shown escaped in errors, never sent to the terminal.
#[test]
fn control_bytes_in_errors_are_escaped() {
    let dir = scratch("holes_control_bytes");
    std::fs::write(dir.join("pgconverge.yaml"), env(15)).expect("config");
    let hostile = "te\u{1b}[2J\u{1b}]0;pwned\u{7}st";
    let snapshot = format!(
        "{{\"format_version\": 1, \"environments\": {{\"{}\": {{\"services\": []}}}}}}",
        hostile.replace('\u{1b}', "\\u001b").replace('\u{7}', "\\u0007")
    );
    std::fs::write(dir.join("live.json"), snapshot).expect("snapshot");
    for args in [&["plan", "--env", hostile][..], &["plan", "-f", hostile], &["plan", "--live", "live.json"]] {
        let run = pgconverge(args, &dir);
        assert_eq!(run.code, 1, "{args:?}: {}{}", run.stdout, run.stderr);
        assert!(!run.stderr.contains('\u{1b}') && !run.stderr.contains('\u{7}'), "{args:?}: {:?}", run.stderr);
        assert!(run.stderr.contains("\\u{1b}"), "{args:?}: {}", run.stderr);
    }
}

/// The superuser's DSN, over its socket, of environment `test`'s PostgreSQL 17 server
/// (the copy of an upgrade in progress), which the application cannot reach yet.
fn superuser_dsn_of_the_copy(root: &Path) -> String {
    let record = std::fs::read_dir(root.join("state/test"))
        .expect("state")
        .flatten()
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(e.path()).expect("read")).expect("json")
        })
        .find(|r| r["version"] == 17)
        .expect("the copy");
    let id = record["id"].as_str().expect("id");
    format!(
        "postgresql://postgres@/app?host={}&port={}",
        root.join("run").join(id).display(),
        record["port"].as_u64().expect("port")
    )
}

const DATABASE_PROPERTIES: &str = "
    ALTER DATABASE app SET statement_timeout = '5s';
    ALTER DATABASE app SET timezone = 'Pacific/Auckland';
    ALTER DATABASE app SET search_path = \"my schema\", public;
    ALTER ROLE app IN DATABASE app SET lock_timeout = '3s';
    COMMENT ON DATABASE app IS 'orders; since 2019';
    CREATE TABLE t (x int PRIMARY KEY); INSERT INTO t VALUES (1);";

fn database_properties(url: &str) -> String {
    psql(
        url,
        "SELECT (SELECT string_agg(coalesce(r.rolname, '*') || ':' || array_to_string(s.setconfig, ','), ' ' ORDER BY 1) \
         FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole \
         WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())) \
         || ' / ' || shobj_description((SELECT oid FROM pg_database WHERE datname = current_database()), 'pg_database')",
    )
    .expect("properties")
}

/// Item 7: the database's settings, its role's settings in it and its comment come
/// along with either strategy.
#[test]
fn database_settings_and_comment_come_along_with_every_strategy() {
    for strategy in ["dump_restore", "logical"] {
        let dir = scratch(&format!("holes_database_{strategy}"));
        let _servers = Servers(dir.join(".pgconverge"));
        let with = |major: u32| {
            format!("version: 1\nupgrade: {{strategy: {strategy}}}\nenvironments:\n  test:\n    postgres:\n      DEFAULT: {major}\n")
        };
        config(&dir, &with(15));
        apply(&dir);
        psql(&url(&dir), DATABASE_PROPERTIES).expect("set");
        let before = database_properties(&url(&dir));
        assert!(before.contains("statement_timeout=5s") && before.contains("app:lock_timeout=3s"), "{before}");
        config(&dir, &with(17));
        apply(&dir);
        assert_eq!(psql(&url(&dir), "SHOW server_version_num").expect("version")[..2], *"17");
        assert_eq!(database_properties(&url(&dir)), before, "{strategy}");
    }
}

/// Item 7: verify compares them: a copy whose database settings differ is no copy.
#[test]
fn verify_catches_a_copy_whose_database_settings_differ() {
    let (dir, _servers) = loaded_on_15("holes_database_verify", env, DATABASE_PROPERTIES);
    let root = dir.join(".pgconverge");
    // Stop right after the restore, before the verify.
    let plan = pgconverge(&["plan", "--format", "json"], &dir);
    let json: serde_json::Value = serde_json::from_str(&plan.stdout).expect("plan");
    let actions = json["environments"][0]["actions"].as_array().expect("actions");
    let verify = actions.iter().position(|a| a["op"] == "verify").expect("verify") + 1;
    let stop = format!("before:{verify}=error");
    let run = common::pgconverge_with(&["apply", "--auto-approve"], &dir, &[("PGCONVERGE_FAILPOINTS", &stop)]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    // The copy's database setting changes behind pgconverge's back.
    let copy = superuser_dsn_of_the_copy(&root);
    psql(&copy, "ALTER DATABASE app SET timezone = 'UTC'").expect("alter the copy");
    let run = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("database setting:(every role)"), "{}", run.stderr);
}

/// A small file system of its own for a test (tmpfs), unmounted when the test ends.
struct Disk(std::path::PathBuf);

impl Disk {
    fn mount(dir: &Path, megabytes: u32) -> Disk {
        let at = dir.join("disk");
        std::fs::create_dir_all(&at).expect("mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}M,mode=0755"), "tmpfs"])
            .arg(&at)
            .status()
            .expect("mount");
        assert!(status.success(), "mounting a tmpfs needs root");
        Disk(at)
    }

    fn free(&self) -> u64 {
        let out = std::process::Command::new("df").arg("-Pk").arg(&self.0).output().expect("df");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let kb: u64 =
            text.lines().nth(1).and_then(|l| l.split_whitespace().nth(3)).and_then(|k| k.parse().ok()).expect("df");
        kb * 1024
    }

    /// Fills the disk until `leave` bytes are free.
    fn fill(&self, name: &str, leave: u64) {
        let size = self.free().saturating_sub(leave);
        let f = std::fs::File::create(self.0.join(name)).expect("ballast");
        use std::io::Write;
        let chunk = vec![0u8; 1 << 20];
        let mut w = std::io::BufWriter::new(f);
        let mut written = 0;
        while written < size {
            let n = chunk.len().min((size - written) as usize);
            if w.write_all(&chunk[..n]).is_err() {
                break;
            }
            written += n as u64;
        }
        let _ = w.flush();
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Item 8: a copy that cannot fit is refused before anything is touched, with the
/// figures; a disk that fills during the copy is named in the error, and once there is
/// room again the next apply finishes the job with nothing lost.
#[test]
fn a_full_disk_is_refused_before_the_copy_and_named_during_it() {
    let dir = scratch("holes_disk");
    let disk = Disk::mount(&dir, 400);
    let root = disk.0.join("root");
    let _servers = Servers(root.clone());
    let with = |major: u32| {
        format!("version: 1\nprovider:\n  local:\n    root: {}\nenvironments:\n  test:\n    postgres:\n      DEFAULT: {major}\n", root.display())
    };
    config(&dir, &with(15));
    apply(&dir);
    let dsn = env_file(&root.join("test.env"))["DATABASE_URL"].clone();
    psql(&dsn, "CREATE TABLE t (id int PRIMARY KEY, pad text); INSERT INTO t SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 100000) g")
        .expect("load");
    let size: u64 = psql(&dsn, "SELECT pg_database_size(current_database())").expect("size").parse().expect("bytes");
    config(&dir, &with(17));

    // Twice the database's size free: not enough.
    disk.fill("ballast", 2 * size);
    let before = show(&dir);
    let run = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("needs about") && run.stderr.contains(&root.display().to_string()), "{}", run.stderr);
    assert_eq!(show(&dir), before, "nothing was touched");

    // Room enough when the copy is planned, none left once it runs.
    std::fs::remove_file(disk.0.join("ballast")).expect("room");
    let (code, all, filled) = common::apply_watching(&dir, "] fence ", |_| disk.fill("filler", 512 * 1024));
    assert!(filled, "apply never reached the fence: {all}");
    assert_eq!(code, Some(1), "{all}");
    assert!(all.contains("is full") && all.contains(&root.display().to_string()), "{all}");

    std::fs::remove_file(disk.0.join("filler")).expect("room again");
    apply(&dir);
    let dsn = env_file(&root.join("test.env"))["DATABASE_URL"].clone();
    assert_eq!(
        psql(&dsn, "SELECT count(*), current_setting('server_version_num')::int / 10000 FROM t").expect("rows"),
        "100000|17"
    );
}

/// Item 8, logical: the source's slot may keep only a bounded amount of WAL, and a
/// subscription that fails disables itself rather than retrying against a live source.
#[test]
fn a_logical_copy_bounds_the_sources_wal_and_stops_on_error() {
    let with = |major: u32| {
        format!("version: 1\nupgrade: {{strategy: logical}}\nenvironments:\n  test:\n    postgres:\n      DEFAULT: {major}\n")
    };
    let (dir, _servers) = loaded_on_15(
        "holes_logical_bounds",
        with,
        "CREATE TABLE t (x int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 1000)",
    );
    let root = dir.join(".pgconverge");
    let run =
        common::pgconverge_with(&["apply", "--auto-approve"], &dir, &[("PGCONVERGE_FAILPOINTS", "after:3=error")]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let bound = psql(&url(&dir), "SHOW max_slot_wal_keep_size").expect("show");
    assert_ne!(bound, "-1", "the source's slot keeps WAL without bound");
    let superuser = superuser_dsn_of_the_copy(&root);
    assert_eq!(psql(&superuser, "SELECT subdisableonerr FROM pg_subscription").expect("subscription"), "t");
    apply(&dir);
    assert_eq!(psql(&url(&dir), "SELECT count(*) FROM t").expect("rows"), "1000");
}

/// Item 9: SIGTERM while the application is fenced stops apply after the action under
/// way, says that writes stay blocked and what to run, and releases the lock; the next
/// apply finishes the job.
#[test]
fn sigterm_inside_the_write_outage_says_writes_stay_blocked_and_releases_the_lock() {
    let (dir, _servers) = loaded_on_15(
        "holes_sigterm_fenced",
        env,
        "CREATE TABLE t (id int PRIMARY KEY, pad text); INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 300000) g",
    );
    let root = dir.join(".pgconverge");
    // The copy cannot be cut short: apply stops after it, with the application fenced.
    let (code, all, sent) = common::apply_watching(&dir, "] backup ", common::terminate);
    assert!(sent, "apply never reached the backup: {all}");
    assert_eq!(code, Some(1), "{all}");
    assert!(all.contains("interrupted by a signal") && all.contains("writes stay blocked"), "{all}");
    assert!(all.contains("run `pgconverge apply` again now"), "{all}");
    assert!(!root.join("lock").exists(), "the lock is released");
    assert!(psql(&url(&dir), "INSERT INTO t VALUES (0, 'during')").is_err(), "still fenced, as it says");
    apply(&dir);
    assert_eq!(psql(&url(&dir), "SELECT count(*) FROM t").expect("rows"), "300000");
    psql(&url(&dir), "INSERT INTO t VALUES (0, 'after')").expect("writes again");
}
