//! The dashboard's files, embedded in the binary (no CDN, nothing read at run time). `app.js` is
//! built from `dashboard/src/` by `scripts/setup.sh` (`npm ci && npm run build`); `build.rs`
//! stops the build with that hint when it is missing.

/// A file of the page: its content type and bytes.
pub struct Asset {
    pub content_type: &'static str,
    pub bytes: &'static [u8],
}

const INDEX: Asset = Asset {
    content_type: "text/html; charset=utf-8",
    bytes: include_bytes!("../../../dashboard/static/index.html"),
};

/// The single page's routes: each serves `index.html`, the script draws the page for the path.
pub const PAGES: [&str; 7] = [
    "/",
    "/k8s/vms",
    "/k8s/charts",
    "/k8s/templates",
    "/k8s/snapshots",
    "/k8s/operations",
    "/k8s/events",
];

/// The asset served at `path`, if any.
pub fn get(path: &str) -> Option<Asset> {
    match path {
        "/assets/app.js" => Some(Asset {
            content_type: "text/javascript; charset=utf-8",
            bytes: include_bytes!("../../../dashboard/dist/app.js"),
        }),
        "/assets/app.css" => Some(Asset {
            content_type: "text/css; charset=utf-8",
            bytes: include_bytes!("../../../dashboard/static/app.css"),
        }),
        "/favicon.svg" => Some(Asset {
            content_type: "image/svg+xml",
            bytes: include_bytes!("../../../dashboard/static/favicon.svg"),
        }),
        p if PAGES.contains(&p) => Some(INDEX),
        _ => None,
    }
}
