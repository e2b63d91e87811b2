//! Silences in Alertmanager's API v2 shape, persisted in the store. A silence mutes the alerts
//! its matchers all match between `startsAt` and `endsAt`; deleting one expires it (it stays
//! listed as expired, as in Alertmanager).

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::matchers::{Matcher, Op};
use super::{parse_rfc3339, rfc3339, Labels};
use crate::store::{StateKind, StateStore, StoreError};

/// How long an expired silence is still listed.
const EXPIRED_RETENTION_MS: i64 = 5 * 24 * 3600 * 1000;

/// A matcher as the API carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiMatcher {
    /// Label name.
    pub name: String,
    /// Value or regex.
    pub value: String,
    /// Whether `value` is a regex.
    pub is_regex: bool,
    /// `=`/`=~` (true, the default) or `!=`/`!~`.
    #[serde(default = "yes")]
    pub is_equal: bool,
}

fn yes() -> bool {
    true
}

fn compile(m: &ApiMatcher) -> Result<Matcher, String> {
    let op = match (m.is_regex, m.is_equal) {
        (false, true) => Op::Equal,
        (false, false) => Op::NotEqual,
        (true, true) => Op::Regex,
        (true, false) => Op::NotRegex,
    };
    Matcher::new(&m.name, op, &m.value)
}

/// A silence as posted.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PostableSilence {
    /// Set to update an existing silence.
    #[serde(default)]
    pub id: Option<String>,
    /// What it mutes.
    pub matchers: Vec<ApiMatcher>,
    /// RFC 3339.
    pub starts_at: String,
    /// RFC 3339.
    pub ends_at: String,
    /// Who.
    #[serde(default)]
    pub created_by: String,
    /// Why.
    #[serde(default)]
    pub comment: String,
}

/// A stored silence (times in ms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    id: String,
    matchers: Vec<ApiMatcher>,
    starts_at: i64,
    ends_at: i64,
    updated_at: i64,
    created_by: String,
    comment: String,
}

impl Silence {
    fn state(&self, now: i64) -> &'static str {
        if now < self.starts_at {
            "pending"
        } else if now < self.ends_at {
            "active"
        } else {
            "expired"
        }
    }

    fn compiled(&self) -> Vec<Matcher> {
        self.matchers.iter().filter_map(|m| compile(m).ok()).collect()
    }

    /// The API's gettable form.
    pub fn to_json(&self, now: i64) -> Value {
        json!({
            "id": self.id,
            "status": {"state": self.state(now)},
            "updatedAt": rfc3339(self.updated_at),
            "matchers": self.matchers,
            "startsAt": rfc3339(self.starts_at),
            "endsAt": rfc3339(self.ends_at),
            "createdBy": self.created_by,
            "comment": self.comment,
        })
    }
}

/// Why a silence was refused.
#[derive(Debug, thiserror::Error)]
pub enum SilenceError {
    /// The silence is invalid (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// A limit on silences is reached (HTTP 429, as Alertmanager).
    #[error("{0}")]
    Limit(String),
    /// No silence has that id (HTTP 404).
    #[error("silence {0} not found")]
    NotFound(String),
    /// The store failed (HTTP 500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What silences may cost.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most silences kept (expired ones still listed included).
    pub max_silences: usize,
    /// Largest silence, as its stored JSON.
    pub max_size_bytes: usize,
}

/// Most matchers one silence may have.
pub const MAX_MATCHERS: usize = 32;

/// Every silence, with their compiled matchers.
#[derive(Debug)]
pub struct Silences {
    store: Arc<dyn StateStore>,
    limits: Limits,
    all: RwLock<BTreeMap<String, (Silence, Vec<Matcher>)>>,
    /// What muted each alert (by fingerprint) when last asked, valid while no silence was
    /// written and no silence started or ended since (Alertmanager keeps the same per-alert
    /// cache): a flush asks for every alert of its group every group interval.
    cache: parking_lot::Mutex<MuteCache>,
}

