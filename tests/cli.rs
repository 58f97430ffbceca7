//! The command line's contract: exit codes, errors that point at file:line:col, and
//! hostile input that fails fast without a panic.

mod common;

use common::{pgconverge, pgconverge_with, repo, scratch};

const RUNBOOK_LIVE: &str = r#"{"format_version":1,"environments":{"live":{"services":[
  {"id":"svc-1","version":16,"prefix":"DEFAULT","status":"attached"}]}}}"#;
const CONVERGED_LIVE: &str = r#"{"format_version":1,"environments":{"live":{"services":[
  {"id":"svc-1","version":17,"prefix":"DEFAULT","status":"attached"}]}}}"#;
const CONFIG: &str = "version: 1\nenvironments:\n  live:\n    postgres:\n      DEFAULT: 17\n";

#[test]
fn every_example_validates() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("examples")).expect("examples") {
        let path = entry.expect("entry").path();
        // The CI examples are workflows, not pgconverge configs (tested below).
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml")
            && !name.contains("-ci")
            && !name.contains("actions")
        {
            let run = pgconverge(&["validate", "-f", path.to_str().expect("utf-8")], &repo());
            assert_eq!(run.code, 0, "{}: {}", path.display(), run.stderr);
            seen += 1;
        }
    }
    assert!(seen >= 2, "only {seen} examples found");
}

#[test]
fn committed_schema_is_current() {
    let run = pgconverge(&["schema"], &repo());
    assert_eq!(run.code, 0);
    let committed = std::fs::read_to_string(repo().join("schemas/pgconverge.schema.json")).expect("schema");
    assert!(
        committed == run.stdout,
        "schemas/pgconverge.schema.json is stale: run `cargo run -q -- schema > schemas/pgconverge.schema.json`"
    );
}

