//! Which accelerator VMs run with: KVM where it really works, else TCG (software emulation).

use crate::host::kvm::KvmFacts;

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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--accel kvm: {0}")]
pub struct AccelError(String);

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
        AccelMode::Kvm if !kvm.present => Err(AccelError(
            kvm.open_error
                .clone()
                .unwrap_or_else(|| "/dev/kvm is not available".into()),
        )),
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

    fn facts(modules: &[&str], self_test: Result<(), String>) -> KvmFacts {
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
        let failed = facts(&["kvm_amd"], Err("run: EINVAL".into()));
        let s = select(AccelMode::Auto, &failed).unwrap();
        assert_eq!(s.accel, Accel::Tcg);
        assert!(s.reason.contains("EINVAL"));
    }

    #[test]
    fn auto_never_trusts_kvm_pvm() {
        let pvm = facts(&["kvm_pvm"], Err("no hardware KVM module".into()));
        let s = select(AccelMode::Auto, &pvm).unwrap();
        assert_eq!(s.accel, Accel::Tcg);
        assert!(s.reason.contains("kvm_pvm"), "{}", s.reason);
    }

    #[test]
    fn auto_without_dev_kvm_is_tcg_and_forced_kvm_is_an_error() {
        let none = KvmFacts {
            open_error: Some("/dev/kvm: No such file".into()),
            self_test: Err("absent".into()),
            ..Default::default()
        };
        assert_eq!(select(AccelMode::Auto, &none).unwrap().accel, Accel::Tcg);
        assert!(select(AccelMode::Kvm, &none).is_err());
        assert_eq!(
            select(AccelMode::Tcg, &facts(&["kvm_intel"], Ok(())))
                .unwrap()
                .accel,
            Accel::Tcg
        );
    }
}
