//! The release the running system says it is: `VERSION_ID=N` in an os-release style file
//! (`release_file`, e.g. `/etc/sitecast-release`, part of the signed image).
//!
//! Lines are `KEY=value`; a value may be quoted (`"…"` or `'…'`); blank lines and `#` comments
//! are skipped. The last `VERSION_ID` line counts, as when a shell sources the file.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ReleaseFileError {
    /// Missing or unreadable.
    #[error("reading {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    /// No `VERSION_ID` line.
    #[error("{path} has no VERSION_ID line")]
    NoVersion { path: PathBuf },
    /// A `VERSION_ID` that is not a release number.
    #[error("{path}: VERSION_ID {value:?} is not a release number")]
    NotANumber { path: PathBuf, value: String },
}

/// The release number in the file at `path`.
pub fn read_version(path: &Path) -> Result<u64, ReleaseFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| ReleaseFileError::Read { path: path.to_owned(), error })?;
    let value = version_id(&text).ok_or(ReleaseFileError::NoVersion { path: path.to_owned() })?;
    value.parse().map_err(|_| ReleaseFileError::NotANumber {
        path: path.to_owned(),
        value: value.to_owned(),
    })
}

/// The value of the last `VERSION_ID` line, unquoted.
fn version_id(text: &str) -> Option<&str> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("VERSION_ID="))
        .map(|value| {
            let value = value.trim();
            ['"', '\'']
                .iter()
                .find_map(|&q| value.strip_prefix(q)?.strip_suffix(q))
                .unwrap_or(value)
        })
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<u64, ReleaseFileError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sitecast-release");
        std::fs::write(&path, text).expect("write");
        read_version(&path)
    }

    #[test]
    fn the_version_quoted_or_not() {
        assert_eq!(read("VERSION_ID=2\n").ok(), Some(2));
        assert_eq!(
            read("PRETTY_NAME=\"Till 7 (b)\"\nVERSION_ID=\"7\"\nKERNEL=6.1\n").ok(),
            Some(7)
        );
        assert_eq!(read("# comment\n\n  VERSION_ID='12'  \n").ok(), Some(12));
        assert_eq!(read("VERSION_ID=1\nVERSION_ID=3").ok(), Some(3), "the last one counts");
    }

    #[test]
    fn a_file_without_a_number_is_an_error() {
        assert!(matches!(read("PRETTY_NAME=x\n"), Err(ReleaseFileError::NoVersion { .. })));
        assert!(matches!(read("VERSION_ID=\n"), Err(ReleaseFileError::NotANumber { .. })));
        assert!(matches!(read("VERSION_ID=\"2.1\"\n"), Err(ReleaseFileError::NotANumber { .. })));
        assert!(matches!(read("VERSION_ID=-1\n"), Err(ReleaseFileError::NotANumber { .. })));
        assert!(matches!(read("MY_VERSION_ID=4\n"), Err(ReleaseFileError::NoVersion { .. })));
        let missing = read_version(Path::new("/nonexistent/sitecast-release"));
        assert!(matches!(missing, Err(ReleaseFileError::Read { .. })));
    }
}
