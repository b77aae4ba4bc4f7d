//! `spec.filter`: a CEL expression over the event (`event`, `timestamp`, `data`), compiled once
//! per spec when the Webhook is reconciled and evaluated per event in the routing step.
//!
//! The `cel` crate does not meter evaluation cost, so the cost is bounded by the program's
//! shape instead, so that evaluation costs at most a small multiple of (program size) x (size
//! of the event), and events are at most 1 MiB:
//! - at most [`MAX_FILTER_LENGTH`] characters, [`MAX_NODES`] expression nodes and
//!   [`MAX_DEPTH`] levels of nesting;
//! - no macro (`all`, `exists`, `exists_one`, `map`, `filter`) inside another, and a macro's
//!   body sees only its own variable, literals and `event`: each element is then looked at a
//!   bounded number of times (`data.a.all(x, !(x in data.b))` would compare every element of
//!   one list of the event with every element of another);
//! - `matches` only with a literal pattern (one from the event would be compiled per event);
//! - at most [`MAX_ADDITIONS`] additions or concatenations (`+`), each of which may copy what
//!   it joins.
//!
//! The crate's parser recurses deeply (a few dozen nested brackets overflow a 2 MiB stack), so
//! parsing runs on a thread of its own with a large stack, and only expressions shallow enough
//! to evaluate (and drop) on a runtime worker's stack leave it. Compiled filters are kept by
//! source, so re-resolving a Webhook (a Secret change, a new leader) does not parse again.

use std::sync::{Arc, LazyLock, OnceLock};

use cel::{
    Context, Env, Value,
    common::ast::{EntryExpr, Expr, IdedExpr, operators},
};
use serde_json::{Map, Value as Json};

use crate::crd::EventType;

/// The longest filter the API server takes (the CRD says so too).
pub const MAX_FILTER_LENGTH: usize = 1024;
/// Expression nodes after macro expansion.
const MAX_NODES: usize = 200;
/// Levels of the expression tree (calls, selections, operators, literals): evaluation recurses
/// once per level, on a runtime worker's 2 MiB stack.
const MAX_DEPTH: usize = 24;
/// `+` operations on values of the event: each may copy what it joins (strings, lists).
const MAX_ADDITIONS: usize = 8;
/// The variables a macro's body may see besides its own: `event` is one of a few short names.
const SEEN_IN_MACROS: [&str; 1] = ["event"];
/// The parser's own recursion bound, on the compiling thread's stack.
const MAX_PARSE_DEPTH: u16 = 64;
const COMPILER_STACK: usize = 64 << 20;
/// The variables a filter sees.
const VARIABLES: [&str; 3] = ["event", "timestamp", "data"];

/// The standard library and macros, built once: an `Env` is costly to build per evaluation.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

type Compiled = Result<Arc<EventFilter>, String>;

/// Compiled filters by source: the same text compiles to the same program.
static COMPILED: LazyLock<moka::sync::Cache<String, Compiled>> =
    LazyLock::new(|| moka::sync::Cache::new(10_000));

/// A compiled `spec.filter`.
#[derive(Debug)]
pub struct EventFilter {
    source: String,
    expression: IdedExpr,
}

impl PartialEq for EventFilter {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl EventFilter {
    /// Parses and checks `source`; the error is the compiler's message, or says which bound
    /// the expression exceeds and what to do.
    pub fn compile(source: &str) -> Compiled {
        let length = source.chars().count();
        if length > MAX_FILTER_LENGTH {
            return Err(format!(
                "the filter is {length} characters long, at most {MAX_FILTER_LENGTH} are allowed: simplify it"
            ));
        }
        COMPILED.get_with_by_ref(source, || {
            let owned = source.to_owned();
            std::thread::Builder::new()
                .name("filter-compiler".into())
                .stack_size(COMPILER_STACK)
                .spawn(move || Self::compile_here(owned).map(Arc::new))
                .map_err(|e| format!("could not start compiling the filter: {e}"))
                .and_then(|thread| {
                    thread
                        .join()
                        .unwrap_or_else(|_| Err("the filter could not be compiled".into()))
                })
        })
    }

