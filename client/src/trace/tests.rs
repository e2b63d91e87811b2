use super::*;

const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn a_valid_traceparent_round_trips() {
    let ctx = TraceContext::parse(VALID).expect("valid");
    assert_eq!(ctx.trace_id, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
    assert_eq!(ctx.span_id, 0x00f0_67aa_0ba9_02b7);
    assert!(ctx.sampled);
    assert_eq!(ctx.traceparent(), VALID);
    let unsampled =
        TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").expect("valid");
    assert!(!unsampled.sampled);
    // A later version may carry more fields; its first four are read.
    let future = TraceContext::parse(&format!("01{}-what-comes-next", &VALID[2..])).expect("valid");
    assert_eq!(future.trace_id, ctx.trace_id);
}

#[test]
fn invalid_traceparents_are_refused() {
    for bad in [
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        "é0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        // A multi-byte character where a field ends.
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bé-01-x",
    ] {
        assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn a_child_keeps_the_trace_and_entering_nests() {
    let root = TraceContext::root();
    assert_ne!(root.trace_id, 0);
    let child = root.child(0);
    assert_eq!((child.trace_id, child.sampled), (root.trace_id, root.sampled));
    assert_ne!(child.span_id, root.span_id);
    assert_eq!(child.ids(Some(&root)).parent_span_id, root.span_id);
    assert_eq!(TraceContext::current(), None);
    {
        let _outer = TraceContext::enter(root);
        assert_eq!(TraceContext::current(), Some(root));
        {
            let _inner = TraceContext::enter(child);
            assert_eq!(TraceContext::current(), Some(child));
        }
        assert_eq!(TraceContext::current(), Some(root));
    }
    assert_eq!(TraceContext::current(), None);
}

#[test]
fn baggage_members_are_read_with_properties_spaces_and_percent_encoding() {
    let header = "userId=alice , ts.caller = check%20out;ttl=3, serverNode=DF%2028";
    assert_eq!(baggage_get(header, CALLER_KEY).as_deref(), Some("check out"));
    assert_eq!(baggage_get(header, "userId").as_deref(), Some("alice"));
    assert_eq!(baggage_get(header, "serverNode").as_deref(), Some("DF 28"));
    assert_eq!(baggage_get(header, "missing"), None);
    assert_eq!(baggage_get("", CALLER_KEY), None);
    // Nothing encoded: borrowed, no allocation.
    assert!(matches!(
        baggage_get("ts.caller=frontend", CALLER_KEY),
        Some(std::borrow::Cow::Borrowed("frontend"))
    ));
    // A stray `%` is itself; bytes that are not UTF-8 are no value at all.
    assert_eq!(baggage_get("ts.caller=50%", CALLER_KEY).as_deref(), Some("50%"));
    assert_eq!(baggage_get("ts.caller=%FF%FE", CALLER_KEY), None);
}

#[test]
fn setting_a_baggage_member_replaces_it_and_keeps_the_others() {
    assert_eq!(baggage_set("", CALLER_KEY, "frontend").as_deref(), Some("ts.caller=frontend"));
    assert_eq!(
        baggage_set("userId=alice, ts.caller=edge;p=1,k=v", CALLER_KEY, "check out,1%").as_deref(),
        Some("userId=alice,k=v,ts.caller=check%20out%2C1%25")
    );
    // What is written reads back as it was given, for every byte a name can hold.
    let name = "svc \"quoted\";=,%\\ é";
    let header = baggage_set("a=b", CALLER_KEY, name).unwrap();
    assert!(header.bytes().all(|b| b.is_ascii_graphic()), "{header}");
    assert_eq!(baggage_get(&header, CALLER_KEY).as_deref(), Some(name));
    assert_eq!(baggage_get(&header, "a").as_deref(), Some("b"));
    // Past W3C Baggage's limits nothing is added.
    let full = (0..MAX_BAGGAGE_MEMBERS).map(|n| format!("k{n}=v")).collect::<Vec<_>>().join(",");
    assert_eq!(baggage_set(&full, CALLER_KEY, "frontend"), None);
    let big = format!("k={}", "v".repeat(MAX_BAGGAGE_BYTES));
    assert_eq!(baggage_set(&big, CALLER_KEY, "frontend"), None);
}
