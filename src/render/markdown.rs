//! The plan as a pull-request comment.

use std::io::{self, Write};

use similar::ChangeTag;

use super::{diff, risk_label, version_changes};
use crate::plan::{Action, EnvReport, Report, Risk};

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
    writeln!(out, "| Environment | From → to | Actions | Write outage | Risks |")?;
    writeln!(out, "|---|---|---:|---|---|")?;
    for env in &report.environments {
        let labels: Vec<String> = risk_labels(env).iter().map(|l| format!("`{l}`")).collect();
        writeln!(
            out,
            "| `{}` | {} | {} | {} | {} |",
            env.name,
            version_changes(env).join("<br>"),
            env.steps.len(),
            outage(env),
            if labels.is_empty() { "none".to_owned() } else { labels.join(" ") }
        )?;
    }
    for env in &changing {
        writeln!(out)?;
        // Collapsed, so that a comment on many environments stays short; GitHub and
        // GitLab render markdown inside <details> after a blank line.
        writeln!(
            out,
            "<details><summary><code>{}</code>: {}, {} actions</summary>",
            env.name,
            version_changes(env).join(", "),
            env.steps.len()
        )?;
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
        timeline(out, env)?;
        writeln!(out)?;
        for (i, step) in env.steps.iter().enumerate() {
            let flag = step.risk.map(|r| format!(" **{}**", risk_label(r))).unwrap_or_default();
            let outage = if step.in_outage { " ⏸" } else { "" };
            writeln!(out, "{}. `{}`{outage} — {}{flag}", i + 1, step.action, step.reason)?;
        }
        if env.outage_actions > 0 {
            writeln!(out)?;
            writeln!(
                out,
                "⏸ {} actions run while writes are blocked (between the fence and the deploy).",
                env.outage_actions
            )?;
        }
        if !env.proven_shortest {
            writeln!(out)?;
            writeln!(out, "{}", super::text::NOT_PROVEN)?;
        }
        writeln!(out)?;
        writeln!(out, "</details>")?;
    }
    warnings(out, report)
}

/// The actions as a Mermaid Gantt chart (GitHub and GitLab draw ```mermaid blocks), one
/// bar per action, those from the fence to the deploy marked critical: the write outage
/// at a glance. The bars have no real length: the plan does not know how long each takes.
fn timeline(out: &mut impl Write, env: &EnvReport) -> io::Result<()> {
    let fence = env.steps.iter().position(|s| matches!(s.action, Action::Fence { .. }));
    let deploy = env.steps.iter().rposition(|s| matches!(s.action, Action::Deploy));
    let blocked = |i: usize| fence.is_some_and(|f| f <= i) && deploy.is_some_and(|d| i <= d) || env.steps[i].in_outage;
    writeln!(out, "```mermaid")?;
    writeln!(out, "gantt")?;
    writeln!(out, "    title {}: one bar per action, writes blocked in red", mermaid_text(&env.name.to_string()))?;
    writeln!(out, "    dateFormat X")?;
    writeln!(out, "    axisFormat %s")?;
    let mut section = None;
    for (i, step) in env.steps.iter().enumerate() {
        let now = if blocked(i) {
            "writes blocked"
        } else if deploy.is_some_and(|d| i > d) {
            "after the deploy"
        } else {
            "writes flow"
        };
        if section != Some(now) {
            writeln!(out, "    section {now}")?;
            section = Some(now);
        }
        let tag = if blocked(i) { "crit, " } else { "" };
        writeln!(out, "    {}. {} :{tag}a{}, {i}, {}", i + 1, mermaid_text(&step.action.to_string()), i + 1, i + 1)?;
    }
    writeln!(out, "```")
}

/// Text for a Mermaid task or title: its syntax gives `:`, `;` and `#` meanings of their own.
fn mermaid_text(text: &str) -> String {
    text.chars().map(|c| if matches!(c, ':' | ';' | '#' | '\n') { ' ' } else { c }).collect()
}

/// Short labels a reviewer can scan for (and a CI rule can match).
fn risk_labels(env: &EnvReport) -> Vec<&'static str> {
    let mut labels = Vec::new();
    if env.steps.iter().any(|s| s.risk == Some(Risk::BlocksWrites)) {
        labels.push("blocks-writes");
    }
    if env.steps.iter().any(|s| s.risk == Some(Risk::DeletesService)) {
        labels.push("deletes-service");
    }
    if env.steps.iter().any(|s| s.risk == Some(Risk::ConsumesSource)) {
        labels.push("no-way-back");
    }
    if copies_unfenced(env) {
        labels.push("no-fence: writes may be lost");
    }
    labels
}

/// The plan copies data while the application can still write to the source.
fn copies_unfenced(env: &EnvReport) -> bool {
    let copies = env.steps.iter().any(|s| matches!(s.action, Action::Restore { .. }));
    let fences = env.steps.iter().any(|s| matches!(s.action, Action::Fence { .. }));
    copies && !fences
}

/// How long the application cannot write, in actions: the time depends on the size of
/// the data, which the plan does not know.
fn outage(env: &EnvReport) -> String {
    match env.outage_actions {
        0 if copies_unfenced(env) => "none (not fenced)".into(),
        0 => "none".into(),
        n if super::streams_before_fence(env) => {
            format!("{n} action{} (fence → deploy), no copy inside", if n == 1 { "" } else { "s" })
        }
        n => format!("{n} action{} (fence → deploy)", if n == 1 { "" } else { "s" }),
    }
}

fn warnings(out: &mut impl Write, report: &Report) -> io::Result<()> {
    let mut w = Vec::new();
    for env in &report.environments {
        if env.steps.is_empty() {
            continue;
        }
        w.extend(super::copy_risks(env).into_iter().map(|r| format!("`{}`: {r}", env.name)));
        for id in &env.unmanaged {
            w.push(format!("`{}`: service `{id}` is not managed by pgconverge and is never touched.", env.name));
        }
    }
    for name in &report.unmanaged_environments {
        w.push(format!("environment `{name}` is not in the config and is never touched."));
    }
    w.extend(report.rollout_warnings.iter().map(|r| format!("{r}.")));
    if !w.is_empty() {
        writeln!(out)?;
        writeln!(out, "> [!WARNING]")?;
        for line in w {
            writeln!(out, "> - {line}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mermaid_text_cannot_end_a_task_or_start_a_comment() {
        assert_eq!(mermaid_text("rename a:b → OLD; #1\nx"), "rename a b → OLD   1 x");
    }
}
