//! The deploy files, each checked by the real tool (README.md, "Deploy files"):
//!
//! - `deploy/systemd/*.service`: `systemd-analyze verify` (no warning allowed), `systemd-analyze
//!   security --offline` (exposure at most 2.0), and the `ExecStart=` command line parsed by
//!   pgferry itself (`--help` appended);
//! - `deploy/prometheus/pgferry-alerts.yml`: `promtool check rules` and `promtool test rules
//!   pgferry-alerts.test.yml`, every alert covered by a test;
//! - the `/metrics` of two running `pgferry run` processes: `promtool check metrics` (no lint
//!   finding allowed); every metric name the Grafana dashboard (`deploy/grafana`) and the
//!   alerting rules query is one those processes export;
//! - a secret given as `${file:<relative path>}`, as the units' credentials are, resolves
//!   against the working directory.
//!
//! The tools come from Debian's `systemd` and `prometheus` packages (deploy/local/install.sh);
//! a missing tool fails the test, naming the package.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pgferry_integration_tests::{free_local_addr, http_get, metric, pgferry_bin, wait_until, Cluster};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `program args…` (stdin: `input`), returning its exit code and stdout + stderr. A
/// program that is not installed is an error naming the Debian package that has it.
fn run_tool(
    program: &str,
    package: &str,
    args: &[&str],
    cwd: Option<&Path>,
    input: Option<&str>,
) -> Result<(i32, String)> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{program} is not installed: it is in Debian's `{package}` package, which deploy/local/install.sh installs (apt-get install {package})"
        ),
        Err(e) => return Err(e).with_context(|| format!("running {program}")),
    };
    if let Some(text) = input {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}

fn unit_files() -> Result<Vec<PathBuf>> {
    let mut units: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/systemd"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    units.retain(|p| p.extension().is_some_and(|e| e == "service"));
    units.sort();
    Ok(units)
}

/// A unit's single-valued key (the last assignment wins, as in systemd).
fn unit_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .last()
}

