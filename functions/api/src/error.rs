//! The one place where errors become HTTP statuses and `{"error": {code, message, field}}` bodies.

use http::{Response, StatusCode, header};
use kiln_app::{AppError, ports::PortError};
use kiln_domain::InputErrorKind;
use lambda_http::Body;
use serde_json::json;
use tracing::{error, warn};

/// A failure answered to the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    /// On a 429: the tenant limit that refused (`max_active_jobs`, `jobs_per_minute`,
    /// `units_per_day`) and when it frees up (none for active jobs: when one ends).
    pub limit: Option<&'static str>,
    pub resets_at: Option<chrono::DateTime<chrono::Utc>>,
    pub headers: Vec<(header::HeaderName, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None, limit: None, resets_at: None, headers: Vec::new() }
    }

    pub fn with_field(mut self, field: &str) -> Self {
        self.field = Some(field.to_owned());
        self
    }

    pub fn with_header(mut self, name: header::HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn into_response(self) -> Response<Body> {
        let mut error = json!({"code": self.code, "message": self.message, "field": self.field});
        if let Some(limit) = self.limit {
            error["limit"] = json!(limit);
            error["resets_at"] = json!(self.resets_at);
        }
        let body = json!({ "error": error });
        let mut builder = Response::builder().status(self.status).header(header::CONTENT_TYPE, "application/json");
        for (name, value) in self.headers {
            builder = builder.header(name, value);
        }
        builder.body(Body::Text(body.to_string())).unwrap_or_else(|_| Response::new(Body::Empty))
    }
}

impl From<AppError> for ApiError {
    fn from(err: AppError) -> Self {
        use StatusCode as S;
        let status = match &err {
            AppError::Input(input) => match input.kind {
                InputErrorKind::InvalidValue | InputErrorKind::UnknownModel => S::UNPROCESSABLE_ENTITY,
                _ => S::BAD_REQUEST,
            },
            AppError::Unauthorized(_) => S::UNAUTHORIZED,
            AppError::NotFound(_) => S::NOT_FOUND,
            AppError::AlreadyFinished { .. } => S::CONFLICT,
            AppError::IdempotencyMismatch => S::UNPROCESSABLE_ENTITY,
            AppError::QuotaExceeded { .. } | AppError::RateLimited { .. } | AppError::UnitsExhausted { .. } => {
                S::TOO_MANY_REQUESTS
            }
            AppError::QueueUnavailable(_) | AppError::Contention | AppError::Port(PortError::Unavailable { .. }) => {
                S::SERVICE_UNAVAILABLE
            }
            AppError::Port(PortError::Corrupt { .. }) | AppError::Transition(_) => S::INTERNAL_SERVER_ERROR,
        };
        match &err {
            AppError::QueueUnavailable(source) => warn!(error = %source, "job queue unavailable"),
            AppError::Port(PortError::Unavailable { backend, source }) => {
                error!(backend, error = %source, "backend unavailable")
            }
            AppError::Port(PortError::Corrupt { .. }) => error!(error = %err, "corrupt stored data"),
            AppError::Transition(transition) => error!(error = %transition, "illegal transition"),
            _ => {}
        }
        let mut answer = ApiError::new(status, err.code(), err.client_message());
        answer.field = err.field().map(str::to_owned);
        if let Some((limit, resets_at)) = err.exceeded_limit() {
            answer.limit = Some(limit.as_str());
            answer.resets_at = resets_at;
        }
        match &err {
            AppError::Unauthorized(_) => answer.with_header(header::WWW_AUTHENTICATE, "Bearer"),
            AppError::RateLimited { retry_after_secs, .. } | AppError::UnitsExhausted { retry_after_secs, .. } => {
                answer.with_header(header::RETRY_AFTER, retry_after_secs.to_string())
            }
            _ if status == S::SERVICE_UNAVAILABLE => answer.with_header(header::RETRY_AFTER, "1"),
            _ => answer,
        }
    }
}
