//! The compiled backend for Rego policies: regorus's register VM (RVM) instead of its
//! tree-walking interpreter, for the policies where the two are known to decide alike.
//! This module owns the check that a policy qualifies ([`vm_safe`]), compiling it
//! to a VM program, and the pool of VMs that evaluate it ([`VmPool`]).
//!
//! # Why, and why not always
//!
//! A decision in the VM costs about a quarter of the interpreter's (the bench policy:
//! 1.0 against 4.0 us in isolation), which is most of what an uncached Rego decision
//! adds to a request. But the VM does not always decide as OPA does. Measured on
//! regorus 0.14.1, for policies it compiles:
//! - it does not report OPA's evaluation conflicts (`rules must not produce multiple
//!   outputs`, two definitions of one rule or function with different values, an object
//!   comprehension producing one key twice): it returns a value or undefined where OPA
//!   fails, so a policy reading such a rule under `not` could allow where OPA denies;
//! - `x := expr` succeeds even when `expr` is undefined (a missing input key, a failing
//!   builtin), where OPA's body stops;
//! - rule heads with a path (`a.b.c := ...`) read back as their leaf value, `default`
//!   functions are ignored, a `default` value that is not a constant is accepted;
//! - `k, v in coll` checks only the value; a function parameter `_` accepts an
//!   undefined argument; an array comprehension keeps undefined terms as elements;
//!   reading a whole package lists its undefined rules as keys;
//! - mutual recursion between rules overflows the stack (the interpreter reports it);
//! - arithmetic on a value of the wrong type is undefined where the interpreter fails.
//!
//! So a policy runs in the VM only when it is written with constructs on an allowlist
//! that avoids all of these ([`vm_safe`]): rule and function heads are bare names with a
//! constant scalar value (`true` when none is given), the same in every definition, no
//! `else`, defaults of rules only and constant, function parameters named; bodies use
//! references, calls, comparisons, `=`, `some`, `x in`, `not`, `every`, literals, set
//! comprehensions and array comprehensions of a variable; reads of `data` reach a rule;
//! no rule mentions a name that leads back to itself; no `:=`, arithmetic, object
//! comprehensions, `k, v in`, `import data...` or `with`. Two differences are kept: `some
//! x in` over a string and `|`/`&` on values that are not sets are undefined in the VM
//! and errors in the interpreter; the reference engine (rego-cpp) agrees with the VM.
//! Every other policy, and any policy the VM compiler refuses, runs in the interpreter,
//! which is checked against the reference engine; the reason is logged when the policy
//! loads.

use std::collections::hash_map::{Entry, HashMap};
use std::collections::HashSet;
use std::sync::Arc;

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::{Program, RegoVM};
use regorus::unstable::{AssignOp, Expr, Module, Query, Ref, Rule, RuleHead};
use regorus::utils::get_path_string;
use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{CompiledPolicy, Value};

use super::idle::Idle;
use super::rego_recursion::{cycle, statement_parts};

