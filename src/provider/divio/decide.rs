//! The pure decisions the Divio provider rests on, each tested on its own: how the
//! Control Panel's words map onto the rules' (statuses, the major of a catalogue entry),
//! where the API lives and where the token comes from, when a request is retried, and
//! what a person does by hand when an unconfirmed endpoint is missing.

use std::time::Duration;

use crate::model::{Prefix, Service, ServiceId, Status};

/// A service instance's status as the provider reads it: one of the rules' statuses, or
/// one the rules cannot use yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Is(Status),
    /// Asked to provision, not ready to be restored into: the rules see it as `New` (a
    /// provision that finds it so waits instead of asking again), never as provisioned.
    Provisioning,
    /// Removed: absent to the rules.
    Removed,
}

impl Seen {
    /// The status the rules plan from; `None`: absent.
    pub fn for_rules(self) -> Option<Status> {
        match self {
            Seen::Is(s) => Some(s),
            Seen::Provisioning => Some(Status::New),
            Seen::Removed => None,
        }
    }
}

/// A service instance status as the API spells it (`NEW`, `PENDING_ATTACHMENT`, "pending
/// attachment", …; any case, spaces or underscores). `None`: a word this build does not
/// know, which observe reports rather than guesses at.
pub fn status(api: &str) -> Option<Seen> {
    let word: String =
        api.trim().chars().map(|c| if c == ' ' || c == '-' { '_' } else { c.to_ascii_uppercase() }).collect();
    Some(match word.as_str() {
        "NEW" => Seen::Is(Status::New),
        "PROVISIONING" => Seen::Provisioning,
        "PENDING_ATTACHMENT" => Seen::Is(Status::Provisioned),
        "ATTACHED" => Seen::Is(Status::Attached),
        "PENDING_DETACHMENT" => Seen::Is(Status::PendingDetachment),
        "DETACHED" => Seen::Is(Status::Detached),
        "REMOVED" => Seen::Removed,
        _ => return None,
    })
}

/// The PostgreSQL major of a service catalogue entry, from its identifier or, failing
/// that, its name (`postgres-13`, `postgresql_15.4`, "PostgreSQL 17"); `None` for other
/// engines and for entries that name no version.
pub fn postgres_major(identifier: &str, name: &str) -> Option<u32> {
    [identifier, name].into_iter().find_map(|text| {
        let lower = text.to_ascii_lowercase();
        let at = lower.find("postgres")?;
        let rest = &lower[at + "postgres".len()..];
        let rest = rest.strip_prefix("ql").unwrap_or(rest);
        let digits: String =
            rest.trim_start_matches([' ', '-', '_', ':', 'v']).chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok().filter(|m| *m >= 6)
    })
}

/// The host whose `~/.netrc` entry holds the token for a zone, as divio-cli stores it.
pub fn netrc_host(zone: &str) -> String {
    format!("control.{}", zone.trim())
}

/// The password of `machine host` in a netrc file. Tokens may be separated by any
/// whitespace, entries may span lines, and `default` is not used: a token meant for
/// another host must never be sent to this one.
pub fn netrc_password(netrc: &str, host: &str) -> Option<String> {
    let mut words = netrc.split_whitespace();
    let mut current: Option<&str> = None;
    while let Some(w) = words.next() {
        match w {
            "machine" => current = words.next(),
            "default" => current = None,
            "password" => {
                let value = words.next()?;
                if current == Some(host) {
                    return Some(value.to_owned());
                }
            }
            "login" | "account" => {
                words.next();
            }
            "macdef" => current = None,
            _ => {}
        }
    }
    None
}

/// What a request does, as far as resending it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// GET: reads only.
    Read,
    /// POST: creates something or starts an operation; sent twice, it may do so twice.
    Create,
    /// PATCH: sets fields to values; sending it twice leaves the same state.
    Change,
    /// DELETE: sent twice, the second finds nothing (404).
    Delete,
}

/// What came of one HTTP request, for `next_step`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The server answered with this status; `retry_after` from its header, if any.
    Status { code: u16, retry_after: Option<Duration> },
    /// The request never reached the server: the connection was refused or never made.
    NotSent,
    /// Sent, but no answer came: reset, closed, or timed out. It may have been carried out.
    NoAnswer,
}

