//! `action.yml`, the composite GitHub Action: its inputs, its pgconverge commands (through
//! the CLI parser), and its run step executed by bash as a runner would, with the real
//! binary, its outputs and job summary read back.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::{ensure_postgres, repo, scratch, Servers};
use serde_yaml::Value;

fn action() -> Value {
    let text = std::fs::read_to_string(repo().join("action.yml")).expect("action.yml");
    serde_yaml::from_str(&text).expect("action.yml is YAML")
}

fn steps(action: &Value) -> &Vec<Value> {
    assert_eq!(action["runs"]["using"].as_str(), Some("composite"));
    action["runs"]["steps"].as_sequence().expect("steps")
}

/// The step whose id is `id`.
fn step<'a>(action: &'a Value, id: &str) -> &'a Value {
    steps(action).iter().find(|s| s["id"].as_str() == Some(id)).unwrap_or_else(|| panic!("no step {id}"))
}

#[test]
fn the_action_takes_the_issue_inputs_and_pastes_none_into_a_script() {
    let action = action();
    let inputs = action["inputs"].as_mapping().expect("inputs");
    for name in ["command", "config", "environment", "comment", "version"] {
        let input = inputs.get(name).unwrap_or_else(|| panic!("input {name}"));
        assert!(input["description"].as_str().is_some_and(|d| !d.is_empty()), "{name} is described");
    }
    assert_eq!(inputs["command"]["default"].as_str(), Some("plan"));
    assert_eq!(inputs["comment"]["default"].as_str(), Some("true"));
    for s in steps(&action) {
        // A `${{ … }}` in a script is pasted before bash reads it: a config path or an
        // environment name would run as code. Inputs reach scripts through `env` only.
        if let Some(script) = s["run"].as_str() {
            assert!(!script.contains("${{"), "pasted into a script: {script}");
        }
        if let Some(uses) = s["uses"].as_str() {
            assert!(uses.contains("@v"), "{uses} is pinned to a major");
        }
    }
    let comment =
        steps(&action).iter().find(|s| s["uses"].as_str().is_some_and(|u| u.starts_with("actions/github-script")));
    let when = comment.expect("a comment step")["if"].as_str().expect("if");
    for needed in ["inputs.comment == 'true'", "github.event_name == 'pull_request'", "inputs.command == 'plan'"] {
        assert!(when.contains(needed), "{when}");
    }
    let install = steps(&action).iter().find(|s| s["run"].as_str().is_some_and(|r| r.contains("cargo install")));
    let install = install.expect("an install step");
    assert_eq!(install["if"].as_str(), Some("steps.cache.outputs.cache-hit != 'true'"));
    assert!(step(&action, "cache")["uses"].as_str().is_some_and(|u| u.starts_with("actions/cache@")));
}

#[test]
fn the_action_runs_commands_pgconverge_accepts() {
    use clap::Parser;
    let action = action();
    let script = step(&action, "run")["run"].as_str().expect("a run script");
    // The pgconverge commands, their shell words with the variables given sample values.
    let commands: Vec<Vec<String>> = script
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("pgconverge "))
        .map(|l| {
            l.split_whitespace()
                .take_while(|w| !w.contains('>'))
                .flat_map(|w| match w {
                    "\"$PGCONVERGE_CONFIG\"" => vec!["pgconverge.yaml".to_owned()],
                    "\"${only[@]}\"" => vec!["--env".to_owned(), "live".to_owned()],
                    w => vec![w.to_owned()],
                })
                .collect()
        })
        .collect();
    assert_eq!(commands.len(), 2, "{commands:?}");
    let has = |c: &Vec<String>, words: &[&str]| words.iter().all(|w| c.iter().any(|x| x == w));
    assert!(has(&commands[0], &["plan", "markdown", "--detailed-exitcode", "-f", "--env"]), "{commands:?}");
    assert!(has(&commands[1], &["apply", "--auto-approve", "json", "-f", "--env"]), "{commands:?}");
    for c in &commands {
        assert!(c.iter().all(|w| !w.contains('$')), "every variable was given a value: {c:?}");
        if let Err(e) = pgconverge::cli::Cli::try_parse_from(c) {
            panic!("`{}` is refused: {e}", c.join(" "));
        }
    }
}

