//! The third-party CRDs Wiremesh ships exactly as their projects ship them (the MCS API's
//! ServiceExport and ServiceImport, the About API's ClusterProperty), and whether
//! `meshctl install` may write one: only when it is absent, or when the installed one
//! carries an older mcs-api release label (semver) or, at the same release, an older
//! schema revision. A CRD without a label, or from a release that does not parse, belongs
//! to another installer: it is kept, never fought over.

use std::cmp::Ordering;
use std::fmt;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Deserialize as _;
use wiremesh_proto::mcs::{RELEASE_VERSION_LABEL, SCHEMA_REVISION_LABEL};

/// The upstream CRDs as files of the chart's `crds/`, `(file name, YAML)`.
pub const FILES: [(&str, &str); 3] = [
    (
        "multicluster.x-k8s.io_serviceexports.yaml",
        include_str!(
            "../../../deploy/helm/wiremesh/crds/multicluster.x-k8s.io_serviceexports.yaml"
        ),
    ),
    (
        "multicluster.x-k8s.io_serviceimports.yaml",
        include_str!(
            "../../../deploy/helm/wiremesh/crds/multicluster.x-k8s.io_serviceimports.yaml"
        ),
    ),
    (
        "about.k8s.io_clusterproperties.yaml",
        include_str!("../../../deploy/helm/wiremesh/crds/about.k8s.io_clusterproperties.yaml"),
    ),
];

/// A shipped CRD file that does not parse (a packaging bug, caught by a unit test).
#[derive(Debug, thiserror::Error)]
#[error("deploy/helm/wiremesh/crds/{file}: {source}")]
pub struct CrdFileError {
    /// The file.
    pub file: &'static str,
    /// The parser's error.
    #[source]
    pub source: serde_yaml::Error,
}

/// The upstream CRDs, parsed.
///
/// # Errors
/// [`CrdFileError`] naming the file.
pub fn crds() -> Result<Vec<CustomResourceDefinition>, CrdFileError> {
    FILES
        .iter()
        .map(|(file, yaml)| {
            let document = serde_yaml::Deserializer::from_str(yaml)
                .map(serde_yaml::Value::deserialize)
                .find(|d| !matches!(d, Ok(serde_yaml::Value::Null)));
            document
                .unwrap_or_else(|| Ok(serde_yaml::Value::Null))
                .and_then(serde_yaml::from_value)
                .map_err(|source| CrdFileError { file, source })
        })
        .collect()
}

/// What to do with one upstream CRD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrdAction {
    /// It is absent: install it.
    Create,
    /// The installed one is older: install ours over it.
    Upgrade {
        /// The installed release (and revision).
        from: String,
        /// Ours.
        to: String,
    },
    /// Leave the installed one alone.
    Keep {
        /// Why, for people.
        reason: String,
    },
}

/// Decides whether `ours` may be written over `installed`.
pub fn action(
    ours: &CustomResourceDefinition,
    installed: Option<&CustomResourceDefinition>,
) -> CrdAction {
    let Some(installed) = installed else {
        return CrdAction::Create;
    };
    let Some(ours_release) = Release::of(ours) else {
        return CrdAction::Keep {
            reason: "already installed (this CRD has no release label to compare)".to_owned(),
        };
    };
    let Some(theirs) = Release::of(installed) else {
        return CrdAction::Keep {
            reason: format!(
                "installed by someone else without a parseable {RELEASE_VERSION_LABEL} label; left as it is"
            ),
        };
    };
    match theirs.cmp(&ours_release) {
        Ordering::Less => CrdAction::Upgrade {
            from: theirs.to_string(),
            to: ours_release.to_string(),
        },
        Ordering::Equal => CrdAction::Keep {
            reason: format!("{theirs} already installed"),
        },
        Ordering::Greater => CrdAction::Keep {
            reason: format!("a newer release is installed ({theirs}; ours is {ours_release})"),
        },
    }
}

/// An mcs-api release and schema revision, from a CRD's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Release {
    version: Semver,
    revision: u64,
}

impl Release {
    /// `None` without a release label or with one that is not semver. A missing or bad
    /// revision counts as 0.
    fn of(crd: &CustomResourceDefinition) -> Option<Self> {
        let labels = crd.metadata.labels.as_ref()?;
        let version = labels.get(RELEASE_VERSION_LABEL)?.parse().ok()?;
        let revision = labels
            .get(SCHEMA_REVISION_LABEL)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        Some(Self { version, revision })
    }
}

impl Ord for Release {
    fn cmp(&self, other: &Self) -> Ordering {
        self.version
            .cmp(&other.version)
            .then(self.revision.cmp(&other.revision))
    }
}

impl PartialOrd for Release {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (schema revision {})", self.version, self.revision)
    }
}

/// A semantic version (semver.org 2.0), with an optional leading `v`; build metadata is
/// ignored in comparisons, as the spec says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Semver {
    core: [u64; 3],
    pre: Vec<PreId>,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PreId {
    // Numeric identifiers sort before alphanumeric ones (semver 11.4.3); derived Ord
    // follows the variant order.
    Numeric(u64),
    Alpha(String),
}

/// A version that is not semver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a semantic version (vMAJOR.MINOR.PATCH[-PRERELEASE][+BUILD])")]
pub struct SemverError(String);

