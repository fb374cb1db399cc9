//! `clusterset.local` names from stock CoreDNS: what `meshctl install` checks and, with
//! `--configure-dns`, changes. CoreDNS 1.12.2 gave the kubernetes plugin the `multicluster`
//! option, which answers `<svc>.<ns>.svc.clusterset.local` from ServiceImports and their
//! EndpointSlices; it needs the zone in the plugin's zones, the option naming it, and
//! list/watch on `serviceimports` in CoreDNS's ClusterRole. Pure: text and objects in,
//! an edited text or the reason it cannot be edited safely out.

use std::fmt;

use k8s_openapi::api::rbac::v1::PolicyRule;
use wiremesh_proto::mcs::GROUP;

/// The zone `multicluster` serves (KEP-1645).
pub const CLUSTERSET_ZONE: &str = "clusterset.local";
/// The first CoreDNS with the kubernetes plugin's `multicluster` option (coredns#7008,
/// released in 1.12.2).
pub const MIN_COREDNS: Version = Version(1, 12, 2);

/// A CoreDNS release, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// Why CoreDNS cannot serve `clusterset.local` as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The version could not be read from the image (no tag, `latest`, a digest only).
    #[error(
        "cannot tell CoreDNS's version from image {image:?}: pass --coredns-version (e.g. 1.12.2)"
    )]
    UnknownVersion {
        /// The image reference.
        image: String,
    },
    /// A version given that is not `major.minor.patch`.
    #[error("CoreDNS version {0:?} is not major.minor.patch (e.g. 1.12.2)")]
    BadVersion(String),
    /// Older than [`MIN_COREDNS`].
    #[error(
        "CoreDNS {found} is too old: clusterset.local names need the kubernetes plugin's \
         `multicluster` option, which CoreDNS {MIN_COREDNS} introduced; upgrade CoreDNS first"
    )]
    TooOld {
        /// The version found.
        found: Version,
    },
    /// The Corefile cannot be edited safely.
    #[error("the Corefile cannot be edited safely: {0}")]
    Corefile(#[from] CorefileError),
}

/// Why [`edit_corefile`] refuses a Corefile (the line numbers are 1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorefileError {
    /// `{` and `}` do not pair up.
    #[error("unbalanced braces at line {line}")]
    Unbalanced {
        /// Where it went wrong (the last line when a block is left open).
        line: usize,
    },
    /// No `kubernetes` plugin in any server block.
    #[error(
        "no `kubernetes` plugin in any server block (an `import`ed snippet is not followed); \
         add `{CLUSTERSET_ZONE}` to its zones and `multicluster {CLUSTERSET_ZONE}` to its block by hand"
    )]
    NoKubernetes,
    /// Several `kubernetes` plugins: which one to change is the user's choice.
    #[error("`kubernetes` appears {} times (lines {lines:?}); change the right one by hand", lines.len())]
    SeveralKubernetes {
        /// Where.
        lines: Vec<usize>,
    },
    /// The plugin lists no zone, so it takes its server block's: naming one would drop them.
    #[error(
        "the `kubernetes` plugin at line {line} names no zones (it serves its server block's); \
         list them explicitly first"
    )]
    NoZones {
        /// Where.
        line: usize,
    },
    /// Its server block does not receive `clusterset.local` queries.
    #[error(
        "the `kubernetes` plugin at line {line} is in server block {keys:?}, which does not \
         receive {CLUSTERSET_ZONE} queries (it needs `.` or {CLUSTERSET_ZONE} among its zones)"
    )]
    BlockMissesZone {
        /// Where the plugin is.
        line: usize,
        /// The server block's keys.
        keys: String,
    },
    /// Another server block already serves the zone (another multi-cluster DNS, such as
    /// Submariner's Lighthouse, forwards it).
    #[error(
        "server block {keys:?} at line {line} already serves {CLUSTERSET_ZONE} (another \
         multi-cluster DNS?); remove it first"
    )]
    ZoneTaken {
        /// Where that block starts.
        line: usize,
        /// Its keys.
        keys: String,
    },
    /// The plugin's block has a shape this editor does not rewrite (a one-line block, a
    /// nested block, quotes).
    #[error(
        "the `kubernetes` plugin's block at line {line} is not in the usual one-option-a-line form"
    )]
    Unusual {
        /// Where.
        line: usize,
    },
}

