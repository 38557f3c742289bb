//! Decisions of a deterministic Rego policy, remembered by the input they were made for.
//!
//! A policy whose result depends only on its input and its own files gives the same
//! decision for the same input: services see the same few callers, methods and paths
//! again and again (probes, the same API calls), so evaluating once per distinct input
//! is enough. The input is built with only the keys the policy reads (see
//! `input_refs`), so the key is exactly what the decision depends on. A policy that
//! calls a builtin whose result can change between calls (the clock, the network,
//! randomness, certificate checks against the current time) gets no cache; the scan of
//! its text errs on that side. Each compiled policy has its own cache, so a reload
//! starts empty. Evaluation errors (a time limit hit) are never remembered.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Mutex;

use regorus::Value;

use super::input_refs::InputKeys;

/// Most decisions kept; when full, the cache starts over (cheap, and a workload with
/// more distinct inputs than this gains little from any policy of eviction).
pub const CAPACITY: usize = 4096;

/// Inputs that take more memory than this (see [`feed`]: long paths, many query
/// parameters, big claims) are decided but not remembered.
pub const MAX_INPUT_BYTES: usize = 4096;

/// Memory all remembered inputs may take together, as [`feed`] counts it; past it the
/// cache starts over. Whatever callers send, the inputs kept take about this at most (a
/// seed-style input of three keys counts about 450 bytes, so [`CAPACITY`] of them fit).
pub const MAX_KEPT_BYTES: usize = 4 * 1024 * 1024;

/// Builtins (and prefixes) whose result is not a function of their arguments.
const NOT_DETERMINISTIC: &[&str] = &[
    "time.now_ns",
    "http.send",
    "rand.",
    "uuid.",
    "opa.runtime",
    "net.lookup_ip_addr",
    "io.jwt.decode_verify",
    "parse_and_verify",
];

/// Decisions of type `D` by input document.
///
/// Kept by a keyed SipHash of the document (one walk over it, no text made), with the
/// document itself to compare on a hit: callers cannot aim inputs at one slot without
/// the process's key, and two inputs whose hashes meet (2^-64) only cost a decision that
/// is made again.
///
/// A decision is remembered the second time its input is seen: the first time only the
/// hash is noted. Traffic where every request is new (an ID in every path) then costs a
/// hash noted per request, not a document kept and later freed, and a repeated input
/// costs one evaluation more before it hits.
pub struct DecisionCache<D, S = RandomState> {
    hasher: S,
    inner: Mutex<Inner<D>>,
}

struct Inner<D> {
    decisions: HashMap<u64, (Value, D)>,
    /// What the remembered inputs take, as [`feed`] counts it.
    kept_bytes: usize,
    /// Hashes of inputs decided once and not remembered yet.
    seen_once: HashSet<u64>,
}

impl<D, S> std::fmt::Debug for DecisionCache<D, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionCache").finish_non_exhaustive()
    }
}

impl<D: Clone> DecisionCache<D> {
    /// A cache for the policy made of `texts`, when its decisions can be remembered: it
    /// calls no builtin on the list and reads only some input keys (a policy that reads
    /// the whole input sees every header, which rarely repeats).
    pub fn for_policy<'a>(
        texts: impl IntoIterator<Item = &'a str>,
        keys: &InputKeys,
    ) -> Option<Self> {
        if matches!(keys, InputKeys::All) {
            return None;
        }
        let deterministic = texts
            .into_iter()
            .all(|t| NOT_DETERMINISTIC.iter().all(|b| !t.contains(b)));
        deterministic.then(|| Self::with_hasher(RandomState::new()))
    }
}

impl<D: Clone, S: BuildHasher> DecisionCache<D, S> {
    fn with_hasher(hasher: S) -> Self {
        Self {
            hasher,
            inner: Mutex::new(Inner {
                decisions: HashMap::new(),
                kept_bytes: 0,
                seen_once: HashSet::new(),
            }),
        }
    }

