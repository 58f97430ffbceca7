//! `pgconverge init`: a config drafted from what runs, on the local provider (real
//! servers) and against the Divio emulator. Right after it, `plan --detailed-exitcode`
//! exits 0; a second init refuses to overwrite; `--force` rewrites.

mod common;
mod divio_emulator;

use std::path::Path;

use common::{ensure_postgres, pgconverge, pgconverge_with, scratch, Servers};
use divio_emulator::{lock, serve, World, PG15, PG17};

/// The environments and prefixes → majors a config declares, read back by pgconverge.
fn declared(dir: &Path) -> Vec<(String, Vec<(String, u32)>)> {
    let path = dir.join("pgconverge.yaml");
    let text = std::fs::read_to_string(&path).expect("read config");
    let config = pgconverge::config::parse(&path, &text).expect("the drafted config parses");
    config
        .environments
        .0
        .iter()
        .map(|(env, c)| (env.to_string(), c.postgres.0.iter().map(|(p, m)| (p.to_string(), m.get())).collect()))
        .collect()
}

fn pairs(list: &[(&str, &[(&str, u32)])]) -> Vec<(String, Vec<(String, u32)>)> {
    list.iter().map(|(e, ps)| (e.to_string(), ps.iter().map(|(p, m)| (p.to_string(), *m)).collect())).collect()
}

#[test]
fn local_init_declares_what_runs_and_the_next_plan_has_nothing_to_change() {
    ensure_postgres();
    let dir = scratch("init-local");
    let _servers = Servers(dir.join(".pgconverge"));
    let original = "version: 1\nenvironments:\n  test:\n    postgres:\n      DEFAULT: 16\n  \
                    live:\n    postgres:\n      DEFAULT: 16\n      ANALYTICS: 15\n";
    std::fs::write(dir.join("pgconverge.yaml"), original).expect("config");
    let apply = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(apply.code, 0, "{}{}", apply.stdout, apply.stderr);
    std::fs::remove_file(dir.join("pgconverge.yaml")).expect("remove config");

    let init = pgconverge(&["init", "--provider", "local"], &dir);
    assert_eq!(init.code, 0, "{}{}", init.stdout, init.stderr);
    assert!(init.stdout.contains("Wrote pgconverge.yaml: 2 environments, 3 services"), "{}", init.stdout);
    assert!(init.stdout.contains("`pgconverge plan` has nothing to change."), "{}", init.stdout);
    let text = std::fs::read_to_string(dir.join("pgconverge.yaml")).expect("written");
    assert!(text.starts_with("# yaml-language-server: $schema="), "{text}");
    assert!(text.contains("  local:\n    root: .pgconverge\n"), "{text}");
    assert!(text.contains("# deploy:"), "the deploy command is left for a person to decide: {text}");
    assert_eq!(declared(&dir), pairs(&[("live", &[("DEFAULT", 16), ("ANALYTICS", 15)]), ("test", &[("DEFAULT", 16)])]));
    let plan = pgconverge(&["plan", "--detailed-exitcode"], &dir);
    assert_eq!(plan.code, 0, "right after init, nothing to change: {}{}", plan.stdout, plan.stderr);

    // A second init leaves the file as it is; --force rewrites it; `-` prints it.
    std::fs::write(dir.join("pgconverge.yaml"), "# mine\n").expect("edit");
    let again = pgconverge(&["init", "--provider", "local"], &dir);
    assert_eq!(again.code, 1, "{}{}", again.stdout, again.stderr);
    assert!(again.stderr.contains("pgconverge.yaml: the file exists") && again.stderr.contains("--force"));
    assert_eq!(std::fs::read_to_string(dir.join("pgconverge.yaml")).expect("kept"), "# mine\n");
    let forced = pgconverge(&["init", "--provider", "local", "--force"], &dir);
    assert_eq!(forced.code, 0, "{}{}", forced.stdout, forced.stderr);
    assert_eq!(std::fs::read_to_string(dir.join("pgconverge.yaml")).expect("rewritten"), text);
    let printed = pgconverge(&["init", "--provider", "local", "--out", "-"], &dir);
    assert_eq!((printed.code, printed.stdout.as_str()), (0, text.as_str()), "{}", printed.stderr);
    assert!(printed.stderr.contains("has nothing to change"), "the summary goes to stderr: {}", printed.stderr);

    // Another directory: the root is written relative to the file, or absolute.
    std::fs::create_dir(dir.join("ops")).expect("mkdir");
    let elsewhere = pgconverge(&["init", "--provider", "local", "--root", ".pgconverge", "--out", "ops/pg.yaml"], &dir);
    assert_eq!(elsewhere.code, 0, "{}{}", elsewhere.stdout, elsewhere.stderr);
    let ops = std::fs::read_to_string(dir.join("ops/pg.yaml")).expect("written");
    let root = std::fs::canonicalize(dir.join(".pgconverge")).expect("root");
    assert!(ops.contains(&format!("    root: {}\n", root.display())), "{ops}");
    let plan = pgconverge(&["plan", "-f", "ops/pg.yaml", "--detailed-exitcode"], &dir);
    assert_eq!(plan.code, 0, "{}{}", plan.stdout, plan.stderr);
}

