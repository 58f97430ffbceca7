//! The Divio provider against an in-process emulator of the Control Panel API
//! (`tests/divio_emulator`), through the real binary, as a CI job would run it.

mod common;
mod divio_emulator;

use std::path::Path;

use common::{pgconverge_with, scratch, Run, Scratch};
use divio_emulator::{lock, serve, Lose, Shared, World, PG17};

/// A project directory with a config for the emulator at `base`; `extra` goes under
/// `provider.divio`, `upgrade` under `upgrade`.
fn project(name: &str, base: &str, extra: &str, upgrade: &str) -> Scratch {
    let dir = scratch(name);
    let fence = dir.join("maintenance");
    let config = format!(
        "version: 1\n\
         provider:\n  divio:\n    application: shop\n    zone: {base}\n    poll_seconds: 0.01\n    \
         fence_command: touch {fence}\n    unfence_command: rm -f {fence}\n    \
         verify_command: 'echo \"$PGCONVERGE_VERIFY $PGCONVERGE_PREFIX from $PGCONVERGE_AGAINST_PREFIX\" >> verified'\n{extra}\
         {upgrade}\
         rollout: [test, live]\n\
         environments:\n  test:\n    postgres:\n      DEFAULT: 17\n  live:\n    postgres:\n      DEFAULT: 17\n",
        fence = fence.display()
    );
    std::fs::write(dir.join("pgconverge.yaml"), config).expect("write config");
    dir
}

/// Declares only `live`, for a world that has no other environment.
fn only_live(dir: &Path) {
    let path = dir.join("pgconverge.yaml");
    let text = std::fs::read_to_string(&path).expect("read config");
    let text = text.replace("rollout: [test, live]\n", "").replace("  test:\n    postgres:\n      DEFAULT: 17\n", "");
    std::fs::write(path, text).expect("write config");
}

fn run(dir: &Path, args: &[&str]) -> Run {
    pgconverge_with(args, dir, &[("DIVIO_TOKEN", "tok-s3cret"), ("NETRC_PATH", "/nonexistent")])
}

fn start(world: World, dir_name: &str, extra: &str, upgrade: &str) -> (Shared, Scratch) {
    let (shared, base) = serve(world);
    let dir = project(dir_name, &base, extra, upgrade);
    lock(&shared).fence_file = Some(dir.join("maintenance"));
    (shared, dir)
}

/// After an apply: one PostgreSQL 17 under DEFAULT, attached and in use, holding the two
/// original rows and every write the application was told had committed.
fn assert_upgraded(shared: &Shared, env: &str) {
    let w = lock(shared);
    let dbs = w.databases(env);
    assert_eq!(dbs.len(), 1, "{env}: one database left: {dbs:?}");
    let db = &dbs[0];
    assert_eq!((db.prefix.as_str(), db.service.as_str(), db.status.as_str()), ("DEFAULT", PG17, "ATTACHED"));
    assert_eq!(w.bindings[env]["DEFAULT"], db.uuid, "{env}: the application uses it");
    let rows = w.app_rows(env);
    assert!(rows.starts_with(&["row-a".to_owned(), "row-b".to_owned()]), "{env}: {rows:?}");
    let lost: Vec<&String> = w.committed.get(env).into_iter().flatten().filter(|r| !rows.contains(r)).collect();
    assert!(lost.is_empty(), "{env}: committed writes lost: {lost:?}");
}

