//! `hyperctl certs`: a cluster CA and the role certificates it signs, as PEM files.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
use hypersdk_tls::files::{read_pem, write_pem};
use hypersdk_tls::issue::{self, Validity};
use hypersdk_tls::role::Role;

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Create a cluster CA: DIR/ca.crt and DIR/ca.key (mode 0600).
    Init {
        dir: PathBuf,
        /// Days the CA is valid.
        #[arg(long, default_value = "3650")]
        days: u32,
    },
    /// Issue a certificate for a role, signed by the CA in --ca: OUT/NAME.crt and OUT/NAME.key.
    Issue {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long, value_parser = ["agent", "controller", "admin"])]
        role: String,
        /// The node name (agents) or the holder's name; also the file name.
        #[arg(long)]
        name: String,
        /// IP address or DNS name the holder is reached at (agents need one; repeatable).
        #[arg(long = "san", value_delimiter = ',')]
        sans: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value = "365")]
        days: u32,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init { dir, days } => {
            let pem = issue::new_ca("hypersdk cluster CA", Validity::days_from_now(days))?;
            let (cert, key) = write_pem(&dir, "ca", &pem)?;
            println!("{}\n{}", cert.display(), key.display());
        }
        CertsCommand::Issue {
            ca,
            role,
            name,
            sans,
            days,
            out,
        } => {
            let role = Role::new(&role, &name).context("--name")?;
            let ca_pem = read_pem(&ca, "ca").context("--ca")?;
            let pem = issue::issue(&ca_pem, &role, &sans, Validity::days_from_now(days))?;
            let (cert, key) = write_pem(&out, &name, &pem).context("--out")?;
            println!("{}\n{}", cert.display(), key.display());
        }
    }
    Ok(())
}
