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

/// Inputs with more text than this (long paths, big claims) are decided but not
/// remembered: with [`CAPACITY`] the cache holds at most about 4 MiB of inputs, whatever
/// callers send.
pub const MAX_INPUT_BYTES: usize = 1024;

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
pub struct DecisionCache<D> {
    hasher: RandomState,
    inner: Mutex<Inner<D>>,
}

struct Inner<D> {
    decisions: HashMap<u64, (Value, D)>,
    /// Hashes of inputs decided once and not remembered yet.
    seen_once: HashSet<u64>,
}

impl<D> std::fmt::Debug for DecisionCache<D> {
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
        deterministic.then(|| Self {
            hasher: RandomState::new(),
            inner: Mutex::new(Inner {
                decisions: HashMap::new(),
                seen_once: HashSet::new(),
            }),
        })
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
        let key = state.finish();
        if let Some((seen, d)) = self.lock().decisions.get(&key) {
            if same(seen, input) {
                return d.clone();
            }
        }
        let decision = decide();
        if bytes <= MAX_INPUT_BYTES && keep(&decision) {
            let mut inner = self.lock();
            if inner.seen_once.remove(&key) {
                if inner.decisions.len() >= CAPACITY {
                    inner.decisions.clear();
                }
                inner
                    .decisions
                    .insert(key, (input.clone(), decision.clone()));
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<D>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Hashes `v` into `state`; returns about how many bytes of text `v` holds (strings and
/// numbers as written, a byte per other node).
fn feed(v: &Value, state: &mut impl Hasher) -> usize {
    std::mem::discriminant(v).hash(state);
    match v {
        Value::Null | Value::Undefined => 1,
        Value::Bool(b) => {
            b.hash(state);
            1
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
            1 + items.iter().map(|i| feed(i, state)).sum::<usize>()
        }
        Value::Set(items) => {
            items.len().hash(state);
            1 + items.iter().map(|i| feed(i, state)).sum::<usize>()
        }
        Value::Object(fields) => {
            fields.len().hash(state);
            1 + fields
                .iter()
                .map(|(k, v)| feed(k, state) + feed(v, state))
                .sum::<usize>()
        }
    }
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
        let c =
            DecisionCache::<Decision>::for_policy(["package a"], &keys(&["jwt_claims"])).unwrap();
        let mut calls = 0;
        let mut decide = |input: serde_json::Value| {
            c.decide(
                &Value::from(input),
                || {
                    calls += 1;
                    Allow
                },
                keep,
            );
        };
        let known = serde_json::json!({"c": {"exp": 1, "aud": ["a", "b"]}});
        for _ in 0..3 {
            decide(known.clone());
        }
        for other in [
            serde_json::json!({"c": {"exp": 1, "aud": ["b", "a"]}}),
            serde_json::json!({"c": {"exp": 1.5, "aud": ["a", "b"]}}),
            serde_json::json!({"c": {"exp": "1", "aud": ["a", "b"]}}),
            serde_json::json!({"c": {"exp": 1, "aud": ["a", "b"], "x": null}}),
            serde_json::json!({"c": {"exp": 1, "aud": ["a", "b", ""]}}),
            serde_json::json!({"c": {"exp": 1, "aud": "a"}}),
        ] {
            decide(other);
        }
        assert_eq!(calls, 2 + 6, "only the known input hit");
        let (one, one_float) = (serde_json::json!(1), serde_json::json!(1.0));
        assert_eq!(
            same(&Value::from(one.clone()), &Value::from(one_float.clone())),
            serde_json::to_string(&Value::from(one)).unwrap()
                == serde_json::to_string(&Value::from(one_float)).unwrap(),
            "numbers are one input only when written the same"
        );
    }

    #[test]
    fn the_cache_stays_bounded() {
        let c = DecisionCache::<Decision>::for_policy(["package a"], &keys(&["path"])).unwrap();
        for i in 0..(CAPACITY * 2 + 7) {
            for _ in 0..2 {
                c.decide(&doc(&format!("/{i}")), || Allow, keep);
            }
        }
        assert!(c.len() <= CAPACITY);
        assert!(c.lock().seen_once.len() <= CAPACITY);
        let long = doc(&format!("/{}", "a".repeat(MAX_INPUT_BYTES)));
        let before = c.len();
        for _ in 0..3 {
            c.decide(&long, || Allow, keep);
        }
        assert_eq!(c.len(), before, "a long input is decided, not remembered");
    }
}