/// What [`edit_corefile`] made of a Corefile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorefileEdit {
    /// It already serves `clusterset.local` through `multicluster`.
    Unchanged,
    /// The edited Corefile.
    Changed(String),
}

/// The CoreDNS version of image reference `image` (`registry.k8s.io/coredns/coredns:v1.12.2`,
/// `coredns/coredns:1.11.1@sha256:...`).
///
/// # Errors
/// [`DnsError::UnknownVersion`] when the tag is absent or not a version.
pub fn image_version(image: &str) -> Result<Version, DnsError> {
    let unknown = || DnsError::UnknownVersion {
        image: image.to_owned(),
    };
    let without_digest = image.split('@').next().unwrap_or_default();
    let last = without_digest.rsplit('/').next().unwrap_or_default();
    let (_, tag) = last.split_once(':').ok_or_else(unknown)?;
    parse_version(tag).map_err(|_| unknown())
}

/// Parses `1.12.2` or `v1.12.2` (a `-suffix` after the patch is ignored).
///
/// # Errors
/// [`DnsError::BadVersion`] naming the text.
pub fn parse_version(text: &str) -> Result<Version, DnsError> {
    let bad = || DnsError::BadVersion(text.to_owned());
    let core = text.strip_prefix('v').unwrap_or(text);
    let core = core.split(['-', '+']).next().unwrap_or_default();
    let mut parts = core.split('.').map(|p| p.parse::<u32>().map_err(|_| bad()));
    let version = Version(
        parts.next().ok_or_else(bad)??,
        parts.next().ok_or_else(bad)??,
        parts.next().ok_or_else(bad)??,
    );
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(version)
}

/// Refuses a CoreDNS older than [`MIN_COREDNS`].
///
/// # Errors
/// [`DnsError::TooOld`].
pub fn check_version(found: Version) -> Result<(), DnsError> {
    if found < MIN_COREDNS {
        return Err(DnsError::TooOld { found });
    }
    Ok(())
}