    /// The decision for `input`: remembered, or made by `decide` now (and remembered if
    /// `input` was seen before and `keep` says it may be: not an evaluation error).
    pub fn decide(
        &self,
        input: &Value,
        decide: impl FnOnce() -> D,
        keep: impl FnOnce(&D) -> bool,
    ) -> D {
        let mut state = self.hasher.build_hasher();
        let bytes = feed(input, &mut state);
        if bytes > MAX_INPUT_BYTES {
            // Never remembered, so never found.
            return decide();
        }
        let key = state.finish();
        // Compared outside the lock (taken out by reference count).
        let found = self.lock().decisions.get(&key).cloned();
        if let Some((seen, d)) = found {
            if same(&seen, input) {
                return d;
            }
        }
        let decision = decide();
        if keep(&decision) {
            let mut inner = self.lock();
            if inner.seen_once.remove(&key) {
                if inner.decisions.len() >= CAPACITY || inner.kept_bytes + bytes > MAX_KEPT_BYTES {
                    inner.decisions.clear();
                    inner.kept_bytes = 0;
                }
                let old = inner
                    .decisions
                    .insert(key, (input.clone(), decision.clone()));
                inner.kept_bytes += bytes;
                if let Some((old, _)) = old {
                    // Two inputs met at one hash: the newer one stays.
                    inner.kept_bytes -= feed(&old, &mut NoHash).min(inner.kept_bytes);
                }
            } else {
                if inner.seen_once.len() >= CAPACITY {
                    inner.seen_once.clear();
                }
                inner.seen_once.insert(key);
            }
        }
        decision
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().decisions.len()
    }

    #[cfg(test)]
    fn kept_bytes(&self) -> usize {
        self.lock().kept_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<D>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What one value of a document takes beyond its text: the value itself where its
/// parent holds it, and the reference counts and allocation header of what it points to.
const NODE_BYTES: usize = std::mem::size_of::<Value>() + 32;

/// Hashes `v` into `state`; returns about how much memory `v` takes: [`NODE_BYTES`] per
/// value, plus the text of strings and numbers. An empty string or list still costs its
/// node, so a query of thousands of empty parameters counts as what it takes.
fn feed(v: &Value, state: &mut impl Hasher) -> usize {
    std::mem::discriminant(v).hash(state);
    NODE_BYTES
        + match v {
            Value::Null | Value::Undefined => 0,
            Value::Bool(b) => {
                b.hash(state);
                0
            }
            Value::Number(n) => {
                let text = number_text(n);
                text.hash(state);
                text.len()
            }
            Value::String(s) => {
                s.hash(state);
                s.len()
            }
            Value::Array(items) => {
                items.len().hash(state);
                items.iter().map(|i| feed(i, state)).sum::<usize>()
            }
            Value::Set(items) => {
                items.len().hash(state);
                items.iter().map(|i| feed(i, state)).sum::<usize>()
            }
            Value::Object(fields) => {
                fields.len().hash(state);
                fields
                    .iter()
                    .map(|(k, v)| feed(k, state) + feed(v, state))
                    .sum::<usize>()
            }
        }
}

/// A hasher that keeps nothing: [`feed`] for the size alone (and, in tests, every
/// input at one hash).
#[derive(Default)]
struct NoHash;

impl Hasher for NoHash {
    fn finish(&self) -> u64 {
        0
    }

    fn write(&mut self, _: &[u8]) {}
}

/// Whether two documents are the same input: as `Value`'s equality, except that numbers
/// must be written the same (the engine takes 1 and 1.0 as equal, and a policy could
/// still tell them apart by formatting them).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => number_text(x) == number_text(y),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y.iter()).all(|(a, b)| same(a, b))
        }
        (Value::Set(x), Value::Set(y)) => {
            x.len() == y.len() && x.iter().zip(y.iter()).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|((ka, va), (kb, vb))| same(ka, kb) && same(va, vb))
        }
        (Value::Array(_) | Value::Set(_) | Value::Object(_), _) => false,
        _ => a == b,
    }
}

