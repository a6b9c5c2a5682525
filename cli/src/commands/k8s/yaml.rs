//! A small YAML writer for JSON values: block style, keys in the values'
//! (sorted) order, strings plain only where YAML cannot read them as
//! anything else, multi-line strings as literal blocks. Written here rather
//! than taken from a crate so that the generated files are byte-stable
//! whatever a serializer's next version decides about quoting.

use serde_json::Value;

/// Documents separated by `---`.
pub fn documents(docs: &[Value]) -> String {
    let mut out = String::new();
    for (index, doc) in docs.iter().enumerate() {
        if index > 0 {
            out.push_str("---\n");
        }
        out.push_str(&document(doc));
    }
    out
}

/// One document (a map or a list; a scalar on its own line).
pub fn document(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => write_map(&mut out, map, 0),
        Value::Array(items) if !items.is_empty() => write_list(&mut out, items, 0),
        other => {
            out.push_str(&inline(other));
            out.push('\n');
        }
    }
    out
}

fn write_map(out: &mut String, map: &serde_json::Map<String, Value>, indent: usize) {
    for (key, value) in map {
        out.push_str(&" ".repeat(indent));
        out.push_str(&scalar(key));
        out.push(':');
        write_after_key(out, value, indent);
    }
}

/// A value after `key:` (or `-`), the key being at `indent`.
fn write_after_key(out: &mut String, value: &Value, indent: usize) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            out.push('\n');
            write_map(out, map, indent + 2);
        }
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            write_list(out, items, indent);
        }
        Value::String(text) if block_literal(text).is_some() => {
            let (header, lines) = block_literal(text).expect("checked above");
            out.push(' ');
            out.push_str(header);
            out.push('\n');
            for line in lines {
                if !line.is_empty() {
                    out.push_str(&" ".repeat(indent + 2));
                    out.push_str(line);
                }
                out.push('\n');
            }
        }
        other => {
            out.push(' ');
            out.push_str(&inline(other));
            out.push('\n');
        }
    }
}

fn write_list(out: &mut String, items: &[Value], indent: usize) {
    for item in items {
        match item {
            Value::Object(map) if !map.is_empty() => {
                // The first key goes on the dash's line.
                let mut nested = String::new();
                write_map(&mut nested, map, indent + 2);
                out.push_str(&" ".repeat(indent));
                out.push_str("- ");
                out.push_str(&nested[indent + 2..]);
            }
            Value::Array(inner) if !inner.is_empty() => {
                out.push_str(&" ".repeat(indent));
                out.push_str("-\n");
                write_list(out, inner, indent + 2);
            }
            other => {
                out.push_str(&" ".repeat(indent));
                out.push('-');
                write_after_key(out, other, indent);
            }
        }
    }
}

/// A scalar or an empty collection on one line.
fn inline(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => scalar(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

/// A string as a plain scalar when nothing else reads the same, else
/// double-quoted (JSON's escapes are YAML's).
fn scalar(text: &str) -> String {
    if is_plain_safe(text) {
        text.to_owned()
    } else {
        serde_json::to_string(text).expect("a string serialises")
    }
}

fn is_plain_safe(text: &str) -> bool {
    const WORDS: [&str; 11] = [
        "true", "false", "yes", "no", "on", "off", "null", "y", "n", "~", "<<",
    ];
    let Some(first) = text.chars().next() else {
        return false;
    };
    let first_ok = first.is_ascii_alphabetic() || first == '_' || first == '/' || {
        // `--flag`: a dash followed by another is no list item.
        text.starts_with("--") && text[2..].starts_with(|c: char| c.is_ascii_alphabetic())
    };
    first_ok
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./=@:+-".contains(c))
        && !text.ends_with(':')
        && !WORDS.contains(&text.to_ascii_lowercase().as_str())
}

/// `|`, `|-` or `|+` and the lines, for a multi-line string that a literal
/// block keeps exactly; `None` for anything else.
fn block_literal(text: &str) -> Option<(&'static str, Vec<&str>)> {
    if !text.contains('\n')
        || text.starts_with([' ', '\n'])
        || text.contains(['\r', '\t'])
        || text.chars().any(|c| c.is_control() && c != '\n')
    {
        return None;
    }
    let body = text.trim_end_matches('\n');
    let header = match text.len() - body.len() {
        0 => "|-",
        1 => "|",
        _ => return None,
    };
    Some((header, body.split('\n').collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn round_trip(value: &Value) {
        let text = document(value);
        let back: Value =
            serde_norway::from_str(&text).unwrap_or_else(|err| panic!("{err}\n{text}"));
        assert_eq!(&back, value, "{text}");
    }

    #[test]
    fn strings_that_look_like_something_else_are_quoted() {
        for s in [
            "1",
            "0.5",
            "true",
            "No",
            "null",
            "",
            "- x",
            "a: b",
            "#x",
            "x #y",
            "@x",
            "*x",
            "{a}",
            "[a]",
            "a,b",
            "0..30",
            "0.0.0.0:50051",
            "3=dns:///x:1",
            " lead",
            "trail ",
            "é",
            "'q'",
            "\"q\"",
            "-",
            "--",
            "-x",
            ":",
            "x:",
        ] {
            round_trip(&json!({ "k": s, "l": [s] }));
        }
        assert_eq!(scalar("--model"), "--model");
        assert_eq!(scalar("nvidia.com/gpu"), "nvidia.com/gpu");
        assert_eq!(scalar("1"), "\"1\"");
    }

    #[test]
    fn nested_values_and_blocks_round_trip() {
        round_trip(&json!({
            "apiVersion": "v1",
            "items": [{"a": 1, "b": [1, 2, {"c": [], "d": {}}]}, [3, [4]], null, true],
            "multi": "line one\n  indented\n\nlast\n",
            "multi_no_newline": "a\nb",
            "multi_many_newlines": "a\n\n",
            "list_of_blocks": ["x\ny\n", "{{ $labels.expert }}"],
            "n": -1.5,
        }));
    }
}
