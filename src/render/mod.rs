//! Renderers: one per format, each writing into any `impl Write`. The JSON plan is the
//! public, versioned format; text and markdown are for people and may change.

pub mod json;
pub mod markdown;
pub mod result;
pub mod text;

use crate::config::DesiredEnv;
use crate::model::{EnvLive, Status};
use crate::plan::{Action, EnvReport, Risk};

pub fn risk_label(r: Risk) -> &'static str {
    match r {
        Risk::BlocksWrites => "blocks writes",
        Risk::DeletesService => "deletes a service",
        Risk::Cutover => "cutover",
        Risk::ConsumesSource => "no way back",
    }
}

/// The live services of an environment as diffable lines, `PREFIX: VERSION (status)`.
pub fn live_lines(live: &EnvLive, unmanaged: &[crate::model::ServiceId]) -> Vec<String> {
    let mut lines: Vec<String> = live
        .services
        .iter()
        .filter(|s| !unmanaged.contains(&s.id))
        .map(|s| {
            let mut notes = Vec::new();
            if s.status != Status::Attached {
                notes.push(s.status.as_str().to_owned());
            }
            if s.fenced {
                notes.push("fenced".to_owned());
            }
            if s.consumed_by.is_some() {
                notes.push("consumed".to_owned());
            }
            if let Some(d) = s.data.as_ref().filter(|d| d.of != s.prefix) {
                notes.push(format!("holds {}", d.of));
            }
            let notes = if notes.is_empty() { String::new() } else { format!(" ({})", notes.join(", ")) };
            format!("{}: {}{notes}", s.prefix, s.version)
        })
        .collect();
    lines.sort();
    lines
}

/// The declared services as diffable lines, `PREFIX: VERSION`.
pub fn desired_lines(desired: &DesiredEnv) -> Vec<String> {
    let mut lines: Vec<String> = desired.postgres.iter().map(|(p, v)| format!("{p}: {v}")).collect();
    lines.sort();
    lines
}

/// Per declared prefix, `DEFAULT 16 → 17`, for the changes this plan makes.
pub fn version_changes(env: &EnvReport) -> Vec<String> {
    let mut out = Vec::new();
    for (p, v) in &env.desired.postgres {
        let current = env
            .live
            .services
            .iter()
            .filter(|s| s.status.visible())
            .find(|s| s.effective_data().is_some_and(|d| &d.of == p) && &s.prefix == p)
            .map(|s| s.version);
        match current {
            Some(c) if c == *v => {}
            Some(c) => out.push(format!("{p} {c} → {v}")),
            None => out.push(format!("{p} (none) → {v}")),
        }
    }
    if out.is_empty() && !env.steps.is_empty() {
        out.push("clean-up".into());
    }
    out
}

/// The unified diff of live against desired, without headers.
pub fn diff(env: &EnvReport) -> Vec<(similar::ChangeTag, String)> {
    let text = |lines: Vec<String>| lines.into_iter().map(|l| l + "\n").collect::<String>();
    let old = text(live_lines(&env.live, &env.unmanaged));
    let new = text(desired_lines(&env.desired));
    let d = similar::TextDiff::from_lines(&old, &new);
    d.iter_all_changes().map(|c| (c.tag(), c.value().trim_end().to_owned())).collect()
}

/// The plan copies by logical replication before the fence: the outage waits only for
/// the last changes, not for the copy, and does not grow with the data.
pub fn streams_before_fence(env: &EnvReport) -> bool {
    env.steps.iter().any(|s| matches!(s.action, Action::Replicate { .. }) && !s.in_outage)
        && !env.steps.iter().any(|s| s.in_outage && matches!(s.action, Action::Backup { .. } | Action::Restore { .. }))
}

/// The risks a plan's copies run by the settings' choice, with backticks around settings.
pub fn copy_risks(env: &EnvReport) -> Vec<String> {
    let up = &env.desired.upgrade;
    let copies = env.steps.iter().any(|s| matches!(s.action, Action::Restore { .. }));
    let upgrades = env.steps.iter().any(|s| matches!(s.action, Action::Upgrade { .. }));
    let mut risks = Vec::new();
    if copies && !up.fence_writes {
        risks.push("`fence_writes` is off: writes made between the backup and the deploy will be lost.".to_owned());
    }
    if (copies || upgrades) && up.verify == crate::config::Verify::None {
        risks.push("`verify` is `none`: the copy is not compared with its source.".to_owned());
    }
    if upgrades && up.transfer.consumes() {
        risks.push(
            "`transfer: link`: the new server takes the old one's files; once it has started there is no way back \
             to the old server, except a backup you made."
                .to_owned(),
        );
    }
    risks
}
