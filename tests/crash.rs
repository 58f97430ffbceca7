//! Crash anywhere, run apply again, lose nothing. Every failpoint of the runbook upgrade
//! (before and after each action, and inside the long ones; the names come from
//! `pgconverge::failpoint`) is tripped in turn, once as a crash (the process dies on the
//! spot) and once as an error, and those of a logical upgrade and of a pg_upgrade as a
//! crash; then apply runs again and must converge with every row present and nothing left
//! behind.

mod common;

use std::path::Path;

use common::{ensure_postgres, env_file, pgconverge_with, psql, scratch, Servers};
use pgconverge::config::{Strategy, Transfer};
use pgconverge::failpoint;

const ROWS: u32 = 2000;

/// What a crash suite run upgrades: its strategy, and how many actions its plan has
/// (read off `plan`, never assumed).
#[derive(Clone, Copy)]
struct Upgrade {
    strategy: Strategy,
    transfer: Transfer,
    /// With `provider.local.pooler: pgbouncer`.
    pooler: bool,
    actions: usize,
    /// The numbers of the plan's fence and deploy: where writes are blocked.
    outage: (usize, usize),
}

impl Upgrade {
    fn of(strategy: Strategy) -> Upgrade {
        Upgrade::with(strategy, Transfer::Auto)
    }

    fn with(strategy: Strategy, transfer: Transfer) -> Upgrade {
        Upgrade::planned(Upgrade { strategy, transfer, pooler: false, actions: 0, outage: (0, 0) })
    }

    /// A logical upgrade behind a pooler.
    fn pooled() -> Upgrade {
        common::ensure_pgbouncer();
        Upgrade::planned(Upgrade {
            strategy: Strategy::Logical,
            transfer: Transfer::Auto,
            pooler: true,
            actions: 0,
            outage: (0, 0),
        })
    }

    fn planned(upgrade: Upgrade) -> Upgrade {
        ensure_postgres();
        let dir = scratch("crash_plan");
        write_config(&dir, 17, false, upgrade);
        std::fs::write(dir.join("live.json"), LIVE_ON_15).expect("snapshot");
        let plan = common::pgconverge(&["plan", "--live", "live.json", "--format", "json"], &dir);
        assert_eq!(plan.code, 0, "{}{}", plan.stdout, plan.stderr);
        let plan: serde_json::Value = serde_json::from_str(&plan.stdout).expect("plan json");
        let actions = plan["environments"][0]["actions"].as_array().expect("actions");
        assert!(actions.len() >= 10, "a whole upgrade: {plan}");
        let number = |op: &str| 1 + actions.iter().position(|a| a["op"] == op).expect("the op is planned");
        Upgrade { actions: actions.len(), outage: (number("fence"), number("deploy")), ..upgrade }
    }

    /// Every failpoint from the fence to the deploy, where a pooler holds the
    /// application's queries: around and inside those actions, and between each and
    /// its record.
    fn inside_the_pause(self) -> Vec<String> {
        let (fence, deploy) = self.outage;
        let mut names: Vec<String> = (fence..=deploy)
            .flat_map(|n| [format!("before:{n}"), format!("acted:{n}"), format!("after:{n}")])
            .collect();
        let inside = failpoint::inside(self.strategy);
        let paused = ["fence:", "catch_up:", "deploy:"];
        names.extend(
            failpoint::POOLER
                .iter()
                .chain(&inside)
                .filter(|n| paused.iter().any(|p| n.starts_with(p)))
                .map(|n| n.to_string()),
        );
        names
    }

    /// Every failpoint of the upgrade: around each action, and inside the actions.
    fn failpoints(self) -> Vec<String> {
        let mut names = failpoint::around(self.actions);
        let mut inside = failpoint::inside(self.strategy);
        if self.transfer == Transfer::Link {
            inside.extend(failpoint::LINK);
        }
        names.extend(inside.iter().map(|n| n.to_string()));
        names
    }

    /// Between each action's work and the ledger's record of it: the next apply must not
    /// trust what the ledger does not vouch for, and must cope with what the action left.
    fn acted(self) -> Vec<String> {
        failpoint::acted(self.actions)
    }

    /// Both: every failpoint and every place between an action and its record.
    fn every(self) -> Vec<String> {
        let mut names = self.failpoints();
        names.extend(self.acted());
        names
    }
}

/// One service on PostgreSQL 15, as the crash suite's first apply leaves it.
const LIVE_ON_15: &str = r#"{"format_version": 1, "environments": {"test": {"services": [
  {"id": "pg15-00000001", "version": 15, "prefix": "DEFAULT", "status": "attached"}]}}}"#;

