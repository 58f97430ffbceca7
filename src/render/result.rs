//! `apply --format json`: what an apply did, as one document once it ends, however it
//! ends (format 1; `schemas/apply-result.schema.json`, docs/contracts.md).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::plan::Plan;

/// What an apply got to: the plan it ran, when each action started and how long each
/// that finished took, the write outage of each environment that finished.
#[derive(Debug, Default)]
pub struct Record {
    plan: Option<Plan>,
    /// (environment, action number) → (started, seconds once finished).
    actions: BTreeMap<(String, usize), (Instant, Option<f64>)>,
    outages: BTreeMap<String, f64>,
}

impl Record {
    /// The plan apply is about to run.
    pub fn planned(&mut self, plan: &Plan) {
        self.plan = Some(plan.clone());
    }

    /// Action `number` of `env` started `at`.
    pub fn started(&mut self, env: &str, number: usize, at: Instant) {
        self.actions.insert((env.to_owned(), number), (at, None));
    }

    /// Action `number` of `env` finished, after `seconds`.
    pub fn finished(&mut self, env: &str, number: usize, seconds: f64) {
        if let Some(entry) = self.actions.get_mut(&(env.to_owned(), number)) {
            entry.1 = Some(seconds);
        }
    }

    /// Apply ended well: each environment's write outage.
    pub fn converged(&mut self, outages: &[(String, Duration)]) {
        self.outages = outages.iter().map(|(env, d)| (env.clone(), d.as_secs_f64())).collect();
    }
}

/// The document, at `now`. `error`: why apply stopped, and the environment it stopped in
/// when it was inside one.
pub fn document(record: &Record, error: Option<(&str, Option<&str>)>, now: Instant) -> Value {
    let round = |s: f64| (s * 1000.0).round() / 1000.0;
    let mut any_started = false;
    let environments: Vec<Value> = record
        .plan
        .iter()
        .flat_map(|p| &p.environments)
        .map(|env| {
            let name = env.name.to_string();
            let mut done = 0;
            let mut started = 0;
            let actions: Vec<Value> = env
                .actions
                .iter()
                .enumerate()
                .map(|(i, action)| {
                    let mut fields = match serde_json::to_value(action) {
                        Ok(Value::Object(map)) => map,
                        _ => serde_json::Map::new(),
                    };
                    let (result, seconds) = match record.actions.get(&(name.clone(), i + 1)) {
                        Some((_, Some(s))) => ("done", Some(round(*s))),
                        Some((at, None)) => ("failed", Some(round(now.saturating_duration_since(*at).as_secs_f64()))),
                        None => ("not_run", None),
                    };
                    started += usize::from(result != "not_run");
                    done += usize::from(result == "done");
                    fields.insert("result".into(), json!(result));
                    fields.insert("seconds".into(), json!(seconds));
                    Value::Object(fields)
                })
                .collect();
            any_started |= started > 0;
            let stopped_here = error.is_some_and(|(_, env)| env == Some(name.as_str()));
            let result = if stopped_here || (started > 0 && done < actions.len()) {
                "failed"
            } else if done == actions.len() && (error.is_none() || done > 0 || actions.is_empty()) {
                "converged"
            } else {
                "not_run"
            };
            let outage = match result {
                "converged" => json!(round(record.outages.get(&name).copied().unwrap_or(0.0))),
                _ => Value::Null,
            };
            json!({"name": name, "result": result, "write_outage_seconds": outage, "actions": actions})
        })
        .collect();
    let result = match error {
        None => "converged",
        Some(_) if any_started => "failed",
        Some(_) => "refused",
    };
    json!({
        "format_version": 1,
        "result": result,
        "environments": environments,
        "error": error.map(|(message, _)| message),
    })
}