/// Why a policy is evaluated by the interpreter rather than the VM (logged at load).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotCompiled {
    /// A rule could give two different values, which OPA reports as an error and the VM
    /// does not.
    #[error("rule {rule} {why}, so it could conflict")]
    MayConflict { rule: String, why: &'static str },
    /// A rule uses a construct the VM is not known to evaluate as OPA does.
    #[error("rule {rule} uses {what}")]
    Construct { rule: String, what: &'static str },
    /// The VM compiler refused the policy.
    #[error("the VM compiler does not support it: {0}")]
    Unsupported(String),
}

/// Checks that every rule in `modules` is written with constructs the VM evaluates as
/// OPA does, that none can produce conflicting values and that no rule can reach itself
/// (see the module doc).
pub fn vm_safe(modules: &[Ref<Module>]) -> Result<(), NotCompiled> {
    // Every rule's full path, to check reads of `data` against.
    let mut rule_paths: HashSet<Vec<String>> = HashSet::new();
    let mut packages = Vec::with_capacity(modules.len());
    for module in modules {
        let package = get_path_string(&module.package.refr, Some("data"))
            .map_err(|e| NotCompiled::Unsupported(e.to_string()))?;
        if package.contains(['[', '"']) {
            return Err(NotCompiled::Construct {
                rule: package,
                what: "brackets in its package path",
            });
        }
        if let Some(import) = module.imports.iter().find(|i| {
            matches!(&*i.refr, Expr::Var { span, .. } if span.text() == "data")
                || i.refr.span().text().starts_with("data.")
                || i.refr.span().text().starts_with("data[")
        }) {
            return Err(NotCompiled::Construct {
                rule: format!("{package} ({})", import.refr.span().text()),
                what: "an import of `data`",
            });
        }
        for rule in &module.policy {
            let name = head_ref(rule).span().text();
            rule_paths.insert(package.split('.').chain([name]).map(String::from).collect());
        }
        packages.push(package);
    }
    // What each rule's bare name may reach, by name: rules of the same name in other
    // packages are merged, which can only find more cycles than there are.
    let mut reaches: HashMap<String, HashSet<String>> = HashMap::new();
    let mut values: HashMap<String, Value> = HashMap::new();
    for (module, package) in modules.iter().zip(&packages) {
        for rule in &module.policy {
            let refr = head_ref(rule);
            let name = refr.span().text();
            let rule_name = format!("{package}.{name}");
            let construct = |what| NotCompiled::Construct {
                rule: rule_name.clone(),
                what,
            };
            let conflict = |why| NotCompiled::MayConflict {
                rule: rule_name.clone(),
                why,
            };
            if !matches!(**refr, Expr::Var { .. }) {
                return Err(construct("a path or brackets in its head"));
            }
            let mut walk = Walk {
                rule_paths: &rule_paths,
                names: reaches.remove(name).unwrap_or_default(),
            };
            let (head, bodies) = match rule.as_ref() {
                Rule::Default { args, value, .. } => {
                    if !args.is_empty() {
                        return Err(construct("a default function"));
                    }
                    if scalar_literal(value).is_none() {
                        return Err(construct("a default that is not a constant"));
                    }
                    reaches.insert(name.to_string(), walk.names);
                    continue;
                }
                Rule::Spec { head, bodies, .. } => (head, bodies),
            };
            let assign = match head {
                RuleHead::Set { key, .. } => {
                    if let Some(key) = key {
                        walk.expr(key).map_err(construct)?;
                    }
                    None
                }
                RuleHead::Compr { assign, .. } => Some(assign),
                RuleHead::Func { args, assign, .. } => {
                    let named = |a: &Expr| {
                        matches!(a, Expr::Var { span, .. } if span.text() != "_")
                            || scalar_literal(a).is_some()
                    };
                    if !args.iter().all(|a| named(a)) {
                        return Err(construct("a pattern or `_` as a function parameter"));
                    }
                    Some(assign)
                }
            };
            for body in bodies {
                if body.is_else || body.assign.is_some() {
                    return Err(conflict("has an `else`"));
                }
                walk.query(&body.query).map_err(construct)?;
            }
            reaches.insert(name.to_string(), walk.names);
            let Some(assign) = assign else {
                continue; // a set rule: contributions accumulate, nothing to conflict
            };
            let value = match assign {
                None => Value::Bool(true),
                Some(a) => scalar_literal(&a.value)
                    .ok_or_else(|| conflict("has a value that is not a constant"))?,
            };
            match values.entry(rule_name.clone()) {
                Entry::Vacant(slot) => {
                    slot.insert(value);
                }
                Entry::Occupied(seen) if *seen.get() != value => {
                    return Err(conflict("has definitions with different values"));
                }
                Entry::Occupied(_) => {}
            }
        }
    }
    match cycle(&reaches) {
        Some(rule) => Err(NotCompiled::Construct {
            rule,
            what: "recursion (it may reach itself)",
        }),
        None => Ok(()),
    }
}

/// The reference a rule's head names (`allow`, `f`, `a.b.c`, `s`).
fn head_ref(rule: &Rule) -> &Ref<Expr> {
    match rule {
        Rule::Spec { head, .. } => match head {
            RuleHead::Compr { refr, .. }
            | RuleHead::Set { refr, .. }
            | RuleHead::Func { refr, .. } => refr,
        },
        Rule::Default { refr, .. } => refr,
    }
}

/// The allowlist walk over a rule's bodies; it also collects every name the rule
/// mentions (variables and fields), a superset of the rules it can reach.
struct Walk<'a> {
    rule_paths: &'a HashSet<Vec<String>>,
    names: HashSet<String>,
}

