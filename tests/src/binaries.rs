//! Whether the service binaries the tests start are this tree's.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Panics when router-svc or expert-svc is older than a source file it
/// was built from.
///
/// The tests start the binaries found beside the test binary, and only a
/// workspace build refreshes those: after an edit to router-svc,
/// `cargo test -p moe-e2e` rebuilds this test binary but not router-svc,
/// and would test the old code. Comparing the services with the test
/// binary would not tell (editing a test alone makes the test binary
/// newer than services that are up to date); comparing them with their
/// own sources does. Cargo writes beside each binary a dep-info file
/// (`router-svc.d`) naming every workspace file the binary was built
/// from, and a file modified after the binary was written is, by cargo's
/// own rule, one the binary may not contain. Binaries without a dep-info
/// file (not built by cargo in this tree) are not checked.
pub(crate) fn assert_built_from_these_sources(bin_dir: &Path) {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
        for name in ["router-svc", "expert-svc"] {
            let binary = bin_dir.join(name);
            let (Some(built), Ok(dep_info)) = (
                modified(&binary),
                std::fs::read_to_string(bin_dir.join(format!("{name}.d"))),
            ) else {
                continue;
            };
            let newer: Vec<String> = dep_info_sources(&dep_info)
                .into_iter()
                .filter(|source| modified(source).is_some_and(|time| time > built))
                .map(|source| source.display().to_string())
                .collect();
            assert!(
                newer.is_empty(),
                "{} is older than {}: it is not the code under test. Run the end-to-end \
                 tests with `cargo test --workspace`, which rebuilds every binary first.",
                binary.display(),
                newer.join(", ")
            );
        }
    });
}

/// The prerequisites of a Makefile-style dep-info file's first rule
/// (`target: a.rs b.rs`, a space in a path escaped as `\ `).
fn dep_info_sources(text: &str) -> Vec<PathBuf> {
    let joined = text.replace("\\\n", " ");
    let Some((_, prerequisites)) = joined.lines().next().and_then(|rule| rule.split_once(": "))
    else {
        return Vec::new();
    };
    let mut sources = Vec::new();
    let mut current = String::new();
    let mut chars = prerequisites.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.extend(chars.next()),
            c if c.is_whitespace() => {
                if !current.is_empty() {
                    sources.push(PathBuf::from(std::mem::take(&mut current)));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        sources.push(PathBuf::from(current));
    }
    sources
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dep_info_sources_are_the_first_rules_prerequisites() {
        let text = "/t/debug/router-svc: /w/a.rs /w/my\\ dir/b.rs \\\n /w/c.proto\n\n/w/a.rs:\n";
        assert_eq!(
            dep_info_sources(text),
            [
                PathBuf::from("/w/a.rs"),
                PathBuf::from("/w/my dir/b.rs"),
                PathBuf::from("/w/c.proto")
            ]
        );
        assert!(dep_info_sources("no rule here").is_empty());
    }
}
