//! Changing the dynamic config safely: JSON merge patches (RFC 7386), the
//! `key=value` form `jaictl config set` takes, and a per-setting diff.
//!
//! Both the agent (which writes the result) and `jaictl` (which shows it
//! before asking) use these, so what the operator is shown is what is written.

use crate::{ConfigError, DynamicConfig};
use serde_json::{Map, Value};

/// Applies a JSON merge patch: objects merge key by key, `null` removes a key
/// (the setting returns to its default), anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(changes) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let fields = target.as_object_mut().expect("made an object above");
    for (key, change) in changes {
        if change.is_null() {
            fields.remove(key);
        } else {
            merge(fields.entry(key.clone()).or_insert(Value::Null), change);
        }
    }
}

/// `config` with `patch` merged in, checked by [`DynamicConfig::validate`].
/// The error names the offending setting.
pub fn patched(config: &DynamicConfig, patch: &Value) -> Result<DynamicConfig, ConfigError> {
    let mut json = serde_json::to_value(config).expect("the config serializes");
    merge(&mut json, patch);
    let next: DynamicConfig = serde_json::from_value(json).map_err(|error| ConfigError {
        field: offending_field(patch, &error.to_string()),
        reason: error.to_string(),
    })?;
    next.validate()?;
    Ok(next)
}

/// The patch's setting serde complained about, best effort: the field the
/// message quotes, else the only leaf of the patch, else `config`.
fn offending_field(patch: &Value, message: &str) -> String {
    if let Some(quoted) = message.split('`').nth(1) {
        return quoted.to_owned();
    }
    let leaves = leaves(patch, "");
    match leaves.as_slice() {
        [(path, _)] => path.clone(),
        _ => "config".into(),
    }
}

/// The merge patch that turns `before` into `after`: changed and added keys
/// with their new values, removed keys as `null` (`jaictl config edit`).
pub fn difference(before: &Value, after: &Value) -> Value {
    match (before, after) {
        (Value::Object(old), Value::Object(new)) => {
            let mut patch = Map::new();
            for (key, value) in new {
                match old.get(key) {
                    Some(previous) if previous == value => {}
                    Some(previous) => {
                        patch.insert(key.clone(), difference(previous, value));
                    }
                    None => {
                        patch.insert(key.clone(), value.clone());
                    }
                }
            }
            for key in old.keys().filter(|key| !new.contains_key(*key)) {
                patch.insert(key.clone(), Value::Null);
            }
            Value::Object(patch)
        }
        _ => after.clone(),
    }
}

/// Turns `jaictl config set KEY=VALUE` into a merge patch.
///
/// `KEY` is a dotted path (`ttl`, `postgresql.parameters.work_mem`). `VALUE`
/// is typed the way the config needs it: `null` resets the setting,
/// `true`/`false` and whole numbers are JSON booleans and numbers, except under
/// `postgresql.parameters`, where every value is PostgreSQL text.
pub fn assignment_patch(assignment: &str) -> Result<Value, ConfigError> {
    let (path, raw) = assignment.split_once('=').ok_or_else(|| ConfigError {
        field: assignment.to_owned(),
        reason: "expected KEY=VALUE, e.g. ttl=10s".into(),
    })?;
    let path = path.trim();
    if path.is_empty() || path.split('.').any(str::is_empty) {
        return Err(ConfigError {
            field: path.to_owned(),
            reason: "expected a dotted setting name, e.g. postgresql.parameters.work_mem".into(),
        });
    }
    let raw = raw.trim();
    let is_parameter = path.starts_with("postgresql.parameters.");
    let value = match raw {
        "null" => Value::Null,
        "true" | "false" if !is_parameter => Value::Bool(raw == "true"),
        _ if !is_parameter && !raw.is_empty() && raw.chars().all(|c| c.is_ascii_digit()) => raw
            .parse::<u64>()
            .map(Value::from)
            .map_err(|_| ConfigError {
                field: path.to_owned(),
                reason: format!("{raw} is too large"),
            })?,
        _ => Value::String(raw.to_owned()),
    };
    let patch = path.rsplit('.').fold(value, |inner, key| {
        Value::Object(Map::from_iter([(key.to_owned(), inner)]))
    });
    Ok(patch)
}

