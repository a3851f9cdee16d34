//! The object store behind the in-process API: objects by resource, namespace and name, a global
//! resourceVersion, the event log watches replay from, and the API server's write rules (generation
//! bumps on spec changes only, status only through the status subresource, optimistic concurrency,
//! finalizers delaying deletion, garbage collection of objects whose owners are all gone, schema
//! validation of custom resources).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};

use super::schema;

/// Which collection: `(group, plural)`; the core group is "".
pub type Resource = (String, String);

/// Events kept for watches to resume from; older resourceVersions get 410 Gone.
const LOG_CAPACITY: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    NotFound(String),
    AlreadyExists(String),
    Conflict(String),
    Invalid(String),
    BadRequest(String),
    Gone(String),
}

impl ApiError {
    pub fn code(&self) -> u16 {
        match self {
            ApiError::NotFound(_) => 404,
            ApiError::AlreadyExists(_) | ApiError::Conflict(_) => 409,
            ApiError::Invalid(_) => 422,
            ApiError::BadRequest(_) => 400,
            ApiError::Gone(_) => 410,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            ApiError::NotFound(_) => "NotFound",
            ApiError::AlreadyExists(_) => "AlreadyExists",
            ApiError::Conflict(_) => "Conflict",
            ApiError::Invalid(_) => "Invalid",
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Gone(_) => "Expired",
        }
    }

    /// The `Status` object the API server answers errors with.
    pub fn status(&self) -> Value {
        let (ApiError::NotFound(m)
        | ApiError::AlreadyExists(m)
        | ApiError::Conflict(m)
        | ApiError::Invalid(m)
        | ApiError::BadRequest(m)
        | ApiError::Gone(m)) = self;
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": m, "reason": self.reason(), "code": self.code()})
    }
}

/// A change, as a watch reports it.
#[derive(Debug, Clone)]
pub struct Event {
    pub rv: u64,
    pub resource: Resource,
    pub namespace: Option<String>,
    pub type_: &'static str,
    pub object: Arc<Value>,
}

/// How a write changes an object.
pub enum Change<'a> {
    MergePatch(&'a Value),
    JsonPatch(&'a json_patch::Patch),
    Replace(&'a Value),
}

type Key = (Option<String>, String);

pub struct Store {
    rv: u64,
    uid: u64,
    objects: HashMap<Resource, BTreeMap<Key, Value>>,
    log: VecDeque<Event>,
    /// openAPIV3Schema per custom resource, with its kind (for error messages).
    schemas: HashMap<Resource, (String, schema::Schema)>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            // Never 0: a list of an empty store must name a point a watch can resume from, and
            // resourceVersion "0" means "any point" to the API.
            rv: 1,
            uid: 0,
            objects: HashMap::new(),
            log: VecDeque::new(),
            schemas: HashMap::new(),
        }
    }
}

impl Store {
    pub fn register_schema(&mut self, resource: Resource, kind: String, schema: Value) {
        self.schemas
            .insert(resource, (kind, schema::Schema::new(schema)));
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, r: &Resource, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(r)
            .and_then(|m| m.get(&key(ns, name)))
            .cloned()
            .ok_or_else(|| not_found(r, name))
    }

