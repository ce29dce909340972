//! The one error type of the crate. `python.rs` maps it to Python exceptions in one place.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// An array has the wrong number of dimensions or the wrong shape.
    Shape(String),
    /// An array has an unsupported element type.
    DType(String),
    /// A value is out of range, or a call comes at the wrong time.
    Value(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape(m) | Error::DType(m) | Error::Value(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