/// One line per setting that differs: `key: old -> new` (`(default)` stands
/// for an absent value). Empty when nothing changed.
pub fn diff(before: &DynamicConfig, after: &DynamicConfig) -> String {
    let before = leaves(&serde_json::to_value(before).expect("serializes"), "");
    let after = leaves(&serde_json::to_value(after).expect("serializes"), "");
    let mut keys: Vec<&String> = before.iter().chain(after.iter()).map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    let lookup = |list: &[(String, String)], key: &str| {
        list.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "(default)".into())
    };
    keys.into_iter()
        .filter_map(|key| {
            let old = lookup(&before, key);
            let new = lookup(&after, key);
            (old != new).then(|| format!("{key}: {old} -> {new}\n"))
        })
        .collect()
}

/// Every leaf of `value` as `(dotted.path, printed value)`, in key order.
fn leaves(value: &Value, prefix: &str) -> Vec<(String, String)> {
    match value {
        Value::Object(fields) => fields
            .iter()
            .flat_map(|(key, inner)| {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                leaves(inner, &path)
            })
            .collect(),
        Value::String(text) => vec![(prefix.to_owned(), text.clone())],
        other => vec![(prefix.to_owned(), other.to_string())],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_replaces_merges_and_removes() {
        let mut target = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge(&mut target, &json!({"a": 5, "b": {"c": null, "e": 4}}));
        assert_eq!(target, json!({"a": 5, "b": {"d": 3, "e": 4}}));
    }

    #[test]
    fn assignments_become_typed_patches() {
        assert_eq!(assignment_patch("ttl=10s").unwrap(), json!({"ttl": "10s"}));
        assert_eq!(
            assignment_patch("pause=true").unwrap(),
            json!({"pause": true})
        );
        assert_eq!(
            assignment_patch("maximum_lag_on_failover=2048").unwrap(),
            json!({"maximum_lag_on_failover": 2048})
        );
        assert_eq!(
            assignment_patch("postgresql.parameters.max_connections=200").unwrap(),
            json!({"postgresql": {"parameters": {"max_connections": "200"}}})
        );
        assert_eq!(assignment_patch("ttl=null").unwrap(), json!({"ttl": null}));
        assert!(assignment_patch("ttl").is_err());
        assert!(assignment_patch("postgresql..x=1").is_err());
    }

    #[test]
    fn a_patch_breaking_a_rule_names_the_setting() {
        let config = DynamicConfig::default();
        let error = patched(&config, &json!({"ttl": "1s"})).unwrap_err();
        assert_eq!(error.field, "ttl");
        let error = patched(&config, &json!({"ttll": "10s"})).unwrap_err();
        assert_eq!(error.field, "ttll");
        let error = patched(&config, &json!({"loop_wait": "soon"})).unwrap_err();
        assert_eq!(error.field, "loop_wait", "{error}");
    }

    #[test]
    fn difference_is_the_patch_between_two_documents() {
        let before = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": 4});
        let after = json!({"a": 1, "b": {"c": 5, "d": 3}, "f": 6});
        let patch = difference(&before, &after);
        assert_eq!(patch, json!({"b": {"c": 5}, "e": null, "f": 6}));
        let mut merged = before.clone();
        merge(&mut merged, &patch);
        assert_eq!(merged, after);
    }

    #[test]
    fn diff_lists_changed_settings_only() {
        let before = DynamicConfig::default();
        let after = patched(
            &before,
            &json!({"ttl": "10s", "postgresql": {"parameters": {"work_mem": "8MB"}}}),
        )
        .unwrap();
        assert_eq!(
            diff(&before, &after),
            "postgresql.parameters.work_mem: (default) -> 8MB\nttl: 4s -> 10s\n"
        );
        assert_eq!(diff(&before, &before), "");
    }
}