/// Adds `clusterset.local` to the zones of the Corefile's one `kubernetes` plugin and
/// `multicluster clusterset.local` to its block, keeping every other line as it is.
///
/// # Errors
/// [`CorefileError`] when the Corefile has no single `kubernetes` plugin in a server block
/// that receives `clusterset.local` queries, another block serves that zone, or the
/// plugin's block has an unusual shape.
pub fn edit_corefile(corefile: &str) -> Result<CorefileEdit, CorefileError> {
    let lines: Vec<&str> = corefile.lines().collect();
    let layout = scan(&lines)?;
    let plugin = match layout.kubernetes.as_slice() {
        [] => return Err(CorefileError::NoKubernetes),
        [one] => one,
        several => {
            return Err(CorefileError::SeveralKubernetes {
                lines: several.iter().map(|k| k.line + 1).collect(),
            });
        }
    };
    let line = plugin.line + 1;
    if let Some((start, keys)) = layout
        .blocks
        .iter()
        .find(|(start, keys)| *start != plugin.block && keys.iter().any(|k| is_zone(k)))
        .map(|(start, keys)| (*start, keys.join(" ")))
    {
        return Err(CorefileError::ZoneTaken {
            line: start + 1,
            keys,
        });
    }
    let block_keys = layout
        .blocks
        .iter()
        .find(|(start, _)| *start == plugin.block)
        .map(|(_, keys)| keys.clone())
        .unwrap_or_default();
    if !block_keys.iter().any(|k| is_root(k) || is_zone(k)) {
        return Err(CorefileError::BlockMissesZone {
            line,
            keys: block_keys.join(" "),
        });
    }
    let head = strip_comment(lines.get(plugin.line).copied().unwrap_or_default());
    let mut words: Vec<&str> = head.split_whitespace().collect();
    let opens = words.last() == Some(&"{");
    if opens {
        words.pop();
    }
    if words.iter().any(|w| w.contains(['{', '}', '"'])) {
        return Err(CorefileError::Unusual { line });
    }
    let zones: Vec<&str> = words.iter().skip(1).copied().collect();
    if zones.is_empty() {
        return Err(CorefileError::NoZones { line });
    }
    let has_zone = zones.iter().any(|z| is_zone(z));
    // The block's option lines, when it has one.
    let options: Vec<usize> = match plugin.end {
        Some(end) => (plugin.line + 1..end).collect(),
        None => Vec::new(),
    };
    let multicluster = options.iter().copied().find(|&i| {
        strip_comment(lines.get(i).copied().unwrap_or_default())
            .split_whitespace()
            .next()
            == Some("multicluster")
    });
    let multicluster_has_zone = multicluster.is_some_and(|i| {
        strip_comment(lines.get(i).copied().unwrap_or_default())
            .split_whitespace()
            .skip(1)
            .any(is_zone)
    });
    if has_zone && multicluster_has_zone {
        return Ok(CorefileEdit::Unchanged);
    }

    let raw = lines.get(plugin.line).copied().unwrap_or_default();
    let indent = &raw[..raw.len() - raw.trim_start().len()];
    let option_indent = options
        .iter()
        .filter_map(|&i| lines.get(i))
        .find(|l| !l.trim().is_empty())
        .map(|l| l[..l.len() - l.trim_start().len()].to_owned())
        .unwrap_or_else(|| format!("{indent}    "));
    let mut new_zones: Vec<&str> = zones.clone();
    if !has_zone {
        // After the first zone: `kubernetes cluster.local clusterset.local in-addr.arpa ...`,
        // as CoreDNS's documentation writes it.
        new_zones.insert(1, CLUSTERSET_ZONE);
    }
    let comment = raw.find('#').map(|i| &raw[i..]);
    let mut head = format!("{indent}kubernetes {}", new_zones.join(" "));
    let mut out: Vec<String> = Vec::with_capacity(lines.len() + 3);
    for (i, l) in lines.iter().enumerate() {
        if i == plugin.line {
            head.push_str(" {");
            if let Some(comment) = comment {
                head.push(' ');
                head.push_str(comment);
            }
            out.push(head.clone());
            if multicluster.is_none() {
                out.push(format!("{option_indent}multicluster {CLUSTERSET_ZONE}"));
            }
            if !opens {
                out.push(format!("{indent}}}"));
            }
        } else if Some(i) == multicluster && !multicluster_has_zone {
            let (code, comment) = match l.find('#') {
                Some(at) => (l[..at].trim_end(), Some(&l[at..])),
                None => (l.trim_end(), None),
            };
            let mut line = format!("{code} {CLUSTERSET_ZONE}");
            if let Some(comment) = comment {
                line.push(' ');
                line.push_str(comment);
            }
            out.push(line);
        } else {
            out.push((*l).to_owned());
        }
    }
    let mut text = out.join("\n");
    if corefile.ends_with('\n') {
        text.push('\n');
    }
    Ok(CorefileEdit::Changed(text))
}

/// Whether `rules` let CoreDNS list and watch ServiceImports.
pub fn grants_serviceimports(rules: &[PolicyRule]) -> bool {
    let has = |list: Option<&Vec<String>>, want: &str| {
        list.is_some_and(|l| l.iter().any(|v| v == want || v == "*"))
    };
    ["list", "watch"].iter().all(|verb| {
        rules.iter().any(|r| {
            has(r.api_groups.as_ref(), GROUP)
                && has(r.resources.as_ref(), "serviceimports")
                && r.verbs.iter().any(|v| v == verb || v == "*")
        })
    })
}

/// The rule [`grants_serviceimports`] looks for, to add to CoreDNS's ClusterRole.
pub fn serviceimports_rule() -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![GROUP.to_owned()]),
        resources: Some(vec!["serviceimports".to_owned()]),
        verbs: vec!["list".to_owned(), "watch".to_owned()],
        ..PolicyRule::default()
    }
}

/// A `kubernetes` plugin: its line, the server block it is in, and the line of its
/// block's closing brace when it has a block.
struct Plugin {
    line: usize,
    block: usize,
    end: Option<usize>,
}

