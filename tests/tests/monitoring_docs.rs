//! The operator's monitoring files (docs/monitoring.md and docs/monitoring/) held to the
//! metrics the agent exports, [`EXPORTED_METRICS`], and to the CLI's verbs; the events
//! stream's documentation held to the records the agent prints.
//!
//! - `alert_rules_pass_promtool_check_and_their_unit_tests`: `promtool check rules` and
//!   `promtool test rules` succeed, and promtool counts as many rules as this file reads.
//! - `every_alert_has_a_case_that_fires_and_one_that_must_not`: in the unit tests.
//! - `alert_rules_use_only_exported_metrics`: every rule's expression selects only exported
//!   series (or `up`), and every input series of the unit tests is one.
//! - `alerts_and_docs_name_only_existing_verbs`: every `tandem VERB` the annotations and
//!   docs/monitoring.md tell an administrator to run is a subcommand in agent/src/cli.rs,
//!   and for a verb with subcommands (`tandem snapshot list`) the next word is one of them.
//! - `dashboard_is_importable_and_uses_only_exported_metrics`: the Grafana dashboard's
//!   structure (schemaVersion, the datasource/resource/peer variables, every panel on the
//!   `datasource` variable), the names in every panel expression and variable query, and
//!   that it shows every exported metric.
//! - `dashboard_expressions_parse`: every panel expression is valid PromQL (promtool parses
//!   it as a recording rule, Grafana's interval variables replaced by durations).
//! - `dashboard_timelines_show_the_state_the_agent_reports`: the role, disk, connection and
//!   replication timelines turn one-hot series into numbers; for every state, promtool
//!   evaluates the panel's query on series in that state, and the panel's value mapping must
//!   show that state's name for the number.
//! - `the_docs_table_lists_exactly_the_exported_metrics`, with histograms as histograms.
//! - `the_docs_queries_and_scrape_config_are_valid`: the ```promql blocks parse and use
//!   exported names; the scrape config passes `promtool check config` with the rules.
//! - `the_events_docs_name_every_kind_object_and_field_and_their_examples_are_what_the_agent_prints`:
//!   the "Events" section of docs/operations.md (the `tandem events` stream, the other
//!   interface monitoring reads) names every kind, object and key of agent/src/events.rs,
//!   and each of its example lines, read back into the agent's `Record`, renders exactly as
//!   written.
//!
//! promtool comes from the Debian package `prometheus`; without it the tests that need it
//! fail and say so. The metric names are read from the expressions by [`metric_names`], a
//! small PromQL scanner: what is left after strings, label matchers, ranges, numbers,
//! functions, aggregations and their label lists, and operators is a metric name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tandem_tests::metrics::EXPORTED_METRICS;

/// Prometheus' own series the rules may use besides the agent's.
const PROMETHEUS_METRICS: &[&str] = &["up"];

const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn alerts_file() -> PathBuf {
    repo().join("docs/monitoring/tandem-alerts.yml")
}

fn alert_tests_file() -> PathBuf {
    repo().join("docs/monitoring/tandem-alerts.test.yml")
}

fn dashboard_file() -> PathBuf {
    repo().join("docs/monitoring/tandem-dashboard.json")
}

