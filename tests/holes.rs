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
