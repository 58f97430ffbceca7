//! The command line: clap types and one handler per command. This is where files are
//! read and written; everything it calls into is pure.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{self, ConfigError};
use crate::model::{EnvName, Live};
use crate::plan::{self, Plan, PlanError};
use crate::render::{self, Format};

/// Snapshots and saved plans larger than this are refused: a thousand environments of
/// a dozen services each stay far below it.
const MAX_INPUT_BYTES: u64 = 16 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "pgconverge",
    version,
    about = "Converge PostgreSQL service versions to what pgconverge.yaml declares"
)]
pub struct Cli {
    /// Log format on stderr (filter with RUST_LOG).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the config file and report what it declares.
    Validate {
        /// Config file.
        #[arg(short = 'f', long = "file", default_value = "pgconverge.yaml")]
        file: PathBuf,
    },
    /// Show the actions that converge the live services to the config.
    Plan {
        #[arg(short = 'f', long = "file", default_value = "pgconverge.yaml")]
        file: PathBuf,
        /// Plan only this environment (repeatable).
        #[arg(long = "env", value_name = "NAME")]
        env: Vec<String>,
        /// Plan against this live-state snapshot instead of observing the provider.
        #[arg(long, value_name = "SNAPSHOT")]
        live: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Also save the plan (JSON, format 1) for `apply PLAN`.
        #[arg(long, value_name = "PLAN")]
        out: Option<PathBuf>,
        /// Exit 2 when the plan has changes, 0 when it has none.
        #[arg(long)]
        detailed_exitcode: bool,
    },
    /// Carry out a plan (a saved one, or a fresh one).
    Apply {
        #[arg(short = 'f', long = "file", default_value = "pgconverge.yaml")]
        file: PathBuf,
        /// A plan saved by `plan --out`.
        plan: Option<PathBuf>,
        #[arg(long = "env", value_name = "NAME")]
        env: Vec<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        auto_approve: bool,
    },
    /// Show the live services.
    Show {
        #[arg(short = 'f', long = "file", default_value = "pgconverge.yaml")]
        file: PathBuf,
        #[arg(long = "env", value_name = "NAME")]
        env: Vec<String>,
        /// Show this snapshot instead of observing the provider.
        #[arg(long, value_name = "SNAPSHOT")]
        live: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = ShowFormat::Text)]
        format: ShowFormat,
    },
    /// Print the JSON schema of pgconverge.yaml.
    Schema,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ShowFormat {
    Text,
    Json,
}

/// How a command ended when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// `plan --detailed-exitcode` found changes.
    ChangesPending,
}

