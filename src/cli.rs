//! The command line: clap types and one handler per command. This is where files are
//! read and written; everything it calls into is pure.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::apply::{self, ApplyError, Lock};
use crate::config::{self, Config, ConfigError};
use crate::model::{EnvName, Live};
use crate::plan::{self, Plan, PlanError};
use crate::provider::divio::DivioProvider;
use crate::provider::local::LocalProvider;
use crate::provider::{Provider, ProviderError};
use crate::render;

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

/// The config file and the environments a command is about.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// Config file.
    #[arg(short = 'f', long = "file", default_value = "pgconverge.yaml")]
    pub file: PathBuf,
    /// Only this environment (repeatable).
    #[arg(long = "env", value_name = "NAME")]
    pub env: Vec<String>,
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
        #[command(flatten)]
        target: Target,
        /// Plan against this live-state snapshot instead of observing the provider.
        #[arg(long, value_name = "SNAPSHOT")]
        live: Option<PathBuf>,
        /// Output: text for people, markdown for pull-request comments, json (plan format 1).
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
        #[command(flatten)]
        target: Target,
        /// A plan saved by `plan --out`; refused if the live state changed since.
        plan: Option<PathBuf>,
        /// Do not ask for confirmation.
        #[arg(long)]
        auto_approve: bool,
        /// While another apply holds the lock, wait this long for it (`30s`, `5m`, `1h`)
        /// instead of stopping at once.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0s")]
        lock_timeout: std::time::Duration,
        /// Output: text for people; json: one document on stdout once apply ends (what
        /// it did, action by action), everything else on stderr. json needs
        /// --auto-approve.
        #[arg(long, value_enum, default_value_t = ShowFormat::Text)]
        format: ShowFormat,
    },
    /// Show the live services.
    Show {
        #[command(flatten)]
        target: Target,
        /// Show this snapshot instead of observing the provider.
        #[arg(long, value_name = "SNAPSHOT")]
        live: Option<PathBuf>,
        /// Output: text for people, json (the live-state snapshot, format 1).
        #[arg(long, value_enum, default_value_t = ShowFormat::Text)]
        format: ShowFormat,
    },
    /// Write a first pgconverge.yaml from the services that run now, each at the major it
    /// runs, so that the next plan has nothing to change.
    Init {
        /// Where the services live.
        #[arg(long, value_enum)]
        provider: InitProvider,
        /// local: the provider's root, as given here (relative to the working directory).
        /// Default .pgconverge beside the file.
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// divio: the application's slug or uuid; every one of its environments is declared.
        #[arg(long, value_name = "APP", required_if_eq("provider", "divio"))]
        application: Option<String>,
        /// divio: the Control Panel zone, or a full URL. Default divio.com.
        #[arg(long, value_name = "ZONE")]
        zone: Option<String>,
        /// divio: the environment variable that holds the API token. Default DIVIO_TOKEN.
        #[arg(long, value_name = "NAME")]
        token_env: Option<String>,
        /// The file to write; `-` writes it on standard output.
        #[arg(long, value_name = "FILE", default_value = "pgconverge.yaml")]
        out: PathBuf,
        /// Overwrite the file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Print the JSON schema of pgconverge.yaml.
    Schema,
    /// Print a shell completion script (e.g. `pgconverge completions bash > /etc/bash_completion.d/pgconverge`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff; e.g. `pgconverge man > /usr/local/share/man/man1/pgconverge.1`).
    Man,
}

/// Output format of `plan`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Markdown,
    Json,
}

/// The providers `init` can draft a config for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InitProvider {
    Local,
    Divio,
}

