//! How a jai daemon writes its log: the `log:` section shared by the agent's
//! and the app's configuration files, and (feature `logging`) the one function
//! that installs it.
//!
//! Both daemons log to **stderr**, the convention for services under systemd
//! (journald keeps stdout and stderr apart; tools read stderr as the log).
//! `text` is for people at a terminal; `json` is one object per line for log
//! shippers, so nobody has to parse the text format with regular expressions.

use serde::Deserialize;

/// The `log:` section of a daemon's configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Line format; `text` when absent.
    #[serde(default)]
    pub format: LogFormat,
}

/// The format of each log line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (`2026-12-03T17:30:26Z  INFO message key=value`).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields.message`, the
    /// other fields, and the span the event happened in.
    Json,
}

impl LogFormat {
    /// The name used in configuration files and on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?}: expected text or json"
            )),
        }
    }
}

/// Installs the global subscriber: events at or above `RUST_LOG`'s filter
/// (else `default_filter`) to stderr, in `config.format`. Colours only when
/// stderr is a terminal, so files and journald get plain text.
#[cfg(feature = "logging")]
pub fn init(config: &LogConfig, default_filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match config.format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_defaults_to_text_and_accepts_json() {
        let absent: LogConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(absent.format, LogFormat::Text);
        let json: LogConfig = serde_json::from_str(r#"{"format":"json"}"#).unwrap();
        assert_eq!(json.format, LogFormat::Json);
    }

    #[test]
    fn an_unknown_format_is_refused() {
        let error = serde_json::from_str::<LogConfig>(r#"{"format":"xml"}"#).unwrap_err();
        assert!(
            error.to_string().contains("unknown variant `xml`"),
            "{error}"
        );
    }
}
