//! Reading a stopped data directory through `pg_controldata`.

use crate::ha::DataDir;
use std::path::Path;

/// What `pg_controldata` printed, reduced to what the core needs.
pub fn parse_controldata(output: &str) -> DataDir {
    let field = |name: &str| {
        output.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == name).then(|| value.trim().to_owned())
        })
    };
    let Some(system_id) = field("Database system identifier") else {
        return DataDir::Unusable {
            reason: "pg_controldata printed no system identifier".into(),
        };
    };
    let state = field("Database cluster state").unwrap_or_default();
    DataDir::Initialized {
        system_id,
        was_primary: matches!(
            state.as_str(),
            "shut down" | "in production" | "shutting down"
        ),
    }
}

/// Whether `dir` is missing or has no entries.
pub fn is_empty_dir(dir: &Path) -> std::io::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIMARY: &str = "pg_control version number:            1300\n\
Catalog version number:               202209061\n\
Database system identifier:           7310442046547251733\n\
Database cluster state:               shut down\n\
pg_control last modified:             Fri 27 Nov 2026 01:00:00 AM UTC\n";

    #[test]
    fn a_cleanly_stopped_primary() {
        assert_eq!(
            parse_controldata(PRIMARY),
            DataDir::Initialized {
                system_id: "7310442046547251733".into(),
                was_primary: true
            }
        );
    }

    #[test]
    fn a_stopped_standby() {
        let standby = PRIMARY.replace("shut down\n", "shut down in recovery\n");
        assert!(matches!(
            parse_controldata(&standby),
            DataDir::Initialized {
                was_primary: false,
                ..
            }
        ));
    }

    #[test]
    fn garbage_is_unusable() {
        assert!(matches!(
            parse_controldata("nonsense"),
            DataDir::Unusable { .. }
        ));
    }
}
