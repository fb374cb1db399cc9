//! The two ways the Wiremesh image is built have the same layout, checked the same way:
//! the `Dockerfile` (multi-stage, distroless; for users: no container engine runs here, so
//! its final stage is read) and `scripts/oci-image.sh` (an OCI archive from the workspace's
//! binaries, what the lab's real kubelet runs: built and unpacked here). Both must put
//! the three binaries at the paths the chart's commands name, run as 65532:65532, and have
//! no entrypoint and `wiremesh-agent --help` as their command; the OCI image must also hold
//! every shared library its binaries load.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, anyhow, ensure};
use wiremesh_lab::deploy::Workload;
use wiremesh_lab::kubelet::build_image;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// What both layouts must agree on.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    /// Absolute paths of the executables in the image.
    binaries: BTreeSet<String>,
    user: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

fn expected() -> Result<Layout> {
    let agent = Workload::from_manifest("DaemonSet", "wiremesh-agent")?;
    let controller = Workload::from_manifest("Deployment", "wiremesh-controller")?;
    let mut binaries = BTreeSet::new();
    for workload in [&agent, &controller] {
        let command = workload
            .command
            .first()
            .context("a workload has no command")?;
        ensure!(
            command.starts_with('/'),
            "the chart's command {command} is not absolute"
        );
        binaries.insert(command.clone());
    }
    binaries.insert("/usr/local/bin/meshctl".to_owned());
    Ok(Layout {
        binaries,
        user: "65532:65532".to_owned(),
        entrypoint: Vec::new(),
        cmd: vec![
            "/usr/local/bin/wiremesh-agent".to_owned(),
            "--help".to_owned(),
        ],
    })
}

/// The final stage of the Dockerfile: what its `COPY --from=build /out/ DIR` puts where
/// (the files the build stage copies to /out), `USER`, `ENTRYPOINT` and `CMD`.
fn dockerfile_layout(text: &str) -> Result<Layout> {
    let stages: Vec<&str> = text.split("\nFROM ").collect();
    let (build, last) = match stages.as_slice() {
        [.., build, last] => (*build, *last),
        _ => return Err(anyhow!("the Dockerfile has fewer than two stages")),
    };
    // `cp target/release/a target/release/b /out/`
    let out: Vec<String> = build
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("target/release/"))
        .map(str::to_owned)
        .collect();
    ensure!(!out.is_empty(), "the build stage copies no binary to /out");
    let mut binaries = BTreeSet::new();
    let (mut user, mut entrypoint, mut cmd) = (None, None, None);
    for line in last.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("COPY --from=build /out/ ") {
            let dir = rest.trim().trim_end_matches('/');
            binaries.extend(out.iter().map(|b| format!("{dir}/{b}")));
        } else if let Some(rest) = line.strip_prefix("USER ") {
            user = Some(rest.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("ENTRYPOINT ") {
            entrypoint = Some(serde_json::from_str::<Vec<String>>(rest).context("ENTRYPOINT")?);
        } else if let Some(rest) = line.strip_prefix("CMD ") {
            cmd = Some(serde_json::from_str::<Vec<String>>(rest).context("CMD")?);
        }
    }
    Ok(Layout {
        binaries,
        user: user.context("no USER in the final stage")?,
        entrypoint: entrypoint.unwrap_or_default(),
        cmd: cmd.context("no CMD in the final stage")?,
    })
}

/// Unpacks `archive` (an OCI image archive with one manifest) into `dir`; returns the
/// layout its config and layers give, and the unpacked root filesystem.
fn oci_layout(archive: &Path, dir: &Path) -> Result<(Layout, PathBuf)> {
    let oci = dir.join("oci");
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&oci)?;
    std::fs::create_dir_all(&rootfs)?;
    untar(archive, &oci)?;
    let read = |digest: &str| -> Result<serde_json::Value> {
        let hex = digest.strip_prefix("sha256:").context("digest")?;
        let path = oci.join("blobs/sha256").join(hex);
        Ok(serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("{}", path.display()))?,
        )?)
    };
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(oci.join("index.json"))?)?;
    let manifest = read(
        index["manifests"][0]["digest"]
            .as_str()
            .context("index.json names no manifest")?,
    )?;
    let config = read(manifest["config"]["digest"].as_str().context("config")?)?;
    for layer in manifest["layers"].as_array().context("layers")? {
        let digest = layer["digest"].as_str().context("layer digest")?;
        untar(
            &oci.join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
            &rootfs,
        )?;
    }
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut binaries = BTreeSet::new();
    for entry in std::fs::read_dir(rootfs.join("usr/local/bin"))? {
        let entry = entry?;
        binaries.insert(format!(
            "/usr/local/bin/{}",
            entry.file_name().to_string_lossy()
        ));
    }
    Ok((
        Layout {
            binaries,
            user: config["config"]["User"].as_str().unwrap_or("").to_owned(),
            entrypoint: strings(&config["config"]["Entrypoint"]),
            cmd: strings(&config["config"]["Cmd"]),
        },
        rootfs,
    ))
}

fn untar(archive: &Path, into: &Path) -> Result<()> {
    let out = Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .output()
        .context("running tar")?;
    ensure!(
        out.status.success(),
        "tar -xf {}: {}",
        archive.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn the_dockerfile_and_the_offline_image_have_the_same_layout() -> Result<()> {
    let want = expected()?;
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile"))?;
    assert_eq!(dockerfile_layout(&dockerfile)?, want, "the Dockerfile");
    ensure!(
        dockerfile.contains("FROM gcr.io/distroless/cc-debian12:nonroot"),
        "the Dockerfile's base is no longer distroless/cc (glibc and libgcc_s, which the binaries load)"
    );

    let dir = std::env::temp_dir().join(format!("wm-image-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> Result<()> {
        let archive = dir.join("image.tar");
        build_image("wiremesh.invalid/wiremesh:layout", &archive)?;
        let (layout, rootfs) = oci_layout(&archive, &dir)?;
        assert_eq!(layout, want, "scripts/oci-image.sh");
        // Every library the loader resolves for each binary is in the image, at that path.
        for binary in &want.binaries {
            let path = rootfs.join(binary.trim_start_matches('/'));
            let ldd = Command::new("ldd").arg(&path).output()?;
            let text = String::from_utf8_lossy(&ldd.stdout);
            for lib in text.split_whitespace().filter(|w| w.starts_with('/')) {
                let inside = rootfs.join(lib.trim_start_matches('/'));
                ensure!(
                    inside.exists(),
                    "{binary} loads {lib}, which the image lacks"
                );
            }
        }
        let passwd = std::fs::read_to_string(rootfs.join("etc/passwd"))?;
        ensure!(passwd.contains(":65532:65532:"), "no user 65532: {passwd}");
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[test]
fn a_dockerfile_without_user_is_refused() {
    let text = "FROM rust AS build\nRUN cp target/release/wiremesh-agent /out/\nFROM scratch\nCOPY --from=build /out/ /usr/local/bin/\nCMD [\"/usr/local/bin/wiremesh-agent\"]\n";
    let err = dockerfile_layout(text).expect_err("no USER");
    assert!(err.to_string().contains("USER"), "{err}");
}