/// Server blocks (start line, keys) and `kubernetes` plugins of a Corefile.
struct Layout {
    blocks: Vec<(usize, Vec<String>)>,
    kubernetes: Vec<Plugin>,
}

fn scan(lines: &[&str]) -> Result<Layout, CorefileError> {
    let mut layout = Layout {
        blocks: Vec::new(),
        kubernetes: Vec::new(),
    };
    let mut depth = 0usize;
    let mut block = 0usize;
    // The index in `layout.kubernetes` of the plugin whose block is open.
    let mut open_plugin: Option<usize> = None;
    for (i, raw) in lines.iter().enumerate() {
        let code = strip_comment(raw);
        let words: Vec<&str> = code.split_whitespace().collect();
        if depth == 0 && !words.is_empty() {
            block = i;
            let keys = words
                .iter()
                .filter(|w| **w != "{")
                .map(|w| (*w).to_owned())
                .collect();
            layout.blocks.push((i, keys));
        }
        if depth == 1 && words.first() == Some(&"kubernetes") {
            layout.kubernetes.push(Plugin {
                line: i,
                block,
                end: None,
            });
            if code.contains('{') {
                if code.contains('}') || words.last() != Some(&"{") {
                    return Err(CorefileError::Unusual { line: i + 1 });
                }
                open_plugin = Some(layout.kubernetes.len() - 1);
            }
        } else if open_plugin.is_some() && code.contains('{') {
            return Err(CorefileError::Unusual { line: i + 1 });
        }
        for c in code.chars() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth = depth
                        .checked_sub(1)
                        .ok_or(CorefileError::Unbalanced { line: i + 1 })?;
                    if depth == 1
                        && let Some(k) = open_plugin.take()
                        && let Some(plugin) = layout.kubernetes.get_mut(k)
                    {
                        plugin.end = Some(i);
                        if code.trim() != "}" {
                            return Err(CorefileError::Unusual { line: i + 1 });
                        }
                    }
                }
                _ => {}
            }
        }
    }
    if depth != 0 {
        return Err(CorefileError::Unbalanced {
            line: lines.len().max(1),
        });
    }
    Ok(layout)
}

fn strip_comment(line: &str) -> &str {
    line.split('#').next().unwrap_or_default()
}

/// A server-block key or zone without scheme, port and trailing dot.
fn bare(key: &str) -> &str {
    let key = key.strip_prefix("dns://").unwrap_or(key);
    let key = key.rsplit_once(':').map_or(key, |(zone, _)| zone);
    if key == "." {
        key
    } else {
        key.strip_suffix('.').unwrap_or(key)
    }
}

fn is_root(key: &str) -> bool {
    bare(key) == "."
}

