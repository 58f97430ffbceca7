//! `apply --format json`: what an apply did, as one document once it ends, however it
//! ends (format 1; `schemas/apply-result.schema.json`, docs/contracts.md).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::apply::Progress;
use crate::plan::{Action, Plan};

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

    /// Apply ended well: each environment's write outage.
    pub fn converged(&mut self, outages: &[(String, Duration)]) {
        self.outages = outages.iter().map(|(env, d)| (env.clone(), d.as_secs_f64())).collect();
    }
}

/// A `Progress` that records into a `Record` as well.
pub struct Recording<'a> {
    pub inner: &'a mut dyn Progress,
    pub record: &'a mut Record,
}

impl std::fmt::Debug for Recording<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording").field("record", &self.record).finish_non_exhaustive()
    }
}

impl Progress for Recording<'_> {
    fn started(&mut self, env: &str, number: usize, total: usize, action: &Action) {
        self.record.actions.insert((env.to_owned(), number), (Instant::now(), None));
        self.inner.started(env, number, total, action);
    }

    fn finished(
        &mut self,
        env: &str,
        number: usize,
        total: usize,
        action: &Action,
        seconds: f64,
        detail: Option<String>,
    ) {
        if let Some(entry) = self.record.actions.get_mut(&(env.to_owned(), number)) {
            entry.1 = Some(seconds);
        }
        self.inner.finished(env, number, total, action, seconds, detail);
    }
}

/// The document. `error`: why apply stopped, and the environment it stopped in when it
/// was inside one.
pub fn document(record: &Record, error: Option<(&str, Option<&str>)>) -> Value {
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
                        Some((at, None)) => ("failed", Some(round(at.elapsed().as_secs_f64()))),
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
