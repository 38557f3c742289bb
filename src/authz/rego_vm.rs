//! The compiled backend for Rego policies: regorus's register VM (RVM) instead of its
//! tree-walking interpreter, for the policies where the two are known to decide alike.
//! This module owns the check that a policy qualifies ([`conflict_free`]), compiling it
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
//! - arithmetic on a value of the wrong type is undefined where the interpreter fails.
//!
//! So a policy runs in the VM only when it is written with constructs on an allowlist
//! that avoids all of these ([`vm_safe`]): rule and function heads are bare names with a
//! constant scalar value (`true` when none is given), the same in every definition, no
//! `else`, defaults of rules only and constant; bodies use references, calls, comparisons,
//! `=`, `some`, `in`, `not`, `every`, literals and array or set comprehensions, but no
//! `:=`, arithmetic, object comprehensions or `with`. Every other policy, and any policy
//! the VM compiler refuses, runs in the interpreter, which is checked against a
//! reference engine; the reason is logged when the policy loads.

use std::collections::hash_map::{Entry, HashMap};
use std::sync::{Arc, Mutex};

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::{Program, RegoVM};
use regorus::unstable::{AssignOp, Expr, Literal, Module, Query, Ref, Rule, RuleHead};
use regorus::utils::get_path_string;
use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{CompiledPolicy, Value};

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
/// OPA does, and that none can produce conflicting values (see the module doc).
pub fn vm_safe(modules: &[Ref<Module>]) -> Result<(), NotCompiled> {
    let mut values: HashMap<String, Value> = HashMap::new();
    for module in modules {
        let package = get_path_string(&module.package.refr, Some("data"))
            .map_err(|e| NotCompiled::Unsupported(e.to_string()))?;
        for rule in &module.policy {
            let (refr, name) = match rule.as_ref() {
                Rule::Spec { head, .. } => match head {
                    RuleHead::Compr { refr, .. }
                    | RuleHead::Set { refr, .. }
                    | RuleHead::Func { refr, .. } => (refr, refr.span().text()),
                },
                Rule::Default { refr, .. } => (refr, refr.span().text()),
            };
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
            let (head, bodies) = match rule.as_ref() {
                Rule::Default { args, value, .. } => {
                    if !args.is_empty() {
                        return Err(construct("a default function"));
                    }
                    if scalar_literal(value).is_none() {
                        return Err(construct("a default that is not a constant"));
                    }
                    continue;
                }
                Rule::Spec { head, bodies, .. } => (head, bodies),
            };
            let assign = match head {
                RuleHead::Set { key, .. } => {
                    if let Some(key) = key {
                        check_expr(key).map_err(construct)?;
                    }
                    None
                }
                RuleHead::Compr { assign, .. } => Some(assign),
                RuleHead::Func { args, assign, .. } => {
                    if !args
                        .iter()
                        .all(|a| matches!(**a, Expr::Var { .. }) || scalar_literal(a).is_some())
                    {
                        return Err(construct("a pattern as a function argument"));
                    }
                    Some(assign)
                }
            };
            for body in bodies {
                if body.is_else || body.assign.is_some() {
                    return Err(conflict("has an `else`"));
                }
                check_query(&body.query).map_err(construct)?;
            }
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
    Ok(())
}

/// Every statement of a body (or a comprehension's or `every`'s query) on the allowlist.
fn check_query(query: &Query) -> Result<(), &'static str> {
    for stmt in &query.stmts {
        if !stmt.with_mods.is_empty() {
            return Err("`with`");
        }
        match &stmt.literal {
            Literal::SomeVars { .. } => {}
            Literal::SomeIn {
                key,
                value,
                collection,
                ..
            } => check_exprs(key.iter().chain([value, collection]))?,
            Literal::Expr { expr, .. } | Literal::NotExpr { expr, .. } => check_expr(expr)?,
            Literal::Every { domain, query, .. } => {
                check_expr(domain)?;
                check_query(query)?;
            }
        }
    }
    Ok(())
}

/// One expression and everything in it on the allowlist. The match names every kind
/// of expression, so a kind regorus adds is refused until it is looked at here.
fn check_expr(expr: &Expr) -> Result<(), &'static str> {
    match expr {
        Expr::String { .. }
        | Expr::RawString { .. }
        | Expr::Number { .. }
        | Expr::Bool { .. }
        | Expr::Null { .. }
        | Expr::Var { .. } => Ok(()),
        Expr::Array { items, .. } | Expr::Set { items, .. } => check_exprs(items),
        Expr::Object { fields, .. } => fields
            .iter()
            .try_for_each(|(_, k, v)| check_expr(k).and_then(|()| check_expr(v))),
        Expr::ArrayCompr { term, query, .. } | Expr::SetCompr { term, query, .. } => {
            check_expr(term)?;
            check_query(query)
        }
        Expr::ObjectCompr { .. } => Err("an object comprehension"),
        Expr::Call { fcn, params, .. } => check_exprs([fcn].into_iter().chain(params)),
        Expr::UnaryExpr { expr, .. } => check_expr(expr),
        Expr::RefDot { refr, .. } => check_expr(refr),
        Expr::RefBrack { refr, index, .. } => check_exprs([refr, index]),
        Expr::BinExpr { lhs, rhs, .. } | Expr::BoolExpr { lhs, rhs, .. } => check_exprs([lhs, rhs]),
        Expr::ArithExpr { .. } => Err("arithmetic"),
        Expr::AssignExpr { op, lhs, rhs, .. } => match op {
            AssignOp::ColEq => Err("`:=` in a body"),
            AssignOp::Eq => check_exprs([lhs, rhs]),
        },
        Expr::Membership {
            key,
            value,
            collection,
            ..
        } => check_exprs(key.iter().chain([value, collection])),
    }
}