fn is_zone(key: &str) -> bool {
    bare(key) == CLUSTERSET_ZONE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeadm_corefile_gets_the_zone_and_the_option() {
        let CorefileEdit::Changed(text) = edit_corefile(KUBEADM).unwrap() else {
            panic!("unchanged");
        };
        assert_eq!(text, KUBEADM_EDITED);
        assert_eq!(edit_corefile(&text).unwrap(), CorefileEdit::Unchanged);
    }

    #[test]
    fn plugin_without_block_gets_one() {
        let edited = edit_corefile(".:53 {\n  kubernetes cluster.local\n  forward . 8.8.8.8\n}\n");
        assert_eq!(
            edited.unwrap(),
            CorefileEdit::Changed(
                ".:53 {\n  kubernetes cluster.local clusterset.local {\n      multicluster clusterset.local\n  }\n  forward . 8.8.8.8\n}\n"
                    .to_owned()
            )
        );
    }

    #[test]
    fn existing_multicluster_option_gets_the_zone() {
        let corefile =
            ".:53 {\n kubernetes cluster.local clusterset.local {\n  multicluster # mine\n }\n}";
        assert_eq!(
            edit_corefile(corefile).unwrap(),
            CorefileEdit::Changed(
                ".:53 {\n kubernetes cluster.local clusterset.local {\n  multicluster clusterset.local # mine\n }\n}"
                    .to_owned()
            )
        );
    }

    #[test]
    fn corefiles_it_cannot_edit_safely_are_refused_with_a_reason() {
        let cases = [
            (".:53 {\n forward . 1.1.1.1\n}\n", "no `kubernetes` plugin"),
            (
                ".:53 {\n kubernetes cluster.local {\n}\n",
                "unbalanced braces at line 3",
            ),
            (
                ".:53 {\n kubernetes cluster.local\n}\n}\n",
                "unbalanced braces at line 4",
            ),
            (
                ".:53 {\n kubernetes a.local\n}\n.:54 {\n kubernetes b.local\n}\n",
                "lines [2, 5]",
            ),
            (
                ".:53 {\n kubernetes {\n  pods insecure\n }\n}\n",
                "names no zones",
            ),
            (
                "cluster.local:53 {\n kubernetes cluster.local\n}\n",
                "does not receive clusterset.local",
            ),
            (
                ".:53 {\n kubernetes cluster.local\n}\nclusterset.local:53 {\n forward . 10.0.0.9\n}\n",
                "line 4 already serves clusterset.local",
            ),
            (
                ".:53 {\n kubernetes cluster.local { pods insecure }\n}\n",
                "line 2 is not in the usual",
            ),
            (
                ".:53 {\n kubernetes cluster.local {\n  x {\n  }\n }\n}\n",
                "line 3 is not in the usual",
            ),
        ];
        for (corefile, reason) in cases {
            let err = edit_corefile(corefile).expect_err(corefile);
            let text = DnsError::from(err).to_string();
            assert!(text.contains(reason), "{corefile:?}: {text}");
        }
    }

    #[test]
    fn version_comes_from_the_image_tag() {
        let cases = [
            ("registry.k8s.io/coredns/coredns:v1.12.2", Version(1, 12, 2)),
            ("coredns/coredns:1.11.1@sha256:abcd", Version(1, 11, 1)),
            ("localhost:5000/coredns:1.15.0-custom", Version(1, 15, 0)),
        ];
        for (image, version) in cases {
            assert_eq!(image_version(image).unwrap(), version, "{image}");
        }
        for image in ["coredns/coredns", "coredns/coredns:latest", "c@sha256:1:2"] {
            assert!(
                matches!(image_version(image), Err(DnsError::UnknownVersion { .. })),
                "{image}"
            );
        }
        assert!(parse_version("1.12").is_err());
        assert!(parse_version("1.12.2.1").is_err());
    }

    #[test]
    fn coredns_before_1_12_2_is_refused_with_the_reason() {
        assert!(check_version(Version(1, 12, 2)).is_ok());
        assert!(check_version(Version(1, 15, 0)).is_ok());
        let err = check_version(Version(1, 12, 1)).unwrap_err().to_string();
        assert!(err.contains("1.12.1 is too old"), "{err}");
        assert!(err.contains("multicluster"), "{err}");
    }

    #[test]
    fn role_grant_needs_list_and_watch_on_serviceimports() {
        assert!(!grants_serviceimports(&[]));
        assert!(grants_serviceimports(&[serviceimports_rule()]));
        let list_only = PolicyRule {
            verbs: vec!["list".to_owned()],
            ..serviceimports_rule()
        };
        assert!(!grants_serviceimports(&[list_only]));
        let wildcard = PolicyRule {
            api_groups: Some(vec!["*".to_owned()]),
            resources: Some(vec!["*".to_owned()]),
            verbs: vec!["*".to_owned()],
            ..PolicyRule::default()
        };
        assert!(grants_serviceimports(&[wildcard]));
    }

    const KUBEADM: &str = ".:53 {
    errors
    health {
       lameduck 5s
    }
    ready
    kubernetes cluster.local in-addr.arpa ip6.arpa {
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }
    prometheus :9153
    forward . /etc/resolv.conf {
       max_concurrent 1000
    }
    cache 30
    loop
    reload
    loadbalance
}
";

    const KUBEADM_EDITED: &str = ".:53 {
    errors
    health {
       lameduck 5s
    }
    ready
    kubernetes cluster.local clusterset.local in-addr.arpa ip6.arpa {
       multicluster clusterset.local
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }
    prometheus :9153
    forward . /etc/resolv.conf {
       max_concurrent 1000
    }
    cache 30
    loop
    reload
    loadbalance
}
";
}
