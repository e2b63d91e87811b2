//! The root-cause rule: which service's own time explains a breaching service's tail.
//!
//! For a service `s`, `ΔS(s)` is the rise of its own p99 (now against its baseline) and
//! `ΔE(s→c)` the rise of the time `s` waits on `c` per request: the p99 of its calls to `c`
//! times the calls it makes per request it serves (at least one), so retries and loops count
//! every call they wait on — a caller that retries a 1 s timeout three times waited 3 s. The **blame
//! edge** `b(s)` is the callee whose calls rose most, kept only if that rise explains the
//! tail — `ΔE ≥ max(share·ΔS(s), min_rise)` and the edge's p99 at least `min_ratio` times its
//! baseline. Where `s`'s spans carry self times (the time spent in its own code, not waiting
//! on calls), `ΔX(s)`, the rise of its self-time p99, decides between its code and its calls:
//! the edge must rise more than `ΔX` (the larger contribution wins), and when `ΔX` is under
//! `share·ΔS` the calls explain the rest, so the edge need not reach `share·ΔS` itself — a
//! retry storm's tail waits several calls while the mean calls per request barely moves. A
//! service with a blame edge is a **symptom** of its callee; one without is a **root** (its
//! own code explains its tail). Blame is followed downstream to the first root;
//! a callee with no spans of its own (`db:postgres`, an external API) whose edge breached is
//! a **virtual** root. A blame cycle (A waits on B, B calls back into A) is broken at the
//! member whose own tail is least explained by its calls.
//!
//! This is the rule of Sage's counterfactual (is the caller's tail explained by the callee's?)
//! and Dynatrace's merge along topology, on exact per-edge percentiles: deterministic, its
//! reason printable, and its cost one pass over the breaching services and their edges.

use std::collections::{BTreeMap, BTreeSet};

#[cfg(test)]
mod tests;

/// A p99 now and over the baseline, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tail {
    /// Over the recent window.
    pub now: f64,
    /// Over the baseline before it (`None`: no data then).
    pub base: Option<f64>,
}

impl Tail {
    /// How much it rose (0 without a baseline, so a new series explains nothing).
    pub fn rise(&self) -> f64 {
        self.base.map_or(0.0, |b| self.now - b)
    }

    /// Now over the baseline (1 without one).
    pub fn ratio(&self) -> f64 {
        match self.base {
            Some(b) if b > 0.0 => self.now / b,
            _ => 1.0,
        }
    }
}

/// The tails the rule reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tails {
    /// Each service's own p99 (server, consumer, internal spans).
    pub services: BTreeMap<String, Tail>,
    /// Each service's self-time p99, for the services whose spans carry self times.
    pub selfs: BTreeMap<String, Tail>,
    /// Each synchronous call edge's p99 as the caller waited, by (caller, callee).
    pub edges: BTreeMap<(String, String), Tail>,
    /// Each edge's calls per request its caller served, now and over the baseline (absent:
    /// one).
    pub calls_per_request: BTreeMap<(String, String), Tail>,
}

impl Tails {
    /// The edge's wait per request: its p99 times its calls per request (at least one each).
    fn wait(&self, edge: &(String, String), tail: &Tail) -> Tail {
        let calls = self.calls_per_request.get(edge);
        let now = calls.map_or(1.0, |c| c.now.max(1.0));
        let base = calls.and_then(|c| c.base).unwrap_or(1.0).max(1.0);
        Tail { now: tail.now * now, base: tail.base.map(|b| b * base) }
    }

    /// `caller`'s synchronous call edges, each with its p99 tail and its wait per request.
    fn calls_of<'a>(
        &'a self,
        caller: &'a str,
    ) -> impl Iterator<Item = (&'a (String, String), &'a Tail, Tail)> + 'a {
        self.edges
            .range((caller.to_owned(), String::new())..)
            .take_while(move |((c, _), _)| c == caller)
            .map(|(edge, tail)| (edge, tail, self.wait(edge, tail)))
    }
}

/// The rule's thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Share of the caller's own rise the callee's rise must reach (θ).
    pub share: f64,
    /// Least rise of an edge's p99 that can blame, in seconds (δ).
    pub min_rise: f64,
    /// Least ratio of an edge's p99 now to its baseline.
    pub min_ratio: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { share: 0.5, min_rise: 0.010, min_ratio: 1.5 }
    }
}

/// Why a service is a symptom: its calls to `callee` rose from `base` to `now` (p99 seconds).
#[derive(Debug, Clone, PartialEq)]
pub struct Blame {
    /// The caller.
    pub caller: String,
    /// The callee blamed.
    pub callee: String,
    /// The edge's p99 now.
    pub now: f64,
    /// Its baseline.
    pub base: f64,
    /// Calls per request now and over the baseline, when they changed (retries).
    pub amplified: Option<(f64, f64)>,
}

impl std::fmt::Display for Blame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}→{} p99 {}", self.caller, self.callee, change(self.base, self.now))?;
        if let Some((now, base)) = self.amplified {
            write!(f, ", {now:.1} calls per request (was {base:.1})")?;
        }
        Ok(())
    }
}

/// A change of a p99, printed: `52ms → 2s (+1.95s)`, `26ms → 25ms (−1ms)`.
fn change(base: f64, now: f64) -> String {
    let sign = if now >= base { '+' } else { '−' };
    format!("{} → {} ({sign}{})", seconds(base), seconds(now), seconds((now - base).abs()))
}

