//! Which accelerator VMs run with: KVM where it really works, else TCG (software emulation).

use crate::host::kvm::{KvmFacts, OpenError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The operator's `--accel` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelMode {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub accel: Accel,
    pub reason: String,
}

/// `--accel kvm` on a node where KVM cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccelError {
    #[error("--accel kvm: {0}")]
    Open(#[source] OpenError),
    #[error("--accel kvm: /dev/kvm is not available")]
    NoKvm,
}

/// Picks the accelerator. Pure: decides from facts already read.
pub fn select(mode: AccelMode, kvm: &KvmFacts) -> Result<Selection, AccelError> {
    let pick = |accel, reason: &str| {
        Ok(Selection {
            accel,
            reason: reason.to_string(),
        })
    };
    match mode {
        AccelMode::Tcg => pick(Accel::Tcg, "requested with --accel tcg"),
        AccelMode::Kvm if !kvm.present => {
            Err(kvm.open_error.map_or(AccelError::NoKvm, AccelError::Open))
        }
        AccelMode::Kvm => pick(Accel::Kvm, "requested with --accel kvm"),
        AccelMode::Auto => match (&kvm.open_error, &kvm.self_test) {
            (Some(e), _) => pick(Accel::Tcg, &format!("KVM unavailable ({e})")),
            (None, Ok(())) => pick(Accel::Kvm, "KVM self-test passed"),
            (None, Err(_)) if !kvm.has_hardware_module() => pick(
                Accel::Tcg,
                &format!(
                    "/dev/kvm is provided by {} only, which cannot run standard guest kernels",
                    if kvm.modules.is_empty() {
                        "an unknown module".to_string()
                    } else {
                        kvm.modules.join(", ")
                    }
                ),
            ),
            (None, Err(e)) => pick(Accel::Tcg, &format!("KVM self-test failed: {e}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::host::kvm::SelfTestError;

    fn facts(modules: &[&str], self_test: Result<(), SelfTestError>) -> KvmFacts {
        KvmFacts {
            present: true,
            modules: modules.iter().map(|m| m.to_string()).collect(),
            self_test,
            ..Default::default()
        }
    }

    #[test]
    fn auto_uses_kvm_only_when_the_self_test_ran() {
        let ok = facts(&["kvm_intel"], Ok(()));
        assert_eq!(select(AccelMode::Auto, &ok).unwrap().accel, Accel::Kvm);
        let einval = kvm_ioctls::Error::new(libc::EINVAL);
        let run = SelfTestError::Ioctl {
            step: "run",
            source: einval,
        };
        let failed = facts(&["kvm_amd"], Err(run));
        let s = select(AccelMode::Auto, &failed).unwrap();
        assert_eq!(s.accel, Accel::Tcg);
        assert!(s.reason.contains(&format!("run: {einval}")), "{}", s.reason);
    }

    #[test]
    fn auto_never_trusts_kvm_pvm() {
        let pvm = facts(&["kvm_pvm"], Err(SelfTestError::NoHardwareModule));
        let s = select(AccelMode::Auto, &pvm).unwrap();
        assert_eq!(s.accel, Accel::Tcg);
        assert!(s.reason.contains("kvm_pvm"), "{}", s.reason);
    }

    #[test]
    fn auto_without_dev_kvm_is_tcg_and_forced_kvm_is_an_error() {
        let enoent = OpenError(kvm_ioctls::Error::new(libc::ENOENT));
        let none = KvmFacts {
            open_error: Some(enoent),
            self_test: Err(SelfTestError::NoDevice),
            ..Default::default()
        };
        let auto = select(AccelMode::Auto, &none).unwrap();
        assert_eq!(auto.accel, Accel::Tcg);
        assert!(auto.reason.contains("/dev/kvm: "), "{}", auto.reason);
        assert_eq!(select(AccelMode::Kvm, &none), Err(AccelError::Open(enoent)));
        assert_eq!(
            select(AccelMode::Kvm, &KvmFacts::default()),
            Err(AccelError::NoKvm)
        );
        assert_eq!(
            select(AccelMode::Tcg, &facts(&["kvm_intel"], Ok(())))
                .unwrap()
                .accel,
            Accel::Tcg
        );
    }
}