/// Bad configs: exit 1, `file:line:col`, the key path, a hint, nothing else.
#[test]
fn config_errors_point_at_the_key() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "local_dev follows an unknown environment",
            "version: 1\nenvironments:\n  live: {postgres: {DEFAULT: 17}}\nlocal_dev:\n  compose_file: c.yml\n  service: db\n  follows: prod\n",
            "c.yaml:7:3: local_dev.follows: `prod` is not a declared environment",
        ),
        (
            "local_dev follows a prefix the environment lacks",
            "version: 1\nenvironments:\n  live: {postgres: {DEFAULT: 17}}\nlocal_dev: {compose_file: c.yml, service: db, follows: live, prefix: CACHE}\n",
            "c.yaml:4:62: local_dev.prefix: environment `live` declares no prefix CACHE",
        ),
        (
            "unknown key",
            "version: 1\nenvironments:\n  live:\n    postgres: {DEFAULT: 17}\n    colour: red\n",
            "c.yaml:5:5: environments.live.colour: unknown field `colour`",
        ),
        (
            "duplicate key",
            "version: 1\nenvironments:\n  live:\n    postgres:\n      DEFAULT: 17\n      DEFAULT: 16\n",
            "c.yaml:6:7: environments.live.postgres.DEFAULT: duplicate key",
        ),
        (
            "duplicate environment",
            "version: 1\nenvironments:\n  live: {postgres: {A: 1}}\n  live: {postgres: {A: 2}}\n",
            "c.yaml:4:3: environments.live: duplicate key",
        ),
        (
            "duplicate field",
            "version: 1\nversion: 1\nenvironments: {live: {postgres: {A: 1}}}\n",
            "c.yaml:2:1: version: duplicate field",
        ),
        (
            "wrong type",
            "version: 1\nupgrade:\n  keep_old: sometimes\nenvironments: {live: {postgres: {A: 1}}}\n",
            "c.yaml:3:13: upgrade.keep_old: invalid type",
        ),
        (
            "bad prefix",
            "version: 1\nenvironments:\n  live:\n    postgres:\n      default: 17\n",
            "c.yaml:5:7: environments.live.postgres.default: invalid prefix",
        ),
        (
            "reserved prefix",
            "version: 1\nenvironments:\n  live:\n    postgres:\n      DEFAULT: 17\n      OLD: 16\n",
            "c.yaml:6:7: environments.live.postgres.OLD: prefix OLD is reserved",
        ),
        (
            "reserved joined prefix",
            "version: 1\nenvironments:\n  live:\n    postgres:\n      A: 17\n      NEW_A: 16\n",
            "environments.live.postgres.NEW_A: prefix NEW_A is reserved",
        ),
        (
            "custom temporary prefix",
            "version: 1\nupgrade: {temporary_prefix: NEXT}\nenvironments:\n  live:\n    postgres:\n      NEXT: 17\n",
            "environments.live.postgres.NEXT: prefix NEXT is reserved",
        ),
        (
            "version not a number",
            "version: 1\nenvironments:\n  live:\n    postgres:\n      DEFAULT: latest\n",
            "c.yaml:5:16: environments.live.postgres.DEFAULT: `latest` is not a PostgreSQL major version",
        ),
        (
            "version zero",
            "version: 1\nenvironments:\n  live:\n    postgres:\n      DEFAULT: 0\n",
            "environments.live.postgres.DEFAULT: a PostgreSQL major version must be a positive integer",
        ),
        (
            "negative version",
            "version: 1\nenvironments:\n  live:\n    postgres:\n      DEFAULT: -16\n",
            "major version -16 is negative",
        ),
        (
            "minor version",
            "version: 1\nenvironments:\n  live:\n    postgres:\n      DEFAULT: 16.4\n",
            "is not an integer",
        ),
        (
            "format version",
            "version: 2\nenvironments: {live: {postgres: {A: 1}}}\n",
            "c.yaml:1:1: version: config format version 2 is not supported",
        ),
        ("empty file", "", "c.yaml: the file is empty"),
        ("only comments", "# nothing\n---\n", "c.yaml: the file is empty"),
        ("tab", "version: 1\nenvironments:\n\tlive: {}\n", "c.yaml:3:1: tab character"),
        (
            "rollout names an unknown environment",
            "version: 1\nrollout: [live, prod]\nenvironments: {live: {postgres: {A: 1}}}\n",
            "c.yaml:2:1: rollout.1: `prod` is not a declared environment",
        ),
        (
            "rollout repeats",
            "version: 1\nrollout: [live, live]\nenvironments: {live: {postgres: {A: 1}}}\n",
            "rollout.1: `live` appears twice",
        ),
        ("no environments", "version: 1\nenvironments: {}\n", "environments: no environments are declared"),
        (
            "no services",
            "version: 1\nenvironments:\n  live:\n    postgres: {}\n",
            "c.yaml:4:5: environments.live.postgres: no services are declared",
        ),
        (
            "missing postgres",
            "version: 1\nenvironments:\n  live:\n    upgrade: {}\n",
            "environments.live: missing field `postgres`",
        ),
        (
            "unknown strategy",
            "version: 1\nupgrade: {strategy: pg_dumpall}\nenvironments: {live: {postgres: {A: 1}}}\n",
            "upgrade.strategy: unknown variant `pg_dumpall`",
        ),
        (
            "two providers",
            "version: 1\nprovider:\n  local: {}\n  divio: {application: x}\nenvironments: {live: {postgres: {A: 1}}}\n",
            "c.yaml:2:1: provider: both `local` and `divio` are set",
        ),
        (
            "bad environment name",
            "version: 1\nenvironments:\n  ../etc:\n    postgres: {A: 1}\n",
            "invalid environment name",
        ),
        (
            "syntax",
            "version: 1\nenvironments:\n  live:\n    postgres: {A: 1\n",
            "c.yaml:5:1: environments.live.postgres: did not find expected ',' or '}'",
        ),
        ("not a map", "- 1\n- 2\n", "invalid type: sequence"),
    ];
    let dir = scratch("config_errors");
    for (name, text, want) in cases {
        std::fs::write(dir.join("c.yaml"), text).expect("write");
        let run = pgconverge(&["validate", "-f", "c.yaml"], &dir);
        assert_eq!(run.code, 1, "{name}: {}", run.stderr);
        assert!(
            run.stderr.starts_with(&format!("error: {want}")) || run.stderr.contains(want),
            "{name}: want {want:?} in\n{}",
            run.stderr
        );
        assert!(run.stderr.contains("hint: "), "{name}: no hint in {}", run.stderr);
        assert!(run.stdout.is_empty(), "{name}: printed {}", run.stdout);
    }
}

