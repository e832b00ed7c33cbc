//! `${VAR}` and `${file:/path}` in the string values of `pgferry.toml`: secrets kept out of the
//! file itself, read from the environment or from a file (a mounted Kubernetes secret, a
//! systemd credential). Interpolation works on the parsed TOML values, so every error names
//! the key, and a secret that holds quotes or backslashes cannot break the TOML.

use thiserror::Error;
use toml::Value;

/// Why a `${…}` reference could not be resolved. `key` is the TOML key that holds it
/// (`nodes[0].dsn`, `kafka.sasl_password`).
#[derive(Debug, Error)]
pub enum InterpolateError {
    /// `${VAR}` names a variable that is not set (or is not UTF-8).
    #[error("{key}: environment variable {var} (used as ${{{var}}}) is not set")]
    MissingEnv { key: String, var: String },
    /// `${file:PATH}` names a file that cannot be read.
    #[error("{key}: cannot read secret file {file} (used as ${{file:{file}}}): {source}")]
    File {
        key: String,
        file: String,
        source: std::io::Error,
    },
}

impl InterpolateError {
    /// The key that holds the reference.
    pub fn key(&self) -> &str {
        match self {
            InterpolateError::MissingEnv { key, .. } | InterpolateError::File { key, .. } => key,
        }
    }
}

/// Replaces every `${VAR}` (environment variable `VAR`) and `${file:PATH}` (the contents of the
/// file at `PATH`, one trailing newline removed) in the string values of `value`, recursively.
/// Keys are not interpolated. An unclosed `${` is left as it is.
pub fn interpolate(value: Value) -> Result<Value, InterpolateError> {
    walk(value, "")
}

fn walk(value: Value, key: &str) -> Result<Value, InterpolateError> {
    Ok(match value {
        Value::String(s) => Value::String(interpolate_str(&s, key)?),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| walk(v, &format!("{key}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Value::Table(table) => {
            let mut out = toml::Table::new();
            for (k, v) in table {
                let child = child_key(key, &k);
                out.insert(k, walk(v, &child)?);
            }
            Value::Table(out)
        }
        other => other,
    })
}

/// `parent.k`, with `k` quoted when it is not a bare TOML key (`properties."sasl.password"`).
fn child_key(parent: &str, k: &str) -> String {
    let bare = !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let k = if bare { k.to_string() } else { format!("{k:?}") };
    if parent.is_empty() {
        k
    } else {
        format!("{parent}.{k}")
    }
}

fn interpolate_str(text: &str, key: &str) -> Result<String, InterpolateError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let reference = &after[..end];
        out.push_str(&resolve(reference, key)?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn resolve(reference: &str, key: &str) -> Result<String, InterpolateError> {
    if let Some(file) = reference.strip_prefix("file:") {
        let text = std::fs::read_to_string(file).map_err(|source| InterpolateError::File {
            key: key.to_string(),
            file: file.to_string(),
            source,
        })?;
        let text = text.strip_suffix('\n').unwrap_or(&text);
        return Ok(text.strip_suffix('\r').unwrap_or(text).to_string());
    }
    std::env::var(reference).map_err(|_| InterpolateError::MissingEnv {
        key: key.to_string(),
        var: reference.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str) -> Result<toml::Table, InterpolateError> {
        let v = interpolate(Value::Table(toml::from_str(text).unwrap()))?;
        Ok(v.as_table().cloned().unwrap_or_default())
    }

    #[test]
    fn env_and_file_references() {
        std::env::set_var("PGFERRY_INTERP_TEST", "from-env");
        let dir = std::env::temp_dir().join(format!("pgferry-interp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "with \"quotes\" \\ and\n").unwrap();
        let text = format!(
            "[a]\nx = \"pre-${{PGFERRY_INTERP_TEST}}-post\"\ny = [\"${{file:{}}}\"]\nn = 3\n",
            file.display()
        );
        let t = run(&text).unwrap();
        assert_eq!(t["a"]["x"].as_str(), Some("pre-from-env-post"));
        assert_eq!(t["a"]["y"][0].as_str(), Some("with \"quotes\" \\ and"));
        assert_eq!(t["a"]["n"].as_integer(), Some(3));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn errors_name_key_and_file() {
        let e = run("[kafka.properties]\n\"sasl.password\" = \"${file:/nonexistent/pw}\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("kafka.properties.\"sasl.password\"") && msg.contains("/nonexistent/pw"),
            "{msg}"
        );
        let e = run("[[nodes]]\ndsn = \"${PGFERRY_INTERP_UNSET_X}\"\n").unwrap_err();
        assert_eq!(e.key(), "nodes[0].dsn");
        assert!(e.to_string().contains("PGFERRY_INTERP_UNSET_X"), "{e}");
        assert_eq!(run("[a]\nx = \"${open\"\n").unwrap()["a"]["x"].as_str(), Some("${open"));
    }
}
