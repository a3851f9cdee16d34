//! Which host files a VM may use: only those inside the agent's data dir or an `--image-dir`.
//!
//! A request names paths; the agent resolves them (following symlinks) and refuses any that end
//! up outside the allowed roots, so a caller cannot hand a host file such as `/etc/shadow` to a guest.

use std::path::{Path, PathBuf};

use crate::spec::FieldError;

#[derive(Debug, Clone)]
pub struct PathPolicy {
    roots: Vec<PathBuf>,
}

impl PathPolicy {
    /// `roots` must exist; they are canonicalised once here.
    pub fn new(roots: impl IntoIterator<Item = PathBuf>) -> std::io::Result<Self> {
        let roots = roots
            .into_iter()
            .map(|r| {
                r.canonicalize()
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", r.display())))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { roots })
    }

    /// This policy with one more allowed root.
    pub fn with(&self, root: &Path) -> std::io::Result<Self> {
        Self::new(self.roots.iter().cloned().chain([root.to_path_buf()]))
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Resolves `path` to a regular file inside one of the roots.
    pub fn resolve_file(&self, field: &str, path: &Path) -> Result<PathBuf, FieldError> {
        let real = path
            .canonicalize()
            .map_err(|e| FieldError::new(field, format!("{}: {e}", path.display())))?;
        if !self.roots.iter().any(|r| real.starts_with(r)) {
            return Err(FieldError::new(
                field,
                format!(
                    "{} is outside the allowed directories ({})",
                    path.display(),
                    self.roots
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if !real.is_file() {
            return Err(FieldError::new(
                field,
                format!("{} is not a regular file", path.display()),
            ));
        }
        Ok(real)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_files_inside_roots_only() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let inside = root.path().join("k");
        std::fs::write(&inside, b"x").unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("link"))
            .unwrap();
        let policy = PathPolicy::new([root.path().to_path_buf()]).unwrap();

        assert!(policy.resolve_file("f", &inside).is_ok());
        let e = policy
            .resolve_file("f", Path::new("/etc/shadow"))
            .unwrap_err();
        assert!(e.message.contains("outside the allowed"), "{e}");
        let e = policy
            .resolve_file("f", &root.path().join("link"))
            .unwrap_err();
        assert!(
            e.message.contains("outside the allowed"),
            "symlink escape: {e}"
        );
        let e = policy.resolve_file("f", root.path()).unwrap_err();
        assert!(e.message.contains("not a regular file"), "{e}");
        let e = policy
            .resolve_file("f", &root.path().join("missing"))
            .unwrap_err();
        assert_eq!(e.field, "f");
    }
}