/// Output format of `show` and `apply`.
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
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// apply would have to ask, and cannot.
    #[error("apply needs confirmation, and standard input is not a terminal")]
    NotATerminal,
    /// The user did not confirm.
    #[error("apply cancelled: nothing was changed")]
    Cancelled,
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
            Error::Write { .. } | Error::Cancelled => None,
            Error::Provider(ProviderError::Locked { .. }) => {
                Some("wait for it to finish, or pass --lock-timeout 5m to wait; the lock ends with its process, however it ends")
            }
            Error::Provider(_) => None,
            Error::NotATerminal => Some("review the plan, then run apply with --auto-approve (or apply a saved plan)"),
            Error::Apply(e) => {
                let mut text = format!("error: {self}");
                if !e.done().is_empty() {
                    text.push_str("\n  completed before the failure:");
                    for d in e.done() {
                        text.push_str(&format!("\n    {d}"));
                    }
                }
                if !matches!(e, ApplyError::Stale { .. }) {
                    text.push_str("\n  hint: fix the cause, then run `pgconverge apply` again: it plans from what is there and finishes the job");
                } else {
                    text.push_str("\n  hint: make a new plan with `pgconverge plan --out FILE` and review it");
                }
                return text;
            }
        };
        match hint {
            Some(h) => format!("error: {self}\n  hint: {h}"),
            None => format!("error: {self}"),
        }
    }
}

/// The provider the config names, with its records in the state database if it has one.
fn provider_of(config: &Config, file: &Path) -> Result<Box<dyn Provider>, Error> {
    let mut provider: Box<dyn Provider> = match &config.provider.divio {
        Some(divio) => Box::new(DivioProvider::new(divio, file, config.desired())?),
        None => Box::new(
            LocalProvider::new(&config.provider.local.clone().unwrap_or_default(), file)?.for_envs(&config.desired()),
        ),
    };
    if let Some(state) = &config.state {
        let state = provider_state(&state.postgres, provider.identity())?;
        provider.keep_records_in(state)?;
    }
    Ok(provider)
}

/// The core's ledger (`crate::ledger`): in the state database when the config names one,
/// else in `root/ledger.json`.
fn ledger_of(state: Option<&config::StateConfig>, provider: &dyn Provider) -> Result<crate::ledger::Kept, Error> {
    use crate::ledger::{Kept, Ledger};
    let unreadable = |e: String| Error::Provider(ProviderError::Inconsistent(e));
    match state {
        Some(state) => {
            let db = provider_state(&state.postgres, provider.identity())?;
            let ledger = match db.get("ledger").map_err(|e| Error::Provider(e.into()))? {
                Some(text) => {
                    serde_json::from_str(&text).map_err(|e| unreadable(format!("the state database's ledger: {e}")))?
                }
                None => Ledger::default(),
            };
            let save = move |l: &Ledger| -> Result<(), crate::ledger::SaveError> {
                Ok(db.put("ledger", &serde_json::to_string(l)?)?)
            };
            Ok(Kept::new(ledger, Box::new(save)))
        }
        None => {
            let path = provider.root().join("ledger.json");
            let ledger = match std::fs::read(&path) {
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .map_err(|e| unreadable(format!("{}: {e}; remove it to start afresh", path.display())))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ledger::default(),
                Err(e) => return Err(unreadable(format!("cannot read {}: {e}", path.display()))),
            };
            let save = move |l: &Ledger| -> Result<(), crate::ledger::SaveError> {
                let bytes = serde_json::to_vec_pretty(l)?;
                crate::atomic::write_atomically(&path, &bytes, 0o644)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()).into())
            };
            Ok(Kept::new(ledger, Box::new(save)))
        }
    }
}

/// The state database for `identity`, or why it cannot be used.
fn provider_state(postgres: &config::PostgresState, identity: String) -> Result<crate::state::PgState, Error> {
    crate::state::PgState::new(postgres, identity).map_err(|e| Error::Provider(e.into()))
}

/// Plans against the snapshot at `live`, or against what the provider observes.
fn observe(config: &Config, file: &Path, live: Option<&Path>) -> Result<(Live, Option<Box<dyn Provider>>), Error> {
    match live {
        Some(path) => Ok((read_json::<Live>(path, "snapshot")?.settled(), None)),
        None => {
            let mut p = provider_of(config, file)?;
            let mut live = p.observe()?;
            ledger_of(config.state.as_ref(), p.as_ref())?.ledger.merge(&mut live);
            let live = live.settled();
            Ok((live, Some(p)))
        }
    }
}

