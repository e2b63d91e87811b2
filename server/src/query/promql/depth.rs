//! A bound on how deep an expression's syntax tree can be, computed from its text alone.
//!
//! The parser, the evaluator and the tree's destructor all recurse once per level of the tree,
//! so a query like `1+1+…+1` with thousands of terms overflows a thread's stack — an abort no
//! `catch_unwind` can stop. This scan runs *before* the parser and refuses such text.
//!
//! The bound: the text is split into groups by brackets (`(…)`, `[…]`, `{…}`). A path from
//! the root of the tree to a leaf passes, within one group, at most through that group's own
//! operators (binary, unary and set operators each make one node), and then enters at most one
//! inner group (one level for the brackets and one for the call or aggregation around them).
//! So `depth(group) = operators(group) + 2 + max(depth(inner group))` is never less than the
//! real depth. It is exact for a chain of operators and for nested calls, the two shapes that
//! grow deep, and overestimates only by counting sibling operands of one operator as if they
//! were nested — harmless for a limit in the hundreds.

#[cfg(test)]
mod tests;

/// Keywords that are binary operators.
const WORD_OPERATORS: [&str; 4] = ["and", "or", "unless", "atan2"];

/// An upper bound on the depth of the tree `text` parses to. Stops counting (returns early)
/// once the bound exceeds `stop_at`, so hostile text costs one pass at most.
pub fn depth_bound(text: &str, stop_at: usize) -> usize {
    let bytes = text.as_bytes();
    // Per open group: its own operators and the deepest inner group closed so far.
    let mut stack: Vec<(usize, usize)> = vec![(0, 0)];
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'"' | b'\'' | b'`' => {
                // A string literal: skip to its closing quote (backslash escapes, except in
                // raw backtick strings).
                i += 1;
                while i < bytes.len() && bytes[i] != c {
                    if c != b'`' && bytes[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'#' => {
                // A comment runs to the end of the line.
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'(' | b'[' | b'{' => {
                stack.push((0, 0));
                if stack.len() > stop_at {
                    return stack.len();
                }
            }
            // An unbalanced closer is the parser's error to report; it adds no depth.
            b')' | b']' | b'}' if stack.len() > 1 => {
                let (ops, inner) = stack.pop().unwrap_or_default();
                if let Some(parent) = stack.last_mut() {
                    parent.1 = parent.1.max(ops + 2 + inner);
                }
            }
            b'+' | b'-' | b'*' | b'/' | b'%' | b'^' | b'<' | b'>' | b'=' | b'!' => {
                // Two-character comparison operators count once.
                if matches!(c, b'<' | b'>' | b'=' | b'!') && bytes.get(i + 1) == Some(&b'=') {
                    i += 1;
                }
                if let Some(top) = stack.last_mut() {
                    top.0 += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'_' | b':'))
                {
                    i += 1;
                }
                let word = &text[start..i];
                if WORD_OPERATORS.iter().any(|w| w.eq_ignore_ascii_case(word)) {
                    if let Some(top) = stack.last_mut() {
                        top.0 += 1;
                    }
                }
                continue;
            }
            _ => {}
        }
        if let Some(&(ops, inner)) = stack.last() {
            if ops + inner + stack.len() > stop_at {
                return ops + inner + stack.len();
            }
        }
        i += 1;
    }
    // Groups left open (unbalanced text) are closed here so their operators still count.
    while stack.len() > 1 {
        let (ops, inner) = stack.pop().unwrap_or_default();
        if let Some(parent) = stack.last_mut() {
            parent.1 = parent.1.max(ops + 2 + inner);
        }
    }
    let (ops, inner) = stack[0];
    ops + inner + 1
}

/// Refuses `text` when its tree may be deeper than `max_depth`, naming the limit.
pub fn check(text: &str, max_depth: usize) -> Result<(), String> {
    let bound = depth_bound(text, max_depth);
    if bound > max_depth {
        return Err(format!(
            "the expression nests deeper than query.max_depth ({max_depth} levels of operators, \
             brackets and calls); split it or raise the limit"
        ));
    }
    Ok(())
}