impl Walk<'_> {
    /// Every statement of a body (or a comprehension's or `every`'s query).
    fn query(&mut self, query: &Query) -> Result<(), &'static str> {
        for stmt in &query.stmts {
            if !stmt.with_mods.is_empty() {
                return Err("`with`");
            }
            let (exprs, nested) = statement_parts(&stmt.literal);
            self.exprs(exprs)?;
            if let Some(nested) = nested {
                self.query(nested)?;
            }
        }
        Ok(())
    }

    /// One expression and everything in it. The match names every kind of expression,
    /// so a kind regorus adds is refused until it is looked at here.
    fn expr(&mut self, expr: &Expr) -> Result<(), &'static str> {
        match expr {
            Expr::String { .. }
            | Expr::RawString { .. }
            | Expr::Number { .. }
            | Expr::Bool { .. }
            | Expr::Null { .. } => Ok(()),
            Expr::Var { span, .. } => {
                if span.text() == "data" {
                    return Err("a read of `data` that is not a rule");
                }
                self.names.insert(span.text().to_string());
                Ok(())
            }
            Expr::Array { items, .. } | Expr::Set { items, .. } => self.exprs(items),
            Expr::Object { fields, .. } => {
                fields.iter().try_for_each(|(_, k, v)| self.exprs([k, v]))
            }
            // The VM keeps an undefined term as an element (the interpreter and OPA
            // leave it out); a variable bound by the query is never undefined.
            Expr::ArrayCompr { term, query, .. } => match &**term {
                Expr::Var { span, .. } if span.text() != "_" => self.query(query),
                _ => Err("an array comprehension whose term is not a variable"),
            },
            Expr::SetCompr { term, query, .. } => {
                self.expr(term)?;
                self.query(query)
            }
            Expr::ObjectCompr { .. } => Err("an object comprehension"),
            Expr::Call { fcn, params, .. } => self.exprs([fcn].into_iter().chain(params)),
            Expr::UnaryExpr { expr, .. } => self.expr(expr),
            Expr::RefDot { .. } | Expr::RefBrack { .. } => self.reference(expr),
            Expr::BinExpr { lhs, rhs, .. } | Expr::BoolExpr { lhs, rhs, .. } => {
                self.exprs([lhs, rhs])
            }
            Expr::ArithExpr { .. } => Err("arithmetic"),
            Expr::AssignExpr { op, lhs, rhs, .. } => match op {
                AssignOp::ColEq => Err("`:=` in a body"),
                AssignOp::Eq => self.exprs([lhs, rhs]),
            },
            // The VM checks only the value of `k, v in coll`, not the key.
            Expr::Membership { key: Some(_), .. } => Err("`k, v in`"),
            Expr::Membership {
                key: None,
                value,
                collection,
                ..
            } => self.exprs([value, collection]),
        }
    }

    fn exprs<'e>(
        &mut self,
        exprs: impl IntoIterator<Item = &'e Ref<Expr>>,
    ) -> Result<(), &'static str> {
        exprs.into_iter().try_for_each(|e| self.expr(e))
    }

    /// A chain of `.field` and `[index]`. One rooted at `data` must reach a rule (the VM
    /// lists undefined rules as keys when a whole package is read).
    fn reference(&mut self, expr: &Expr) -> Result<(), &'static str> {
        let mut path = Vec::new();
        let mut node = expr;
        loop {
            match node {
                Expr::RefDot { refr, field, .. } => {
                    path.push(Some(field.0.text().to_string()));
                    node = refr;
                }
                Expr::RefBrack { refr, index, .. } => {
                    self.expr(index)?;
                    path.push(match &**index {
                        Expr::String { value, .. } | Expr::RawString { value, .. } => {
                            value.as_string().ok().map(|s| s.to_string())
                        }
                        _ => None,
                    });
                    node = refr;
                }
                _ => break,
            }
        }
        path.reverse();
        self.names.extend(path.iter().flatten().cloned());
        match node {
            Expr::Var { span, .. } if span.text() == "data" => {
                let known: Vec<String> = std::iter::once("data".to_string())
                    .chain(path.into_iter().map_while(|c| c))
                    .collect();
                let reaches_rule = (2..=known.len()).any(|n| self.rule_paths.contains(&known[..n]));
                if reaches_rule {
                    Ok(())
                } else {
                    Err("a read of `data` that is not a rule")
                }
            }
            root => self.expr(root),
        }
    }
}

