//! One incident per cascade, its root named: a stage between rule evaluation and the
//! notifier (a [`Sink`] wrapping the next one) that stamps every alert naming a service with
//! the incident its tail belongs to.
//!
//! The incident comes from the service graph's exact tails ([`blame`]): the alert's service is
//! followed along the call edges that explain its p99 rise to the root service. Alerts whose
//! blame ends at the same root are one incident; unrelated failures share no blame path and
//! stay apart. Each alert gets
//!
//! - the label `incident="<first root>-<unix seconds>"`, sticky for the alert's firing life (so
//!   its fingerprint never changes, and a route with `group_by: [incident]` delivers one group —
//!   one notification — per incident, in Alertmanager's unchanged body);
//! - the annotations `root_service`, `root_kind` (`service`, or `virtual` for an
//!   uninstrumented callee such as `db:postgres`), `incident_role` (`root` or `symptom`),
//!   `blame` (the edge and its p99s, for a symptom; for a root, the rises of its p99, of its
//!   self-time p99 and of its largest call) and `incident_services`.
//!
//! A later alert of an open incident (staggered `for` clocks) joins it, and a re-rooted
//! incident keeps its id. Incidents re-rooted onto one root are one incident: each root has one
//! open incident that its new alerts join — the one named after it if there is one, else the
//! earliest — and the others are listed inside it (their alerts keep their labels, so no
//! alert changes fingerprint). The stamps are written to the store before the alerts go on, so a
//! restart keeps every incident id and the notification log sees the same groups.

pub mod blame;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{fingerprint, Alert, Labels, Sink};
use crate::clock::Clock;
use crate::query::promql::{self, Engine, Limits, Steps, Value};
use crate::store::{RetentionConfig, StateKind, StateStore};
use crate::telemetry::Metrics;
use blame::{Tail, Tails, Thresholds};

#[cfg(test)]
mod tests;

/// `[alerting.incidents]`: topology-aware grouping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IncidentsConfig {
    /// Stamp alerts with incidents.
    pub enabled: bool,
    /// The label that names an alert's service (alerts without it pass untouched).
    pub service_label: String,
    /// The recent window whose p99s are compared.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// The baseline before that window.
    #[serde(with = "humantime_serde")]
    pub baseline: Duration,
    /// Share of a caller's own p99 rise its callee's edge must explain to be blamed.
    pub share: f64,
    /// Least rise of an edge's p99 that can blame.
    #[serde(with = "humantime_serde")]
    pub min_rise: Duration,
    /// Least ratio of an edge's p99 now to its baseline that can blame.
    pub min_ratio: f64,
    /// Least time between two readings of the graph's tails.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// Mutes symptoms in the groups of routes that do not group by `incident` (a per-team
    /// route), so only the incident's page tells of them.
    pub inhibit_symptoms: bool,
}

impl Default for IncidentsConfig {
    fn default() -> Self {
        IncidentsConfig {
            enabled: false,
            service_label: "service".into(),
            window: Duration::from_secs(300),
            baseline: Duration::from_secs(3600),
            share: 0.5,
            min_rise: Duration::from_millis(10),
            min_ratio: 1.5,
            refresh: Duration::from_secs(5),
            inhibit_symptoms: false,
        }
    }
}

impl IncidentsConfig {
    /// Checks what the types alone do not.
    pub fn validate(&self) -> Result<(), String> {
        if self.service_label.is_empty() {
            return Err("incidents.service_label must not be empty".into());
        }
        if self.window < Duration::from_secs(10) || self.baseline < self.window {
            return Err(
                "incidents.window must be at least 10s and incidents.baseline at least the window".into()
            );
        }
        let share_ok = self.share > 0.0 && self.share <= 1.0;
        let ratio_ok = self.min_ratio >= 1.0 && self.min_ratio.is_finite();
        if !(share_ok && ratio_ok) {
            return Err("incidents.share must be in (0, 1] and incidents.min_ratio at least 1".into());
        }
        Ok(())
    }

