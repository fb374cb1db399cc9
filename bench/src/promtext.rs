//! The Prometheus text exposition format, as kube-apiserver serves it on `/metrics`: just
//! enough to sum counters and gauges by their labels.

use std::collections::BTreeMap;

/// One sample: a metric name, its labels, its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric's name (with `_sum`, `_count`, `_bucket` for histograms).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// Every sample of `text`; comments, blank and malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

/// The sum of the samples named `name` whose labels `keep` accepts.
pub fn sum(
    samples: &[Sample],
    name: &str,
    keep: impl Fn(&BTreeMap<String, String>) -> bool,
) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && keep(&s.labels))
        .map(|s| s.value)
        .sum()
}

/// The samples named `name` summed by the value of label `by` (absent: "").
pub fn sum_by(samples: &[Sample], name: &str, by: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == name) {
        let key = s.labels.get(by).cloned().unwrap_or_default();
        *out.entry(key).or_insert(0.0) += s.value;
    }
    out
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = open + line.get(open..)?.find('}')?;
            let labels = parse_labels(line.get(open + 1..close)?)?;
            (line.get(..open)?, labels, line.get(close + 1..)?)
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace)?;
            (name, BTreeMap::new(), rest)
        }
    };
    // The value, then an optional timestamp.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    if name.is_empty() {
        return None;
    }
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `a="x",b="y \"q\""`: label values may hold escaped quotes, backslashes and newlines.
fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(labels);
        }
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        }
        labels.insert(key.trim().to_owned(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP apiserver_request_total [STABLE] Counter of apiserver requests
# TYPE apiserver_request_total counter
apiserver_request_total{code="200",component="apiserver",group="wiremesh.io",resource="meshpeers",verb="WATCH",version="v1alpha1"} 3
apiserver_request_total{code="201",component="apiserver",group="wiremesh.io",resource="meshpeers",verb="PATCH",version="v1alpha1"} 1.5e+02
apiserver_request_total{code="200",component="apiserver",group="",resource="nodes",verb="LIST",version="v1"} 7
apiserver_longrunning_requests{component="apiserver",group="wiremesh.io",resource="meshnodes",scope="cluster",subresource="",verb="WATCH",version="v1alpha1"} 4
process_resident_memory_bytes 1.2345e+08
weird{msg="a \"quoted\", \\ thing"} 1 1700000000000
broken{ 3
"#;

    #[test]
    fn parses_counters_gauges_and_escapes() {
        let samples = parse(TEXT);
        assert_eq!(samples.len(), 6, "{samples:#?}");
        assert_eq!(samples[1].value, 150.0);
        assert_eq!(samples[1].labels["verb"], "PATCH");
        assert_eq!(samples[4].name, "process_resident_memory_bytes");
        assert!(samples[4].labels.is_empty());
        assert_eq!(samples[5].labels["msg"], r#"a "quoted", \ thing"#);
        assert_eq!(samples[5].value, 1.0);
    }

    #[test]
    fn sums_by_label() {
        let samples = parse(TEXT);
        let mesh = sum(&samples, "apiserver_request_total", |l| {
            l.get("resource").map(String::as_str) == Some("meshpeers")
        });
        assert_eq!(mesh, 153.0);
        let by_verb = sum_by(&samples, "apiserver_request_total", "verb");
        assert_eq!(by_verb["LIST"], 7.0);
        assert_eq!(by_verb["WATCH"], 3.0);
        assert_eq!(sum(&samples, "absent", |_| true), 0.0);
    }

    #[test]
    fn malformed_lines_are_skipped() {
        assert!(parse("x{a=\"1\" 2\n{a=\"1\"} 2\nname notanumber\n").is_empty());
    }
}