#[test]
fn systemd_units_pass_systemd_analyze() -> Result<()> {
    let units = unit_files()?;
    let names: Vec<String> = units
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["pgferry-apply@.service", "pgferry-capture@.service", "pgferry@.service"],
        "the units README.md describes"
    );
    let bin = pgferry_bin().canonicalize().with_context(|| {
        format!(
            "{} (build it with `cargo build --bin pgferry`)",
            pgferry_bin().display()
        )
    })?;
    let dir = std::env::temp_dir().join(format!("pgferry-units-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for (path, name) in units.iter().zip(&names) {
        let text = std::fs::read_to_string(path)?;
        for hardening in [
            "DynamicUser=yes",
            "ProtectSystem=strict",
            "WorkingDirectory=%d",
            "LoadCredential=pg-password:/etc/pgferry/credentials/pg-password",
            "NoNewPrivileges=yes",
        ] {
            assert!(text.lines().any(|l| l == hardening), "{name}: no {hardening}");
        }
        // systemd-analyze verify checks that ExecStart's program exists: point it at the build.
        assert!(text.contains("ExecStart=/usr/local/bin/pgferry "), "{name}");
        let local = text.replace("/usr/local/bin/pgferry", &bin.to_string_lossy());
        std::fs::write(dir.join(name), local)?;
        let instance = name.replace("@.", "@n1.");
        let _ = std::fs::remove_file(dir.join(&instance));
        std::os::unix::fs::symlink(name, dir.join(&instance))?;
        let unit = dir.join(&instance).to_string_lossy().into_owned();

        let (code, out) = run_tool("systemd-analyze", "systemd", &["verify", &unit], None, None)?;
        assert!(
            code == 0 && out.trim().is_empty(),
            "systemd-analyze verify {name}: exit {code}\n{out}"
        );
        // Exposure 0.0 (locked down) to 10.0; the units are at 1.2.
        let (code, out) = run_tool(
            "systemd-analyze",
            "systemd",
            &["security", "--offline=true", "--threshold=20", &unit],
            None,
            None,
        )?;
        assert_eq!(code, 0, "systemd-analyze security {name}: exposure above 2.0\n{out}");

        // The command line is one pgferry accepts (--help: parsed, nothing run).
        let exec = unit_value(&text, "ExecStart").context("ExecStart")?;
        let mut line = exec.replace("%i", "n1");
        for env in text.lines().filter_map(|l| l.strip_prefix("Environment=")) {
            let (k, v) = env.split_once('=').context("Environment=K=V")?;
            line = line.replace(&format!("${{{k}}}"), v);
        }
        assert!(!line.contains('$') && !line.contains('%'), "{name}: unexpanded {line}");
        let args: Vec<&str> = line.split_whitespace().skip(1).collect();
        let out = Command::new(&bin).args(&args).arg("--help").output()?;
        assert!(
            out.status.success(),
            "{name}: pgferry refuses `{line}`: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `- alert: Name` / `- record: name` of a rules file.
fn rule_names(yaml: &str, kind: &str) -> Vec<String> {
    let prefix = format!("- {kind}: ");
    yaml.lines()
        .filter_map(|l| l.trim_start().strip_prefix(&prefix))
        .map(|s| s.trim().to_string())
        .collect()
}

/// The `expr:` values of a rules file (plain, or a `>-` block).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        i += 1;
        let Some(value) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if [">-", ">", "|", "|-"].contains(&value) {
            let indent = line.len() - trimmed.len();
            let mut parts = Vec::new();
            while i < lines.len() {
                let l = lines[i];
                let t = l.trim_start();
                if t.is_empty() || l.len() - t.len() <= indent {
                    break;
                }
                parts.push(t);
                i += 1;
            }
            out.push(parts.join(" "));
        } else {
            out.push(value.trim_matches('\'').to_string());
        }
    }
    out
}

#[test]
fn alerting_rules_pass_promtool() -> Result<()> {
    let dir = repo().join("deploy/prometheus");
    let (code, out) = run_tool(
        "promtool",
        "prometheus",
        &["check", "rules", "pgferry-alerts.yml"],
        Some(dir.as_path()),
        None,
    )?;
    assert_eq!(code, 0, "promtool check rules:\n{out}");
    let (code, out) = run_tool(
        "promtool",
        "prometheus",
        &["test", "rules", "pgferry-alerts.test.yml"],
        Some(dir.as_path()),
        None,
    )?;
    assert_eq!(code, 0, "promtool test rules:\n{out}");
    // Every alert has a test.
    let rules = std::fs::read_to_string(dir.join("pgferry-alerts.yml"))?;
    let tests = std::fs::read_to_string(dir.join("pgferry-alerts.test.yml"))?;
    let alerts: BTreeSet<String> = rule_names(&rules, "alert").into_iter().collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    for alert in &alerts {
        assert!(
            tests.contains(&format!("alertname: {alert}\n        exp_alerts:\n          - ")),
            "no test of pgferry-alerts.test.yml expects {alert} to fire"
        );
    }
    Ok(())
}

/// Metric names a PromQL expression reads: identifiers that are not functions, keywords, label
/// lists of `by (…)`/`on (…)`…, or inside `{…}`, `[…]`, strings and `$variables`.
fn promql_metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "atan2", // operators, constants
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
        "quantile", // aggregations, also as `sum by (…) (…)`
    ];
    const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    let c: Vec<char> = expr.chars().collect();
    // Past the string whose opening quote `q` is just before `i`.
    let skip_string = |mut i: usize, q: char| {
        while i < c.len() && c[i] != q {
            i += if c[i] == '\\' && q != '`' { 2 } else { 1 };
        }
        i + 1
    };
    // Past the `close` that ends the bracket opened just before `i` (strings inside skipped).
    let skip_to = |mut i: usize, close: char| {
        while i < c.len() && c[i] != close {
            i = if "\"'`".contains(c[i]) {
                skip_string(i + 1, c[i])
            } else {
                i + 1
            };
        }
        i + 1
    };
    let mut names = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i = skip_string(i + 1, ch);
        } else if ch == '{' {
            i = skip_to(i + 1, '}');
        } else if ch == '[' {
            i = skip_to(i + 1, ']');
        } else if ch == '$' || ch.is_ascii_digit() || ch == '.' {
            // A variable ($node, ${x}), or a number or duration (0.5, 1e6, 5m).
            i += 1;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || "_.{}".contains(c[i])) {
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' {
            let start = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let mut j = i;
            while j < c.len() && c[j].is_whitespace() {
                j += 1;
            }
            let call = j < c.len() && c[j] == '(';
            if LABEL_LISTS.contains(&word.as_str()) {
                if call {
                    i = skip_to(j + 1, ')');
                }
            } else if !call && !KEYWORDS.contains(&word.to_lowercase().as_str()) {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_metric_names_finds_the_metrics() {
    let names = promql_metric_names(
        r#"histogram_quantile(0.99, sum by (node, le) (rate(a_bucket{node=~"$node", x="}"}[$__rate_interval]))) / on(origin) group_left(b) c offset 1h > 1e6 unless label_replace(d > 60, "origin", "$1", "node", "(.+)") and bool e:rec"#,
    );
    assert_eq!(names, ["a_bucket", "c", "d", "e:rec"]);
}

/// Every query of the Grafana dashboard: targets' `expr` and the variables' `label_values(…)`.
fn dashboard_queries(value: &serde_json::Value, exprs: &mut Vec<String>, label_values: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => exprs.push(s.clone()),
                    ("query" | "definition", serde_json::Value::String(s)) if s.starts_with("label_values") => {
                        label_values.push(s.clone())
                    }
                    _ => dashboard_queries(v, exprs, label_values),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, exprs, label_values)),
        _ => {}
    }
}

