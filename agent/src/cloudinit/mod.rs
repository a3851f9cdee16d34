//! cloud-init NoCloud: the checks of a VM's user data, and its `cidata` volume, a small FAT
//! image holding `meta-data`, `user-data` and, if given, `network-config`.
//!
//! Pure: the volume is built in memory, the same bytes for the same input (fixed timestamps,
//! volume id and label), so a migration target or a restore rebuilds exactly what the guest saw.

use std::io::{Cursor, Write};

use serde::{Deserialize, Serialize};

use crate::spec::FieldError;

/// Largest user data (and network data) accepted, as cloud-init's own datasources limit it.
pub const MAX_USER_DATA: usize = 64 << 10;
/// The volume's size: room for both 64 KiB files and meta-data, and FAT's own structures.
const VOLUME_BYTES: usize = 1 << 20;
/// The label cloud-init looks for.
const LABEL: &[u8; 11] = b"cidata     ";
/// Fixed, so that the volume is the same bytes every time.
const VOLUME_ID: u32 = 0x4349_4441;

/// What the guest's cloud-init is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudInit {
    pub user_data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_data: Option<String>,
    pub instance_id: String,
    pub hostname: String,
}

/// First lines cloud-init recognises in user data.
const HEADERS: &[&str] = &[
    "#cloud-config",
    "#!",
    "#include",
    "#cloud-boothook",
    "#part-handler",
    "## template: jinja",
    "Content-Type: multipart/",
];

impl CloudInit {
    /// Checks the request's values; an empty instance id or hostname becomes `vm`'s name.
    pub fn new(
        user_data: String,
        network_data: String,
        instance_id: &str,
        hostname: &str,
        vm: &str,
    ) -> Result<CloudInit, FieldError> {
        check_user_data(&user_data)?;
        let network_data = (!network_data.is_empty())
            .then(|| check_yaml("spec.cloudInit.networkData", &network_data).map(|()| network_data))
            .transpose()?;
        let or_vm = |s: &str| {
            if s.is_empty() {
                vm.to_string()
            } else {
                s.to_string()
            }
        };
        let (instance_id, hostname) = (or_vm(instance_id), or_vm(hostname));
        check_word("spec.cloudInit.instanceId", &instance_id, 128, "._-")?;
        check_word("spec.cloudInit.hostname", &hostname, 253, ".-")?;
        Ok(CloudInit {
            user_data,
            network_data,
            instance_id,
            hostname,
        })
    }

    /// The `meta-data` file.
    pub fn meta_data(&self) -> String {
        format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            self.instance_id, self.hostname
        )
    }

    /// The files of the volume, in the order they are written.
    pub fn files(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut files = vec![
            ("meta-data", self.meta_data().into_bytes()),
            ("user-data", self.user_data.clone().into_bytes()),
        ];
        if let Some(n) = &self.network_data {
            files.push(("network-config", n.clone().into_bytes()));
        }
        files
    }

    /// The `cidata` FAT volume.
    pub fn volume(&self) -> std::io::Result<Vec<u8>> {
        let mut disk = Cursor::new(vec![0u8; VOLUME_BYTES]);
        let options = fatfs::FormatVolumeOptions::new()
            .volume_label(*LABEL)
            .volume_id(VOLUME_ID);
        fatfs::format_volume(&mut disk, options)?;
        disk.set_position(0);
        {
            // Without chrono, fatfs stamps every entry with its fixed epoch (1980-01-01).
            let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
            for (name, bytes) in self.files() {
                fs.root_dir().create_file(name)?.write_all(&bytes)?;
            }
            fs.unmount()?;
        }
        Ok(disk.into_inner())
    }
}

/// User data: at most 64 KiB, starting with a header cloud-init knows; cloud-config must be
/// a YAML mapping. Empty user data gives the guest its meta-data only.
fn check_user_data(user_data: &str) -> Result<(), FieldError> {
    const FIELD: &str = "spec.cloudInit.userData";
    if user_data.len() > MAX_USER_DATA {
        return Err(FieldError::new(
            FIELD,
            format!(
                "is {} bytes, the limit is {MAX_USER_DATA} (64 KiB)",
                user_data.len()
            ),
        ));
    }
    if user_data.is_empty() {
        return Ok(());
    }
    let first = user_data.lines().next().unwrap_or_default().trim_end();
    if !HEADERS.iter().any(|h| first.starts_with(h)) {
        return Err(FieldError::new(
            FIELD,
            format!(
                "must start with a cloud-init header ({}), not {:?}",
                HEADERS.join(", "),
                first.chars().take(40).collect::<String>()
            ),
        ));
    }
    if first == "#cloud-config" {
        check_yaml(FIELD, user_data)?;
    }
    Ok(())
}