    fn thresholds(&self) -> Thresholds {
        Thresholds { share: self.share, min_rise: self.min_rise.as_secs_f64(), min_ratio: self.min_ratio }
    }
}

/// How long a resolved or no longer sent alert's stamp is kept.
const FORGET_AFTER_MS: i64 = 3_600_000;

/// What an alert was stamped with, kept for its firing life (and an hour after).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stamp {
    /// The incident id.
    pub incident: String,
    /// The root service now.
    pub root: String,
    /// Whether the root is uninstrumented.
    pub virtual_root: bool,
    /// The alert's service.
    pub service: String,
    /// The alert's name.
    pub alertname: String,
    /// Its blame edge, printed, if it is a symptom (for a root, why: its rises).
    pub blame: Option<String>,
    /// When the alert started, ms.
    pub starts_at: i64,
    /// Whether it is resolved.
    pub resolved: bool,
    /// When it was last seen, ms.
    pub last_seen: i64,
    /// The incident its own was merged into, when a re-rooting gave two incidents one root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
}

impl Stamp {
    /// The incident it is listed under: its own, or the one its own merged into.
    pub fn listed(&self) -> &str {
        self.merged_into.as_deref().unwrap_or(&self.incident)
    }

    /// `root` or `symptom`.
    pub fn role(&self) -> &'static str {
        if self.service == self.root {
            "root"
        } else {
            "symptom"
        }
    }
}

/// One incident as `GET /api/v1/incidents` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Incident {
    /// Its id (the `incident` label of the alerts that joined it).
    pub id: String,
    /// Every `incident` label its alerts carry: its id, and the ids of the incidents that were
    /// re-rooted onto its root and merged into it.
    pub labels: Vec<String>,
    /// Its root now.
    pub root_service: String,
    /// `service` or `virtual`.
    pub root_kind: &'static str,
    /// `firing` while any member fires, else `resolved`.
    pub state: &'static str,
    /// Earliest start of its alerts, RFC 3339.
    pub starts_at: String,
    /// Its alerts.
    pub alerts: Vec<Member>,
}

/// One alert of an incident.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Member {
    /// `alertname`.
    pub alertname: String,
    /// Its service.
    pub service: String,
    /// Its `incident` label.
    pub incident: String,
    /// `root` or `symptom`.
    pub role: &'static str,
    /// Its blame edge, for a symptom (for a root, why: its rises).
    pub blame: Option<String>,
    /// `firing` or `resolved`.
    pub state: &'static str,
}

/// Where the correlator reads and keeps things.
#[derive(Clone)]
pub struct Environment {
    /// What the engine reads.
    pub sources: Arc<dyn crate::query::Sources>,
    /// Where stamps persist.
    pub state: Arc<dyn StateStore>,
    /// Which resolutions exist.
    pub retention: RetentionConfig,
    /// Wall-clock time.
    pub clock: Arc<dyn Clock>,
    /// Self-metrics (`tailscope_alerts_dropped_total` counts what a full queue drops).
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Environment").finish_non_exhaustive()
    }
}

/// The stage: stamps alerts and hands them on.
#[derive(Debug)]
pub struct Correlator {
    tx: mpsc::Sender<Vec<Alert>>,
    stamps: Arc<Mutex<HashMap<u64, Stamp>>>,
    metrics: Arc<Metrics>,
}

impl Sink for Correlator {
    fn send(&self, alerts: Vec<Alert>) {
        let n = alerts.len() as u64;
        if self.tx.try_send(alerts).is_err() {
            // Full: dropped as the notifier's own full queue drops, counted in
            // `tailscope_alerts_dropped_total`; rules resend firing alerts every resend delay.
            self.metrics.alerts_dropped.inc_by(n);
            tracing::warn!(alerts = n, "incident correlation queue full; alerts wait for their next resend");
        }
    }
}

