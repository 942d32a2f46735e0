//! Byte counts as Patroni writes them (`1048576`, `16kB`, `10MB`, `1GB`): the
//! one notation the agent's file (`haproxy.max_read_lag`) and the health API's
//! `/replica?lag=` share, so a bound reads the same in both places.

use serde::Deserialize;

/// A byte count as written: an integer, or a string such as `16MB`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ByteCount {
    /// Bytes.
    Bytes(u64),
    /// With a unit, as [`parse_bytes`] takes it.
    Text(String),
}

impl ByteCount {
    /// The count in bytes.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            Self::Bytes(bytes) => Ok(*bytes),
            Self::Text(text) => parse_bytes(text),
        }
    }
}

/// Parses a byte count as Patroni accepts it: `1048576`, `16kB`, `10MB`, `1GB`.
/// The error names the text and why (`"10XB": unknown unit "XB" …`); the
/// caller says where the text came from.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a byte count like 1048576, 16kB or 10MB"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use B, kB, MB, GB or TB)"
            ))
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_parse_like_patroni() {
        assert_eq!(parse_bytes("1048576"), Ok(1_048_576));
        assert_eq!(parse_bytes("16kB"), Ok(16 * 1024));
        assert_eq!(parse_bytes("10MB"), Ok(10 * 1024 * 1024));
        assert!(parse_bytes("ten").is_err());
        assert!(parse_bytes("10XB").unwrap_err().contains("unknown unit"));
        assert_eq!(
            parse_bytes(" 10XB").unwrap_err(),
            "\"10XB\": unknown unit \"XB\" (use B, kB, MB, GB or TB)"
        );
    }

    #[test]
    fn a_count_is_a_number_or_text() {
        let number: ByteCount = serde_saphyr::from_str("1024").unwrap();
        assert_eq!(number.bytes(), Ok(1024));
        let text: ByteCount = serde_saphyr::from_str("16kB").unwrap();
        assert_eq!(text.bytes(), Ok(16 << 10));
    }
}