/// Sample names in a Prometheus text exposition, each with the label names it carries.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let entry = out.entry(name.to_string()).or_default();
        for kv in labels.trim_end_matches('}').split(',').filter(|kv| !kv.is_empty()) {
            if let Some((k, _)) = kv.split_once('=') {
                entry.insert(k.to_string());
            }
        }
    }
    out
}

const SETUP: &str = "CREATE TABLE t (id int PRIMARY KEY, v text);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_pass_promtool_and_feed_the_dashboard_and_rules() -> Result<()> {
    let cluster = Cluster::start("deployfiles", &["r1", "r1"], SETUP, &["public.t"]).await?;
    // A conflict on each node: the same key inserted on both before replication runs.
    for i in 0..2 {
        cluster
            .sql(i)
            .await?
            .batch_execute(&format!("INSERT INTO t VALUES (0, 'n{i}')"))
            .await?;
    }
    let addrs = [free_local_addr()?, free_local_addr()?];
    let _n1 = cluster.spawn_with("run", 0, &["--metrics-listen", &addrs[0]])?;
    let _n2 = cluster.spawn_with("run", 1, &["--metrics-listen", &addrs[1]])?;
    for i in 0..2 {
        cluster
            .sql(i)
            .await?
            .batch_execute(&format!(
                "INSERT INTO t SELECT g, 'n{i}' FROM generate_series({}, {}) g; UPDATE t SET v = 'u' WHERE id = {}; DELETE FROM t WHERE id = {}",
                1 + i * 100,
                50 + i * 100,
                2 + i * 100,
                3 + i * 100
            ))
            .await?;
    }
    cluster
        .wait_converged("t", Duration::from_secs(90))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    // Both processes export every family the dashboard reads: applied transactions, a conflict,
    // the slot gauge (polled every 5 s).
    for (i, addr) in addrs.iter().enumerate() {
        let node = cluster.nodes[i].name.clone();
        wait_until(
            "the conflict, an applied group and the slot gauge",
            Duration::from_secs(60),
            || {
                let node = node.clone();
                async move {
                    let (_, text) = http_get(addr, "/metrics").await?;
                    let l = [("node", node.as_str())];
                    Ok(metric(&text, "pgferry_apply_conflicts_total", &l).is_some()
                        && metric(&text, "pgferry_apply_group_transactions_count", &l).is_some()
                        && metric(&text, "pgferry_capture_slot_retained_wal_bytes", &l).is_some()
                        && metric(&text, "pgferry_healthy", &[("service", "apply")]) == Some(1.0))
                }
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    }

    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for addr in &addrs {
        let (status, text) = http_get(addr, "/metrics").await?;
        assert_eq!(status, 200);
        let (code, out) = run_tool("promtool", "prometheus", &["check", "metrics"], None, Some(&text))?;
        assert!(
            code == 0 && out.trim().is_empty(),
            "promtool check metrics: exit {code}\n{out}\n{text}"
        );
        for (name, labels) in exported(&text) {
            names.entry(name).or_default().extend(labels);
        }
    }

    // The dashboard reads only what pgferry exports.
    let path = repo().join("deploy/grafana/pgferry-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let (mut exprs, mut label_values) = (Vec::new(), Vec::new());
    dashboard_queries(&dashboard, &mut exprs, &mut label_values);
    assert!(exprs.len() >= 20, "{exprs:?}");
    for expr in &exprs {
        let used = promql_metric_names(expr);
        assert!(!used.is_empty(), "dashboard query reads no metric: {expr}");
        for name in used {
            assert!(
                names.contains_key(&name),
                "dashboard query reads {name}, which pgferry does not export: {expr}\nexported: {:?}",
                names.keys()
            );
        }
    }
    assert!(!label_values.is_empty(), "the node variable");
    for q in &label_values {
        let args = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .with_context(|| format!("variable query {q}"))?;
        let (name, label) = args.split_once(',').with_context(|| format!("variable query {q}"))?;
        let labels = names.get(name.trim());
        assert!(
            labels.is_some_and(|l| l.contains(label.trim())),
            "dashboard variable {q}: no such metric or label exported"
        );
    }

    // So do the alerting rules (besides Prometheus's own `up` and the file's recording rules).
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/pgferry-alerts.yml"))?;
    let records: BTreeSet<String> = rule_names(&rules, "record").into_iter().collect();
    let exprs = rule_exprs(&rules);
    assert!(exprs.len() >= 10, "{exprs:?}");
    for expr in &exprs {
        for name in promql_metric_names(expr) {
            assert!(
                name == "up" || records.contains(&name) || names.contains_key(&name),
                "alerting rule reads {name}, which pgferry does not export: {expr}"
            );
        }
    }

    // The units' credentials: `${file:pg-password}` read from the working directory (the
    // credentials directory, WorkingDirectory=%d).
    let creds = cluster.dir.join("credentials");
    std::fs::create_dir_all(&creds)?;
    let mut config = std::fs::read_to_string(&cluster.config_path)?;
    for node in &cluster.nodes {
        let (userinfo, _) = node.dsn.split_once('@').context("dsn user@host")?;
        let (_, password) = userinfo.rsplit_once(':').context("dsn password")?;
        std::fs::write(creds.join("pg-password"), format!("{password}\n"))?;
        let with_ref = node.dsn.replacen(&format!(":{password}@"), ":${file:pg-password}@", 1);
        config = config.replace(&node.dsn, &with_ref);
    }
    assert!(config.contains("${file:pg-password}"), "{config}");
    let config_path = cluster.dir.join("credentials.toml");
    std::fs::write(&config_path, config)?;
    let diff = |cwd: &Path| {
        Command::new(pgferry_bin())
            .arg("--config")
            .arg(&config_path)
            .args(["diff", "--table", "public.t", "-q"])
            .current_dir(cwd)
            .output()
    };
    let out = diff(&creds)?;
    assert!(
        out.status.success(),
        "pgferry diff with the password from ./pg-password: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = diff(&cluster.dir)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("cannot read secret file pg-password"),
        "{stderr}"
    );

    drop((_n1, _n2));
    cluster.cleanup().await
}