/// What to do after a request that did not succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Send it again after this wait.
    Retry(Duration),
    /// It may have been carried out: look for what it would have created before deciding
    /// to send it again (`Create` only).
    LookFirst,
    /// It is done after all: a DELETE answered 404 after an earlier attempt went unanswered.
    Done,
    /// Stop with the error.
    Fail,
}

/// Attempts per request before giving up.
pub const MAX_ATTEMPTS: u32 = 6;

/// What follows attempt `attempt` of a `verb` request that came to `outcome`; `lost_before`:
/// an earlier attempt of it may have been carried out (no answer or a 5xx).
///
/// Rate limiting (429) and requests that never left are proven not carried out, so they
/// are sent again whatever the verb. A 5xx or no answer is not: reads and idempotent
/// changes are sent again, a create is looked for first. Other statuses stop, except a
/// DELETE's 404 after a lost attempt, which is the delete having happened. Waits grow
/// exponentially from 0.5 s, capped at 20 s, with full jitter (`jitter` in [0, 1) picks the
/// point), and never sooner than a `Retry-After` asks (capped at 60 s).
pub fn next_step(verb: Verb, attempt: u32, outcome: Outcome, lost_before: bool, jitter: f64) -> Next {
    let ambiguous = matches!(outcome, Outcome::NoAnswer | Outcome::Status { code: 500..=599, .. });
    let retry_after = match outcome {
        Outcome::Status { code: 404, .. } if verb == Verb::Delete && lost_before => return Next::Done,
        Outcome::Status { code: 429, retry_after } => retry_after,
        _ if ambiguous && verb == Verb::Create => return Next::LookFirst,
        Outcome::NotSent | Outcome::NoAnswer => None,
        _ if ambiguous => None,
        Outcome::Status { .. } => return Next::Fail,
    };
    if attempt >= MAX_ATTEMPTS {
        return Next::Fail;
    }
    Next::Retry(backoff(attempt, jitter, retry_after))
}

/// The wait before attempt `attempt + 1`, as `next_step` describes it.
pub fn backoff(attempt: u32, jitter: f64, retry_after: Option<Duration>) -> Duration {
    let ceiling = (0.5 * 2f64.powi(attempt.saturating_sub(1) as i32)).min(20.0);
    let backoff = Duration::from_secs_f64(ceiling * jitter.clamp(0.0, 1.0));
    retry_after.map_or(backoff, |r| r.min(Duration::from_secs(60)).max(backoff))
}

/// What an action asked the platform to change, whose effect may show only later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Moving {
    /// These instances (added, provisioned, detached, renamed or deleted).
    These(Vec<ServiceId>),
    /// Every instance of the environment (a deploy attaches and detaches).
    All,
}

/// A service the platform has not yet moved to the state the rules expect after an action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Awaited {
    pub id: ServiceId,
    /// Its prefix as listed now (or as expected, when it is not listed yet).
    pub prefix: Prefix,
    /// What it is waited for to do: "finish provisioning", "be removed", …
    pub want: String,
    /// What the API shows: its status word, "not listed".
    pub seen: String,
}

/// The first service among those `moving` whose status, prefix or presence is not yet what
/// the rules `expected`; `observed` pairs each listed instance with its status word. Other
/// differences (data, fences, another service) are not waited for: the platform is not
/// moving them, so they are a surprise for apply to report at once.
pub fn awaited(expected: &[Service], observed: &[(Service, String)], moving: &Moving) -> Option<Awaited> {
    let mut ids: Vec<&ServiceId> = match moving {
        Moving::These(ids) => ids.iter().collect(),
        Moving::All => expected.iter().map(|s| &s.id).chain(observed.iter().map(|(s, _)| &s.id)).collect(),
    };
    ids.dedup();
    ids.into_iter().find_map(|id| {
        let want = expected.iter().find(|s| &s.id == id);
        let seen = observed.iter().find(|(s, _)| &s.id == id);
        let (prefix, want, seen) = match (want, seen) {
            (None, None) => return None,
            (None, Some((s, word))) => (s.prefix.clone(), "be removed".to_owned(), word.clone()),
            (Some(w), None) => (w.prefix.clone(), format!("be listed as {}", w.status.as_str()), "not listed".into()),
            (Some(w), Some((s, word))) if w.prefix != s.prefix => {
                (s.prefix.clone(), format!("be renamed to {}", w.prefix), format!("{word} as {}", s.prefix))
            }
            (Some(w), Some((s, word))) if w.status != s.status => {
                let want = match w.status {
                    Status::New => "be added",
                    Status::Provisioned => "finish provisioning",
                    Status::Attached => "be attached",
                    Status::PendingDetachment => "be marked for detachment",
                    Status::Detached => "be detached",
                };
                (s.prefix.clone(), want.to_owned(), word.clone())
            }
            _ => return None,
        };
        Some(Awaited { id: id.clone(), prefix, want, seen })
    })
}