/// A number as JSON writes it (only JWT claims carry numbers).
fn number_text(n: &impl serde::Serialize) -> String {
    serde_json::to_string(n).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decision, or an evaluation error (never kept).
    #[derive(Clone, Debug, PartialEq)]
    enum Decision {
        Allow,
        Deny,
        Failed,
    }
    use Decision::*;
    fn keep(d: &Decision) -> bool {
        *d != Failed
    }

    /// An input document with one key, `path`.
    fn doc(path: &str) -> Value {
        let mut map = std::collections::BTreeMap::new();
        map.insert(Value::from("path"), Value::from(path));
        Value::from(map)
    }

    fn keys(k: &[&str]) -> InputKeys {
        InputKeys::Only(k.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn impure_policies_and_whole_input_readers_get_no_cache() {
        let pure = "package a\nallow if input.path == \"/\"";
        let cache = |texts: &[&str], k: &InputKeys| {
            DecisionCache::<Decision>::for_policy(texts.iter().copied(), k).is_some()
        };
        assert!(cache(&[pure], &keys(&["path"])));
        assert!(!cache(&[pure], &InputKeys::All));
        let clock = "package a\nallow if time.now_ns() > 0";
        assert!(!cache(&[pure, clock], &keys(&["path"])));
        let net = "package a\nallow if http.send({\"method\": \"get\", \"url\": \"http://x\"}).status_code == 200";
        assert!(!cache(&[net], &keys(&[])));
    }

    #[test]
    fn a_decision_is_remembered_from_the_second_time_and_errors_are_not_kept() {
        let c = DecisionCache::<Decision>::for_policy(["package a"], &keys(&["path"])).unwrap();
        let mut calls = 0;
        for _ in 0..4 {
            c.decide(
                &doc("/"),
                || {
                    calls += 1;
                    Allow
                },
                keep,
            );
        }
        assert_eq!(
            calls, 2,
            "decided when first and second seen, then remembered"
        );
        for _ in 0..3 {
            c.decide(&doc("/x"), || Failed, keep);
        }
        assert_eq!(c.len(), 1, "an evaluation error is not remembered");
    }

    #[test]
    fn inputs_are_told_apart_exactly() {
        // Every input at one hash: only the comparison tells them apart.
        let c = DecisionCache::<Decision, std::hash::BuildHasherDefault<NoHash>>::with_hasher(
            Default::default(),
        );
        let known = Value::from(serde_json::json!({"c": {"exp": 1, "aud": ["a", "b"]}}));
        for _ in 0..2 {
            c.decide(&known, || Allow, keep);
        }
        assert_eq!(c.decide(&known, || Deny, keep), Allow, "remembered");
        for other in [
            serde_json::json!({"c": {"exp": 1, "aud": ["b", "a"]}}),
            serde_json::json!({"c": {"exp": 1.5, "aud": ["a", "b"]}}),
            serde_json::json!({"c": {"exp": 2, "aud": ["a", "b"]}}),
            serde_json::json!({"c": {"exp": "1", "aud": ["a", "b"]}}),
            serde_json::json!({"c": {"exp": 1, "aud": ["a", "b"], "x": null}}),
            serde_json::json!({"c": {"exp": 1, "aud": ["a", "b", ""]}}),
            serde_json::json!({"c": {"exp": 1, "aud": "a"}}),
            serde_json::json!({"c": {"exp": 1, "aud": {"a": "b"}}}),
            serde_json::json!({"c": {"exp": 1}}),
            serde_json::json!({"c": null}),
        ] {
            let other = Value::from(other);
            assert_eq!(c.decide(&other, || Deny, keep), Deny, "{other}");
        }
        assert!(!same(&Value::Null, &Value::Undefined));
        assert!(same(&known, &known.clone()));
    }

    #[test]
    fn the_cache_stays_bounded() {
        let c = DecisionCache::<Decision>::for_policy(["package a"], &keys(&["path"])).unwrap();
        assert!(
            feed(&doc("/v1/users/42"), &mut NoHash) * CAPACITY <= MAX_KEPT_BYTES,
            "a small input fits CAPACITY times"
        );
        for i in 0..(CAPACITY * 2 + 7) {
            for _ in 0..2 {
                c.decide(&doc(&format!("/{i}")), || Allow, keep);
            }
        }
        assert!(c.len() <= CAPACITY);
        assert!(c.lock().seen_once.len() <= CAPACITY);
        assert!(c.kept_bytes() <= MAX_KEPT_BYTES);
        let before = c.len();
        // A long path, and a thousand empty query values (little text, many values).
        let long = doc(&format!("/{}", "a".repeat(MAX_INPUT_BYTES)));
        let mut empties = std::collections::BTreeMap::new();
        empties.insert(
            Value::from("parsed_query"),
            Value::from(vec![Value::from(""); 1_000]),
        );
        for input in [long, Value::from(empties)] {
            for _ in 0..3 {
                c.decide(&input, || Allow, keep);
            }
            assert_eq!(c.len(), before, "a large input is decided, not remembered");
        }
    }

    /// Inputs that differ in size or content all the way up to the limit keep the
    /// total under its bound.
    #[test]
    fn the_memory_budget_holds_for_inputs_at_the_limit() {
        let c = DecisionCache::<Decision>::for_policy(["package a"], &keys(&["path"])).unwrap();
        let pad = MAX_INPUT_BYTES - feed(&doc(""), &mut NoHash) - 8;
        for i in 0..(CAPACITY + 3) {
            let input = doc(&format!("{i:08}{}", "x".repeat(pad)));
            for _ in 0..2 {
                c.decide(&input, || Allow, keep);
            }
            assert!(c.kept_bytes() <= MAX_KEPT_BYTES);
        }
        assert!(c.len() * MAX_INPUT_BYTES <= MAX_KEPT_BYTES);
        assert!(c.len() > 0);
    }
}
