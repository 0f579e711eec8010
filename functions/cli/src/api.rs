//! kiln's HTTP API as the CLI uses it: one call per route, errors as the API words them.

use serde_json::Value;
use std::{path::Path, time::Duration};

/// Why a command failed, and the exit code a script sees for it.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The API refused the request (4xx): `error.code`, `error.message`, `error.field`.
    #[error("{status}: {message}{}", field.as_ref().map(|f| format!(" (field `{f}`)")).unwrap_or_default())]
    Refused { status: u16, code: String, message: String, field: Option<String> },
    /// The API or the network failed (5xx, no answer): trying again may work.
    #[error("the API is unavailable: {0}")]
    Unavailable(String),
    /// The job ended without succeeding.
    #[error("job {id} {status}{}", message.as_ref().map(|m| format!(": {m}")).unwrap_or_default())]
    JobDidNotSucceed { id: String, status: String, message: Option<String> },
    /// Interrupted (Ctrl-C); the job was canceled unless kept.
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl CliError {
    /// 1: the job failed, expired or was canceled; 2: usage; 3: the API refused the request;
    /// 4: the API or network failed; 130: interrupted.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::JobDidNotSucceed { .. } => 1,
            Self::Usage(_) => 2,
            Self::Refused { .. } => 3,
            Self::Unavailable(_) | Self::Io(_) => 4,
            Self::Interrupted => 130,
        }
    }

    /// As JSON, for `--json`.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Refused { status, code, message, field } => {
                serde_json::json!({"error": {"status": status, "code": code, "message": message, "field": field}})
            }
            other => serde_json::json!({"error": {"message": other.to_string()}}),
        }
    }
}

impl From<reqwest::Error> for CliError {
    fn from(err: reqwest::Error) -> Self {
        Self::Unavailable(err.to_string())
    }
}

pub struct Api {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(base: &str, key: &str) -> Self {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("an HTTP client");
        Self { base: base.trim_end_matches('/').to_owned(), key: key.to_owned(), http }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value, CliError> {
        let mut request = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.key);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        let error = &value["error"];
        let message = error["message"].as_str().map(str::to_owned).unwrap_or_else(|| text.chars().take(200).collect());
        if status.is_client_error() {
            return Err(CliError::Refused {
                status: status.as_u16(),
                code: error["code"].as_str().unwrap_or("").to_owned(),
                message,
                field: error["field"].as_str().map(str::to_owned),
            });
        }
        Err(CliError::Unavailable(format!("{status}: {message}")))
    }

    pub async fn models(&self) -> Result<Value, CliError> {
        self.call(reqwest::Method::GET, "/v1/models", None).await
    }

    pub async fn submit(&self, body: &Value) -> Result<Value, CliError> {
        self.call(reqwest::Method::POST, "/v1/jobs", Some(body)).await
    }

    pub async fn job(&self, id: &str) -> Result<Value, CliError> {
        self.call(reqwest::Method::GET, &format!("/v1/jobs/{id}"), None).await
    }

    pub async fn jobs(&self, status: Option<&str>, limit: u32) -> Result<Value, CliError> {
        let query = match status {
            Some(status) => format!("?status={status}&limit={limit}"),
            None => format!("?limit={limit}"),
        };
        self.call(reqwest::Method::GET, &format!("/v1/jobs{query}"), None).await
    }

    pub async fn cancel(&self, id: &str) -> Result<Value, CliError> {
        self.call(reqwest::Method::POST, &format!("/v1/jobs/{id}/cancel"), None).await
    }

    pub async fn webhook_secret(&self, rotate: bool) -> Result<Value, CliError> {
        match rotate {
            true => self.call(reqwest::Method::POST, "/v1/webhooks/secret/rotate", None).await,
            false => self.call(reqwest::Method::GET, "/v1/webhooks/secret", None).await,
        }
    }

    /// Asks for an upload link (`request` is the body of `POST /v1/uploads`) and PUTs `bytes`
    /// there with the headers it lists; the link's answer.
    pub async fn upload(&self, request: &Value, bytes: Vec<u8>) -> Result<Value, CliError> {
        let link = self.call(reqwest::Method::POST, "/v1/uploads", Some(request)).await?;
        let url = link["url"].as_str().ok_or_else(|| CliError::Unavailable("the upload link has no url".into()))?;
        let mut put = self.http.put(url).body(bytes);
        for (name, value) in link["headers"].as_object().into_iter().flatten() {
            if let Some(value) = value.as_str() {
                put = put.header(name.as_str(), value);
            }
        }
        let response = put.send().await?;
        if !response.status().is_success() {
            return Err(CliError::Unavailable(format!("the upload was refused: {}", response.status())));
        }
        Ok(link)
    }

    /// Downloads `url` into `path`.
    pub async fn download(&self, url: &str, path: &Path) -> Result<u64, CliError> {
        let response = self.http.get(url).send().await?;
        if !response.status().is_success() {
            return Err(CliError::Unavailable(format!("downloading {url}: {}", response.status())));
        }
        let bytes = response.bytes().await?;
        std::fs::write(path, &bytes)?;
        Ok(bytes.len() as u64)
    }
}
