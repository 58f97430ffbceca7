//! What happens inside a long action: what a wait is waiting for ("waiting for NEW to
//! finish provisioning: PROVISIONING for 2m10s"), an answer lost and what was done about
//! it. Providers say it with `say`; the CLI decides where it goes with `set_sink`, beside
//! the line of the action under way. Without a sink (a library user, a unit test) it goes
//! to the log.

use std::sync::Mutex;

type Sink = Box<dyn Fn(&str) + Send>;

static SINK: Mutex<Option<Sink>> = Mutex::new(None);

/// Where `say` lines go from now on; `None`: to the log.
pub fn set_sink(sink: Option<Sink>) {
    *SINK.lock().unwrap_or_else(|e| e.into_inner()) = sink;
}

/// Says one line about the action under way.
pub fn say(what: &str) {
    match SINK.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        Some(sink) => sink(what),
        None => tracing::info!("{what}"),
    }
}
