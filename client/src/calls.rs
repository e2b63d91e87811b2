//! The calls a request's handler makes while the server layer serves it, for the request's
//! self time ([`tailscope_proto::selftime`]): while the layer polls the handler, the handler's
//! [`Calls`] are this thread's open set, and every outgoing span (the client layer's calls,
//! [`crate::Client::start_client`] guards) that ends inside adds its interval to it. Calls
//! made on other tasks (`tokio::spawn`) are not seen: their time counts as the request's own.
//! No allocation: the set is a fixed array, copied in and out around each poll.

use std::cell::Cell;

use tailscope_proto::selftime::Calls;

thread_local! {
    static OPEN: Cell<Option<Calls>> = const { Cell::new(None) };
}

/// Makes `calls` this thread's open set until [`leave`]; returns the set it replaces.
#[cfg_attr(not(any(feature = "tower", feature = "tracing")), allow(dead_code))]
#[inline]
pub(crate) fn enter(calls: Calls) -> Option<Calls> {
    OPEN.with(|open| open.replace(Some(calls)))
}

/// Ends an [`enter`]: restores `before` and returns the open set, with the calls added since.
/// The calls also count in `before`: a call made inside a span inside a request is a call the
/// request waited on.
#[cfg_attr(not(any(feature = "tower", feature = "tracing")), allow(dead_code))]
#[inline]
pub(crate) fn leave(before: Option<Calls>) -> Calls {
    let inner = OPEN.with(|open| open.take()).unwrap_or_default();
    let outer = before.map(|mut outer| {
        outer.absorb(&inner);
        outer
    });
    OPEN.with(|open| open.set(outer));
    inner
}

/// Adds a call from `start` lasting `nanos` to the open set, if there is one.
#[inline]
pub(crate) fn note(start: i64, nanos: i64) {
    OPEN.with(|open| {
        if let Some(mut calls) = open.get() {
            calls.add(start, start.saturating_add(nanos));
            open.set(Some(calls));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_land_in_the_open_set_and_nested_sets_are_restored() {
        note(0, 10); // no open set: nothing happens
        let outer = enter(Calls::new());
        assert_eq!(outer, None);
        note(0, 10);
        let inner = enter(Calls::new());
        note(20, 10);
        let inner_calls = leave(inner);
        assert_eq!(inner_calls.self_time(0, 100), 90);
        note(50, 10);
        // The inner set's call counts in the outer one too.
        let outer_calls = leave(outer);
        assert_eq!(outer_calls.self_time(0, 100), 70);
        note(0, 10);
        assert_eq!(leave(None), Calls::new());
    }
}
