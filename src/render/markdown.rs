//! The plan as a pull-request comment.

use std::io::{self, Write};

use similar::ChangeTag;

use super::{action_summary, diff, risk_label, version_changes};
use crate::config::Verify;
use crate::plan::{Report, Risk};

pub fn plan(out: &mut impl Write, report: &Report) -> io::Result<()> {
    let changing: Vec<_> = report.environments.iter().filter(|e| !e.steps.is_empty()).collect();
    if changing.is_empty() {
        writeln!(out, "### pgconverge plan: no changes")?;
        writeln!(out)?;
        let names: Vec<String> = report.environments.iter().map(|e| format!("`{}`", e.name)).collect();
        writeln!(out, "The live services of {} match `pgconverge.yaml`.", names.join(", "))?;
        return warnings(out, report);
    }
    let total: usize = changing.iter().map(|e| e.steps.len()).sum();
    writeln!(
        out,
        "### pgconverge plan: {total} actions in {} environment{}",
        changing.len(),
        if changing.len() == 1 { "" } else { "s" }
    )?;
    writeln!(out)?;
    writeln!(out, "| Environment | From → to | Actions | Risks |")?;
    writeln!(out, "|---|---|---:|---|")?;
    for env in &report.environments {
        writeln!(
            out,
            "| `{}` | {} | {} | {} |",
            env.name,
            version_changes(env).join("<br>"),
            env.steps.len(),
            risks(env)
        )?;
    }
    for env in &changing {
        writeln!(out)?;
        writeln!(out, "#### `{}`", env.name)?;
        writeln!(out)?;
        writeln!(out, "```diff")?;
        for (tag, line) in diff(env) {
            let sign = match tag {
                ChangeTag::Delete => '-',
                ChangeTag::Insert => '+',
                ChangeTag::Equal => ' ',
            };
            writeln!(out, "{sign} {line}")?;
        }
        writeln!(out, "```")?;
        writeln!(out)?;
        for (i, step) in env.steps.iter().enumerate() {
            let flag = step.risk.map(|r| format!(" **{}**", risk_label(r))).unwrap_or_default();
            let outage = if step.in_outage { " ⏸" } else { "" };
            writeln!(out, "{}. `{}`{outage} — {}{flag}", i + 1, action_summary(&step.action), step.reason)?;
        }
        if env.outage_actions > 0 {
            writeln!(out)?;
            writeln!(
                out,
                "⏸ {} actions run while writes are blocked (between the fence and the deploy).",
                env.outage_actions
            )?;
        }
    }
    warnings(out, report)
}

fn risks(env: &crate::plan::EnvReport) -> String {
    let mut r = Vec::new();
    if env.steps.iter().any(|s| s.risk == Some(Risk::BlocksWrites)) {
        r.push(format!("blocks writes ({} actions)", env.outage_actions));
    }
    let deletes = env.steps.iter().filter(|s| s.risk == Some(Risk::DeletesService)).count();
    if deletes > 0 {
        r.push(format!("deletes {deletes} service{}", if deletes == 1 { "" } else { "s" }));
    }
    if r.is_empty() {
        "none".into()
    } else {
        r.join(", ")
    }
}

fn warnings(out: &mut impl Write, report: &Report) -> io::Result<()> {
    let mut w = Vec::new();
    for env in &report.environments {
        if env.steps.is_empty() {
            continue;
        }
        let up = &env.desired.upgrade;
        let copies = env.steps.iter().any(|s| matches!(s.action, crate::plan::Action::Restore { .. }));
        if copies && !up.fence_writes {
            w.push(format!(
                "`{}`: `fence_writes` is off: writes made between the backup and the deploy will be lost.",
                env.name
            ));
        }
        if copies && up.verify == Verify::None {
            w.push(format!("`{}`: `verify` is `none`: the copy is not compared with its source.", env.name));
        }
        for id in &env.unmanaged {
            w.push(format!("`{}`: service `{id}` is not managed by pgconverge and is never touched.", env.name));
        }
    }
    for name in &report.unmanaged_environments {
        w.push(format!("environment `{name}` is not in the config and is never touched."));
    }
    if !w.is_empty() {
        writeln!(out)?;
        writeln!(out, "> [!WARNING]")?;
        for line in w {
            writeln!(out, "> - {line}")?;
        }
    }
    Ok(())
}