#[test]
fn hostile_configs_fail_fast() {
    let dir = scratch("hostile");
    let mut bomb = String::from(
        "version: 1\nenvironments:\n  e:\n    postgres: {A: 1}\n    upgrade:\n      verify: &l0 [x,x,x,x,x,x,x,x,x]\n",
    );
    for i in 1..10 {
        let refs = vec![format!("*l{}", i - 1); 9].join(",");
        bomb.push_str(&format!("      k{i}: &l{i} [{refs}]\n"));
    }
    let deep = format!("version: 1\nenvironments: {}", "[".repeat(20_000));
    let deep_map = format!("version: 1\nenvironments: {}", "{a: ".repeat(20_000));
    let garbage: String =
        (0..3_000_000u32).map(|i| char::from(b'!' + (i.wrapping_mul(2_654_435_761) % 90) as u8)).collect();
    let binary: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(dir.join("bomb.yaml"), bomb).expect("write");
    std::fs::write(dir.join("deep.yaml"), deep).expect("write");
    std::fs::write(dir.join("deep_map.yaml"), deep_map).expect("write");
    std::fs::write(dir.join("garbage.yaml"), garbage).expect("write");
    std::fs::write(dir.join("binary.yaml"), binary).expect("write");
    for f in ["bomb.yaml", "deep.yaml", "deep_map.yaml", "garbage.yaml", "binary.yaml", "missing.yaml"] {
        let run = pgconverge(&["validate", "-f", f], &dir);
        assert_eq!(run.code, 1, "{f}: {}", run.stderr);
        assert!(run.stderr.starts_with(&format!("error: {f}")), "{f}: {}", run.stderr);
    }
}

#[test]
fn plan_exit_codes() {
    let dir = scratch("exit_codes");
    std::fs::write(dir.join("pgconverge.yaml"), CONFIG).expect("write");
    std::fs::write(dir.join("old.json"), RUNBOOK_LIVE).expect("write");
    std::fs::write(dir.join("done.json"), CONVERGED_LIVE).expect("write");
    let changes = pgconverge(&["plan", "--live", "old.json", "--detailed-exitcode"], &dir);
    assert_eq!(changes.code, 2, "{}", changes.stderr);
    let plain = pgconverge(&["plan", "--live", "old.json"], &dir);
    assert_eq!(plain.code, 0, "{}", plain.stderr);
    let none = pgconverge(&["plan", "--live", "done.json", "--detailed-exitcode"], &dir);
    assert_eq!(none.code, 0, "{}", none.stderr);
    assert!(none.stdout.contains("No changes"), "{}", none.stdout);
    let bad = pgconverge(&["plan", "--live", "missing.json", "--detailed-exitcode"], &dir);
    assert_eq!(bad.code, 1);
    let usage = pgconverge(&["plan", "--format", "yaml"], &dir);
    assert_eq!(usage.code, 1, "usage errors are 1, never 2");
    let help = pgconverge(&["--help"], &dir);
    assert_eq!(help.code, 0);
}

