//! Rego policies evaluated in-process (`rego: {policy: [...], query: data.authz.allow}`),
//! with the `regorus` interpreter instead of an OPA process. This module owns: loading and
//! compiling `.rego` files (Rego v1 and v0 syntax), the policy input built from one
//! request ([`RequestView`] -> [`Input`]), turning what the policy returned into a typed
//! [`Decision`], and reloading the files when they change ([`RegoAuthorizer`]).
//!
//! Everything here fails closed: a policy that errors, returns nothing (undefined) or
//! returns a value of the wrong shape denies the request, with a [`DenyReason`] that says
//! which of these happened.
//!
//! # Rego v0 and v1
//!
//! OPA 1.0 made v1 syntax (`allow if { ... }`, `contains`, `in`, `every` as keywords) the
//! default, but most existing policies, and the seed documents', are v0
//! (`allow { ... }`, `default allow = false`). A file is parsed as v1 first; if that fails
//! it is parsed as v0, where `import rego.v1` (or `future.keywords`) still switches that
//! file to v1 as OPA does. Only a file that neither parses is refused, and the error shows
//! both attempts. A file that parses both ways means the same in both: v1 only adds
//! keywords and requires `if`/`contains`, so a v0 file that v1 accepts has no construct
//! whose meaning changed.
//!
//! # Input
//!
//! One input carries both shapes users already have policies for (see [`Input`]).

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;

pub use super::input_refs::InputKeys;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::{Map, Value as Json};
use tokio_util::sync::CancellationToken;

use super::decision_cache::DecisionCache;
use super::idle::Idle;
use super::rego_recursion::function_cycle;
pub use super::rego_vm::NotCompiled;
use super::rego_vm::{vm_safe, VmPool};
use crate::watch::FileWatch;

/// Longest a single decision may evaluate. A policy that loops over a large input or
/// recurses deeply is stopped here and the request denied, instead of holding a runtime
/// worker. Small policies take microseconds.
const EVAL_TIME_LIMIT: Duration = Duration::from_millis(100);

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RegoError {
    #[error("rego: no policy file given")]
    NoFiles,
    #[error("rego: query {query:?} must name a rule under `data`, like data.authz.allow")]
    BadQuery { query: String },
    #[error("rego: cannot read policy file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("rego: policy file {path} does not parse as Rego v1: {v1}; nor as Rego v0: {v0}")]
    Syntax {
        path: String,
        v1: String,
        v0: String,
    },
    #[error("rego: policy {files} does not compile for query {query}: {problem}")]
    Compile {
        files: String,
        query: String,
        problem: String,
    },
    #[error("rego: policy reload needs a tokio runtime")]
    NoRuntime,
    #[error("rego: cannot watch policy files for changes: {0}")]
    Watch(String),
}

/// Why one evaluation failed (the request is denied).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    /// The policy failed at run time: conflicting rule values, a time limit, ...
    #[error("{0}")]
    Policy(String),
    /// The result could not be written as JSON.
    #[error("policy result is not JSON: {0}")]
    Result(String),
}

/// Which syntax a policy file was read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// Parsed as Rego v1 (the OPA 1.0 default).
    V1,
    /// v1 did not parse it; parsed as Rego v0 (`allow { ... }`).
    V0,
}

/// One compiled set of policy files and the rule the query names. Immutable: a reload
/// builds a new one and swaps it in whole.
#[derive(Debug)]
pub struct RegoPolicy {
    evaluator: Evaluator,
    query: String,
    files: Vec<(PathBuf, Syntax)>,
    /// The top-level input keys the policy can read: only those are built per request.
    input_keys: InputKeys,
    /// Decisions by input, when the policy is deterministic.
    cache: Option<DecisionCache<Decision>>,
}

impl RegoPolicy {
    /// Reads, parses and compiles `files` for `query` (a rule path such as
    /// `data.authz.allow`). Fails if a file is missing or does not parse, or if the query
    /// names no rule the files define.
    pub fn load(files: &[PathBuf], query: &str) -> Result<Self, RegoError> {
        let sources = files
            .iter()
            .map(|path| {
                std::fs::read_to_string(path)
                    .map(|text| (path.clone(), text))
                    .map_err(|source| RegoError::Read {
                        path: path.display().to_string(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_sources(&sources, query)
    }

    /// As [`RegoPolicy::load`], from policy text already in memory (`(name, text)`).
    pub fn from_sources(sources: &[(PathBuf, String)], query: &str) -> Result<Self, RegoError> {
        install_time_limit();
        if sources.is_empty() {
            return Err(RegoError::NoFiles);
        }
        let query = query.trim();
        if !is_rule_path(query) {
            return Err(RegoError::BadQuery {
                query: query.to_string(),
            });
        }
        let mut engine = regorus::Engine::new();
        let mut files = Vec::with_capacity(sources.len());
        for (path, text) in sources {
            let name = path.display().to_string();
            engine.set_rego_v0(false);
            let syntax = match engine.add_policy(name.clone(), text.clone()) {
                Ok(_) => Syntax::V1,
                Err(v1) => {
                    engine.set_rego_v0(true);
                    match engine.add_policy(name.clone(), text.clone()) {
                        Ok(_) => Syntax::V0,
                        Err(v0) => {
                            return Err(RegoError::Syntax {
                                path: name,
                                v1: v1.to_string(),
                                v0: v0.to_string(),
                            })
                        }
                    }
                }
            };
            files.push((path.clone(), syntax));
        }
        if let Some(function) = function_cycle(engine.get_modules()) {
            return Err(RegoError::Compile {
                files: files_list(&files),
                query: query.to_string(),
                problem: format!(
                    "function {function} may call itself (recursion), which OPA refuses too"
                ),
            });
        }
        // As OPA by default: a builtin that fails (`to_number("abc")`) makes its
        // expression undefined instead of failing the whole evaluation, so policies
        // written for OPA (`not ...` included) decide the same here.
        engine.set_strict_builtin_errors(false);
        let rule: regorus::Rc<str> = query.into();
        let compile_error = |e: anyhow::Error| RegoError::Compile {
            files: files_list(&files),
            query: query.to_string(),
            problem: e.to_string(),
        };
        let compiled = engine
            .compile_with_entrypoint(&rule)
            .map_err(compile_error)?;
        let rule = compiled
            .get_policy_info()
            .map_err(compile_error)?
            .entrypoint_rule
            .to_string();
        let input_keys = InputKeys::of_sources(sources.iter().map(|(_, text)| text.as_str()));
        let cache = DecisionCache::for_policy(sources.iter().map(|(_, t)| t.as_str()), &input_keys);
        let evaluator = match vm_safe(engine.get_modules())
            .and_then(|()| VmPool::compile(&compiled, &rule, time_limit()))
        {
            Ok(vm) => Evaluator::Vm(vm),
            Err(why) => Evaluator::Interpreter(Box::new(Engines::new(engine, rule)), why),
        };
        Ok(Self {
            evaluator,
            query: query.to_string(),
            files,
            input_keys,
            cache,
        })
    }

    /// The top-level input keys this policy can read.
    pub fn input_keys(&self) -> &InputKeys {
        &self.input_keys
    }

    /// The files this policy was compiled from, with the syntax each was read as.
    pub fn files(&self) -> &[(PathBuf, Syntax)] {
        &self.files
    }

    pub fn query(&self) -> &str {
        &self.query
    }

    /// Which engine evaluates this policy.
    pub fn backend(&self) -> Backend {
        match &self.evaluator {
            Evaluator::Vm(_) => Backend::Vm,
            Evaluator::Interpreter(_, why) => Backend::Interpreter(why.clone()),
        }
    }

    /// What the query evaluated to for `input`, as JSON; `None` when it is undefined
    /// (no rule body matched and there is no default).
    pub fn evaluate(&self, input: &Input) -> Result<Option<Json>, EvalError> {
        let out = self.evaluate_value(input)?;
        if out == regorus::Value::Undefined {
            return Ok(None);
        }
        result_json(&out).map(Some)
    }

    /// What the query evaluated to, as the interpreter's value (`Undefined` when it is).
    fn evaluate_value(&self, input: &Input) -> Result<regorus::Value, EvalError> {
        let value = input.doc.clone();
        match &self.evaluator {
            Evaluator::Vm(vm) => vm.eval(value),
            Evaluator::Interpreter(engines, _) => engines.eval(value),
        }
        .map_err(|e| EvalError::Policy(e.to_string()))
    }

    /// Evaluates and decides; never fails: errors deny. A deterministic policy decides
    /// each distinct input once (see [`DecisionCache`]).
    pub fn decide(&self, input: &Input) -> Decision {
        let evaluate = || match self.evaluate_value(input) {
            Ok(value) => Decision::from_value(&value),
            Err(e) => Decision::deny(DenyReason::Evaluation(e.to_string())),
        };
        match &self.cache {
            Some(cache) => cache.decide(&input.doc, evaluate, |d| {
                !matches!(
                    d,
                    Decision::Deny {
                        reason: DenyReason::Evaluation(_),
                        ..
                    }
                )
            }),
            None => evaluate(),
        }
    }

    /// Whether decisions are remembered (the policy is deterministic and reads only
    /// some input keys).
    pub fn caches_decisions(&self) -> bool {
        self.cache.is_some()
    }
}

/// Which engine evaluates a policy: regorus's VM where it decides as OPA does (see
/// `rego_vm`), its interpreter otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Vm,
    /// With the reason the VM was not used.
    Interpreter(NotCompiled),
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Vm => f.write_str("compiled (regorus VM)"),
            Backend::Interpreter(why) => write!(f, "interpreted (regorus interpreter; {why})"),
        }
    }
}

#[derive(Debug)]
enum Evaluator {
    Vm(VmPool),
    /// Boxed: an engine is large, and a policy holds one evaluator.
    Interpreter(Box<Engines>, NotCompiled),
}

/// Interpreters ready to evaluate one compiled policy, kept between decisions.
///
/// `CompiledPolicy::eval_with_input` builds an interpreter for every evaluation and drops
/// it afterwards (6% of the instructions of evaluating the bench's three-line policy).
/// Here an engine evaluates many inputs in turn: regorus resets its evaluation state at
/// the start of every `eval_rule` (its documented way to evaluate one loaded policy with
/// several inputs), kept in an [`Idle`] pool.
///
/// Unlike an engine made from a `CompiledPolicy`, the engine the policy was compiled in
/// has `data` in the document `with` modifies, so a rule reached through `with input...`
/// evaluates (as OPA does) instead of failing with "previous value is not an object".
struct Engines {
    /// The engine the policy was compiled in: every engine handed out is a clone of it.
    template: regorus::Engine,
    /// The canonical path of the rule to evaluate (`data.authz.allow`).
    rule: String,
    idle: Idle<regorus::Engine>,
}

impl std::fmt::Debug for Engines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines")
            .field("rule", &self.rule)
            .finish_non_exhaustive()
    }
}

