//! Plan format 1, the live snapshot and apply's result document as JSON.

use std::io::{self, Write};

use crate::model::Live;
use crate::plan::Plan;

pub fn plan(out: &mut impl Write, plan: &Plan) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, plan)?;
    writeln!(out)
}

pub fn live(out: &mut impl Write, live: &Live) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, live)?;
    writeln!(out)
}

/// Apply's result document (`render::result`). serde_json leaves DEL and the C1 controls
/// as they are (JSON allows them in strings), and a terminal may act on them, so an error
/// message carrying one has it escaped the JSON way instead.
pub fn result(out: &mut impl Write, doc: &serde_json::Value) -> io::Result<()> {
    let text = serde_json::to_string_pretty(doc)?;
    let text: String = text
        .chars()
        .map(|c| if ('\u{7f}'..='\u{9f}').contains(&c) { format!("\\u{:04x}", c as u32) } else { c.to_string() })
        .collect();
    writeln!(out, "{text}")
}