#[test]
fn saved_plan_is_the_json_plan() {
    let dir = scratch("saved_plan");
    std::fs::write(dir.join("pgconverge.yaml"), CONFIG).expect("write");
    std::fs::write(dir.join("old.json"), RUNBOOK_LIVE).expect("write");
    let run = pgconverge(&["plan", "--live", "old.json", "--format", "json", "--out", "plan.json"], &dir);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let saved = std::fs::read_to_string(dir.join("plan.json")).expect("saved");
    assert_eq!(saved, run.stdout);
    let plan: serde_json::Value = serde_json::from_str(&saved).expect("json");
    assert_eq!(plan["format_version"], 1);
    assert!(plan["observed"].as_str().is_some_and(|d| d.starts_with("sha256:") && d.len() == 71));
    assert_eq!(plan["environments"][0]["name"], "live");
    let ops: Vec<&str> = plan["environments"][0]["actions"]
        .as_array()
        .expect("actions")
        .iter()
        .map(|a| a["op"].as_str().expect("op"))
        .collect();
    assert_eq!(
        ops,
        ["add", "provision", "fence", "backup", "restore", "verify", "rename", "detach", "rename", "deploy", "delete"]
    );
    assert_eq!(
        plan["environments"][0]["actions"][0],
        serde_json::json!({"op": "add", "service": "+1", "prefix": "NEW", "version": 17})
    );
}

#[test]
fn no_plan_is_exit_one_with_the_reason() {
    let dir = scratch("no_plan");
    std::fs::write(
        dir.join("pgconverge.yaml"),
        "version: 1\nenvironments:\n  live:\n    postgres:\n      DEFAULT: 15\n",
    )
    .expect("write");
    std::fs::write(dir.join("old.json"), RUNBOOK_LIVE).expect("write");
    let run = pgconverge(&["plan", "--live", "old.json"], &dir);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("environment live: no safe plan exists") && run.stderr.contains("allow_downgrade"),
        "{}",
        run.stderr
    );
}

#[test]
fn unknown_environment_is_refused() {
    let dir = scratch("unknown_env");
    std::fs::write(dir.join("pgconverge.yaml"), CONFIG).expect("write");
    std::fs::write(dir.join("old.json"), RUNBOOK_LIVE).expect("write");
    let run = pgconverge(&["plan", "--live", "old.json", "--env", "prod"], &dir);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("environment `prod` is not declared"), "{}", run.stderr);
}

#[test]
fn snapshot_errors_point_at_the_field() {
    let dir = scratch("snapshot_errors");
    std::fs::write(dir.join("pgconverge.yaml"), CONFIG).expect("write");
    let cases: &[(&str, &str)] = &[
        ("{\"format_version\":1,\n\"environments\":{\"live\":{\"services\":[{\"id\":\"a\",\"version\":16,\"prefix\":\"DEFAULT\",\"status\":\"gone\"}]}}}", "live.json:2:"),
        ("{\"format_version\":1,\"environments\":{}} trailing", "live.json:1:"),
        ("{\"format_version\":2,\"environments\":{}}", "format_version 2 is not supported"),
        ("{\"format_version\":1,\"environments\":{\"live\":{\"services\":[{\"id\":\"+1\",\"version\":16,\"prefix\":\"A\",\"status\":\"attached\"}]}}}", "reserved for services a plan adds"),
        ("{\"format_version\":1,\"environments\":{\"live\":{\"services\":[],\"extra\":1}}}", "unknown field `extra`"),
    ];
    for (text, want) in cases {
        std::fs::write(dir.join("live.json"), text).expect("write");
        let run = pgconverge(&["plan", "--live", "live.json"], &dir);
        assert_eq!(run.code, 1, "{text}");
        assert!(run.stderr.contains(want), "want {want:?} in {}", run.stderr);
    }
}

#[test]
fn show_round_trips_the_snapshot() {
    let run = pgconverge(&["show", "--live", "examples/live.json", "--format", "json"], &repo());
    assert_eq!(run.code, 0, "{}", run.stderr);
    let shown: serde_json::Value = serde_json::from_str(&run.stdout).expect("json");
    let dir = scratch("show");
    std::fs::write(dir.join("again.json"), &run.stdout).expect("write");
    let again = pgconverge(&["show", "--live", "again.json", "--format", "json"], &dir);
    assert_eq!(again.stdout, run.stdout);
    assert_eq!(shown["format_version"], 1);
    let one = pgconverge(&["show", "--live", "examples/live.json", "--env", "test"], &repo());
    assert_eq!(one.code, 0);
    assert!(one.stdout.contains("svc-t1") && !one.stdout.contains("svc-1 "), "{}", one.stdout);
}

