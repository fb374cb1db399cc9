//! Rotating the node's WireGuard key with no lost packet (issue 12 §5).
//!
//! `meshctl rotate-keys` sets [`ROTATE_KEYS_ANNOTATION`] on MeshNodes; an agent that
//! sees a new value on its own MeshNode generates a key, keeps both on disk
//! (`<state dir>/rotation` first, then the key file, each written atomically: a restart
//! at any point comes back with the key it published and, if it rotated, the previous
//! one), switches the device to the new key while it keeps the old one as previous
//! ([`wiremesh_core::Device`] answers handshakes to either and keeps the old sessions
//! until each peer has a session under the new key), then publishes the new key.
//!
//! [`ROTATE_KEYS_ANNOTATION`]: wiremesh_proto::crd::ROTATE_KEYS_ANNOTATION

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use boringtun::x25519::StaticSecret;
use rand_core::OsRng;
use wiremesh_proto::PrivateKey;
use wiremesh_proto::uapi::{DeviceUpdate, PreviousKey};

/// The file in the state directory.
pub const ROTATION_FILE: &str = "rotation";

/// How long the previous key is kept at most (it goes earlier once every peer with a
/// session has handshaken under the new key).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);

/// What `<state dir>/rotation` holds: the last request handled, and the key it rotated
/// out with the time (seconds since the epoch) until which it is kept.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rotation {
    /// The annotation value of the last rotation done.
    pub request: Option<String>,
    /// The key rotated out, and until when it is kept.
    pub previous: Option<(PrivateKey, u64)>,
}

impl Rotation {
    /// Parses the file's text; lines it does not know are skipped, a bad key or time
    /// drops the previous key (the rotation itself is still recorded as done).
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        let mut key = None;
        let mut until = None;
        for line in text.lines() {
            match line.split_once('=') {
                Some(("request", v)) if !v.is_empty() => out.request = Some(v.to_owned()),
                Some(("previous", v)) => key = v.parse::<PrivateKey>().ok(),
                Some(("until", v)) => until = v.parse::<u64>().ok(),
                _ => {}
            }
        }
        out.previous = key.zip(until);
        out
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(request) = &self.request {
            out.push_str(&format!("request={request}\n"));
        }
        if let Some((key, until)) = &self.previous {
            out.push_str(&format!("previous={}\nuntil={until}\n", key.to_base64()));
        }
        out
    }

    /// The previous key for the device at `now` (seconds since the epoch), with the grace
    /// left; `None` once it has passed or when it is the current key.
    pub fn previous_key(&self, current: &PrivateKey, now: u64) -> Option<PreviousKey> {
        let (key, until) = self.previous.as_ref()?;
        (key != current && *until > now).then(|| PreviousKey {
            key: *key,
            grace: Duration::from_secs(until - now),
        })
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads `<state dir>/rotation`; a missing or unreadable file is no rotation.
pub fn load(state_dir: &Path) -> Rotation {
    crate::keys::read_private(&state_dir.join(ROTATION_FILE))
        .map(|text| Rotation::parse(&text))
        .unwrap_or_default()
}

/// What a rotation did: the update for the device and the new key.
#[derive(Debug)]
pub struct Rotated {
    /// Private key `new`, previous key `old`.
    pub update: DeviceUpdate,
    /// The new key.
    pub key: PrivateKey,
}

/// Rotates the key in `key_file` from `current` for `request`: writes the rotation file
/// (request, the current key as previous, kept `grace`), then the new key, each
/// atomically. A crash between the two leaves the old key in use and the request not
/// done (the rotation file names the key in use as previous, which is ignored).
///
/// # Errors
/// When a file cannot be written.
pub fn rotate(
    state_dir: &Path,
    key_file: &Path,
    current: &PrivateKey,
    request: &str,
    grace: Duration,
) -> Result<Rotated, std::io::Error> {
    let key = PrivateKey::from(StaticSecret::random_from_rng(OsRng).to_bytes());
    let record = Rotation {
        request: Some(request.to_owned()),
        previous: Some((*current, now_secs() + grace.as_secs())),
    };
    crate::state::write_atomic(&state_dir.join(ROTATION_FILE), record.render().as_bytes())?;
    crate::state::write_atomic(key_file, format!("{}\n", key.to_base64()).as_bytes())?;
    Ok(Rotated {
        update: DeviceUpdate {
            private_key: Some(Some(key)),
            previous_key: Some(PreviousKey {
                key: *current,
                grace,
            }),
            ..DeviceUpdate::default()
        },
        key,
    })
}

/// Whether `request` (the annotation's value) asks for a rotation not done yet, given
/// the rotation file and the key in use: the file records it as done only when the key
/// in use is not the one it rotated out (a crash before the new key was written).
pub fn is_new(request: Option<&str>, done: &Rotation, current: &PrivateKey) -> bool {
    let Some(request) = request.filter(|r| !r.is_empty()) else {
        return false;
    };
    let completed = done.request.as_deref() == Some(request)
        && done.previous.as_ref().is_none_or(|(old, _)| old != current);
    !completed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> PrivateKey {
        PrivateKey::from([b; 32])
    }

    #[test]
    fn the_file_round_trips_and_tolerates_damage() {
        let r = Rotation {
            request: Some("2026-12-07T00:00:00Z".into()),
            previous: Some((key(1), 1_000)),
        };
        assert_eq!(Rotation::parse(&r.render()), r);
        let damaged = "request=x\nprevious=garbage\nuntil=5\nother=1\n";
        assert_eq!(
            Rotation::parse(damaged),
            Rotation {
                request: Some("x".into()),
                previous: None
            }
        );
        assert_eq!(Rotation::parse(""), Rotation::default());
    }

    #[test]
    fn the_previous_key_is_kept_for_what_is_left_of_its_grace() {
        let r = Rotation {
            request: Some("a".into()),
            previous: Some((key(1), 1_000)),
        };
        let p = r.previous_key(&key(2), 400).unwrap();
        assert_eq!((p.key, p.grace), (key(1), Duration::from_secs(600)));
        assert!(r.previous_key(&key(2), 1_000).is_none(), "grace over");
        assert!(r.previous_key(&key(1), 400).is_none(), "never rotated");
    }

    #[test]
    fn a_request_is_done_once_and_survives_a_crash_halfway() {
        let dir = std::env::temp_dir().join(format!("wm-rotation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key_file = dir.join("wm0.key");
        let first = crate::keys::load_or_generate(&key_file).unwrap();
        assert!(is_new(Some("r1"), &load(&dir), &first));
        assert!(!is_new(None, &load(&dir), &first));
        let rotated = rotate(&dir, &key_file, &first, "r1", DEFAULT_GRACE).unwrap();
        // A restart reads the new key and the previous one; the request is done.
        assert_eq!(
            crate::keys::load_or_generate(&key_file).unwrap(),
            rotated.key
        );
        let state = load(&dir);
        assert!(!is_new(Some("r1"), &state, &rotated.key));
        assert!(is_new(Some("r2"), &state, &rotated.key));
        let previous = state.previous_key(&rotated.key, now_secs()).unwrap();
        assert_eq!(previous.key, first);
        // A crash after the rotation file and before the key file: the old key is still
        // in use, and the request is not done.
        assert!(is_new(Some("r1"), &state, &first));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
