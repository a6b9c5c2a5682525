//! The two ways a router runs its experts, named the same way in flags,
//! `ModelInfo`, benchmark reports and logs.

use std::fmt;
use std::str::FromStr;

/// Where a router's experts run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpertMode {
    /// Each expert is an expert-svc process, reached over gRPC.
    Distributed,
    /// The router runs the same expert kernels itself, with no network: the
    /// reference the distributed mode is tested and benchmarked against.
    InProcess,
}

impl ExpertMode {
    pub const ALL: [Self; 2] = [Self::Distributed, Self::InProcess];

    pub fn name(self) -> &'static str {
        match self {
            Self::Distributed => "distributed",
            Self::InProcess => "in-process",
        }
    }
}

impl fmt::Display for ExpertMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ExpertMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|mode| mode.name() == s)
            .ok_or_else(|| format!("unknown expert mode {s:?}: expected distributed or in-process"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for mode in ExpertMode::ALL {
            assert_eq!(mode.to_string().parse::<ExpertMode>(), Ok(mode));
        }
        assert_eq!(ExpertMode::InProcess.to_string(), "in-process");
        assert!("local".parse::<ExpertMode>().is_err());
    }
}
