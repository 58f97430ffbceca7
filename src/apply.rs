//! The executor: carries out a plan's actions through a provider, in order, and after
//! each one observes again and checks that the live state is what the rules predicted.
//! It keeps no journal: the live state is the only truth, and a run that stops halfway
//! is finished by planning afresh and applying again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{DesiredEnv, Verify};
use crate::ledger::Kept;
use crate::model::{human_bytes, EnvLive, Live};
use crate::plan::{self, Action, Plan, Prediction};
use crate::provider::{Backup, Provider, ProviderError};

/// Why an apply stopped. Every variant carries what ran before it.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The saved plan was made from a live state that has since changed.
    #[error("the plan is stale: the live state changed since it was made ({})", .changes.join("; "))]
    Stale { changes: Vec<String> },
    /// Observing the live state failed.
    #[error("cannot observe the live state: {0}")]
    Observe(#[source] ProviderError),
    /// The rules refuse an action of the plan in the state it would run in.
    #[error("environment {env}: action {number} ({action}) is not allowed now: {reason}")]
    Refused { env: String, number: usize, action: String, reason: String, done: Vec<String> },
    /// The provider failed to carry out an action.
    #[error("environment {env}: action {number} ({action}) failed: {source}")]
    Action {
        env: String,
        number: usize,
        action: String,
        #[source]
        source: ProviderError,
        done: Vec<String>,
    },
    /// SIGINT or SIGTERM asked apply to stop; it did, between two actions.
    #[error("interrupted by a signal at environment {env}'s action {number} ({action}): {}", if *.fenced { "writes stay blocked (the old service is fenced) until an apply finishes: run `pgconverge apply` again now" } else { "nothing is fenced; run `pgconverge apply` again to finish" })]
    Interrupted { env: String, number: usize, action: String, fenced: bool, done: Vec<String> },
    /// After an action the live state is not what the rules predicted.
    #[error("environment {env}: after action {number} ({action}) the live state is not as predicted: {}", .differences.join("; "))]
    Surprise { env: String, number: usize, action: String, differences: Vec<String>, done: Vec<String> },
}

impl ApplyError {
    /// The actions that completed before the failure.
    pub fn done(&self) -> &[String] {
        match self {
            ApplyError::Refused { done, .. }
            | ApplyError::Action { done, .. }
            | ApplyError::Surprise { done, .. }
            | ApplyError::Interrupted { done, .. } => done,
            ApplyError::Stale { .. } | ApplyError::Observe(_) => &[],
        }
    }
}

/// One line per action as it completes, on stderr.
pub trait Progress {
    fn started(&mut self, env: &str, number: usize, total: usize, action: &Action);
    /// `detail`: what the action moved, for backup and restore.
    fn finished(
        &mut self,
        env: &str,
        number: usize,
        total: usize,
        action: &Action,
        seconds: f64,
        detail: Option<String>,
    );
}

/// Checks that `plan` was made from `live`; lists what changed when not.
pub fn check_fresh(plan: &Plan, live: &Live) -> Result<(), ApplyError> {
    if plan.observed == live.digest() {
        return Ok(());
    }
    let mut changes = Vec::new();
    for env in &plan.environments {
        let now = live.environments.get(&env.name).cloned().unwrap_or_default();
        changes.push(format!("environment {} now has: {}", env.name, summary(&now)));
    }
    if changes.is_empty() {
        changes.push("a different live state".into());
    }
    Err(ApplyError::Stale { changes })
}

