//! The node's private key on disk: generated once from the OS RNG, kept at mode 0600.
//! Files that hold a secret (the key, a host bundle's token) are refused when group or
//! others may access them ([`read_private`]).

use std::fs::{self, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use boringtun::x25519::StaticSecret;
use rand_core::OsRng;
use tracing::info;
use wiremesh_proto::PrivateKey;

/// Why the key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading, creating or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The key file, or the directory that holds it.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds a secret but group or others may access it.
    #[error(
        "{path}: mode {mode:o} lets group or others access it, and it holds a secret; chmod 600 it"
    )]
    Loose {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file exists but does not hold a base64 key.
    #[error("{path}: does not hold a WireGuard private key (44 characters of base64)")]
    Malformed {
        /// The key file.
        path: PathBuf,
    },
}

/// Creates `dir` if needed and makes it private (0700): the agent's own state directory,
/// which holds the private key (a Kubernetes hostPath is created 0755).
///
/// # Errors
/// When it cannot be created or its mode set.
pub fn private_dir(dir: &Path) -> Result<(), KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: dir.to_owned(),
        source,
    };
    fs::create_dir_all(dir).map_err(io)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)
}

/// Reads the private key at `path`, or generates one and writes it there (mode 0600, in
/// a directory of mode 0700) if the file does not exist.
///
/// # Errors
/// When the file cannot be read or written, or holds something else than a key.
pub fn load_or_generate(path: &Path) -> Result<PrivateKey, KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    match read_private(path) {
        Ok(text) => text
            .trim()
            .parse::<PrivateKey>()
            .map_err(|_| KeyFileError::Malformed {
                path: path.to_owned(),
            }),
        Err(KeyFileError::Io { source: e, .. }) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent()
                && !dir.as_os_str().is_empty()
                && !dir.exists()
            {
                fs::create_dir_all(dir).map_err(io)?;
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
            }
            let key = PrivateKey::from(StaticSecret::random_from_rng(OsRng).to_bytes());
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            file.write_all(format!("{}\n", key.to_base64()).as_bytes())
                .map_err(io)?;
            file.sync_all().map_err(io)?;
            info!(path = %path.display(), "generated a new private key");
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

/// Reads a file that holds a secret, refusing it when its mode gives group or others any
/// access (`mode & 0o077`): the mode is read from the opened file, so it is the file read.
///
/// # Errors
/// [`KeyFileError::Loose`] for such a mode, [`KeyFileError::Io`] when it cannot be read
/// (not UTF-8 included).
pub fn read_private(path: &Path) -> Result<String, KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::File::open(path).map_err(io)?;
    let mode = file.metadata().map_err(io)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Loose {
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_dir_tightens_an_existing_directory() {
        let dir = std::env::temp_dir().join(format!("wm-keys-dir-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn generates_once_with_mode_0600_then_reuses() {
        let dir = std::env::temp_dir().join(format!("wm-keytest-{}", std::process::id()));
        let path = dir.join("sub").join("wm0.key");
        let first = load_or_generate(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        let second = load_or_generate(&path).unwrap();
        assert_eq!(first, second);
        fs::write(&path, "garbage").unwrap();
        assert!(matches!(
            load_or_generate(&path),
            Err(KeyFileError::Malformed { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_file_group_or_others_may_access_is_refused_naming_it() {
        let dir = std::env::temp_dir().join(format!("wm-keyloose-{}", std::process::id()));
        let path = dir.join("wm0.key");
        let key = load_or_generate(&path).unwrap();
        for mode in [0o640, 0o604, 0o644, 0o660, 0o602] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let error = load_or_generate(&path).unwrap_err();
            assert!(
                matches!(error, KeyFileError::Loose { mode: m, .. } if m == mode),
                "{mode:o}: {error}"
            );
            assert!(
                error.to_string().contains(&*path.to_string_lossy()),
                "{error}"
            );
            // Not replaced by a new key either.
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            assert_eq!(load_or_generate(&path).unwrap(), key);
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(load_or_generate(&path).unwrap(), key);
        fs::remove_dir_all(&dir).unwrap();
    }
}
