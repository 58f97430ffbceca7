//! The plan and the live state for people at a terminal.

use std::io::{self, Write};

use similar::ChangeTag;

use super::{diff, risk_label};
use crate::model::Live;
use crate::plan::Report;

const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

struct Paint(bool);

impl Paint {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.0 {
            format!("{code}{s}{RESET}")
        } else {
            s.to_owned()
        }
    }
}

pub fn plan(out: &mut impl Write, report: &Report, color: bool) -> io::Result<()> {
    let p = Paint(color);
    for env in &report.environments {
        writeln!(out, "{}", p.paint(BOLD, &format!("Environment {}", env.name)))?;
        if env.steps.is_empty() {
            writeln!(out, "  No changes. The live services match the config.")?;
        } else {
            for (tag, line) in diff(env) {
                let (sign, code) = match tag {
                    ChangeTag::Delete => ("-", RED),
                    ChangeTag::Insert => ("+", GREEN),
                    ChangeTag::Equal => (" ", ""),
                };
                let text = format!("  {sign} {line}");
                writeln!(out, "{}", if code.is_empty() { text } else { p.paint(code, &text) })?;
            }
            writeln!(out)?;
            let n = env.steps.len();
            let width = n.to_string().len();
            let summary = env.steps.iter().map(|s| s.action.to_string()).collect::<Vec<_>>();
            let col = summary.iter().map(|s| s.chars().count()).max().unwrap_or(0);
            for (i, (step, what)) in env.steps.iter().zip(&summary).enumerate() {
                let pad = " ".repeat(col - what.chars().count());
                let marker = if step.in_outage { "│" } else { " " };
                let flag = step.risk.map(|r| p.paint(YELLOW, &format!("  [{}]", risk_label(r)))).unwrap_or_default();
                writeln!(out, "  {marker}{:>width$}. {what}{pad}  {}{flag}", i + 1, step.reason)?;
            }
            writeln!(out)?;
            let outage = if env.outage_actions > 0
                || env.steps.iter().any(|s| s.risk == Some(crate::plan::Risk::BlocksWrites))
            {
                format!(", {} inside the write outage (marked │)", env.outage_actions)
            } else {
                String::new()
            };
            writeln!(out, "  {n} action{}{outage}.", if n == 1 { "" } else { "s" })?;
            if !env.proven_shortest {
                writeln!(out, "  {}", p.paint(YELLOW, NOT_PROVEN))?;
            }
            if super::streams_before_fence(env) {
                writeln!(
                    out,
                    "  The copy streams before the fence: writes stay blocked only while the last changes arrive, whatever the size."
                )?;
            }
            for risk in super::copy_risks(env) {
                writeln!(out, "  {}", p.paint(YELLOW, &format!("Warning: {}", risk.replace('`', ""))))?;
            }
        }
        if !env.unmanaged.is_empty() {
            let ids: Vec<String> = env.unmanaged.iter().map(|i| i.to_string()).collect();
            writeln!(out, "  Not managed by pgconverge, never touched: {}.", ids.join(", "))?;
        }
        writeln!(out)?;
    }
    for name in &report.unmanaged_environments {
        writeln!(out, "Environment {name} is not in the config: never touched.")?;
    }
    for w in &report.rollout_warnings {
        writeln!(out, "Warning: {}.", w.replace('`', ""))?;
    }
    let total: usize = report.environments.iter().map(|e| e.steps.len()).sum();
    if total == 0 {
        writeln!(out, "No changes.")?;
    } else {
        let envs = report.environments.iter().filter(|e| !e.steps.is_empty()).count();
        writeln!(
            out,
            "Plan: {total} action{} in {envs} environment{}.",
            if total == 1 { "" } else { "s" },
            if envs == 1 { "" } else { "s" }
        )?;
    }
    Ok(())
}

pub fn live(out: &mut impl Write, live: &Live) -> io::Result<()> {
    if live.environments.is_empty() {
        writeln!(out, "No environments.")?;
    }
    for (i, (name, env)) in live.environments.iter().enumerate() {
        if i > 0 {
            writeln!(out)?;
        }
        writeln!(out, "Environment {name}")?;
        if env.services.is_empty() {
            writeln!(out, "  (no services)")?;
        }
        let rows: Vec<[String; 6]> = env
            .services
            .iter()
            .map(|s| {
                let data = match (s.effective_data(), &s.consumed_by) {
                    (_, Some(by)) => format!("none: its files are {by}'s"),
                    (None, None) => "-".to_owned(),
                    (Some(d), None) => {
                        let mut w = vec![d.of.to_string()];
                        w.push(if d.complete { "complete" } else { "incomplete" }.into());
                        if let Some(f) = &d.restored_from {
                            w.push(format!("from {f}"));
                        }
                        if d.verified {
                            w.push("verified".into());
                        }
                        w.join(" ")
                    }
                };
                [
                    s.id.to_string(),
                    s.prefix.to_string(),
                    s.version.to_string(),
                    s.status.as_str().to_owned(),
                    if s.fenced { "fenced" } else { "" }.to_owned(),
                    data,
                ]
            })
            .collect();
        let header = ["ID", "PREFIX", "VERSION", "STATUS", "FENCED", "DATA"].map(String::from);
        let mut widths = header.clone().map(|h| h.len());
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        if !rows.is_empty() {
            for r in std::iter::once(&header).chain(&rows) {
                let cells: Vec<String> =
                    r.iter().zip(widths).map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count()))).collect();
                writeln!(out, "  {}", cells.join("  ").trim_end())?;
            }
        }
    }
    Ok(())
}

/// Said of a plan the exact search could not prove shortest.
pub(crate) const NOT_PROVEN: &str =
    "Not proven shortest: the exact search ran out of budget; this plan is valid, but a shorter one may exist.";