/// Progress on stderr: a spinner per action on a terminal, one line per action otherwise.
/// A provider's `progress::say` lines go beside the action's: into the spinner's
/// message, or on lines of their own under the action's.
#[derive(Default)]
struct StderrProgress {
    bar: Option<indicatif::ProgressBar>,
    /// The action's line was broken by `say` lines, so its end repeats its label.
    broken: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl apply::Progress for StderrProgress {
    fn started(&mut self, env: &str, number: usize, total: usize, action: &plan::Action) {
        let label = format!("[{env} {number}/{total}] {}", action);
        let bar = indicatif::ProgressBar::new_spinner();
        let broken = self.broken.clone();
        broken.store(false, std::sync::atomic::Ordering::Relaxed);
        if bar.is_hidden() {
            eprint!("{label} … ");
            let _ = std::io::stderr().flush();
            crate::progress::set_sink(Some(Box::new(move |what| {
                let first = !broken.swap(true, std::sync::atomic::Ordering::Relaxed);
                eprintln!("{}  {what}", if first { "\n" } else { "" });
            })));
        } else {
            bar.set_message(label.clone());
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            let shown = bar.clone();
            crate::progress::set_sink(Some(Box::new(move |what| shown.set_message(format!("{label}: {what}")))));
        }
        self.bar = Some(bar);
    }

    fn finished(
        &mut self,
        env: &str,
        number: usize,
        total: usize,
        action: &plan::Action,
        seconds: f64,
        detail: Option<String>,
    ) {
        crate::progress::set_sink(None);
        let detail = detail.map(|d| format!(", {d}")).unwrap_or_default();
        let done = format!("done ({seconds:.1} s{detail})");
        let label = format!("[{env} {number}/{total}] {}", action);
        match self.bar.take() {
            Some(bar) if !bar.is_hidden() => bar.finish_with_message(format!("{label} … {done}")),
            _ if self.broken.load(std::sync::atomic::Ordering::Relaxed) => eprintln!("{label} … {done}"),
            _ => eprintln!("{done}"),
        }
    }
}

/// A `Progress` that also records each action's start and time, for `apply --format json`.
struct Recording<'a> {
    inner: &'a mut dyn apply::Progress,
    record: &'a mut render::result::Record,
}

impl apply::Progress for Recording<'_> {
    fn started(&mut self, env: &str, number: usize, total: usize, action: &plan::Action) {
        self.record.started(env, number, std::time::Instant::now());
        self.inner.started(env, number, total, action);
    }

    fn finished(
        &mut self,
        env: &str,
        number: usize,
        total: usize,
        action: &plan::Action,
        seconds: f64,
        detail: Option<String>,
    ) {
        self.record.finished(env, number, seconds);
        self.inner.finished(env, number, total, action, seconds, detail);
    }
}

/// `30s`, `5m`, `1h`, `90` (seconds).
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = text.find(|c: char| c.is_ascii_alphabetic()).map_or((text, "s"), |at| text.split_at(at));
    let seconds = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("`{text}`: say how long in s, m or h (e.g. 30s, 5m)")),
    };
    let value: f64 = number.trim().parse().map_err(|_| format!("`{text}` is not a duration (e.g. 30s, 5m)"))?;
    if !(value.is_finite() && value >= 0.0 && value * seconds <= 86_400.0) {
        return Err(format!("`{text}`: between 0 and a day"));
    }
    Ok(std::time::Duration::from_secs_f64(value * seconds))
}

/// The environment an apply stopped in, when it stopped inside one.
fn stopped_in(e: &Error) -> Option<String> {
    match e {
        Error::Apply(
            ApplyError::Refused { env, .. }
            | ApplyError::Action { env, .. }
            | ApplyError::Interrupted { env, .. }
            | ApplyError::Surprise { env, .. },
        ) => Some(env.clone()),
        _ => None,
    }
}

