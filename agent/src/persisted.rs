//! What the agent keeps on disk between its runs, beside the data directory.
//!
//! The core's memory lives in the process. One piece of it must outlive the
//! process: that this member's data is a former primary not yet rewound
//! against the current leader ([`crate::ha::Core::unrewound_former_primary`]).
//! After such a member ran as a replica without a leader (a whole-cluster
//! restart), its control file no longer says "primary"; an agent restarted
//! then would follow the next leader without `pg_rewind`. A marker file in
//! the state directory carries the fact across restarts.

use anyhow::{Context, Result};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The marker file's name in the state directory.
pub const UNREWOUND_MARKER: &str = "former-primary.unrewound";

/// The marker "former primary, not rewound yet", as it is on disk.
#[derive(Debug)]
pub struct UnrewoundMarker {
    path: PathBuf,
    present: bool,
}

impl UnrewoundMarker {
    /// Reads whether the marker is in `state_dir`.
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join(UNREWOUND_MARKER);
        let present = path.exists();
        Self { path, present }
    }

    /// The marker was (or is now) on disk.
    pub fn present(&self) -> bool {
        self.present
    }

    /// Where the marker lives, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the disk say `wanted`. Writes only on a change; the file is
    /// synced before this returns, so an acknowledged `true` survives a crash.
    pub fn sync(&mut self, wanted: bool) -> Result<()> {
        if wanted == self.present {
            return Ok(());
        }
        if wanted {
            let mut file = std::fs::File::create(&self.path)
                .with_context(|| format!("creating {}", self.path.display()))?;
            file.write_all(
                b"This member's data last ran as a primary and has not been rewound against\n\
                  the current leader. jai-agent removes this file once it has; do not remove it by hand.\n",
            )
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", self.path.display()))?;
        } else {
            match std::fs::remove_file(&self.path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(error).with_context(|| format!("removing {}", self.path.display()))
                }
            }
        }
        self.present = wanted;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_survives_a_reload_and_goes_when_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let mut marker = UnrewoundMarker::load(dir.path());
        assert!(!marker.present());
        marker.sync(true).unwrap();
        assert!(
            UnrewoundMarker::load(dir.path()).present(),
            "a restart sees it"
        );
        marker.sync(true).unwrap();
        marker.sync(false).unwrap();
        assert!(!UnrewoundMarker::load(dir.path()).present());
        // Already gone (removed by hand): clearing is not an error.
        let mut stale = UnrewoundMarker {
            path: dir.path().join(UNREWOUND_MARKER),
            present: true,
        };
        stale.sync(false).unwrap();
        assert!(!stale.present());
    }

    #[test]
    fn a_marker_that_cannot_be_written_is_an_error_and_not_counted() {
        let mut marker = UnrewoundMarker::load(Path::new("/nonexistent/jai/state"));
        let error = marker.sync(true).unwrap_err();
        assert!(format!("{error:#}").contains("former-primary.unrewound"));
        assert!(!marker.present());
    }
}
