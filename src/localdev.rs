//! Local development: the PostgreSQL image of a docker compose service follows the major
//! an environment runs, keeping the tag's flavour (`postgres:13.5-alpine` becomes
//! `postgres:17-alpine`). Pure: the caller reads and writes the file. The edit touches
//! the tag and nothing else, so comments, order and formatting survive.

use crate::model::Major;

/// The compose file with the image retagged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retag {
    /// 1-based line and column of the image value.
    pub line: usize,
    pub col: usize,
    pub from: String,
    pub to: String,
    /// The whole file after the edit.
    pub text: String,
}

/// What is wrong with the compose file, with its line and column where there is one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", .at.map(|(l, c)| format!("{l}:{c}: ")).unwrap_or_default())]
pub struct ComposeError {
    pub at: Option<(usize, usize)>,
    pub message: String,
}

fn error(at: Option<(usize, usize)>, message: impl Into<String>) -> ComposeError {
    ComposeError { at, message: message.into() }
}

/// The edit that puts `service`'s image on `major`; `None` when it is there already.
pub fn retag(text: &str, service: &str, major: Major) -> Result<Option<Retag>, ComposeError> {
    let doc: serde_yaml::Value = serde_yaml::from_str(text)
        .map_err(|e| error(e.location().map(|l| (l.line(), l.column())), format!("not a valid compose file: {e}")))?;
    let image = doc
        .get("services")
        .and_then(|s| s.get(service))
        .ok_or_else(|| error(None, format!("no service `{service}` under `services`")))?;
    let image = image.get("image").and_then(|i| i.as_str()).ok_or_else(|| {
        error(None, format!("service `{service}` has no `image` (one built from a Dockerfile cannot be retagged)"))
    })?;
    let (line_no, line, value_start) = locate_image(text, service)
        .ok_or_else(|| error(None, format!("cannot find the `image:` line of service `{service}`")))?;
    let at = Some((line_no + 1, value_start + 1));
    let value = &line[value_start..];
    let offset = value.find(image).ok_or_else(|| error(at, "the `image:` line does not hold the image"))?;
    let (tag_start, tag) = tag_of(image).map_err(|m| error(at, m))?;
    let digits = tag.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(tag.len());
    let current: u32 = tag[..digits].split('.').next().and_then(|m| m.parse().ok()).ok_or_else(|| {
        error(at, format!("cannot tell the PostgreSQL major of image `{image}`: give it a version tag such as `postgres:17-alpine`"))
    })?;
    if current == major.get() {
        return Ok(None);
    }
    let flavour = &tag[digits..];
    let to = format!("{}{}{flavour}", &image[..tag_start], major.get());
    let start = value_start + offset;
    let new_line = format!("{}{to}{}", &line[..start], &line[start + image.len()..]);
    let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
    let ending = lines.get(line_no).and_then(|l| l.get(line.len()..)).unwrap_or("");
    let replaced = format!("{new_line}{ending}");
    let slot = lines.get_mut(line_no).ok_or_else(|| error(at, "the `image:` line moved while it was edited"))?;
    *slot = &replaced;
    Ok(Some(Retag { line: line_no + 1, col: start + 1, from: image.to_owned(), to, text: lines.concat() }))
}

/// The tag of an image reference and where it starts; digests and untagged images have
/// no version to follow.
fn tag_of(image: &str) -> Result<(usize, &str), String> {
    if image.contains('@') {
        return Err(format!("image `{image}` is pinned by digest: pgconverge cannot move it to another major"));
    }
    let name_end = image.rfind('/').map_or(0, |i| i + 1);
    match image[name_end..].find(':') {
        Some(i) => Ok((name_end + i + 1, &image[name_end + i + 1..])),
        None => Err(format!("image `{image}` has no tag: give it a version tag such as `{image}:17`")),
    }
}

