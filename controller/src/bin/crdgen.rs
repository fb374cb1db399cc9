//! `crdgen`: writes the CRDs of `proto` to `deploy/crds/` and the Helm chart's `crds/`
//! (or to the one directory given).

use std::path::PathBuf;
use std::process::ExitCode;

use wiremesh_controller::crdgen;

fn main() -> ExitCode {
    let dirs: Vec<PathBuf> = match std::env::args_os().nth(1) {
        Some(dir) => vec![PathBuf::from(dir)],
        None => crdgen::DIRS
            .iter()
            .map(|d| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(d))
            .collect(),
    };
    let run = || -> anyhow::Result<()> {
        for dir in &dirs {
            std::fs::create_dir_all(dir)?;
            for (name, yaml) in crdgen::manifests()? {
                std::fs::write(dir.join(name), yaml)?;
                eprintln!("wrote {}", dir.join(name).display());
            }
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