/// `apply`: plan (or take the saved plan), show it on `out`, confirm, carry it out, and
/// record what was done into `record`.
fn apply_command(
    Target { file, env }: Target,
    saved: Option<PathBuf>,
    auto_approve: bool,
    lock_timeout: std::time::Duration,
    out: &mut impl Write,
    record: &mut render::result::Record,
) -> Result<Outcome, Error> {
    let config = config::load(&file)?;
    let only = env_names(&env)?;
    let saved: Option<Plan> = match &saved {
        Some(path) => {
            let p: Plan = read_json(path, "plan")?;
            let refuse = |message: String, hint| Error::Input { at: path.display().to_string(), message, hint };
            if p.format_version != crate::model::FORMAT_VERSION {
                return Err(refuse(
                    format!("plan format_version {} is not supported", p.format_version),
                    "make the plan again with this version of pgconverge",
                ));
            }
            if !only.is_empty() {
                return Err(refuse(
                    "--env cannot narrow a saved plan: it runs whole, as it was shown".into(),
                    "make the plan for those environments: `pgconverge plan --env NAME --out FILE`",
                ));
            }
            if p.config != plan::config_digest(&config) {
                return Err(refuse(
                    format!("the plan was made for another config than {} as it is now", file.display()),
                    "make the plan again from this config: `pgconverge plan --out FILE`",
                ));
            }
            Some(p)
        }
        None => None,
    };
    let mut provider = provider_of(&config, &file)?;
    provider.preflight()?;
    let _lock = match &config.state {
        Some(state) => apply::lock_in(&provider_state(&state.postgres, provider.identity())?, lock_timeout)?,
        None => apply::Held::File(Lock::acquire(provider.root(), lock_timeout)?),
    };
    provider.recover()?;
    let mut ledger = ledger_of(config.state.as_ref(), provider.as_ref())?;
    let mut live = provider.observe()?;
    ledger
        .update(|l| l.prune(&live))
        .map_err(|e| Error::Provider(ProviderError::Failed(format!("cannot write the ledger: {e}"))))?;
    ledger.ledger.merge(&mut live);
    let live = live.settled();
    provider.recover_observed()?;
    // A saved plan is shown and run as it is, never a fresh one in its place.
    let report = match saved {
        Some(p) => {
            apply::check_fresh(&p, &live)?;
            plan::report_of(&config, &live, &p)?
        }
        None => plan::plan(&config, &live, &only)?,
    };
    let plan = report.plan.clone();
    record.planned(&plan);
    provider.check(&plan)?;
    let compose = compose_edit(&config, &file, &only)?;
    if !plan.has_changes() {
        writeln!(out, "No changes. The live services match the config.").map_err(stdout_error)?;
        if let Some(edit) = &compose {
            render_compose_edit(out, edit, Format::Text).map_err(stdout_error)?;
            if !auto_approve {
                confirm(out)?;
            }
            write_compose_edit(out, edit)?;
        }
        return Ok(Outcome::Done);
    }
    render::text::plan(out, &report, use_color()).map_err(stdout_error)?;
    if let Some(edit) = &compose {
        render_compose_edit(out, edit, Format::Text).map_err(stdout_error)?;
    }
    if !auto_approve {
        confirm(out)?;
    }
    crate::interrupt::install()
        .map_err(|e| Error::Provider(ProviderError::Failed(format!("cannot handle signals: {e}"))))?;
    let total: usize = plan.environments.iter().map(|e| e.actions.len()).sum();
    let started = std::time::Instant::now();
    let desired = config.desired();
    let mut progress = StderrProgress::default();
    let mut recording = Recording { inner: &mut progress, record: &mut *record };
    let applied = apply::apply(provider.as_mut(), &desired, &plan, &live, &mut recording, &mut ledger)?;
    let outages: Vec<(String, std::time::Duration)> =
        applied.write_outages.iter().map(|(env, d)| (env.to_string(), *d)).collect();
    record.converged(&outages);
    writeln!(
        out,
        "Apply complete: {total} action{} in {:.1} s.",
        if total == 1 { "" } else { "s" },
        started.elapsed().as_secs_f64()
    )
    .map_err(stdout_error)?;
    for (env, outage) in &applied.write_outages {
        writeln!(out, "Writes were blocked for {:.2} s in environment {env} (fence to deploy).", outage.as_secs_f64())
            .map_err(stdout_error)?;
    }
    for env in plan.environments.iter().filter(|e| !e.actions.is_empty()) {
        if let Some(path) = provider.env_file(&env.name).filter(|p| p.exists()) {
            writeln!(out, "Environment {}: the application reads {}", env.name, path.display())
                .map_err(stdout_error)?;
        }
    }
    if let Some(edit) = &compose {
        write_compose_edit(out, edit)?;
    }
    Ok(Outcome::Done)
}

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
        Command::Plan { target: Target { file, env }, live, format, out: save, detailed_exitcode } => {
            let config = config::load(&file)?;
            let only = env_names(&env)?;
            let (live, provider) = observe(&config, &file, live.as_deref())?;
            let report = plan::plan(&config, &live, &only)?;
            if let Some(p) = &provider {
                p.check(&report.plan)?;
            }
            for e in &report.environments {
                tracing::info!(env = %e.name, actions = e.steps.len(), outage = e.outage_actions, "planned");
            }
            if let Some(path) = save {
                let mut text = Vec::new();
                render::json::plan(&mut text, &report.plan).map_err(stdout_error)?;
                crate::atomic::write_atomically(&path, &text, 0o644)
                    .map_err(|source| Error::Write { path: path.display().to_string(), source })?;
            }
            let compose = compose_edit(&config, &file, &only)?;
            match format {
                Format::Text => render::text::plan(out, &report, use_color()),
                Format::Markdown => render::markdown::plan(out, &report),
                Format::Json => render::json::plan(out, &report.plan),
            }
            .map_err(stdout_error)?;
            if let Some(edit) = &compose {
                render_compose_edit(out, edit, format).map_err(stdout_error)?;
            }
            let changes = report.plan.has_changes() || compose.is_some();
            Ok(if detailed_exitcode && changes { Outcome::ChangesPending } else { Outcome::Done })
        }
        Command::Apply { target, plan: saved, auto_approve, lock_timeout, format: ShowFormat::Text } => {
            apply_command(target, saved, auto_approve, lock_timeout, out, &mut render::result::Record::default())
        }
        Command::Apply { target, plan: saved, auto_approve, lock_timeout, format: ShowFormat::Json } => {
            let mut record = render::result::Record::default();
            let result = if auto_approve {
                apply_command(target, saved, true, lock_timeout, &mut std::io::stderr(), &mut record)
            } else {
                Err(Error::Input {
                    at: "apply --format json".into(),
                    message: "needs --auto-approve: its standard output is the result document, not a prompt".into(),
                    hint: "review the plan with `pgconverge plan`, then run apply --format json --auto-approve",
                })
            };
            let error = result.as_ref().err().map(|e| (e.to_string(), stopped_in(e)));
            let stopped = error.as_ref().map(|(m, env)| (m.as_str(), env.as_deref()));
            let doc = render::result::document(&record, stopped, std::time::Instant::now());
            render::json::result(out, &doc).map_err(stdout_error)?;
            result
        }
        Command::Show { target: Target { file, env }, live: snapshot, format } => {
            let only = env_names(&env)?;
            let mut live = match &snapshot {
                Some(path) => {
                    let live: Live = read_json(path, "snapshot")?;
                    live.validate().map_err(|message| Error::Input {
                        at: path.display().to_string(),
                        message,
                        hint: "a snapshot is what `pgconverge show --format json` prints",
                    })?;
                    live
                }
                None => observe(&config::load(&file)?, &file, None)?.0,
            };
            if let Some(missing) = only.iter().find(|n| !live.environments.contains_key(*n)) {
                return Err(Error::Input {
                    at: snapshot.map(|p| p.display().to_string()).unwrap_or_else(|| "--env".into()),
                    message: format!("environment `{missing}` has no services"),
                    hint: "--env takes the name of an environment that has services",
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
        Command::Init { provider, root, application, zone, token_env, out: file, force } => {
            let provider = match (provider, root, application) {
                (InitProvider::Local, root, None) if zone.is_none() && token_env.is_none() => Init::Local { root },
                (InitProvider::Divio, None, Some(application)) => Init::Divio(config::DivioConfig {
                    application,
                    zone,
                    token_env,
                    root: None,
                    fence_command: None,
                    unfence_command: None,
                    verify_command: None,
                    poll_seconds: None,
                    wait_minutes: None,
                }),
                (InitProvider::Local, ..) => {
                    return Err(init_usage("--application, --zone and --token-env are for --provider divio"))
                }
                (InitProvider::Divio, ..) => return Err(init_usage("--root is for --provider local")),
            };
            init_command(provider, &file, force, out)
        }
        Command::Schema => {
            writeln!(out, "{}", schema_json()).map_err(stdout_error)?;
            Ok(Outcome::Done)
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "pgconverge", out);
            Ok(Outcome::Done)
        }
        Command::Man => {
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(out).map_err(stdout_error)?;
            Ok(Outcome::Done)
        }
    }
}

/// What `init` observes.
enum Init {
    Local { root: Option<PathBuf> },
    Divio(config::DivioConfig),
}

fn init_usage(message: &str) -> Error {
    Error::Input { at: "init".into(), message: message.into(), hint: "see `pgconverge init --help`" }
}

/// `init`: observes the provider, drafts the config (`crate::init`), checks it by planning
/// against it, and writes it to `path` (`-`: `out`) and nothing else.
fn init_command(init: Init, path: &Path, force: bool, out: &mut impl Write) -> Result<Outcome, Error> {
    let to_stdout = path == Path::new("-");
    // The file the draft is for: the provider's paths are relative to its directory.
    let file = if to_stdout { PathBuf::from("pgconverge.yaml") } else { path.to_owned() };
    let at = file.display().to_string();
    if !to_stdout && !force && std::fs::symlink_metadata(&file).is_ok() {
        return Err(Error::Input {
            at,
            message: "the file exists; init writes a new config and leaves this one as it is".into(),
            hint: "pass --force to overwrite it, or --out FILE to write another",
        });
    }
    let (drafted, mut provider, order): (crate::init::Provider, Box<dyn Provider>, Option<Vec<EnvName>>) = match init {
        Init::Local { root } => {
            let given = root.unwrap_or_else(|| file.parent().unwrap_or(Path::new("")).join(".pgconverge"));
            let root = written_root(&given, &file)?;
            let local = config::LocalConfig { root: Some(PathBuf::from(&root)), ..Default::default() };
            let provider = LocalProvider::new(&local, &file)?;
            if !provider.holds_services() {
                return Err(Error::Input {
                    at: given.display().to_string(),
                    message: "holds no services of the local provider (it has no state/ directory)".into(),
                    hint: "--root names the directory the local provider keeps its servers in (`root` in its config)",
                });
            }
            let pooler = provider.has_poolers();
            (crate::init::Provider::Local { root, pooler }, Box::new(provider), None)
        }
        Init::Divio(divio) => {
            let envs = DivioProvider::new(&divio, &file, Vec::new())?.environments()?;
            let desired = envs
                .iter()
                .map(|name| config::DesiredEnv {
                    name: name.clone(),
                    postgres: Vec::new(),
                    upgrade: config::Upgrade::default(),
                })
                .collect();
            let provider = DivioProvider::new(&divio, &file, desired)?;
            let drafted = crate::init::Provider::Divio {
                application: divio.application.clone(),
                zone: divio.zone.clone(),
                token_env: divio.token_env.clone(),
            };
            (drafted, Box::new(provider), Some(envs))
        }
    };
    let mut live = provider.observe()?;
    ledger_of(None, provider.as_ref())?.ledger.merge(&mut live);
    let live = live.settled();
    let order = order.unwrap_or_else(|| live.environments.keys().cloned().collect());
    let draft = crate::init::draft(&live, &order, &drafted);
    if draft.environments == 0 {
        return Err(Error::Input {
            at: "init".into(),
            message: format!(
                "no PostgreSQL service is attached in any of the {} environment(s) found: there is nothing to declare",
                order.len()
            ),
            hint: "write pgconverge.yaml by hand (see examples/): the first apply adds what it declares",
        });
    }
    let config = config::parse(&file, &draft.text).map_err(|e| {
        Error::Provider(ProviderError::Failed(format!("init drafted a config it cannot read back (a bug): {e}")))
    })?;
    // What the next plan makes of it: nothing, unless work was left half done.
    let (live, provider) = observe(&config, &file, None)?;
    let report = plan::plan(&config, &live, &[])?;
    let refused = provider.and_then(|p| p.check(&report.plan).err());

    let mut summary = String::new();
    if to_stdout {
        write!(out, "{}", draft.text).map_err(stdout_error)?;
    } else {
        let written = if force {
            crate::atomic::write_atomically(&file, draft.text.as_bytes(), 0o644)
        } else {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&file)
                .and_then(|mut f| f.write_all(draft.text.as_bytes()).and_then(|()| f.sync_all()))
        };
        written.map_err(|source| Error::Write { path: at.clone(), source })?;
        summary.push_str(&format!("Wrote {at}: "));
    }
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    summary.push_str(&format!(
        "{}, {} declared at the majors they run.\n",
        plural(draft.environments, "environment"),
        plural(draft.services, "service")
    ));
    if report.plan.has_changes() {
        for env in report.plan.environments.iter().filter(|e| !e.actions.is_empty()) {
            summary.push_str(&format!(
                "`pgconverge plan` still has {} in {}: the comments in the file say why; review them before any apply.\n",
                plural(env.actions.len(), "action"),
                env.name
            ));
        }
        if let Some(e) = refused {
            summary.push_str(&format!("  It refuses to carry them out until a person decides: {e}\n"));
        }
    } else {
        summary.push_str("`pgconverge plan` has nothing to change.\n");
    }
    for note in &draft.notes {
        summary.push_str(&format!("  {}\n", crate::model::printable(note)));
    }
    if to_stdout {
        eprint!("{summary}");
    } else {
        write!(out, "{summary}").map_err(stdout_error)?;
    }
    Ok(Outcome::Done)
}