#[test]
fn local_init_declares_a_half_done_upgrade_at_its_target_and_apply_finishes_it() {
    ensure_postgres();
    let dir = scratch("init-half");
    let _servers = Servers(dir.join(".pgconverge"));
    let config = |major: u32| format!("version: 1\nenvironments:\n  live:\n    postgres:\n      DEFAULT: {major}\n");
    std::fs::write(dir.join("pgconverge.yaml"), config(16)).expect("config");
    let apply = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(apply.code, 0, "{}{}", apply.stdout, apply.stderr);
    std::fs::write(dir.join("pgconverge.yaml"), config(17)).expect("config");
    // Stops after the copy is renamed DEFAULT and the original OLD, before the deploy.
    let plan = pgconverge(&["plan", "--format", "json"], &dir);
    let steps: serde_json::Value = serde_json::from_str(&plan.stdout).expect("plan json");
    let actions = steps["environments"][0]["actions"].as_array().expect("actions").clone();
    let deploy = actions.iter().position(|a| a["op"] == "deploy").expect("a deploy") + 1;
    let failed = pgconverge_with(
        &["apply", "--auto-approve"],
        &dir,
        &[("PGCONVERGE_FAILPOINTS", &format!("before:{deploy}=error"))],
    );
    assert_eq!(failed.code, 1, "{}{}", failed.stdout, failed.stderr);
    std::fs::remove_file(dir.join("pgconverge.yaml")).expect("remove config");

    let init = pgconverge(&["init", "--provider", "local"], &dir);
    assert_eq!(init.code, 0, "{}{}", init.stdout, init.stderr);
    assert!(init.stdout.contains("`pgconverge plan` still has"), "{}", init.stdout);
    let text = std::fs::read_to_string(dir.join("pgconverge.yaml")).expect("written");
    assert!(text.contains("# An upgrade is half done: DEFAULT (PostgreSQL 17, provisioned)"), "{text}");
    assert_eq!(declared(&dir), pairs(&[("live", &[("DEFAULT", 17)])]), "{text}");
    let apply = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(apply.code, 0, "{}{}", apply.stdout, apply.stderr);
    assert!(!apply.stdout.contains("add"), "finishes, never starts over: {}", apply.stdout);
    let plan = pgconverge(&["plan", "--detailed-exitcode"], &dir);
    assert_eq!(plan.code, 0, "{}{}", plan.stdout, plan.stderr);
}