    /// Objects of `r` (in `ns`, or everywhere) matching the equality `label_selector`.
    pub fn list(
        &self,
        r: &Resource,
        ns: Option<&str>,
        label_selector: &[(String, String)],
    ) -> Vec<Value> {
        self.objects
            .get(r)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|((ons, _), _)| ns.is_none() || ons.as_deref() == ns)
            .map(|(_, v)| v)
            .filter(|v| labels_match(v, label_selector))
            .cloned()
            .collect()
    }

    /// Events after `rv` for `r` in `ns` (or everywhere); Gone when `rv` is older than the log.
    pub fn events_since(
        &self,
        r: &Resource,
        ns: Option<&str>,
        rv: u64,
    ) -> Result<Vec<Event>, ApiError> {
        if let Some(first) = self.log.front()
            && rv + 1 < first.rv
        {
            return Err(ApiError::Gone(format!(
                "too old resource version: {rv} ({})",
                first.rv - 1
            )));
        }
        let start = self.log.partition_point(|e| e.rv <= rv);
        Ok(self
            .log
            .range(start..)
            .filter(|e| &e.resource == r && (ns.is_none() || e.namespace.as_deref() == ns))
            .cloned()
            .collect())
    }

    pub fn create(
        &mut self,
        r: &Resource,
        ns: Option<&str>,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        let name = obj["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::Invalid("metadata.name: Required value".into()))?
            .to_string();
        let key = (ns.map(str::to_string), name.clone());
        if self.objects.get(r).is_some_and(|m| m.contains_key(&key)) {
            return Err(ApiError::AlreadyExists(format!(
                "{} \"{name}\" already exists",
                r.1
            )));
        }
        self.validate(r, &name, &obj, None)?;
        self.uid += 1;
        let meta = obj["metadata"]
            .as_object_mut()
            .ok_or_else(|| ApiError::Invalid("metadata: must be an object".into()))?;
        if let Some(ns) = ns {
            meta.insert("namespace".into(), json!(ns));
        }
        meta.insert(
            "uid".into(),
            json!(format!("00000000-0000-0000-0000-{:012x}", self.uid)),
        );
        meta.insert("generation".into(), json!(1));
        meta.insert("creationTimestamp".into(), json!(now()));
        meta.remove("deletionTimestamp");
        // With a status subresource, status is written only through it.
        if self.schemas.contains_key(r)
            && let Some(o) = obj.as_object_mut()
        {
            o.remove("status");
        }
        Ok(self.commit(r, key, obj, "ADDED"))
    }

    /// Applies `change` to the object or (with `status`) to its status subresource only.
    pub fn update(
        &mut self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        status: bool,
        change: Change<'_>,
    ) -> Result<Value, ApiError> {
        let key = key(ns, name);
        let old = self.get(r, ns, name)?;
        let mut new = old.clone();
        if let Some(rv) = apply(&mut new, &change)?
            && old["metadata"]["resourceVersion"].as_str() != Some(rv.as_str())
        {
            return Err(ApiError::Conflict(format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified",
                r.1
            )));
        }
        let mut new = server_owned(new, &old, status, self.schemas.contains_key(r));
        if without_meta_and_status(&new) != without_meta_and_status(&old) {
            self.validate(r, name, &new, Some(&old))?;
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            new["metadata"]["generation"] = json!(generation);
        } else if status {
            self.validate(r, name, &new, Some(&old))?;
        }
        // Empty lists are omitted, as the API server serialises them.
        if new["metadata"]["finalizers"] == json!([])
            && let Some(meta) = new["metadata"].as_object_mut()
        {
            meta.remove("finalizers");
        }
        if new == old {
            return Ok(old);
        }
        if is_deleting(&new) && finalizers(&new).is_empty() {
            return Ok(self.remove(r, key));
        }
        Ok(self.commit(r, key, new, "MODIFIED"))
    }

    /// Deletes the object, or only marks it (deletionTimestamp) while finalizers remain.
    pub fn delete(
        &mut self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let key = key(ns, name);
        let mut obj = self.get(r, ns, name)?;
        if finalizers(&obj).is_empty() {
            return Ok(self.remove(r, key));
        }
        if is_deleting(&obj) {
            return Ok(obj);
        }
        obj["metadata"]["deletionTimestamp"] = json!(now());
        // As the API server does: a deletion is a new generation for controllers to observe.
        let generation = obj["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        obj["metadata"]["generation"] = json!(generation);
        Ok(self.commit(r, key, obj, "MODIFIED"))
    }

    fn validate(
        &self,
        r: &Resource,
        name: &str,
        obj: &Value,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        let Some((kind, schema)) = self.schemas.get(r) else {
            return Ok(());
        };
        let problems = schema.validate(obj, old);
        if problems.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
        Err(ApiError::Invalid(format!(
            "{kind}.{} \"{name}\" is invalid: {}",
            r.0,
            list.join(", ")
        )))
    }

    fn commit(&mut self, r: &Resource, key: Key, mut obj: Value, type_: &'static str) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.log_event(r, &key, type_, obj.clone());
        self.objects
            .entry(r.clone())
            .or_default()
            .insert(key, obj.clone());
        obj
    }

    fn remove(&mut self, r: &Resource, key: Key) -> Value {
        let mut obj = self
            .objects
            .get_mut(r)
            .and_then(|m| m.remove(&key))
            .unwrap_or(Value::Null);
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.log_event(r, &key, "DELETED", obj.clone());
        self.collect_garbage(key.0.as_deref());
        obj
    }

    /// Background cascading deletion, as the API server's garbage collector does it: objects in
    /// `ns` that have owners, none of which exists any more, are deleted (their finalizers
    /// still hold them until their controllers let go).
    fn collect_garbage(&mut self, ns: Option<&str>) {
        let in_ns = || {
            self.objects.iter().flat_map(|(r, m)| {
                m.iter()
                    .filter(move |((o, _), _)| o.as_deref() == ns)
                    .map(move |((_, name), v)| (r, name, v))
            })
        };
        let uids: HashSet<&str> = in_ns()
            .filter_map(|(_, _, v)| v["metadata"]["uid"].as_str())
            .collect();
        let orphans: Vec<(Resource, String)> = in_ns()
            .filter(|(_, _, v)| !is_deleting(v))
            .filter(|(_, _, v)| {
                let owners = owner_uids(v);
                !owners.is_empty() && owners.iter().all(|u| !uids.contains(u))
            })
            .map(|(r, name, _)| (r.clone(), name.clone()))
            .collect();
        for (r, name) in orphans {
            // It may have gone with another orphan already.
            let _ = self.delete(&r, ns, &name);
        }
    }

    fn log_event(&mut self, r: &Resource, key: &Key, type_: &'static str, object: Value) {
        if self.log.len() >= LOG_CAPACITY {
            self.log.pop_front();
        }
        self.log.push_back(Event {
            rv: self.rv,
            resource: r.clone(),
            namespace: key.0.clone(),
            type_,
            object: Arc::new(object),
        });
    }
}

