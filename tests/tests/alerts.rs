//! The alerting rules of `deploy/prometheus/wiremesh-rules.yaml` through Debian's
//! `promtool` (installed by `scripts/deps.sh --k8s`; these tests fail without it, they do
//! not skip): the file checks, every alert has a unit test file with a case where it fires
//! and one where it does not, the tests pass and fail once the alert cannot fire; and the
//! chart's PrometheusRule carries the same rules.

// The tests print what promtool said (shown with --nocapture).
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
use serde_yaml::Value;
use wiremesh_lab::deploy::{self, helm};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/helm/wiremesh");

fn rules_file() -> PathBuf {
    deploy::deploy_dir().join("prometheus/wiremesh-rules.yaml")
}

fn tests_dir() -> PathBuf {
    deploy::deploy_dir().join("prometheus/tests")
}

#[test]
fn every_alert_is_checked_and_unit_tested_firing_and_not() -> Result<()> {
    let rules = rules_file();
    let checked = promtool(&["check", "rules", path_str(&rules)?])?;
    let alerts = alert_names(&read_yaml(&rules)?)?;
    ensure!(
        checked.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{checked}"
    );
    println!("{}: {alerts:?}", rules.display());
    for name in [
        "WiremeshTunnelDown",
        "WiremeshHandshakeStale",
        "WiremeshPacketDrops",
        "WiremeshPeerClusterStale",
        "WiremeshPeerClusterConflict",
    ] {
        ensure!(alerts.iter().any(|a| a == name), "no alert {name}");
    }

    // One test file per alert, named after it, testing only it, firing and not firing.
    let mut files = Vec::new();
    for entry in std::fs::read_dir(tests_dir())? {
        let path = entry?.path();
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        ensure!(
            alerts.contains(&stem),
            "{} tests no alert of the rules file",
            path.display()
        );
        files.push(path);
    }
    files.sort();
    for alert in &alerts {
        let path = tests_dir().join(format!("{alert}.yaml"));
        let (firing, quiet) =
            cases(&read_yaml(&path)?, alert).with_context(|| format!("{}", path.display()))?;
        ensure!(
            firing > 0 && quiet > 0,
            "{}: {firing} evaluations where {alert} fires, {quiet} where it does not",
            path.display()
        );
    }
    let mut args = vec!["test", "rules"];
    for f in &files {
        args.push(path_str(f)?);
    }
    let tested = promtool(&args)?;
    println!("{tested}");
    ensure!(
        tested.matches("SUCCESS").count() == alerts.len(),
        "{tested}"
    );

    // The tests bite: with one alert made unable to fire, its file fails.
    let scratch = tempdir("wiremesh-alerts")?;
    std::fs::create_dir_all(scratch.join("tests"))?;
    for alert in &alerts {
        let mut broken = read_yaml(&rules)?;
        for rule in rules_mut(&mut broken)? {
            if rule["alert"].as_str() == Some(alert.as_str()) {
                rule["expr"] = Value::from("vector(1) < 0");
            }
        }
        std::fs::write(
            scratch.join("wiremesh-rules.yaml"),
            serde_yaml::to_string(&broken)?,
        )?;
        let test = scratch.join("tests").join(format!("{alert}.yaml"));
        std::fs::copy(tests_dir().join(format!("{alert}.yaml")), &test)?;
        let err = promtool(&["test", "rules", path_str(&test)?])
            .err()
            .ok_or_else(|| anyhow!("the tests of {alert} pass when it cannot fire"))?;
        ensure!(format!("{err:#}").contains("FAILED"), "{err:#}");
    }
    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}

#[test]
fn the_chart_ships_the_same_rules_as_a_prometheus_rule_off_by_default() -> Result<()> {
    let plain = std::fs::read(rules_file())?;
    let copy = Path::new(CHART).join("files/wiremesh-rules.yaml");
    ensure!(
        std::fs::read(&copy)? == plain,
        "{} differs from deploy/prometheus/wiremesh-rules.yaml: run `make manifests`",
        copy.display()
    );
    let rendered = helm(
        &[
            "template",
            "wiremesh",
            CHART,
            "--namespace",
            "wiremesh-system",
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "prometheusRule.labels.release=kube-prometheus-stack",
            "--show-only",
            "templates/prometheusrule.yaml",
        ],
        Duration::from_secs(120),
    )?;
    let rule: Value = serde_yaml::from_str(&rendered)?;
    ensure!(
        rule["apiVersion"] == "monitoring.coreos.com/v1",
        "{rendered}"
    );
    ensure!(rule["kind"] == "PrometheusRule", "{rendered}");
    ensure!(rule["metadata"]["namespace"] == "wiremesh-system");
    ensure!(rule["metadata"]["labels"]["release"] == "kube-prometheus-stack");
    ensure!(
        rule["spec"] == read_yaml(&rules_file())?,
        "the PrometheusRule's spec is not deploy/prometheus/wiremesh-rules.yaml:\n{rendered}"
    );
    // Off by default: the CRD comes from prometheus-operator.
    let defaults = deploy::objects()?;
    ensure!(
        !defaults
            .iter()
            .any(|o| o.types.as_ref().is_some_and(|t| t.kind == "PrometheusRule")),
        "deploy/wiremesh.yaml has a PrometheusRule"
    );
    Ok(())
}

/// Runs `promtool args...`; returns its output, fails with it.
fn promtool(args: &[&str]) -> Result<String> {
    let out = Command::new("promtool").args(args).output().map_err(|e| {
        anyhow!("running promtool: {e}: install Debian's prometheus (scripts/deps.sh --k8s)")
    })?;
    let text = wiremesh_lab::output_text(&out);
    ensure!(
        out.status.success(),
        "promtool {} failed ({}):\n{text}",
        args.join(" "),
        out.status
    );
    Ok(text)
}

fn read_yaml(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("{} is not YAML", path.display()))
}

/// The alert names of a rules file, in order.
fn alert_names(rules: &Value) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for group in rules["groups"].as_sequence().context("no groups")? {
        for rule in group["rules"]
            .as_sequence()
            .context("a group without rules")?
        {
            names.extend(rule["alert"].as_str().map(str::to_owned));
        }
    }
    Ok(names)
}

fn rules_mut(rules: &mut Value) -> Result<impl Iterator<Item = &mut Value>> {
    Ok(rules["groups"]
        .as_sequence_mut()
        .context("no groups")?
        .iter_mut()
        .filter_map(|g| g["rules"].as_sequence_mut())
        .flatten())
}

/// How many evaluations of a promtool test file expect `alert` to fire and how many
/// expect it not to.
///
/// # Errors
/// When the file evaluates another alert.
fn cases(test: &Value, alert: &str) -> Result<(usize, usize)> {
    let (mut firing, mut quiet) = (0, 0);
    for case in test["tests"].as_sequence().context("no tests")? {
        for eval in case["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = eval["alertname"].as_str().unwrap_or_default();
            ensure!(name == alert, "it evaluates {name:?}, not {alert}");
            match eval["exp_alerts"].as_sequence() {
                Some(expected) if !expected.is_empty() => firing += 1,
                _ => quiet += 1,
            }
        }
    }
    Ok((firing, quiet))
}

fn tempdir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", path.display()))
}