/// The line (0-based index, text without its ending) holding `service`'s `image:` key,
/// and where its value starts. Follows block indentation: `services:` at the top level,
/// the service one level in, `image:` inside the service.
fn locate_image<'a>(text: &'a str, service: &str) -> Option<(usize, &'a str, usize)> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let content = |l: &str| !l.trim().is_empty() && !l.trim_start().starts_with('#');
    let key_is = |l: &str, key: &str| {
        let t = l.trim_start();
        [key.to_owned(), format!("\"{key}\""), format!("'{key}'")]
            .iter()
            .any(|k| t.strip_prefix(k.as_str()).is_some_and(|rest| rest.trim_start().starts_with(':')))
    };
    let lines: Vec<&str> = text.lines().collect();
    let services = lines.iter().position(|l| indent(l) == 0 && key_is(l, "services"))?;
    let mut service_at = None;
    for (i, l) in lines.iter().enumerate().skip(services + 1) {
        if !content(l) {
            continue;
        }
        if indent(l) == 0 {
            break;
        }
        if key_is(l, service) && service_at.is_none_or(|(_, ind)| indent(l) <= ind) {
            service_at = Some((i, indent(l)));
            break;
        }
    }
    let (start, service_indent) = service_at?;
    for (i, l) in lines.iter().enumerate().skip(start + 1) {
        if !content(l) {
            continue;
        }
        if indent(l) <= service_indent {
            break;
        }
        if key_is(l, "image") {
            let colon = l.find(':')?;
            let value = colon + 1 + (l[colon + 1..].len() - l[colon + 1..].trim_start().len());
            return Some((i, l, value));
        }
    }
    None
}

/// A unified diff of the compose file, for plan.
pub fn diff(path: &str, old: &str, new: &str) -> String {
    similar::TextDiff::from_lines(old, new).unified_diff().context_radius(2).header(path, path).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn major(n: u32) -> Major {
        serde_json::from_str(&n.to_string()).expect("major")
    }

    const COMPOSE: &str = "# local stack\nservices:\n  web:\n    image: myapp:latest # not this one\n    depends_on: [db]\n  db:\n    image: postgres:13.5-alpine   # the database\n    environment:\n      POSTGRES_PASSWORD: x\nvolumes:\n  data: {}\n";

    #[test]
    fn the_tag_moves_and_keeps_its_flavour_and_everything_else() {
        let r = retag(COMPOSE, "db", major(17)).expect("valid").expect("a change");
        assert_eq!((r.from.as_str(), r.to.as_str()), ("postgres:13.5-alpine", "postgres:17-alpine"));
        assert_eq!((r.line, r.col), (7, 12));
        assert_eq!(r.text, COMPOSE.replace("postgres:13.5-alpine", "postgres:17-alpine"));
        assert!(retag(&r.text, "db", major(17)).expect("valid").is_none(), "converged");
    }

    #[test]
    fn flavours_registries_quotes_and_crlf() {
        for (image, want) in [
            ("postgres:16", "postgres:17"),
            ("postgres:16.4", "postgres:17"),
            ("postgres:16-bookworm", "postgres:17-bookworm"),
            ("docker.io/library/postgres:15.2-alpine3.19", "docker.io/library/postgres:17-alpine3.19"),
            ("registry:5000/team/postgres:14", "registry:5000/team/postgres:17"),
        ] {
            for quoted in [image.to_owned(), format!("\"{image}\""), format!("'{image}'")] {
                let text = format!("services:\r\n  db:\r\n    image: {quoted}\r\n");
                let r = retag(&text, "db", major(17)).expect("valid").expect("a change");
                assert_eq!(r.to, want);
                assert_eq!(r.text, text.replace(image, want), "{quoted}");
            }
        }
        assert!(retag("services:\n  db:\n    image: postgres:17.2\n", "db", major(17)).expect("valid").is_none());
    }

    #[test]
    fn what_cannot_be_followed_says_why_and_where() {
        let cases = [
            ("services:\n  db:\n    image: postgres\n", "has no tag", Some((3, 12))),
            ("services:\n  db:\n    image: postgres:latest\n", "cannot tell the PostgreSQL major", Some((3, 12))),
            ("services:\n  db:\n    image: postgres@sha256:abc\n", "pinned by digest", Some((3, 12))),
            ("services:\n  db:\n    build: .\n", "has no `image`", None),
            ("services:\n  web:\n    image: x:1\n", "no service `db`", None),
            ("services: [\n", "not a valid compose file", Some((2, 1))),
        ];
        for (text, want, at) in cases {
            let e = retag(text, "db", major(17)).expect_err(text);
            assert!(e.message.contains(want), "{text}: {e}");
            assert_eq!(e.at, at, "{text}: {e}");
        }
    }

    #[test]
    fn the_diff_shows_the_line() {
        let r = retag(COMPOSE, "db", major(17)).expect("valid").expect("a change");
        let d = diff("compose.yaml", COMPOSE, &r.text);
        assert!(d.contains("-    image: postgres:13.5-alpine   # the database"), "{d}");
        assert!(d.contains("+    image: postgres:17-alpine   # the database"), "{d}");
        assert!(d.starts_with("--- compose.yaml\n+++ compose.yaml\n"), "{d}");
    }
}