/// The value of a literal string, number, boolean or null.
fn scalar_literal(expr: &Expr) -> Option<Value> {
    match expr {
        Expr::String { value, .. }
        | Expr::RawString { value, .. }
        | Expr::Number { value, .. }
        | Expr::Bool { value, .. }
        | Expr::Null { value, .. } => Some(value.clone()),
        _ => None,
    }
}

/// VMs ready to evaluate one compiled program, kept between decisions in an [`Idle`]
/// pool (a VM resets its evaluation state at the start of every run).
pub struct VmPool {
    program: Arc<Program>,
    timer: ExecutionTimerConfig,
    idle: Idle<RegoVM>,
}

impl std::fmt::Debug for VmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmPool").finish_non_exhaustive()
    }
}

impl VmPool {
    /// Compiles `policy`'s entry point `rule` (canonical, `data.authz.allow`) for the VM.
    /// `timer` stops a runaway evaluation, as the interpreter's time limit does.
    pub fn compile(
        policy: &CompiledPolicy,
        rule: &str,
        timer: ExecutionTimerConfig,
    ) -> Result<Self, NotCompiled> {
        let program = Compiler::compile_from_policy(policy, &[rule])
            .map_err(|e| NotCompiled::Unsupported(one_line(&e.to_string())))?;
        Ok(Self {
            program,
            timer,
            idle: Idle::new(),
        })
    }

    fn new_vm(&self) -> RegoVM {
        let mut vm = RegoVM::new();
        vm.load_program(self.program.clone());
        // OPA's defaults: a failing builtin makes its expression undefined, and there is
        // no instruction budget (the VM's default of 25,000 would deny a policy that
        // walks a large input); the time limit bounds the work instead.
        vm.set_strict_builtin_errors(false);
        vm.set_max_instructions(usize::MAX);
        vm.set_execution_timer_config(Some(self.timer));
        vm
    }

    /// Evaluates the program's entry point for `input`.
    pub fn eval(&self, input: Value) -> anyhow::Result<Value> {
        self.idle
            .with(
                || self.new_vm(),
                |vm| {
                    vm.set_input(input);
                    vm.execute()
                },
            )
            .map_err(anyhow::Error::from)
    }
}