/// The local provider's root as the config beside `file` writes it: relative to the
/// file's directory when it is under it, else absolute.
fn written_root(root: &Path, file: &Path) -> Result<String, Error> {
    let resolve = |p: &Path, what: &str| {
        let p = if p.as_os_str().is_empty() { Path::new(".") } else { p };
        std::fs::canonicalize(p).map_err(|e| Error::Input {
            at: p.display().to_string(),
            message: format!("cannot find the {what}: {e}"),
            hint: "--root names the directory the local provider keeps its servers in; --out a file in an existing directory",
        })
    };
    let root = resolve(root, "root")?;
    let dir = resolve(file.parent().unwrap_or(Path::new("")), "file's directory")?;
    let written = match root.strip_prefix(&dir) {
        Ok(rel) if rel.as_os_str().is_empty() => PathBuf::from("."),
        Ok(rel) => rel.to_owned(),
        Err(_) => root.clone(),
    };
    written.to_str().map(str::to_owned).ok_or_else(|| Error::Input {
        at: root.display().to_string(),
        message: "the root's path is not UTF-8, which pgconverge.yaml cannot hold".into(),
        hint: "move the root to a path of UTF-8 characters",
    })
}

/// The compose file of `local_dev` and the edit that makes it follow its environment;
/// `None` when there is no `local_dev` or the file is there already.
struct ComposeEdit {
    path: PathBuf,
    old: String,
    retag: crate::localdev::Retag,
    service: String,
}

