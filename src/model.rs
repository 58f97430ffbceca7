//! The words of the contracts (`docs/contracts.md`) as types: prefixes, majors, environment names, service ids, and
//! the live-state snapshot (format 1) that `show --format json` prints and `plan --live`
//! reads. The same types serialize both ways, so a snapshot round-trips unchanged.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};

/// The only snapshot and plan format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Longest prefix, environment name or service id accepted. Environment variable names
/// and Divio slugs are far shorter; the bound keeps hostile input from growing output.
const MAX_NAME_LEN: usize = 63;

/// An environment-variable prefix such as `DEFAULT`: `^[A-Z][A-Z0-9_]*$`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Prefix(String);

impl Prefix {
    /// Checks `s` against `^[A-Z][A-Z0-9_]*$`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut chars = s.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_uppercase());
        let rest_ok = chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !first_ok || !rest_ok {
            return Err(format!(
                "invalid prefix `{}`: a prefix must match ^[A-Z][A-Z0-9_]*$ (like DEFAULT or ANALYTICS)",
                shorten(s)
            ));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(format!("prefix `{}` is longer than {MAX_NAME_LEN} characters", shorten(s)));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Prefix::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Prefix {
    fn schema_name() -> String {
        "Prefix".into()
    }
    fn json_schema(_: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
        schemars::schema::SchemaObject {
            instance_type: Some(schemars::schema::InstanceType::String.into()),
            string: Some(Box::new(schemars::schema::StringValidation {
                max_length: Some(MAX_NAME_LEN as u32),
                min_length: Some(1),
                pattern: Some("^[A-Z][A-Z0-9_]*$".into()),
            })),
            ..Default::default()
        }
        .into()
    }
}

/// A PostgreSQL major version (15, 16, 17, …). Reads an integer or a string holding one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Major(u32);

impl Major {
    pub fn new(n: u32) -> Result<Self, String> {
        if n == 0 {
            return Err("a PostgreSQL major version must be a positive integer such as 17".into());
        }
        Ok(Self(n))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Major {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for Major {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Major;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a PostgreSQL major version (a positive integer such as 17)")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Major, E> {
                let n = u32::try_from(n).map_err(|_| E::custom(format!("major version {n} is out of range")))?;
                Major::new(n).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Major, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom(format!(
                        "major version {n} is negative: a PostgreSQL major version is a positive integer such as 17"
                    ))),
                }
            }
            fn visit_f64<E: serde::de::Error>(self, x: f64) -> Result<Major, E> {
                Err(E::custom(format!(
                    "major version {x} is not an integer: PostgreSQL majors are whole numbers since 10 (write 17, not 17.2)"
                )))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Major, E> {
                let t = s.trim();
                if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
                    if let Ok(n) = t.parse::<u64>() {
                        return self.visit_u64(n);
                    }
                }
                Err(E::custom(format!(
                    "`{}` is not a PostgreSQL major version: write a positive integer such as 17",
                    shorten(s)
                )))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for Major {
    fn schema_name() -> String {
        "Major".into()
    }
    fn json_schema(_: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
        serde_json::from_value(serde_json::json!({
            "description": "A PostgreSQL major version: a positive integer, or a string holding one.",
            "anyOf": [
                {"type": "integer", "minimum": 1},
                {"type": "string", "pattern": "^[0-9]*[1-9][0-9]*$"}
            ]
        }))
        .unwrap_or(schemars::schema::Schema::Bool(true))
    }
}

/// An environment's name (`test`, `live`): a Divio slug, also used in file names, so
/// `^[a-zA-Z0-9][a-zA-Z0-9_.-]*$` and never a path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct EnvName(String);

impl EnvName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut chars = s.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !first_ok || !rest_ok || s.len() > MAX_NAME_LEN {
            return Err(format!(
                "invalid environment name `{}`: use letters, digits, `_`, `-` or `.` (at most {MAX_NAME_LEN}), starting with a letter or digit",
                shorten(s)
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EnvName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for EnvName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        EnvName::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for EnvName {
    fn schema_name() -> String {
        "EnvName".into()
    }
    fn json_schema(_: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
        serde_json::from_value(serde_json::json!({
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_NAME_LEN,
            "pattern": "^[a-zA-Z0-9][a-zA-Z0-9_.-]*$"
        }))
        .unwrap_or(schemars::schema::Schema::Bool(true))
    }
}

/// A service's id: the provider's for observed services, `+1`, `+2`, … for the services a
/// plan adds (numbered within their environment).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ServiceId(String);

impl ServiceId {
    /// An observed id: printable, no spaces, not starting with `+` (kept for added services).
    pub fn observed(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty() && s.len() <= 128 && !s.starts_with('+') && s.chars().all(|c| c.is_ascii_graphic());
        if !ok {
            return Err(format!(
                "invalid service id `{}`: ids are 1 to 128 printable characters without spaces, not starting with `+`",
                shorten(s)
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// The id of the `n`th service a plan adds to an environment.
    pub fn added(n: u32) -> Self {
        Self(format!("+{n}"))
    }

    /// Stands for a service that no longer exists (the source of an old copy).
    pub fn gone() -> Self {
        Self("(gone)".to_owned())
    }

    /// The number of an added service (`+3` → 3), `None` for observed ids.
    pub fn added_number(&self) -> Option<u32> {
        self.0.strip_prefix('+')?.parse().ok().filter(|n| *n > 0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ServiceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Some(id) = Some(ServiceId(s.clone())).filter(|id| id.added_number().is_some()) {
            return Ok(id);
        }
        ServiceId::observed(&s).map_err(serde::de::Error::custom)
    }
}

/// Where a service is in its life (`docs/contracts.md`, "Live-state snapshot").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Added; nothing exists yet.
    New,
    /// Exists and can be restored into; not visible to the application.
    Provisioned,
    /// Visible to the application.
    Attached,
    /// Visible until the next deploy.
    PendingDetachment,
    /// Not visible.
    Detached,
}

impl Status {
    /// Visible = the application can see (and write to) it.
    pub fn visible(self) -> bool {
        matches!(self, Status::Attached | Status::PendingDetachment)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::New => "new",
            Status::Provisioned => "provisioned",
            Status::Attached => "attached",
            Status::PendingDetachment => "pending_detachment",
            Status::Detached => "detached",
        }
    }
}

/// Which dataset a service holds and how trustworthy the copy is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Data {
    /// The prefix under which the application owns this data.
    pub of: Prefix,
    /// No committed write is missing from this copy.
    pub complete: bool,
    /// The service this copy was restored from, if it is a copy.
    #[serde(default)]
    pub restored_from: Option<ServiceId>,
    /// The provider compared this copy with its source for real.
    #[serde(default)]
    pub verified: bool,
    /// The copy is still arriving from `restored_from` by logical replication: not whole
    /// until a catch-up ends it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub streaming: bool,
}

/// One database service as observed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub id: ServiceId,
    pub version: Major,
    pub prefix: Prefix,
    pub status: Status,
    #[serde(default)]
    pub fenced: bool,
    #[serde(default)]
    pub data: Option<Data>,
    /// Its data directory became this service's (`pg_upgrade --link`): it holds nothing
    /// and can never serve again. `data`, if any, says what it held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumed_by: Option<ServiceId>,
}

impl Service {
    /// The data as the rules read it: a visible service reported with no data holds its own
    /// prefix's dataset, complete. A live database is never treated as empty; a consumed
    /// one holds nothing.
    pub fn effective_data(&self) -> Option<Data> {
        if self.consumed_by.is_some() {
            return None;
        }
        match (&self.data, self.status.visible()) {
            (Some(d), _) => Some(d.clone()),
            (None, true) => Some(Data {
                of: self.prefix.clone(),
                complete: true,
                restored_from: None,
                verified: false,
                streaming: false,
            }),
            (None, false) => None,
        }
    }

    /// What a consumed service held before its files became another's: its recorded data,
    /// or its prefix's dataset.
    pub fn held(&self) -> Data {
        self.data.clone().unwrap_or_else(|| Data {
            of: self.prefix.clone(),
            complete: true,
            restored_from: None,
            verified: false,
            streaming: false,
        })
    }
}

/// What the staleness rule needs of one service holding a dataset `K`.
#[derive(Clone, Copy, Debug)]
pub struct Holding<K> {
    pub of: K,
    /// The application sees it (and it is not a copy still streaming in).
    pub visible: bool,
    pub fenced: bool,
}

/// The staleness rule (`src/plan/rules.rs`), for services in order: `Some(false)`: a
/// stale copy, since another service holding the same dataset takes the application's
/// writes (visible and unfenced); `Some(true)`: the application's only visible holder of
/// its dataset, which is the dataset whatever its record says; `None`: as recorded. Two
/// visible holders of one dataset are neither: each unfenced one makes the other stale.
pub fn staleness<K: PartialEq + Copy>(holdings: &[Option<Holding<K>>]) -> Vec<Option<bool>> {
    let others = |i: usize, of: K, pred: &dyn Fn(&Holding<K>) -> bool| {
        holdings.iter().enumerate().any(|(j, o)| j != i && o.is_some_and(|o| o.of == of && pred(&o)))
    };
    holdings
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let h = (*h)?;
            if others(i, h.of, &|o| o.visible && !o.fenced) {
                Some(false)
            } else if h.visible && !others(i, h.of, &|o| o.visible) {
                Some(true)
            } else {
                None
            }
        })
        .collect()
}

impl EnvLive {
    /// The services as the rules read them: stale copies incomplete, the application's
    /// current holder of each dataset complete (`staleness`).
    pub fn settled(&self) -> EnvLive {
        let holdings: Vec<Option<Holding<&Prefix>>> = self
            .services
            .iter()
            .map(|s| {
                let d = s.effective_data()?;
                let of = &s.data.as_ref().map_or(&s.prefix, |d| &d.of);
                Some(Holding { of: *of, visible: s.status.visible() && !d.streaming, fenced: s.fenced })
            })
            .collect();
        let verdicts = staleness(&holdings);
        let mut out = self.clone();
        for (s, verdict) in out.services.iter_mut().zip(verdicts) {
            if let (Some(complete), Some(mut d)) = (verdict, s.effective_data()) {
                if d.complete != complete {
                    d.complete = complete;
                    s.data = Some(d);
                }
            }
        }
        out
    }
}

impl Live {
    /// Every environment `settled`.
    pub fn settled(mut self) -> Live {
        for env in self.environments.values_mut() {
            *env = env.settled();
        }
        self
    }
}

/// The observed services of one environment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvLive {
    pub services: Vec<Service>,
}

/// The live-state snapshot, format 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Live {
    pub format_version: u32,
    pub environments: BTreeMap<EnvName, EnvLive>,
}

impl Live {
    pub fn empty() -> Self {
        Self { format_version: FORMAT_VERSION, environments: BTreeMap::new() }
    }

    /// Checks what serde cannot: the format version, unique ids per environment, one
    /// service per prefix, and that `restored_from` names no added service.
    pub fn validate(&self) -> Result<(), String> {
        if self.format_version != FORMAT_VERSION {
            return Err(format!(
                "format_version {} is not supported: this build reads format {FORMAT_VERSION}",
                self.format_version
            ));
        }
        for (env, live) in &self.environments {
            let mut ids = std::collections::BTreeSet::new();
            let mut prefixes = std::collections::BTreeSet::new();
            for s in &live.services {
                if s.id.added_number().is_some() {
                    return Err(format!(
                        "environments.{env}: service id `{}` is reserved for services a plan adds",
                        s.id
                    ));
                }
                if !ids.insert(&s.id) {
                    return Err(format!("environments.{env}: service id `{}` appears twice", s.id));
                }
                if !prefixes.insert(&s.prefix) {
                    return Err(format!(
                        "environments.{env}: two services hold prefix {}: a prefix names one service",
                        s.prefix
                    ));
                }
            }
        }
        Ok(())
    }

    /// `sha256:<hex>` of the canonical JSON form: environments by name, services by id,
    /// every field written out, visible services with their effective data. Two snapshots
    /// that the rules read the same way have the same digest.
    pub fn digest(&self) -> String {
        let mut canonical = self.clone();
        for live in canonical.environments.values_mut() {
            live.services.sort_by(|a, b| a.id.cmp(&b.id));
            for s in &mut live.services {
                s.data = s.effective_data();
            }
        }
        let bytes = serde_json::to_vec(&canonical).unwrap_or_default();
        format!("sha256:{}", hex(&Sha256::digest(&bytes)))
    }
}

/// A short hex digest of `s`, for names derived from paths.
pub fn short_digest(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes())[..6])
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A message safe to print on a terminal: control characters other than newline and tab
/// (escape sequences among them, from a name or a program's output) shown escaped.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Cuts hostile input down to a size that is safe to echo in an error.
pub(crate) fn shorten(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        return s.escape_debug().to_string();
    }
    let head: String = s.chars().take(MAX).collect();
    format!("{}…", head.escape_debug())
}

/// `12.3 MB`.
pub fn human_bytes(bytes: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < units.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_terminal_controls_only() {
        assert_eq!(printable("a\x1b[2Jb\rc\n\td\u{7f}"), "a\\u{1b}[2Jb\\rc\n\td\\u{7f}");
    }

    #[test]
    fn prefixes_follow_the_env_var_pattern() {
        assert!(Prefix::parse("DEFAULT").is_ok());
        assert!(Prefix::parse("NEW_DEFAULT2").is_ok());
        for bad in ["", "default", "1DB", "DB-X", "_DB", "DÉFAULT"] {
            assert!(Prefix::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn majors_read_integers_and_strings() {
        let m: Major = serde_json::from_str("17").expect("int");
        assert_eq!(m.get(), 17);
        let m: Major = serde_json::from_str("\"16\"").expect("string");
        assert_eq!(m.get(), 16);
        for bad in ["0", "-3", "\"x\"", "17.2", "\"\"", "99999999999"] {
            assert!(serde_json::from_str::<Major>(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn visible_service_without_data_holds_its_own_dataset() {
        let s: Service = serde_json::from_str(r#"{"id":"svc-1","version":16,"prefix":"DEFAULT","status":"attached"}"#)
            .expect("service");
        let d = s.effective_data().expect("data");
        assert_eq!(d.of.as_str(), "DEFAULT");
        assert!(d.complete);
    }

    #[test]
    fn digest_ignores_order_and_omitted_defaults() {
        let a: Live = serde_json::from_str(
            r#"{"format_version":1,"environments":{"live":{"services":[
                {"id":"b","version":16,"prefix":"B","status":"attached"},
                {"id":"a","version":16,"prefix":"A","status":"detached","fenced":false,"data":null}]}}}"#,
        )
        .expect("a");
        let b: Live = serde_json::from_str(
            r#"{"format_version":1,"environments":{"live":{"services":[
                {"id":"a","version":16,"prefix":"A","status":"detached"},
                {"id":"b","version":16,"prefix":"B","status":"attached","fenced":false,
                 "data":{"of":"B","complete":true,"restored_from":null,"verified":false}}]}}}"#,
        )
        .expect("b");
        assert_eq!(a.digest(), b.digest());
        let mut c = b.clone();
        c.environments.values_mut().for_each(|e| e.services[0].fenced = true);
        assert_ne!(a.digest(), c.digest());
    }

    #[test]
    fn snapshot_rejects_duplicate_ids_and_prefixes() {
        let live: Live = serde_json::from_str(
            r#"{"format_version":1,"environments":{"live":{"services":[
                {"id":"a","version":16,"prefix":"A","status":"attached"},
                {"id":"a","version":16,"prefix":"B","status":"attached"}]}}}"#,
        )
        .expect("parse");
        assert!(live.validate().expect_err("duplicate").contains("twice"));
    }
}
