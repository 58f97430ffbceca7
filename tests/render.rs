//! Snapshots of every output format, so a change to what users read is a reviewed diff.

use std::path::Path;

use pgconverge::model::Live;
use pgconverge::{config, plan, render};

fn example(live: &str) -> plan::Report {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = config::load(&root.join("examples/pgconverge.yaml")).expect("config");
    let live: Live = serde_json::from_str(live).expect("live");
    plan::plan(&config, &live, &[]).expect("plan")
}

fn example_live() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/live.json")).expect("live")
}

const CONVERGED: &str = r#"{"format_version":1,"environments":{
  "test":{"services":[{"id":"t","version":17,"prefix":"DEFAULT","status":"attached"}]},
  "live":{"services":[{"id":"a","version":17,"prefix":"DEFAULT","status":"attached"},
                      {"id":"b","version":17,"prefix":"ANALYTICS","status":"attached"}]}}}"#;

fn text(report: &plan::Report, color: bool) -> String {
    let mut out = Vec::new();
    render::text::plan(&mut out, report, color).expect("render");
    String::from_utf8(out).expect("utf-8")
}

fn markdown(report: &plan::Report) -> String {
    let mut out = Vec::new();
    render::markdown::plan(&mut out, report).expect("render");
    String::from_utf8(out).expect("utf-8")
}

#[test]
fn text_plan() {
    insta::assert_snapshot!(text(&example(&example_live()), false));
}

#[test]
fn text_plan_is_coloured_only_when_asked() {
    let report = example(&example_live());
    assert!(!text(&report, false).contains('\x1b'));
    let coloured = text(&report, true);
    assert!(coloured.contains("\x1b[31m  - DEFAULT: 16"), "{coloured}");
    assert!(coloured.contains("\x1b[32m  + DEFAULT: 17"), "{coloured}");
}

#[test]
fn text_no_changes() {
    insta::assert_snapshot!(text(&example(CONVERGED), false));
}

#[test]
fn markdown_plan() {
    insta::assert_snapshot!(markdown(&example(&example_live())));
}

#[test]
fn markdown_no_changes() {
    insta::assert_snapshot!(markdown(&example(CONVERGED)));
}

/// One timeline per changing environment, its critical bars exactly the fence, what runs
/// inside the outage, and the deploy; none when nothing changes.
#[test]
fn markdown_draws_the_outage_of_each_changing_environment() {
    let report = example(&example_live());
    let out = markdown(&report);
    let changing: Vec<_> = report.environments.iter().filter(|e| !e.steps.is_empty()).collect();
    assert_eq!(out.matches("```mermaid\ngantt\n").count(), changing.len(), "{out}");
    let crit = out.lines().filter(|l| l.contains(":crit, ")).count();
    let want: u32 = changing.iter().map(|e| e.outage_actions + 2).sum();
    assert_eq!(crit as u32, want, "{out}");
    assert!(!markdown(&example(CONVERGED)).contains("mermaid"));
}

#[test]
fn json_plan() {
    let mut out = Vec::new();
    render::json::plan(&mut out, &example(&example_live()).plan).expect("render");
    insta::assert_snapshot!(String::from_utf8(out).expect("utf-8"));
}

#[test]
fn show_text() {
    let live: Live = serde_json::from_str(&example_live()).expect("live");
    let mut out = Vec::new();
    render::text::live(&mut out, &live).expect("render");
    insta::assert_snapshot!(String::from_utf8(out).expect("utf-8"));
}

#[test]
fn json_plan_round_trips() {
    let plan = example(&example_live()).plan;
    let text = serde_json::to_string(&plan).expect("json");
    let back: plan::Plan = serde_json::from_str(&text).expect("parse");
    assert_eq!(back, plan);
}

/// The labels a reviewer (or a CI rule) scans for, and the outage column.
#[test]
fn markdown_labels_the_risks() {
    let live: Live = serde_json::from_str(
        r#"{"format_version":1,"environments":{"test":{"services":[{"id":"t","version":16,"prefix":"DEFAULT","status":"attached"}]}}}"#,
    )
    .expect("live");
    let report_for = |upgrade: &str| {
        let yaml =
            format!("version: 1\nenvironments:\n  test:\n    upgrade: {upgrade}\n    postgres:\n      DEFAULT: 17\n");
        let config = config::parse(Path::new("pgconverge.yaml"), &yaml).expect("config");
        markdown(&plan::plan(&config, &live, &[]).expect("plan"))
    };
    let fenced = report_for("{verify: counts}");
    assert!(fenced.contains("| 6 actions (fence → deploy) | `blocks-writes` `deletes-service` |"), "{fenced}");
    assert!(!fenced.contains("no-fence"), "{fenced}");
    let unfenced = report_for("{fence_writes: false, verify: none}");
    assert!(
        unfenced.contains("| none (not fenced) | `deletes-service` `no-fence: writes may be lost` |"),
        "{unfenced}"
    );
    assert!(unfenced.contains("writes made between the backup and the deploy will be lost"), "{unfenced}");
}

/// A plan the exact search could not prove shortest says so, in text and in markdown.
#[test]
fn a_plan_not_proven_shortest_says_so() {
    let mut report = example(&example_live());
    let proven = text(&report, false);
    assert!(!proven.contains("Not proven shortest"), "{proven}");
    for env in &mut report.environments {
        env.proven_shortest = false;
    }
    for out in [text(&report, false), markdown(&report)] {
        assert!(out.contains("Not proven shortest: the exact search ran out of budget"), "{out}");
    }
}

fn pg_upgrade_report(upgrade: &str) -> plan::Report {
    let text = format!("version: 1\nupgrade: {{{upgrade}}}\nenvironments:\n  live: {{postgres: {{DEFAULT: 17}}}}\n");
    let config = config::parse(Path::new("pgconverge.yaml"), &text).expect("config");
    let live: Live = serde_json::from_str(
        r#"{"format_version":1,"environments":{"live":{"services":[
            {"id":"a","version":15,"prefix":"DEFAULT","status":"attached"}]}}}"#,
    )
    .expect("live");
    plan::plan(&config, &live, &[]).expect("plan")
}

#[test]
fn markdown_pg_upgrade_plan() {
    insta::assert_snapshot!(markdown(&pg_upgrade_report("strategy: pg_upgrade")));
}

/// `transfer: link`: the upgrade marked as having no way back, and the warning.
#[test]
fn markdown_pg_upgrade_link_plan() {
    insta::assert_snapshot!(markdown(&pg_upgrade_report("strategy: pg_upgrade, transfer: link")));
}