/// Applies `change` to `obj`; returns the resourceVersion the change expects, if it names one.
fn apply(obj: &mut Value, change: &Change<'_>) -> Result<Option<String>, ApiError> {
    let expected = |v: &Value| {
        v["metadata"]["resourceVersion"]
            .as_str()
            .map(str::to_string)
    };
    match change {
        Change::MergePatch(p) => {
            json_patch::merge(obj, p);
            Ok(expected(p))
        }
        Change::JsonPatch(p) => {
            // As the API server's JSON patch does, a missing field tests equal to null.
            let ops: Vec<_> =
                p.0.iter()
                    .filter(|op| {
                        !matches!(op, json_patch::PatchOperation::Test(t)
                            if t.value.is_null() && obj.pointer(t.path.as_str()).is_none())
                    })
                    .cloned()
                    .collect();
            json_patch::patch(obj, &ops)
                .map_err(|e| ApiError::Invalid(format!("json patch: {e}")))?;
            Ok(None)
        }
        Change::Replace(v) => {
            *obj = (*v).clone();
            Ok(expected(v))
        }
    }
}

/// `new` with what the server owns taken from `old`: identity and timestamps, and the half of the
/// object the endpoint does not write (`status` is the status subresource's, the rest is not).
fn server_owned(mut new: Value, old: &Value, status: bool, has_status: bool) -> Value {
    for k in [
        "uid",
        "creationTimestamp",
        "generation",
        "namespace",
        "name",
        "deletionTimestamp",
    ] {
        restore(&mut new["metadata"], &old["metadata"], k);
    }
    if status {
        let keep_status = new["status"].take();
        new = old.clone();
        new["status"] = keep_status;
        if new["status"].is_null() {
            new.as_object_mut().map(|o| o.remove("status"));
        }
    } else if has_status {
        restore(&mut new, old, "status");
    }
    new
}

/// The object without metadata and status: what a generation counts changes of.
fn without_meta_and_status(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("metadata");
        o.remove("status");
    }
    v
}

fn key(ns: Option<&str>, name: &str) -> Key {
    (ns.map(str::to_string), name.to_string())
}

fn restore(new: &mut Value, old: &Value, key: &str) {
    let Some(n) = new.as_object_mut() else { return };
    match old.get(key) {
        Some(v) => {
            n.insert(key.into(), v.clone());
        }
        None => {
            n.remove(key);
        }
    }
}

fn not_found(r: &Resource, name: &str) -> ApiError {
    let group = if r.0.is_empty() {
        String::new()
    } else {
        format!(".{}", r.0)
    };
    ApiError::NotFound(format!("{}{group} \"{name}\" not found", r.1))
}

fn finalizers(v: &Value) -> Vec<Value> {
    v["metadata"]["finalizers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn owner_uids(v: &Value) -> Vec<&str> {
    v["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["uid"].as_str())
        .collect()
}

fn is_deleting(v: &Value) -> bool {
    !v["metadata"]["deletionTimestamp"].is_null()
}

fn labels_match(v: &Value, selector: &[(String, String)]) -> bool {
    selector
        .iter()
        .all(|(k, want)| v["metadata"]["labels"][k].as_str() == Some(want))
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map_or_else(|_| String::new(), |t| t.to_string())
}

#[cfg(test)]
mod tests;
