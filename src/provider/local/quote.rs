//! Values put into SQL, quoted the way libpq's `PQescapeLiteral` and
//! `PQescapeIdentifier` do: whatever they hold, they stay one literal or one name.

/// `'it''s'`; a backslash makes it an `E'…'` literal with the backslash doubled, so that
/// the result means the same whatever `standard_conforming_strings` says.
pub fn literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 3);
    if value.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for c in value.chars().filter(|c| *c != '\0') {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// `"My ""table"""`.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('\0', "").replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_names_stay_one_token() {
        assert_eq!(literal("abc"), "'abc'");
        assert_eq!(literal("x' SUPERUSER; --"), "'x'' SUPERUSER; --'");
        assert_eq!(literal(r"a\'b"), r"E'a\\''b'");
        assert_eq!(literal("a\0b"), "'ab'");
        assert_eq!(ident("app"), "\"app\"");
        assert_eq!(ident("a\"b; DROP"), "\"a\"\"b; DROP\"");
    }
}