/// Only when the followed environment is among those planned (`only`; empty is all).
fn compose_edit(config: &Config, file: &Path, only: &[EnvName]) -> Result<Option<ComposeEdit>, Error> {
    let (Some(dev), Some(major)) = (&config.local_dev, config.local_dev_major()) else { return Ok(None) };
    if !only.is_empty() && !only.contains(&dev.follows) {
        return Ok(None);
    }
    let path = file.parent().unwrap_or(Path::new("")).join(&dev.compose_file);
    let hint = "local_dev.compose_file names a compose file whose `services.<service>.image` has a version tag";
    let old = std::fs::read_to_string(&path).map_err(|e| Error::Input {
        at: path.display().to_string(),
        message: format!("cannot read the compose file of local_dev: {e}"),
        hint,
    })?;
    let retag = crate::localdev::retag(&old, &dev.service, major).map_err(|e| Error::Input {
        at: match e.at {
            Some((line, col)) => format!("{}:{line}:{col}", path.display()),
            None => path.display().to_string(),
        },
        message: e.message,
        hint,
    })?;
    Ok(retag.map(|retag| ComposeEdit { path, old, retag, service: dev.service.clone() }))
}

fn render_compose_edit(out: &mut impl Write, edit: &ComposeEdit, format: Format) -> std::io::Result<()> {
    let path = edit.path.display().to_string();
    let diff = crate::localdev::diff(&path, &edit.old, &edit.retag.text);
    match format {
        Format::Text => {
            writeln!(out, "Local development: {path} moves service {} to {}:", edit.service, edit.retag.to)?;
            write!(out, "{diff}")
        }
        Format::Markdown => {
            writeln!(out)?;
            writeln!(out, "#### Local development: `{path}`")?;
            writeln!(out)?;
            writeln!(out, "```diff")?;
            write!(out, "{diff}")?;
            writeln!(out, "```")
        }
        // Plan format 1 has no place for it; apply works it out from the config again.
        Format::Json => Ok(()),
    }
}