/// The compiler's message without its source excerpt (kept for the log's one line).
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("error:"))
        .map(|l| l.trim_start_matches("error:").trim().to_string())
        .next()
        .unwrap_or_else(|| message.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMER: ExecutionTimerConfig = ExecutionTimerConfig {
        limit: std::time::Duration::from_millis(100),
        check_interval: std::num::NonZeroU32::MIN,
    };

    fn check(policy: &str) -> Result<(), NotCompiled> {
        let mut engine = regorus::Engine::new();
        engine.set_rego_v0(false);
        if engine.add_policy("p.rego".into(), policy.into()).is_err() {
            engine.set_rego_v0(true);
            engine.add_policy("p.rego".into(), policy.into()).unwrap();
        }
        vm_safe(engine.get_modules())
    }

    /// Why `policy` is refused (a possible conflict, or a construct).
    fn why(policy: &str) -> &'static str {
        match check(policy) {
            Err(NotCompiled::MayConflict { why, .. }) => why,
            Err(NotCompiled::Construct { what, .. }) => what,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn constant_rules_qualify() {
        // v0, as the seed documents write it: two definitions of `allow`, both true.
        check("package authz\ndefault allow = false\nallow { input.method == \"GET\" }\nallow { input.path == \"/\" }\n").unwrap();
        // v1 with helpers, sets, functions with one constant output, `every`, `some`.
        check(
            "package t\nimport rego.v1\ndefault allow := false\nadmins contains x if { some x in input.l }\n\
             ok(x) if startswith(x, \"/v1/\")\nok(x) if x == \"/\"\nlevel := 3 if input.a\nlevel := 3 if input.b\n\
             allow if { ok(input.path); every y in input.l { y > 0 } }\n",
        )
        .unwrap();
    }

    #[test]
    fn possible_conflicts_are_refused_with_the_rule() {
        assert_eq!(
            check("package t\nx := v if { some v in input.list }\n"),
            Err(NotCompiled::MayConflict {
                rule: "data.t.x".into(),
                why: "has a value that is not a constant"
            })
        );
        assert_eq!(
            why("package t\nx := 1 if input.a\nx := 2 if input.b\n"),
            "has definitions with different values"
        );
        assert_eq!(
            why("package t\nf(x) := 1 if x > 0\nf(x) := 2 if x > 1\n"),
            "has definitions with different values"
        );
        assert_eq!(
            why("package t\nallow := 1 if input.a else := 2 if input.b\n"),
            "has an `else`"
        );
        // The same rule name in two packages is two rules; in two files of one package,
        // one rule.
        let mut engine = regorus::Engine::new();
        engine
            .add_policy("a.rego".into(), "package t\nx := 1 if input.a\n".into())
            .unwrap();
        engine
            .add_policy("b.rego".into(), "package u\nx := 2 if input.a\n".into())
            .unwrap();
        vm_safe(engine.get_modules()).unwrap();
        engine
            .add_policy("c.rego".into(), "package t\nx := 2 if input.b\n".into())
            .unwrap();
        assert!(vm_safe(engine.get_modules()).is_err());
    }

    /// Policies that passed an earlier version of the check and then decided otherwise
    /// in the VM than in the interpreter (found by two adversarial reviews), each with
    /// the reason it is refused now. Bodies without a `package` line go after
    /// `package t`, `import rego.v1`, `default allow := false`.
    const REFUSED: &[(&str, &str)] = &[
        // `:=` of an undefined value succeeded (input {}: VM true, interpreter false).
        ("allow if { x := input.missing; not x == 1 }", "`:=` in a body"),
        (
            "package t\ndefault allow = false\nallow { role := input.user.role; not role == \"guest\" }",
            "`:=` in a body",
        ),
        ("allow if every x in input.l { y := to_number(x); not y < 0 }", "`:=` in a body"),
        ("allow if count([y | some x in input.l; y := to_number(x)]) == 1", "`:=` in a body"),
        // A head with a path read back as its leaf (VM true, interpreter false).
        ("a.b.c := false if input.z\nallow if not a.b", "a path or brackets in its head"),
        ("a[x].b := true if { some x in input.l }\nallow if not a.k.b", "a path or brackets in its head"),
        ("o[k] := 1 if { some k in input.l }\nallow if o.a == 1", "a path or brackets in its head"),
        // A default function was ignored (VM true, interpreter false).
        ("default f(_) := true\nf(x) := true if x == 1\nallow if not f(input.x)", "a default function"),
        // A default that is not a constant (interpreter error, VM true).
        ("package t\nimport rego.v1\ndefault allow := input.x\nallow if input.y", "a default that is not a constant"),
        // Duplicate keys from an object comprehension (interpreter error, VM by order).
        ("allow if {\"role\": r | some r in input.roles}.role == \"admin\"", "an object comprehension"),
        // Arithmetic on a string (interpreter error, VM undefined).
        ("deny if input.a + 1 > 2\nallow if not deny", "arithmetic"),
        ("r if input.m == \"GET\"\nallow if { r with input.m as \"GET\" }", "`with`"),
        ("f([a, b]) if a == b\nallow if f(input.p)", "a pattern or `_` as a function parameter"),
        // The VM checked only the value (input {"o": {"other": "admin"}}: VM true).
        ("allow if \"role\", \"admin\" in input.o", "`k, v in`"),
        // `_` accepted an undefined argument (input {}: VM true).
        ("f(_) if true\nallow if f(input.role)", "a pattern or `_` as a function parameter"),
        // Undefined terms kept as elements (input {"l": [1, 2]}: VM false, interpreter true).
        (
            "deny if count([input.z | some x in input.l]) > 0\nallow if not deny",
            "an array comprehension whose term is not a variable",
        ),
        // Mutual recursion overflowed the VM's stack (input {"x": true}).
        ("a if { input.x; b }\nb if a\nallow if not a", "recursion (it may reach itself)"),
        ("f(x) if g(x)\ng(x) if f(x)\nallow if f(1)", "recursion (it may reach itself)"),
        ("allow if { input.x; allow }", "recursion (it may reach itself)"),
    ];

    #[test]
    fn constructs_the_vm_evaluates_otherwise_are_refused() {
        for (policy, reason) in REFUSED {
            let policy = match policy.starts_with("package") {
                true => format!("{policy}\n"),
                false => format!("package t\nimport rego.v1\ndefault allow := false\n{policy}\n"),
            };
            assert_eq!(why(&policy), *reason, "{policy}");
        }
    }

    #[test]
    fn reads_of_data_must_reach_a_rule() {
        let v1 = |body: &str| format!("package t\nimport rego.v1\n{body}\n");
        // A whole package read listed undefined rules as keys (input {}: VM true).
        let mut engine = regorus::Engine::new();
        engine
            .add_policy("u.rego".into(), "package u\nr if input.a\n".into())
            .unwrap();
        engine
            .add_policy("t.rego".into(), v1("allow if count(data.u) == 1"))
            .unwrap();
        assert!(matches!(
            vm_safe(engine.get_modules()),
            Err(NotCompiled::Construct {
                what: "a read of `data` that is not a rule",
                ..
            })
        ));
        // Reading the rule itself, or below it, is fine; `data` through an import is not.
        let mut engine = regorus::Engine::new();
        engine
            .add_policy("u.rego".into(), "package u\nr if input.a\n".into())
            .unwrap();
        engine
            .add_policy(
                "t.rego".into(),
                v1("allow if data.u.r\nallow if data.u[\"r\"]"),
            )
            .unwrap();
        vm_safe(engine.get_modules()).unwrap();
        engine
            .add_policy(
                "v.rego".into(),
                "package v\nimport data.u\nallow if u.r\n".into(),
            )
            .unwrap();
        assert!(matches!(
            vm_safe(engine.get_modules()),
            Err(NotCompiled::Construct {
                what: "an import of `data`",
                ..
            })
        ));
    }

    #[test]
    fn vm_decides_and_drops_failed_vms() {
        let mut engine = regorus::Engine::new();
        engine
            .add_policy(
                "p.rego".into(),
                "package t\ndefault allow := false\nallow if to_number(input.n) > 1\n".into(),
            )
            .unwrap();
        let compiled = engine
            .compile_with_entrypoint(&"data.t.allow".into())
            .unwrap();
        let pool = VmPool::compile(&compiled, "data.t.allow", TIMER).unwrap();
        let input = |n: &str| Value::from_json_str(&format!("{{\"n\": \"{n}\"}}")).unwrap();
        assert_eq!(pool.eval(input("5")).unwrap(), Value::Bool(true));
        assert_eq!(pool.eval(input("0")).unwrap(), Value::Bool(false));
        // A builtin that fails is undefined, as in OPA: the default applies.
        assert_eq!(pool.eval(input("abc")).unwrap(), Value::Bool(false));
        assert_eq!(pool.idle.len(), 1);
    }

    #[test]
    fn unsupported_policies_say_why_in_one_line() {
        let mut engine = regorus::Engine::new();
        engine
            .add_policy(
                "p.rego".into(),
                "package t\nr if input.m == \"GET\"\nallow if { r with input.m as \"GET\" }\n"
                    .into(),
            )
            .unwrap();
        let compiled = engine
            .compile_with_entrypoint(&"data.t.allow".into())
            .unwrap();
        match VmPool::compile(&compiled, "data.t.allow", TIMER) {
            Err(NotCompiled::Unsupported(why)) => {
                assert!(why.contains("with"), "{why}");
                assert!(!why.contains('\n'), "{why}");
            }
            other => panic!("expected unsupported, got {other:?}"),
        }
    }
}
