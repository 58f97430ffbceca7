//! A small client of the Control Panel API: JSON over HTTPS with the token in a header,
//! retries decided by `decide::next_step` (a POST whose answer is lost is never sent
//! again here: the caller looks for what it created first), pagination through `next`, timeouts, and a
//! user agent naming pgconverge. Requests are async (reqwest on a tokio runtime owned by
//! the client); the provider calls them one at a time through `block_on`, except where
//! it fans out across environments with `all`, at most `CONCURRENCY` at once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::decide::{next_step, Next, Outcome, Verb};

/// Requests in flight at once when observing several environments.
pub const CONCURRENCY: usize = 4;

const USER_AGENT: &str = concat!("pgconverge/", env!("CARGO_PKG_VERSION"), " (+declarative PostgreSQL upgrades)");

/// Pages followed before a listing is taken to be looping.
const MAX_PAGES: usize = 1000;

/// Why a request failed, after its retries.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The API answered with an error status; `detail` is its message, shortened.
    #[error("{method} {path}: HTTP {code}{detail}")]
    Status { method: Method, path: String, code: u16, detail: String },
    /// No usable answer: connection, timeout, or a body that is not the JSON expected.
    #[error("{method} {path}: {message}")]
    Transport { method: Method, path: String, message: String },
    /// A POST that may have been carried out although no answer said so (no answer, or a
    /// 5xx): the caller looks for what it would have created before sending it again.
    #[error("{method} {path}: {message}; it may have been carried out")]
    Lost { method: Method, path: String, message: String },
}

impl ApiError {
    pub fn code(&self) -> Option<u16> {
        match self {
            ApiError::Status { code, .. } => Some(*code),
            ApiError::Transport { .. } | ApiError::Lost { .. } => None,
        }
    }

    /// Whether the request may have been carried out although it failed.
    pub fn lost(&self) -> bool {
        matches!(self, ApiError::Lost { .. })
    }
}

/// The token, kept out of `Debug` and every message.
struct Token(HeaderValue);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    base: String,
    token: Token,
}

/// The API of one zone, with one token.
#[derive(Debug)]
pub struct Api {
    runtime: tokio::runtime::Runtime,
    inner: Arc<Inner>,
}

impl Api {
    pub fn new(base: &str, token: &str) -> Result<Api, String> {
        let mut header = HeaderValue::from_str(&format!("Token {}", token.trim()))
            .map_err(|_| "the Divio token holds characters that cannot go in an HTTP header".to_owned())?;
        header.set_sensitive(true);
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("cannot set up HTTPS: {e}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
        Ok(Api { runtime, inner: Arc::new(Inner { http, base: base.to_owned(), token: Token(header) }) })
    }

    pub fn get(&self, path: &str) -> Result<Value, ApiError> {
        self.runtime.block_on(self.inner.send(Method::GET, path, None))
    }

    /// Sends a POST once, or again only when the API proved it did not act (429, no
    /// connection); `ApiError::Lost` when it may have acted without saying so.
    pub fn post(&self, path: &str, body: Value) -> Result<Value, ApiError> {
        self.runtime.block_on(self.inner.send(Method::POST, path, Some(body)))
    }

    pub fn patch(&self, path: &str, body: Value) -> Result<Value, ApiError> {
        self.runtime.block_on(self.inner.send(Method::PATCH, path, Some(body)))
    }

    /// A 404 after an attempt that went unanswered is the delete having happened.
    pub fn delete(&self, path: &str) -> Result<Value, ApiError> {
        self.runtime.block_on(self.inner.send(Method::DELETE, path, None))
    }

    /// Every item of a listing, page after page.
    pub fn list(&self, path: &str) -> Result<Vec<Value>, ApiError> {
        self.runtime.block_on(self.inner.clone().list(path.to_owned()))
    }

    /// Lists each of `paths`, at most `CONCURRENCY` at once; results in the same order.
    pub fn list_all(&self, paths: Vec<String>) -> Result<Vec<Vec<Value>>, ApiError> {
        let inner = self.inner.clone();
        self.all(paths.into_iter().map(move |p| inner.clone().list(p)).collect())
    }

    fn all<T: Send + 'static>(
        &self,
        jobs: Vec<impl Future<Output = Result<T, ApiError>> + Send + 'static>,
    ) -> Result<Vec<T>, ApiError> {
        self.runtime.block_on(async {
            let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
            let mut set = tokio::task::JoinSet::new();
            for (i, job) in jobs.into_iter().enumerate() {
                let permits = permits.clone();
                set.spawn(async move {
                    let _permit = permits.acquire_owned().await;
                    (i, job.await)
                });
            }
            let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None).take(set.len()).collect();
            while let Some(joined) = set.join_next().await {
                let (i, result) = joined.map_err(|e| ApiError::Transport {
                    method: Method::GET,
                    path: "(listing)".into(),
                    message: format!("a request task failed: {e}"),
                })?;
                out[i] = Some(result?);
            }
            Ok(out.into_iter().flatten().collect())
        })
    }
}

