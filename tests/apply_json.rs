//! `apply --format json`: one document on stdout once apply ends (converged, failed
//! mid-plan, refused), each checked against `schemas/apply-result.schema.json`, with
//! nothing else on stdout.

mod common;

use std::path::Path;

use common::{ensure_postgres, pgconverge_with, scratch, Servers};
use serde_json::Value;

fn config(dir: &Path, major: u32) {
    ensure_postgres();
    let text = format!("version: 1\nenvironments:\n  test:\n    postgres:\n      DEFAULT: {major}\n");
    std::fs::write(dir.join("pgconverge.yaml"), text).expect("config");
}

/// Runs apply with `--format json` (and `args`); returns its exit code and its stdout,
/// which must be exactly one JSON document valid against the schema.
fn apply_json(dir: &Path, args: &[&str], vars: &[(&str, &str)]) -> (i32, Value) {
    let mut all = vec!["apply", "--format", "json"];
    all.extend(args);
    let run = pgconverge_with(&all, dir, vars);
    let doc: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {}\n{}", run.stdout, run.stderr));
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo().join("schemas/apply-result.schema.json")).expect("schema"),
    )
    .expect("the schema is JSON");
    let errors = validate(&schema, &doc, "$");
    assert!(errors.is_empty(), "not valid against the schema: {errors:#?}\n{doc:#}");
    (run.code, doc)
}

/// The part of JSON Schema the result schema uses: type (one or several), const, enum,
/// required, properties, additionalProperties: false, items.
fn validate(schema: &Value, value: &Value, at: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let type_name = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    if let Some(t) = schema.get("type") {
        let allowed: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if !allowed.contains(&type_name(value)) {
            errors.push(format!("{at}: a {} where {allowed:?} was wanted", type_name(value)));
        }
    }
    if let Some(c) = schema.get("const") {
        if c != value {
            errors.push(format!("{at}: {value} is not {c}"));
        }
    }
    if let Some(Value::Array(options)) = schema.get("enum") {
        if !options.contains(value) {
            errors.push(format!("{at}: {value} is none of {options:?}"));
        }
    }
    if let Value::Object(map) = value {
        for key in schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
            if !map.contains_key(key) {
                errors.push(format!("{at}: `{key}` is missing"));
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        for (key, v) in map {
            match properties.and_then(|p| p.get(key)) {
                Some(s) => errors.extend(validate(s, v, &format!("{at}.{key}"))),
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errors.push(format!("{at}: `{key}` is not in the schema"))
                }
                None => {}
            }
        }
    }
    if let (Value::Array(items), Some(s)) = (value, schema.get("items")) {
        for (i, v) in items.iter().enumerate() {
            errors.extend(validate(s, v, &format!("{at}[{i}]")));
        }
    }
    errors
}

fn actions(doc: &Value) -> &Vec<Value> {
    doc["environments"][0]["actions"].as_array().expect("actions")
}

#[test]
fn the_validator_catches_what_the_schema_forbids() {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo().join("schemas/apply-result.schema.json")).expect("schema"),
    )
    .expect("json");
    let bad = serde_json::json!({"format_version": 2, "result": "done", "environments": [{"name": "x"}], "extra": 1});
    let errors = validate(&schema, &bad, "$");
    for want in
        ["format_version", "result", "`error` is missing", "`extra` is not in the schema", "`actions` is missing"]
    {
        assert!(errors.iter().any(|e| e.contains(want)), "{want}: {errors:#?}");
    }
}

#[test]
fn a_converged_apply_and_one_failed_mid_plan_are_documented_action_by_action() {
    let dir = scratch("apply_json");
    let _servers = Servers(dir.join(".pgconverge"));
    config(&dir, 15);
    let (code, doc) = apply_json(&dir, &["--auto-approve"], &[]);
    assert_eq!(code, 0, "{doc:#}");
    assert_eq!(doc["result"], "converged");
    assert_eq!(doc["error"], Value::Null);
    let env = &doc["environments"][0];
    assert_eq!(env["name"], "test");
    assert_eq!(env["result"], "converged");
    assert_eq!(env["write_outage_seconds"], 0.0, "nothing was fenced");
    let ops: Vec<&str> = actions(&doc).iter().map(|a| a["op"].as_str().expect("op")).collect();
    assert_eq!(ops, ["add", "deploy"]);
    assert!(actions(&doc).iter().all(|a| a["result"] == "done" && a["seconds"].as_f64().is_some()), "{doc:#}");
    assert_eq!(actions(&doc)[0]["prefix"], "DEFAULT", "the plan action's own fields come along");

    // An upgrade that fails at its fourth action: three done, the fourth failed, the rest
    // not run, the environment failed with the error.
    config(&dir, 16);
    let (code, doc) = apply_json(&dir, &["--auto-approve"], &[("PGCONVERGE_FAILPOINTS", "before:4=error")]);
    assert_eq!(code, 1, "{doc:#}");
    assert_eq!(doc["result"], "failed");
    assert!(doc["error"].as_str().is_some_and(|e| e.contains("action 4")), "{doc:#}");
    let env = &doc["environments"][0];
    assert_eq!(env["result"], "failed");
    assert_eq!(env["write_outage_seconds"], Value::Null);
    let results: Vec<&str> = actions(&doc).iter().map(|a| a["result"].as_str().expect("result")).collect();
    assert_eq!(&results[..4], ["done", "done", "done", "failed"], "{doc:#}");
    assert!(results[4..].iter().all(|r| *r == "not_run"), "{doc:#}");
    assert!(actions(&doc)[4..].iter().all(|a| a["seconds"] == Value::Null));

    // The next apply finishes; its document has the upgrade's write outage.
    let (code, doc) = apply_json(&dir, &["--auto-approve"], &[]);
    assert_eq!(code, 0, "{doc:#}");
    assert_eq!(doc["result"], "converged");
    assert!(doc["environments"][0]["write_outage_seconds"].as_f64().is_some_and(|s| s > 0.0), "{doc:#}");
}

#[test]
fn without_auto_approve_or_with_a_bad_config_apply_is_refused_in_json_too() {
    let dir = scratch("apply_json_refused");
    config(&dir, 15);
    let (code, doc) = apply_json(&dir, &[], &[]);
    assert_eq!(code, 1);
    assert_eq!(doc["result"], "refused");
    assert!(doc["error"].as_str().is_some_and(|e| e.contains("--auto-approve")), "{doc:#}");
    std::fs::write(
        dir.join("pgconverge.yaml"),
        "version: 1\nenvironments:\n  test:\n    postgres:\n      DEFAULT: x\n",
    )
    .expect("config");
    let (code, doc) = apply_json(&dir, &["--auto-approve"], &[]);
    assert_eq!(code, 1);
    assert_eq!(doc["result"], "refused");
    assert_eq!(doc["environments"], serde_json::json!([]));
    assert!(!dir.join(".pgconverge").exists(), "nothing touched");
    // A control character a terminal would act on (CSI), echoed in the error (a saved
    // plan's file name), stays escaped and the document stays JSON.
    config(&dir, 15);
    let run = pgconverge_with(&["apply", "--format", "json", "--auto-approve", "plan\u{9b}31m.json"], &dir, &[]);
    assert_eq!(run.code, 1);
    assert!(!run.stdout.contains('\u{9b}') && run.stdout.contains("\\u009b31m"), "{}", run.stdout);
    let doc: Value = serde_json::from_str(&run.stdout).expect("still one JSON document");
    assert_eq!(doc["result"], "refused");
}