/// Runs the action's `run` step with bash as a runner does: the inputs in its `env`, the
/// built pgconverge first on PATH. Returns bash's exit code, the step's outputs and the
/// job summary it wrote.
fn run_step(dir: &Path, command: &str, config: &str, environments: &str) -> (i32, BTreeMap<String, String>, String) {
    let action = action();
    let script = step(&action, "run")["run"].as_str().expect("script");
    let (output, summary) = (dir.join("github_output"), dir.join("step_summary"));
    let _ = std::fs::remove_file(&output);
    let _ = std::fs::remove_file(&summary);
    let bin = Path::new(env!("CARGO_BIN_EXE_pgconverge")).parent().expect("bin dir");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("bash")
        .args(["-e", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .env("COMMAND", command)
        .env("PGCONVERGE_CONFIG", config)
        .env("ENVIRONMENTS", environments)
        .env("RUNNER_TEMP", dir)
        .env("GITHUB_OUTPUT", &output)
        .env("GITHUB_STEP_SUMMARY", &summary)
        .env("NO_COLOR", "1")
        .env(common::THROWAWAY.0, common::THROWAWAY.1)
        .env_remove("RUST_LOG")
        .output()
        .expect("run bash");
    let outputs = std::fs::read_to_string(&output)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let code = out.status.code().unwrap_or(-1);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    (code, outputs, std::fs::read_to_string(&summary).unwrap_or_default())
}

/// The result document the step's apply wrote.
fn result(outputs: &BTreeMap<String, String>) -> serde_json::Value {
    let text = std::fs::read_to_string(&outputs["result"]).expect("the result file");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The job summary of apply is jq's work (GitHub's runners have it); without it, none.
fn has_jq() -> bool {
    Command::new("sh").args(["-c", "command -v jq"]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn the_action_step_plans_and_applies_and_reports_each_way_it_can_end() {
    let dir = scratch("action");
    // A local config whose plan adds a server (exit 2): planned, never applied here.
    let config = "version: 1\nenvironments:\n  test:\n    postgres:\n      DEFAULT: 17\n  \
                  live:\n    postgres:\n      DEFAULT: 17\n";
    std::fs::write(dir.join("pg config.yaml"), config).expect("config");

    let (code, outputs, summary) = run_step(&dir, "plan", "pg config.yaml", "live, test");
    assert_eq!((code, outputs["exitcode"].as_str()), (0, "2"), "changes pending is no failure: {outputs:?}");
    let plan = std::fs::read_to_string(&outputs["plan"]).expect("the plan file");
    assert!(plan.contains("add") && plan.contains("live") && plan.contains("test"), "{plan}");
    assert_eq!(summary, plan, "the plan is the job summary");

    let (code, outputs, _) = run_step(&dir, "plan", "pg config.yaml", "live");
    assert_eq!((code, outputs["exitcode"].as_str()), (0, "2"));
    let plan = std::fs::read_to_string(&outputs["plan"]).expect("the plan file");
    assert!(plan.contains("live") && !plan.contains("`test`") && !plan.contains("### test"), "{plan}");

    // A bad config: the error becomes the comment, exit code 1 for the failing step.
    std::fs::write(dir.join("bad.yaml"), "version: 1\nenvironments:\n  live: {postgres: {DEFAULT: x}}\n").expect("bad");
    let (code, outputs, summary) = run_step(&dir, "plan", "bad.yaml", "");
    assert_eq!((code, outputs["exitcode"].as_str()), (0, "1"), "{outputs:?}");
    assert!(summary.starts_with("### pgconverge plan failed") && summary.contains("bad.yaml:3:"), "{summary}");

    // apply: the result document, summarised per environment (when jq is there).
    let (code, outputs, summary) = run_step(&dir, "apply", "bad.yaml", "");
    assert_eq!((code, outputs["exitcode"].as_str()), (0, "1"), "{outputs:?}");
    assert_eq!(result(&outputs)["result"], "refused");
    if has_jq() {
        assert!(summary.starts_with("### pgconverge apply: refused"), "{summary}");
    }

    let (code, outputs, _) = run_step(&dir, "destroy", "bad.yaml", "");
    assert_eq!((code, outputs["exitcode"].as_str()), (0, "1"), "an unknown command fails the job");
    assert!(!dir.join(".pgconverge/state").exists(), "nothing was applied");
}

#[test]
fn the_action_step_applies_and_summarises_each_environment() {
    ensure_postgres();
    let dir = scratch("action-apply");
    let _servers = Servers(dir.join(".pgconverge"));
    std::fs::write(
        dir.join("pgconverge.yaml"),
        "version: 1\nenvironments:\n  test:\n    postgres:\n      DEFAULT: 15\n",
    )
    .expect("config");
    let (code, outputs, summary) = run_step(&dir, "apply", "pgconverge.yaml", "");
    assert_eq!((code, outputs["exitcode"].as_str()), (0, "0"), "{outputs:?} {summary}");
    assert_eq!(result(&outputs)["result"], "converged");
    if has_jq() {
        assert!(summary.starts_with("### pgconverge apply: converged\n\n- test: converged in "), "{summary}");
    }
    let (code, outputs, _) = run_step(&dir, "plan", "pgconverge.yaml", "");
    assert_eq!((code, outputs["exitcode"].as_str()), (0, "0"), "converged: nothing to change");
}
