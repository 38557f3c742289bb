//! The compiled backend for Rego policies: regorus's register VM (RVM) instead of its
//! tree-walking interpreter, for the policies where the two are known to decide alike.
//! This module owns the check that a policy qualifies ([`conflict_free`]), compiling it
//! to a VM program, and the pool of VMs that evaluate it ([`VmPool`]).
//!
//! # Why, and why not always
//!
//! A decision in the VM costs about a quarter of the interpreter's (the bench policy:
//! 1.1 against 4.7 us in isolation), which is most of what an uncached Rego decision
//! adds to a request. But the VM does not report OPA's evaluation conflicts: where OPA
//! fails (`rules must not produce multiple outputs`, two definitions of one complete rule
//! or function giving different values), the VM returns the first value or undefined,
//! and a policy that reads such a rule under `not` could then allow where OPA denies.
//! So a policy runs in the VM only when no conflict can happen at all, decided from its
//! syntax: every complete rule and function gives one constant scalar value (`true` when
//! it names none), the same in all its definitions, with no `else` and no partial object
//! rules. Set rules, defaults and any rule bodies are fine. Every other policy, and any
//! policy the VM compiler does not support (`with`, for one), runs in the interpreter.

use std::collections::hash_map::{Entry, HashMap};
use std::sync::{Arc, Mutex};

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::{Program, RegoVM};
use regorus::unstable::{Expr, Module, Rule, RuleHead};
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
    /// The VM compiler refused the policy.
    #[error("the VM compiler does not support it: {0}")]
    Unsupported(String),
}

/// Checks that no rule in `modules` can produce conflicting values (see the module doc).
pub fn conflict_free(modules: &[regorus::unstable::Ref<Module>]) -> Result<(), NotCompiled> {
    let mut values: HashMap<String, Value> = HashMap::new();
    for module in modules {
        let package = get_path_string(&module.package.refr, Some("data"))
            .map_err(|e| NotCompiled::Unsupported(e.to_string()))?;
        for rule in &module.policy {
            let Rule::Spec { head, bodies, .. } = rule.as_ref() else {
                continue; // `default`: one constant, used only when nothing else is.
            };
            let (refr, assign) = match head {
                RuleHead::Set { .. } => continue, // sets accumulate; nothing to conflict
                RuleHead::Compr { refr, assign, .. } => (refr, assign),
                RuleHead::Func { refr, assign, .. } => (refr, assign),
            };
            let path = get_path_string(refr, None).unwrap_or_else(|_| "?".into());
            let rule_name = format!("{package}.{path}");
            let conflict = |why| NotCompiled::MayConflict {
                rule: rule_name.clone(),
                why,
            };
            if matches!(head, RuleHead::Compr { .. }) && matches!(**refr, Expr::RefBrack { .. }) {
                return Err(conflict("is a partial object rule"));
            }
            if bodies.iter().any(|b| b.is_else || b.assign.is_some()) {
                return Err(conflict("has an `else`"));
            }
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

    fn check(policy: &str) -> Result<(), NotCompiled> {
        let mut engine = regorus::Engine::new();
        engine.set_rego_v0(false);
        if engine.add_policy("p.rego".into(), policy.into()).is_err() {
            engine.set_rego_v0(true);
            engine.add_policy("p.rego".into(), policy.into()).unwrap();
        }
        conflict_free(engine.get_modules())
    }

    fn why(policy: &str) -> &'static str {
        match check(policy) {
            Err(NotCompiled::MayConflict { why, .. }) => why,
            other => panic!("expected a possible conflict, got {other:?}"),
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
        assert_eq!(
            why("package t\no[k] := 1 if { some k in input.l }\n"),
            "is a partial object rule"
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
        conflict_free(engine.get_modules()).unwrap();
        engine
            .add_policy("c.rego".into(), "package t\nx := 2 if input.b\n".into())
            .unwrap();
        assert!(conflict_free(engine.get_modules()).is_err());
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
        let timer = ExecutionTimerConfig {
            limit: std::time::Duration::from_millis(100),
            check_interval: std::num::NonZeroU32::MIN,
        };
        let pool = VmPool::compile(&compiled, "data.t.allow", timer).unwrap();
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
        let timer = ExecutionTimerConfig {
            limit: std::time::Duration::from_millis(100),
            check_interval: std::num::NonZeroU32::MIN,
        };
        match VmPool::compile(&compiled, "data.t.allow", timer) {
            Err(NotCompiled::Unsupported(why)) => {
                assert!(why.contains("with"), "{why}");
                assert!(!why.contains('\n'), "{why}");
            }
            other => panic!("expected unsupported, got {other:?}"),
        }
    }
}
