//! What the API cannot show, as this provider records it: the fences its
//! `fence_command` set, in a file under `root` or in the state database.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{failed, DivioProvider};
use crate::model::{EnvName, Prefix, ServiceId};
use crate::provider::{ProviderError, Result};

/// The name of the records in the state database.
const RECORDS: &str = "divio-records";

/// What the API cannot show, as this provider recorded it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Records {
    #[serde(default)]
    pub(super) fences: Vec<Fence>,
}

/// A fence set by `fence_command`; `lifted` once a deploy moved the application off the
/// fenced service and `unfence_command` ran.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct Fence {
    pub(super) env: EnvName,
    pub(super) service: ServiceId,
    pub(super) prefix: Prefix,
    #[serde(default)]
    pub(super) lifted: bool,
}

impl DivioProvider {
    pub(super) fn records_path(&self) -> PathBuf {
        let name: String =
            self.application.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        self.root.join(format!("divio-{name}.json"))
    }

    pub(super) fn read_records(&self) -> Result<Records> {
        if let Some(state) = &self.state {
            return match state.get(RECORDS)? {
                Some(text) => serde_json::from_str(&text)
                    .map_err(|e| ProviderError::Inconsistent(format!("the state database's record {RECORDS}: {e}"))),
                None => Ok(Records::default()),
            };
        }
        let path = self.records_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                ProviderError::Inconsistent(format!("{}: {e}; remove it to start afresh", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Records::default()),
            Err(e) => Err(failed(format!("cannot read {}: {e}", path.display()))),
        }
    }

    pub(super) fn write_records(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        if let Some(state) = &self.state {
            let text = serde_json::to_string(&self.records).map_err(failed)?;
            return Ok(state.put(RECORDS, &text)?);
        }
        let path = self.records_path();
        let bytes = serde_json::to_vec_pretty(&self.records).map_err(failed)?;
        crate::atomic::write_atomically(&path, &bytes, 0o644)
            .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))
    }
}
