//! The part of Go's `text/template` that Prometheus alert labels and annotations use:
//! `{{ $labels.service }}`, `{{ $value }}`, `{{ .Labels.x }}`, `{{ .Value }}`, pipelines
//! (`{{ $value | humanizeDuration }}`), the functions `humanize`, `humanize1024`,
//! `humanizeDuration`, `humanizePercentage`, `printf`, `toUpper`, `toLower`, and the trim
//! markers `{{-` / `-}}`. Templates are parsed once when rules load, so `check-rules` reports
//! every template error with its position; rendering cannot fail.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Action(Vec<Command>),
}

/// One stage of a pipeline: a function applied to its arguments (the previous stage's result
/// is appended as the last argument), or a bare operand.
#[derive(Debug, Clone, PartialEq)]
enum Command {
    Operand(Operand),
    Call(Func, Vec<Operand>),
}

#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Value,
    Label(String),
    Str(String),
    Num(f64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Func {
    Humanize,
    Humanize1024,
    HumanizeDuration,
    HumanizePercentage,
    Printf,
    ToUpper,
    ToLower,
}

impl Func {
    fn parse(name: &str) -> Option<Func> {
        Some(match name {
            "humanize" => Func::Humanize,
            "humanize1024" => Func::Humanize1024,
            "humanizeDuration" => Func::HumanizeDuration,
            "humanizePercentage" => Func::HumanizePercentage,
            "printf" => Func::Printf,
            "toUpper" => Func::ToUpper,
            "toLower" => Func::ToLower,
            _ => return None,
        })
    }
}

/// What a template is rendered with.
#[derive(Debug, Clone, Copy)]
pub struct Data<'a> {
    /// `$labels` / `.Labels`.
    pub labels: &'a BTreeMap<String, String>,
    /// `$value` / `.Value`.
    pub value: f64,
}

#[derive(Debug, Clone)]
enum Val {
    Str(String),
    Num(f64),
}

impl Val {
    fn text(&self) -> String {
        match self {
            Val::Str(s) => s.clone(),
            Val::Num(v) => go_float(*v),
        }
    }

    fn number(&self) -> Option<f64> {
        match self {
            Val::Num(v) => Some(*v),
            Val::Str(s) => s.trim().parse().ok(),
        }
    }
}

impl Template {
    /// Parses `text`; the error names the position (byte offset) and what was wrong.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        let mut offset = 0;
        let mut trim_next = false;
        while let Some(open) = rest.find("{{") {
            let mut literal = &rest[..open];
            if trim_next {
                literal = literal.trim_start();
            }
            let after = &rest[open + 2..];
            let trim_before = after.starts_with("- ") || after.starts_with("-\t") || after.starts_with("-\n");
            if trim_before {
                literal = literal.trim_end();
            }
            if !literal.is_empty() {
                parts.push(Part::Text(literal.to_owned()));
            }
            let Some(close) = after.find("}}") else {
                return Err(format!("unclosed action starting at byte {}", offset + open));
            };
            let mut body = &after[..close];
            if trim_before {
                body = &body[1..];
            }
            trim_next = body.ends_with(" -") || body.ends_with("\t-") || body.ends_with("\n-");
            if trim_next {
                body = &body[..body.len() - 1];
            }
            let at = offset + open;
            let pipeline = parse_pipeline(body).map_err(|e| format!("at byte {at}: {e}"))?;
            parts.push(Part::Action(pipeline));
            let consumed = open + 2 + close + 2;
            offset += consumed;
            rest = &rest[consumed..];
        }
        let literal = if trim_next { rest.trim_start() } else { rest };
        if !literal.is_empty() {
            parts.push(Part::Text(literal.to_owned()));
        }
        Ok(Template { parts })
    }

    /// Renders the template. A missing label renders as `<no value>`, as Go does.
    pub fn render(&self, data: Data<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Action(pipeline) => out.push_str(&run(pipeline, data).text()),
            }
        }
        out
    }
}

