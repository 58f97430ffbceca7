//! Planner speed: `cargo bench --bench planner`. Prints the figures; asserts nothing about
//! time (targets: 4 prefixes migrating at once < 1 s; 1,000 runbook environments < 1 s).

use std::path::Path;
use std::time::{Duration, Instant};

use pgconverge::config;
use pgconverge::model::Live;

fn world(envs: usize, prefixes: &[&str]) -> (config::Config, Live) {
    let mut yaml = String::from("version: 1\nenvironments:\n");
    let mut services = Vec::new();
    for e in 0..envs {
        yaml.push_str(&format!("  env{e}:\n    postgres:\n"));
        let mut list = Vec::new();
        for (i, p) in prefixes.iter().enumerate() {
            yaml.push_str(&format!("      {p}: 17\n"));
            list.push(format!(r#"{{"id":"svc-{e}-{i}","version":16,"prefix":"{p}","status":"attached"}}"#));
        }
        services.push(format!(r#""env{e}":{{"services":[{}]}}"#, list.join(",")));
    }
    let config = config::parse(Path::new("bench.yaml"), &yaml).expect("config");
    let live: Live =
        serde_json::from_str(&format!(r#"{{"format_version":1,"environments":{{{}}}}}"#, services.join(",")))
            .expect("live");
    (config, live)
}

fn time(label: &str, runs: u32, f: impl Fn() -> usize) {
    let mut best = Duration::MAX;
    let mut actions = 0;
    for _ in 0..runs {
        let t = Instant::now();
        actions = f();
        best = best.min(t.elapsed());
    }
    println!("{label:<52} {:>10.1} ms  ({actions} actions, best of {runs})", best.as_secs_f64() * 1e3);
}

fn main() {
    println!("{:<52} {:>13}", "case", "time");
    for n in 1..=5 {
        let names = ["DEFAULT", "ANALYTICS", "CACHE", "SEARCH", "EVENTS"];
        let (config, live) = world(1, &names[..n]);
        time(&format!("1 environment, {n} prefix(es) migrating at once"), 3, || {
            let r = pgconverge::plan::plan(&config, &live, &[]).expect("plan");
            r.plan.environments.iter().map(|e| e.actions.len()).sum()
        });
    }
    let (config, live) = world(1000, &["DEFAULT"]);
    time("1,000 environments of the runbook case", 3, || {
        let r = pgconverge::plan::plan(&config, &live, &[]).expect("plan");
        r.plan.environments.iter().map(|e| e.actions.len()).sum()
    });
}
