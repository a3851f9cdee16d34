//! Admission checks an API server makes on a custom resource: the CRD's structural OpenAPI schema
//! (types, required fields, patterns, ranges, enums, unknown fields as `kubectl --validate=strict`
//! refuses them) and its CEL `x-kubernetes-validations` rules. Pure; used by the in-process API
//! and by the tests that check example manifests and CRD structure.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use std::collections::HashMap;

use serde_json::Value;

/// One reason an object is invalid, naming the field like the API server does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// The openAPIV3Schema of a CRD's first version, as JSON.
pub fn openapi_schema(crd: &CustomResourceDefinition) -> Value {
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("CRDs derived here always carry a schema");
    serde_json::to_value(schema).expect("a schema serialises")
}

/// A CRD schema ready to check objects: CEL rules are compiled once, not per object.
pub struct Schema {
    json: Value,
    cel: kube::core::cel::CompiledSchema,
    /// Every `pattern` in the schema, compiled (an invalid one maps to its error).
    patterns: Patterns,
}

type Patterns = HashMap<String, Result<regex::Regex, regex::Error>>;

fn collect_patterns(v: &Value, out: &mut Patterns) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(p)) = o.get("pattern") {
                out.entry(p.clone()).or_insert_with(|| regex::Regex::new(p));
            }
            o.values().for_each(|c| collect_patterns(c, out));
        }
        Value::Array(a) => a.iter().for_each(|c| collect_patterns(c, out)),
        _ => {}
    }
}

impl Schema {
    pub fn new(json: Value) -> Self {
        let mut patterns = HashMap::new();
        collect_patterns(&json, &mut patterns);
        Schema {
            cel: kube::core::cel::compile_schema(&json),
            patterns,
            json,
        }
    }

    /// Every violation of `object` (empty when it is valid). `old` enables transition rules.
    pub fn validate(&self, object: &Value, old: Option<&Value>) -> Vec<Invalid> {
        let mut out = Vec::new();
        check(&self.json, object, "", &self.patterns, &mut out);
        if out.is_empty()
            && let Err(errors) =
                kube::core::cel::Validator::new().validate_compiled(&self.cel, object, old)
        {
            out.extend(errors.into_vec().into_iter().map(|e| Invalid {
                field: e.field_path,
                message: e.message,
            }));
        }
        out
    }
}

fn check(schema: &Value, v: &Value, path: &str, patterns: &Patterns, out: &mut Vec<Invalid>) {
    let field = if path.is_empty() { "<root>" } else { path };
    out.extend(
        check_value(schema, v, patterns)
            .into_iter()
            .map(|message| Invalid {
                field: field.into(),
                message,
            }),
    );
    let int_or_string = schema["x-kubernetes-int-or-string"] == Value::Bool(true);
    if v.is_null() || int_or_string || !schema_type_ok(schema, v) {
        return;
    }
    match v {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check(
                    &schema["items"],
                    item,
                    &format!("{path}[{i}]"),
                    patterns,
                    out,
                );
            }
        }
        Value::Object(map) => check_object(schema, map, path, patterns, out),
        _ => {}
    }
}

/// Whether `v` has the schema's type (an untyped schema takes anything).
fn schema_type_ok(schema: &Value, v: &Value) -> bool {
    match schema["type"].as_str().unwrap_or("") {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    }
}

/// What is wrong with `v` itself (not with its items or fields).
fn check_value(schema: &Value, v: &Value, patterns: &Patterns) -> Vec<String> {
    if v.is_null() {
        return match schema["nullable"] == Value::Bool(true) {
            true => vec![],
            false => vec!["must not be null".into()],
        };
    }
    if schema["x-kubernetes-int-or-string"] == Value::Bool(true) {
        return match v.is_i64() || v.is_u64() || v.is_string() {
            true => vec![],
            false => vec!["must be an integer or a string".into()],
        };
    }
    if !schema_type_ok(schema, v) {
        let ty = schema["type"].as_str().unwrap_or("");
        return vec![format!("must be of type {ty}, got {}", json_type(v))];
    }
    let mut out = Vec::new();
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        out.push(format!("{v} is not one of {}", list.join(", ")));
    }
    match v {
        Value::String(s) => out.extend(check_string(schema, s, patterns)),
        Value::Number(n) => out.extend(check_number(schema, n.as_f64().unwrap_or(f64::NAN))),
        Value::Array(items) => {
            if let Some(max) = schema["maxItems"].as_u64()
                && items.len() as u64 > max
            {
                out.push(format!("must have at most {max} items"));
            }
        }
        _ => {}
    }
    out
}

fn check_string(schema: &Value, s: &str, patterns: &Patterns) -> Vec<String> {
    let mut out = Vec::new();
    let len = s.chars().count() as u64;
    if let Some(min) = schema["minLength"].as_u64()
        && len < min
    {
        out.push(format!("must be at least {min} characters"));
    }
    if let Some(max) = schema["maxLength"].as_u64()
        && len > max
    {
        out.push(format!("must be at most {max} characters"));
    }
    if let Some(p) = schema["pattern"].as_str() {
        match patterns.get(p) {
            Some(Ok(re)) if re.is_match(s) => {}
            Some(Ok(_)) => out.push(format!("{s:?} does not match {p}")),
            Some(Err(e)) => out.push(format!("schema pattern {p}: {e}")),
            None => out.push(format!("schema pattern {p} was not compiled")),
        }
    }
    out
}