#[derive(Debug, Default)]
struct MuteCache {
    /// Bumped by every write: entries of an older version are stale.
    version: u64,
    /// Fingerprint → (version, valid until (ms, exclusive), the muting silences).
    entries: std::collections::HashMap<u64, (u64, i64, Vec<String>)>,
}

impl Silences {
    /// Loads the stored silences.
    pub fn load(store: Arc<dyn StateStore>, limits: Limits) -> Result<Silences, StoreError> {
        let mut all = BTreeMap::new();
        for (k, v) in store.state(StateKind::Silence, b"")? {
            match serde_json::from_slice::<Silence>(&v) {
                Ok(s) => {
                    let m = s.compiled();
                    all.insert(s.id.clone(), (s, m));
                }
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(&k), error = %e, "ignoring unreadable silence")
                }
            }
        }
        Ok(Silences { store, limits, all: RwLock::new(all), cache: Default::default() })
    }

    /// Creates or updates a silence; returns its id.
    pub fn upsert(&self, p: PostableSilence, now: i64) -> Result<String, SilenceError> {
        let invalid = |m: String| SilenceError::Invalid(m);
        let starts_at = parse_rfc3339(&p.starts_at)
            .ok_or_else(|| invalid(format!("startsAt: not an RFC 3339 time: {:?}", p.starts_at)))?;
        let ends_at = parse_rfc3339(&p.ends_at)
            .ok_or_else(|| invalid(format!("endsAt: not an RFC 3339 time: {:?}", p.ends_at)))?;
        if ends_at < starts_at {
            return Err(invalid("failed to create silence: start time must be before end time".into()));
        }
        if ends_at <= now {
            return Err(invalid("failed to create silence: end time can't be in the past".into()));
        }
        if p.matchers.is_empty() {
            return Err(invalid("silence invalid: at least one matcher required".into()));
        }
        if p.matchers.len() > MAX_MATCHERS {
            return Err(invalid(format!(
                "silence invalid: {} matchers, more than the limit of {MAX_MATCHERS}",
                p.matchers.len()
            )));
        }
        let mut compiled = Vec::new();
        for m in &p.matchers {
            if !super::rules::valid_label_name(&m.name) {
                return Err(invalid(format!("silence invalid: invalid label name {:?}", m.name)));
            }
            compiled.push(compile(m).map_err(|e| invalid(format!("silence invalid: {e}")))?);
        }
        if compiled.iter().all(|m| m.matches(&Labels::new())) {
            return Err(invalid(
                "silence invalid: at least one matcher must not match the empty string".into(),
            ));
        }
        let mut all = self.all.write();
        let id = match p.id.filter(|id| !id.is_empty()) {
            Some(id) if !all.contains_key(&id) => return Err(SilenceError::NotFound(id)),
            Some(id) => id,
            None => {
                forget_expired(&*self.store, &mut all, now);
                if all.len() >= self.limits.max_silences {
                    return Err(SilenceError::Limit(format!(
                        "failed to create silence: the limit of {} silences (alerting.max_silences) is reached; \
                         expire or delete some first",
                        self.limits.max_silences
                    )));
                }
                new_id(now, all.len())
            }
        };
        // A new silence starting in the past starts now, as in Alertmanager.
        let starts_at = if all.contains_key(&id) { starts_at } else { starts_at.max(now) };
        let s = Silence {
            id: id.clone(),
            matchers: p.matchers,
            starts_at,
            ends_at,
            updated_at: now,
            created_by: p.created_by,
            comment: p.comment,
        };
        let size = serde_json::to_vec(&s).map_or(usize::MAX, |v| v.len());
        if size > self.limits.max_size_bytes {
            return Err(invalid(format!(
                "silence invalid: {size} bytes, more than alerting.max_silence_size_bytes ({})",
                self.limits.max_size_bytes
            )));
        }
        self.persist(&s)?;
        all.insert(id.clone(), (s, compiled));
        self.invalidate();
        Ok(id)
    }

    /// Expires a silence now.
    pub fn expire(&self, id: &str, now: i64) -> Result<(), SilenceError> {
        let mut all = self.all.write();
        let Some((s, _)) = all.get_mut(id) else { return Err(SilenceError::NotFound(id.to_owned())) };
        if s.ends_at > now {
            s.ends_at = now;
            s.starts_at = s.starts_at.min(now);
            s.updated_at = now;
            let s = s.clone();
            self.persist(&s)?;
            self.invalidate();
        }
        Ok(())
    }

    fn persist(&self, s: &Silence) -> Result<(), StoreError> {
        let value = serde_json::to_vec(s).ok();
        self.store.write_state(StateKind::Silence, &[(s.id.as_bytes().to_vec(), value)])
    }

    /// One silence in the API's form.
    pub fn get(&self, id: &str, now: i64) -> Option<Value> {
        self.all.read().get(id).map(|(s, _)| s.to_json(now))
    }

    /// Every silence in the API's form; expired ones past their retention are forgotten.
    pub fn list(&self, now: i64) -> Vec<Value> {
        let mut all = self.all.write();
        forget_expired(&*self.store, &mut all, now);
        all.values().map(|(s, _)| s.to_json(now)).collect()
    }

    /// The ids of the active silences that mute `labels` (an alert of fingerprint `fp`),
    /// from the cache while it is valid.
    pub fn muting(&self, fp: u64, labels: &Labels, now: i64) -> Vec<String> {
        {
            let cache = self.cache.lock();
            if let Some((version, until, ids)) = cache.entries.get(&fp) {
                if *version == cache.version && now < *until {
                    return ids.clone();
                }
            }
        }
        let all = self.all.read();
        let version = self.cache.lock().version;
        // The answer holds until the next start or end of any silence.
        let until = all
            .values()
            .flat_map(|(s, _)| [s.starts_at, s.ends_at])
            .filter(|&t| t > now)
            .min()
            .unwrap_or(i64::MAX);
        let ids: Vec<String> = all
            .values()
            .filter(|(s, m)| s.state(now) == "active" && m.iter().all(|m| m.matches(labels)))
            .map(|(s, _)| s.id.clone())
            .collect();
        drop(all);
        let mut cache = self.cache.lock();
        if cache.version == version {
            cache.entries.insert(fp, (version, until, ids.clone()));
        }
        ids
    }

    /// Forgets the cached answers (silences changed, or alerts were cleaned up).
    pub fn invalidate(&self) {
        let mut cache = self.cache.lock();
        cache.version += 1;
        cache.entries.clear();
    }
}

/// Forgets the silences expired for longer than they are listed.
fn forget_expired(store: &dyn StateStore, all: &mut BTreeMap<String, (Silence, Vec<Matcher>)>, now: i64) {
    let forgotten: Vec<String> = all
        .values()
        .filter(|(s, _)| s.ends_at.saturating_add(EXPIRED_RETENTION_MS) < now)
        .map(|(s, _)| s.id.clone())
        .collect();
    if !forgotten.is_empty() {
        let deletes: Vec<_> = forgotten.iter().map(|id| (id.as_bytes().to_vec(), None)).collect();
        if store.write_state(StateKind::Silence, &deletes).is_ok() {
            forgotten.iter().for_each(|id| {
                all.remove(id);
            });
        }
    }
}

/// A UUID-shaped id (version 4 layout) from the time, a counter and the process.
fn new_id(now: i64, n: usize) -> String {
    let seed = format!("{now}:{n}:{}:{:?}", std::process::id(), std::time::Instant::now());
    let a = xxhash_rust::xxh3::xxh3_128(seed.as_bytes());
    let a = (a & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let h = format!("{a:032x}");
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}