impl Correlator {
    /// Starts the stage in front of `next`, its stamps restored from the store.
    pub fn start(
        config: IncidentsConfig,
        env: Environment,
        next: Arc<dyn Sink>,
        capacity: usize,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> (Arc<Correlator>, JoinHandle<()>) {
        let mut restored = HashMap::new();
        match env.state.state(StateKind::Incident, b"") {
            Ok(records) => {
                for (key, value) in records {
                    let fp = std::str::from_utf8(&key).ok().and_then(|k| u64::from_str_radix(k, 16).ok());
                    match (fp, serde_json::from_slice::<Stamp>(&value)) {
                        (Some(fp), Ok(stamp)) => {
                            restored.insert(fp, stamp);
                        }
                        _ => {
                            tracing::warn!(key = %String::from_utf8_lossy(&key), "ignoring an unreadable incident stamp")
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read incident stamps; incidents start afresh"),
        }
        let stamps = Arc::new(Mutex::new(restored));
        let metrics = env.metrics.clone();
        let (tx, mut rx) = mpsc::channel::<Vec<Alert>>(capacity.max(1));
        let worker = Worker { config, env, stamps: stamps.clone(), tails: None };
        let task = tokio::spawn(async move {
            let mut worker = worker;
            loop {
                let mut alerts = tokio::select! {
                    received = rx.recv() => match received {
                        Some(alerts) => alerts,
                        None => return,
                    },
                    _ = stop.wait_for(|&s| s) => return,
                };
                while let Ok(more) = rx.try_recv() {
                    alerts.extend(more);
                }
                let stamped = worker.handle(alerts).await;
                next.send(stamped);
            }
        });
        (Arc::new(Correlator { tx, stamps, metrics }), task)
    }

    /// The incidents of the stamps kept, newest first.
    pub fn incidents(&self) -> Vec<Incident> {
        incidents_of(&self.stamps.lock())
    }
}

struct Worker {
    config: IncidentsConfig,
    env: Environment,
    stamps: Arc<Mutex<HashMap<u64, Stamp>>>,
    /// The tails last read, and when (ms).
    tails: Option<(i64, Arc<Tails>)>,
}

impl Worker {
    async fn handle(&mut self, alerts: Vec<Alert>) -> Vec<Alert> {
        let now = self.env.clock.now_nanos() / 1_000_000;
        let label = self.config.service_label.clone();
        let firing_in_scope = alerts
            .iter()
            .any(|a| !a.resolved(now) && a.labels.contains_key(&label) && !a.labels.contains_key("incident"));
        let stale =
            self.tails.as_ref().is_none_or(|(at, _)| now - at >= self.config.refresh.as_millis() as i64);
        if firing_in_scope && stale {
            let (env, config) = (self.env.clone(), self.config.clone());
            let read = tokio::task::spawn_blocking(move || read_tails(&env, &config, now)).await;
            match read.map_err(|e| e.to_string()).and_then(|r| r) {
                Ok(tails) => self.tails = Some((now, Arc::new(tails))),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the service graph's tails; alerts are rooted at their own service")
                }
            }
        }
        let tails = self.tails.as_ref().map(|(_, t)| t.clone()).unwrap_or_default();
        let (stamped, writes) = stamp(&mut self.stamps.lock(), alerts, &tails, &self.config, now);
        if !writes.is_empty() {
            let state = self.env.state.clone();
            let written =
                tokio::task::spawn_blocking(move || state.write_state(StateKind::Incident, &writes)).await;
            if let Err(e) = written.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                tracing::error!(error = %e, "cannot persist incident stamps");
            }
        }
        stamped
    }
}

/// A record of alerting state to write (`Some`) or delete (`None`).
pub type StateWrite = (Vec<u8>, Option<Vec<u8>>);

/// Stamps `alerts` at `now` (ms), updating `stamps`; also returns the store writes.
pub fn stamp(
    stamps: &mut HashMap<u64, Stamp>,
    alerts: Vec<Alert>,
    tails: &Tails,
    config: &IncidentsConfig,
    now: i64,
) -> (Vec<Alert>, Vec<StateWrite>) {
    let thresholds = config.thresholds();
    let mut changed = BTreeSet::new();
    let mut keys = vec![None; alerts.len()];
    // Alerts already stamped go first, so a new alert of this batch joins the incident they
    // were re-rooted to rather than minting another.
    // (Alerts without a service, or stamped already upstream, pass untouched.)
    let mut order: Vec<(usize, &String, u64)> = alerts
        .iter()
        .enumerate()
        .filter(|(_, a)| !a.labels.contains_key("incident"))
        .filter_map(|(i, a)| Some((i, a.labels.get(&config.service_label)?, fingerprint(&a.labels))))
        .collect();
    order.sort_by_key(|&(i, _, fp)| (stamps.get(&fp).is_none_or(|s| s.resolved), i));
    for (i, service, fp) in order {
        let a = &alerts[i];
        let resolved = a.resolved(now);
        if resolved && !stamps.contains_key(&fp) {
            // Never stamped while firing: stamping now would make it another alert.
            continue;
        }
        if !resolved {
            let verdict = blame::explain(tails, service, &thresholds);
            // A symptom's blame edge, or why a root is one (its rises).
            let why = match &verdict.blame {
                Some(b) => Some(b.to_string()),
                None if verdict.root == *service => blame::root_reason(tails, service),
                None => None,
            };
            let own_rising = tails
                .services
                .get(service)
                .is_some_and(|t| t.ratio() >= thresholds.min_ratio && t.rise() >= thresholds.min_rise);
            let (incident, root, virtual_root, blame) = match stamps.get(&fp) {
                // A member whose tail no longer rises (its cause passed, the alert still fires)
                // keeps what it was: only new evidence re-roots it.
                Some(s) if !s.resolved && verdict.blame.is_none() && !own_rising => {
                    (s.incident.clone(), s.root.clone(), s.virtual_root, s.blame.clone())
                }
                Some(s) if !s.resolved => (s.incident.clone(), verdict.root, verdict.virtual_root, why),
                _ => (
                    open_incident(stamps, &verdict.root)
                        .unwrap_or_else(|| format!("{}-{}", verdict.root, a.starts_at.div_euclid(1000))),
                    verdict.root,
                    verdict.virtual_root,
                    why,
                ),
            };
            // A merge holds while the root it was made for does.
            let merged_into =
                stamps.get(&fp).filter(|s| !s.resolved && s.root == root).and_then(|s| s.merged_into.clone());
            let stamp = Stamp {
                incident,
                root,
                virtual_root,
                service: service.clone(),
                alertname: a.labels.get("alertname").cloned().unwrap_or_default(),
                blame,
                starts_at: a.starts_at,
                resolved: false,
                last_seen: now,
                merged_into,
            };
            let old = stamps.insert(fp, stamp.clone());
            if old.is_none_or(|o| Stamp { last_seen: now, ..o } != stamp || now - o.last_seen > 60_000) {
                changed.insert(fp);
            }
        } else if let Some(s) = stamps.get_mut(&fp) {
            if !s.resolved {
                s.resolved = true;
                changed.insert(fp);
            }
            s.last_seen = now;
        }
        keys[i] = Some(fp);
    }
    // Incidents re-rooted onto one root are one: each listed under the root's open incident.
    let roots: BTreeSet<String> = stamps.values().filter(|s| !s.resolved).map(|s| s.root.clone()).collect();
    for root in roots {
        let Some(into) = open_incident(stamps, &root) else { continue };
        for (fp, s) in stamps.iter_mut() {
            if !s.resolved && s.root == root && s.listed() != into {
                s.merged_into = (s.incident != into).then(|| into.clone());
                changed.insert(*fp);
            }
        }
    }
    // The members of each incident, for `incident_services`.
    let mut members: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for s in stamps.values() {
        members.entry(s.listed()).or_default().insert(&s.service);
    }
    let out = alerts
        .into_iter()
        .zip(&keys)
        .map(|(mut a, key)| {
            let Some(s) = key.and_then(|fp| stamps.get(&fp)) else { return a };
            a.labels.insert("incident".into(), s.incident.clone());
            let services = members
                .get(s.listed())
                .map_or_else(|| s.service.clone(), |m| m.iter().copied().collect::<Vec<_>>().join(", "));
            let notes = [
                ("root_service", s.root.clone()),
                ("root_kind", if s.virtual_root { "virtual" } else { "service" }.to_owned()),
                ("incident_role", s.role().to_owned()),
                ("incident_services", services),
            ];
            for (k, v) in notes {
                a.annotations.insert(k.into(), v);
            }
            if let Some(b) = &s.blame {
                a.annotations.insert("blame".into(), b.clone());
            }
            a
        })
        .collect();
    let mut writes: Vec<StateWrite> = changed
        .iter()
        .filter_map(|fp| {
            Some((format!("{fp:016x}").into_bytes(), Some(serde_json::to_vec(stamps.get(fp)?).ok()?)))
        })
        .collect();
    let forgotten: Vec<u64> =
        stamps.iter().filter(|(_, s)| now - s.last_seen > FORGET_AFTER_MS).map(|(fp, _)| *fp).collect();
    for fp in forgotten {
        stamps.remove(&fp);
        writes.push((format!("{fp:016x}").into_bytes(), None));
    }
    (out, writes)
}

/// The open incident of `root` that its new alerts join: the one named after it if there is
/// one, else the earliest started (then the least id).
fn open_incident(stamps: &HashMap<u64, Stamp>, root: &str) -> Option<String> {
    let mut started: BTreeMap<&str, i64> = BTreeMap::new();
    for s in stamps.values().filter(|s| !s.resolved && s.root == root) {
        let start = started.entry(s.listed()).or_insert(s.starts_at);
        *start = (*start).min(s.starts_at);
    }
    let named = |id: &str| {
        id.strip_prefix(root).and_then(|r| r.strip_prefix('-')).is_some_and(|r| r.parse::<i64>().is_ok())
    };
    started.into_iter().min_by_key(|&(id, start)| (!named(id), start, id)).map(|(id, _)| id.to_owned())
}

/// The incidents of `stamps`, grouped by the incident each is listed under, newest first.
pub fn incidents_of(stamps: &HashMap<u64, Stamp>) -> Vec<Incident> {
    let mut by_id: BTreeMap<&str, Vec<&Stamp>> = BTreeMap::new();
    for s in stamps.values() {
        by_id.entry(s.listed()).or_default().push(s);
    }
    let mut out: Vec<(i64, Incident)> = by_id
        .into_iter()
        .map(|(id, mut members)| {
            members.sort_by(|a, b| {
                (a.role(), &a.service, &a.alertname).cmp(&(b.role(), &b.service, &b.alertname))
            });
            let newest = members.iter().max_by_key(|s| s.last_seen).copied().unwrap_or(members[0]);
            let started = members.iter().map(|s| s.starts_at).min().unwrap_or(0);
            let labels: BTreeSet<&str> =
                std::iter::once(id).chain(members.iter().map(|s| s.incident.as_str())).collect();
            let incident = Incident {
                id: id.to_owned(),
                labels: labels.into_iter().map(str::to_owned).collect(),
                root_service: newest.root.clone(),
                root_kind: if newest.virtual_root { "virtual" } else { "service" },
                state: if members.iter().any(|s| !s.resolved) { "firing" } else { "resolved" },
                starts_at: super::rfc3339(started),
                alerts: members
                    .iter()
                    .map(|s| Member {
                        alertname: s.alertname.clone(),
                        service: s.service.clone(),
                        incident: s.incident.clone(),
                        role: s.role(),
                        blame: s.blame.clone(),
                        state: if s.resolved { "resolved" } else { "firing" },
                    })
                    .collect(),
            };
            (started, incident)
        })
        .collect();
    out.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id)));
    out.into_iter().map(|(_, i)| i).collect()
}