fn check_number(schema: &Value, n: f64) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(min) = schema["minimum"].as_f64()
        && n < min
    {
        out.push(format!("must be at least {min}"));
    }
    if let Some(max) = schema["maximum"].as_f64()
        && n > max
    {
        out.push(format!("must be at most {max}"));
    }
    out
}

fn check_object(
    schema: &Value,
    map: &serde_json::Map<String, Value>,
    path: &str,
    patterns: &Patterns,
    out: &mut Vec<Invalid>,
) {
    let field = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    for req in schema["required"].as_array().into_iter().flatten() {
        if let Some(k) = req.as_str()
            && !map.contains_key(k)
        {
            out.push(Invalid {
                field: field(k),
                message: "Required value".into(),
            });
        }
    }
    if schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true) {
        return;
    }
    let props = schema["properties"].as_object();
    let additional = &schema["additionalProperties"];
    for (k, v) in map {
        // The API server itself checks these at the root, not the CRD schema.
        if path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match props.and_then(|p| p.get(k)) {
            Some(sub) => check(sub, v, &field(k), patterns, out),
            None if additional.is_object() => check(additional, v, &field(k), patterns, out),
            None => out.push(Invalid {
                field: field(k),
                message: "unknown field".into(),
            }),
        }
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Structural-schema violations (as the API server refuses CRDs for): every node has a `type`
/// (or int-or-string / preserve-unknown-fields), no `$ref`, and `anyOf`/`oneOf`/`allOf`/`not`
/// carry no types or defaults of their own.
pub fn structural_problems(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    structural(schema, "", false, &mut out);
    out
}

fn structural(s: &Value, path: &str, in_logic: bool, out: &mut Vec<String>) {
    let Some(obj) = s.as_object() else { return };
    if obj.contains_key("$ref") {
        out.push(format!("{path}: $ref is not allowed"));
    }
    let escape = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        || obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if in_logic {
        for k in [
            "type",
            "default",
            "nullable",
            "additionalProperties",
            "description",
        ] {
            if k != "description" && obj.contains_key(k) {
                out.push(format!(
                    "{path}: {k} is not allowed inside anyOf/oneOf/allOf/not"
                ));
            }
        }
    } else if !escape && !obj.contains_key("type") {
        out.push(format!("{path}: type is missing"));
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, sub) in props {
            structural(sub, &format!("{path}.{k}"), in_logic, out);
        }
    }
    if let Some(items) = obj.get("items") {
        structural(items, &format!("{path}[]"), in_logic, out);
    }
    if let Some(add) = obj.get("additionalProperties").filter(|a| a.is_object()) {
        structural(add, &format!("{path}{{}}"), in_logic, out);
    }
    for k in ["anyOf", "oneOf", "allOf"] {
        for (i, sub) in obj
            .get(k)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            structural(sub, &format!("{path}.{k}[{i}]"), true, out);
        }
    }
    if let Some(not) = obj.get("not") {
        structural(not, &format!("{path}.not"), true, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "required": ["spec"],
            "properties": {
                "metadata": {"type": "object"},
                "spec": {
                    "type": "object",
                    "required": ["cpus"],
                    "properties": {
                        "cpus": {"type": "integer", "minimum": 1},
                        "memory": {"type": "string", "pattern": "^[0-9]+Gi$"},
                        "mode": {"type": "string", "enum": ["a", "b"]},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "disks": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}}
                    }
                }
            }
        })
    }

    fn fields(v: Value) -> Vec<String> {
        Schema::new(schema())
            .validate(&v, None)
            .into_iter()
            .map(|i| i.to_string())
            .collect()
    }

    #[test]
    fn names_each_bad_field() {
        assert!(fields(json!({"metadata": {"name": "x"}, "spec": {"cpus": 2, "memory": "8Gi", "labels": {"a": "b"}}})).is_empty());
        assert_eq!(fields(json!({"spec": {}})), ["spec.cpus: Required value"]);
        assert_eq!(
            fields(json!({"spec": {"cpus": 0}})),
            ["spec.cpus: must be at least 1"]
        );
        assert_eq!(
            fields(json!({"spec": {"cpus": 1, "memory": "8XB"}})),
            ["spec.memory: \"8XB\" does not match ^[0-9]+Gi$"]
        );
        assert_eq!(
            fields(json!({"spec": {"cpus": "2"}})),
            ["spec.cpus: must be of type integer, got string"]
        );
        assert_eq!(
            fields(json!({"spec": {"cpus": 1, "mode": "c"}})),
            ["spec.mode: \"c\" is not one of \"a\", \"b\""]
        );
        assert_eq!(
            fields(json!({"spec": {"cpus": 1, "cpu": 1}})),
            ["spec.cpu: unknown field"]
        );
        assert_eq!(
            fields(json!({"spec": {"cpus": 1, "labels": {"a": 1}}})),
            ["spec.labels.a: must be of type string, got number"]
        );
        assert_eq!(
            fields(json!({"spec": {"cpus": 1, "disks": [{"name": 3}]}})),
            ["spec.disks[0].name: must be of type string, got number"]
        );
    }

    #[test]
    fn finds_non_structural_nodes() {
        assert!(structural_problems(&schema()).is_empty());
        let bad = json!({"type": "object", "properties": {
            "a": {"description": "no type"},
            "b": {"type": "object", "anyOf": [{"type": "string"}]},
            "c": {"$ref": "#/x", "type": "object"}
        }});
        assert_eq!(
            structural_problems(&bad),
            [
                ".a: type is missing",
                ".b.anyOf[0]: type is not allowed inside anyOf/oneOf/allOf/not",
                ".c: $ref is not allowed"
            ]
        );
    }
}