impl Engines {
    fn new(template: regorus::Engine, rule: String) -> Self {
        Self {
            template,
            rule,
            idle: Idle::new(),
        }
    }

    fn eval(&self, input: regorus::Value) -> anyhow::Result<regorus::Value> {
        self.idle.with(
            || self.template.clone(),
            |engine| {
                engine.set_input(input);
                engine.eval_rule(self.rule.clone())
            },
        )
    }
}

/// What a policy returned, as JSON.
fn result_json(value: &regorus::Value) -> Result<Json, EvalError> {
    serde_json::to_value(value).map_err(|e| EvalError::Result(e.to_string()))
}

/// The input JSON as the interpreter's value type: what `regorus::Value`'s
/// `Deserialize` makes of it, without going through serde for the strings, lists and
/// objects an input is made of (40% fewer instructions, one allocation per string
/// instead of two). Numbers, and an object that serde_json could mean as an
/// arbitrary-precision number, are handed to serde as before.
fn to_rego_value(json: &Json) -> Result<regorus::Value, String> {
    use regorus::Value;
    Ok(match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::String(s) => Value::String(s.as_str().into()),
        Json::Array(items) => Value::from(
            items
                .iter()
                .map(to_rego_value)
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Json::Object(map) => object_to_rego(map)?,
        Json::Number(_) => serde_via_deserialize(json)?,
    })
}

/// [`to_rego_value`] of a JSON object (JWT claims).
fn object_to_rego(map: &Map<String, Json>) -> Result<regorus::Value, String> {
    use regorus::Value;
    if map.is_empty() {
        return Ok(Value::new_object());
    }
    if map.contains_key(SERDE_JSON_NUMBER) {
        return serde_via_deserialize(&Json::Object(map.clone()));
    }
    let mut object = std::collections::BTreeMap::new();
    for (key, value) in map {
        object.insert(Value::String(key.as_str().into()), to_rego_value(value)?);
    }
    Ok(Value::from(object))
}

/// serde_json's marker for an arbitrary-precision number (`{"$serde_json::private::Number":
/// "1e400"}`), which `regorus::Value`'s deserializer turns into a number.
const SERDE_JSON_NUMBER: &str = "$serde_json::private::Number";

fn serde_via_deserialize(json: &Json) -> Result<regorus::Value, String> {
    serde::Deserialize::deserialize(json).map_err(|e: serde_json::Error| e.to_string())
}