/// Reads every service's own p99 and every synchronous edge's p99 (as callers waited) and calls
/// per request over the recent window and the baseline before it, at `now` (ms), and every
/// service's self-time p99: ten queries, each one pass over the series it names.
pub fn read_tails(env: &Environment, config: &IncidentsConfig, now: i64) -> Result<Tails, String> {
    let steps = Steps::instant(now);
    let limits = Limits {
        max_series: 100_000,
        max_points: 1,
        max_samples: 100_000,
        deadline: Instant::now() + Duration::from_secs(10),
    };
    let source = env.sources.open();
    let engine = Engine::new(&*source, &steps, now.div_euclid(1000), &env.retention, limits);
    let (w, b) = (config.window.as_secs().max(10), config.baseline.as_secs().max(10));
    let edge = "histogram_quantile(0.99, sum by (client, server, le) \
                (rate(traces_service_graph_request_client_seconds_bucket{connection_type!=\"messaging_system\"}";
    let mut tails = Tails::default();
    let read = |expr: String| -> Result<Vec<(Labels, f64)>, String> {
        let parsed = promql::parse(&expr)?;
        let value = engine.eval(&parsed).and_then(|v| engine.materialized(v)).map_err(|e| e.to_string())?;
        Ok(match value {
            Value::Vector(series) => series
                .into_iter()
                .filter_map(|s| Some((s.labels, s.values.first().copied()??)).filter(|(_, v)| v.is_finite()))
                .collect(),
            _ => Vec::new(),
        })
    };
    // Each service's p99 of a histogram, now and over the baseline.
    let per_service = |histogram: &str| -> Result<BTreeMap<String, Tail>, String> {
        let expr = format!("histogram_quantile(0.99, sum by (service, le) (rate({histogram}_bucket");
        let mut out = BTreeMap::new();
        for (labels, now) in read(format!("{expr}[{w}s])))"))? {
            out.insert(labels.get("service").cloned().unwrap_or_default(), Tail { now, base: None });
        }
        for (labels, base) in read(format!("{expr}[{b}s] offset {w}s)))"))? {
            if let Some(t) = labels.get("service").and_then(|s| out.get_mut(s)) {
                t.base = Some(base);
            }
        }
        Ok(out)
    };
    tails.services = per_service("span_duration_seconds")?;
    tails.selfs = per_service("span_self_seconds")?;
    let key = |l: &Labels| {
        (l.get("client").cloned().unwrap_or_default(), l.get("server").cloned().unwrap_or_default())
    };
    for (labels, now) in read(format!("{edge}[{w}s])))"))? {
        tails.edges.insert(key(&labels), Tail { now, base: None });
    }
    for (labels, base) in read(format!("{edge}[{b}s] offset {w}s)))"))? {
        if let Some(t) = tails.edges.get_mut(&key(&labels)) {
            t.base = Some(base);
        }
    }
    // Calls per request: an edge's calls over its caller's own spans.
    let calls = "sum by (client, server) (increase(traces_service_graph_request_total\
                 {connection_type!=\"messaging_system\"}";
    let spans = "sum by (service) (increase(span_duration_seconds_count";
    for (range, is_base) in [(format!("[{w}s]"), false), (format!("[{b}s] offset {w}s"), true)] {
        let served: HashMap<String, f64> = read(format!("{spans}{range}))"))?
            .into_iter()
            .filter(|(_, n)| *n > 0.0)
            .map(|(l, n)| (l.get("service").cloned().unwrap_or_default(), n))
            .collect();
        for (labels, n) in read(format!("{calls}{range}))"))? {
            let edge = key(&labels);
            let Some(per) = served.get(&edge.0).map(|s| n / s) else { continue };
            let entry = tails.calls_per_request.entry(edge).or_insert(Tail { now: 1.0, base: None });
            if is_base {
                entry.base = Some(per);
            } else {
                entry.now = per;
            }
        }
    }
    Ok(tails)
}