fn summary(env: &EnvLive) -> String {
    if env.services.is_empty() {
        return "no services".into();
    }
    env.services
        .iter()
        .map(|s| {
            format!(
                "{} {} {} ({}{})",
                s.id,
                s.prefix,
                s.version,
                s.status.as_str(),
                if s.fenced { ", fenced" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What an apply did.
#[derive(Debug, Default)]
pub struct Applied {
    /// One line per action carried out.
    pub done: Vec<String>,
    /// Per environment, how long the application could not write (wall clock, from the
    /// start of the action that blocked writes to the end of the one that allowed them).
    pub write_outages: Vec<(String, Duration)>,
}

/// Carries out `plan` (made from `live`) environment by environment.
/// `ledger`: where the rules' facts about copies are kept (`crate::ledger`); written
/// around every action.
pub fn apply(
    provider: &mut dyn Provider,
    desired: &[DesiredEnv],
    plan: &Plan,
    live: &Live,
    progress: &mut dyn Progress,
    ledger: &mut Kept,
) -> Result<Applied, ApplyError> {
    replay(desired, plan, live)?;
    let mut done = Vec::new();
    let mut write_outages = Vec::new();
    for env_plan in &plan.environments {
        if env_plan.actions.is_empty() {
            continue;
        }
        let env = env_plan.name.as_str().to_owned();
        let Some(d) = desired.iter().find(|d| d.name == env_plan.name) else {
            return Err(ApplyError::Refused {
                env,
                number: 0,
                action: "-".into(),
                reason: "the config does not declare this environment".into(),
                done,
            });
        };
        let start = live.environments.get(&env_plan.name).cloned().unwrap_or_default();
        let mut prediction = Prediction::new(d, &start).map_err(|reason| ApplyError::Refused {
            env: env.clone(),
            number: 0,
            action: "-".into(),
            reason,
            done: done.clone(),
        })?;
        let total = env_plan.actions.len();
        let mut outage = Duration::ZERO;
        // An apply that finishes an upgrade a stopped one left fenced starts inside the
        // outage: it counts (and bounds the pause) from its own start.
        let mut blocked_since: Option<Instant> = prediction.writes_blocked().then(Instant::now);
        // A backup followed by a restore of it runs as one streamed step; the restore's
        // turn then only reports it.
        let mut restored_with_backup = false;
        // The latest backup of each service taken so far, for the restores that follow.
        let mut backups = BTreeMap::new();
        for (i, action) in env_plan.actions.iter().enumerate() {
            let number = i + 1;
            let label = action.to_string();
            let refused = |reason: String, done: &Vec<String>| ApplyError::Refused {
                env: env.clone(),
                number,
                action: label.clone(),
                reason,
                done: done.clone(),
            };
            let interrupted = |done: &Vec<String>, fenced: bool| ApplyError::Interrupted {
                env: env.clone(),
                number,
                action: label.clone(),
                fenced,
                done: done.clone(),
            };
            if crate::interrupt::requested() {
                return Err(interrupted(&done, prediction.writes_blocked()));
            }
            // With a pooler, the application's queries wait through the pause: past its
            // bound no further action starts but the deploy that ends it; the pause is
            // given up instead, everything unfenced, as safe as before the fence.
            let bound = provider.pause_bound(&d.name).filter(|_| !matches!(action, Action::Deploy));
            if let Some((bound, since)) = bound.zip(blocked_since) {
                if since.elapsed() > bound {
                    let unfenced = give_up_pause(provider, &d.name, &mut prediction, ledger).map_err(|source| {
                        ApplyError::Action {
                            env: env.clone(),
                            number,
                            action: label.clone(),
                            source,
                            done: done.clone(),
                        }
                    })?;
                    return Err(ApplyError::Action {
                        env: env.clone(),
                        number,
                        action: label.clone(),
                        source: ProviderError::Failed(format!(
                            "the pause had lasted {:.1} s, past upgrade.max_pause_seconds ({} s), before this action: \
                             it was given up, {} unfenced and the application's queries resumed on the old server; \
                             the next apply starts the copy's last steps again (raise the bound, or use verify: none \
                             to take the comparison out of the pause)",
                            since.elapsed().as_secs_f64(),
                            bound.as_secs(),
                            unfenced.join(", ")
                        )),
                        done,
                    });
                }
            }
            prediction.check(action).map_err(|r| refused(r, &done))?;
            progress.started(&env, number, total, action);
            let tripped = |name: String, done: &Vec<String>| {
                crate::failpoint::hit(&name).map_err(|m| ApplyError::Action {
                    env: env.clone(),
                    number,
                    action: label.clone(),
                    source: m.into(),
                    done: done.clone(),
                })
            };
            tripped(format!("before:{number}"), &done)?;
            let t = Instant::now();
            let keep = |ledger: &mut Kept, change: &dyn Fn(&mut crate::ledger::Ledger), done: &Vec<String>| {
                ledger.update(change).map_err(|e| ApplyError::Action {
                    env: env.clone(),
                    number,
                    action: label.clone(),
                    source: ProviderError::Failed(format!("cannot record what the action changes: {e}")),
                    done: done.clone(),
                })
            };
            // Claim nothing across the action that it may undo or not yet have done (a
            // restore already streamed with its backup has nothing left to do).
            if !restored_with_backup {
                let now = prediction.expected();
                if let Ok(after) = prediction.clone().advance(action, action.stand_in()) {
                    keep(ledger, &|l| l.weaken(&d.name, &now, &after), &done)?;
                }
            }
            // An action cut short by a signal is reported as the stop it is: what is fenced
            // is what the rules said before it, since a failed action changes nothing the
            // next plan relies on.
            let blocked = prediction.writes_blocked();
            let failed = |stop: Stop, done: &Vec<String>| match stop {
                Stop::Refused(reason) => refused(reason, done),
                Stop::Failed(_) if crate::interrupt::requested() => interrupted(done, blocked),
                Stop::Failed(source) => {
                    ApplyError::Action { env: env.clone(), number, action: label.clone(), source, done: done.clone() }
                }
            };
            let next = env_plan.actions.get(i + 1);
            let (new_id, detail) = if std::mem::take(&mut restored_with_backup) {
                (None, Some("streamed with the backup".to_owned()))
            } else if let Some(Action::Restore { service: target, from }) =
                next.filter(|n| streams(&prediction, action, n))
            {
                let verify = verified_later(&env_plan.actions[i..], target, d);
                let backup = (|| {
                    let (from, target) = (
                        prediction.resolve(from).map_err(Stop::Refused)?,
                        prediction.resolve(target).map_err(Stop::Refused)?,
                    );
                    provider.backup_and_restore(&d.name, &from, &target, verify).map_err(Stop::Failed)
                })()
                .map_err(|source| failed(source, &done))?;
                restored_with_backup = true;
                let detail = format!("{} dumped, streamed into {target}", human_bytes(backup.bytes));
                backups.insert(backup.of.clone(), backup);
                (None, Some(detail))
            } else {
                let ran = run(provider, d, &prediction, action, &env_plan.actions[i..], &mut backups);
                if let (Err(Stop::Failed(_)), Action::Verify { service, .. }) = (&ran, action) {
                    // The copy differs from its source: the next apply copies afresh.
                    if let Ok(id) = prediction.resolve(service) {
                        keep(ledger, &|l| l.distrust(&d.name, &id), &done)?;
                    }
                }
                ran.map_err(|source| failed(source, &done))?
            };
            // Done, not yet seen done nor recorded: where a crash leaves the ledger behind.
            tripped(format!("acted:{number}"), &done)?;
            let was_blocked = prediction.writes_blocked();
            let expected = prediction.advance(action, new_id).map_err(|r| refused(r, &done))?;
            // The action is done when the live state shows it, which on a platform that
            // acts in its own time is later than its answer.
            let observed = if restored_with_backup {
                None // the live state is a step ahead of the prediction until the restore's turn
            } else {
                Some(provider.settle(&d.name, &expected).map_err(|source| failed(Stop::Failed(source), &done))?)
            };
            // Seen done: what it made true. A backup streamed into its restore did both.
            let made = match next.filter(|_| restored_with_backup) {
                Some(restore) => prediction.clone().advance(restore, None).unwrap_or_else(|_| expected.clone()),
                None => expected.clone(),
            };
            keep(ledger, &|l| l.record(&d.name, &made), &done)?;
            match (was_blocked, prediction.writes_blocked()) {
                (false, true) => blocked_since = Some(t),
                (true, false) => outage += blocked_since.take().map_or(Duration::ZERO, |s| s.elapsed()),
                _ => {}
            }
            progress.finished(&env, number, total, action, t.elapsed().as_secs_f64(), detail);
            done.push(format!("{env}: {label}"));
            tripped(format!("after:{number}"), &done)?;
            let Some(mut observed) = observed else { continue };
            ledger.ledger.merge(&mut observed);
            let now = observed.environments.get(&env_plan.name).cloned().unwrap_or_default();
            let differences = plan::differences(&expected, &now);
            if !differences.is_empty() {
                return Err(ApplyError::Surprise { env, number, action: label, differences, done });
            }
        }
        outage += blocked_since.map_or(Duration::ZERO, |s| s.elapsed());
        if !outage.is_zero() {
            write_outages.push((env, outage));
        }
    }
    Ok(Applied { done, write_outages })
}

/// Unfences every fenced service the application sees, each as an `unfence` action would
/// (the ledger weakened before, recorded after); returns their ids.
fn give_up_pause(
    provider: &mut dyn Provider,
    env: &crate::model::EnvName,
    prediction: &mut Prediction,
    ledger: &mut Kept,
) -> Result<Vec<String>, ProviderError> {
    let keep = |ledger: &mut Kept, change: &dyn Fn(&mut crate::ledger::Ledger)| {
        ledger.update(change).map_err(|e| ProviderError::Failed(format!("cannot record what the action changes: {e}")))
    };
    let mut unfenced = Vec::new();
    let fenced: Vec<_> =
        prediction.expected().services.into_iter().filter(|s| s.status.visible() && s.fenced).map(|s| s.id).collect();
    for id in fenced {
        let unfence = Action::Unfence { service: id.clone() };
        let now = prediction.expected();
        let after = prediction.clone().advance(&unfence, None).map_err(ProviderError::Failed)?;
        keep(ledger, &|l| l.weaken(env, &now, &after))?;
        provider.unfence(env, &id)?;
        let made = prediction.advance(&unfence, None).map_err(ProviderError::Failed)?;
        keep(ledger, &|l| l.record(env, &made))?;
        unfenced.push(id.to_string());
    }
    Ok(unfenced)
}

/// Runs every action of `plan` through the rules from `live` before the first one is
/// carried out: a plan the rules refuse anywhere (a saved plan edited by hand, say) stops
/// with nothing touched, never halfway with the application fenced.
fn replay(desired: &[DesiredEnv], plan: &Plan, live: &Live) -> Result<(), ApplyError> {
    for env_plan in plan.environments.iter().filter(|e| !e.actions.is_empty()) {
        let env = env_plan.name.as_str().to_owned();
        let refused = |number: usize, action: String, reason: String| ApplyError::Refused {
            env: env.clone(),
            number,
            action,
            reason: format!("{reason} (checked before anything was done: nothing was touched)"),
            done: Vec::new(),
        };
        let Some(d) = desired.iter().find(|d| d.name == env_plan.name) else {
            return Err(refused(0, "-".into(), "the config does not declare this environment".into()));
        };
        let start = live.environments.get(&env_plan.name).cloned().unwrap_or_default();
        let mut prediction = Prediction::new(d, &start).map_err(|r| refused(0, "-".into(), r))?;
        for (i, action) in env_plan.actions.iter().enumerate() {
            prediction.advance(action, action.stand_in()).map_err(|r| refused(i + 1, action.to_string(), r))?;
        }
    }
    Ok(())
}

/// Whether `action` is a backup that `next` restores, allowed once the backup is done.
fn streams(prediction: &Prediction, action: &Action, next: &Action) -> bool {
    let (Action::Backup { service }, Action::Restore { from, .. }) = (action, next) else { return false };
    let mut after = prediction.clone();
    from == service && after.advance(action, None).is_ok() && after.check(next).is_ok()
}

/// How a verify later in the plan will compare `target` with its source: the provider
/// may take fingerprints ahead of it.
fn verified_later(rest: &[Action], target: &crate::model::ServiceId, d: &DesiredEnv) -> Verify {
    let later = rest.iter().any(|a| matches!(a, Action::Verify { service, .. } if service == target));
    if later {
        d.upgrade.verify
    } else {
        Verify::None
    }
}

/// Why one action did not run to its end.
enum Stop {
    /// The plan names a service the prediction does not know, or restores a backup this
    /// run did not take: nothing was done.
    Refused(String),
    /// The provider failed.
    Failed(ProviderError),
}

/// What an action gave back: the id of an added service, a word on what it moved.
type Ran = (Option<crate::model::ServiceId>, Option<String>);

/// Calls the provider for one action.
/// `backups`: the latest backup of each service taken in this run, which a backup adds to
/// and a restore takes from.
fn run(
    p: &mut dyn Provider,
    d: &DesiredEnv,
    prediction: &Prediction,
    action: &Action,
    rest: &[Action],
    backups: &mut BTreeMap<crate::model::ServiceId, Backup>,
) -> Result<Ran, Stop> {
    let env = &d.name;
    let id = |s: &crate::model::ServiceId| prediction.resolve(s).map_err(Stop::Refused);
    let moved = |bytes: u64, what: &str| Some(format!("{} {what}", human_bytes(bytes)));
    let r = match action {
        Action::Add { prefix, version, .. } => {
            return p.add(env, prefix, *version).map(|id| (Some(id), None)).map_err(Stop::Failed)
        }
        Action::Backup { service } => {
            let backup = p.backup(env, &id(service)?).map_err(Stop::Failed)?;
            let bytes = backup.bytes;
            backups.insert(backup.of.clone(), backup);
            return Ok((None, moved(bytes, "dumped")));
        }
        Action::Restore { service, from } => {
            let from = id(from)?;
            let backup = backups
                .get(&from)
                .ok_or_else(|| Stop::Refused(format!("no backup of {from} was taken in this run")))?;
            return p.restore(env, &id(service)?, backup).map(|b| (None, moved(b, "restored"))).map_err(Stop::Failed);
        }
        Action::Replicate { service, from } => {
            return p
                .replicate(env, &id(service)?, &id(from)?, verified_later(rest, service, d))
                .map(|b| (None, moved(b, "copied")))
                .map_err(Stop::Failed);
        }
        Action::Upgrade { service, from } => {
            return p
                .upgrade(env, &id(service)?, &id(from)?, d.upgrade.transfer, d.upgrade.verify)
                .map(|b| (None, moved(b, "upgraded")))
                .map_err(Stop::Failed);
        }
        Action::CatchUp { service } => p.catch_up(env, &id(service)?, verified_later(rest, service, d)),
        Action::Provision { service } => p.provision(env, &id(service)?),
        Action::Fence { service } => p.fence(env, &id(service)?),
        Action::Unfence { service } => p.unfence(env, &id(service)?),
        Action::Verify { service, against } => p.verify(env, &id(service)?, &id(against)?, d.upgrade.verify),
        Action::Rename { service, to } => p.rename(env, &id(service)?, to),
        Action::Detach { service } => p.detach(env, &id(service)?),
        Action::Deploy => p.deploy(env),
        Action::Delete { service } => p.delete(env, &id(service)?),
    };
    r.map(|()| (None, None)).map_err(Stop::Failed)
}

/// A lock under the provider's root, held for a whole apply: an OS lock (`flock`) on
/// `root/lock`, which the kernel releases when the process ends, however it ends, so a
/// killed apply frees it at once and two applies that race for it cannot both win. The
/// file names its holder, for the message another apply gets, and is removed on release.
#[derive(Debug)]
pub struct Lock {
    path: PathBuf,
    /// Holds the lock until it is closed, after `drop` removed the path.
    _file: std::fs::File,
}

impl Lock {
    /// Takes the lock, waiting up to `timeout` (zero: refuse at once) while another
    /// apply holds it.
    pub fn acquire(root: &Path, timeout: Duration) -> Result<Lock, ProviderError> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let failed = |what: &str, e: std::io::Error| ProviderError::Failed(format!("cannot {what}: {e}"));
        if !root.exists() {
            // Made with its mode set explicitly, whatever the umask: others may pass
            // through (servers run as another user) but neither list nor write.
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(root)
                .and_then(|()| std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711)))
                .map_err(|e| failed(&format!("create {}", root.display()), e))?;
        }
        let path = root.join("lock");
        let deadline = Instant::now() + timeout;
        loop {
            if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
                return Err(ProviderError::Failed(format!(
                    "{} is not a plain file; remove it (pgconverge makes it anew)",
                    path.display()
                )));
            }
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(|e| failed(&format!("open {}", path.display()), e))?;
            match file.try_lock() {
                Ok(()) => {
                    // A holder that released it between our open and our lock removed the
                    // file: a lock on a file no longer at `path` locks nothing. Try again.
                    let held = file.metadata().map_err(|e| failed(&format!("read {}", path.display()), e))?;
                    let at_path = std::fs::symlink_metadata(&path).ok();
                    if at_path.is_none_or(|m| (m.dev(), m.ino()) != (held.dev(), held.ino())) {
                        continue;
                    }
                    use std::io::{Seek, Write};
                    file.set_len(0)
                        .and_then(|()| file.seek(std::io::SeekFrom::Start(0)))
                        .and_then(|_| {
                            let since = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_secs());
                            let mut lines = holder();
                            lines.insert(2, format!("since {}", utc(since)));
                            file.write_all(lines.iter().map(|l| format!("{l}\n")).collect::<String>().as_bytes())
                        })
                        .map_err(|e| failed(&format!("write {}", path.display()), e))?;
                    return Ok(Lock { path, _file: file });
                }
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    let mut text = String::new();
                    let _ = std::io::Read::read_to_string(&mut file, &mut text);
                    let who = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(", ");
                    let who = if who.is_empty() { "an apply that has not said who it is".to_owned() } else { who };
                    return Err(ProviderError::Locked { holder: format!("{who} (lock {})", path.display()) });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(failed(&format!("lock {}", path.display()), e)),
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Removed while still held; the lock itself ends when the file is closed, next.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Who takes the lock, as a second apply is told: pid, host, and the CI job when there
/// is one (each a `key value` pair; the time is added by where the lock lives).
pub fn holder() -> Vec<String> {
    let host = crate::state::hostname();
    let job = match (
        std::env::var("GITHUB_SERVER_URL"),
        std::env::var("GITHUB_REPOSITORY"),
        std::env::var("GITHUB_RUN_ID"),
    ) {
        (Ok(server), Ok(repo), Ok(run)) => Some(format!("{server}/{repo}/actions/runs/{run}")),
        (_, _, Ok(run)) => Some(format!("GitHub Actions run {run}")),
        _ => std::env::var("CI_JOB_URL").ok(),
    };
    let mut fields = vec![format!("pid {}", std::process::id()), format!("host {}", crate::model::printable(&host))];
    if let Some(job) = job.filter(|j| !j.trim().is_empty()) {
        fields.push(format!("job {}", crate::model::printable(&job)));
    }
    fields
}

/// The lock an apply holds: in a file under root, or in the state database.
#[derive(Debug)]
pub enum Held {
    File(Lock),
    Postgres(crate::state::PgLock),
}

/// Takes the state database's lock, as `Lock::acquire` takes the file's.
pub fn lock_in(state: &crate::state::PgState, timeout: Duration) -> Result<Held, ProviderError> {
    match state.lock(timeout, &holder().join(", ")) {
        Ok(lock) => Ok(Held::Postgres(lock)),
        Err(crate::state::LockRefused::Held(holder)) => Err(ProviderError::Locked { holder }),
        Err(crate::state::LockRefused::Failed(why)) => Err(why.into()),
    }
}

/// Seconds since 1970 as `2026-12-02T14:05:00Z`.
pub fn utc(secs: u64) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // The civil date of a day count, by 400-year eras of 146,097 days starting in March.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own for the lock (removed with the guard), and the root in it.
    fn root(name: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::Builder::new().prefix(&format!("pgconverge-lock-{name}-")).tempdir().expect("dir");
        let root = dir.path().join("root");
        (dir, root)
    }

    #[test]
    fn racers_for_a_stale_lock_never_both_win() {
        let (_dir, root) = root("race");
        for round in 0..50 {
            std::fs::create_dir_all(&root).expect("root");
            // Left by a holder that is gone, in the old format and the new.
            let stale = if round % 2 == 0 { "4194305 0\n" } else { "pid 4194305\nhost gone\n" };
            std::fs::write(root.join("lock"), stale).expect("stale lock");
            let start = std::sync::Arc::new(std::sync::Barrier::new(4));
            let done = std::sync::Arc::new(std::sync::Barrier::new(4));
            let racers: Vec<_> = (0..4)
                .map(|_| {
                    let (root, start, done) = (root.clone(), start.clone(), done.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        let lock = Lock::acquire(&root, Duration::ZERO);
                        let won = lock.is_ok();
                        done.wait(); // the winner holds it until everyone has tried
                        drop(lock);
                        won
                    })
                })
                .collect();
            let winners = racers.into_iter().map(|r| r.join().expect("racer")).filter(|w| *w).count();
            assert_eq!(winners, 1, "round {round}");
            assert!(!root.join("lock").exists(), "released: the file is gone");
        }
    }

    #[test]
    fn a_held_lock_names_its_holder_and_can_be_waited_for() {
        let (_dir, root) = root("wait");
        let held = Lock::acquire(&root, Duration::ZERO).expect("first");
        let refused = Lock::acquire(&root, Duration::ZERO).expect_err("second");
        let text = refused.to_string();
        assert!(text.contains(&format!("pid {}", std::process::id())) && text.contains("since 20"), "{text}");
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            drop(held);
        });
        let t = Instant::now();
        let waited = Lock::acquire(&root, Duration::from_secs(30));
        assert!(waited.is_ok(), "{waited:?}");
        assert!(t.elapsed() >= Duration::from_millis(400), "it waited for the holder");
        releaser.join().expect("releaser");
        drop(waited);
    }

    #[test]
    fn times_are_written_in_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_221_500), "2026-12-02T14:25:00Z");
    }
}