#[test]
fn local_init_refuses_a_root_without_services_and_writes_nothing() {
    let dir = scratch("init-empty");
    std::fs::create_dir(dir.join("empty")).expect("mkdir");
    for args in [
        &["init", "--provider", "local", "--root", "empty"][..],
        &["init", "--provider", "local", "--root", "missing"],
        &["init", "--provider", "local", "--application", "shop"],
    ] {
        let run = pgconverge(args, &dir);
        assert_eq!(run.code, 1, "{args:?}: {}{}", run.stdout, run.stderr);
        assert!(run.stderr.starts_with("error: ") && run.stderr.contains("hint: "), "{args:?}: {}", run.stderr);
        assert!(!dir.join("pgconverge.yaml").exists(), "{args:?}");
    }
}

fn divio_run(dir: &Path, args: &[&str]) -> common::Run {
    pgconverge_with(args, dir, &[("DIVIO_TOKEN", "tok-s3cret"), ("NETRC_PATH", "/nonexistent")])
}

#[test]
fn divio_init_declares_every_environment_and_the_next_plan_has_nothing_to_change() {
    let mut world = World::shop(&["test", "stage", "live"]);
    world.rate_limit_every = 5;
    world.unavailable_every = 7;
    // live: ANALYTICS on 17 beside DEFAULT; stage: no database at all (only storage).
    let live = world.env_uuid("live");
    world.instance(&live, "ANALYTICS", PG17, "ATTACHED");
    let stage = world.env_uuid("stage");
    world.instances.retain(|i| !(i.env == stage && i.kind == "DATABASE"));
    let (shared, base) = serve(world);
    let dir = scratch("init-divio");

    let init = divio_run(&dir, &["init", "--provider", "divio", "--application", "shop", "--zone", &base]);
    assert_eq!(init.code, 0, "{}{}", init.stdout, init.stderr);
    let text = std::fs::read_to_string(dir.join("pgconverge.yaml")).expect("written");
    assert_eq!(
        declared(&dir),
        pairs(&[("test", &[("DEFAULT", 15)]), ("live", &[("DEFAULT", 15), ("ANALYTICS", 17)])]),
        "{text}"
    );
    assert!(text.contains("  # stage: no PostgreSQL service is attached here\n"), "{text}");
    for decide in ["# fence_command:", "# unfence_command:", "# verify_command:"] {
        assert!(text.contains(decide), "{decide} is left for a person: {text}");
    }
    assert!(init.stdout.contains("`pgconverge plan` has nothing to change."), "{}", init.stdout);
    let plan = divio_run(&dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(plan.code, 0, "{}{}", plan.stdout, plan.stderr);
    for run in [&init, &plan] {
        assert!(!run.stdout.contains("tok-s3cret") && !run.stderr.contains("tok-s3cret"));
    }
    assert!(!text.contains("tok-s3cret"));

    let again = divio_run(&dir, &["init", "--provider", "divio", "--application", "shop", "--zone", &base]);
    assert_eq!(again.code, 1, "{}{}", again.stdout, again.stderr);
    let requests = lock(&shared).requests;
    let forced = divio_run(&dir, &["init", "--provider", "divio", "--application", "shop", "--zone", &base, "--force"]);
    assert_eq!(forced.code, 0, "{}{}", forced.stdout, forced.stderr);
    assert_eq!(std::fs::read_to_string(dir.join("pgconverge.yaml")).expect("rewritten"), text);
    let w = lock(&shared);
    assert!(w.requests > requests, "--force observed again");
    let writes: Vec<&String> = w.log.iter().filter(|l| !l.starts_with("GET")).collect();
    assert!(writes.is_empty(), "init only reads the API: {writes:?}");
}

#[test]
fn divio_init_declares_a_half_done_runbook_at_its_target() {
    let mut world = World::shop(&["live"]);
    // The runbook stopped after its renames: OLD (15) still attached, NEW (17) provisioned.
    let live = world.env_uuid("live");
    let default = world.databases("live")[0].uuid.clone();
    world.instances.iter_mut().filter(|i| i.uuid == default).for_each(|i| i.prefix = "OLD".into());
    world.instance(&live, "NEW", PG17, "PENDING_ATTACHMENT");
    let (_shared, base) = serve(world);
    let dir = scratch("init-divio-half");
    // The token in a variable of the team's choosing, which the file then names.
    let token = [("MY_TOKEN", "tok-s3cret"), ("NETRC_PATH", "/nonexistent")];
    let args = ["init", "--provider", "divio", "--application", "shop", "--zone", &base, "--token-env", "MY_TOKEN"];
    let init = pgconverge_with(&args, &dir, &token);
    assert_eq!(init.code, 0, "{}{}", init.stdout, init.stderr);
    assert!(init.stdout.contains("`pgconverge plan` still has"), "{}", init.stdout);
    let text = std::fs::read_to_string(dir.join("pgconverge.yaml")).expect("written");
    assert!(text.contains("    token_env: MY_TOKEN\n"), "{text}");
    assert_eq!(declared(&dir), pairs(&[("live", &[("DEFAULT", 17)])]), "{text}");
    // The rest of the runbook verifies: refused until a person sets verify_command.
    assert!(init.stdout.contains("until a person decides") && init.stdout.contains("verify_command"));
    let plan = pgconverge_with(&["plan", "--detailed-exitcode"], &dir, &token);
    assert_eq!(plan.code, 1, "{}{}", plan.stdout, plan.stderr);
    assert!(plan.stderr.contains("verify_command"), "{}", plan.stderr);
    let decided = text.replace("    # verify_command: ./compare-copy\n", "    verify_command: 'true'\n");
    let decided = decided.replace("    # fence_command: ./maintenance on\n", "    fence_command: 'true'\n");
    std::fs::write(
        dir.join("pgconverge.yaml"),
        decided.replace("# unfence_command: ./maintenance off", "unfence_command: 'true'"),
    )
    .expect("decide");
    let plan = pgconverge_with(&["plan", "--detailed-exitcode"], &dir, &token);
    assert_eq!(plan.code, 2, "the rest of the runbook: {}{}", plan.stdout, plan.stderr);
    assert!(text.contains("# An upgrade is half done: NEW (PostgreSQL 17"), "{text}");
    assert!(!text.contains(PG15), "{text}");
}

/// The runbook done by hand with the original kept: OLD (15) detached beside DEFAULT (17).
/// The API shows no data of a detached service and there is no ledger, yet the next
/// plan keeps it: init declares keep_old, and keep_old never deletes such an original.
#[test]
fn divio_init_keeps_an_original_kept_by_a_runbook_done_by_hand() {
    let mut world = World::shop(&["live"]);
    let live = world.env_uuid("live");
    let original = world.databases("live")[0].uuid.clone();
    world.instances.iter_mut().filter(|i| i.uuid == original).for_each(|i| {
        i.prefix = "OLD".into();
        i.status = "DETACHED".into();
    });
    let copy = world.instance(&live, "DEFAULT", PG17, "ATTACHED");
    world.bindings.entry("live".into()).or_default().insert("DEFAULT".into(), copy);
    let (shared, base) = serve(world);
    let dir = scratch("init-divio-kept");
    let init = divio_run(&dir, &["init", "--provider", "divio", "--application", "shop", "--zone", &base]);
    assert_eq!(init.code, 0, "{}{}", init.stdout, init.stderr);
    let text = std::fs::read_to_string(dir.join("pgconverge.yaml")).expect("written");
    assert!(text.contains("    upgrade: {keep_old: true}\n"), "{text}");
    assert!(text.contains("# OLD (PostgreSQL 15, detached) is the original an upgrade of DEFAULT kept"), "{text}");
    assert_eq!(declared(&dir), pairs(&[("live", &[("DEFAULT", 17)])]), "{text}");
    assert!(init.stdout.contains("`pgconverge plan` has nothing to change."), "{}", init.stdout);
    let plan = divio_run(&dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(plan.code, 0, "the original stays: {}{}", plan.stdout, plan.stderr);
    assert_eq!(lock(&shared).databases("live").len(), 2);
}
