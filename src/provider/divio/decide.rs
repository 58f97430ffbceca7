//! The pure decisions the Divio provider rests on, each tested on its own: how the
//! Control Panel's words map onto the rules' (statuses, the major of a catalogue entry),
//! where the API lives and where the token comes from, when a request is retried, and
//! what a person does by hand when an unconfirmed endpoint is missing.

use std::time::Duration;

use crate::model::Status;

/// The rules' status of a service instance status as the API spells it (`NEW`,
/// `PENDING_ATTACHMENT`, "pending attachment", …; any case, spaces or underscores).
/// `Some(None)`: removed, which the rules see as absent. `None`: a word this build does
/// not know, which observe reports rather than guesses at.
pub fn status(api: &str) -> Option<Option<Status>> {
    let word: String =
        api.trim().chars().map(|c| if c == ' ' || c == '-' { '_' } else { c.to_ascii_uppercase() }).collect();
    Some(Some(match word.as_str() {
        "NEW" => Status::New,
        "PROVISIONING" | "PENDING_ATTACHMENT" => Status::Provisioned,
        "ATTACHED" => Status::Attached,
        "PENDING_DETACHMENT" => Status::PendingDetachment,
        "DETACHED" => Status::Detached,
        "REMOVED" => return Some(None),
        _ => return None,
    }))
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

/// The API's base URL for a zone: `divio.com` → `https://api.divio.com`; a full
/// `http(s)://` URL (an emulator's, in tests) is used as it is, without a trailing `/`.
pub fn base_url(zone: &str) -> Result<String, String> {
    let zone = zone.trim();
    if zone.starts_with("https://") || zone.starts_with("http://") {
        return Ok(zone.trim_end_matches('/').to_owned());
    }
    let valid = !zone.is_empty()
        && zone.split('.').all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if valid {
        Ok(format!("https://api.{zone}"))
    } else {
        Err(format!("`{zone}` is neither a zone (e.g. divio.com) nor an http(s) URL"))
    }
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

/// What came of one HTTP request, for `retry_delay`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The server answered with this status; `retry_after` from its header, if any.
    Status { code: u16, retry_after: Option<Duration> },
    /// No answer: refused, reset, DNS, or timed out.
    NoAnswer,
}

/// Attempts per request before giving up.
pub const MAX_ATTEMPTS: u32 = 6;

/// How long to wait before attempt `attempt + 1`, or `None` to stop: only rate limiting
/// (429), server errors (5xx) and no answer are retried, with exponential backoff from
/// 0.5 s capped at 20 s and full jitter (`jitter` in [0, 1) picks the point), and never
/// sooner than a `Retry-After` asks (capped at 60 s).
pub fn retry_delay(attempt: u32, outcome: Outcome, jitter: f64) -> Option<Duration> {
    if attempt >= MAX_ATTEMPTS {
        return None;
    }
    let retry_after = match outcome {
        Outcome::Status { code: 429, retry_after } => retry_after,
        Outcome::Status { code: 500..=599, .. } | Outcome::NoAnswer => None,
        Outcome::Status { .. } => return None,
    };
    let ceiling = (0.5 * 2f64.powi(attempt.saturating_sub(1) as i32)).min(20.0);
    let backoff = Duration::from_secs_f64(ceiling * jitter.clamp(0.0, 1.0));
    Some(retry_after.map_or(backoff, |r| r.min(Duration::from_secs(60)).max(backoff)))
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
            ("NEW", Some(Some(Status::New))),
            ("provisioning", Some(Some(Status::Provisioned))),
            ("PENDING_ATTACHMENT", Some(Some(Status::Provisioned))),
            ("pending attachment", Some(Some(Status::Provisioned))),
            ("Attached", Some(Some(Status::Attached))),
            ("pending-detachment", Some(Some(Status::PendingDetachment))),
            ("DETACHED", Some(Some(Status::Detached))),
            ("REMOVED", Some(None)),
            ("EXPLODED", None),
            ("", None),
        ] {
            assert_eq!(status(api), want, "{api}");
        }
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
    fn zones_and_urls() {
        assert_eq!(base_url("divio.com").as_deref(), Ok("https://api.divio.com"));
        assert_eq!(base_url("http://127.0.0.1:8080/").as_deref(), Ok("http://127.0.0.1:8080"));
        assert!(base_url("divio .com").is_err() && base_url("").is_err() && base_url("a..b").is_err());
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
    fn only_transient_failures_are_retried_with_growing_jittered_waits() {
        let s = |code| Outcome::Status { code, retry_after: None };
        for code in [400, 401, 403, 404, 405, 409] {
            assert_eq!(retry_delay(1, s(code), 0.5), None, "{code}");
        }
        for outcome in [s(429), s(500), s(502), s(503), Outcome::NoAnswer] {
            assert!(retry_delay(1, outcome, 0.5).is_some(), "{outcome:?}");
            assert_eq!(retry_delay(MAX_ATTEMPTS, outcome, 0.5), None, "gives up: {outcome:?}");
        }
        let full: Vec<f64> =
            (1..MAX_ATTEMPTS).map(|a| retry_delay(a, s(503), 0.999).expect("retry").as_secs_f64()).collect();
        assert!(full.windows(2).all(|w| w[0] < w[1] || w[1] >= 19.9), "grows: {full:?}");
        assert!(full.iter().all(|d| *d <= 20.0), "capped: {full:?}");
        assert_eq!(retry_delay(3, s(503), 0.0), Some(Duration::ZERO), "full jitter reaches zero");
        let asked = Outcome::Status { code: 429, retry_after: Some(Duration::from_secs(7)) };
        assert_eq!(retry_delay(1, asked, 0.5), Some(Duration::from_secs(7)), "Retry-After is honoured");
        let greedy = Outcome::Status { code: 429, retry_after: Some(Duration::from_secs(3600)) };
        assert_eq!(retry_delay(1, greedy, 0.5), Some(Duration::from_secs(60)), "but capped");
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
