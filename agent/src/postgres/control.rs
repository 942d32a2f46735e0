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

/// Where a cleanly stopped server's WAL ends: its last checkpoint (the
/// shutdown checkpoint) and that checkpoint's timeline.
pub fn parse_last_checkpoint(output: &str) -> Option<(u32, jai_proto::Lsn)> {
    let field = |name: &str| {
        output.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == name).then(|| value.trim().to_owned())
        })
    };
    let location = field("Latest checkpoint location")?.parse().ok()?;
    let timeline = field("Latest checkpoint's TimeLineID")?.parse().ok()?;
    Some((timeline, location))
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
    fn the_last_checkpoint_is_read_with_its_timeline() {
        let output = "Latest checkpoint location:           0/4432068\n\
Latest checkpoint's REDO location:    0/4432068\n\
Latest checkpoint's TimeLineID:       2\n";
        assert_eq!(
            parse_last_checkpoint(output),
            Some((2, "0/4432068".parse().unwrap()))
        );
        assert_eq!(parse_last_checkpoint(PRIMARY), None);
    }

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