fn parse_pipeline(body: &str) -> Result<Vec<Command>, String> {
    let tokens = tokenize(body)?;
    if tokens.is_empty() {
        return Err("missing value for command".into());
    }
    let mut commands = Vec::new();
    for (i, stage) in tokens.split(|t| *t == Token::Pipe).enumerate() {
        let Some((head, args)) = stage.split_first() else {
            return Err("missing command in pipeline".into());
        };
        let command = match head {
            Token::Word(name) => {
                let func = Func::parse(name).ok_or_else(|| {
                    if matches!(
                        name.as_str(),
                        "if" | "range" | "with" | "define" | "template" | "block" | "end" | "else"
                    ) {
                        format!("the {name:?} action is not supported in tailscope's templates")
                    } else {
                        format!("function {name:?} not defined")
                    }
                })?;
                let args = args.iter().map(operand).collect::<Result<Vec<_>, _>>()?;
                let supplied = args.len() + usize::from(i > 0);
                let wanted = if func == Func::Printf { supplied.max(1) } else { 1 };
                if supplied != wanted {
                    return Err(format!("wrong number of args for {name}: want {wanted} got {supplied}"));
                }
                Command::Call(func, args)
            }
            other => {
                if i > 0 {
                    return Err("non-function command in pipeline stage".into());
                }
                if !args.is_empty() {
                    return Err(format!("unexpected {:?} after an operand", args[0]));
                }
                Command::Operand(operand(other)?)
            }
        };
        commands.push(command);
    }
    Ok(commands)
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Var(String),
    Field(String),
    Str(String),
    Num(f64),
    Pipe,
}

fn tokenize(body: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = body.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        if c == '|' {
            chars.next();
            out.push(Token::Pipe);
            continue;
        }
        if c == '"' {
            let (s, len) = super::matchers::unquote(&body[i + 1..]).ok_or("unterminated quoted string")?;
            while chars.peek().is_some_and(|&(j, _)| j <= i + len) {
                chars.next();
            }
            out.push(Token::Str(s));
            continue;
        }
        let mut end = body.len();
        while let Some(&(j, c)) = chars.peek() {
            if c.is_whitespace() || c == '|' || c == '"' {
                end = j;
                break;
            }
            chars.next();
        }
        let word = &body[i..end];
        out.push(if let Some(v) = word.strip_prefix('$') {
            Token::Var(v.to_owned())
        } else if let Some(f) = word.strip_prefix('.') {
            Token::Field(f.to_owned())
        } else if let Ok(n) = word.parse::<f64>() {
            Token::Num(n)
        } else if word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            Token::Word(word.to_owned())
        } else {
            return Err(format!("unexpected {word:?} in command"));
        });
    }
    Ok(out)
}

fn operand(t: &Token) -> Result<Operand, String> {
    let path = |root: &str, rest: &str| -> Result<Operand, String> {
        let mut it = rest.splitn(2, '.');
        match (it.next(), it.next()) {
            (Some(v), None) if v == root_value(root) => Ok(Operand::Value),
            (Some(l), Some(name)) if l == root_labels(root) && super::rules::valid_label_name(name) => {
                Ok(Operand::Label(name.to_owned()))
            }
            _ => Err(format!("undefined {root}{rest}: use $labels.<name>, $value, .Labels.<name> or .Value")),
        }
    };
    match t {
        Token::Var(v) => path("$", v),
        Token::Field(f) => path(".", f),
        Token::Str(s) => Ok(Operand::Str(s.clone())),
        Token::Num(n) => Ok(Operand::Num(*n)),
        Token::Word(w) => Err(format!("function {w:?} used as an argument")),
        Token::Pipe => Err("missing command before \"|\"".into()),
    }
}

fn root_value(root: &str) -> &'static str {
    if root == "$" {
        "value"
    } else {
        "Value"
    }
}

fn root_labels(root: &str) -> &'static str {
    if root == "$" {
        "labels"
    } else {
        "Labels"
    }
}

fn run(pipeline: &[Command], data: Data<'_>) -> Val {
    let mut prev: Option<Val> = None;
    for command in pipeline {
        prev = Some(match command {
            Command::Operand(o) => resolve(o, data),
            Command::Call(func, args) => {
                let mut args: Vec<Val> = args.iter().map(|a| resolve(a, data)).collect();
                args.extend(prev.take());
                call(*func, &args)
            }
        });
    }
    prev.unwrap_or(Val::Str(String::new()))
}

fn resolve(o: &Operand, data: Data<'_>) -> Val {
    match o {
        Operand::Value => Val::Num(data.value),
        Operand::Label(name) => {
            Val::Str(data.labels.get(name).cloned().unwrap_or_else(|| "<no value>".to_owned()))
        }
        Operand::Str(s) => Val::Str(s.clone()),
        Operand::Num(n) => Val::Num(*n),
    }
}