impl std::str::FromStr for Semver {
    type Err = SemverError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || SemverError(s.to_owned());
        let body = s.strip_prefix('v').unwrap_or(s);
        let body = body.split_once('+').map_or(body, |(b, _)| b);
        let (core, pre) = match body.split_once('-') {
            Some((core, pre)) => (core, Some(pre)),
            None => (body, None),
        };
        let numbers = core
            .split('.')
            .map(|n| {
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(err());
                }
                n.parse::<u64>().map_err(|_| err())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let core: [u64; 3] = numbers.try_into().map_err(|_| err())?;
        let pre = match pre {
            None => Vec::new(),
            Some(pre) => pre
                .split('.')
                .map(|id| {
                    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    {
                        Err(err())
                    } else if id.bytes().all(|b| b.is_ascii_digit()) {
                        id.parse().map(PreId::Numeric).map_err(|_| err())
                    } else {
                        Ok(PreId::Alpha(id.to_owned()))
                    }
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Self {
            core,
            pre,
            text: s.to_owned(),
        })
    }
}

impl Ord for Semver {
    fn cmp(&self, other: &Self) -> Ordering {
        self.core.cmp(&other.core).then_with(|| {
            // A pre-release sorts before its release (semver 11.3).
            match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => self.pre.cmp(&other.pre),
            }
        })
    }
}

impl PartialOrd for Semver {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Semver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    #[test]
    fn shipped_crds_parse_and_are_upstreams() {
        let crds = crds().unwrap();
        let names: Vec<_> = crds
            .iter()
            .filter_map(|c| c.metadata.name.as_deref())
            .collect();
        assert_eq!(
            names,
            [
                "serviceexports.multicluster.x-k8s.io",
                "serviceimports.multicluster.x-k8s.io",
                "clusterproperties.about.k8s.io"
            ]
        );
        for crd in &crds[..2] {
            let release = Release::of(crd).unwrap();
            assert_eq!(release.to_string(), "v0.5.2 (schema revision 0)");
            let versions: Vec<_> = crd
                .spec
                .versions
                .iter()
                .map(|v| (v.name.as_str(), v.served, v.storage))
                .collect();
            assert_eq!(
                versions,
                [("v1alpha1", true, false), ("v1beta1", true, true)]
            );
        }
        // Upstream's Apache-2.0 header is kept.
        assert!(
            FILES[0]
                .1
                .starts_with("# Copyright 2020 The Kubernetes Authors.")
        );
    }

    #[test]
    fn absent_crd_is_created() {
        assert_eq!(
            action(&labelled(Some("v0.5.2"), None), None),
            CrdAction::Create
        );
    }

    #[test]
    fn older_release_or_revision_is_upgraded() {
        let ours = labelled(Some("v0.5.2"), Some("1"));
        for installed in [
            labelled(Some("v0.4.0"), None),
            labelled(Some("v0.5.1"), Some("7")),
            labelled(Some("v0.5.2"), Some("0")),
            labelled(Some("v0.5.2"), None),
            labelled(Some("v0.5.2-rc.1"), Some("3")),
        ] {
            assert!(
                matches!(action(&ours, Some(&installed)), CrdAction::Upgrade { .. }),
                "{:?}",
                installed.metadata.labels
            );
        }
        let CrdAction::Upgrade { from, to } = action(&ours, Some(&labelled(Some("v0.4.0"), None)))
        else {
            unreachable!()
        };
        assert_eq!(
            (from.as_str(), to.as_str()),
            ("v0.4.0 (schema revision 0)", "v0.5.2 (schema revision 1)")
        );
    }

    #[test]
    fn same_newer_unlabelled_or_unparseable_is_kept() {
        let ours = labelled(Some("v0.5.2"), Some("0"));
        for installed in [
            labelled(Some("v0.5.2"), Some("0")),
            labelled(Some("v0.5.10"), None),
            labelled(Some("v1.0.0-alpha"), None),
            labelled(Some("v0.5.2"), Some("1")),
            labelled(None, None),
            labelled(Some("latest"), None),
            labelled(Some("v0.5"), None),
        ] {
            assert!(
                matches!(action(&ours, Some(&installed)), CrdAction::Keep { .. }),
                "{:?}",
                installed.metadata.labels
            );
        }
        // A CRD of ours without labels (ClusterProperty) is only ever created.
        assert!(matches!(
            action(&labelled(None, None), Some(&labelled(Some("v0.0.1"), None))),
            CrdAction::Keep { .. }
        ));
    }

    #[test]
    fn semver_orders_as_the_spec_says() {
        // semver.org 11.4's example, in order.
        let ordered = [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
            "v1.0.1+build.5",
            "1.1.0",
            "2.0.0",
            "10.0.0",
        ];
        let parsed: Vec<Semver> = ordered.iter().map(|v| v.parse().unwrap()).collect();
        for pair in parsed.windows(2) {
            assert!(pair[0] < pair[1], "{} < {}", pair[0], pair[1]);
        }
        assert_eq!(
            "v1.0.0+a"
                .parse::<Semver>()
                .unwrap()
                .cmp(&"1.0.0".parse().unwrap()),
            Ordering::Equal
        );
        for bad in [
            "",
            "v",
            "1",
            "1.2",
            "1.2.3.4",
            "1.x.3",
            "1.2.3-",
            "1.2.3-a..b",
            "-1.2.3",
            "1.2.3-a_b",
        ] {
            assert!(bad.parse::<Semver>().is_err(), "{bad:?}");
        }
    }

    fn labelled(release: Option<&str>, revision: Option<&str>) -> CustomResourceDefinition {
        let mut labels = BTreeMap::new();
        if let Some(r) = release {
            labels.insert(RELEASE_VERSION_LABEL.to_owned(), r.to_owned());
        }
        if let Some(r) = revision {
            labels.insert(SCHEMA_REVISION_LABEL.to_owned(), r.to_owned());
        }
        CustomResourceDefinition {
            metadata: ObjectMeta {
                name: Some("serviceexports.multicluster.x-k8s.io".to_owned()),
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            ..CustomResourceDefinition::default()
        }
    }
}