/// Whether a wait that has lasted `waited` says so again, having last said so at `said`:
/// once it has lasted two seconds (a quick one says nothing), then every 30 seconds.
pub fn report_due(waited: Duration, said: Option<Duration>) -> bool {
    match said {
        None => waited >= Duration::from_secs(2),
        Some(said) => waited.saturating_sub(said) >= Duration::from_secs(30),
    }
}

/// The pause before look `looks + 1` of a wait: a quarter second, doubling up to `poll`
/// (`poll_seconds`), so that a quick operation is seen done quickly and a slow one is not
/// asked after more often than every `poll`.
pub fn pause(poll: Duration, looks: u32) -> Duration {
    Duration::from_millis(250).saturating_mul(1 << looks.saturating_sub(1).min(16)).min(poll)
}

/// `2m10s`, `16s`, `0.3s`.
pub fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s >= 10 {
        format!("{s}s")
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// An action whose endpoint is not confirmed, for `manual_step`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Manual<'a> {
    Provision { prefix: &'a str },
    Detach { prefix: &'a str },
    Rename { from: &'a str, to: &'a str },
    Delete { prefix: &'a str },
}

/// The Control Panel step that does by hand what an unconfirmed endpoint would have done.
pub fn manual_step(env: &str, action: Manual) -> String {
    let services = format!("environment {env} → Services");
    match action {
        Manual::Provision { prefix } => format!("{services} → {prefix} → Provision (without attaching)"),
        Manual::Detach { prefix } => format!("{services} → {prefix} → Detach"),
        Manual::Rename { from, to } => format!("{services} → rename prefix {from} to {to}"),
        Manual::Delete { prefix } => format!("{services} → {prefix} → Remove"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_in_any_spelling() {
        for (api, want) in [
            ("NEW", Some(Seen::Is(Status::New))),
            ("provisioning", Some(Seen::Provisioning)),
            ("PENDING_ATTACHMENT", Some(Seen::Is(Status::Provisioned))),
            ("pending attachment", Some(Seen::Is(Status::Provisioned))),
            ("Attached", Some(Seen::Is(Status::Attached))),
            ("pending-detachment", Some(Seen::Is(Status::PendingDetachment))),
            ("DETACHED", Some(Seen::Is(Status::Detached))),
            ("REMOVED", Some(Seen::Removed)),
            ("EXPLODED", None),
            ("", None),
        ] {
            assert_eq!(status(api), want, "{api}");
        }
        assert_eq!(Seen::Provisioning.for_rules(), Some(Status::New), "never rounded up to provisioned");
        assert_eq!(Seen::Removed.for_rules(), None);
    }

    #[test]
    fn catalogue_entries_name_their_major() {
        for (identifier, name, want) in [
            ("postgres-13", "", Some(13)),
            ("postgresql_15.4", "", Some(15)),
            ("", "PostgreSQL 17", Some(17)),
            ("db-postgres-16-alpine", "whatever", Some(16)),
            ("postgres", "PostgreSQL v14", Some(14)),
            ("mysql-8", "MySQL 8", None),
            ("postgres", "PostgreSQL (latest)", None),
            ("postgres-2", "", None),
        ] {
            assert_eq!(postgres_major(identifier, name), want, "{identifier} / {name}");
        }
    }

    #[test]
    fn netrc_hosts_of_zones() {
        assert_eq!(netrc_host("divio.com"), "control.divio.com");
    }

    #[test]
    fn netrc_gives_only_the_named_machine_its_password() {
        let netrc = "machine other.example login me password nope\n\
                     machine control.divio.com\n  login me@example.com\n  password tok-123\n\
                     default login anon password public\n";
        assert_eq!(netrc_password(netrc, "control.divio.com").as_deref(), Some("tok-123"));
        assert_eq!(netrc_password(netrc, "control.elsewhere.com"), None, "default is never used");
        assert_eq!(netrc_password("machine control.divio.com login x", "control.divio.com"), None);
    }

    #[test]
    fn a_create_is_sent_again_only_once_proven_not_carried_out() {
        let s = |code| Outcome::Status { code, retry_after: None };
        let word = |n: Next| match n {
            Next::Retry(_) => "retry",
            Next::LookFirst => "look first",
            Next::Done => "done",
            Next::Fail => "fail",
        };
        // (verb, outcome, lost before, what follows)
        let table = [
            (Verb::Read, Outcome::NoAnswer, false, "retry"),
            (Verb::Read, s(502), false, "retry"),
            (Verb::Read, s(429), false, "retry"),
            (Verb::Read, Outcome::NotSent, false, "retry"),
            (Verb::Read, s(404), false, "fail"),
            (Verb::Read, s(400), false, "fail"),
            (Verb::Change, Outcome::NoAnswer, false, "retry"),
            (Verb::Change, s(503), true, "retry"),
            (Verb::Change, s(400), true, "fail"),
            (Verb::Delete, Outcome::NoAnswer, false, "retry"),
            (Verb::Delete, s(404), true, "done"),
            (Verb::Delete, s(404), false, "fail"),
            (Verb::Delete, s(409), true, "fail"),
            (Verb::Create, Outcome::NoAnswer, false, "look first"),
            (Verb::Create, s(500), false, "look first"),
            (Verb::Create, s(502), true, "look first"),
            (Verb::Create, s(503), false, "look first"),
            (Verb::Create, s(429), false, "retry"),
            (Verb::Create, Outcome::NotSent, false, "retry"),
            (Verb::Create, s(400), false, "fail"),
            (Verb::Create, s(404), true, "fail"),
        ];
        for (verb, outcome, lost, want) in table {
            assert_eq!(word(next_step(verb, 1, outcome, lost, 0.5)), want, "{verb:?} {outcome:?} lost before: {lost}");
        }
        for verb in [Verb::Read, Verb::Change, Verb::Delete, Verb::Create] {
            assert_eq!(next_step(verb, MAX_ATTEMPTS, s(429), false, 0.5), Next::Fail, "gives up: {verb:?}");
        }
    }

    #[test]
    fn waits_grow_with_jitter_and_honour_retry_after() {
        let full: Vec<f64> = (1..MAX_ATTEMPTS).map(|a| backoff(a, 0.999, None).as_secs_f64()).collect();
        assert!(full.windows(2).all(|w| w[0] < w[1] || w[1] >= 19.9), "grows: {full:?}");
        assert!(full.iter().all(|d| *d <= 20.0), "capped: {full:?}");
        assert_eq!(backoff(3, 0.0, None), Duration::ZERO, "full jitter reaches zero");
        let asked = Outcome::Status { code: 429, retry_after: Some(Duration::from_secs(7)) };
        assert_eq!(next_step(Verb::Create, 1, asked, false, 0.5), Next::Retry(Duration::from_secs(7)));
        assert_eq!(backoff(1, 0.5, Some(Duration::from_secs(3600))), Duration::from_secs(60), "but capped");
    }

    #[test]
    fn only_what_an_action_moves_is_waited_for() {
        let svc = |id: &str, prefix: &str, status| Service {
            id: ServiceId::observed(id).expect("id"),
            version: crate::model::Major::new(17).expect("major"),
            prefix: Prefix::parse(prefix).expect("prefix"),
            status,
            fenced: false,
            data: None,
            consumed_by: None,
        };
        let id = |i: &str| ServiceId::observed(i).expect("id");
        let new = svc("n", "NEW", Status::Provisioned);
        let default = svc("d", "DEFAULT", Status::Attached);
        let seen = |s: &Service, word: &str| (s.clone(), word.to_owned());
        let moving = Moving::These(vec![id("n")]);
        let provisioning = svc("n", "NEW", Status::New);
        type Case<'a> = (Vec<Service>, Vec<(Service, String)>, Moving, Option<(&'a str, &'a str, &'a str)>);
        let cases: Vec<Case> = vec![
            (
                vec![new.clone(), default.clone()],
                vec![seen(&provisioning, "PROVISIONING"), seen(&default, "ATTACHED")],
                moving.clone(),
                Some(("NEW", "finish provisioning", "PROVISIONING")),
            ),
            (
                vec![new.clone(), default.clone()],
                vec![seen(&new, "PENDING_ATTACHMENT"), seen(&default, "ATTACHED")],
                moving.clone(),
                None,
            ),
            // DEFAULT differs, but the action did not move it: a surprise, not a wait.
            (
                vec![new.clone(), default.clone()],
                vec![seen(&new, "PENDING_ATTACHMENT"), seen(&svc("d", "OLD", Status::Attached), "ATTACHED")],
                moving.clone(),
                None,
            ),
            (
                vec![default.clone()],
                vec![seen(&new, "DETACHED"), seen(&default, "ATTACHED")],
                moving.clone(),
                Some(("NEW", "be removed", "DETACHED")),
            ),
            (
                vec![new.clone(), default.clone()],
                vec![seen(&default, "ATTACHED")],
                moving.clone(),
                Some(("NEW", "be listed as provisioned", "not listed")),
            ),
            (
                vec![svc("n", "DEFAULT", Status::Provisioned)],
                vec![seen(&new, "PENDING_ATTACHMENT")],
                moving.clone(),
                Some(("NEW", "be renamed to DEFAULT", "PENDING_ATTACHMENT as NEW")),
            ),
            (
                vec![svc("d", "DEFAULT", Status::Detached)],
                vec![seen(&svc("d", "DEFAULT", Status::PendingDetachment), "PENDING_DETACHMENT")],
                Moving::All,
                Some(("DEFAULT", "be detached", "PENDING_DETACHMENT")),
            ),
            (vec![default.clone()], vec![seen(&default, "ATTACHED")], Moving::All, None),
        ];
        for (i, (expected, observed, moving, want)) in cases.into_iter().enumerate() {
            let got = awaited(&expected, &observed, &moving);
            let got = got.as_ref().map(|a| (a.prefix.as_str(), a.want.as_str(), a.seen.as_str()));
            assert_eq!(got, want, "case {i}");
        }
    }

    #[test]
    fn polls_start_quick_and_slow_down_to_poll_seconds() {
        let ms = |looks| pause(Duration::from_secs(3), looks).as_millis();
        assert_eq!([ms(1), ms(2), ms(3), ms(4), ms(5), ms(40)], [250, 500, 1000, 2000, 3000, 3000]);
        assert_eq!(pause(Duration::from_millis(10), 1), Duration::from_millis(10), "never slower than asked");
    }

    #[test]
    fn waits_are_reported_once_they_last_then_every_half_minute() {
        let s = Duration::from_secs;
        assert!(!report_due(s(1), None) && report_due(s(2), None), "a quick wait says nothing");
        assert!(!report_due(s(29), Some(s(0))) && report_due(s(30), Some(s(0))));
        let clocks = [clock(Duration::from_millis(300)), clock(s(16)), clock(s(130)), clock(s(3600))];
        assert_eq!(clocks, ["0.3s", "16s", "2m10s", "60m00s"]);
    }

    #[test]
    fn manual_steps_name_the_environment_and_the_prefixes() {
        assert_eq!(
            manual_step("live", Manual::Rename { from: "DEFAULT", to: "OLD" }),
            "environment live → Services → rename prefix DEFAULT to OLD"
        );
        assert!(manual_step("test", Manual::Delete { prefix: "OLD" }).contains("test → Services → OLD → Remove"));
    }
}
