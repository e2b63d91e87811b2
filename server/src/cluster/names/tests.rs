use super::*;

fn name(i: usize, operation: &str) -> Names {
    Names { service: "s".into(), operation: format!("{operation}{i}"), peer: "p".repeat(i % 3) }
}

#[test]
fn proposals_keep_every_name_in_order_within_the_message_bound() {
    let plain = "GET /items/".repeat(20);
    // Control characters are escaped six bytes for one: the worst a name can grow.
    let escaped = "\u{1}".repeat(250);
    for (count, operation) in [(0, "x"), (1, "x"), (100_000, plain.as_str()), (5_000, escaped.as_str())] {
        let names: Vec<Names> = (0..count).map(|i| name(i, operation)).collect();
        let messages = proposals(&names).unwrap();
        let mut again = Vec::new();
        for (payload, n) in &messages {
            assert!(payload.len() <= PROPOSAL_BYTES, "{} bytes", payload.len());
            let decoded: Vec<Names> = serde_json::from_slice(payload).unwrap();
            assert_eq!(decoded.len(), *n);
            again.extend(decoded);
        }
        assert_eq!(again, names, "every name once, in order");
        let whole = serde_json::to_vec(&names).unwrap().len();
        assert!(messages.len() <= whole / (PROPOSAL_BYTES - 2_000) + 1, "{} messages", messages.len());
    }
}
