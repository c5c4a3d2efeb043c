//! The operator files in `deploy/`: the Prometheus scrape config and alert rules pass Prometheus'
//! own `promtool` (config, rules, and the rules' unit tests), and the Grafana dashboard parses and
//! references only metrics that `docs/metrics.md` documents AND that a live scrape of the four
//! real services shows.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use securellm_e2e::{Metrics, Options, Stack, documented_metrics, promtool, run_promtool};
use securellm_testkit::workspace_root;

fn deploy(rel: &str) -> PathBuf {
    workspace_root().join("deploy").join(rel)
}

/// The metric names a PromQL expression reads: identifiers that are not functions, aggregations,
/// keywords, label names (in `{…}`, `by (…)`, `without (…)`, `on (…)`, `ignoring (…)`,
/// `group_left/right (…)`), string literals or durations.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    // Drop string literals, label matchers and range/subquery brackets.
    let mut flat = String::new();
    let mut depth_brace = 0;
    let mut depth_bracket = 0;
    let mut in_str: Option<char> = None;
    for c in expr.chars() {
        if let Some(q) = in_str {
            if c == q {
                in_str = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => in_str = Some(c),
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '[' => depth_bracket += 1,
            ']' => depth_bracket -= 1,
            _ if depth_brace > 0 || depth_bracket > 0 => {}
            c => flat.push(c),
        }
        if c == '}' || c == ']' {
            flat.push(' ');
        }
    }
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "inf",
        "nan",
    ];
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = flat.chars().collect();
    let mut out = BTreeSet::new();
    let mut i = 0;
    let mut skip_group = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() || c == '.' {
            // A number (with exponent or unit letters): skip it whole.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            // A function call, or an aggregation with its grouping first (`sum by (…) (…)`).
            let next: String = chars[j..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
                .collect();
            let call = (j < chars.len() && chars[j] == '(')
                || matches!(next.to_ascii_lowercase().as_str(), "by" | "without");
            if GROUPING.contains(&word.to_ascii_lowercase().as_str()) {
                skip_group = true;
            } else if !call && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                out.insert(word);
            }
            continue;
        }
        if c == '(' && skip_group {
            // Label names of a grouping clause.
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            skip_group = false;
        }
        i += 1;
    }
    out
}

/// Every `expr` string of the dashboard (panels, rows' panels, targets).
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                if k == "expr"
                    && let Some(s) = v.as_str()
                {
                    out.push(s.to_string());
                } else {
                    dashboard_exprs(v, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

fn dashboard() -> serde_json::Value {
    let p = deploy("grafana/securellm.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
}

/// The metric names the dashboard reads, a histogram `x` as `x_bucket` (as written).
fn dashboard_metrics() -> BTreeSet<String> {
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard(), &mut exprs);
    assert!(exprs.len() >= 20, "{} expressions", exprs.len());
    exprs.iter().flat_map(|e| promql_metrics(e)).collect()
}

/// The metric names the alert rules read (`up` is Prometheus' own).
fn alert_metrics() -> BTreeSet<String> {
    let p = deploy("prometheus/alerts.yml");
    let text = std::fs::read_to_string(&p).unwrap();
    let mut out = BTreeSet::new();
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        if let Some(rest) = l.trim_start().strip_prefix("expr:") {
            let mut expr = rest.trim().trim_start_matches('|').to_string();
            let indent = l.len() - l.trim_start().len();
            while let Some(next) = lines.peek() {
                if next.trim().is_empty() || next.len() - next.trim_start().len() > indent {
                    expr.push(' ');
                    expr.push_str(next.trim());
                    lines.next();
                } else {
                    break;
                }
            }
            out.extend(promql_metrics(&expr));
        }
    }
    out.remove("up");
    out
}

/// A histogram's series names map to the family the catalogue documents.
fn family(name: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && base.ends_with("_seconds")
        {
            return base;
        }
    }
    name
}