    /// Parses and checks on the current thread, which needs a deep stack.
    fn compile_here(source: String) -> Result<Self, String> {
        let expression = ENV
            .parser()
            .max_recursion_depth(MAX_PARSE_DEPTH)
            .parse(&source)
            .map_err(|e| e.to_string())?;
        let mut shape = Shape::default();
        shape.visit(&expression, 0, 1, &mut Vec::new());
        if shape.depth > MAX_DEPTH {
            return Err(format!(
                "the filter nests {} levels deep, at most {MAX_DEPTH} are allowed: split long chains with && or simplify it",
                shape.depth
            ));
        }
        if shape.nodes > MAX_NODES {
            return Err(format!(
                "the filter has {} expression nodes (macros expanded), at most {MAX_NODES} are allowed: simplify it",
                shape.nodes
            ));
        }
        if shape.nested_macro {
            return Err(
                "a macro (all, exists, exists_one, map, filter) inside another is not allowed, as its cost grows with the square of the event: test the inner list separately".into(),
            );
        }
        if let Some(variable) = &shape.free_in_macro {
            return Err(format!(
                "the body of a macro (all, exists, exists_one, map, filter) uses {variable}: it may use only its own variable, literals and event, so that the cost stays linear in the event; test {variable} outside the macro, or compare with a literal list"
            ));
        }
        if shape.computed_pattern {
            return Err(
                "matches() takes a literal pattern, as in data.name.matches('^inv-[0-9]+$'): a pattern from the event would be compiled for every event".into(),
            );
        }
        if shape.additions > MAX_ADDITIONS {
            return Err(format!(
                "the filter has {} additions or concatenations (+), at most {MAX_ADDITIONS} are allowed: each may copy the values it joins",
                shape.additions
            ));
        }
        if let Some(unknown) = shape.unknown.first() {
            return Err(format!(
                "undeclared reference to '{unknown}': a filter sees only event, timestamp and data, as in data.status == \"completed\""
            ));
        }
        Ok(Self { source, expression })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the filter on `event`: Ok(true) delivers it. An error (a missing field, a
    /// comparison of unlike types, a result that is not a bool) is for the caller to count; such
    /// an event does not match.
    pub fn evaluate(&self, event: &EventFacts<'_>) -> Result<bool, String> {
        let mut context = Context::with_env(ENV.clone());
        context.add_variable_from_value("event", event.event.as_str());
        context.add_variable_from_value("timestamp", event.timestamp.to_owned());
        context.add_variable_from_value("data", event.data_value());
        match Value::resolve(&self.expression, &context) {
            Ok(Value::Bool(matched)) => Ok(matched),
            Ok(other) => Err(format!("the filter gave {:?}, not a bool", other.type_of())),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// What a filter sees of one event. `data` becomes a CEL value at most once, and only if a
/// Webhook of the namespace has a filter.
pub struct EventFacts<'a> {
    pub event: EventType,
    pub timestamp: &'a str,
    data: &'a Map<String, Json>,
    value: OnceLock<Value>,
}

impl<'a> EventFacts<'a> {
    pub fn new(event: EventType, timestamp: &'a str, data: &'a Map<String, Json>) -> Self {
        Self {
            event,
            timestamp,
            data,
            value: OnceLock::new(),
        }
    }

    fn data_value(&self) -> Value {
        self.value
            .get_or_init(|| Value::Map(object(self.data).into()))
            .clone()
    }
}

/// JSON to CEL: integers that fit are `int` (so that `data.folder_id == 1` holds), larger ones
/// `uint`, other numbers `double`.
fn to_cel(json: &Json) -> Value {
    match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::String(Arc::new(s.clone())),
        Json::Array(items) => Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Json::Object(map) => Value::Map(object(map).into()),
    }
}

fn object(map: &Map<String, Json>) -> std::collections::HashMap<String, Value> {
    map.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect()
}

/// Whether `e` reads a variable (of the event, or a macro's), i.e. depends on the event.
fn mentions_a_variable(e: &IdedExpr) -> bool {
    match &e.expr {
        Expr::Unspecified | Expr::Literal(_) => false,
        Expr::Ident(_) => true,
        Expr::Select(s) => mentions_a_variable(&s.operand),
        Expr::Call(c) => {
            c.target.as_deref().is_some_and(mentions_a_variable)
                || c.args.iter().any(mentions_a_variable)
        }
        Expr::List(l) => l.elements.iter().any(mentions_a_variable),
        Expr::Map(_) | Expr::Struct(_) | Expr::Comprehension(_) => true,
    }
}

/// Size, macro nesting, free variables and costly operations of an expression.
#[derive(Default)]
struct Shape {
    nodes: usize,
    depth: usize,
    nested_macro: bool,
    unknown: Vec<String>,
    /// A variable of the event (`data`, `timestamp`) used in a macro's body.
    free_in_macro: Option<String>,
    /// `matches` with a pattern that is not a literal.
    computed_pattern: bool,
    additions: usize,
}

impl Shape {
    /// `in_macro`: how many comprehensions enclose `e`; `level`: its depth in the tree;
    /// `bound`: the variables of the enclosing comprehensions.
    fn visit(&mut self, e: &IdedExpr, in_macro: usize, level: usize, bound: &mut Vec<String>) {
        self.nodes += 1;
        self.depth = self.depth.max(level);
        if self.nodes > MAX_NODES || level > MAX_DEPTH {
            return;
        }
        let next = level + 1;
        match &e.expr {
            Expr::Unspecified | Expr::Literal(_) => {}
            Expr::Ident(name) => {
                let is_bound = bound.iter().any(|b| b == name);
                if !VARIABLES.contains(&name.as_str()) && !is_bound && !self.unknown.contains(name)
                {
                    self.unknown.push(name.clone());
                }
                if in_macro > 0
                    && !is_bound
                    && VARIABLES.contains(&name.as_str())
                    && !SEEN_IN_MACROS.contains(&name.as_str())
                {
                    self.free_in_macro.get_or_insert_with(|| name.clone());
                }
            }
            Expr::Select(s) => self.visit(&s.operand, in_macro, next, bound),
            Expr::Call(c) => {
                // Literals added together cost the same for every event.
                if c.func_name == operators::ADD && c.args.iter().any(mentions_a_variable) {
                    self.additions += 1;
                }
                if c.func_name == "matches" {
                    // `s.matches(p)` or `matches(s, p)`: the pattern is the last argument.
                    let literal = c
                        .args
                        .last()
                        .is_some_and(|p| matches!(p.expr, Expr::Literal(_)));
                    self.computed_pattern |= !literal;
                }
                if let Some(target) = &c.target {
                    self.visit(target, in_macro, next, bound);
                }
                for arg in &c.args {
                    self.visit(arg, in_macro, next, bound);
                }
            }
            Expr::List(l) => {
                for item in &l.elements {
                    self.visit(item, in_macro, next, bound);
                }
            }
            Expr::Map(m) => self.entries(&m.entries, in_macro, next, bound),
            Expr::Struct(s) => self.entries(&s.entries, in_macro, next, bound),
            Expr::Comprehension(c) => {
                // `has(x.y)` expands to no comprehension; anything that loops does.
                if in_macro > 0 {
                    self.nested_macro = true;
                }
                self.visit(&c.iter_range, in_macro, next, bound);
                self.visit(&c.accu_init, in_macro, next, bound);
                let scope = bound.len();
                bound.push(c.iter_var.clone());
                bound.extend(c.iter_var2.clone());
                bound.push(c.accu_var.clone());
                for part in [&c.loop_cond, &c.loop_step, &c.result] {
                    self.visit(part, in_macro + 1, next, bound);
                }
                bound.truncate(scope);
            }
        }
    }

    fn entries(
        &mut self,
        entries: &[cel::common::ast::IdedEntryExpr],
        in_macro: usize,
        next: usize,
        bound: &mut Vec<String>,
    ) {
        for entry in entries {
            match &entry.expr {
                EntryExpr::StructField(f) => self.visit(&f.value, in_macro, next, bound),
                EntryExpr::MapEntry(m) => {
                    self.visit(&m.key, in_macro, next, bound);
                    self.visit(&m.value, in_macro, next, bound);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(data: Json) -> (Map<String, Json>, String) {
        (
            data.as_object().cloned().unwrap(),
            "2023-06-15T10:35:00Z".into(),
        )
    }

    fn eval(filter: &str, event: EventType, data: Json) -> Result<bool, String> {
        let (data, ts) = facts(data);
        EventFilter::compile(filter)
            .unwrap()
            .evaluate(&EventFacts::new(event, &ts, &data))
    }

    #[test]
    fn the_example_filter_matches_exactly_its_events() {
        let f = r#"data.folder_id == 1 && data.status == "completed""#;
        let c = EventType::Completed;
        assert_eq!(
            eval(
                f,
                c,
                serde_json::json!({"folder_id": 1, "status": "completed"})
            ),
            Ok(true)
        );
        assert_eq!(
            eval(
                f,
                c,
                serde_json::json!({"folder_id": 2, "status": "completed"})
            ),
            Ok(false)
        );
        assert_eq!(
            eval(f, c, serde_json::json!({"folder_id": 1, "status": "error"})),
            Ok(false)
        );
    }

    #[test]
    fn event_timestamp_and_data_are_visible() {
        let d =
            serde_json::json!({"tags": ["a", "b"], "size": 2.5, "big": 18446744073709551615u64});
        assert_eq!(
            eval(r#"event == "document.error""#, EventType::Error, d.clone()),
            Ok(true)
        );
        assert_eq!(
            eval(
                r#"timestamp.startsWith("2023-06")"#,
                EventType::Error,
                d.clone()
            ),
            Ok(true)
        );
        assert_eq!(
            eval(
                r#""b" in data.tags && data.tags.exists(t, t == "a") && data.size > 2.0 && data.big > 1u"#,
                EventType::Error,
                d.clone()
            ),
            Ok(true)
        );
        assert_eq!(eval(r#"has(data.missing)"#, EventType::Error, d), Ok(false));
    }

    #[test]
    fn an_evaluation_error_is_reported_not_matched() {
        // A missing field is an error, which the routing step counts and treats as no match.
        let missing = eval(
            "data.folder_id == 1",
            EventType::Completed,
            serde_json::json!({}),
        );
        assert!(missing.is_err(), "{missing:?}");
        let not_bool = eval("data.n", EventType::Completed, serde_json::json!({"n": 1}));
        assert!(not_bool.is_err(), "{not_bool:?}");
    }

    #[test]
    fn the_deepest_filter_allowed_evaluates_on_a_small_stack() {
        // Test threads have 2 MiB stacks, like the runtime's workers.
        let deepest = format!(
            "{}data.n == 1{}",
            "int(".repeat(MAX_DEPTH - 3),
            ")".repeat(MAX_DEPTH - 3)
        );
        let f = EventFilter::compile(&deepest).unwrap();
        let data = serde_json::json!({"n": 1}).as_object().cloned().unwrap();
        let r = f.evaluate(&EventFacts::new(EventType::Completed, "t", &data));
        assert!(
            r.is_err(),
            "int(int(...)) of a comparison is a type error: {r:?}"
        );
        let chain = format!("{}1 == {}", "1 + ".repeat(MAX_DEPTH - 2), MAX_DEPTH - 1);
        let f = EventFilter::compile(&chain).unwrap();
        assert_eq!(
            f.evaluate(&EventFacts::new(EventType::Completed, "t", &data)),
            Ok(true)
        );
    }

    #[test]
    fn compile_errors_carry_the_compilers_message() {
        let e = EventFilter::compile("data.status ==").unwrap_err();
        assert!(e.contains("ERROR: <input>:1:"), "{e}");
        let e = EventFilter::compile("payload.x == 1").unwrap_err();
        assert!(e.contains("undeclared reference to 'payload'"), "{e}");
        // Variables bound by a macro are not free.
        EventFilter::compile("data.tags.all(t, t != '')").unwrap();
    }

    #[test]
    fn expensive_shapes_are_refused_at_compile_time() {
        let long = format!("{}true", "true && ".repeat(200));
        assert!(
            EventFilter::compile(&long)
                .unwrap_err()
                .contains("at most 1024")
        );
        let wide = format!("{}true", "true && ".repeat(110));
        assert!(
            EventFilter::compile(&wide)
                .unwrap_err()
                .contains("expression nodes")
        );
        // Deep nesting is refused, not a stack overflow (the parser's recursion overflows a
        // 2 MiB stack within a few dozen brackets).
        for deep in [
            format!("{}1{} == 1", "[".repeat(300), "]".repeat(300)),
            format!("{}1{} == 1", "int(".repeat(150), ")".repeat(150)),
            format!("{}1 == 1", "1 + ".repeat(100)),
        ] {
            let e = EventFilter::compile(&deep).unwrap_err();
            assert!(e.contains("levels deep") || e.contains("ERROR"), "{e}");
        }
        let nested = "data.a.exists(x, data.b.exists(y, x == y))";
        assert!(
            EventFilter::compile(nested)
                .unwrap_err()
                .contains("inside another")
        );
    }

    #[test]
    fn what_could_cost_more_than_linear_in_the_event_is_refused_naming_it() {
        let refused = [
            // Every element of one list against every element of another.
            ("data.a.all(x, !(x in data.b))", "uses data"),
            ("data.a.exists(x, x == data.b)", "uses data"),
            ("data.a.map(x, x + timestamp).size() > 0", "uses timestamp"),
            (
                "data.a.filter(x, x.startsWith(data.prefix)).size() > 0",
                "uses data",
            ),
            // A pattern from the event, compiled per event.
            ("data.name.matches(data.pattern)", "literal pattern"),
            ("matches(data.name, data.pattern)", "literal pattern"),
            (
                "size(data.s + data.s + data.s + data.s + data.s + data.s + data.s + data.s + data.s + data.s) > 0",
                "additions or concatenations",
            ),
        ];
        for (filter, why) in refused {
            let e = EventFilter::compile(filter).unwrap_err();
            assert!(e.contains(why), "{filter}: {e}");
        }
        // The linear forms stay allowed: a macro's body on its own element, literals and the
        // event type; the event's own values outside any macro; a literal pattern.
        for allowed in [
            "data.tags.all(t, t != '')",
            "data.items.exists(i, i.status == 'failed' && i.kind in ['a', 'b'])",
            "data.items.exists(i, i.type == event)",
            "data.items.map(i, i.id).size() > 3 && 'urgent' in data.tags",
            "data.x in data.allowed",
            "data.name.matches('^inv-[0-9]+$')",
            "data.a + data.b > 3",
        ] {
            EventFilter::compile(allowed).unwrap_or_else(|e| panic!("{allowed}: {e}"));
        }
    }

    /// The lists of a tenant who tried to stall the others (two of 120,000 numbers): the
    /// quadratic filter is refused at compile time; linear ones over them evaluate.
    #[test]
    fn a_linear_filter_over_large_lists_evaluates_in_one_pass() {
        let list: Vec<Json> = (0..120_000).map(Json::from).collect();
        let data = serde_json::json!({"a": list.clone(), "b": list});
        let data = data.as_object().unwrap();
        let linear = EventFilter::compile("data.a.all(x, x >= 0) && 5 in data.b").unwrap();
        let facts = EventFacts::new(EventType::Completed, "t", data);
        assert_eq!(linear.evaluate(&facts), Ok(true));
        assert!(EventFilter::compile("data.a.all(x, !(x in data.b))").is_err());
    }
}