fn call(func: Func, args: &[Val]) -> Val {
    let num = || args.last().and_then(Val::number);
    let text = || args.last().map(Val::text).unwrap_or_default();
    let bad = |what: &str| Val::Str(format!("<error: {what} of a non-number {:?}>", text()));
    Val::Str(match func {
        Func::Humanize => match num() {
            Some(v) => humanize(v),
            None => return bad("humanize"),
        },
        Func::Humanize1024 => match num() {
            Some(v) => humanize1024(v),
            None => return bad("humanize1024"),
        },
        Func::HumanizeDuration => match num() {
            Some(v) => humanize_duration(v),
            None => return bad("humanizeDuration"),
        },
        Func::HumanizePercentage => match num() {
            Some(v) => format!("{}%", go_g(v * 100.0, 4)),
            None => return bad("humanizePercentage"),
        },
        Func::ToUpper => text().to_uppercase(),
        Func::ToLower => text().to_lowercase(),
        Func::Printf => printf(args),
    })
}

/// `humanize`: SI prefixes, four significant digits (Prometheus' definition).
pub fn humanize(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return go_g(v, 4);
    }
    let mut v = v;
    let mut prefix = "";
    if v.abs() >= 1.0 {
        for p in ["k", "M", "G", "T", "P", "E", "Z", "Y"] {
            if v.abs() < 1000.0 {
                break;
            }
            prefix = p;
            v /= 1000.0;
        }
    } else {
        (v, prefix) = scale_up_below_one(v);
    }
    format!("{}{prefix}", go_g(v, 4))
}

/// A value below one scaled up by thousands into [1, 1000), with its SI prefix (m, u, n, …).
fn scale_up_below_one(mut v: f64) -> (f64, &'static str) {
    let mut prefix = "";
    for p in ["m", "u", "n", "p", "f", "a", "z", "y"] {
        if v.abs() >= 1.0 {
            break;
        }
        prefix = p;
        v *= 1000.0;
    }
    (v, prefix)
}

fn humanize1024(v: f64) -> String {
    if v.abs() <= 1.0 || !v.is_finite() {
        return go_g(v, 4);
    }
    let mut v = v;
    let mut prefix = "";
    for p in ["ki", "Mi", "Gi", "Ti", "Pi", "Ei", "Zi", "Yi"] {
        if v.abs() < 1024.0 {
            break;
        }
        prefix = p;
        v /= 1024.0;
    }
    format!("{}{prefix}", go_g(v, 4))
}

/// `humanizeDuration`: `1d 2h 3m 4s` above a second, `12.5ms` below (Prometheus' definition).
pub fn humanize_duration(v: f64) -> String {
    if !v.is_finite() {
        return go_g(v, 4);
    }
    if v == 0.0 {
        return format!("{}s", go_g(v, 4));
    }
    if v.abs() >= 1.0 {
        let sign = if v < 0.0 { "-" } else { "" };
        let v = v.abs();
        let d = v as i64;
        let (seconds, minutes, hours, days) = (d % 60, (d / 60) % 60, (d / 3600) % 24, d / 86400);
        return if days != 0 {
            format!("{sign}{days}d {hours}h {minutes}m {seconds}s")
        } else if hours != 0 {
            format!("{sign}{hours}h {minutes}m {seconds}s")
        } else if minutes != 0 {
            format!("{sign}{minutes}m {seconds}s")
        } else {
            format!("{sign}{}s", go_g(v, 4))
        };
    }
    let (v, prefix) = scale_up_below_one(v);
    format!("{}{prefix}s", go_g(v, 4))
}

/// Go's `%.<precision>g`.
fn go_g(v: f64, precision: usize) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "+Inf".into() } else { "-Inf".into() };
    }
    let p = precision.max(1);
    let sci = format!("{:.*e}", p - 1, v);
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if exp < -4 || exp >= p as i32 {
        format!("{}e{}{:02}", strip_zeros(mantissa), if exp < 0 { '-' } else { '+' }, exp.abs())
    } else {
        let decimals = (p as i32 - 1 - exp).max(0) as usize;
        strip_zeros(&format!("{v:.decimals$}")).to_owned()
    }
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// Go's `%v` of a float64: the shortest representation, in exponent form below 1e-4 and from
/// 1e21 up.
pub fn go_float(v: f64) -> String {
    if !v.is_finite() {
        return go_g(v, 4);
    }
    let sci = format!("{v:e}");
    let exp: i32 = sci.split_once('e').and_then(|(_, e)| e.parse().ok()).unwrap_or(0);
    if !(-4..21).contains(&exp) {
        go_exponent(v, None)
    } else {
        format!("{v}")
    }
}

