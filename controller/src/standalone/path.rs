//! Request paths and query parameters of the Kubernetes REST API.

use super::store::Resource;

/// `/api/v1/...` or `/apis/GROUP/VERSION/...`, then `[namespaces/NS/]PLURAL[/NAME[/status]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiPath {
    pub resource: Resource,
    pub version: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub status: bool,
}

impl ApiPath {
    pub fn parse(path: &str) -> Option<ApiPath> {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match segs.as_slice() {
            ["api", v, rest @ ..] => ("", *v, rest),
            ["apis", g, v, rest @ ..] => (*g, *v, rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            _ => (None, rest),
        };
        let (plural, name, status) = match rest {
            [plural] => (*plural, None, false),
            [plural, name] => (*plural, Some(name.to_string()), false),
            [plural, name, "status"] => (*plural, Some(name.to_string()), true),
            _ => return None,
        };
        Some(ApiPath {
            resource: (group.to_string(), plural.to_string()),
            version: version.to_string(),
            namespace,
            name,
            status,
        })
    }

    pub fn ns(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    pub fn api_version(&self) -> String {
        if self.resource.0.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.resource.0, self.version)
        }
    }
}

/// The query parameters this API honours.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pub watch: bool,
    pub resource_version: Option<u64>,
    pub timeout_seconds: Option<u64>,
    /// Equality requirements only (`a=b,c=d`), which is what the controller uses.
    pub label_selector: Vec<(String, String)>,
}

impl Query {
    pub fn parse(query: &str) -> Query {
        let mut q = Query::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "watch" => q.watch = v == "true" || v == "1",
                "resourceVersion" => q.resource_version = v.parse().ok(),
                "timeoutSeconds" => q.timeout_seconds = v.parse().ok(),
                "labelSelector" => {
                    q.label_selector = v
                        .split(',')
                        .filter_map(|req| req.split_once('='))
                        .map(|(k, v)| {
                            (
                                k.trim_end_matches('=').to_string(),
                                v.trim_start_matches('=').to_string(),
                            )
                        })
                        .collect()
                }
                _ => {}
            }
        }
        q
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_resource_paths() {
        let p = ApiPath::parse(
            "/apis/hypersdk.io/v1alpha1/namespaces/default/virtualmachines/vm1/status",
        )
        .unwrap();
        assert_eq!(p.resource, ("hypersdk.io".into(), "virtualmachines".into()));
        assert_eq!(
            (p.ns(), p.name.as_deref(), p.status),
            (Some("default"), Some("vm1"), true)
        );
        assert_eq!(p.api_version(), "hypersdk.io/v1alpha1");
        let p = ApiPath::parse("/api/v1/pods").unwrap();
        assert_eq!(
            (p.resource.0.as_str(), p.ns(), p.name.as_deref()),
            ("", None, None)
        );
        assert_eq!(p.api_version(), "v1");
        assert!(ApiPath::parse("/version").is_none());
        assert!(ApiPath::parse("/apis/g/v/a/b/c/d").is_none());
    }

    #[test]
    fn parses_watch_queries() {
        let q = Query::parse(
            "watch=true&resourceVersion=42&timeoutSeconds=290&labelSelector=app%3Dagent%2Ctier%3D%3Dnode&allowWatchBookmarks=true",
        );
        assert!(q.watch);
        assert_eq!(
            (q.resource_version, q.timeout_seconds),
            (Some(42), Some(290))
        );
        assert_eq!(
            q.label_selector,
            [
                ("app".into(), "agent".into()),
                ("tier".into(), "node".into())
            ]
        );
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
