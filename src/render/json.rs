//! Plan format 1 and the live snapshot as JSON.

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