fn check_exprs<'a>(exprs: impl IntoIterator<Item = &'a Ref<Expr>>) -> Result<(), &'static str> {
    exprs.into_iter().try_for_each(|e| check_expr(e))
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

/// VMs ready to evaluate one compiled program, kept between decisions. A VM resets its
/// evaluation state at the start of every run; one whose run failed is dropped rather
/// than reused, as the interpreter's engines are.
pub struct VmPool {
    program: Arc<Program>,
    timer: ExecutionTimerConfig,
    idle: Mutex<Vec<RegoVM>>,
}

impl std::fmt::Debug for VmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmPool").finish_non_exhaustive()
    }
}

impl VmPool {
    /// Most VMs kept idle (each holds its last input and registers until reused).
    const MAX_IDLE: usize = 64;

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
            idle: Mutex::new(Vec::new()),
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
        let mut vm = self.lock().pop().unwrap_or_else(|| self.new_vm());
        vm.set_input(input);
        let result = vm.execute();
        if result.is_ok() {
            let mut idle = self.lock();
            if idle.len() < Self::MAX_IDLE {
                idle.push(vm);
            }
        }
        result.map_err(anyhow::Error::from)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RegoVM>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Each policy here passed the first version of the check and then decided
    /// otherwise in the VM than in the interpreter (found by an adversarial review,
    /// results in the comments).
    #[test]
    fn constructs_the_vm_evaluates_otherwise_are_refused() {
        let v1 =
            |body: &str| format!("package t\nimport rego.v1\ndefault allow := false\n{body}\n");
        // `:=` of an undefined value succeeded (VM true, interpreter false, input {}).
        assert_eq!(
            why(&v1("allow if { x := input.missing; not x == 1 }")),
            "`:=` in a body"
        );
        assert_eq!(
            why("package t\ndefault allow = false\nallow { role := input.user.role; not role == \"guest\" }\n"),
            "`:=` in a body"
        );
        assert_eq!(
            why(&v1(
                "allow if every x in input.l { y := to_number(x); not y < 0 }"
            )),
            "`:=` in a body"
        );
        assert_eq!(
            why(&v1(
                "allow if count([y | some x in input.l; y := to_number(x)]) == 1"
            )),
            "`:=` in a body"
        );
        // A head with a path read back as its leaf (VM true, interpreter false).
        assert_eq!(
            why(&v1("a.b.c := false if input.z\nallow if not a.b")),
            "a path or brackets in its head"
        );
        assert_eq!(
            why(&v1(
                "a[x].b := true if { some x in input.l }\nallow if not a.k.b"
            )),
            "a path or brackets in its head"
        );
        assert_eq!(
            why(&v1("o[k] := 1 if { some k in input.l }\nallow if o.a == 1")),
            "a path or brackets in its head"
        );
        // A default function was ignored (VM true, interpreter false).
        assert_eq!(
            why(&v1(
                "default f(_) := true\nf(x) := true if x == 1\nallow if not f(input.x)"
            )),
            "a default function"
        );
        // A default that is not a constant (interpreter error, VM true).
        assert_eq!(
            why("package t\nimport rego.v1\ndefault allow := input.x\nallow if input.y\n"),
            "a default that is not a constant"
        );
        // Duplicate keys from an object comprehension (interpreter error, VM by order).
        assert_eq!(
            why(&v1(
                "allow if {\"role\": r | some r in input.roles}.role == \"admin\""
            )),
            "an object comprehension"
        );
        // Arithmetic on a string (interpreter error, VM undefined).
        assert_eq!(
            why(&v1("deny if input.a + 1 > 2\nallow if not deny")),
            "arithmetic"
        );
        assert_eq!(
            why(&v1(
                "r if input.m == \"GET\"\nallow if { r with input.m as \"GET\" }"
            )),
            "`with`"
        );
        assert_eq!(
            why(&v1("f([a, b]) if a == b\nallow if f(input.p)")),
            "a pattern as a function argument"
        );
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
        assert_eq!(pool.lock().len(), 1);
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
