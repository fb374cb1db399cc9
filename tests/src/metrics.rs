//! Reading what `/metrics` serves: a parser for the Prometheus and OpenMetrics text formats,
//! enough to find one sample by name and labels.

use std::collections::BTreeMap;
use std::str::FromStr;

use anyhow::{Context as _, Result, bail, ensure};

/// One sample line: `name{label="value",...} value [timestamp] [# exemplar]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name, with any `_total` suffix.
    pub name: String,
    /// Its labels, unescaped.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// True when every `(key, value)` of `labels` is one of this sample's labels.
    pub fn has(&self, labels: &[(&str, &str)]) -> bool {
        labels
            .iter()
            .all(|(k, v)| self.labels.get(*k).is_some_and(|have| have == v))
    }
}

/// A parsed exposition: every sample, and the type of every family that declared one.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// The samples, in the order served.
    pub samples: Vec<Sample>,
    /// `# TYPE` lines: family name to type (`counter`, `gauge`, ...).
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    /// The samples of `name` whose labels include all of `labels`.
    pub fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.name == name && s.has(labels))
            .collect()
    }

    /// The one sample of `name` whose labels include all of `labels`.
    ///
    /// # Errors
    /// When no sample or more than one matches.
    pub fn sample(&self, name: &str, labels: &[(&str, &str)]) -> Result<&Sample> {
        match self.matching(name, labels)[..] {
            [one] => Ok(one),
            [] => bail!("no sample {name} with labels {labels:?}"),
            [first, second, ..] => {
                bail!("{name} with labels {labels:?} is ambiguous: {first:?} and {second:?}")
            }
        }
    }

    /// The value of [`Exposition::sample`].
    ///
    /// # Errors
    /// As [`Exposition::sample`].
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(self.sample(name, labels)?.value)
    }
}

impl FromStr for Exposition {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        let mut out = Exposition::default();
        for (i, line) in text.lines().enumerate() {
            let parsed = if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE") {
                    let family = words.next().context("# TYPE without a name")?;
                    let kind = words.next().context("# TYPE without a type")?;
                    out.types.insert(family.to_owned(), kind.to_owned());
                }
                Ok(())
            } else if line.trim().is_empty() {
                Ok(())
            } else {
                parse_sample(line).map(|s| out.samples.push(s))
            };
            parsed.with_context(|| format!("line {}: {line:?}", i + 1))?;
        }
        Ok(out)
    }
}

fn parse_sample(line: &str) -> Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .context("a sample without a value")?;
    let name = &line[..name_end];
    ensure!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
        "bad metric name {name:?}"
    );
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = parse_labels(after_brace, &mut labels)?;
    }
    // The value, then an optional timestamp and an optional `# exemplar`.
    let value = rest
        .split_whitespace()
        .next()
        .context("a sample without a value")?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().with_context(|| format!("value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `key="value",...}` into `labels`; returns what follows the closing brace.
fn parse_labels<'a>(mut s: &'a str, labels: &mut BTreeMap<String, String>) -> Result<&'a str> {
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(rest) = s.strip_prefix('}') {
            return Ok(rest);
        }
        let (key, after) = s.split_once('=').context("a label without '='")?;
        let key = key.trim();
        ensure!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad label name {key:?}"
        );
        let mut chars = after
            .strip_prefix('"')
            .context("a label value without quotes")?
            .char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => bail!("bad escape {other:?} in label {key}"),
                },
                Some((_, c)) => value.push(c),
                None => bail!("label {key} is not closed"),
            }
        };
        ensure!(
            labels.insert(key.to_owned(), value).is_none(),
            "label {key} twice"
        );
        s = &after[1 + end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP wiremesh_drops Packets dropped by the agent, by reason.
# TYPE wiremesh_drops counter
wiremesh_drops_total{interface="wm0",reason="bad_packet"} 3
wiremesh_drops_total{interface="wm0",reason="no_route"} 0
# TYPE wiremesh_peer_last_handshake_age_seconds gauge
# UNIT wiremesh_peer_last_handshake_age_seconds seconds
wiremesh_peer_last_handshake_age_seconds{peer="a+b/c=",peer_cluster="",node="x\"y\\z\nw"} 2.5
wiremesh_peers 2 1700000000
wiremesh_controller_runs_total{kind="sync"} 7 # {trace_id="1"} 1.0
up +Inf
# EOF
"#;

    #[test]
    fn samples_are_found_by_name_and_a_subset_of_labels() {
        let e: Exposition = TEXT.parse().unwrap();
        assert_eq!(e.samples.len(), 6);
        assert_eq!(e.types["wiremesh_drops"], "counter");
        assert_eq!(
            e.value("wiremesh_drops_total", &[("reason", "bad_packet")])
                .unwrap(),
            3.0
        );
        assert!(e.value("wiremesh_drops_total", &[]).is_err(), "ambiguous");
        assert!(e.value("wiremesh_drops", &[]).is_err(), "no such sample");
        let age = e
            .sample(
                "wiremesh_peer_last_handshake_age_seconds",
                &[("peer", "a+b/c=")],
            )
            .unwrap();
        assert_eq!(age.labels["peer_cluster"], "");
        assert_eq!(age.labels["node"], "x\"y\\z\nw");
        assert_eq!(e.value("wiremesh_peers", &[]).unwrap(), 2.0);
        assert_eq!(
            e.value("wiremesh_controller_runs_total", &[("kind", "sync")])
                .unwrap(),
            7.0
        );
        assert_eq!(e.value("up", &[]).unwrap(), f64::INFINITY);
    }

    #[test]
    fn malformed_lines_are_refused_with_their_number() {
        for bad in [
            "x{a=\"1\"",
            "x{a=1} 2",
            "x{a=\"1\",a=\"2\"} 3",
            "x{a=\"\\t\"} 1",
            "x 1.2.3",
            "x",
            "x-y 1",
        ] {
            let err = format!("ok 1\n{bad}\n").parse::<Exposition>().unwrap_err();
            assert!(format!("{err:#}").starts_with("line 2"), "{bad}: {err:#}");
        }
    }
}
