//! The API's answers that the provider reads, as `docs/divio-api.md` describes them:
//! fields the provider does not read are ignored, a missing field it needs names itself
//! (`answer`). The test emulator writes its answers with these same types, so that the
//! two cannot drift apart unseen.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::provider::{ProviderError, Result};

/// `what` (one item of an answer) in its type, or an error naming the field that is
/// missing or of another type.
pub fn answer<T: DeserializeOwned>(value: Value, what: &str) -> Result<T> {
    serde_json::from_value(value)
        .map_err(|e| ProviderError::Inconsistent(format!("the Divio API's answer for {what} is not as expected: {e}")))
}

/// Each item of a listing in its type.
pub fn answers<T: DeserializeOwned>(values: Vec<Value>, what: &str) -> Result<Vec<T>> {
    values.into_iter().map(|v| answer(v, what)).collect()
}

/// What a create answers: the new thing's uuid.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Created {
    pub uuid: String,
}

/// `GET /apps/v3/applications/`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Application {
    pub uuid: String,
    pub slug: String,
}

/// `GET /apps/v3/environments/`: `slug` is the environment's name (`test`, `live`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Environment {
    pub uuid: String,
    pub slug: String,
}

/// `GET /apps/v3/regions/`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Region {
    pub uuid: String,
}

/// An entry of a region's catalogue, `GET /apps/v3/services/`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CatalogueEntry {
    pub uuid: String,
    #[serde(default)]
    pub identifier: String,
    #[serde(default)]
    pub name: String,
}

/// `GET /apps/v3/service-instances/`: one service of an environment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceInstance {
    pub uuid: String,
    pub prefix: String,
    /// `DATABASE`, `STORAGE`, …
    #[serde(rename = "type", default)]
    pub kind: String,
    pub service_status: String,
    #[serde(default)]
    pub region: String,
    /// Its catalogue entry.
    pub service: String,
}

impl ServiceInstance {
    pub fn is_database(&self) -> bool {
        self.kind.eq_ignore_ascii_case("DATABASE")
    }
}

/// `success` as the API writes it: a word (`"SUCCESS"`, `"PARTIAL"`, `"FAILURE"`) for
/// backups and restores, a bool for deployments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Success {
    Flag(bool),
    Word(String),
}

impl Success {
    pub fn ok(success: &Option<Success>) -> bool {
        match success {
            Some(Success::Flag(b)) => *b,
            Some(Success::Word(w)) => w.eq_ignore_ascii_case("SUCCESS"),
            None => false,
        }
    }
}

/// A part of a backup: its uuid, or an object holding it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Part {
    Uuid(String),
    Object { uuid: String },
}

impl Part {
    pub fn uuid(&self) -> &str {
        match self {
            Part::Uuid(u) | Part::Object { uuid: u } => u,
        }
    }
}

/// `GET /apps/v3/backups/<uuid>/`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Backup {
    pub uuid: String,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub success: Option<Success>,
    #[serde(default)]
    pub service_instance_backups: Vec<Part>,
    #[serde(default)]
    pub notes: Option<String>,
}

/// `GET /apps/v3/service-instance-backups/<uuid>/`: one instance's part of a backup.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceBackup {
    pub service_instance: String,
    #[serde(default)]
    pub size: u64,
}

/// `GET /apps/v3/backup-restores/<uuid>/`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Restore {
    pub uuid: String,
    #[serde(default)]
    pub finished: Option<String>,
    #[serde(default)]
    pub success: Option<Success>,
    #[serde(default)]
    pub notes: Option<String>,
}

/// `GET /apps/v3/deployments/<uuid>/`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Deployment {
    pub uuid: String,
    #[serde(default)]
    pub ended_at: Option<String>,
    #[serde(default)]
    pub success: Option<Success>,
}

/// `GET /apps/v3/environment-variables/`: the name only. The value, a secret, is never
/// read into the provider.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Variable {
    pub name: String,
}

/// What the API's long operations have in common, for waiting on them.
pub trait Operation: DeserializeOwned {
    /// The word to show while it runs.
    fn state(&self) -> String {
        "running".into()
    }
}

impl Operation for Backup {
    fn state(&self) -> String {
        self.state.clone().unwrap_or_else(|| "running".into())
    }
}

impl Operation for Restore {}

impl Operation for Deployment {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_are_read_as_the_api_writes_them() {
        let ok = |v: Value| Success::ok(&answer::<Restore>(v, "a restore").expect("restore").success);
        assert!(ok(json!({"uuid": "r", "success": "SUCCESS"})) && ok(json!({"uuid": "r", "success": true})));
        assert!(!ok(json!({"uuid": "r", "success": "PARTIAL"})) && !ok(json!({"uuid": "r", "success": null})));
        let b: Backup =
            answer(json!({"uuid": "b", "service_instance_backups": ["p1", {"uuid": "p2"}]}), "a backup").expect("b");
        assert_eq!(b.service_instance_backups.iter().map(Part::uuid).collect::<Vec<_>>(), ["p1", "p2"]);
        let missing = answer::<ServiceInstance>(json!({"uuid": "i", "prefix": "DEFAULT"}), "an instance");
        let e = missing.expect_err("no service_status").to_string();
        assert!(e.contains("missing field `service_status`") && e.contains("an instance"), "{e}");
    }
}
