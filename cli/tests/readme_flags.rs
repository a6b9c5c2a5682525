//! The README's command synopses list exactly the flags each binary's
//! `--help` shows, so that the two cannot drift apart; and every flag of the
//! two services reads an environment variable, as the README says.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The commands the README documents, as (binary, subcommand).
const COMMANDS: [(&str, Option<&str>); 8] = [
    ("moe", Some("init")),
    ("moe", Some("up")),
    ("moe", Some("generate")),
    ("moe", Some("demo")),
    ("moe", Some("bench")),
    ("moe", Some("k8s")),
    ("expert-svc", None),
    ("router-svc", None),
];

fn binary(name: &str) -> PathBuf {
    if name == "moe" {
        return PathBuf::from(env!("CARGO_BIN_EXE_moe"));
    }
    moe::launcher::binaries_dir()
        .expect("service binaries built: run `cargo test --workspace`")
        .join(name)
}

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// The `--flags` of a text, without duplicates.
fn flags_in(text: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("--") {
        let name: String = rest[start + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if name.starts_with(|c: char| c.is_ascii_lowercase()) {
            flags.insert(format!("--{name}"));
        }
        rest = &rest[start + 2 + name.len()..];
    }
    flags
}

/// Each command's synopsis in the README's ```sh blocks: the line that
/// starts with the command, and the indented lines that continue it.
fn readme_synopses(readme: &str) -> Vec<(String, String)> {
    let mut synopses: Vec<(String, String)> = Vec::new();
    let mut in_sh = false;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let starts_command = COMMANDS.iter().find(|(bin, sub)| {
            let command = match sub {
                Some(sub) => format!("{bin} {sub} "),
                None => format!("{bin} "),
            };
            line.starts_with(&command) || line == command.trim_end()
        });
        match starts_command {
            Some((bin, sub)) => {
                let name = sub.map_or(bin.to_string(), |sub| format!("{bin} {sub}"));
                synopses.push((name, line.to_owned()));
            }
            None if line.starts_with(char::is_whitespace) => {
                if let Some((_, text)) = synopses.last_mut() {
                    text.push('\n');
                    text.push_str(line);
                }
            }
            None => {}
        }
    }
    synopses
}

/// `--help` of a command: its flags (help and version aside), and whether
/// each names an environment variable.
fn help_flags(bin: &str, sub: Option<&str>) -> Vec<(String, bool)> {
    let output = Command::new(binary(bin))
        .args(sub)
        .arg("--help")
        .output()
        .unwrap_or_else(|err| panic!("{bin} --help: {err}"));
    assert!(output.status.success(), "{bin} {sub:?} --help failed");
    let help = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = help.lines().collect();
    let mut flags = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        // An option's own line is indented by at most 6 spaces; its
        // description, which may mention other flags, by more.
        let indent = line.len() - line.trim_start().len();
        let option = line
            .trim_start()
            .trim_start_matches(|c: char| c == '-' || c.is_ascii_alphabetic() || c == ',');
        let is_option = (1..=6).contains(&indent)
            && line.trim_start().starts_with('-')
            && (option.is_empty() || option.starts_with(' '));
        if !is_option {
            continue;
        }
        let Some(long) = line.split_whitespace().find(|word| word.starts_with("--")) else {
            continue;
        };
        let long = long.trim_end_matches(',').to_owned();
        if long == "--help" || long == "--version" {
            continue;
        }
        let description = lines.get(index + 1).copied().unwrap_or_default();
        flags.push((long, description.contains("[env: ")));
    }
    flags
}

#[test]
fn the_readme_lists_exactly_the_flags_of_each_command() {
    let readme = readme();
    let synopses = readme_synopses(&readme);
    let mut problems = Vec::new();
    for (bin, sub) in COMMANDS {
        let name = sub.map_or(bin.to_string(), |sub| format!("{bin} {sub}"));
        let documented: Vec<&String> = synopses
            .iter()
            .filter(|(command, _)| *command == name)
            .map(|(_, text)| text)
            .collect();
        if documented.len() != 1 {
            problems.push(format!(
                "`{name}` has {} synopses in the README's sh blocks, expected 1",
                documented.len()
            ));
            continue;
        }
        let in_readme = flags_in(documented[0]);
        let in_help: BTreeSet<String> = help_flags(bin, sub)
            .into_iter()
            .map(|(flag, _)| flag)
            .collect();
        assert!(!in_help.is_empty(), "no flags parsed from `{name} --help`");
        for missing in in_help.difference(&in_readme) {
            problems.push(format!("`{name}` has {missing}, which the README omits"));
        }
        for extra in in_readme.difference(&in_help) {
            problems.push(format!(
                "the README lists {extra} for `{name}`, which has no such flag"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_service_flag_reads_an_environment_variable() {
    for service in ["expert-svc", "router-svc"] {
        let flags = help_flags(service, None);
        assert!(flags.len() > 3, "{service}: flags not parsed: {flags:?}");
        let without: Vec<&String> = flags
            .iter()
            .filter(|(_, env)| !env)
            .map(|(flag, _)| flag)
            .collect();
        assert!(
            without.is_empty(),
            "{service} flags without an environment variable: {without:?}"
        );
    }
}

#[test]
fn flags_are_found_in_text() {
    let flags =
        flags_in("moe up [--listen A] (--x=1 | --in-process)\n    [--router-arg ARG]... --");
    let expected: BTreeSet<String> = ["--listen", "--x", "--in-process", "--router-arg"]
        .map(String::from)
        .into();
    assert_eq!(flags, expected);
}