/// Go's `%e` (`1.5e+00`) with `precision` digits after the point, or the fewest that
/// round-trip (`strconv.FormatFloat(v, 'e', -1, 64)`).
pub fn go_exponent(v: f64, precision: Option<usize>) -> String {
    let s = match precision {
        Some(p) => format!("{v:.p$e}"),
        None => format!("{v:e}"),
    };
    let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
    let e: i32 = e.parse().unwrap_or(0);
    format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
}

/// `printf` with the verbs `%s %v %d %f %g %e %%` and an optional precision.
fn printf(args: &[Val]) -> String {
    let Some((format, args)) = args.split_first() else { return String::new() };
    let format = format.text();
    let mut out = String::new();
    let mut args = args.iter();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut precision = None;
        if chars.peek() == Some(&'.') {
            chars.next();
            let mut digits = String::new();
            while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                digits.push(*d);
                chars.next();
            }
            precision = Some(digits.parse().unwrap_or(0));
        }
        let Some(verb) = chars.next() else {
            out.push_str("%!(NOVERB)");
            break;
        };
        if verb == '%' {
            out.push('%');
            continue;
        }
        let Some(arg) = args.next() else {
            let _ = write!(out, "%!{verb}(MISSING)");
            continue;
        };
        match (verb, arg.number()) {
            ('s' | 'v', _) => out.push_str(&arg.text()),
            ('d', Some(n)) => {
                let _ = write!(out, "{}", n.trunc() as i64);
            }
            ('f', Some(n)) => {
                let _ = write!(out, "{n:.*}", precision.unwrap_or(6));
            }
            ('g', Some(n)) => out.push_str(&match precision {
                Some(p) => go_g(n, p),
                None => go_float(n),
            }),
            ('e', Some(n)) => out.push_str(&go_exponent(n, Some(precision.unwrap_or(6)))),
            _ => {
                let _ = write!(out, "%!{verb}({})", arg.text());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(t: &str, value: f64) -> String {
        let labels = BTreeMap::from([("service".to_owned(), "checkout".to_owned())]);
        Template::parse(t).map(|t| t.render(Data { labels: &labels, value })).unwrap_or_else(|e| e)
    }

    #[test]
    fn labels_values_and_pipelines_render_as_prometheus_does() {
        assert_eq!(render("p99 of {{ $labels.service }} is {{ $value }}", 0.5), "p99 of checkout is 0.5");
        assert_eq!(render("{{ .Labels.service }}/{{ .Value }}", 2.0), "checkout/2");
        assert_eq!(render("{{ $value | humanizeDuration }}", 1.2345), "1.234s");
        assert_eq!(render("{{ humanizeDuration $value }}", 0.0123), "12.3ms");
        assert_eq!(render("{{ $value | humanizeDuration }}", 3723.0), "1h 2m 3s");
        assert_eq!(render("{{ $value | humanizeDuration }}", 90061.0), "1d 1h 1m 1s");
        assert_eq!(render("{{ humanize $value }}", 1234567.0), "1.235M");
        assert_eq!(render("{{ humanize $value }}", 0.000_25), "250u");
        assert_eq!(render("{{ $value | humanizePercentage }}", 0.0123), "1.23%");
        assert_eq!(render("{{ printf \"%.2f\" $value }}", 0.12345), "0.12");
        assert_eq!(render("{{ $labels.missing }}", 0.0), "<no value>");
        assert_eq!(render("a {{- \" b \" -}} c", 0.0), "a b c");
        assert_eq!(render("{{ $value }}", 1e21), "1e+21");
        assert_eq!(render("{{ $value }}", 1e-5), "1e-05");
        assert_eq!(render("{{ humanize $value }}", f64::NAN), "NaN");
    }

    #[test]
    fn errors_name_what_is_wrong_and_where() {
        for (t, want) in [
            ("{{ $labels.service ", "unclosed action starting at byte 0"),
            ("x {{ nope $value }}", "at byte 2: function \"nope\" not defined"),
            ("{{ if $value }}x{{ end }}", "\"if\" action is not supported"),
            ("{{ $vlaue }}", "undefined $vlaue"),
            ("{{ humanize }}", "wrong number of args for humanize: want 1 got 0"),
            ("{{ $value | 3 }}", "non-function command in pipeline stage"),
            ("{{ \"abc }}", "unterminated quoted string"),
            ("{{ }}", "missing value for command"),
        ] {
            let err = Template::parse(t).err().unwrap_or_default();
            assert!(err.contains(want), "{t:?}: {err:?} should contain {want:?}");
        }
    }
}