impl Inner {
    /// `path` is relative to the base URL, or an absolute URL on the same origin (a
    /// `next` link): the token is never sent anywhere else.
    fn url(&self, path: &str) -> Result<String, String> {
        if path.starts_with("http://") || path.starts_with("https://") {
            let origin = |u: &str| {
                let rest = u.split_once("://").map_or("", |(_, r)| r);
                format!("{}://{}", u.split("://").next().unwrap_or(""), rest.split('/').next().unwrap_or(""))
            };
            if origin(path) != origin(&self.base) {
                return Err(format!("refusing to follow a link to another site ({})", origin(path)));
            }
            return Ok(path.to_owned());
        }
        Ok(format!("{}{path}", self.base))
    }

    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, ApiError> {
        let verb = match method {
            Method::GET => Verb::Read,
            Method::POST => Verb::Create,
            Method::DELETE => Verb::Delete,
            _ => Verb::Change,
        };
        let shown = path.split('?').next().unwrap_or(path).to_owned();
        let transport = |message: String| ApiError::Transport { method: method.clone(), path: shown.clone(), message };
        let url = self.url(path).map_err(transport)?;
        let (mut attempt, mut lost_before) = (0, false);
        loop {
            attempt += 1;
            let mut request = self.http.request(method.clone(), &url).header(AUTHORIZATION, self.token.0.clone());
            if let Some(body) = &body {
                request = request.header(CONTENT_TYPE, "application/json").body(body.to_string());
            }
            let (outcome, why, refused) = match request.send().await {
                Ok(response) => {
                    let code = response.status();
                    let retry_after = response
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    match (code.is_success(), response.bytes().await) {
                        (true, Ok(bytes)) if bytes.iter().all(u8::is_ascii_whitespace) => return Ok(Value::Null),
                        (true, Ok(bytes)) => {
                            return serde_json::from_slice(&bytes)
                                .map_err(|e| transport(format!("the answer is not the JSON expected: {e}")))
                        }
                        (true, Err(e)) => {
                            (Outcome::NoAnswer, format!("the answer was cut off: {}", without_url(&e)), None)
                        }
                        (false, bytes) => {
                            let detail = detail(code, bytes.as_deref().unwrap_or_default());
                            (
                                Outcome::Status { code: code.as_u16(), retry_after },
                                format!("HTTP {}", code.as_u16()),
                                Some(detail),
                            )
                        }
                    }
                }
                Err(e) if e.is_connect() => (Outcome::NotSent, without_url(&e), None),
                Err(e) => (Outcome::NoAnswer, without_url(&e), None),
            };
            match next_step(verb, attempt, outcome, lost_before, jitter()) {
                Next::Retry(wait) => {
                    lost_before |= matches!(outcome, Outcome::NoAnswer | Outcome::Status { code: 500..=599, .. });
                    tracing::debug!(%method, path = %shown, attempt, wait_ms = wait.as_millis() as u64, %why, "retrying");
                    tokio::time::sleep(wait).await;
                }
                Next::Done => return Ok(Value::Null),
                Next::LookFirst => return Err(ApiError::Lost { method, path: shown, message: why }),
                Next::Fail => {
                    return Err(match (outcome, refused) {
                        (Outcome::Status { code, .. }, Some(detail)) => {
                            ApiError::Status { method, path: shown, code, detail }
                        }
                        _ => transport(format!("{why} (gave up after {attempt} attempts)")),
                    })
                }
            }
        }
    }

