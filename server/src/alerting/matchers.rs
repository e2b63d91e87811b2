//! Alertmanager label matchers: `name="value"`, `name!="value"`, `name=~"regex"`,
//! `name!~"regex"` (quotes optional), alone or as a `{…}` list; regexes are anchored, as in
//! Alertmanager.

use std::fmt;

use regex::Regex;

use super::Labels;

/// A matcher's operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    /// `=`.
    Equal,
    /// `!=`.
    NotEqual,
    /// `=~`.
    Regex,
    /// `!~`.
    NotRegex,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Equal => "=",
            Op::NotEqual => "!=",
            Op::Regex => "=~",
            Op::NotRegex => "!~",
        }
    }
}

/// One label matcher.
#[derive(Debug, Clone)]
pub struct Matcher {
    /// The label name.
    pub name: String,
    /// The operator.
    pub op: Op,
    /// The value or regex as written.
    pub value: String,
    regex: Option<Regex>,
}

impl PartialEq for Matcher {
    fn eq(&self, other: &Self) -> bool {
        (self.op, &self.name, &self.value) == (other.op, &other.name, &other.value)
    }
}

/// The most memory one matcher's compiled regex (and its lazy DFA cache) may take: `\w{200}`
/// compiles to about 12 MB, enough to exhaust memory with a few hundred silences.
pub const MAX_REGEX_BYTES: usize = 256 * 1024;

impl Matcher {
    /// A matcher; fails on an invalid regex.
    pub fn new(name: &str, op: Op, value: &str) -> Result<Matcher, String> {
        let regex = match op {
            Op::Regex | Op::NotRegex => Some(
                regex::RegexBuilder::new(&format!("^(?:{value})$"))
                    .size_limit(MAX_REGEX_BYTES)
                    .dfa_size_limit(MAX_REGEX_BYTES)
                    .build()
                    .map_err(|e| match e {
                        regex::Error::CompiledTooBig(_) => format!(
                            "regular expression {value:?} compiles to more than {} KiB; simplify it",
                            MAX_REGEX_BYTES >> 10
                        ),
                        e => format!("invalid regular expression {value:?}: {e}"),
                    })?,
            ),
            _ => None,
        };
        Ok(Matcher { name: name.to_owned(), op, value: value.to_owned(), regex })
    }

    /// Whether `labels` satisfy the matcher (a missing label matches as the empty string).
    pub fn matches(&self, labels: &Labels) -> bool {
        let v = labels.get(&self.name).map_or("", String::as_str);
        match (self.op, &self.regex) {
            (Op::Equal, _) => v == self.value,
            (Op::NotEqual, _) => v != self.value,
            (Op::Regex, Some(r)) => r.is_match(v),
            (Op::NotRegex, Some(r)) => !r.is_match(v),
            _ => false,
        }
    }

    /// Whether the matcher is a regex one.
    pub fn is_regex(&self) -> bool {
        matches!(self.op, Op::Regex | Op::NotRegex)
    }

    /// Whether the matcher is a positive one (`=`, `=~`).
    pub fn is_equal(&self) -> bool {
        matches!(self.op, Op::Equal | Op::Regex)
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{}", self.name, self.op.as_str(), go_quote(&self.value))
    }
}

/// Go's `%q` of a string (as Alertmanager prints matchers and label sets).
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Matchers, sorted as Alertmanager sorts a route's, printed as `{a="b",c=~"d"}`.
pub fn render(matchers: &[Matcher]) -> String {
    let parts: Vec<String> = matchers.iter().map(ToString::to_string).collect();
    format!("{{{}}}", parts.join(","))
}

/// The value of a double-quoted string whose opening quote is already consumed (escapes
/// `\n`, `\t`, and `\x` for any other x), and the bytes it took, closing quote included;
/// `None` when it is not closed.
pub(crate) fn unquote(quoted: &str) -> Option<(String, usize)> {
    let mut value = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, i + 1)),
            '\\' => match chars.next()? {
                (_, 'n') => value.push('\n'),
                (_, 't') => value.push('\t'),
                (_, c) => value.push(c),
            },
            c => value.push(c),
        }
    }
    None
}

/// Parses one matcher string, which may hold several matchers in `{…}` separated by commas.
pub fn parse(input: &str) -> Result<Vec<Matcher>, String> {
    let s = input.trim();
    let inner = match s.strip_prefix('{') {
        Some(rest) => rest.strip_suffix('}').ok_or_else(|| format!("{input:?}: missing closing '}}'"))?,
        None => s,
    };
    let mut out = Vec::new();
    let mut rest = inner.trim();
    while !rest.is_empty() {
        let name_end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
        let name = &rest[..name_end];
        if name.is_empty() {
            return Err(format!("{input:?}: expected a label name at {rest:?}"));
        }
        rest = rest[name_end..].trim_start();
        let op = [("=~", Op::Regex), ("!~", Op::NotRegex), ("!=", Op::NotEqual), ("=", Op::Equal)]
            .into_iter()
            .find(|(t, _)| rest.starts_with(t));
        let Some((token, op)) = op else {
            return Err(format!("{input:?}: expected one of = != =~ !~ after {name:?}"));
        };
        rest = rest[token.len()..].trim_start();
        let (value, after) = if let Some(quoted) = rest.strip_prefix('"') {
            let (value, end) =
                unquote(quoted).ok_or_else(|| format!("{input:?}: unterminated quoted value"))?;
            (value, &quoted[end..])
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            (rest[..end].trim().to_owned(), &rest[end..])
        };
        out.push(Matcher::new(name, op, &value).map_err(|e| format!("{input:?}: {e}"))?);
        rest = after.trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
        } else if !rest.is_empty() {
            return Err(format!("{input:?}: expected ',' before {rest:?}"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn matchers_parse_print_and_match_like_alertmanager() {
        let m = parse(r#"{service=~"check.*", severity!="info",team=core}"#).unwrap();
        assert_eq!(render(&m), r#"{service=~"check.*",severity!="info",team="core"}"#);
        assert!(m.iter().all(|m| m.matches(&labels(&[("service", "checkout"), ("team", "core")]))));
        // Regexes are anchored.
        assert!(!m[0].matches(&labels(&[("service", "precheckout")])));
        // A missing label is the empty string.
        assert!(parse("x=\"\"").unwrap()[0].matches(&labels(&[])));
        assert!(parse("x!~\".+\"").unwrap()[0].matches(&labels(&[])));
        assert_eq!(go_quote("a\"b\\c\n"), r#""a\"b\\c\n""#);
    }

    #[test]
    fn bad_matchers_say_why() {
        for (input, want) in [
            ("{a=\"b\"", "missing closing '}'"),
            ("=b", "expected a label name"),
            ("a~b", "expected one of = != =~ !~ after \"a\""),
            ("a=\"b", "unterminated quoted value"),
            ("a=~\"(\"", "invalid regular expression \"(\""),
            ("a=\"b\" c=\"d\"", "expected ',' before"),
        ] {
            let err = parse(input).err().unwrap_or_default();
            assert!(err.contains(want), "{input:?}: {err:?} should contain {want:?}");
        }
    }
}
