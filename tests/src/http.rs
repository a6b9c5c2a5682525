//! HTTP for the tests: the launcher's GET, and a lookup of the programs
//! some tests drive.

pub use moe::http::{encode, get};

/// `name` on the PATH, or a panic that says how to get it (`.ci/run`
/// installs it).
pub fn program(name: &str, debian_package: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "this test needs `{name}` (Debian package {debian_package}): \
                 `apt-get install -y {debian_package}`, or run .ci/run, which installs it"
            )
        })
}
