//! Replays every committed fuzz input: `fuzz/corpus/<target>/` (the minimized corpus) and
//! `fuzz/regressions/<target>/` (every crash found so far), through the same harness the
//! `cargo fuzz` target runs.

use std::panic;
use std::path::{Path, PathBuf};

#[test]
fn every_committed_fuzz_input_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut failed = Vec::new();
    let mut ran = 0;
    for (target, harness) in wiremesh_fuzz::TARGETS {
        for folder in ["corpus", "regressions"] {
            for file in inputs(&root.join(folder).join(target)) {
                let data = std::fs::read(&file)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
                ran += 1;
                if panic::catch_unwind(|| harness(&data)).is_err() {
                    failed.push(file.display().to_string());
                }
            }
        }
    }
    assert!(failed.is_empty(), "fuzz inputs that fail: {failed:#?}");
    assert!(ran > 0, "no fuzz input found under {}", root.display());
}

/// The files of `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}