/// Writes the compose edit and says what a developer runs next: the old data volume
/// holds a cluster the new major cannot open.
fn write_compose_edit(out: &mut impl Write, edit: &ComposeEdit) -> Result<(), Error> {
    let mode =
        std::fs::metadata(&edit.path).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777);
    crate::atomic::write_atomically(&edit.path, edit.retag.text.as_bytes(), mode.unwrap_or(0o644))
        .map_err(|source| Error::Write { path: edit.path.display().to_string(), source })?;
    let file = edit.path.display();
    let service = &edit.service;
    writeln!(
        out,
        "Local development: {file} now runs {} for service {service} (was {}). Its data volume holds a \
         cluster the new major cannot open; recreate it and load the data again:\n  \
         docker compose -f {file} down -v\n  \
         docker compose -f {file} pull {service}\n  \
         docker compose -f {file} up -d\n  \
         then pull the database into it (on Divio: divio app pull db)",
        edit.retag.to, edit.retag.from
    )
    .map_err(stdout_error)
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

/// Asks on the terminal; anything but "yes" cancels.
fn confirm(out: &mut impl Write) -> Result<(), Error> {
    if !std::io::stdin().is_terminal() {
        return Err(Error::NotATerminal);
    }
    write!(out, "\nApply these actions? Only 'yes' is accepted: ").map_err(stdout_error)?;
    out.flush().map_err(stdout_error)?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).map_err(stdout_error)?;
    if answer.trim() != "yes" {
        return Err(Error::Cancelled);
    }
    Ok(())
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