/// Why a command failed. Each becomes exit code 1 and a report on stderr.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A snapshot or saved plan that cannot be read.
    #[error("{at}: {message}")]
    Input { at: String, message: String, hint: &'static str },
    /// The command needs a provider, which this build does not have yet.
    #[error("{0}")]
    NoProvider(&'static str),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The report printed on stderr: the error, then a hint.
    pub fn report(&self) -> String {
        let hint = match self {
            Error::Config(e) => return config::report(e),
            Error::Plan(PlanError::UnknownEnvironment(_)) => {
                Some("--env takes a name from `environments` in the config")
            }
            Error::Plan(_) => None,
            Error::Input { hint, .. } => Some(*hint),
            Error::NoProvider(_) => Some("plan against a snapshot: pgconverge plan --live examples/live.json"),
            Error::Write { .. } => None,
        };
        match hint {
            Some(h) => format!("error: {self}\n  hint: {h}"),
            None => format!("error: {self}"),
        }
    }
}

const NO_PROVIDER: &str = "this build has no provider yet, so it cannot observe or change live services";

/// Runs one command, writing results to `out`.
pub fn run(cli: Cli, out: &mut impl Write) -> Result<Outcome, Error> {
    match cli.command {
        Command::Validate { file } => {
            let config = config::load(&file)?;
            let desired = config.desired();
            let services: usize = desired.iter().map(|d| d.postgres.len()).sum();
            writeln!(
                out,
                "{} is valid: {} environment{}, {services} service{}.",
                file.display(),
                desired.len(),
                if desired.len() == 1 { "" } else { "s" },
                if services == 1 { "" } else { "s" }
            )
            .map_err(stdout_error)?;
            Ok(Outcome::Done)
        }
        Command::Plan { file, env, live, format, out: save, detailed_exitcode } => {
            let config = config::load(&file)?;
            let only = env_names(&env)?;
            let Some(live_path) = live else { return Err(Error::NoProvider(NO_PROVIDER)) };
            let live: Live = read_json(&live_path, "snapshot")?;
            let report = plan::plan(&config, &live, &only)?;
            for e in &report.environments {
                tracing::info!(env = %e.name, actions = e.steps.len(), outage = e.outage_actions, "planned");
            }
            if let Some(path) = save {
                let mut text = Vec::new();
                render::json::plan(&mut text, &report.plan).map_err(stdout_error)?;
                write_atomically(&path, &text)
                    .map_err(|source| Error::Write { path: path.display().to_string(), source })?;
            }
            match format {
                Format::Text => render::text::plan(out, &report, use_color()),
                Format::Markdown => render::markdown::plan(out, &report),
                Format::Json => render::json::plan(out, &report.plan),
            }
            .map_err(stdout_error)?;
            Ok(if detailed_exitcode && report.plan.has_changes() { Outcome::ChangesPending } else { Outcome::Done })
        }
        Command::Apply { file, plan, env, auto_approve: _ } => {
            config::load(&file)?;
            env_names(&env)?;
            if let Some(path) = plan {
                let saved: Plan = read_json(&path, "plan")?;
                if saved.format_version != crate::model::FORMAT_VERSION {
                    return Err(Error::Input {
                        at: path.display().to_string(),
                        message: format!("plan format_version {} is not supported", saved.format_version),
                        hint: "make the plan again with this version of pgconverge",
                    });
                }
            }
            Err(Error::NoProvider(NO_PROVIDER))
        }
        Command::Show { file: _, env, live, format } => {
            let only = env_names(&env)?;
            let Some(live_path) = live else { return Err(Error::NoProvider(NO_PROVIDER)) };
            let mut live: Live = read_json(&live_path, "snapshot")?;
            live.validate().map_err(|message| Error::Input {
                at: live_path.display().to_string(),
                message,
                hint: "a snapshot is what `pgconverge show --format json` prints",
            })?;
            if let Some(missing) = only.iter().find(|n| !live.environments.contains_key(*n)) {
                return Err(Error::Input {
                    at: live_path.display().to_string(),
                    message: format!("environment `{missing}` is not in the snapshot"),
                    hint: "--env takes a name of an environment the snapshot holds",
                });
            }
            if !only.is_empty() {
                live.environments.retain(|n, _| only.contains(n));
            }
            match format {
                ShowFormat::Text => render::text::live(out, &live),
                ShowFormat::Json => render::json::live(out, &live),
            }
            .map_err(stdout_error)?;
            Ok(Outcome::Done)
        }
        Command::Schema => {
            writeln!(out, "{}", schema_json()).map_err(stdout_error)?;
            Ok(Outcome::Done)
        }
    }
}

/// The JSON schema of pgconverge.yaml, as committed in `schemas/`.
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(config::Config);
    serde_json::to_string_pretty(&schema).unwrap_or_default()
}

fn env_names(names: &[String]) -> Result<Vec<EnvName>, Error> {
    names
        .iter()
        .map(|n| {
            EnvName::parse(n).map_err(|message| Error::Input {
                at: "--env".into(),
                message,
                hint: "--env takes a name from `environments` in the config",
            })
        })
        .collect()
}

fn stdout_error(source: std::io::Error) -> Error {
    Error::Write { path: "standard output".into(), source }
}

/// Reads a snapshot or saved plan, with file:line:col and the key path on errors.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &'static str) -> Result<T, Error> {
    let at = |line_col: Option<(usize, usize)>| match line_col {
        Some((l, c)) => format!("{}:{l}:{c}", path.display()),
        None => path.display().to_string(),
    };
    let hint = if what == "plan" {
        "a saved plan is what `pgconverge plan --out FILE` writes"
    } else {
        "a snapshot is what `pgconverge show --format json` prints"
    };
    let io = |e: std::io::Error| Error::Input { at: at(None), message: format!("cannot read the {what}: {e}"), hint };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_INPUT_BYTES {
        return Err(Error::Input {
            at: at(None),
            message: format!("the {what} is {len} bytes; at most {MAX_INPUT_BYTES} are read"),
            hint,
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let located = |e: &serde_json::Error| (e.line() > 0).then(|| (e.line(), e.column()));
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let key = match e.path().to_string() {
            p if p == "." => String::new(),
            p => format!("{p}: "),
        };
        let inner = e.into_inner();
        Error::Input { at: at(located(&inner)), message: format!("{key}{}", json_message(&inner)), hint }
    })?;
    de.end().map_err(|e| Error::Input { at: at(located(&e)), message: json_message(&e), hint })?;
    Ok(value)
}

/// serde_json's message without the position it appends (shown as file:line:col).
fn json_message(e: &serde_json::Error) -> String {
    let mut message = e.to_string();
    if let Some(i) = message.find(" at line ") {
        message.truncate(i);
    }
    message
}

/// Writes `bytes` to `path` so that readers see the old file or the new one, never half.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "plan".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn use_color() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Sets up logging to stderr: RUST_LOG filters (default `warn`), text or JSON lines.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