fn monitoring_doc() -> PathBuf {
    repo().join("docs/monitoring.md")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn allowed(name: &str) -> bool {
    EXPORTED_METRICS.contains(&name) || PROMETHEUS_METRICS.contains(&name)
}

/// The metric families: a histogram's three series count as one, named without suffix.
fn exported_families() -> BTreeSet<String> {
    EXPORTED_METRICS.iter().map(|m| family_of(m)).collect()
}

fn family_of(series: &str) -> String {
    for suffix in HISTOGRAM_SUFFIXES {
        if let Some(base) = series.strip_suffix(suffix) {
            if EXPORTED_METRICS.contains(&format!("{base}_bucket").as_str()) {
                return base.to_string();
            }
        }
    }
    series.to_string()
}

fn is_histogram(family: &str) -> bool {
    HISTOGRAM_SUFFIXES.iter().all(|s| EXPORTED_METRICS.contains(&format!("{family}{s}").as_str()))
}

// ---------------------------------------------------------------------------------------
// promtool

/// `promtool ARGS`: whether it succeeded, and its output. Fails with the package to
/// install when promtool is missing.
fn promtool_run(args: &[&str]) -> (bool, String) {
    let found =
        Command::new("sh").args(["-c", "command -v promtool"]).output().is_ok_and(|o| o.status.success());
    assert!(
        found,
        "this test needs promtool, from the Debian package prometheus: apt-get install -y prometheus \
         (.ci/run installs it without starting the service)"
    );
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("run promtool {args:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// `promtool ARGS`, asserting it succeeds; returns its output.
fn promtool(args: &[&str]) -> String {
    let (ok, text) = promtool_run(args);
    assert!(ok, "promtool {} failed:\n{text}", args.join(" "));
    text
}

/// The rule count in `promtool check rules` output ("SUCCESS: 11 rules found").
fn promtool_rule_count(output: &str) -> usize {
    let at =
        output.find("SUCCESS: ").unwrap_or_else(|| panic!("no SUCCESS line in promtool's output:\n{output}"));
    let rest = &output[at + "SUCCESS: ".len()..];
    let n: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    n.parse().unwrap_or_else(|_| panic!("no rule count in promtool's output:\n{output}"))
}

/// Has promtool parse `exprs` (name, PromQL) as recording rules; returns its output.
fn promtool_parses(what: &str, exprs: &[(String, String)]) -> String {
    assert!(!exprs.is_empty(), "{what}: no expressions to check");
    let mut rules = String::from("groups:\n  - name: parse-check\n    rules:\n");
    for (i, (name, expr)) in exprs.iter().enumerate() {
        // A JSON string is a valid YAML double-quoted scalar.
        rules.push_str(&format!(
            "      # {name}\n      - record: parse_check_{i}\n        expr: {}\n",
            serde_json::to_string(expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("parse-check.yml");
    std::fs::write(&file, &rules).unwrap();
    let (ok, out) = promtool_run(&["check", "rules", file.to_str().unwrap()]);
    assert!(ok, "{what}: an expression promtool cannot parse:\n{out}\nthe rules it read:\n{rules}");
    assert_eq!(
        promtool_rule_count(&out),
        exprs.len(),
        "{what}: promtool read another number of rules\n{out}"
    );
    out
}

// ---------------------------------------------------------------------------------------
// Reading the rule files. The rules file is YAML; rather than a YAML library this reads
// the two keys it needs (`alert`, `expr`) line by line, and the promtool rule count checks
// that it read every rule.

struct Rule {
    name: String,
    /// The rule's lines (for its labels and annotations).
    text: String,
    expr: String,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn rules(text: &str) -> Vec<Rule> {
    let lines: Vec<&str> = text.lines().collect();
    let mut rules: Vec<Rule> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert:").or_else(|| trimmed.strip_prefix("- record:")) {
            rules.push(Rule { name: name.trim().to_string(), text: String::new(), expr: String::new() });
        }
        if let Some(rule) = rules.last_mut() {
            rule.text.push_str(line);
            rule.text.push('\n');
            if let Some(value) = trimmed.strip_prefix("expr:") {
                let value = value.trim();
                assert!(rule.expr.is_empty(), "rule {}: two expr keys", rule.name);
                if value.starts_with('|') || value.starts_with('>') {
                    let key_indent = indent(line);
                    let mut body = Vec::new();
                    while i + 1 < lines.len()
                        && (lines[i + 1].trim().is_empty() || indent(lines[i + 1]) > key_indent)
                    {
                        i += 1;
                        rule.text.push_str(lines[i]);
                        rule.text.push('\n');
                        body.push(lines[i].trim());
                    }
                    rule.expr = body.join("\n").trim().to_string();
                } else {
                    assert!(
                        !value.starts_with(['"', '\'']),
                        "rule {}: write expr as a plain or block (|) scalar, not quoted",
                        rule.name
                    );
                    rule.expr = value.to_string();
                }
                assert!(!rule.expr.is_empty(), "rule {}: empty expr", rule.name);
            }
        }
        i += 1;
    }
    for rule in &rules {
        assert!(!rule.expr.is_empty(), "rule {}: no expr found", rule.name);
    }
    rules
}

/// Each unit-test case: (alert name, whether it expects the alert to fire).
fn alert_test_cases(text: &str) -> Vec<(String, bool)> {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let mut cases = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = line.strip_prefix("alertname:") {
            let exp = lines.get(i + 1).copied().unwrap_or("");
            let fires = match exp {
                "exp_alerts: []" => false,
                "exp_alerts:" => {
                    assert!(
                        lines.get(i + 2).is_some_and(|l| l.starts_with("- exp_labels:")),
                        "case for {name}: exp_alerts without exp_labels"
                    );
                    true
                }
                other => panic!("case for {name}: expected exp_alerts after alertname, found {other:?}"),
            };
            cases.push((name.trim().to_string(), fires));
        }
    }
    cases
}

/// The metric names of the unit tests' input series (`series: 'NAME{...}'`).
fn input_series_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("- series:"))
        .map(|s| {
            let s = s.trim().trim_matches(['\'', '"']);
            s.split('{').next().unwrap().trim().to_string()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// PromQL

/// Words that are not metric names where a metric name could stand.
const PROMQL_KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "inf",
    "nan",
];

/// Keywords followed by a list of label names in parentheses.
const LABEL_LIST_KEYWORDS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// The index just past the string literal starting at `i` (quote `q`, backslash escapes).
fn skip_string(chars: &[char], i: usize) -> usize {
    let q = chars[i];
    let mut j = i + 1;
    while j < chars.len() && chars[j] != q {
        if chars[j] == '\\' && q != '`' {
            j += 1;
        }
        j += 1;
    }
    j + 1
}

/// The index just past the bracket group starting at `i` (strings inside skipped).
fn skip_group(chars: &[char], i: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    let mut j = i;
    while j < chars.len() {
        match chars[j] {
            '"' | '\'' | '`' => {
                j = skip_string(chars, j);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    j
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The metric names a PromQL expression (possibly with Grafana `$variables`) selects.
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i),
            '{' => i = skip_group(&chars, i, '{', '}'),
            '[' => i = skip_group(&chars, i, '[', ']'),
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i = skip_group(&chars, i, '{', '}');
                } else {
                    while i < chars.len() && is_ident(chars[i]) {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) => {
                // Numbers, durations (5m, 1h30m) and exponents.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if is_ident_start(c) => {
                let start = i;
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let before_paren = chars.get(next) == Some(&'(');
                let lower = word.to_ascii_lowercase();
                if LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                    if before_paren {
                        i = skip_group(&chars, next, '(', ')');
                    }
                } else if PROMQL_KEYWORDS.contains(&lower.as_str()) || before_paren {
                    // An operator, an aggregation, or a function call.
                } else {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The metric names of a Grafana variable query: `label_values(SELECTOR, LABEL)` (or
/// `label_values(LABEL)`), else PromQL. Also returns the label of a label_values query.
fn variable_query_names(query: &str) -> (Vec<String>, Option<String>) {
    let q = query.trim();
    let Some(inner) = q.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')) else {
        return (metric_names(q), None);
    };
    let chars: Vec<char> = inner.chars().collect();
    let mut last_comma = None;
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => {
                i = skip_string(&chars, i);
                continue;
            }
            '{' => {
                i = skip_group(&chars, i, '{', '}');
                continue;
            }
            '(' => {
                i = skip_group(&chars, i, '(', ')');
                continue;
            }
            ',' => last_comma = Some(i),
            _ => {}
        }
        i += 1;
    }
    match last_comma {
        Some(at) => {
            let selector: String = chars[..at].iter().collect();
            let label: String = chars[at + 1..].iter().collect();
            (metric_names(&selector), Some(label.trim().to_string()))
        }
        None => (Vec::new(), Some(inner.trim().to_string())),
    }
}

fn unknown_names<'a>(names: impl IntoIterator<Item = &'a String>) -> Vec<&'a String> {
    names.into_iter().filter(|n| !allowed(n)).collect()
}

#[test]
fn metric_names_finds_selectors_not_functions_labels_or_variables() {
    let expr = r#"histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{resource=~"$resource", x="b{c}"}[$__rate_interval])))
        / on (instance) group_left (node) max without (peer) (b offset 30m) > bool 1e3
        unless count(c) and ${var} or absent(d[5m] @ start()) # comment e
        + topk(3, f) + label_replace(g, "dst", "$1", "src", "(h)")"#;
    assert_eq!(metric_names(expr), ["a_bucket", "b", "c", "d", "f", "g"]);
    assert_eq!(
        variable_query_names(r#"label_values(tandem_peer_connected{resource=~"$resource"}, peer)"#),
        (vec!["tandem_peer_connected".to_string()], Some("peer".to_string()))
    );
    assert_eq!(variable_query_names("label_values(resource)"), (vec![], Some("resource".to_string())));
}

// ---------------------------------------------------------------------------------------
// The alert rules

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let alerts = alerts_file();
    let check = promtool(&["check", "rules", alerts.to_str().unwrap()]);
    let rules = rules(&read(&alerts));
    assert_eq!(
        promtool_rule_count(&check),
        rules.len(),
        "promtool counts another number of rules than this test reads (a rule this test cannot read?):\n{check}"
    );
    let tests = alert_tests_file();
    let out = promtool(&["test", "rules", tests.to_str().unwrap()]);
    assert!(out.contains("SUCCESS"), "promtool test rules:\n{out}");
}

#[test]
fn every_alert_has_a_case_that_fires_and_one_that_must_not() {
    let rules = rules(&read(&alerts_file()));
    assert!(rules.len() >= 10, "only {} rules read", rules.len());
    let cases = alert_test_cases(&read(&alert_tests_file()));
    for rule in &rules {
        for fires in [true, false] {
            assert!(
                cases.iter().any(|(name, f)| *name == rule.name && *f == fires),
                "{}: no unit test case where it {}",
                rule.name,
                if fires { "fires" } else { "must not fire" }
            );
        }
        for needed in ["severity:", "summary:", "description:"] {
            assert!(rule.text.contains(needed), "{}: no {needed}\n{}", rule.name, rule.text);
        }
    }
    for (name, _) in &cases {
        assert!(rules.iter().any(|r| r.name == *name), "a unit test case for {name}, which is no rule");
    }
}

#[test]
fn alert_rules_use_only_exported_metrics() {
    for rule in rules(&read(&alerts_file())) {
        let names = metric_names(&rule.expr);
        assert!(!names.is_empty(), "{}: no metric found in {:?}", rule.name, rule.expr);
        let unknown = unknown_names(&names);
        assert!(
            unknown.is_empty(),
            "{}: {unknown:?} not exported by the agent (EXPORTED_METRICS) nor Prometheus' own; expr:\n{}",
            rule.name,
            rule.expr
        );
    }
    let series = input_series_names(&read(&alert_tests_file()));
    assert!(!series.is_empty(), "no input series found in the unit tests");
    let unknown = unknown_names(&series);
    assert!(unknown.is_empty(), "the unit tests feed series the agent does not export: {unknown:?}");
}

/// The variants of `pub enum NAME` in `src`, each with the type it wraps if any
/// (`Snapshot(SnapshotCommand)` is ("Snapshot", Some("SnapshotCommand"))).
fn enum_variants(src: &str, name: &str) -> Vec<(String, Option<String>)> {
    let head = format!("pub enum {name} {{");
    let start = src.find(&head).unwrap_or_else(|| panic!("agent/src/cli.rs: no `{head}`"));
    let body = &src[start..];
    let body = &body[..body.find("\n}").unwrap_or_else(|| panic!("end of enum {name}"))];
    body.lines()
        .filter(|l| indent(l) == 4 && l.trim_start().starts_with(|c: char| c.is_ascii_uppercase()))
        .map(|l| {
            let l = l.trim();
            let variant: String = l.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
            let wrapped = l[variant.len()..]
                .strip_prefix('(')
                .and_then(|r| r.split_once(')'))
                .map(|(inner, _)| inner.trim().to_string());
            (variant, wrapped)
        })
        .collect()
}

/// clap's kebab-case of a variant's name: `DumpMd` is `dump-md`.
fn kebab(variant: &str) -> String {
    let mut verb = String::new();
    for (i, c) in variant.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            verb.push('-');
        }
        verb.push(c.to_ascii_lowercase());
    }
    verb
}

/// The CLI's subcommands as typed, each with its own subcommands if it has any
/// (`snapshot` → `create`, `list`, ...): `enum Command`'s variants, and those of the enum a
/// variant wraps.
fn cli_verbs() -> BTreeMap<String, BTreeSet<String>> {
    let cli = read(&repo().join("agent/src/cli.rs"));
    let verbs: BTreeMap<String, BTreeSet<String>> = enum_variants(&cli, "Command")
        .into_iter()
        .map(|(variant, wrapped)| {
            let sub = wrapped
                .map(|e| enum_variants(&cli, &e).into_iter().map(|(v, _)| kebab(&v)).collect())
                .unwrap_or_default();
            (kebab(&variant), sub)
        })
        .collect();
    for known in ["status", "resolve", "connect", "promote"] {
        assert!(verbs.contains_key(known), "agent/src/cli.rs: verb {known} not found in {verbs:?}");
    }
    for (verb, sub) in [("snapshot", "list"), ("snapshot", "delete")] {
        assert!(
            verbs.get(verb).is_some_and(|s| s.contains(sub)),
            "agent/src/cli.rs: no `{verb} {sub}` in {verbs:?}"
        );
    }
    verbs
}

/// The `` `tandem VERB [SUBVERB] ...` `` commands in a text (line breaks count as spaces):
/// the first two words after `tandem`, the second empty unless it is a lowercase word.
fn named_verbs(text: &str) -> Vec<(String, String)> {
    let word =
        |s: &str| -> String { s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect() };
    text.match_indices("`tandem")
        .filter_map(|(at, m)| {
            let rest = &text[at + m.len()..];
            if !rest.starts_with(char::is_whitespace) {
                return None;
            }
            let rest = rest.trim_start();
            let verb = word(rest);
            let rest = rest[verb.len()..].trim_start();
            let sub =
                if rest.starts_with(|c: char| c.is_ascii_lowercase()) { word(rest) } else { String::new() };
            verb.starts_with(|c: char| c.is_ascii_lowercase()).then_some((verb, sub))
        })
        .collect()
}

#[test]
fn alerts_and_docs_name_only_existing_verbs() {
    let verbs = cli_verbs();
    for file in [alerts_file(), monitoring_doc()] {
        let named = named_verbs(&read(&file));
        assert!(!named.is_empty(), "{}: no `tandem VERB` found", file.display());
        for (verb, sub) in &named {
            let subs = verbs.get(verb).unwrap_or_else(|| {
                panic!(
                    "{} names `tandem {verb}`, which agent/src/cli.rs does not have (it has {:?})",
                    file.display(),
                    verbs.keys().collect::<Vec<_>>()
                )
            });
            assert!(
                subs.is_empty() || subs.contains(sub),
                "{} names `tandem {verb} {sub}`: `tandem {verb}` has the subcommands {subs:?}",
                file.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The dashboard

fn dashboard() -> Value {
    serde_json::from_str(&read(&dashboard_file()))
        .unwrap_or_else(|e| panic!("{}: {e}", dashboard_file().display()))
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("dashboard: no panels") {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

/// The panels' expressions: (panel title, expr).
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    for p in panels(dashboard) {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        if let Some(targets) = p["targets"].as_array() {
            for t in targets {
                let expr =
                    t["expr"].as_str().unwrap_or_else(|| panic!("panel {title}: a target without expr"));
                exprs.push((title.clone(), expr.to_string()));
            }
        }
    }
    exprs
}

fn variables(dashboard: &Value) -> &Vec<Value> {
    dashboard["templating"]["list"].as_array().expect("dashboard: no templating.list")
}

/// A query variable's query: a string, or (newer Grafana) an object with `query`.
fn variable_query(v: &Value) -> &str {
    v["query"].as_str().or_else(|| v["query"]["query"].as_str()).unwrap_or("")
}

#[test]
fn dashboard_is_importable_and_uses_only_exported_metrics() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion {}", d["schemaVersion"]);
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "no title");
    assert!(d["uid"].as_str().is_some_and(|t| !t.is_empty()), "no uid");
    assert!(d["id"].is_null(), "a dashboard to import has id null, not {}", d["id"]);

    let vars = variables(&d);
    let var = |name: &str| {
        vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no template variable {name}"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource", "{ds}");
    assert_eq!(ds["query"], "prometheus", "{ds}");
    for (name, label) in [("resource", "resource"), ("peer", "peer")] {
        let v = var(name);
        assert_eq!(v["type"], "query", "{v}");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "variable {name}: {v}");
        let (names, by) = variable_query_names(variable_query(v));
        assert_eq!(by.as_deref(), Some(label), "variable {name} is not label_values(…, {label}): {v}");
        assert!(!names.is_empty(), "variable {name}: no metric in its query");
    }
    let mut used = BTreeSet::new();
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let query = variable_query(v);
        let (names, _) = variable_query_names(query);
        let unknown = unknown_names(&names);
        assert!(
            unknown.is_empty(),
            "variable {}: {unknown:?} not exported (EXPORTED_METRICS): {query}",
            v["name"]
        );
        used.extend(names);
    }

    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().unwrap_or_else(|| panic!("panel {title}: no id"))),
            "panel {title}: id repeated"
        );
        let (x, w) = (p["gridPos"]["x"].as_u64(), p["gridPos"]["w"].as_u64());
        assert!(
            x.zip(w).is_some_and(|(x, w)| w >= 1 && x + w <= 24) && p["gridPos"]["h"].as_u64().is_some(),
            "panel {title}: gridPos {}",
            p["gridPos"]
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {title} is not on the datasource variable"
        );
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        for t in targets.unwrap_or_else(|| panic!("panel {title}: no targets")) {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "panel {title}: a target not on the datasource variable"
            );
        }
    }

    let exprs = dashboard_exprs(&d);
    for (title, expr) in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "panel {title}: no metric in {expr}");
        let unknown = unknown_names(&names);
        assert!(unknown.is_empty(), "panel {title}: {unknown:?} not exported (EXPORTED_METRICS): {expr}");
        used.extend(names);
    }
    let shown: BTreeSet<String> = used.iter().map(|n| family_of(n)).collect();
    let missing: Vec<String> = exported_families().difference(&shown).cloned().collect();
    assert!(missing.is_empty(), "the dashboard shows none of {missing:?}");
}

