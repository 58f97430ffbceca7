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
    corpus();
}

/// A deterministic stream of numbers (xorshift), so that the corpus is the same on every
/// run without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    fn coin(&mut self) -> bool {
        self.below(2) == 1
    }
}

/// One random environment: 1–3 declared prefixes at 14–18, up to 6 services with every
/// status, fence and data variant, random settings.
fn random_env(rng: &mut Rng) -> (config::DesiredEnv, pgconverge::model::EnvLive) {
    use pgconverge::config::{DesiredEnv, Strategy, Upgrade, Verify};
    use pgconverge::model::{Data, EnvLive, EnvName, Major, Prefix, Service, ServiceId, Status};
    let p = |s: &str| Prefix::parse(s).expect("prefix");
    let major = |rng: &mut Rng| Major::new(14 + rng.below(5) as u32).expect("major");
    let declared = ["A", "B", "C"];
    let n = 1 + rng.below(3);
    let postgres = declared[..n].iter().map(|d| (p(d), major(rng))).collect();
    let logical = rng.below(4) == 0;
    let upgrade = Upgrade {
        strategy: if logical { Strategy::Logical } else { Strategy::DumpRestore },
        fence_writes: logical || rng.below(5) != 0,
        verify: [Verify::None, Verify::Counts, Verify::Checksums][rng.below(3)],
        keep_old: rng.below(4) == 0,
        allow_downgrade: rng.below(5) == 0,
        ..Upgrade::default()
    };
    let prefixes = ["A", "B", "C", "NEW", "OLD", "NEW_A", "OLD_A", "NEW_B", "OLD_B", "X"];
    let statuses = [Status::New, Status::Provisioned, Status::Attached, Status::PendingDetachment, Status::Detached];
    let mut live = EnvLive::default();
    for i in 0..rng.below(7) {
        let prefix = p(prefixes[rng.below(prefixes.len())]);
        if live.services.iter().any(|s| s.prefix == prefix) {
            continue;
        }
        let status = statuses[rng.below(statuses.len())];
        let data = (rng.below(3) != 0).then(|| Data {
            of: p(["A", "B", "C", "X"][rng.below(4)]),
            complete: rng.below(4) != 0,
            restored_from: (i > 0 && rng.coin())
                .then(|| ServiceId::observed(&format!("s{}", rng.below(i))).expect("id")),
            verified: rng.coin(),
            streaming: false,
        });
        live.services.push(Service {
            id: ServiceId::observed(&format!("s{i}")).expect("id"),
            version: major(rng),
            prefix,
            status,
            fenced: status.visible() && rng.below(3) == 0,
            data,
            consumed_by: None,
        });
    }
    (DesiredEnv { name: EnvName::parse("e").expect("env"), postgres, upgrade }, live)
}

/// The worst case over a corpus of random environments: how long planning takes, and how
/// each ends.
pub fn corpus() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut times, mut found, mut unproven, mut none, mut gave_up) = (Vec::new(), 0, 0, 0, 0);
    let mut worst = (Duration::ZERO, String::new());
    let size = std::env::var("PGCONVERGE_CORPUS").ok().and_then(|n| n.parse().ok()).unwrap_or(2000);
    for _ in 0..size {
        let (desired, live) = random_env(&mut rng);
        let t = Instant::now();
        let result = pgconverge::plan::plan_env(&desired, &live);
        let took = t.elapsed();
        match &result {
            Ok(r) if r.proven_shortest => found += 1,
            Ok(_) => unproven += 1,
            Err(e) if e.to_string().contains("gave up") => gave_up += 1,
            Err(_) => none += 1,
        }
        if took > worst.0 {
            worst = (took, serde_json::to_string(&live).unwrap_or_default());
        }
        let gave = result.as_ref().is_err_and(|e| e.to_string().contains("gave up"));
        if (took > Duration::from_millis(500) || gave) && std::env::var_os("PGCONVERGE_SLOW").is_some() {
            println!(
                "  slow ({:.1} s, {}): {:?} {}",
                took.as_secs_f64(),
                result.as_ref().map(|r| r.steps.len().to_string()).unwrap_or_else(|e| e.to_string()),
                desired,
                serde_json::to_string(&live).unwrap_or_default()
            );
        }
        times.push(took);
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "corpus of {} random environments (1-3 prefixes, up to 6 services): median {:.2} ms, p99 {:.1} ms, worst {:.1} ms",
        times.len(),
        ms(times[times.len() / 2]),
        ms(times[times.len() * 99 / 100]),
        ms(worst.0)
    );
    println!(
        "  {found} shortest plans, {unproven} plans not proven shortest, {none} without a plan, {gave_up} gave up"
    );
    println!("  slowest: {}", worst.1);
}
