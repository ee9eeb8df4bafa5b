//! Node names: the DNS name in a node's certificate.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A node's name: 1–63 characters of lowercase letters, digits and '-', not starting
/// or ending with '-' (a DNS label, so it can be a certificate's subject name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeName(String);

/// Why a string is not a node name.
#[derive(Debug, thiserror::Error)]
#[error(
    "node name {0:?} is invalid: use 1 to 63 lowercase letters, digits and '-', not at either end"
)]
pub struct NodeNameError(pub String);

impl NodeName {
    /// Checks and wraps a name.
    pub fn new(s: impl Into<String>) -> Result<NodeName, NodeNameError> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= 63
            && !s.starts_with('-')
            && !s.ends_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(NodeName(s))
        } else {
            Err(NodeNameError(s))
        }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for NodeName {
    type Err = NodeNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeName::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels_are_names_and_other_strings_are_not() {
        for ok in ["a", "node-1", "b2", "x".repeat(63).as_str()] {
            assert!(NodeName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a.b",
            "a_b",
            "a@b",
            "x".repeat(64).as_str(),
        ] {
            assert!(NodeName::new(bad).is_err(), "{bad}");
        }
    }
}