#[test]
fn promql_metric_names_are_extracted() {
    let e = r#"histogram_quantile(0.95, sum by (le, model) (rate(securellm_x_seconds_bucket{model=~"a|b"}[5m]))) / on (gpu) group_left (x) foo_total offset 5m > 0.5 and bool up == 1e3 + max without(a) (bar) + sum(baz) by (q)"#;
    let got = promql_metrics(e);
    let want: BTreeSet<String> = [
        "securellm_x_seconds_bucket",
        "foo_total",
        "up",
        "bar",
        "baz",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(got, want);
}

#[test]
fn promtool_accepts_the_scrape_config_the_alert_rules_and_their_unit_tests() {
    let Some(p) = promtool() else { return };
    let dir = deploy("prometheus");
    for args in [
        &["check", "config", "prometheus.yml"][..],
        &["check", "rules", "alerts.yml"],
        &["test", "rules", "alerts_test.yml"],
    ] {
        let out = std::process::Command::new(&p)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The scrape config has a job per service on its documented default port.
    let cfg = std::fs::read_to_string(dir.join("prometheus.yml")).unwrap();
    for (job, port) in [
        ("vram-scheduler", 9451),
        ("registry", 9452),
        ("backend-manager", 9453),
        ("securellm-gateway", 9454),
    ] {
        assert!(cfg.contains(&format!("job_name: {job}")), "job {job}");
        assert!(cfg.contains(&format!("127.0.0.1:{port}")), "port {port}");
    }
    // A rule file that does not parse is refused (the check can fail).
    let (ok, out) = run_promtool(
        &p,
        &["check", "rules"],
        "groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: rate(\n",
    );
    assert!(!ok, "a broken rule file passed: {out}");
}

#[test]
fn the_dashboard_and_the_alerts_reference_only_documented_metrics() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "schemaVersion"
    );
    let vars = d["templating"]["list"].as_array().expect("templating");
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus datasource variable"
    );
    let documented = documented_metrics();
    let used: BTreeSet<String> = dashboard_metrics()
        .into_iter()
        .chain(alert_metrics())
        .collect();
    let undocumented: Vec<&String> = used
        .iter()
        .filter(|n| !documented.contains(family(n)))
        .collect();
    assert!(
        undocumented.is_empty(),
        "names not in docs/metrics.md: {undocumented:?}"
    );
    // The panels the operator needs.
    let titles: Vec<String> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["title"].as_str().map(str::to_lowercase))
        .collect();
    for want in [
        "gpu memory",
        "leases",
        "queue",
        "loads",
        "time to first token",
        "tokens/s",
        "requests/s by status",
        "429",
        "upstream errors",
        "audit",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(want)),
            "no panel about {want:?}: {titles:?}"
        );
    }
    // Every panel reads the datasource variable.
    for p in d["panels"].as_array().unwrap() {
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_read_appears_in_a_live_scrape() {
    // As an operator runs it with the dashboard: traces exported (to a real OTLP receiver).
    let rx = securellm_testkit::otlp::OtlpReceiver::start().await;
    let s = Stack::start(Options {
        env: vec![("OTEL_EXPORTER_OTLP_ENDPOINT".into(), rx.endpoint())],
        ..Default::default()
    })
    .await;
    // Traffic that touches every code path a panel shows: a load, a stream, a 429, a bad key.
    assert_eq!(s.chat(&s.api_key, "tiny", 4, "dash-1").await.status, 200);
    let resp = s.chat_stream(&s.api_key, "tiny", 8, "dash-2").await;
    let out = securellm_e2e::read_sse(resp, Duration::from_secs(30), |_| {}).await;
    assert!(out.done(), "{out:?}");
    let limited = s.create_key("dash-limited", &["*"], Some(1)).await;
    assert_eq!(s.chat(&limited, "tiny", 2, "dash-3").await.status, 200);
    assert_eq!(s.chat(&limited, "tiny", 2, "dash-4").await.status, 429);
    assert_eq!(s.chat("sk-wrong", "tiny", 2, "dash-5").await.status, 401);
    s.audited(&["dash-1", "dash-2", "dash-3", "dash-4", "dash-5"])
        .await;
    rx.wait_for_shared_trace(4, Duration::from_secs(20))
        .await
        .expect("spans of the four services");
    let mut scraped = BTreeSet::new();
    for svc in s.services() {
        scraped.extend(Metrics::parse(&s.scrape(svc).await).names());
    }
    let used: BTreeSet<String> = dashboard_metrics()
        .into_iter()
        .chain(alert_metrics())
        .collect();
    let missing: Vec<&String> = used.iter().filter(|n| !scraped.contains(*n)).collect();
    // Everything exported is in the catalogue (the contract).
    let documented = documented_metrics();
    let not_documented: Vec<&String> = scraped
        .iter()
        .filter(|n| !documented.contains(family(n)))
        .collect();
    // And the catalogue itself: every documented name is exported.
    let documented_missing: Vec<&String> = documented
        .iter()
        .filter(|n| !scraped.contains(*n))
        .collect();
    assert!(
        missing.is_empty() && documented_missing.is_empty() && not_documented.is_empty(),
        "the dashboard or the alerts read metrics no service exported in a live scrape: \
         {missing:?}\ndocs/metrics.md documents metrics no service exported: \
         {documented_missing:?}\nexported but not in docs/metrics.md: {not_documented:?}\n\
         (scraped: {scraped:?})"
    );
}
