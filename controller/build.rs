//! The dashboard's script is built by npm (`scripts/setup.sh`), not by cargo: fail early, with the
//! command to run, when it is missing.

fn main() {
    let bundle = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboard/dist/app.js");
    println!("cargo:rerun-if-changed={}", bundle.display());
    if !bundle.is_file() {
        panic!(
            "{} is missing: build the dashboard with `scripts/setup.sh` \
             (or `cd dashboard && npm ci && npm run build`)",
            bundle.display()
        );
    }
}
