//! The API keys file (`--api-keys-file`): one key a line, trimmed; blank
//! lines and `#` comments are ignored. The router reads it to check
//! callers, and the launcher to call the router it started: one reading of
//! the format for both.

/// The keys in an API keys file's `text`, in order.
pub fn keys(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_trimmed_lines_without_blanks_or_comments() {
        let text = "# ours\n\n  first \n\tsecond\n# old-key\n";
        assert_eq!(super::keys(text).collect::<Vec<_>>(), ["first", "second"]);
    }
}
