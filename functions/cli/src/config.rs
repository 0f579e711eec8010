//! Where the CLI finds the API and the key: flags, then `KILN_API` / `KILN_KEY`, then a config
//! file (`$KILN_CONFIG`, else `$XDG_CONFIG_HOME/kiln/config`, else `~/.config/kiln/config`)
//! of `name = value` lines: `api`, `key`, `model`.

use std::{collections::HashMap, path::PathBuf};

use crate::api::CliError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub api: String,
    pub key: String,
    /// The model `kiln run` uses without `--model`.
    pub model: Option<String>,
}

/// The config file's path, when one is named or exists in the usual place.
fn file() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KILN_CONFIG") {
        return Some(PathBuf::from(path));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(base.join("kiln/config"))
}

/// `name = value` lines; `#` starts a comment; values may be quoted.
pub fn parse(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().trim_matches('"').to_owned()))
        .collect()
}

/// Flags (clap already read the environment into them) over the config file.
pub fn resolve(api: Option<String>, key: Option<String>) -> Result<Settings, CliError> {
    let from_file = match file() {
        Some(path) if path.is_file() => parse(&std::fs::read_to_string(&path)?),
        _ => HashMap::new(),
    };
    let api = api.or_else(|| from_file.get("api").cloned()).ok_or_else(|| {
        CliError::Usage("no API URL: pass --api, set KILN_API, or put `api = …` in the config file".into())
    })?;
    let key = key.or_else(|| from_file.get("key").cloned()).ok_or_else(|| {
        CliError::Usage("no API key: pass --key, set KILN_KEY, or put `key = …` in the config file".into())
    })?;
    Ok(Settings { api, key, model: from_file.get("model").cloned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_lines_are_name_value_pairs() {
        let parsed = parse("# kiln\napi = \"http://127.0.0.1:8080\"\nkey=kiln_abc  # mine\n\nnonsense\n");
        assert_eq!(parsed.get("api").map(String::as_str), Some("http://127.0.0.1:8080"));
        assert_eq!(parsed.get("key").map(String::as_str), Some("kiln_abc"));
        assert_eq!(parsed.len(), 2);
    }
}