#[test]
fn divio_settings_are_checked_with_their_position_before_anything_is_asked() {
    let dir = scratch("divio_settings");
    for (divio, key, at) in [
        ("{application: app, zone: 'divio .com'}", "provider.divio.zone", ":3:"),
        ("{application: app, fence_command: 'true'}", "provider.divio.fence_command", ":3:"),
        ("{application: app, poll_seconds: 0}", "provider.divio.poll_seconds", ":3:"),
        ("{application: 'a&b=c'}", "provider.divio.application", ":3:"),
    ] {
        let config =
            format!("version: 1\nprovider:\n  divio: {divio}\nenvironments:\n  live: {{postgres: {{DEFAULT: 17}}}}\n");
        std::fs::write(dir.join("pgconverge.yaml"), config).expect("write");
        for args in [&["validate"][..], &["plan"], &["apply", "--auto-approve"]] {
            let run = pgconverge_with(args, &dir, &[("DIVIO_TOKEN", "t")]);
            assert_eq!(run.code, 1, "{args:?} {divio}");
            assert!(run.stderr.contains(key) && run.stderr.contains(at), "{args:?} {divio}: {}", run.stderr);
        }
    }
    assert!(!dir.join(".pgconverge").exists(), "nothing was touched");
}

#[test]
fn apply_without_a_terminal_refuses_rather_than_hang() {
    let dir = scratch("no_terminal");
    std::fs::write(dir.join("pgconverge.yaml"), CONFIG).expect("write");
    let run = pgconverge(&["apply"], &dir);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("standard input is not a terminal"), "{}", run.stderr);
    assert!(!dir.join(".pgconverge/state").exists(), "nothing may be touched");
}

#[test]
fn logs_go_to_stderr_as_json_when_asked() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgconverge"))
        .args([
            "plan",
            "--live",
            "examples/live.json",
            "-f",
            "examples/pgconverge.yaml",
            "--log-format",
            "json",
            "--format",
            "json",
        ])
        .current_dir(repo())
        .env("RUST_LOG", "info")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr.lines().next().expect("a log line");
    let log: serde_json::Value = serde_json::from_str(first).expect("json log line");
    assert_eq!(log["fields"]["message"], "planned");
    let _: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is only the plan");
}

/// The CI examples: valid YAML, a plan job and an apply job each, and every pgconverge
/// command in them one this pgconverge accepts (GitHub's through the action, whose
/// commands `tests/action.rs` checks).
#[test]
fn ci_examples_run_commands_pgconverge_accepts() {
    use clap::Parser;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("examples/github-actions.yml")).expect("example");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("valid YAML");
    for (job, command) in [("plan", "plan"), ("apply", "apply")] {
        let steps = doc["jobs"][job]["steps"].as_sequence().expect("steps");
        let uses = steps.iter().find(|s| s["uses"].as_str().is_some_and(|u| u.contains("/pgconverge@")));
        let uses = uses.unwrap_or_else(|| panic!("job {job} uses the action: {steps:?}"));
        assert_eq!(uses["with"]["command"].as_str(), Some(command), "job {job}");
        assert!(steps.len() <= 2 && !text.contains("run:"), "a use of the action, nothing else: {text}");
    }

    let text = std::fs::read_to_string(root.join("examples/gitlab-ci.yml")).expect("example");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("valid YAML");
    assert!(doc.get("pgconverge-plan").is_some() && doc.get("pgconverge-apply").is_some(), "jobs");
    // Shell commands that start with `pgconverge`, up to their first redirection.
    let commands: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.trim_start().trim_start_matches("- ").trim_start_matches("run:"))
        .filter(|l| !l.starts_with('#'))
        .flat_map(|l| l.split([';', '|']))
        .map(str::trim)
        .filter(|part| part.starts_with("pgconverge "))
        .map(|part| part.split_whitespace().take_while(|w| !w.contains('>')).collect())
        .collect();
    assert!(commands.iter().any(|c| c.contains(&"plan") && c.contains(&"markdown")), "{commands:?}");
    assert!(commands.iter().any(|c| c == &["pgconverge", "apply", "--auto-approve"]), "{commands:?}");
    for c in &commands {
        if let Err(e) = pgconverge::cli::Cli::try_parse_from(c) {
            panic!("gitlab-ci.yml: `{}` is refused: {e}", c.join(" "));
        }
    }
}