/// `text` is YAML whose top is a mapping (or empty).
fn check_yaml(field: &str, text: &str) -> Result<(), FieldError> {
    if text.len() > MAX_USER_DATA {
        return Err(FieldError::new(
            field,
            format!("is {} bytes, the limit is {MAX_USER_DATA}", text.len()),
        ));
    }
    match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) {
        Ok(serde_yaml_ng::Value::Mapping(_) | serde_yaml_ng::Value::Null) => Ok(()),
        Ok(_) => Err(FieldError::new(field, "must be a YAML mapping")),
        Err(e) => Err(FieldError::new(field, format!("is not valid YAML: {e}"))),
    }
}

/// A meta-data value: letters, digits and `extra`, at most `max` long (it goes into YAML as is).
fn check_word(field: &str, value: &str, max: usize, extra: &str) -> Result<(), FieldError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(c));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{value:?} must be 1-{max} letters, digits or {extra:?}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn ci(user_data: &str) -> Result<CloudInit, FieldError> {
        CloudInit::new(user_data.into(), String::new(), "", "", "vm-1")
    }

    #[test]
    fn user_data_needs_a_header_and_a_size_limit() {
        assert!(ci("#cloud-config\nhostname: a\n").is_ok());
        assert!(ci("#!/bin/sh\necho hi\n").is_ok());
        assert!(ci("").is_ok());
        let e = ci("hostname: a\n").unwrap_err();
        assert_eq!(e.field, "spec.cloudInit.userData");
        assert!(e.message.contains("cloud-init header"), "{e}");
        let e = ci("#cloud-config\n: [unclosed\n").unwrap_err();
        assert!(e.message.contains("YAML"), "{e}");
        let e = ci("#cloud-config\n- a list\n").unwrap_err();
        assert!(e.message.contains("mapping"), "{e}");
        let big = format!("#cloud-config\n#{}\n", "x".repeat(MAX_USER_DATA));
        let e = ci(&big).unwrap_err();
        assert!(e.message.contains("64 KiB"), "{e}");
        let e = CloudInit::new(String::new(), "[1".into(), "", "", "v").unwrap_err();
        assert_eq!(e.field, "spec.cloudInit.networkData");
        let e = CloudInit::new(String::new(), String::new(), "a\nb: c", "", "v").unwrap_err();
        assert_eq!(e.field, "spec.cloudInit.instanceId");
        let e = CloudInit::new(String::new(), String::new(), "", "a b", "v").unwrap_err();
        assert_eq!(e.field, "spec.cloudInit.hostname");
    }

    #[test]
    fn meta_data_names_the_instance_and_host() {
        let c = CloudInit::new(String::new(), String::new(), "3f1c-uid", "web", "vm-1").unwrap();
        assert_eq!(
            c.meta_data(),
            "instance-id: 3f1c-uid\nlocal-hostname: web\n"
        );
        let c = ci("").unwrap();
        assert_eq!(c.meta_data(), "instance-id: vm-1\nlocal-hostname: vm-1\n");
    }

    /// The files of a volume, read back with fatfs.
    fn read_volume(bytes: Vec<u8>) -> (String, Vec<(String, Vec<u8>)>) {
        let fs = fatfs::FileSystem::new(Cursor::new(bytes), fatfs::FsOptions::new()).unwrap();
        let label = fs.volume_label();
        let mut files = Vec::new();
        for entry in fs.root_dir().iter() {
            let entry = entry.unwrap();
            let mut data = Vec::new();
            entry.to_file().read_to_end(&mut data).unwrap();
            files.push((entry.file_name(), data));
        }
        (label, files)
    }

    #[test]
    fn the_volume_is_the_same_bytes_every_time_and_reads_back() {
        let c = CloudInit::new(
            "#cloud-config\nhostname: web\n".into(),
            "version: 2\n".into(),
            "uid-1",
            "web",
            "vm-1",
        )
        .unwrap();
        let a = c.volume().unwrap();
        let b = c.volume().unwrap();
        assert!(a == b, "two builds of one input differ");
        let (label, files) = read_volume(a);
        assert_eq!(label.trim_end(), "cidata");
        let names: Vec<_> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["meta-data", "user-data", "network-config"]);
        assert_eq!(files[0].1, b"instance-id: uid-1\nlocal-hostname: web\n");
        assert_eq!(files[1].1, b"#cloud-config\nhostname: web\n");
        let other = CloudInit::new(String::new(), String::new(), "uid-2", "", "vm-1").unwrap();
        assert!(
            other.volume().unwrap() != b,
            "another instance, other bytes"
        );
    }
}