fn write_config(dir: &Path, major: u32, state: bool, upgrade: Upgrade) {
    let mut state = if state { "state:\n  postgres:\n    dsn_env: PGCONVERGE_STATE_DSN\n" } else { "" }.to_owned();
    if upgrade.pooler {
        state += "provider:\n  local:\n    pooler: pgbouncer\n";
    }
    let (strategy, transfer) = (upgrade.strategy.as_str(), upgrade.transfer.as_str());
    std::fs::write(
        dir.join("pgconverge.yaml"),
        format!(
            "version: 1\n{state}upgrade:\n  strategy: {strategy}\n  transfer: {transfer}\nenvironments:\n  test:\n    postgres:\n      DEFAULT: {major}\n"
        ),
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

/// Trips each of `names` as `mode` during `upgrade`, each in a fresh directory; with `state`, apply's lock
/// and ledger live in that database (its DSN).
fn trip(mode: &str, upgrade: Upgrade, names: &[String], state: Option<&str>) {
    ensure_postgres();
    // Each case is a few programs run one after the other, which leave a core idle much
    // of the time: cases run in parallel, each in its own directory with its own servers.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).min(names.len().max(1));
    let tripped = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for chunk in 0..workers {
            let tripped = &tripped;
            s.spawn(move || {
                for name in names.iter().skip(chunk).step_by(workers) {
                    trip_one(mode, upgrade, name, state);
                    tripped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let tripped = tripped.into_inner();
    assert_eq!(tripped, names.len());
    eprintln!("{mode}: {tripped} failpoints tripped, {} rows checked after each", ROWS);
}

/// Trips `name` once as `mode`, then applies again and checks that nothing was lost.
fn trip_one(mode: &str, upgrade: Upgrade, name: &str, state: Option<&str>) {
    let vars: Vec<(&str, &str)> = state.map(|dsn| ("PGCONVERGE_STATE_DSN", dsn)).into_iter().collect();
    let pgconverge = |args: &[&str], dir: &Path| pgconverge_with(args, dir, &vars);
    let where_ = if state.is_some() { "db" } else { "file" };
    let dir = scratch(&format!("crash_{mode}_{where_}_{}", name.replace(':', "_")));
    let root = dir.join(".pgconverge");
    let _servers = Servers(root.clone());
    write_config(&dir, 15, state.is_some(), upgrade);
    assert_eq!(pgconverge(&["apply", "--auto-approve"], &dir).code, 0);
    let before = env_file(&root.join("test.env"))["DATABASE_URL"].clone();
    let url = before.clone();
    psql(&url, &format!("CREATE TABLE t (id serial PRIMARY KEY, v text); INSERT INTO t (v) SELECT md5(g::text) FROM generate_series(1, {ROWS}) g"))
        .expect("load");
    write_config(&dir, 17, state.is_some(), upgrade);

    let spec = format!("{name}={mode}");
    let mut armed = vars.clone();
    armed.push(("PGCONVERGE_FAILPOINTS", &spec));
    let broken = pgconverge_with(&["apply", "--auto-approve"], &dir, &armed);
    let want = if mode == "crash" { 137 } else { 1 };
    assert_eq!(broken.code, want, "{spec}: {}{}", broken.stdout, broken.stderr);

    // With `link`, the old server's record says whether the crash came after the commit:
    // then it must never serve again; before it, with a link under way, it must be given
    // its files back.
    let (linked, committed) = (recorded(&root, "link_from"), recorded(&root, "consumed_by"));
    let again = pgconverge(&["apply", "--auto-approve"], &dir);
    assert_eq!(again.code, 0, "{spec}: the second apply failed: {}{}", again.stdout, again.stderr);
    if upgrade.transfer == Transfer::Link {
        let undone = again.stderr.contains("undoing a pg_upgrade --link");
        assert!(!(committed && undone), "{spec}: a consumed server was given its files back: {}", again.stderr);
        assert_eq!(undone, linked && !committed, "{spec}: a link nothing started is undone: {}", again.stderr);
    }
    let url = env_file(&root.join("test.env"))["DATABASE_URL"].clone();
    if upgrade.pooler {
        assert_eq!(url, before, "{spec}: the application's DSN changed behind a pooler");
    }
    // Behind a pooler left paused this query would wait, and fail after its timeout.
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

/// A service's record under `root` has `key`: `link_from` (a `link` upgrade is under way
/// into it) or `consumed_by` (its files are another's).
fn recorded(root: &Path, key: &str) -> bool {
    let records = std::fs::read_dir(root.join("state/test")).into_iter().flatten().flatten();
    records.filter_map(|e| std::fs::read_to_string(e.path()).ok()).any(|t| t.contains(&format!("\"{key}\"")))
}

#[test]
fn crash_at_every_failpoint_of_a_linking_pg_upgrade_then_apply_again() {
    let upgrade = Upgrade::with(Strategy::PgUpgrade, Transfer::Link);
    trip("crash", upgrade, &upgrade.every(), None);
}

#[test]
fn crash_at_every_failpoint_then_apply_again() {
    let upgrade = Upgrade::of(Strategy::DumpRestore);
    trip("crash", upgrade, &upgrade.failpoints(), None);
}

#[test]
fn error_at_every_failpoint_then_apply_again() {
    let upgrade = Upgrade::of(Strategy::DumpRestore);
    trip("error", upgrade, &upgrade.failpoints(), None);
}

#[test]
fn crash_between_each_action_and_its_record_then_apply_again() {
    let upgrade = Upgrade::of(Strategy::DumpRestore);
    trip("crash", upgrade, &upgrade.acted(), None);
}

#[test]
fn crash_at_every_failpoint_with_the_ledger_in_a_state_database_then_apply_again() {
    let base = scratch("crash_state_db");
    let (_state_server, dsn) = common::state_database(&base);
    let upgrade = Upgrade::of(Strategy::DumpRestore);
    trip("crash", upgrade, &upgrade.every(), Some(&dsn));
}

#[test]
fn crash_at_every_failpoint_of_a_logical_upgrade_then_apply_again() {
    let upgrade = Upgrade::of(Strategy::Logical);
    trip("crash", upgrade, &upgrade.every(), None);
}

#[test]
fn crash_at_every_failpoint_inside_a_poolers_pause_then_apply_again() {
    let upgrade = Upgrade::pooled();
    let names = upgrade.inside_the_pause();
    assert!(names.len() > 20, "{names:?}");
    trip("crash", upgrade, &names, None);
}

#[test]
fn crash_at_every_failpoint_of_a_pg_upgrade_then_apply_again() {
    let upgrade = Upgrade::of(Strategy::PgUpgrade);
    trip("crash", upgrade, &upgrade.every(), None);
}