/// A duration in seconds, printed the way people read tails (`48ms`, `2.1s`).
pub fn seconds(s: f64) -> String {
    if s.abs() < 1.0 {
        format!("{:.0}ms", s * 1000.0)
    } else {
        let text = format!("{s:.2}");
        format!("{}s", text.trim_end_matches('0').trim_end_matches('.'))
    }
}

/// What the rule says of one service.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The root its blame leads to (itself when it is the root).
    pub root: String,
    /// Whether the root has no spans of its own (an uninstrumented database or API).
    pub virtual_root: bool,
    /// Its own blame edge, if it is a symptom.
    pub blame: Option<Blame>,
    /// The services from it to the root, both included.
    pub path: Vec<String>,
}

/// The blame edge of `service`, if any.
pub fn blame_edge(tails: &Tails, service: &str, t: &Thresholds) -> Option<Blame> {
    let own = tails.services.get(service).map_or(0.0, Tail::rise);
    // With self times, what its own code did not add it waited on calls: when its code adds
    // less than `share` of the rise, a call whose wait rose more than its code explains the
    // rest, even if one edge's p99 times the mean calls per request understates the slow
    // requests' waits (retries pile up in the tail, not in the mean).
    let own_code = tails.selfs.get(service).filter(|t| t.base.is_some()).map(Tail::rise);
    let calls_explain = own_code.is_some_and(|x| x < t.share * own);
    let needed = own_code.unwrap_or(0.0).max(t.min_rise);
    let share_needed = t.share * own;
    tails
        .calls_of(service)
        .filter(|((_, callee), _, wait)| {
            callee != service
                && wait.rise() >= needed
                && (calls_explain || wait.rise() >= share_needed)
                && wait.ratio() >= t.min_ratio
        })
        // The largest rise; among equal rises, the first callee by name.
        .max_by(|a, b| a.2.rise().total_cmp(&b.2.rise()).then_with(|| b.0 .1.cmp(&a.0 .1)))
        .map(|(edge, tail, _)| {
            let calls = tails.calls_per_request.get(edge);
            let (now, base) = (calls.map_or(1.0, |c| c.now), calls.and_then(|c| c.base).unwrap_or(1.0));
            Blame {
                caller: edge.0.clone(),
                callee: edge.1.clone(),
                now: tail.now,
                base: tail.base.unwrap_or(0.0),
                amplified: (now > 1.05 * base.max(1.0)).then_some((now, base)),
            }
        })
}

/// Why a service is a root, in numbers: the rise of its p99, of its self-time p99 when its
/// spans carry self times, and the largest rise of what it waited on a call per request —
/// `payments p99 50ms → 2s (+1.95s); self time p99 48ms → 2s (+1.95s); calls at most
/// payments→db:postgres 3ms → 4ms (+1ms)`. `None` without a baseline.
pub fn root_reason(tails: &Tails, service: &str) -> Option<String> {
    let rise = |t: &Tail| Some(change(t.base?, t.now));
    let mut parts = vec![format!("{service} p99 {}", tails.services.get(service).and_then(rise)?)];
    if let Some(own) = tails.selfs.get(service).and_then(rise) {
        parts.push(format!("self time p99 {own}"));
    }
    let largest = tails
        .calls_of(service)
        .filter(|(_, _, wait)| wait.base.is_some())
        .max_by(|a, b| a.2.rise().total_cmp(&b.2.rise()));
    if let Some(((caller, callee), _, wait)) = largest {
        parts.push(format!("calls at most {caller}→{callee} {}", rise(&wait).unwrap_or_default()));
    }
    Some(parts.join("; "))
}

/// Follows `service`'s blame to its root.
pub fn explain(tails: &Tails, service: &str, t: &Thresholds) -> Verdict {
    let own_blame = blame_edge(tails, service, t);
    let mut path = vec![service.to_owned()];
    let mut seen: BTreeSet<String> = path.iter().cloned().collect();
    let mut next = own_blame.as_ref().map(|b| b.callee.clone());
    while let Some(callee) = next {
        if seen.contains(&callee) {
            // A cycle: its members are those from the first visit of `callee` on.
            let start = path.iter().position(|p| *p == callee).unwrap_or(0);
            let cycle = &path[start..];
            let unexplained = |s: &String| {
                let own = tails.services.get(s).map_or(0.0, Tail::rise);
                own - blame_edge(tails, s, t)
                    .and_then(|b| {
                        let edge = (b.caller, b.callee);
                        Some(tails.wait(&edge, tails.edges.get(&edge)?).rise())
                    })
                    .unwrap_or(0.0)
            };
            let root = cycle
                .iter()
                .max_by(|a, b| unexplained(a).total_cmp(&unexplained(b)).then_with(|| b.cmp(a)))
                .cloned()
                .unwrap_or(callee);
            let cut = path.iter().position(|p| *p == root).map_or(path.len(), |i| i + 1);
            path.truncate(cut);
            return Verdict { virtual_root: false, root, blame: own_blame, path };
        }
        seen.insert(callee.clone());
        path.push(callee.clone());
        next = blame_edge(tails, &callee, t).map(|b| b.callee);
    }
    let root = path.last().cloned().unwrap_or_else(|| service.to_owned());
    let virtual_root = !tails.services.contains_key(&root);
    Verdict { root, virtual_root, blame: own_blame, path }
}