/// `data.a.b.rule`: `data` and at least two identifier components (a package and a
/// rule). Bracketed components and other query forms are not accepted: the query is a
/// rule to evaluate, as OPA-Envoy's `path` is.
fn is_rule_path(query: &str) -> bool {
    let mut parts = query.split('.');
    if parts.next() != Some("data") {
        return false;
    }
    let rest: Vec<&str> = parts.collect();
    rest.len() >= 2
        && rest.iter().all(|p| {
            let mut chars = p.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

fn files_list(files: &[(PathBuf, Syntax)]) -> String {
    files
        .iter()
        .map(|(p, _)| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The interpreter reads its time limit from a process-wide fallback when evaluating a
/// compiled policy; set it once.
fn install_time_limit() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        regorus::utils::limits::set_fallback_execution_timer_config(Some(time_limit()));
    });
}

/// [`EVAL_TIME_LIMIT`], checked every 64 units of work.
fn time_limit() -> regorus::utils::limits::ExecutionTimerConfig {
    regorus::utils::limits::ExecutionTimerConfig {
        limit: EVAL_TIME_LIMIT,
        check_interval: NonZeroU32::MIN.saturating_add(63),
    }
}

// ---------------------------------------------------------------------------------------
// Input

/// The request as the policy sees it. Every field is what the app will receive: the path
/// already normalized, headers after XFCC and the identity header were set and forged
/// copies removed.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The caller's SPIFFE ID from its X509-SVID; `None` on a plaintext (permissive) request.
    pub caller: Option<&'a str>,
    pub method: &'a str,
    /// Normalized path, without the query.
    pub path: &'a str,
    /// The raw query string after `?` (not decoded), if the request had one.
    pub query: Option<&'a str>,
    /// Host, as normalized (lowercase, port stripped).
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    /// Claims of a validated JWT-SVID, if the request carried one.
    pub jwt_claims: Option<&'a Map<String, Json>>,
}

/// Why an input could not be built. The request is denied: OPA-Envoy refuses the same
/// requests (it cannot parse their path or query either).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("path has an invalid percent-encoding or is not UTF-8 once decoded")]
    Path,
    #[error("query: {0}")]
    Query(&'static str),
    /// Not reached for claims serde_json parsed, but never a panic.
    #[error("JWT claims not accepted by the interpreter: {0}")]
    Claims(String),
}

/// The policy input: one JSON object carrying both shapes.
///
/// ```text
/// {
///   "client_spiffe_id": "spiffe://example.org/ns/default/sa/payment",   seed shape
///   "method": "GET",
///   "path": "/v1/users/42",                          normalized, without the query
///   "attributes": {                                  OPA-Envoy ext_authz v3 shape
///     "source": {"principal": "spiffe://example.org/ns/default/sa/payment"},
///     "request": {"http": {
///       "method": "GET",
///       "path": "/v1/users/42?verbose=1",            with the raw query, as Envoy's :path
///       "host": "users.default.svc",
///       "headers": {":authority": "users.default.svc", ":method": "GET",
///                   ":path": "/v1/users/42?verbose=1", "x-workload-id": "...", ...}
///     }}
///   },
///   "parsed_path": ["v1", "users", "42"],
///   "parsed_query": {"verbose": ["1"]},
///   "source_principal": "spiffe://example.org/ns/default/sa/payment",
///   "version": {"ext_authz": "v3", "encoding": "protojson"},
///   "jwt_claims": {"sub": "spiffe://...", "aud": ["users"], "exp": 1767225600}
/// }
/// ```
///
/// As OPA-Envoy builds it: header names lower-cased, repeated headers joined with `,`
/// (as Envoy's ext_authz filter does), bytes that are not UTF-8 replaced; the pseudo
/// headers `:authority`, `:method`, `:path` present as Envoy sends them. `parsed_path` is
/// the percent-decoded path with its leading `/` removed, split on `/` (`/` gives
/// `[""]`). `parsed_query` maps each decoded name to the list of its decoded values
/// (`+` is a space; `a` alone is `a: [""]`; empty pieces skipped), as Go's
/// `url.ParseQuery`; a `;` separator or a bad escape makes the input fail, as it makes
/// OPA-Envoy fail. Without a caller, `client_spiffe_id`, `attributes.source.principal`
/// and `source_principal` are absent (undefined in the policy), not empty.
/// `jwt_claims` is present only when a JWT-SVID was validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    /// Built as the engine's value type: that is what the policy evaluates, and what the
    /// decision cache remembers (JSON only for OPA and tests).
    doc: regorus::Value,
}

impl Input {
    /// The whole input (for OPA, or a policy that reads `input` as a whole).
    pub fn build(view: &RequestView<'_>) -> Result<Self, InputError> {
        Self::build_for(view, &InputKeys::All)
    }

    /// The input with only the top-level keys `keys` names: what a policy cannot read is
    /// not built (the header map and OPA-Envoy's shape cost more than evaluating a small
    /// seed-style policy). The path and query are checked all the same, so a request is
    /// refused for bad input whatever the policy reads.
    pub fn build_for(view: &RequestView<'_>, keys: &InputKeys) -> Result<Self, InputError> {
        let parsed_path = if keys.wants("parsed_path") {
            Some(parse_path(view.path)?)
        } else {
            check_path(view.path)?;
            None
        };
        let parsed_query = parse_query(view.query.unwrap_or(""))?;
        let mut doc = Object::new();
        if let Some(caller) = view.caller {
            for key in ["client_spiffe_id", "source_principal"] {
                if keys.wants(key) {
                    doc.put(key, caller);
                }
            }
        }
        if keys.wants("method") {
            doc.put("method", view.method);
        }
        if keys.wants("path") {
            doc.put("path", view.path);
        }
        if keys.wants("attributes") {
            doc.put("attributes", Self::attributes(view));
        }
        if let Some(segments) = parsed_path {
            let list: Vec<regorus::Value> = segments.into_iter().map(Into::into).collect();
            doc.put("parsed_path", list);
        }
        if keys.wants("parsed_query") {
            let mut query = Object::new();
            for (name, values) in parsed_query {
                query.put(&name, values);
            }
            doc.put("parsed_query", query);
        }
        if keys.wants("version") {
            let mut version = Object::new();
            version.put("ext_authz", "v3");
            version.put("encoding", "protojson");
            doc.put("version", version);
        }
        if let (Some(claims), true) = (view.jwt_claims, keys.wants("jwt_claims")) {
            let claims = object_to_rego(claims).map_err(InputError::Claims)?;
            doc.put("jwt_claims", claims);
        }
        Ok(Self { doc: doc.into() })
    }

    /// OPA-Envoy's `attributes`: source principal and the request with its headers.
    fn attributes(view: &RequestView<'_>) -> Object {
        let full_path = match view.query {
            Some(q) => format!("{}?{}", view.path, q),
            None => view.path.to_string(),
        };
        // Repeated headers joined with `,` first, then made values once.
        let mut joined: std::collections::BTreeMap<&str, String> = Default::default();
        joined.insert(":authority", view.host.to_string());
        joined.insert(":method", view.method.to_string());
        joined.insert(":path", full_path.clone());
        for (name, value) in view.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            match joined.get_mut(name.as_str()) {
                Some(existing) => {
                    existing.push(',');
                    existing.push_str(&value);
                }
                None => {
                    joined.insert(name.as_str(), value.into_owned());
                }
            }
        }
        let mut headers = Object::new();
        for (name, value) in joined {
            headers.put(name, value);
        }
        let mut source = Object::new();
        if let Some(caller) = view.caller {
            source.put("principal", caller);
        }
        let mut http = Object::new();
        http.put("method", view.method);
        http.put("path", full_path);
        http.put("host", view.host);
        http.put("headers", headers);
        let mut request = Object::new();
        request.put("http", http);
        let mut attributes = Object::new();
        attributes.put("source", source);
        attributes.put("request", request);
        attributes
    }

    /// The input document as the engine evaluates it.
    pub fn document(&self) -> &regorus::Value {
        &self.doc
    }

    /// The input document as JSON, for a reference engine and tests (OPA gets the
    /// document serialized directly).
    pub fn to_json(&self) -> Json {
        serde_json::to_value(&self.doc).unwrap_or(Json::Null)
    }
}

/// An object of the input being built: string keys, in the order the engine keeps them.
struct Object(std::collections::BTreeMap<regorus::Value, regorus::Value>);

impl Object {
    fn new() -> Self {
        Self(Default::default())
    }

    fn put(&mut self, key: &str, value: impl Into<regorus::Value>) {
        self.0.insert(key.into(), value.into());
    }
}

impl From<Object> for regorus::Value {
    fn from(object: Object) -> Self {
        regorus::Value::from(object.0)
    }
}

/// OPA-Envoy's `parsed_path`: decode, drop leading slashes, split on `/`.
fn parse_path(path: &str) -> Result<Vec<String>, InputError> {
    let decoded = percent_decode(path, false).ok_or(InputError::Path)?;
    Ok(decoded
        .trim_start_matches('/')
        .split('/')
        .map(str::to_string)
        .collect())
}

