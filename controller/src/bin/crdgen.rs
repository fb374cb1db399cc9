//! `crdgen`: writes the CRDs of `proto` to `deploy/crds/` (or the directory given).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds"));
    let run = || -> anyhow::Result<()> {
        std::fs::create_dir_all(&dir)?;
        for (name, yaml) in wiremesh_controller::crdgen::manifests()? {
            std::fs::write(dir.join(name), yaml)?;
            eprintln!("wrote {}", dir.join(name).display());
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
