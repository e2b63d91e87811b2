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