/// What [`parse_path`] refuses, without building the segments: a path without `%` is
/// its own decoding (and already UTF-8).
fn check_path(path: &str) -> Result<(), InputError> {
    if path.contains('%') {
        percent_decode(path, false).ok_or(InputError::Path)?;
    }
    Ok(())
}

/// Go's `url.ParseQuery`, which OPA-Envoy uses for `parsed_query`.
fn parse_query(
    query: &str,
) -> Result<std::collections::BTreeMap<String, Vec<regorus::Value>>, InputError> {
    let mut out = std::collections::BTreeMap::new();
    for piece in query.split('&') {
        if piece.contains(';') {
            return Err(InputError::Query("`;` is not a separator"));
        }
        if piece.is_empty() {
            continue;
        }
        let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
        let name = percent_decode(name, true).ok_or(InputError::Query("bad escape in a name"))?;
        let value =
            percent_decode(value, true).ok_or(InputError::Query("bad escape in a value"))?;
        out.entry(name)
            .or_insert_with(Vec::new)
            .push(regorus::Value::from(value));
    }
    Ok(out)
}

/// `%XX` decoding; `plus` also turns `+` into a space (query encoding). `None` for a `%`
/// without two hex digits or a result that is not UTF-8.
fn percent_decode(s: &str, plus: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = hex(*bytes.get(i + 1)?)?;
                let lo = hex(*bytes.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if plus => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

// ---------------------------------------------------------------------------------------
// Decision

/// What to do with the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward it, with `headers` added to the request the app receives (OPA-Envoy's
    /// `headers` of an allowing object decision).
    Allow {
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    /// Answer it ourselves with `status` (403 unless the policy chose one), the policy's
    /// `headers` and `body`. Errors and undefined results give a plain 403.
    Deny {
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Option<String>,
        reason: DenyReason,
    },
}

/// Why a request was denied: for the log line and the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DenyReason {
    #[error("denied by policy")]
    Policy,
    #[error("policy result undefined (no rule matched and no default)")]
    Undefined,
    #[error("policy evaluation failed: {0}")]
    Evaluation(String),
    #[error("policy result has the wrong shape: {0}")]
    BadDecision(String),
    #[error("request cannot be made into policy input: {0}")]
    BadInput(#[from] InputError),
    /// The external OPA gave no decision and `on_error` is `deny`.
    #[error("OPA gave no decision: {0}")]
    Opa(super::opa_error::OpaError),
}

impl DenyReason {
    /// Short and bounded, for a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            DenyReason::Policy => "policy",
            DenyReason::Undefined => "undefined",
            DenyReason::Evaluation(_) => "error",
            DenyReason::BadDecision(_) => "bad_decision",
            DenyReason::BadInput(_) => "bad_input",
            DenyReason::Opa(_) => "opa_error",
        }
    }
}

impl Decision {
    /// A plain 403 for `reason`, with nothing from the policy.
    pub fn deny(reason: DenyReason) -> Self {
        Decision::Deny {
            status: StatusCode::FORBIDDEN,
            headers: Vec::new(),
            body: None,
            reason,
        }
    }

    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The decision for what the query returned (`None`: undefined), following
    /// OPA-Envoy: a boolean, or an object with a boolean `allowed` and optional
    /// `http_status` (number, used when denying), `headers` (an object of string or
    /// list-of-string values, or a list of such objects) and `body` (string). Anything
    /// else denies with [`DenyReason::BadDecision`]. Other OPA-Envoy keys
    /// (`request_headers_to_remove`, `response_headers_to_add`, `dynamic_metadata`,
    /// `query_parameters_to_*`) are ignored.
    pub fn from_result(result: Option<&Json>) -> Self {
        match result {
            None => Decision::deny(DenyReason::Undefined),
            Some(Json::Bool(true)) => Decision::Allow {
                headers: Vec::new(),
            },
            Some(Json::Bool(false)) => Decision::deny(DenyReason::Policy),
            Some(Json::Object(obj)) => Self::from_object(obj)
                .unwrap_or_else(|e| Decision::deny(DenyReason::BadDecision(e))),
            Some(other) => Decision::deny(DenyReason::BadDecision(format!(
                "expected a boolean or an object, got {}",
                kind(other)
            ))),
        }
    }

    /// [`Decision::from_result`] for the interpreter's value: a boolean or undefined
    /// decides without converting to JSON first.
    fn from_value(value: &regorus::Value) -> Self {
        match value {
            regorus::Value::Undefined => Self::from_result(None),
            regorus::Value::Bool(b) => Self::from_result(Some(&Json::Bool(*b))),
            other => match result_json(other) {
                Ok(json) => Self::from_result(Some(&json)),
                Err(e) => Decision::deny(DenyReason::Evaluation(e.to_string())),
            },
        }
    }

    fn from_object(obj: &Map<String, Json>) -> Result<Self, String> {
        let allowed = match obj.get("allowed") {
            Some(Json::Bool(b)) => *b,
            Some(other) => return Err(format!("`allowed` is {}, not a boolean", kind(other))),
            None => return Err("object has no `allowed`".into()),
        };
        let headers = match obj.get("headers") {
            None => Vec::new(),
            Some(h) => decision_headers(h)?,
        };
        if allowed {
            return Ok(Decision::Allow { headers });
        }
        let status = match obj.get("http_status") {
            None => StatusCode::FORBIDDEN,
            Some(Json::Number(n)) => n
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| (100..=599).contains(n))
                .and_then(|n| StatusCode::from_u16(n).ok())
                .ok_or_else(|| format!("`http_status` {n} is not an HTTP status"))?,
            Some(other) => return Err(format!("`http_status` is {}, not a number", kind(other))),
        };
        let body = match obj.get("body") {
            None => None,
            Some(Json::String(s)) => Some(s.clone()),
            Some(other) => return Err(format!("`body` is {}, not a string", kind(other))),
        };
        Ok(Decision::Deny {
            status,
            headers,
            body,
            reason: DenyReason::Policy,
        })
    }
}

fn decision_headers(h: &Json) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut out = Vec::new();
    match h {
        Json::Object(map) => header_object(map, &mut out)?,
        Json::Array(list) => {
            for item in list {
                match item {
                    Json::Object(map) => header_object(map, &mut out)?,
                    other => {
                        return Err(format!(
                            "`headers` list holds {}, not an object",
                            kind(other)
                        ))
                    }
                }
            }
        }
        other => return Err(format!("`headers` is {}, not an object", kind(other))),
    }
    Ok(out)
}

fn header_object(
    map: &Map<String, Json>,
    out: &mut Vec<(HeaderName, HeaderValue)>,
) -> Result<(), String> {
    for (name, value) in map {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("`headers` name {name:?} is not a header name"))?;
        let mut push = |v: &Json| -> Result<(), String> {
            let Json::String(s) = v else {
                return Err(format!("header {name} value is {}, not a string", kind(v)));
            };
            let value = HeaderValue::from_str(s)
                .map_err(|_| format!("header {name} value is not a valid header value"))?;
            out.push((header.clone(), value));
            Ok(())
        };
        match value {
            Json::Array(values) => values.iter().try_for_each(&mut push)?,
            v => push(v)?,
        }
    }
    Ok(())
}

fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

// ---------------------------------------------------------------------------------------
// Reloading authorizer

