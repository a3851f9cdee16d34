//! The agent's on-disk state: one directory per VM under `<data-dir>/vms/`, holding the spec
//! and the last known status, each written atomically (temp file, fsync, rename, fsync dir).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::spec::VmSpec;
use crate::vm::phase::Phase;

pub const SPEC_FILE: &str = "spec.json";
pub const STATE_FILE: &str = "state.json";

/// What survives an agent restart about a VM's process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedState {
    pub phase: Phase,
    pub message: String,
    pub pid: u32,
    pub started_at_ms: i64,
    /// vCPUs the QEMU process can still hot-add, where that is limited (TCG).
    #[serde(default)]
    pub cpu_adds_left: Option<u32>,
}

/// A VM as read back from disk.
#[derive(Debug)]
pub struct Loaded {
    pub spec: VmSpec,
    /// Its last saved state, if one was saved and could be read.
    pub state: Option<SavedState>,
    /// Why the state file could not be read.
    pub problem: Option<LoadError>,
}

/// A file of a VM's directory that could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Renamed aside, so the next write starts clean and the evidence is kept.
    #[error("{source} (set aside as {})", aside.display())]
    SetAside {
        #[source]
        source: std::io::Error,
        aside: PathBuf,
    },
    #[error(transparent)]
    Unreadable(std::io::Error),
}

#[derive(Debug, Clone)]
pub struct Store {
    vms_dir: PathBuf,
}

impl Store {
    pub fn open(data_dir: &Path) -> std::io::Result<Store> {
        let vms_dir = data_dir.join("vms");
        std::fs::create_dir_all(&vms_dir)?;
        Ok(Store { vms_dir })
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.vms_dir.join(name)
    }

    /// Creates the VM's directory and spec; fails with `AlreadyExists` if the VM exists.
    pub fn create(&self, spec: &VmSpec) -> std::io::Result<PathBuf> {
        let dir = self.vm_dir(&spec.name);
        std::fs::create_dir(&dir)?;
        if let Err(e) = write_json(&dir.join(SPEC_FILE), spec) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(dir)
    }

    /// Replaces the spec (after a resize, say) atomically.
    pub fn save_spec(&self, spec: &VmSpec) -> std::io::Result<()> {
        write_json(&self.vm_dir(&spec.name).join(SPEC_FILE), spec)
    }

    pub fn save_state(&self, name: &str, state: &SavedState) -> std::io::Result<()> {
        write_json(&self.vm_dir(name).join(STATE_FILE), state)
    }

    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        match std::fs::remove_dir_all(self.vm_dir(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every VM directory: its spec and state, or why the spec could not be read. A file that
    /// cannot be read is renamed aside (`*.corrupt`), so the next write starts clean and the
    /// evidence is kept.
    pub fn load_all(&self) -> std::io::Result<Vec<(String, Result<Loaded, LoadError>)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.vms_dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let dir = entry.path();
            let loaded = match read_json::<VmSpec>(&dir.join(SPEC_FILE))
                .and_then(|s| revalidate(&name, s))
            {
                Err(e) => Err(set_aside(&dir.join(SPEC_FILE), e)),
                Ok(spec) => {
                    let (state, problem) = match read_json::<SavedState>(&dir.join(STATE_FILE)) {
                        Ok(state) => (Some(state), None),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, None),
                        Err(e) => (None, Some(set_aside(&dir.join(STATE_FILE), e))),
                    };
                    Ok(Loaded {
                        spec,
                        state,
                        problem,
                    })
                }
            };
            out.push((name, loaded));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// A spec read back from disk passes the same checks as a request, and names its directory:
/// the file could have been changed by anyone who can write there.
fn revalidate(dir_name: &str, spec: VmSpec) -> std::io::Result<VmSpec> {
    use std::io::{Error, ErrorKind::InvalidData};
    if spec.name != dir_name {
        let names = format!("names VM {:?}, not {dir_name:?}", spec.name);
        return Err(Error::new(InvalidData, names));
    }
    let format_of = |s: &VmSpec| s.disks.iter().map(|d| d.format).collect::<Vec<_>>();
    let formats = format_of(&spec);
    let mut checked = VmSpec::try_from(hypersdk_proto::agent::v1::VmSpec::from(&spec))
        .map_err(|e| Error::new(InvalidData, e))?;
    // Detected disk formats are kept; the rest must be exactly what validation yields.
    for (d, f) in checked.disks.iter_mut().zip(formats) {
        d.format = f;
    }
    Ok(checked)
}

/// Renames an unreadable file to `NAME.corrupt`.
fn set_aside(path: &Path, source: std::io::Error) -> LoadError {
    let aside = path.with_extension("json.corrupt");
    match std::fs::rename(path, &aside) {
        Ok(()) => LoadError::SetAside { source, aside },
        Err(_) => LoadError::Unreadable(source),
    }
}

/// Writes JSON so that a crash leaves either the old or the new file, never a torn one.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile_in(dir, path)?;
    let bytes = serde_json::to_vec_pretty(value)?;
    tmp.1.write_all(&bytes)?;
    tmp.1.sync_all()?;
    std::fs::rename(&tmp.0, path)?;
    std::fs::File::open(dir)?.sync_all()
}

fn tempfile_in(dir: &Path, target: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let file = std::fs::File::create(&tmp)?;
    Ok((tmp, file))
}

pub fn read_json<T: DeserializeOwned>(path: &Path) -> std::io::Result<T> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> VmSpec {
        crate::spec::tests::minimal(name)
    }

    #[test]
    fn create_load_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create(&spec("a")).unwrap();
        store.create(&spec("b")).unwrap();
        let dup = store.create(&spec("a")).unwrap_err();
        assert_eq!(dup.kind(), std::io::ErrorKind::AlreadyExists);
        let state = SavedState {
            phase: Phase::Running,
            message: String::new(),
            pid: 42,
            started_at_ms: 1,
            cpu_adds_left: None,
        };
        store.save_state("a", &state).unwrap();
        std::fs::write(store.vm_dir("b").join(SPEC_FILE), b"{torn").unwrap();
        // A spec that names another directory (say, "/") is refused like a torn one.
        std::fs::create_dir(store.vm_dir("c")).unwrap();
        let mut evil = spec("c");
        evil.name = "/".into();
        write_json(&store.vm_dir("c").join(SPEC_FILE), &evil).unwrap();

        let all = store.load_all().unwrap();
        assert_eq!(all.len(), 3);
        let evil = all[2].1.as_ref().unwrap_err().to_string();
        assert!(evil.contains("names VM \"/\""), "{evil}");
        let a = all[0].1.as_ref().unwrap();
        assert_eq!(a.spec, spec("a"));
        assert_eq!(a.state.as_ref(), Some(&state));
        let err = all[1].1.as_ref().unwrap_err();
        assert!(
            matches!(err, LoadError::SetAside { aside, .. } if aside.ends_with("spec.json.corrupt")),
            "a torn spec is reported, not fatal: {err}"
        );
        assert!(store.vm_dir("b").join("spec.json.corrupt").exists());

        std::fs::write(store.vm_dir("a").join(STATE_FILE), b"\0\0garbage").unwrap();
        let all = store.load_all().unwrap();
        let a = all[0].1.as_ref().unwrap();
        assert!(a.state.is_none() && a.problem.is_some());

        store.remove("a").unwrap();
        store.remove("a").unwrap();
        assert_eq!(store.load_all().unwrap().len(), 2, "b and c remain");
    }
}
