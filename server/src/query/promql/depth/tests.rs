use super::*;

fn chain(op: &str, terms: usize) -> String {
    vec!["1"; terms].join(op)
}

#[test]
fn a_chain_of_operators_is_as_deep_as_its_terms() {
    assert_eq!(depth_bound("1", 1000), 1);
    assert_eq!(depth_bound(&chain("+", 10), 1000), 10);
    assert_eq!(depth_bound(&chain(" or ", 10), 1000), 10);
    assert_eq!(depth_bound(&chain(" >= ", 10), 1000), 10);
}

#[test]
fn nested_calls_count_two_levels_each() {
    let nested = format!("{}x{}", "sum(".repeat(50), ")".repeat(50));
    assert_eq!(depth_bound(&nested, 1000), 101);
}

#[test]
fn the_bound_is_never_below_the_parsed_depth() {
    fn depth(e: &promql_parser::parser::Expr) -> usize {
        use promql_parser::parser::Expr;
        1 + match e {
            Expr::Aggregate(a) => depth(&a.expr).max(a.param.as_deref().map_or(0, depth)),
            Expr::Unary(u) => depth(&u.expr),
            Expr::Binary(b) => depth(&b.lhs).max(depth(&b.rhs)),
            Expr::Paren(p) => depth(&p.expr),
            Expr::Subquery(q) => depth(&q.expr),
            Expr::Call(c) => c.args.args.iter().map(|a| depth(a)).max().unwrap_or(0),
            _ => 0,
        }
    }
    for q in [
        "histogram_quantile(0.99, sum by (le) (rate(span_duration_seconds_bucket{service=\"a\"}[5m])))",
        "-(-(1)) * 2 + (3 - 4) / 5",
        "a and b or c unless d",
        "sum(rate(x[5m])) / ignoring(le) sum(rate(y[5m:1m] offset 1h))",
        "max_over_time((a + b)[10m:1m]) > bool 3",
        "a atan2 b ^ 2 ^ 3",
        "label_replace(x, \"dst\", \"$1\", \"src\", \"(.*)\")",
    ] {
        let expr = promql_parser::parser::parse(q).expect(q);
        assert!(
            depth_bound(q, 1000) >= depth(&expr),
            "{q}: bound {} < depth {}",
            depth_bound(q, 1000),
            depth(&expr)
        );
    }
}

#[test]
fn strings_and_comments_add_nothing() {
    assert_eq!(depth_bound("x{a=\"((((+++\"}", 1000), depth_bound("x{a=\"\"}", 1000));
    assert_eq!(depth_bound("x # ((((((+++\n", 1000), 1);
    assert_eq!(depth_bound("x{a=`\\`}", 1000), depth_bound("x{a=``}", 1000));
}

#[test]
fn hostile_text_is_refused_naming_the_limit() {
    let deep = chain("+", 8_000);
    let err = check(&deep, 256).unwrap_err();
    assert!(err.contains("query.max_depth (256"), "{err}");
    let nested = format!("{}x{}", "sum(".repeat(20_000), ")".repeat(20_000));
    assert!(check(&nested, 256).is_err());
    // Unbalanced: openers alone still count.
    assert!(check(&"(".repeat(10_000), 256).is_err());
    assert!(check(&")".repeat(10_000), 256).is_ok());
    assert!(check(&chain("+", 200), 256).is_ok());
}