#[test]
fn the_runbook_end_to_end_loses_no_write() {
    let mut world = World::shop(&["test", "live"]);
    world.rate_limit_every = 7;
    world.unavailable_every = 11;
    let (shared, dir) = start(world, "divio-runbook", "", "");

    let plan = run(&dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(plan.code, 2, "{}{}", plan.stdout, plan.stderr);
    assert!(plan.stdout.contains("11 actions, 6 inside the write outage"), "{}", plan.stdout);

    let apply = run(&dir, &["apply", "--auto-approve"]);
    assert_eq!(apply.code, 0, "{}{}", apply.stdout, apply.stderr);
    assert!(apply.stdout.contains("Apply complete: 22 actions"), "{}", apply.stdout);
    for env in ["test", "live"] {
        assert_upgraded(&shared, env);
    }
    {
        let w = lock(&shared);
        assert!(w.committed["live"].len() > 10, "the application kept writing: {:?}", w.committed["live"]);
        assert!(w.log.iter().any(|l| l.ends_with("/detach/")), "detached through the API");
        assert!(w.refused > 10, "429s and 503s were retried: {}", w.refused);
        assert!(!dir.join("maintenance").exists(), "the deploy lifted the fence");
    }
    let verified = std::fs::read_to_string(dir.join("verified")).expect("verify_command ran");
    assert_eq!(verified, "counts NEW from DEFAULT\ncounts NEW from DEFAULT\n");
    for secret in ["tok-s3cret", divio_emulator::DSN_PASSWORD] {
        assert!(!apply.stdout.contains(secret) && !apply.stderr.contains(secret), "{secret} shown");
    }
    assert!(lock(&shared).log.iter().any(|l| l.contains("environment-variables")), "variables were read");

    let again = run(&dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(again.code, 0, "converged: {}{}", again.stdout, again.stderr);
}

#[test]
fn without_a_fence_the_runbook_loses_writes_and_the_plan_says_so() {
    let upgrade = "upgrade:\n  fence_writes: false\n  verify: none\n";
    let (shared, dir) = start(World::shop(&["test", "live"]), "divio-nofence", "", upgrade);
    let plan = run(&dir, &["plan", "--format", "markdown"]);
    assert_eq!(plan.code, 0, "{}{}", plan.stdout, plan.stderr);
    assert!(plan.stdout.contains("no-fence: writes may be lost"), "{}", plan.stdout);
    let apply = run(&dir, &["apply", "--auto-approve"]);
    assert_eq!(apply.code, 0, "{}{}", apply.stdout, apply.stderr);
    let w = lock(&shared);
    let rows = w.app_rows("live");
    let lost = w.committed["live"].iter().filter(|r| !rows.contains(r)).count();
    assert!(lost > 0, "writes between backup and deploy are lost, as the runbook warns");
}

#[test]
fn plans_the_api_cannot_carry_out_are_refused_naming_the_setting_that_accepts_the_risk() {
    let (shared, base) = serve(World::shop(&["test", "live"]));
    let dir = scratch("divio-refuse");
    let config = |upgrade: &str| {
        let config = format!(
            "version: 1\nprovider:\n  divio: {{application: shop, zone: '{base}', poll_seconds: 0.01}}\n\
             upgrade: {{{upgrade}}}\nenvironments:\n  live:\n    postgres: {{DEFAULT: 17}}\n"
        );
        std::fs::write(dir.join("pgconverge.yaml"), config).expect("config");
    };
    config("");
    let plan = run(&dir, &["plan"]);
    assert_eq!(plan.code, 1, "{}{}", plan.stdout, plan.stderr);
    assert!(
        plan.stderr.contains("verify_command") && plan.stderr.contains("`upgrade.verify: none`"),
        "{}",
        plan.stderr
    );
    let apply = run(&dir, &["apply", "--auto-approve"]);
    assert_eq!(apply.code, 1, "{}{}", apply.stdout, apply.stderr);
    assert!(apply.stderr.contains("`upgrade.verify: none`"), "{}", apply.stderr);
    assert!(!lock(&shared).log.iter().any(|l| !l.starts_with("GET")), "nothing was asked of the API but to look");

    config("verify: none");
    let plan = run(&dir, &["plan"]);
    assert_eq!(plan.code, 1, "{}{}", plan.stdout, plan.stderr);
    assert!(
        plan.stderr.contains("fence_command") && plan.stderr.contains("`upgrade.fence_writes: false`"),
        "{}",
        plan.stderr
    );
    assert!(plan.stderr.contains("every write between the backup and the deploy will then be lost"), "{}", plan.stderr);

    config("verify: none, fence_writes: false");
    let plan = run(&dir, &["plan"]);
    assert_eq!(plan.code, 0, "{}{}", plan.stdout, plan.stderr);
    assert!(
        plan.stdout
            .contains("Warning: fence_writes is off: writes made between the backup and the deploy will be lost"),
        "{}",
        plan.stdout
    );
    assert_eq!(lock(&shared).databases("live").len(), 1, "nothing was touched");
}

#[test]
fn a_missing_endpoint_stops_apply_with_the_control_panel_step_and_the_next_apply_continues() {
    let mut world = World::shop(&["live"]);
    world.unsupported.insert("rename");
    let (shared, dir) = start(world, "divio-manual", "", "");
    only_live(&dir);

    let first = run(&dir, &["apply", "--auto-approve"]);
    assert_eq!(first.code, 1, "{}{}", first.stdout, first.stderr);
    assert!(first.stderr.contains("environment live → Services → rename prefix DEFAULT to OLD"), "{}", first.stderr);
    assert!(dir.join("maintenance").exists(), "writes stay blocked until the job is finished");
    lock(&shared).rename_by_hand("live", "DEFAULT", "OLD");

    let second = run(&dir, &["apply", "--auto-approve"]);
    assert_eq!(second.code, 1, "{}{}", second.stdout, second.stderr);
    assert!(second.stderr.contains("rename prefix NEW to DEFAULT"), "{}", second.stderr);
    assert!(
        second.stderr.contains("the application still has DEFAULT_DATABASE_DSN, whose service is no longer attached"),
        "the variables lag behind the rename until the deploy: {}",
        second.stderr
    );
    assert!(!second.stderr.contains("backup"), "the copy made before is not made again: {}", second.stderr);
    lock(&shared).rename_by_hand("live", "NEW", "DEFAULT");

    let third = run(&dir, &["apply", "--auto-approve"]);
    assert_eq!(third.code, 0, "{}{}", third.stdout, third.stderr);
    assert_upgraded(&shared, "live");
    let backups = lock(&shared).log.iter().filter(|l| *l == "POST /apps/v3/backups/").count();
    assert_eq!(backups, 1, "one backup in all");
}

#[test]
fn a_deployment_already_running_is_waited_for_not_duplicated() {
    let mut world = World::shop(&["test", "live"]);
    let running = world.start_deployment("live", 12);
    let (shared, dir) = start(world, "divio-busy", "", "");
    let apply = run(&dir, &["apply", "--auto-approve"]);
    assert_eq!(apply.code, 0, "{}{}", apply.stdout, apply.stderr);
    assert_upgraded(&shared, "live");
    let w = lock(&shared);
    let live = w.env_uuid("live");
    let ours: Vec<_> = w.deployments.iter().filter(|d| d.env == live && !d.started_by_test).collect();
    assert_eq!(ours.len(), 1, "one deployment of its own");
    let theirs = w.deployments.iter().find(|d| d.uuid == running).expect("the running one");
    assert!(theirs.ended_seq.is_some_and(|end| end < ours[0].seq), "started after the running one ended");
}

#[test]
fn a_bad_token_is_refused_plainly_and_never_shown() {
    let (_shared, dir) = start(World::shop(&["test", "live"]), "divio-token", "", "");
    let bad = pgconverge_with(&["plan"], &dir, &[("DIVIO_TOKEN", "not-the-token-42"), ("NETRC_PATH", "/nonexistent")]);
    assert_eq!(bad.code, 1, "{}{}", bad.stdout, bad.stderr);
    assert!(bad.stderr.contains("refused the token") && bad.stderr.contains("401"), "{}", bad.stderr);
    assert!(!bad.stderr.contains("not-the-token-42") && !bad.stdout.contains("not-the-token-42"));

    let none = pgconverge_with(&["plan"], &dir, &[("DIVIO_TOKEN", ""), ("NETRC_PATH", "/nonexistent")]);
    assert_eq!(none.code, 1);
    assert!(none.stderr.contains("no Divio API token") && none.stderr.contains("DIVIO_TOKEN"), "{}", none.stderr);

    let netrc = dir.join("netrc");
    std::fs::write(&netrc, "machine 127.0.0.1 login me password tok-s3cret\n").expect("netrc");
    let from_netrc =
        pgconverge_with(&["plan"], &dir, &[("DIVIO_TOKEN", ""), ("NETRC_PATH", netrc.to_str().expect("utf-8"))]);
    assert_eq!(from_netrc.code, 0, "{}{}", from_netrc.stdout, from_netrc.stderr);
}

#[test]
fn listings_are_followed_page_by_page() {
    let mut world = World::shop(&["test", "live"]);
    world.page_size = 1;
    let live = world.env_uuid("live");
    for prefix in ["A1", "A2", "A3", "A4"] {
        world.instance(&live, prefix, divio_emulator::PG15, "DETACHED");
    }
    world.instance(&live, "GONE", divio_emulator::PG15, "REMOVED");
    let (shared, dir) = start(world, "divio-pages", "", "");
    let show = run(&dir, &["show", "--format", "json", "--env", "live"]);
    assert_eq!(show.code, 0, "{}{}", show.stdout, show.stderr);
    let live: serde_json::Value = serde_json::from_str(&show.stdout).expect("json");
    let prefixes: Vec<&str> = live["environments"]["live"]["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| s["prefix"].as_str().expect("prefix"))
        .collect();
    assert_eq!(prefixes, ["DEFAULT", "A1", "A2", "A3", "A4"], "every page, not the storage, not the removed");
    assert!(lock(&shared).log.iter().filter(|l| l.contains("service-instances")).count() >= 7);
}

#[test]
fn a_crash_after_any_action_is_finished_by_the_next_apply_without_losing_a_write() {
    // Records in a file under root, the next apply in the same folder; then records in a
    // state database, the next apply on a fresh runner that shares only the database.
    let base = scratch("divio-crash");
    let (_state_server, dsn) = common::state_database(&base);
    for in_database in [false, true] {
        for n in 1..=10 {
            let name = format!("divio-crash/{}-{n}", if in_database { "db" } else { "file" });
            let (shared, dir) = start(World::shop(&["live"]), &name, "", "");
            only_live(&dir);
            let next = if in_database {
                let config = dir.join("pgconverge.yaml");
                let text = std::fs::read_to_string(&config).expect("config")
                    + "state:\n  postgres:\n    dsn_env: PGCONVERGE_STATE_DSN\n";
                std::fs::write(&config, &text).expect("config");
                let next = base.join(format!("next-{n}"));
                std::fs::create_dir_all(&next).expect("next runner");
                std::fs::write(next.join("pgconverge.yaml"), &text).expect("config");
                next
            } else {
                dir.to_path_buf()
            };
            let failpoint = format!("after:{n}=crash");
            let vars = [("DIVIO_TOKEN", "tok-s3cret"), ("NETRC_PATH", "/nonexistent"), ("PGCONVERGE_STATE_DSN", &dsn)];
            let crashed = pgconverge_with(
                &["apply", "--auto-approve"],
                &dir,
                &[vars[0], vars[1], vars[2], ("PGCONVERGE_FAILPOINTS", &failpoint)],
            );
            let what = format!("{failpoint}, records in the database: {in_database}");
            assert_ne!(crashed.code, 0, "{what}: {}{}", crashed.stdout, crashed.stderr);
            let again = pgconverge_with(&["apply", "--auto-approve"], &next, &vars);
            assert_eq!(again.code, 0, "{what}: {}{}", again.stdout, again.stderr);
            assert_upgraded(&shared, "live");
            let backups = lock(&shared).log.iter().filter(|l| *l == "POST /apps/v3/backups/").count();
            assert_eq!(backups, 1, "{what}: a recorded copy is not made again");
            assert!(!dir.join("maintenance").exists(), "{what}: the fence is lifted in the end");
        }
    }
}

#[test]
fn a_crash_between_an_action_and_its_record_is_finished_safely_by_the_next_apply() {
    for n in 1..=10 {
        let (shared, dir) = start(World::shop(&["live"]), &format!("divio-acted-{n}"), "", "");
        only_live(&dir);
        let failpoint = format!("acted:{n}=crash");
        let vars = [("DIVIO_TOKEN", "tok-s3cret"), ("NETRC_PATH", "/nonexistent")];
        let crashed = pgconverge_with(
            &["apply", "--auto-approve"],
            &dir,
            &[vars[0], vars[1], ("PGCONVERGE_FAILPOINTS", &failpoint)],
        );
        assert_ne!(crashed.code, 0, "{failpoint}: {}{}", crashed.stdout, crashed.stderr);
        let again = run(&dir, &["apply", "--auto-approve"]);
        assert_eq!(again.code, 0, "{failpoint}: {}{}", again.stdout, again.stderr);
        assert_upgraded(&shared, "live");
        // A copy whose making was not recorded is never trusted: it is made again.
        let backups = lock(&shared).log.iter().filter(|l| *l == "POST /apps/v3/backups/").count();
        assert!((1..=2).contains(&backups), "{failpoint}: {backups} backups");
        if n == 4 {
            assert_eq!(backups, 2, "{failpoint}: the streamed copy was not recorded, so it is made again");
        }
        assert!(!dir.join("maintenance").exists(), "{failpoint}: the fence is lifted in the end");
    }
}

#[test]
fn environments_are_observed_a_few_at_a_time() {
    let envs = ["e1", "e2", "e3", "e4", "e5", "e6", "e7", "e8"];
    let mut world = World::shop(&envs);
    world.delay = std::time::Duration::from_millis(50);
    let (shared, base) = serve(world);
    let dir = scratch("divio-concurrency");
    let declared: String = envs.iter().map(|e| format!("  {e}: {{postgres: {{DEFAULT: 15}}}}\n")).collect();
    let config =
        format!("version: 1\nprovider:\n  divio: {{application: shop, zone: '{base}'}}\nenvironments:\n{declared}");
    std::fs::write(dir.join("pgconverge.yaml"), config).expect("config");
    let plan = run(&dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(plan.code, 0, "nothing to do: {}{}", plan.stdout, plan.stderr);
    let most = lock(&shared).max_in_flight;
    assert!((2..=4).contains(&most), "requests overlap, at most 4 at once: {most}");
}

#[test]
fn an_operation_that_never_finishes_fails_after_wait_minutes_with_a_clear_error() {
    let mut world = World::shop(&["live"]);
    world.polls = u32::MAX;
    let (_shared, dir) = start(world, "divio-timeout", "    wait_minutes: 0.005\n", "");
    only_live(&dir);
    let apply = run(&dir, &["apply", "--auto-approve"]);
    assert_eq!(apply.code, 1, "{}{}", apply.stdout, apply.stderr);
    assert!(
        apply.stderr.contains("gave up waiting for the backup of DEFAULT")
            && apply.stderr.contains("(wait_minutes): still WORKING"),
        "{}",
        apply.stderr
    );
}

/// The runbook for test and live in one apply, on a platform set up by `unkind`: both
/// converge, each environment has exactly one instance, backup, restore and deployment
/// created, no committed write is lost, and a plan afterwards has nothing to do. `poll`
/// replaces the config's `poll_seconds`.
fn converges_in_one_apply_creating_each_thing_once(
    name: &str,
    poll: Option<&str>,
    unkind: impl FnOnce(&mut World),
) -> (Run, Shared) {
    let mut world = World::shop(&["test", "live"]);
    unkind(&mut world);
    let (shared, dir) = start(world, name, "", "");
    if let Some(poll) = poll {
        let config = dir.join("pgconverge.yaml");
        let text = std::fs::read_to_string(&config).expect("config");
        std::fs::write(&config, text.replace("poll_seconds: 0.01", &format!("poll_seconds: {poll}"))).expect("config");
    }
    let apply = run(&dir, &["apply", "--auto-approve"]);
    assert_eq!(apply.code, 0, "{}{}", apply.stdout, apply.stderr);
    assert!(apply.stdout.contains("Apply complete: 22 actions"), "{}", apply.stdout);
    for env in ["test", "live"] {
        assert_upgraded(&shared, env);
        let [instances, backups, restores, deployments] = lock(&shared).creates(env);
        assert_eq!((instances, backups, restores, deployments), (1, 1, 1, 1), "{env}: created once each");
    }
    let again = run(&dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(again.code, 0, "converged: {}{}", again.stdout, again.stderr);
    (apply, shared)
}

/// Also a measurement: `PGCONVERGE_EMULATED_PROVISIONING=6 PGCONVERGE_EMULATED_POLL=3 cargo
/// test --test divio provisioning_that_takes_time -- --nocapture` prints how long the
/// runbook takes with provisioning that long (seconds) and that poll interval.
#[test]
fn provisioning_that_takes_time_is_waited_for_and_said() {
    let knob = |name: &str| std::env::var(name).ok().filter(|v| v.parse::<f64>().is_ok());
    let provisioning: f64 = knob("PGCONVERGE_EMULATED_PROVISIONING").map_or(2.5, |v| v.parse().unwrap_or(2.5));
    let poll = knob("PGCONVERGE_EMULATED_POLL");
    let started = std::time::Instant::now();
    let (apply, _) = converges_in_one_apply_creating_each_thing_once("divio-slow", poll.as_deref(), |w| {
        w.provisioning = std::time::Duration::from_secs_f64(provisioning);
        (w.polls, w.job_time) = (1, std::time::Duration::from_millis(500));
    });
    eprintln!(
        "the runbook for two environments with provisioning at {provisioning} s, poll_seconds {}: {:.1} s",
        poll.as_deref().unwrap_or("0.01"),
        started.elapsed().as_secs_f64()
    );
    assert!(apply.stderr.contains("waiting for NEW to finish provisioning: PROVISIONING for"), "{}", apply.stderr);
    let provision = apply.stderr.lines().find(|l| l.contains("provision +1 … done")).expect("provision line");
    let seconds: f64 = provision
        .split("done (")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{provision}"));
    assert!(seconds >= provisioning, "provision is done when the platform says so: {provision}");
}

#[test]
fn answers_lost_after_the_platform_acted_create_nothing_twice() {
    for (name, lose) in [
        ("divio-dropped", Lose::Drop),
        ("divio-502", Lose::BadGateway),
        ("divio-502-unacted", Lose::BadGatewayBeforeActing),
    ] {
        let (apply, shared) = converges_in_one_apply_creating_each_thing_once(name, None, |w| w.lose = Some(lose));
        let lost = lock(&shared).answers_lost;
        // Per environment: add, provision, backup, restore, three instance changes, deploy, delete.
        assert!(lost >= 18, "{lose:?}: the first answer to every change was lost: {lost}");
        assert!(apply.stderr.contains("looking for the backup of DEFAULT before asking again"), "{}", apply.stderr);
    }
}

#[test]
fn provisioning_that_outlasts_wait_minutes_is_named_and_the_next_apply_waits_for_it_without_asking_again() {
    let mut world = World::shop(&["live"]);
    world.provisioning = std::time::Duration::from_secs(4);
    let (shared, dir) = start(world, "divio-slow-timeout", "    wait_minutes: 0.01\n", "");
    only_live(&dir);
    let first = run(&dir, &["apply", "--auto-approve"]);
    assert_eq!(first.code, 1, "{}{}", first.stdout, first.stderr);
    assert!(
        first.stderr.contains("action 2 (provision +1) failed: gave up waiting for NEW (")
            && first.stderr.contains("in live to finish provisioning after")
            && first.stderr.contains("(wait_minutes): still PROVISIONING"),
        "{}",
        first.stderr
    );
    let config = dir.join("pgconverge.yaml");
    let text = std::fs::read_to_string(&config).expect("config").replace("wait_minutes: 0.01", "wait_minutes: 1");
    std::fs::write(&config, text).expect("config");
    let second = run(&dir, &["apply", "--auto-approve"]);
    assert_eq!(second.code, 0, "{}{}", second.stdout, second.stderr);
    assert!(second.stderr.contains("provision"), "the plan finishes the provisioning: {}", second.stderr);
    assert_upgraded(&shared, "live");
    let w = lock(&shared);
    assert_eq!(w.log.iter().filter(|l| l.ends_with("/provision/")).count(), 1, "provision was asked for once");
    assert_eq!(w.creates("live"), [1, 1, 1, 1]);
}

#[test]
fn a_saved_plan_is_shown_and_run_as_it_is_and_refused_under_another_config_or_with_env() {
    let (shared, dir) = start(World::shop(&["test", "live"]), "divio-saved-plan", "", "");
    let plan = run(&dir, &["plan", "--env", "test", "--out", "plan.json"]);
    assert_eq!(plan.code, 0, "{}{}", plan.stdout, plan.stderr);

    let narrowed = run(&dir, &["apply", "--auto-approve", "--env", "live", "plan.json"]);
    assert_eq!(narrowed.code, 1, "{}{}", narrowed.stdout, narrowed.stderr);
    assert!(narrowed.stderr.contains("--env cannot narrow a saved plan"), "{}", narrowed.stderr);

    let config = dir.join("pgconverge.yaml");
    let original = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, original.replace("poll_seconds: 0.01", "poll_seconds: 0.02")).expect("config");
    let other = run(&dir, &["apply", "--auto-approve", "plan.json"]);
    assert_eq!(other.code, 1, "{}{}", other.stdout, other.stderr);
    assert!(other.stderr.contains("the plan was made for another config"), "{}", other.stderr);
    assert!(lock(&shared).log.iter().all(|l| l.starts_with("GET")), "nothing was asked of the API but to look");

    std::fs::write(&config, original).expect("config");
    let apply = run(&dir, &["apply", "--auto-approve", "plan.json"]);
    assert_eq!(apply.code, 0, "{}{}", apply.stdout, apply.stderr);
    let shown = (apply.stdout.contains("Environment test"), apply.stdout.contains("Environment live"));
    assert_eq!(shown, (true, false), "shows the saved plan: {}", apply.stdout);
    assert!(apply.stdout.contains("Apply complete: 11 actions"), "runs the saved plan: {}", apply.stdout);
    assert_upgraded(&shared, "test");
    assert_eq!(lock(&shared).creates("live"), [0, 0, 0, 0], "live was not in the saved plan");
}

/// An apply running in the background, killed if the test ends first (an assertion
/// failed), so that nothing outlives the test.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `apply --auto-approve` in `dir` as CI job 4242 with `vars`, and returns once its
/// progress shows `seen` (it then holds the lock), with what reads the rest of its stderr.
fn apply_until(dir: &Path, vars: &[(&str, &str)], seen: &'static str) -> (Running, std::thread::JoinHandle<String>) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgconverge"))
        .args(["apply", "--auto-approve"])
        .current_dir(dir)
        .envs(vars.iter().copied())
        .env("GITHUB_RUN_ID", "4242")
        .env_remove("GITHUB_SERVER_URL")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("apply");
    let mut stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let (mut all, mut buf) = (String::new(), [0u8; 4096]);
        while let Ok(n) = std::io::Read::read(&mut stderr, &mut buf) {
            if n == 0 {
                break;
            }
            all.push_str(&String::from_utf8_lossy(&buf[..n]));
            if all.contains(seen) {
                let _ = tx.send(());
            }
        }
        all
    });
    if rx.recv_timeout(std::time::Duration::from_secs(60)).is_err() {
        let _ = child.kill();
        panic!("apply never showed {seen:?}: {}", reader.join().unwrap_or_default());
    }
    (Running(child), reader)
}

/// Also a measurement: prints how long the second apply took to be refused, and to take
/// over once the first was killed.
#[test]
fn a_second_apply_is_refused_naming_the_first_and_takes_over_at_once_when_it_is_killed() {
    let mut world = World::shop(&["live"]);
    world.provisioning = std::time::Duration::from_secs(30);
    let (shared, dir) = start(world, "divio-two-runners", "", "");
    only_live(&dir);
    // Once it waits for the provisioning, it holds the lock.
    let (mut first, _) =
        apply_until(&dir, &[("DIVIO_TOKEN", "tok-s3cret"), ("NETRC_PATH", "/nonexistent")], "provision +1");

    let t = std::time::Instant::now();
    let second = run(&dir, &["apply", "--auto-approve"]);
    let refused_in = t.elapsed();
    assert_eq!(second.code, 1, "{}{}", second.stdout, second.stderr);
    let pid = format!("another apply is running: pid {}, host ", first.0.id());
    assert!(second.stderr.contains(&pid), "{}", second.stderr);
    assert!(second.stderr.contains("job GitHub Actions run 4242"), "{}", second.stderr);

    first.0.kill().expect("SIGKILL the first apply");
    first.0.wait().expect("reap");
    lock(&shared).provision_now();
    let t = std::time::Instant::now();
    let third = run(&dir, &["apply", "--auto-approve"]);
    let took_over_in = t.elapsed();
    assert_eq!(third.code, 0, "{}{}", third.stdout, third.stderr);
    assert_upgraded(&shared, "live");
    assert_eq!(lock(&shared).creates("live"), [1, 1, 1, 1], "nothing made twice");
    eprintln!(
        "a second apply was refused in {:.3} s; after SIGKILL, the next apply finished the upgrade in {:.2} s",
        refused_in.as_secs_f64(),
        took_over_in.as_secs_f64()
    );
}

/// Also a measurement: prints how long the second runner took to be refused, and to finish
/// the upgrade once the first was killed.
#[test]
fn runners_that_share_only_a_state_database_apply_one_at_a_time_and_carry_on_after_a_kill() {
    let base = scratch("divio-state-db");
    let (_state_server, state_dsn) = common::state_database(&base);
    let mut world = World::shop(&["live"]);
    world.deployment_time = std::time::Duration::from_secs(30);
    let (shared, first_dir) = start(world, "divio-state-db/runner-1", "", "");
    only_live(&first_dir);
    let config = std::fs::read_to_string(first_dir.join("pgconverge.yaml")).expect("config")
        + "state:\n  postgres:\n    dsn_env: PGCONVERGE_STATE_DSN\n";
    let runner = |n: u32| {
        let dir = base.join(format!("runner-{n}"));
        std::fs::create_dir_all(&dir).expect("runner dir");
        std::fs::write(dir.join("pgconverge.yaml"), &config).expect("config");
        dir
    };
    let (first_dir, second_dir, third_dir) = (runner(1), runner(2), runner(3));
    let vars =
        [("DIVIO_TOKEN", "tok-s3cret"), ("NETRC_PATH", "/nonexistent"), ("PGCONVERGE_STATE_DSN", state_dsn.as_str())];
    let run_in = |dir: &Path, args: &[&str]| pgconverge_with(args, dir, &vars);
    let psql = |sql: &str| common::psql(&state_dsn, sql);

    let plan = run_in(&third_dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(plan.code, 2, "{}{}", plan.stdout, plan.stderr);
    assert_eq!(psql("SELECT to_regnamespace('pgconverge') IS NULL").as_deref(), Ok("t"), "plan wrote nothing");

    let (mut first, reader) = apply_until(&first_dir, &vars, "] deploy");

    let t = std::time::Instant::now();
    let second = run_in(&second_dir, &["apply", "--auto-approve"]);
    let refused_in = t.elapsed();
    assert_eq!(second.code, 1, "{}{}", second.stdout, second.stderr);
    assert!(
        second.stderr.contains(&format!("another apply is running: pid {}, host ", first.0.id()))
            && second.stderr.contains("job GitHub Actions run 4242")
            && second.stderr.contains("the state database's lock"),
        "{}",
        second.stderr
    );

    first.0.kill().expect("SIGKILL the first runner");
    first.0.wait().expect("reap");
    let first_said = reader.join().unwrap_or_default();
    {
        let mut w = lock(&shared);
        w.deployment_time = std::time::Duration::ZERO;
        w.end_deployments_now();
    }
    let t = std::time::Instant::now();
    let second = run_in(&second_dir, &["apply", "--auto-approve"]);
    let took_over_in = t.elapsed();
    assert_eq!(second.code, 0, "{}{}", second.stdout, second.stderr);
    assert!(!second.stderr.contains("] backup"), "the copy the first made is not made again: {}", second.stderr);
    assert_upgraded(&shared, "live");
    assert_eq!(lock(&shared).creates("live")[..3], [1, 1, 1], "one instance, backup and restore in all");
    assert!(!first_dir.join("maintenance").exists(), "the fence the first runner set is lifted by the second");

    let third = run_in(&third_dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(third.code, 0, "a fresh runner sees nothing to do: {}{}", third.stdout, third.stderr);
    for out in [&first_said, &second.stdout, &second.stderr, &third.stdout, &third.stderr] {
        assert!(!out.contains("st-pa55word"), "the state database's password was shown: {out}");
    }
    for dir in [&second_dir, &third_dir] {
        assert!(!dir.join(".pgconverge").join("divio-shop.json").exists(), "records live in the database");
    }
    eprintln!(
        "a second runner was refused in {:.3} s; after SIGKILL of the first, it finished the upgrade in {:.2} s",
        refused_in.as_secs_f64(),
        took_over_in.as_secs_f64()
    );

    // A schema newer than this pgconverge knows is refused, not written to.
    psql("UPDATE pgconverge.meta SET version = 2").expect("newer schema");
    let refused = run_in(&third_dir, &["plan"]);
    assert_eq!(refused.code, 1, "{}{}", refused.stdout, refused.stderr);
    assert!(refused.stderr.contains("schema is version 2, newer than this pgconverge knows"), "{}", refused.stderr);
}

#[test]
fn applies_racing_for_a_stale_lock_file_never_both_win() {
    for round in 0..5 {
        let mut world = World::shop(&["live"]);
        world.provisioning = std::time::Duration::from_secs(2);
        let (shared, dir) = start(world, &format!("divio-race-{round}"), "", "");
        only_live(&dir);
        // What a killed apply of an older pgconverge left: a pid that no longer runs.
        std::fs::create_dir_all(dir.join(".pgconverge")).expect("root");
        std::fs::write(dir.join(".pgconverge/lock"), "4194305 0\n").expect("stale lock");
        let racers: Vec<_> = (0..4)
            .map(|_| {
                std::process::Command::new(env!("CARGO_BIN_EXE_pgconverge"))
                    .args(["apply", "--auto-approve"])
                    .current_dir(&dir)
                    .envs([("DIVIO_TOKEN", "tok-s3cret"), ("NETRC_PATH", "/nonexistent"), ("NO_COLOR", "1")])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("apply")
            })
            .collect();
        let outs: Vec<_> = racers.into_iter().map(|r| r.wait_with_output().expect("wait")).collect();
        let won: Vec<_> = outs.iter().filter(|o| o.status.success()).collect();
        let refused = outs
            .iter()
            .filter(|o| {
                o.status.code() == Some(1) && String::from_utf8_lossy(&o.stderr).contains("another apply is running")
            })
            .count();
        let said: Vec<String> = outs.iter().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).collect();
        assert_eq!((won.len(), refused), (1, 3), "round {round}: {said:?}");
        assert_upgraded(&shared, "live");
        assert_eq!(lock(&shared).creates("live"), [1, 1, 1, 1], "round {round}");
    }
}