    async fn list(self: Arc<Self>, path: String) -> Result<Vec<Value>, ApiError> {
        let mut items = Vec::new();
        let mut next = Some(path.clone());
        let mut pages = 0;
        while let Some(page) = next.take() {
            pages += 1;
            let bad = |message: String| ApiError::Transport { method: Method::GET, path: path.clone(), message };
            if pages > MAX_PAGES {
                return Err(bad(format!("more than {MAX_PAGES} pages")));
            }
            let body = self.send(Method::GET, &page, None).await?;
            let results = body
                .get("results")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("the answer is not a listing (no `results`)".into()))?;
            items.extend(results.iter().cloned());
            next = body.get("next").and_then(Value::as_str).map(str::to_owned);
        }
        Ok(items)
    }
}

/// The API's own words for an error (`{"field": ["msg"]}`, `{"detail": "…"}`), shortened;
/// nothing for an HTML error page.
fn detail(code: StatusCode, body: &[u8]) -> String {
    let reason = code.canonical_reason().map(|r| format!(" {r}")).unwrap_or_default();
    let Ok(value) = serde_json::from_slice::<Value>(body) else { return reason };
    let text = match &value {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::Array(a) => {
                        a.iter().map(|m| m.as_str().unwrap_or("?").to_owned()).collect::<Vec<_>>().join(" ")
                    }
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                if k == "detail" || k == "non_field_errors" {
                    v
                } else {
                    format!("{k}: {v}")
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    };
    let text: String = text.chars().take(300).collect();
    format!("{reason}: {text}")
}

/// A transport error without the URL reqwest puts in its message (the caller names the
/// path already; a URL could carry a query someone considers private).
fn without_url(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "no answer"
    };
    let mut source = std::error::Error::source(e);
    let mut cause = String::new();
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {cause}")
    }
}

/// A number in [0, 1) for the backoff's jitter; it need not be good, only spread.
pub(super) fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_to_other_sites_are_refused() {
        let api = Api::new("https://api.divio.com", "secret").expect("api");
        assert_eq!(api.inner.url("/apps/v3/x/").as_deref(), Ok("https://api.divio.com/apps/v3/x/"));
        assert!(api.inner.url("https://api.divio.com/apps/v3/x/?page=2").is_ok());
        assert!(api.inner.url("https://evil.example/apps/v3/x/?page=2").is_err());
        assert!(api.inner.url("http://api.divio.com/apps/v3/x/").is_err(), "nor a downgrade to http");
        assert!(!format!("{api:?}").contains("secret"), "the token is not in Debug");
    }

    #[test]
    fn error_details_are_the_apis_words() {
        let d = detail(StatusCode::BAD_REQUEST, br#"{"prefix": ["already in use"], "non_field_errors": ["no"]}"#);
        assert_eq!(d, " Bad Request: prefix: already in use; no");
        assert_eq!(detail(StatusCode::BAD_GATEWAY, b"<html>"), " Bad Gateway");
    }

    #[test]
    fn jitter_stays_in_range() {
        assert!((0..100).map(|_| jitter()).all(|j| (0.0..1.0).contains(&j)));
    }
}
