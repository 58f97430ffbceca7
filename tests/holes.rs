//! The holes an attack audit found (issue 13), each tried again as the attacker or the
//! careless user did, through the real binary on real servers.

mod common;

use std::path::Path;

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

fn escalation_attempt(name: &str, strategy: &str) {
    let dir = scratch(name);
    let _servers = Servers(dir.join(".pgconverge"));
    let pwned = std::env::temp_dir().join(format!("pgconverge-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&pwned);
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