#[test]
fn completions_and_man_page_cover_every_command() {
    let dir = std::env::temp_dir();
    for (shell, marker) in [
        ("bash", "_pgconverge()"),
        ("zsh", "#compdef pgconverge"),
        ("fish", "complete -c pgconverge"),
        ("elvish", "pgconverge"),
        ("powershell", "pgconverge"),
    ] {
        let run = pgconverge(&["completions", shell], &dir);
        assert_eq!(run.code, 0, "{shell}: {}", run.stderr);
        assert!(run.stdout.contains(marker), "{shell}: {}", run.stdout);
        for sub in ["validate", "plan", "apply", "show", "init", "schema", "completions", "man"] {
            assert!(run.stdout.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    assert!(run_has_plan_options(&pgconverge(&["completions", "bash"], &dir).stdout));
    let man = pgconverge(&["man"], &dir);
    assert_eq!(man.code, 0, "{}", man.stderr);
    assert!(man.stdout.contains(".TH pgconverge 1"), "{}", man.stdout);
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH SUBCOMMANDS", "pgconverge\\-apply"] {
        assert!(man.stdout.contains(section), "man page lacks {section}: {}", man.stdout);
    }
    let bad = pgconverge(&["completions", "tcsh"], &dir);
    assert_eq!(bad.code, 1, "an unknown shell is a usage error");
}

/// Options complete too, not only subcommand names.
fn run_has_plan_options(bash: &str) -> bool {
    ["--detailed-exitcode", "--format", "--auto-approve"].iter().all(|o| bash.contains(o))
}

/// `local_dev`: plan shows the compose file's image moving, as a diff, and counts it as a
/// change; a compose file pgconverge cannot follow is an error that says where.
#[test]
fn local_dev_compose_image_follows_an_environment() {
    let dir = scratch("cli_local_dev");
    let compose = "services:\n  db:\n    image: postgres:13.5-alpine  # keep me\n    ports: [\"5432:5432\"]\n";
    std::fs::write(dir.join("docker-compose.yml"), compose).expect("compose");
    std::fs::write(
        dir.join("pgconverge.yaml"),
        "version: 1\nenvironments:\n  test: {postgres: {DEFAULT: 17}}\n  live: {postgres: {DEFAULT: 16}}\nlocal_dev:\n  compose_file: docker-compose.yml\n  service: db\n  follows: live\n",
    )
    .expect("config");
    let converged = r#"{"format_version":1,"environments":{
      "test":{"services":[{"id":"t","version":17,"prefix":"DEFAULT","status":"attached"}]},
      "live":{"services":[{"id":"l","version":16,"prefix":"DEFAULT","status":"attached"}]}}}"#;
    std::fs::write(dir.join("live.json"), converged).expect("snapshot");

    let plan = pgconverge(&["plan", "--live", "live.json", "--detailed-exitcode"], &dir);
    assert_eq!(plan.code, 2, "the compose file is a pending change: {}{}", plan.stdout, plan.stderr);
    assert!(plan.stdout.contains("-    image: postgres:13.5-alpine  # keep me"), "{}", plan.stdout);
    assert!(plan.stdout.contains("+    image: postgres:16-alpine  # keep me"), "{}", plan.stdout);
    let md = pgconverge(&["plan", "--live", "live.json", "--format", "markdown"], &dir);
    assert!(md.stdout.contains("#### Local development: `") && md.stdout.contains("```diff"), "{}", md.stdout);
    let only_test = pgconverge(&["plan", "--live", "live.json", "--env", "test", "--detailed-exitcode"], &dir);
    assert_eq!(only_test.code, 0, "live is not planned, so its compose file waits: {}", only_test.stdout);
    assert_eq!(std::fs::read_to_string(dir.join("docker-compose.yml")).expect("compose"), compose, "plan wrote");

    std::fs::write(dir.join("docker-compose.yml"), "services:\n  db:\n    image: postgres:latest\n").expect("compose");
    let bad = pgconverge(&["plan", "--live", "live.json"], &dir);
    assert_eq!(bad.code, 1);
    assert!(
        bad.stderr.contains("docker-compose.yml:3:12") && bad.stderr.contains("cannot tell the PostgreSQL major"),
        "{}",
        bad.stderr
    );
}

