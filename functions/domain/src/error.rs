//! Errors about what a client sent. Each names the offending field so a client can fix it.

use std::fmt;

/// What kind of mistake the input has; the HTTP layer maps each kind to a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputErrorKind {
    /// The body is not JSON at all (or not a JSON object).
    InvalidJson,
    /// A field has the wrong JSON type (a string where a number belongs, a negative count).
    InvalidType,
    /// A required field is absent or null.
    MissingField,
    /// A field this API does not know (usually a typo).
    UnknownField,
    /// A well-typed value outside what the model allows.
    InvalidValue,
    /// The model (or model version) is not served.
    UnknownModel,
}

impl InputErrorKind {
    /// Stable machine-readable code, part of the API contract.
    pub fn code(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidType => "invalid_type",
            Self::MissingField => "missing_field",
            Self::UnknownField => "unknown_field",
            Self::InvalidValue => "invalid_value",
            Self::UnknownModel => "unknown_model",
        }
    }
}

/// A client mistake, with the field it concerns (dotted path, e.g. `webhook.url`) when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    pub kind: InputErrorKind,
    pub field: Option<String>,
    pub message: String,
}

impl InputError {
    pub fn new(kind: InputErrorKind, field: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        Self { kind, field: field.into(), message: message.into() }
    }

    /// A value outside the model's limits or otherwise unacceptable.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::new(InputErrorKind::InvalidValue, Some(field.to_owned()), message)
    }

    pub fn missing(field: &str) -> Self {
        Self::new(InputErrorKind::MissingField, Some(field.to_owned()), format!("`{field}` is required"))
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for InputError {}
