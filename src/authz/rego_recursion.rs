//! Recursion in Rego policies, and the walk over a policy's statements that finds it.
//! OPA refuses a policy whose rules or functions can reach themselves when it compiles
//! it; regorus does not. Its interpreter reports a rule that is entered again while it
//! evaluates, but functions that call each other in a cycle recurse until the thread's
//! stack overflows, which aborts the whole process, and its VM overflows on rule cycles
//! too. This module owns finding such cycles: a policy whose functions call each other
//! in a cycle is refused when it loads (as OPA refuses it), and one whose rules may
//! reach themselves stays out of the VM.

use std::collections::{HashMap, HashSet};

use regorus::unstable::{Expr, Literal, Module, Query, Ref, Rule, RuleHead};

/// A function that may call itself through the functions it calls, if any. Calls are
/// matched by the function's last name (`f` in `data.pkg.f(x)`), so functions of one
/// name in two packages count as one: that can find a cycle OPA would not, never miss
/// one.
pub fn function_cycle(modules: &[Ref<Module>]) -> Option<String> {
    let mut calls: HashMap<String, HashSet<String>> = HashMap::new();
    for module in modules {
        for rule in &module.policy {
            let Rule::Spec {
                head: RuleHead::Func { refr, .. },
                bodies,
                ..
            } = rule.as_ref()
            else {
                continue;
            };
            let name = last_name(refr.span().text()).to_string();
            let out = calls.entry(name).or_default();
            for body in bodies {
                calls_in_query(&body.query, out);
            }
        }
    }
    cycle(&calls)
}

/// `f` of `data.pkg.f`.
fn last_name(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

fn calls_in_query(query: &Query, out: &mut HashSet<String>) {
    for stmt in &query.stmts {
        for with in &stmt.with_mods {
            calls_in_expr(&with.r#as, out);
        }
        let (exprs, nested) = statement_parts(&stmt.literal);
        exprs.into_iter().for_each(|e| calls_in_expr(e, out));
        if let Some(nested) = nested {
            calls_in_query(nested, out);
        }
    }
}

/// The expressions one statement of a query holds, and the query nested in it (the
/// body of `every`).
pub fn statement_parts(literal: &Literal) -> (Vec<&Ref<Expr>>, Option<&Ref<Query>>) {
    match literal {
        Literal::SomeVars { .. } => (Vec::new(), None),
        Literal::SomeIn {
            key,
            value,
            collection,
            ..
        } => (key.iter().chain([value, collection]).collect(), None),
        Literal::Expr { expr, .. } | Literal::NotExpr { expr, .. } => (vec![expr], None),
        Literal::Every { domain, query, .. } => (vec![domain], Some(query)),
    }
}

/// The names of the functions called anywhere in `expr`.
fn calls_in_expr(expr: &Expr, out: &mut HashSet<String>) {
    let mut each = |exprs: &[&Ref<Expr>]| exprs.iter().for_each(|e| calls_in_expr(e, out));
    match expr {
        Expr::String { .. }
        | Expr::RawString { .. }
        | Expr::Number { .. }
        | Expr::Bool { .. }
        | Expr::Null { .. }
        | Expr::Var { .. } => {}
        Expr::Array { items, .. } | Expr::Set { items, .. } => {
            each(&items.iter().collect::<Vec<_>>())
        }
        Expr::Object { fields, .. } => fields.iter().for_each(|(_, k, v)| each(&[k, v])),
        Expr::ArrayCompr { term, query, .. } | Expr::SetCompr { term, query, .. } => {
            each(&[term]);
            calls_in_query(query, out);
        }
        Expr::ObjectCompr {
            key, value, query, ..
        } => {
            each(&[key, value]);
            calls_in_query(query, out);
        }
        Expr::Call { fcn, params, .. } => {
            each(&params.iter().collect::<Vec<_>>());
            out.insert(last_name(fcn.span().text()).to_string());
        }
        Expr::UnaryExpr { expr, .. } => each(&[expr]),
        Expr::RefDot { refr, .. } => each(&[refr]),
        Expr::RefBrack { refr, index, .. } => each(&[refr, index]),
        Expr::BinExpr { lhs, rhs, .. }
        | Expr::BoolExpr { lhs, rhs, .. }
        | Expr::ArithExpr { lhs, rhs, .. }
        | Expr::AssignExpr { lhs, rhs, .. } => each(&[lhs, rhs]),
        Expr::Membership {
            key,
            value,
            collection,
            ..
        } => {
            each(&key.iter().chain([value, collection]).collect::<Vec<_>>());
        }
    }
}

/// A name that can reach itself in `edges` (name -> the names it mentions; names that
/// are not keys lead nowhere), if any.
pub fn cycle(edges: &HashMap<String, HashSet<String>>) -> Option<String> {
    // Depth-first, iterative: on the path (true) or done (false).
    let mut on_path: HashMap<&str, bool> = HashMap::new();
    for start in edges.keys() {
        if on_path.contains_key(start.as_str()) {
            continue;
        }
        let mut stack: Vec<(&str, Vec<&str>)> = vec![(start, successors(edges, start))];
        on_path.insert(start, true);
        while let Some((node, next)) = stack.last_mut() {
            match next.pop() {
                Some(n) => match on_path.get(n) {
                    Some(true) => return Some(n.to_string()),
                    Some(false) => {}
                    None => {
                        on_path.insert(n, true);
                        let succ = successors(edges, n);
                        stack.push((n, succ));
                    }
                },
                None => {
                    on_path.insert(node, false);
                    stack.pop();
                }
            }
        }
    }
    None
}

fn successors<'a>(edges: &'a HashMap<String, HashSet<String>>, name: &str) -> Vec<&'a str> {
    edges
        .get(name)
        .map(|names| {
            names
                .iter()
                .filter(|n| edges.contains_key(n.as_str()))
                .map(String::as_str)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules(policy: &str) -> regorus::Engine {
        let mut engine = regorus::Engine::new();
        engine.add_policy("p.rego".into(), policy.into()).unwrap();
        engine
    }

    #[test]
    fn function_cycles_are_found() {
        let head = "package t\nimport rego.v1\n";
        let cyclic = [
            "f(x) if f(x)",
            "f(x) if g(x)\ng(x) if h(x)\nh(x) if f(x)",
            "f(x) if { some y in [g(x)]; y }\ng(x) := true if data.t.f(x)",
            "f(x) if { every y in [1] { not g(x) } }\ng(x) if f(x)",
        ];
        for policy in cyclic {
            let mut engine = modules(&format!("{head}{policy}\n"));
            assert!(function_cycle(engine.get_modules()).is_some(), "{policy}");
        }
        let acyclic = [
            "f(x) if g(x)\ng(x) if startswith(x, \"a\")",
            // A rule between two calls: the interpreter reports the rule entered again.
            "r if f(1)\nf(x) if x == 1",
            "f(x) if { x == 1; count([1]) == 1 }",
        ];
        for policy in acyclic {
            let mut engine = modules(&format!("{head}{policy}\n"));
            assert_eq!(function_cycle(engine.get_modules()), None, "{policy}");
        }
    }
}
