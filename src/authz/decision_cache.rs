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

use std::collections::HashMap;
use std::sync::Mutex;

use super::input_refs::InputKeys;

/// Most decisions kept; when full, the cache starts over (cheap, and a workload with
/// more distinct inputs than this gains little from any policy of eviction).
pub const CAPACITY: usize = 4096;

/// Inputs longer than this (long paths, big claims) are decided but not remembered: with
/// [`CAPACITY`] the cache holds at most 4 MiB of keys, whatever callers send.
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

/// Decisions of type `D` by input text.
pub struct DecisionCache<D> {
    decisions: Mutex<HashMap<String, D>>,
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
            decisions: Mutex::new(HashMap::new()),
        })
    }

    /// The decision for `input` (its JSON text): remembered, or made by `decide` now
    /// and remembered when `keep` says it may be (not an evaluation error).
    pub fn decide(
        &self,
        input: String,
        decide: impl FnOnce() -> D,
        keep: impl FnOnce(&D) -> bool,
    ) -> D {
        if let Some(d) = self.lock().get(&input) {
            return d.clone();
        }
        let decision = decide();
        if input.len() <= MAX_INPUT_BYTES && keep(&decision) {
            let mut map = self.lock();
            if map.len() >= CAPACITY {
                map.clear();
            }
            map.insert(input, decision.clone());
        }
        decision
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, D>> {
        self.decisions.lock().unwrap_or_else(|p| p.into_inner())
    }
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
    fn a_decision_is_made_once_per_input_and_errors_are_not_kept() {
        let c = DecisionCache::<Decision>::for_policy(["package a"], &keys(&["path"])).unwrap();
        let mut calls = 0;
        for _ in 0..3 {
            c.decide(
                "{\"path\":\"/\"}".into(),
                || {
                    calls += 1;
                    Allow
                },
                keep,
            );
        }
        assert_eq!(calls, 1);
        c.decide("{\"path\":\"/x\"}".into(), || Failed, keep);
        assert_eq!(c.len(), 1, "an evaluation error is not remembered");
    }

    #[test]
    fn the_cache_stays_bounded() {
        let c = DecisionCache::<Decision>::for_policy(["package a"], &keys(&["path"])).unwrap();
        for i in 0..(CAPACITY * 2 + 7) {
            c.decide(format!("{{\"path\":\"/{i}\"}}"), || Allow, keep);
        }
        assert!(c.len() <= CAPACITY);
        let long = format!("{{\"path\":\"/{}\"}}", "a".repeat(MAX_INPUT_BYTES));
        let before = c.len();
        c.decide(long, || Allow, keep);
        assert_eq!(c.len(), before, "a long input is decided, not remembered");
    }
}
