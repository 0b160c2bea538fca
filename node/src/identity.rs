//! The node's identity: one Ed25519 keypair in the data dir, whose PeerId is the agent's address.
//!
//! Created on first run and loaded after. The key file holds the libp2p protobuf encoding of the
//! keypair and must be readable by its owner only (mode 0600), as ssh insists for private keys.
//! A key file that cannot be read or decoded is an error: quietly making a new identity would
//! change the agent's address and orphan everything published under the old one.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use libp2p::PeerId;
use libp2p::identity::Keypair;
use skillmesh_protocol::SigningKey;

/// File name of the key inside the data dir.
pub const KEY_FILE: &str = "identity.key";

/// The node's keypair and the envelope signing key derived from it.
#[derive(Clone)]
pub struct Identity {
    keypair: Keypair,
    signing: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("peer_id", &self.peer_id())
            .finish_non_exhaustive()
    }
}

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The key file exists but could not be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The key file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The key file is not a valid Ed25519 keypair.
    #[error(
        "key file {path} is corrupt ({reason}); restore it from a backup, or move it away to start a new identity"
    )]
    Corrupt {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Others can read the key file.
    #[error("key file {path} has mode {mode:o}, readable by others; run: chmod 600 {path}")]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file could not be written.
    #[error("cannot write key file {path}: {source}")]
    Write {
        /// The key file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl Identity {
    /// A new random identity, not saved.
    pub fn generate() -> Self {
        Self::from_keypair(Keypair::generate_ed25519())
            .unwrap_or_else(|_| unreachable!("a generated ed25519 keypair is ed25519"))
    }

    fn from_keypair(keypair: Keypair) -> Result<Self, skillmesh_protocol::NotEd25519> {
        let signing = SigningKey::from_keypair(&keypair)?;
        Ok(Identity { keypair, signing })
    }

    /// Loads the identity in `data_dir`, creating it if there is none. Returns whether it was
    /// created.
    pub fn load_or_create(data_dir: &Path) -> Result<(Self, bool), IdentityError> {
        let path = data_dir.join(KEY_FILE);
        match fs::symlink_metadata(&path) {
            Ok(_) => Ok((Self::load(&path)?, false)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let id = Self::generate();
                id.save_new(&path)?;
                Ok((id, true))
            }
            Err(source) => Err(IdentityError::Read { path, source }),
        }
    }

    /// Loads a key file.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let read_err = |source| IdentityError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(read_err)?;
        check_mode(path, &meta)?;
        let bytes = fs::read(path).map_err(read_err)?;
        let corrupt = |reason: String| IdentityError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let keypair = Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| corrupt(format!("not a libp2p keypair: {e}")))?;
        Self::from_keypair(keypair).map_err(|e| corrupt(e.to_string()))
    }

    /// Writes the key to a new file at `path` (mode 0600), atomically: a crash leaves either no
    /// key file or a complete one. Fails if the file exists.
    pub fn save_new(&self, path: &Path) -> Result<(), IdentityError> {
        let write_err = |source| IdentityError::Write {
            path: path.to_owned(),
            source,
        };
        let bytes = self
            .keypair
            .to_protobuf_encoding()
            .map_err(|e| write_err(io::Error::other(e)))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(write_err)?;
        let tmp = path.with_extension("key.tmp");
        let mut file = create_private(&tmp).map_err(write_err)?;
        let written = file.write_all(&bytes).and_then(|()| file.sync_all());
        drop(file);
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(write_err(e));
        }
        // hard_link fails if `path` exists, so an existing identity is never replaced.
        let linked = fs::hard_link(&tmp, path);
        let _ = fs::remove_file(&tmp);
        linked.map_err(write_err)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The agent's address.
    pub fn peer_id(&self) -> PeerId {
        self.signing.peer_id()
    }

    /// The libp2p keypair, for the swarm.
    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    /// The key that signs envelopes.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }
}

#[cfg(unix)]
fn create_private(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = fs::remove_file(path);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn create_private(path: &Path) -> io::Result<fs::File> {
    let _ = fs::remove_file(path);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

#[cfg(unix)]
fn check_mode(path: &Path, meta: &fs::Metadata) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_: &Path, _: &fs::Metadata) -> Result<(), IdentityError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, created) = Identity::load_or_create(dir.path()).expect("create");
        assert!(created);
        let (b, created) = Identity::load_or_create(dir.path()).expect("load");
        assert!(!created);
        assert_eq!(a.peer_id(), b.peer_id());
    }

    #[cfg(unix)]
    #[test]
    fn key_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        Identity::load_or_create(dir.path()).expect("create");
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[cfg(unix)]
    #[test]
    fn readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        Identity::load_or_create(dir.path()).expect("create");
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = Identity::load_or_create(dir.path()).expect_err("must refuse");
        assert!(
            matches!(err, IdentityError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn corrupt_key_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (id, _) = Identity::load_or_create(dir.path()).expect("create");
        let path = dir.path().join(KEY_FILE);
        let mut bytes = fs::read(&path).expect("read");
        bytes.truncate(bytes.len() / 2);
        fs::write(&path, &bytes).expect("write");
        let err = Identity::load_or_create(dir.path()).expect_err("must refuse");
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
        // Nothing was replaced: the damaged file is still there for the user to recover.
        assert_eq!(fs::read(&path).expect("read"), bytes);
        assert!(!err.to_string().contains(&id.peer_id().to_string()));
        fs::write(&path, b"").expect("write");
        assert!(matches!(
            Identity::load_or_create(dir.path()),
            Err(IdentityError::Corrupt { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn unreadable_key_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A directory where the key file should be: it exists but cannot be read as a file.
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join(KEY_FILE);
        fs::create_dir(&path).expect("mkdir");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).expect("chmod");
        let err = Identity::load_or_create(dir.path()).expect_err("must refuse");
        assert!(matches!(err, IdentityError::Read { .. }), "{err}");
    }

    #[test]
    fn save_never_replaces_an_existing_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, _) = Identity::load_or_create(dir.path()).expect("create");
        let b = Identity::generate();
        assert!(b.save_new(&dir.path().join(KEY_FILE)).is_err());
        let (c, _) = Identity::load_or_create(dir.path()).expect("load");
        assert_eq!(a.peer_id(), c.peer_id());
    }
}
