//! The error of a file the server reads besides its configuration (the web configuration,
//! certificates, token files): it could not be read, or what it holds is wrong — always
//! naming the file.

use std::path::{Path, PathBuf};

/// A file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// It cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Its content is wrong.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
}

impl FileError {
    /// What is wrong with `path`.
    pub fn invalid(path: &Path, message: impl Into<String>) -> FileError {
        FileError::Invalid { path: path.to_owned(), message: message.into() }
    }
}

/// The bytes of `path`.
pub fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|source| FileError::Read { path: path.to_owned(), source })
}

/// The text of `path`.
pub fn read_to_string(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|source| FileError::Read { path: path.to_owned(), source })
}