#[test]
fn logical_plans_say_the_copy_is_outside_the_outage() {
    let dir = scratch("logical_plan");
    std::fs::write(
        dir.join("pgconverge.yaml"),
        "version: 1\nupgrade: {strategy: logical}\nenvironments:\n  live: {postgres: {DEFAULT: 17}}\n",
    )
    .expect("config");
    std::fs::write(
        dir.join("live.json"),
        r#"{"format_version":1,"environments":{"live":{"services":[{"id":"a","version":15,"prefix":"DEFAULT","status":"attached"}]}}}"#,
    )
    .expect("snapshot");
    let text = pgconverge(&["plan", "--live", "live.json"], &dir);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(text.stdout.contains("3. replicate +1 from a"), "{}", text.stdout);
    assert!(text.stdout.contains("The copy streams before the fence"), "{}", text.stdout);
    let md = pgconverge(&["plan", "--live", "live.json", "--format", "markdown"], &dir);
    assert!(md.stdout.contains("5 actions (fence → deploy), no copy inside"), "{}", md.stdout);
    let json = pgconverge(&["plan", "--live", "live.json", "--format", "json"], &dir);
    assert!(
        json.stdout.contains(r#""op": "catch_up""#) || json.stdout.contains(r#""op":"catch_up""#),
        "{}",
        json.stdout
    );
}

#[test]
fn the_state_database_is_named_by_a_variable_never_by_its_dsn() {
    let dir = scratch("state_settings");
    let write = |state: &str| {
        let config = format!(
            "version: 1\nprovider:\n  divio: {{application: app, zone: 'http://127.0.0.1:9'}}\n\
             state:\n  postgres: {state}\nenvironments:\n  live: {{postgres: {{DEFAULT: 17}}}}\n"
        );
        std::fs::write(dir.join("pgconverge.yaml"), config).expect("write");
    };
    write("{dsn_env: 'postgres://st:s3cret@db/state'}");
    let run = pgconverge(&["validate"], &dir);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("state.postgres.dsn_env") && run.stderr.contains(":5:"), "{}", run.stderr);
    assert!(!run.stderr.contains("s3cret"), "the DSN is not echoed: {}", run.stderr);

    write("{dsn_env: PGCONVERGE_STATE_DSN}");
    let unset = pgconverge_with(&["plan"], &dir, &[("DIVIO_TOKEN", "t"), ("PGCONVERGE_STATE_DSN", "")]);
    assert_eq!(unset.code, 1, "{}", unset.stderr);
    assert!(unset.stderr.contains("the variable PGCONVERGE_STATE_DSN"), "{}", unset.stderr);
    let bad =
        pgconverge_with(&["plan"], &dir, &[("DIVIO_TOKEN", "t"), ("PGCONVERGE_STATE_DSN", "mysql://u:s3cret@h/db")]);
    assert_eq!(bad.code, 1, "{}", bad.stderr);
    assert!(bad.stderr.contains("neither a postgres:// URI") && !bad.stderr.contains("s3cret"), "{}", bad.stderr);
}
