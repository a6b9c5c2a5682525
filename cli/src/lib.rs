//! The `moe` command's library: starting a cluster of real processes and
//! talking to it. The end-to-end tests use the same launcher as `moe up`.

pub mod bench;
pub mod client;
pub mod http;
pub mod launcher;
pub mod pki;