#[test]
fn dashboard_expressions_parse() {
    let exprs: Vec<(String, String)> = dashboard_exprs(&dashboard())
        .into_iter()
        .map(|(title, expr)| (title, for_prometheus(&expr)))
        .collect();
    promtool_parses("dashboard", &exprs);
}

/// The dashboard's expression with Grafana's variables replaced for Prometheus itself:
/// intervals by durations, the filter variables by "anything".
fn for_prometheus(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "6h")
        .replace("$instance", ".*")
        .replace("$resource", ".*")
        .replace("$peer", ".*")
}

/// Input series for promtool: (series with its labels, value).
type Series = Vec<(String, f64)>;

/// A one-hot family's series for one resource (and peer): 1 for `current`, 0 for the rest.
fn one_hot(metric: &str, label: &str, values: &[&str], current: &str, peer: bool) -> Series {
    values
        .iter()
        .map(|v| {
            let peer = if peer { r#", peer="beta""# } else { "" };
            (
                format!(
                    r#"{metric}{{job="tandem", instance="alpha", resource="mailstore"{peer}, {label}="{v}"}}"#
                ),
                if *v == current { 1.0 } else { 0.0 },
            )
        })
        .collect()
}

fn plain(metric: &str, value: f64, peer: bool) -> (String, f64) {
    let peer = if peer { r#", peer="beta""# } else { "" };
    (format!(r#"{metric}{{job="tandem", instance="alpha", resource="mailstore"{peer}}}"#), value)
}

#[test]
fn dashboard_timelines_show_the_state_the_agent_reports() {
    const ROLES: &[&str] = &["primary", "secondary"];
    const DISKS: &[&str] = &["up_to_date", "outdated", "inconsistent"];
    const REPLICATION: &[&str] =
        &["established", "ahead", "sync_source", "sync_target", "split_brain", "off"];
    // (panel, input series, the text its value mapping must show)
    let mut cases: Vec<(&str, Series, &str)> = Vec::new();
    for role in ROLES {
        let mut series = one_hot("tandem_resource_role", "role", ROLES, role, false);
        series.push(plain("tandem_resource_down", 0.0, false));
        cases.push(("Role", series, role));
    }
    let mut down = one_hot("tandem_resource_role", "role", ROLES, "secondary", false);
    down.push(plain("tandem_resource_down", 1.0, false));
    cases.push(("Role", down, "down"));
    for disk in DISKS {
        cases.push(("Disk state", one_hot("tandem_disk_state", "state", DISKS, disk, false), disk));
    }
    for (connected, text) in [(1.0, "connected"), (0.0, "disconnected")] {
        cases.push(("Peer connection", vec![plain("tandem_peer_connected", connected, true)], text));
    }
    for state in REPLICATION {
        let series = one_hot("tandem_peer_replication_state", "state", REPLICATION, state, true);
        cases.push(("Replication state", series, state));
    }

    let d = dashboard();
    let mut tests = String::from("evaluation_interval: 1m\ntests:\n");
    for (title, series, shows) in &cases {
        let panel = panels(&d)
            .into_iter()
            .find(|p| p["title"] == *title)
            .unwrap_or_else(|| panic!("no panel {title}"));
        assert_eq!(panel["type"], "state-timeline", "panel {title}");
        let targets = panel["targets"].as_array().unwrap();
        assert_eq!(targets.len(), 1, "panel {title}: one query expected");
        let expr = for_prometheus(targets[0]["expr"].as_str().unwrap());
        // The values the panel shows as `shows`; the expression must give the smallest.
        let mut values: Vec<f64> = panel["fieldConfig"]["defaults"]["mappings"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {title}: no value mappings"))
            .iter()
            .filter_map(|m| m["options"].as_object())
            .flat_map(|o| o.iter())
            .filter(|(_, v)| v["text"] == *shows)
            .map(|(k, _)| k.parse().unwrap_or_else(|_| panic!("panel {title}: mapping key {k}")))
            .collect();
        values.sort_by(f64::total_cmp);
        let value =
            *values.first().unwrap_or_else(|| panic!("panel {title}: no value mapping shows {shows}"));
        let labels = if series[0].0.contains("peer=") {
            r#"{instance="alpha", resource="mailstore", peer="beta"}"#
        } else {
            r#"{instance="alpha", resource="mailstore"}"#
        };
        tests.push_str(&format!("  # panel {title} shows {shows}\n  - interval: 1m\n    input_series:\n"));
        for (name, v) in series {
            tests.push_str(&format!(
                "      - series: {}\n        values: '{v}'\n",
                serde_json::to_string(name).unwrap()
            ));
        }
        tests.push_str(&format!(
            "    promql_expr_test:\n      - expr: {}\n        eval_time: 0m\n        exp_samples:\n          - labels: {}\n            value: {value}\n",
            serde_json::to_string(&expr).unwrap(),
            serde_json::to_string(labels).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("timelines.test.yml");
    std::fs::write(&file, &tests).unwrap();
    let (ok, out) = promtool_run(&["test", "rules", file.to_str().unwrap()]);
    assert!(ok, "a timeline shows another state than the one its series report:\n{out}\nthe tests:\n{tests}");
}

// ---------------------------------------------------------------------------------------
// docs/monitoring.md

/// The bodies of the fenced code blocks tagged `lang`.
fn code_blocks(text: &str, lang: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match &mut current {
            None if line.trim() == format!("```{lang}") => current = Some(String::new()),
            Some(body) if line.trim() == "```" => {
                blocks.push(std::mem::take(body));
                current = None;
            }
            Some(body) => {
                body.push_str(line);
                body.push('\n');
            }
            None => {}
        }
    }
    blocks
}

#[test]
fn the_docs_table_lists_exactly_the_exported_metrics() {
    let doc = read(&monitoring_doc());
    let mut listed = BTreeSet::new();
    for row in doc.lines().filter(|l| l.starts_with("| `tandem_")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`').to_string();
        let kind = cells[2];
        assert_eq!(
            kind.contains("histogram"),
            is_histogram(&name),
            "docs/monitoring.md: {name} is listed as {kind:?}; EXPORTED_METRICS says histogram: {}",
            is_histogram(&name)
        );
        assert!(listed.insert(name.clone()), "docs/monitoring.md lists {name} twice");
    }
    let exported = exported_families();
    let undocumented: Vec<&String> = exported.difference(&listed).collect();
    let unexported: Vec<&String> = listed.difference(&exported).collect();
    assert!(
        undocumented.is_empty() && unexported.is_empty(),
        "docs/monitoring.md's table against EXPORTED_METRICS: not in the table {undocumented:?}, not exported {unexported:?}"
    );
}

#[test]
fn the_docs_queries_and_scrape_config_are_valid() {
    let doc = read(&monitoring_doc());
    let mut exprs = Vec::new();
    for block in code_blocks(&doc, "promql") {
        for line in block.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let names = metric_names(line);
            assert!(!names.is_empty(), "docs/monitoring.md: no metric in {line}");
            let unknown = unknown_names(&names);
            assert!(
                unknown.is_empty(),
                "docs/monitoring.md: {unknown:?} not exported (EXPORTED_METRICS): {line}"
            );
            exprs.push(("docs/monitoring.md".to_string(), line.to_string()));
        }
    }
    promtool_parses("docs/monitoring.md", &exprs);

    let configs: Vec<String> =
        code_blocks(&doc, "yaml").into_iter().filter(|b| b.contains("scrape_configs:")).collect();
    assert_eq!(configs.len(), 1, "docs/monitoring.md: expected one prometheus.yml example");
    assert!(
        configs[0].contains("job_name: tandem"),
        "the scrape job must be `tandem` (the alerts use up{{job=\"tandem\"}})"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(alerts_file(), dir.path().join("tandem-alerts.yml")).unwrap();
    let config = configs[0].replace("/etc/prometheus/", &format!("{}/", dir.path().display()));
    assert!(
        config.contains(dir.path().join("tandem-alerts.yml").to_str().unwrap()),
        "the example loads no tandem-alerts.yml"
    );
    let file = dir.path().join("prometheus.yml");
    std::fs::write(&file, config).unwrap();
    promtool(&["check", "config", file.to_str().unwrap()]);
}

// ---------------------------------------------------------------------------------------
// docs/operations.md, "Events" (`tandem events`, records: agent/src/events.rs)

/// The "Events" section of docs/operations.md.
fn events_section() -> String {
    let ops = read(&repo().join("docs/operations.md"));
    let start = ops.find("\n## Events\n").expect("docs/operations.md: no section \"## Events\"");
    let rest = &ops[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    rest[..end].to_string()
}

/// The strings `as_str` gives for `enum_name`'s variants in agent/src/events.rs
/// (`Kind::SnapshotTaken => "snapshot-taken",`).
fn events_as_str(src: &str, enum_name: &str) -> Vec<String> {
    let prefix = format!("{enum_name}::");
    let found: Vec<String> = src
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(&prefix) && l.contains("=> \""))
        .filter_map(|l| l.split('"').nth(1).map(str::to_string))
        .collect();
    assert!(found.len() >= 5, "agent/src/events.rs: too few {enum_name}::… => \"…\" arms: {found:?}");
    found
}

/// The keys of the text form: the identity keys and the fields of `Record::render`
/// (`("name", self.name…` and `opt("role", …`).
fn events_field_keys(src: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for (at, _) in src.match_indices("opt(\"").chain(src.match_indices("(\"")) {
        let rest = &src[at..];
        let rest = rest.strip_prefix("opt(\"").or_else(|| rest.strip_prefix("(\"")).unwrap();
        let Some((key, after)) = rest.split_once('"') else { continue };
        let ident = after.starts_with(", self.");
        let field = src[at..].starts_with("opt(");
        if (ident || field)
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '-')
            && !keys.contains(&key.to_string())
        {
            keys.push(key.to_string());
        }
    }
    assert!(keys.len() >= 10, "agent/src/events.rs: too few record keys found: {keys:?}");
    keys
}

/// Splits a text-form record at the spaces outside JSON strings.
fn event_tokens(line: &str) -> Vec<String> {
    let mut tokens = vec![String::new()];
    let (mut quoted, mut escaped) = (false, false);
    for c in line.chars() {
        match c {
            ' ' if !quoted => tokens.push(String::new()),
            _ => {
                if quoted && !escaped && c == '\\' {
                    escaped = true;
                } else {
                    if c == '"' && !escaped {
                        quoted = !quoted;
                    }
                    escaped = false;
                }
                tokens.last_mut().unwrap().push(c);
            }
        }
    }
    tokens.retain(|t| !t.is_empty());
    tokens
}

/// The text form's number-valued keys (the others are words, `yes`/`no`, `-` or strings).
const EVENT_NUMBER_KEYS: &[&str] =
    &["size", "out-of-sync", "seq", "done", "total", "percent", "exit-code", "lost"];

/// A text-form record as its JSON form (keys with `_`, `-` as null, `yes`/`no` as booleans).
fn event_line_as_json(line: &str) -> Value {
    let tokens = event_tokens(line);
    assert!(tokens.len() >= 3, "not TIME KIND OBJECT: {line}");
    let mut json = serde_json::Map::new();
    for (key, v) in ["time", "kind", "object"].iter().zip(&tokens) {
        json.insert(key.to_string(), Value::String(v.clone()));
    }
    for t in &tokens[3..] {
        let (key, v) = t.split_once(':').unwrap_or_else(|| panic!("{t:?} is not key:value in {line}"));
        let value = if v.starts_with('"') {
            Value::String(serde_json::from_str(v).unwrap_or_else(|e| panic!("{t}: {e} in {line}")))
        } else if v == "-" {
            Value::Null
        } else if key == "down" {
            Value::Bool(match v {
                "yes" => true,
                "no" => false,
                _ => panic!("down:{v} is not yes/no in {line}"),
            })
        } else if EVENT_NUMBER_KEYS.contains(&key) {
            serde_json::from_str(v).unwrap_or_else(|e| panic!("{t}: not a number ({e}) in {line}"))
        } else {
            Value::String(v.to_string())
        };
        assert!(json.insert(key.replace('-', "_"), value).is_none(), "{key} twice in {line}");
    }
    Value::Object(json)
}

#[test]
fn the_events_docs_name_every_kind_object_and_field_and_their_examples_are_what_the_agent_prints() {
    let section = events_section();
    let src = read(&repo().join("agent/src/events.rs"));
    let mut missing = Vec::new();
    for word in events_as_str(&src, "Kind")
        .into_iter()
        .chain(events_as_str(&src, "Object"))
        .chain(events_field_keys(&src))
    {
        if !section.contains(&format!("`{word}`")) && !missing.contains(&word) {
            missing.push(word);
        }
    }
    assert!(
        missing.is_empty(),
        "docs/operations.md, \"Events\", does not name these kinds, objects or keys of agent/src/events.rs: {missing:?}"
    );

    // Every example line, read back as a record, renders exactly as written: its kind,
    // object, keys, their order and the values' spelling are the agent's.
    let lines: Vec<String> = code_blocks(&section, "")
        .iter()
        .flat_map(|b| b.lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(lines.len() >= 10, "docs/operations.md, \"Events\": too few example records: {lines:?}");
    for line in &lines {
        let json = event_line_as_json(line);
        let record: tandem_agent::events::Record = serde_json::from_value(json.clone())
            .unwrap_or_else(|e| panic!("docs/operations.md, \"Events\": {line}\nis no record ({e}): {json}"));
        assert_eq!(
            &record.render(),
            line,
            "docs/operations.md, \"Events\": the agent prints this example otherwise"
        );
    }
    for kind in ["snapshot-taken", "snapshot-deleted", "snapshot-invalid"] {
        assert!(
            lines.iter().any(|l| l.split(' ').nth(1) == Some(kind)),
            "docs/operations.md, \"Events\": no example of {kind}"
        );
    }
}