/// A policy that follows its files: compiled at start, recompiled when a file changes,
/// swapped in whole. A change that does not compile is refused (logged) and the running
/// policy kept, so a bad edit never opens or closes the service by accident.
#[derive(Clone)]
pub struct RegoAuthorizer {
    shared: Arc<Shared>,
}

struct Shared {
    current: ArcSwap<RegoPolicy>,
    files: Vec<PathBuf>,
    query: String,
    /// Successful reloads since start (the first load not counted).
    reloaded: AtomicU64,
    /// Reloads refused because the files did not compile.
    refused: AtomicU64,
}

impl std::fmt::Debug for RegoAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegoAuthorizer")
            .field("files", &self.shared.files)
            .field("query", &self.shared.query)
            .finish()
    }
}

impl RegoAuthorizer {
    /// Compiles `files` for `query` (an error here is a start-up error) and starts a task
    /// on the current tokio runtime that reloads them on change until `shutdown` or
    /// until every handle is dropped.
    pub fn start(
        files: Vec<PathBuf>,
        query: &str,
        shutdown: CancellationToken,
    ) -> Result<Self, RegoError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| RegoError::NoRuntime)?;
        let authorizer = Self::load(files, query)?;
        let files = FileWatch::new(&authorizer.shared.files)
            .map_err(|e| RegoError::Watch(e.to_string()))?;
        let weak = Arc::downgrade(&authorizer.shared);
        runtime.spawn(watch(weak, files, shutdown));
        Ok(authorizer)
    }

    /// Compiles once, without watching (tests, and callers that reload by themselves).
    pub fn load(files: Vec<PathBuf>, query: &str) -> Result<Self, RegoError> {
        if files.is_empty() {
            return Err(RegoError::NoFiles);
        }
        let policy = RegoPolicy::load(&files, query)?;
        for (path, syntax) in policy.files() {
            tracing::info!(file = %path.display(), syntax = ?syntax, query, "rego policy loaded");
        }
        tracing::info!(query, evaluation = %policy.backend(), "rego policy compiled");
        Ok(Self::from_policy(policy))
    }

    /// Wraps a policy already compiled; [`RegoAuthorizer::reload`] reads its files again.
    pub fn from_policy(policy: RegoPolicy) -> Self {
        let files = policy.files.iter().map(|(p, _)| p.clone()).collect();
        let query = policy.query.clone();
        Self {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(policy),
                files,
                query,
                reloaded: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// Decides one request. Lock-free with respect to reloads: it evaluates the policy
    /// current when it starts.
    pub fn decide(&self, input: &Input) -> Decision {
        self.shared.current.load().decide(input)
    }

    /// Builds the input for `view` and decides; a request that cannot be made into input
    /// is denied ([`DenyReason::BadInput`]).
    pub fn decide_request(&self, view: &RequestView<'_>) -> Decision {
        let policy = self.shared.current.load();
        match Input::build_for(view, policy.input_keys()) {
            Ok(input) => policy.decide(&input),
            Err(e) => Decision::deny(DenyReason::BadInput(e)),
        }
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<RegoPolicy> {
        self.shared.current.load_full()
    }

    /// Recompiles the files now. On success the new policy replaces the old one for
    /// every decision that starts afterwards; on failure the old one stays, the error
    /// is logged and returned.
    pub fn reload(&self) -> Result<(), RegoError> {
        self.shared.reload()
    }

    /// (successful reloads, refused reloads) since start.
    pub fn reload_counts(&self) -> (u64, u64) {
        (
            self.shared.reloaded.load(Ordering::Relaxed),
            self.shared.refused.load(Ordering::Relaxed),
        )
    }
}

impl Shared {
    fn reload(&self) -> Result<(), RegoError> {
        match RegoPolicy::load(&self.files, &self.query) {
            Ok(policy) => {
                let evaluation = policy.backend();
                self.current.store(Arc::new(policy));
                self.reloaded.fetch_add(1, Ordering::Relaxed);
                tracing::info!(files = %self.files_text(), query = %self.query, %evaluation, "rego policy reloaded");
                Ok(())
            }
            Err(e) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "rego policy changed but does not load; keeping the previous policy");
                Err(e)
            }
        }
    }

    fn files_text(&self) -> String {
        self.files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The reload loop: a burst of file events becomes one recompilation, done off the
/// runtime's workers.
async fn watch(shared: Weak<Shared>, mut files: FileWatch, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            got = files.changed() => if got.is_none() { return },
        }
        let Some(strong) = shared.upgrade() else {
            return;
        };
        // The error is logged and counted inside.
        if let Err(e) = tokio::task::spawn_blocking(move || {
            let _ = strong.reload();
        })
        .await
        {
            tracing::error!(error = %e, "rego policy reload task failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const V0: &str = r#"package authz
default allow = false
allow {
    input.client_spiffe_id == "spiffe://example.org/ns/default/sa/payment"
    input.method == "GET"
    startswith(input.path, "/v1/users/")
}
"#;

    const V1: &str = r#"package authz
default allow := false
allow if {
    input.attributes.source.principal == "spiffe://example.org/ns/default/sa/payment"
    input.attributes.request.http.method == "GET"
    input.parsed_path[0] == "v1"
    input.parsed_path[1] == "users"
}
"#;

    const OBJECT: &str = r#"package authz
import rego.v1
default allow := {"allowed": false, "http_status": 401, "body": "who are you?", "headers": {"www-authenticate": "SPIFFE"}}
allow := {"allowed": true, "headers": {"x-policy": ["a", "b"]}} if input.method == "GET"
"#;

    const UNDEFINED: &str = "package authz\nallow if input.method == \"GET\"\n";

    fn policy(text: &str) -> RegoPolicy {
        RegoPolicy::from_sources(&[("p.rego".into(), text.to_string())], "data.authz.allow")
            .unwrap()
    }

    fn input(caller: Option<&str>, method: &str, path: &str, query: Option<&str>) -> Input {
        let mut headers = HeaderMap::new();
        headers.insert("x-workload-id", HeaderValue::from_static("spiffe://x/y"));
        headers.append("accept", HeaderValue::from_static("text/plain"));
        headers.append("accept", HeaderValue::from_static("application/json"));
        Input::build(&RequestView {
            caller,
            method,
            path,
            query,
            host: "users.default.svc",
            headers: &headers,
            jwt_claims: None,
        })
        .unwrap()
    }

    const PAYMENT: Option<&str> = Some("spiffe://example.org/ns/default/sa/payment");

    #[test]
    fn v0_and_v1_files_load_and_decide() {
        let v0 = policy(V0);
        assert_eq!(v0.files()[0].1, Syntax::V0);
        let v1 = policy(V1);
        assert_eq!(v1.files()[0].1, Syntax::V1);
        for p in [&v0, &v1] {
            assert!(p
                .decide(&input(PAYMENT, "GET", "/v1/users/42", None))
                .is_allowed());
            assert_eq!(
                p.decide(&input(PAYMENT, "DELETE", "/v1/users/42", None)),
                Decision::deny(DenyReason::Policy)
            );
            assert_eq!(
                p.decide(&input(
                    Some("spiffe://example.org/ns/default/sa/other"),
                    "GET",
                    "/v1/users/42",
                    None
                )),
                Decision::deny(DenyReason::Policy)
            );
            // No caller: the ID is undefined, the rule does not match, the default denies.
            assert_eq!(
                p.decide(&input(None, "GET", "/v1/users/42", None)),
                Decision::deny(DenyReason::Policy)
            );
        }
    }

    #[test]
    fn v0_and_v1_files_mix_in_one_policy() {
        let lib = "package lib\nis_get { input.method == \"GET\" }\n";
        let main = "package authz\nimport rego.v1\nallow if data.lib.is_get\n";
        let p = RegoPolicy::from_sources(
            &[
                ("lib.rego".into(), lib.into()),
                ("main.rego".into(), main.into()),
            ],
            "data.authz.allow",
        )
        .unwrap();
        assert_eq!(p.files()[0].1, Syntax::V0);
        assert_eq!(p.files()[1].1, Syntax::V1);
        assert!(p.decide(&input(PAYMENT, "GET", "/", None)).is_allowed());
    }

    #[test]
    fn object_decisions() {
        let p = policy(OBJECT);
        assert_eq!(
            p.decide(&input(PAYMENT, "GET", "/", None)),
            Decision::Allow {
                headers: vec![
                    (
                        HeaderName::from_static("x-policy"),
                        HeaderValue::from_static("a")
                    ),
                    (
                        HeaderName::from_static("x-policy"),
                        HeaderValue::from_static("b")
                    ),
                ]
            }
        );
        assert_eq!(
            p.decide(&input(PAYMENT, "POST", "/", None)),
            Decision::Deny {
                status: StatusCode::UNAUTHORIZED,
                headers: vec![(
                    HeaderName::from_static("www-authenticate"),
                    HeaderValue::from_static("SPIFFE")
                )],
                body: Some("who are you?".into()),
                reason: DenyReason::Policy,
            }
        );
    }

    #[test]
    fn undefined_and_errors_deny() {
        let p = policy(UNDEFINED);
        assert!(p.decide(&input(PAYMENT, "GET", "/", None)).is_allowed());
        assert_eq!(
            p.decide(&input(PAYMENT, "POST", "/", None)),
            Decision::deny(DenyReason::Undefined)
        );
        // A runtime error (a rule with two different values) denies with the error.
        let conflict = policy(
            "package authz\nallow := true if input.method\nallow := false if input.method\n",
        );
        assert!(matches!(
            conflict.backend(),
            Backend::Interpreter(NotCompiled::MayConflict { .. })
        ));
        let d = conflict.decide(&input(PAYMENT, "GET", "/", None));
        assert!(
            matches!(&d, Decision::Deny { reason: DenyReason::Evaluation(_), status, .. } if *status == StatusCode::FORBIDDEN),
            "{d:?}"
        );
    }

    #[test]
    fn builtin_errors_are_undefined_as_in_opa() {
        let p = policy("package authz\nimport rego.v1\ndefault allow := false\nallow if to_number(input.method) <= 10\nallow if not to_number(input.method) > 0\n");
        // to_number("GET") fails: both bodies' expressions are undefined; the second
        // rule's `not` of undefined holds, exactly as OPA decides it.
        assert!(p.decide(&input(PAYMENT, "GET", "/", None)).is_allowed());
        let q = policy("package authz\nimport rego.v1\ndefault allow := false\nallow if to_number(input.method) <= 10\n");
        assert_eq!(
            q.decide(&input(PAYMENT, "GET", "/", None)),
            Decision::deny(DenyReason::Policy)
        );
    }

    #[test]
    fn runaway_policy_is_stopped_and_denies() {
        let p = policy(
            "package authz\nimport rego.v1\nallow if {\n some i in numbers.range(1, 20000)\n some j in numbers.range(1, 20000)\n i > j\n j > 30000\n}\n",
        );
        assert_eq!(
            p.backend(),
            Backend::Vm,
            "the VM's time limit is the one tested"
        );
        let start = std::time::Instant::now();
        let d = p.decide(&input(PAYMENT, "GET", "/", None));
        assert!(
            matches!(&d, Decision::Deny { reason: DenyReason::Evaluation(e), .. } if e.contains("time")),
            "{d:?} after {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn malformed_decisions_deny() {
        let cases = [
            (json!(1), "a number"),
            (json!("yes"), "a string"),
            (json!({"http_status": 200}), "no `allowed`"),
            (json!({"allowed": "true"}), "not a boolean"),
            (
                json!({"allowed": false, "http_status": 1000}),
                "not an HTTP status",
            ),
            (
                json!({"allowed": false, "http_status": "401"}),
                "not a number",
            ),
            (
                json!({"allowed": true, "headers": {"bad name": "x"}}),
                "not a header name",
            ),
            (
                json!({"allowed": true, "headers": {"x": "a\nb"}}),
                "not a valid header value",
            ),
            (
                json!({"allowed": true, "headers": {"x": 1}}),
                "not a string",
            ),
            (json!({"allowed": false, "body": {}}), "not a string"),
        ];
        for (value, problem) in cases {
            match Decision::from_result(Some(&value)) {
                Decision::Deny {
                    reason: DenyReason::BadDecision(e),
                    status,
                    ..
                } => {
                    assert!(e.contains(problem), "{value}: {e}");
                    assert_eq!(status, StatusCode::FORBIDDEN);
                }
                d => panic!("{value}: {d:?}"),
            }
        }
        // A list of header objects is accepted, as OPA-Envoy does.
        assert_eq!(
            Decision::from_result(Some(
                &json!({"allowed": true, "headers": [{"a": "1"}, {"b": "2"}]})
            )),
            Decision::Allow {
                headers: vec![
                    (HeaderName::from_static("a"), HeaderValue::from_static("1")),
                    (HeaderName::from_static("b"), HeaderValue::from_static("2")),
                ]
            }
        );
    }

    #[test]
    fn load_errors_name_the_file_and_problem() {
        let e = RegoPolicy::from_sources(
            &[("bad.rego".into(), "package authz\nallow {".into())],
            "data.authz.allow",
        )
        .unwrap_err();
        assert!(
            matches!(&e, RegoError::Syntax { path, .. } if path == "bad.rego"),
            "{e}"
        );
        let e = RegoPolicy::from_sources(&[("p.rego".into(), V1.into())], "data.authz.nothing")
            .unwrap_err();
        assert!(matches!(e, RegoError::Compile { .. }), "{e}");
        let e = RegoPolicy::from_sources(&[("p.rego".into(), V1.into())], "allow").unwrap_err();
        assert!(matches!(e, RegoError::BadQuery { .. }), "{e}");
        let e = RegoPolicy::load(&["/nonexistent/p.rego".into()], "data.authz.allow").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/p.rego"), "{e}");
        let e = RegoPolicy::from_sources(&[], "data.authz.allow").unwrap_err();
        assert!(matches!(e, RegoError::NoFiles), "{e}");
        // Functions calling each other: the interpreter would overflow its stack on
        // the first request; OPA refuses the policy, and so does the load.
        let recursive =
            "package authz\nimport rego.v1\nf(x) if g(x)\ng(x) if f(x)\nallow if f(input.method)\n";
        let e =
            RegoPolicy::from_sources(&[("r.rego".into(), recursive.into())], "data.authz.allow")
                .unwrap_err();
        assert!(
            matches!(&e, RegoError::Compile { problem, files, .. }
                if problem.contains("recursion") && files.contains("r.rego")),
            "{e}"
        );
    }

    #[test]
    fn compile_error_keeps_the_old_policy() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.rego");
        std::fs::write(&file, V0).unwrap();
        let authz = RegoAuthorizer::load(vec![file.clone()], "data.authz.allow").unwrap();
        let get = input(PAYMENT, "GET", "/v1/users/42", None);
        let delete = input(PAYMENT, "DELETE", "/v1/users/42", None);
        assert!(authz.decide(&get).is_allowed());

        std::fs::write(&file, "package authz\nallow if {\n").unwrap();
        assert!(matches!(authz.reload(), Err(RegoError::Syntax { .. })));
        assert!(authz.decide(&get).is_allowed(), "old policy still in force");
        assert_eq!(authz.reload_counts(), (0, 1));

        std::fs::write(&file, "package authz\nallow := true\n").unwrap();
        authz.reload().unwrap();
        assert!(authz.decide(&delete).is_allowed(), "new policy in force");
        assert_eq!(authz.reload_counts(), (1, 1));
    }

    #[test]
    fn input_carries_both_shapes() {
        let mut headers = HeaderMap::new();
        headers.append(
            "x-forwarded-client-cert",
            HeaderValue::from_static("By=a;URI=b"),
        );
        headers.append("accept", HeaderValue::from_static("text/plain"));
        headers.append("accept", HeaderValue::from_static("application/json"));
        let claims = json!({"sub": "spiffe://example.org/web", "aud": ["users"]});
        let got = Input::build(&RequestView {
            caller: PAYMENT,
            method: "GET",
            path: "/v1/users/a%20b",
            query: Some("verbose=1&tag=x&tag=y+z&flag&&e=%41"),
            host: "users.default.svc",
            headers: &headers,
            jwt_claims: claims.as_object(),
        })
        .unwrap();
        let id = "spiffe://example.org/ns/default/sa/payment";
        let path = "/v1/users/a%20b?verbose=1&tag=x&tag=y+z&flag&&e=%41";
        assert_eq!(
            got.to_json(),
            json!({
                "client_spiffe_id": id,
                "method": "GET",
                "path": "/v1/users/a%20b",
                "attributes": {
                    "source": {"principal": id},
                    "request": {"http": {
                        "method": "GET",
                        "path": path,
                        "host": "users.default.svc",
                        "headers": {
                            ":authority": "users.default.svc",
                            ":method": "GET",
                            ":path": path,
                            "x-forwarded-client-cert": "By=a;URI=b",
                            "accept": "text/plain,application/json",
                        },
                    }},
                },
                "parsed_path": ["v1", "users", "a b"],
                "parsed_query": {"verbose": ["1"], "tag": ["x", "y z"], "flag": [""], "e": ["A"]},
                "source_principal": id,
                "version": {"ext_authz": "v3", "encoding": "protojson"},
                "jwt_claims": claims,
            })
        );
        // Root path and no caller.
        let root = input(None, "GET", "/", None);
        let root = root.to_json();
        assert_eq!(root["parsed_path"], json!([""]));
        assert_eq!(root["parsed_query"], json!({}));
        assert_eq!(root["attributes"]["source"], json!({}));
        assert!(root.get("client_spiffe_id").is_none());
    }

    #[test]
    fn input_refuses_what_opa_envoy_cannot_parse() {
        let headers = HeaderMap::new();
        let view = |path, query| RequestView {
            caller: PAYMENT,
            method: "GET",
            path,
            query,
            host: "h",
            headers: &headers,
            jwt_claims: None,
        };
        assert_eq!(Input::build(&view("/a%zz", None)), Err(InputError::Path));
        assert_eq!(Input::build(&view("/a%ff", None)), Err(InputError::Path));
        assert!(matches!(
            Input::build(&view("/a", Some("a=1;b=2"))),
            Err(InputError::Query(_))
        ));
        assert!(matches!(
            Input::build(&view("/a", Some("a=%g1"))),
            Err(InputError::Query(_))
        ));
        let authz = RegoAuthorizer::from_policy(policy("package authz\nallow := true\n"));
        assert_eq!(
            authz.decide_request(&view("/a%zz", None)),
            Decision::deny(DenyReason::BadInput(InputError::Path))
        );
        // Refused the same when `parsed_path` is not built.
        let method_only = InputKeys::Only(["method".to_string()].into());
        for path in ["/a%zz", "/a%ff", "/a%4", "/%"] {
            assert_eq!(
                Input::build_for(&view(path, None), &method_only),
                Err(InputError::Path),
                "{path}"
            );
        }
        for path in ["/a%20b", "/a+b", "/"] {
            assert!(
                Input::build_for(&view(path, None), &method_only).is_ok(),
                "{path}"
            );
        }
    }

    /// The document built for the engine is what its JSON (what OPA and the reference
    /// engine get) makes in the engine.
    #[test]
    fn document_is_its_json_for_the_engine() {
        for keys in [
            InputKeys::All,
            InputKeys::of_sources([V0]),
            InputKeys::of_sources([V1]),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("x-odd", HeaderValue::from_bytes(b"q\"\\\t\xff").unwrap());
            let input = Input::build_for(
                &RequestView {
                    caller: PAYMENT,
                    method: "GET",
                    path: "/v1/users/\u{e9}\u{1F600}%22",
                    query: Some("a=%0A&b=%C3%A9"),
                    host: "users.default.svc",
                    headers: &headers,
                    jwt_claims: json!({"exp": 4102444800u64, "f": 1.5, "n": -3, "s": "\u{0}"})
                        .as_object(),
                },
                &keys,
            )
            .unwrap();
            assert_eq!(
                &to_rego_value(&input.to_json()).unwrap(),
                input.document(),
                "{keys:?}"
            );
        }
    }

    /// A policy decided many times in a row (engines are kept between decisions) decides
    /// each input as on the first time, evaluation errors included.
    #[test]
    fn decisions_do_not_depend_on_earlier_ones() {
        let p = policy(
            "package authz\nimport rego.v1\nallow := true if input.method == \"GET\"\nallow := false if input.path == \"/x\"\n",
        );
        let conflict = |d: &Decision| matches!(d, Decision::Deny { reason: DenyReason::Evaluation(e), .. } if e.contains("conflict"));
        for _ in 0..3 {
            for (method, path, want) in [
                ("GET", "/y", Some(Decision::Allow { headers: vec![] })),
                ("GET", "/x", None),
                ("POST", "/x", Some(Decision::deny(DenyReason::Policy))),
                ("POST", "/y", Some(Decision::deny(DenyReason::Undefined))),
            ] {
                let d = p.decide(&input(PAYMENT, method, path, None));
                match want {
                    Some(want) => assert_eq!(d, want, "{method} {path}"),
                    None => assert!(conflict(&d), "{method} {path}: {d:?}"),
                }
            }
        }
    }

    /// Decisions made at once on several threads (each takes its own engine).
    #[test]
    fn concurrent_decisions() {
        let p = policy(V0);
        std::thread::scope(|scope| {
            for t in 0..4 {
                let p = &p;
                scope.spawn(move || {
                    for i in 0..200 {
                        let method = if (i + t) % 2 == 0 { "GET" } else { "DELETE" };
                        let path = format!("/v1/users/{t}-{i}");
                        let d = p.decide(&input(PAYMENT, method, &path, None));
                        assert_eq!(d.is_allowed(), method == "GET", "{method} {path}");
                    }
                });
            }
        });
    }

    /// `with` replaces part of the input for one expression; the rules it reaches see the
    /// replaced input and the rest of `data` (as OPA and rego-cpp decide: true).
    /// `CompiledPolicy::eval_with_input` failed this ("previous value is not an object").
    #[test]
    fn with_modifiers_see_data() {
        let p = policy(
            "package authz\nimport rego.v1\nis_get if input.method == \"GET\"\nallow if {\n is_get with input.method as \"GET\"\n data.authz.is_get with input.method as \"GET\"\n}\n",
        );
        assert!(p.decide(&input(PAYMENT, "POST", "/", None)).is_allowed());
    }

    fn rego_json() -> impl proptest::strategy::Strategy<Value = Json> {
        crate::testing::any_json(vec![
            json!(u64::MAX),
            json!(i64::MIN),
            json!(4102444800u64),
            json!(0.1),
            json!(1e300),
            json!({"$serde_json::private::Number": "12"}),
            json!({"$serde_json::private::Number": "x"}),
            json!({"$serde_json::private::Number": 1, "a": "b"}),
            json!(""),
        ])
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// The input conversion gives what `regorus::Value`'s `Deserialize` gives.
        #[test]
        fn input_values_as_serde_makes_them(json in rego_json()) {
            proptest::prop_assert_eq!(to_rego_value(&json), serde_via_deserialize(&json));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watcher_reloads_on_change_and_keeps_old_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.rego");
        std::fs::write(&file, V0).unwrap();
        let shutdown = CancellationToken::new();
        let authz = RegoAuthorizer::start(vec![file.clone()], "data.authz.allow", shutdown.clone())
            .unwrap();
        let delete = input(PAYMENT, "DELETE", "/v1/users/42", None);
        assert!(!authz.decide(&delete).is_allowed());

        std::fs::write(&file, "package authz\nallow if {\n").unwrap();
        wait_for(|| authz.reload_counts().1 >= 1).await;
        assert!(!authz.decide(&delete).is_allowed());
        assert!(authz
            .decide(&input(PAYMENT, "GET", "/v1/users/42", None))
            .is_allowed());

        // Replaced by rename, as editors and ConfigMaps do.
        let tmp = dir.path().join("policy.rego.new");
        std::fs::write(&tmp, "package authz\nallow := true\n").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        wait_for(|| authz.reload_counts().0 >= 1).await;
        assert!(authz.decide(&delete).is_allowed());
        shutdown.cancel();
    }

    async fn wait_for(f: impl Fn() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("condition not reached in 5 s");
    }
}

/// Where the time of one uncached decision goes, for a seed-style policy and a new path
/// each time (the `sg_var` bench scenario), each step beside what it replaced. Not a
/// pass/fail test: run by hand,
/// `cargo test --release --lib authz::rego::timing -- --ignored --nocapture --test-threads 1`
/// (`REGO_TIMING_ITERS` sets the decisions per step). `timing_profile_uncached_decisions`
/// is one loop of whole decisions, for `perf record` or `valgrind --tool=callgrind`.
#[cfg(test)]
mod timing {
    use super::*;
    use std::hint::black_box;
    use std::time::Instant;

    /// The bench's policy (scripts/bench, the `sg_*` scenarios).
    const POLICY: &str = r#"package authz
default allow = false
allow {
  input.client_spiffe_id == "spiffe://example.org/bench/front"
  input.method == "GET"
  not startswith(input.path, "/admin")
}
"#;

    fn iters() -> usize {
        std::env::var("REGO_TIMING_ITERS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(200_000)
    }

    fn paths(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("/items/{i}")).collect()
    }

    fn headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("127.0.0.1:8080"));
        h.insert(
            "x-forwarded-client-cert",
            HeaderValue::from_static(
                "By=spiffe://example.org/bench/back;URI=spiffe://example.org/bench/front",
            ),
        );
        h
    }

    fn view<'a>(path: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
        RequestView {
            caller: Some("spiffe://example.org/bench/front"),
            method: "GET",
            path,
            query: None,
            host: "127.0.0.1",
            headers,
            jwt_claims: None,
        }
    }

    fn policy() -> RegoPolicy {
        RegoPolicy::from_sources(
            &[("policy.rego".into(), POLICY.to_string())],
            "data.authz.allow",
        )
        .unwrap()
    }

    /// Runs `f` on every item, prints the time per item.
    fn step<T, R>(what: &str, items: Vec<T>, mut f: impl FnMut(T) -> R) -> Vec<R> {
        let n = items.len();
        let start = Instant::now();
        let out: Vec<R> = items.into_iter().map(|i| black_box(f(i))).collect();
        let ns = start.elapsed().as_nanos() as f64 / n as f64;
        println!("{what:<52} {ns:>7.0} ns");
        out
    }

    #[test]
    #[ignore]
    fn timing_uncached_decision_breakdown() {
        let policy = policy();
        let n = iters();
        let paths = paths(n);
        let headers = headers();
        let keys = policy.input_keys().clone();
        // The interpreter as it was called before: a CompiledPolicy, an engine per call.
        let mut engine = regorus::Engine::new();
        engine.set_rego_v0(true);
        engine
            .add_policy("policy.rego".into(), POLICY.into())
            .unwrap();
        engine.set_strict_builtin_errors(false);
        let compiled = engine
            .compile_with_entrypoint(&"data.authz.allow".into())
            .unwrap();
        println!("{n} decisions per step, input keys {keys:?}");

        let inputs = step(
            "input build (Input::build_for)",
            paths.iter().collect(),
            |p| Input::build_for(&view(p, &headers), &keys).unwrap(),
        );
        let before = step(
            "Json -> Value, before: build JSON + serde Deserialize",
            paths.iter().collect(),
            |p| {
                let json = Input::build_for(&view(p, &headers), &keys)
                    .unwrap()
                    .to_json();
                serde_via_deserialize(&json).unwrap()
            },
        );
        let now: Vec<regorus::Value> = inputs.iter().map(|i| i.doc.clone()).collect();
        let outs = step(
            "eval, before: CompiledPolicy::eval_with_input",
            before,
            |v| compiled.eval_with_input(v).unwrap(),
        );
        let engines = Engines::new(engine, "data.authz.allow".into());
        step(
            "eval, interpreter: Engines::eval (engines kept)",
            now.clone(),
            |v| engines.eval(v).unwrap(),
        );
        let Evaluator::Vm(vm) = &policy.evaluator else {
            panic!("the bench policy is not compiled: {}", policy.backend())
        };
        step("eval, now: VmPool::eval", now, |v| vm.eval(v).unwrap());
        step(
            "decision, before: to JSON + Decision::from_result",
            outs.iter().collect(),
            |o| Decision::from_result(Some(&serde_json::to_value(o).unwrap())),
        );
        let decisions = step(
            "decision, now: Decision::from_value",
            outs.iter().collect(),
            Decision::from_value,
        );
        assert!(decisions.iter().all(Decision::is_allowed));

        // The whole path as the proxy takes it, cache on, every path new.
        let authz = RegoAuthorizer::from_policy(policy);
        step(
            "total: decide_request, every path new",
            paths.iter().collect(),
            |p| authz.decide_request(&view(p, &headers)),
        );
        step(
            "total: decide_request, the same path (cache hits)",
            paths.iter().collect(),
            |_| authz.decide_request(&view("/items/1", &headers)),
        );
    }

    #[test]
    #[ignore]
    fn timing_profile_uncached_decisions() {
        let authz = RegoAuthorizer::from_policy(policy());
        let headers = headers();
        let decisions = step("decide_request, every path new", paths(iters()), |p| {
            authz.decide_request(&view(&p, &headers))
        });
        assert!(decisions.iter().all(Decision::is_allowed));
    }
}
