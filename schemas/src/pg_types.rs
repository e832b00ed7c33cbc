//! PostgreSQL type ⇄ Avro mapping. Lossless both ways: apply writes back exactly the text
//! form capture read. Logical names follow Debezium (`connect.name`) where one exists.
//!
//! | PostgreSQL | Avro | `connect.name` |
//! | --- | --- | --- |
//! | `bool` | boolean | |
//! | `int2`, `int4` | int | `int16` for `int2` (`connect.type`) |
//! | `int8` | long | |
//! | `float4` / `float8` | float / double (NaN, ±Infinity kept) | |
//! | `date` | int, days since 1970-01-01; ±infinity = `i32::MAX`/`MIN` | `io.debezium.time.Date` |
//! | `timestamp` | long, µs since 1970-01-01; ±infinity = `i64::MAX`/`MIN` | `io.debezium.time.MicroTimestamp` |
//! | `timestamptz` | string, ISO-8601 UTC with µs (`infinity`, `-infinity`) | `io.debezium.time.ZonedTimestamp` |
//! | `time` | long, µs since midnight (`24:00:00` = 86 400 000 000) | `io.debezium.time.MicroTime` |
//! | `interval` | string, ISO-8601 duration (PostgreSQL's `iso_8601` style, e.g. `P1Y2M3DT4H5M6.78S`) | `io.debezium.time.Interval` |
//! | `bytea` | bytes | |
//! | `uuid` | string | `io.debezium.data.Uuid` |
//! | `json`, `jsonb` | string | `io.debezium.data.Json` |
//! | `numeric` | string (any precision/scale, `NaN`, `±Infinity`), like Debezium's `decimal.handling.mode=string` | |
//! | enum types | string, the label | `io.debezium.data.Enum` (`allowed` = labels) |
//! | `xml` | string | `io.debezium.data.Xml` |
//! | `ltree` | string | `io.debezium.data.Ltree` |
//! | everything else | string, PostgreSQL's text form | |
//!
//! Every field also carries `pgferry.kind` (the row above) and `pgferry.type` (the SQL type).

use apache_avro::types::Value;
use serde_json::{json, Value as Json};
use thiserror::Error;

use crate::pg_time;

/// How a column's values are represented in Avro.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `bool` → boolean.
    Boolean,
    /// `int2` → int.
    Int16,
    /// `int4` → int.
    Int32,
    /// `int8` → long.
    Int64,
    /// `float4` → float.
    Float32,
    /// `float8` → double.
    Float64,
    /// `date` → int days.
    Date,
    /// `timestamp` → long µs.
    Timestamp,
    /// `timestamptz` → ISO string.
    TimestampTz,
    /// `time` → long µs since midnight.
    Time,
    /// `interval` → ISO-8601 duration string.
    Interval,
    /// `bytea` → bytes.
    Bytes,
    /// `uuid` → string.
    Uuid,
    /// `json`/`jsonb` → string.
    Json,
    /// Anything else → PostgreSQL text form as a string.
    Text,
}

/// A value that does not fit the column's mapping (a decoder or encoder bug, or a hostile event).
#[derive(Debug, Error, PartialEq)]
pub enum TypeError {
    /// The text form could not be read as the column's type.
    #[error("column {column}: {kind:?} value {text:?} cannot be represented: {reason}")]
    BadText {
        column: String,
        kind: Kind,
        text: String,
        reason: String,
    },
    /// The Avro value has a different type than the column's mapping.
    #[error("column {column}: expected Avro {expected} for {kind:?}, found {found}")]
    BadAvro {
        column: String,
        kind: Kind,
        expected: &'static str,
        found: String,
    },
}

/// The Avro type of a [`Kind::Text`] column: a string, with Debezium's logical name where
/// Debezium gives the type one in the same (string) representation.
pub fn text_logical_type(col: &crate::event::ColumnDef) -> Json {
    let named = |name: &str| json!({"type": "string", "connect.version": 1, "connect.name": name});
    match (&col.enum_labels, col.type_name.as_str()) {
        (Some(labels), _) => json!({
            "type": "string",
            "connect.version": 1,
            "connect.name": "io.debezium.data.Enum",
            "connect.parameters": {"allowed": labels.join(",")},
        }),
        (None, "xml") => named("io.debezium.data.Xml"),
        (None, "ltree") => named("io.debezium.data.Ltree"),
        _ => json!("string"),
    }
}

impl Kind {
    /// The mapping for a base type name (`pg_type.typname`).
    pub fn for_type_name(type_name: &str) -> Kind {
        match type_name {
            "bool" => Kind::Boolean,
            "int2" => Kind::Int16,
            "int4" => Kind::Int32,
            "int8" => Kind::Int64,
            "float4" => Kind::Float32,
            "float8" => Kind::Float64,
            "date" => Kind::Date,
            "timestamp" => Kind::Timestamp,
            "timestamptz" => Kind::TimestampTz,
            "time" => Kind::Time,
            "interval" => Kind::Interval,
            "bytea" => Kind::Bytes,
            "uuid" => Kind::Uuid,
            "json" | "jsonb" => Kind::Json,
            _ => Kind::Text,
        }
    }

    /// The name stored in the `pgferry.kind` field attribute.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Boolean => "boolean",
            Kind::Int16 => "int16",
            Kind::Int32 => "int32",
            Kind::Int64 => "int64",
            Kind::Float32 => "float32",
            Kind::Float64 => "float64",
            Kind::Date => "date",
            Kind::Timestamp => "timestamp",
            Kind::TimestampTz => "timestamptz",
            Kind::Time => "time",
            Kind::Interval => "interval",
            Kind::Bytes => "bytes",
            Kind::Uuid => "uuid",
            Kind::Json => "json",
            Kind::Text => "text",
        }
    }

    /// Inverse of [`Kind::name`].
    pub fn from_name(name: &str) -> Option<Kind> {
        [
            Kind::Boolean,
            Kind::Int16,
            Kind::Int32,
            Kind::Int64,
            Kind::Float32,
            Kind::Float64,
            Kind::Date,
            Kind::Timestamp,
            Kind::TimestampTz,
            Kind::Time,
            Kind::Interval,
            Kind::Bytes,
            Kind::Uuid,
            Kind::Json,
            Kind::Text,
        ]
        .into_iter()
        .find(|k| k.name() == name)
    }

    /// The Avro type (JSON) of a non-null value of this kind.
    pub fn avro_type(self) -> Json {
        match self {
            Kind::Boolean => json!("boolean"),
            Kind::Int16 => json!({"type": "int", "connect.type": "int16"}),
            Kind::Int32 => json!("int"),
            Kind::Int64 => json!("long"),
            Kind::Float32 => json!("float"),
            Kind::Float64 => json!("double"),
            Kind::Date => json!({"type": "int", "connect.version": 1, "connect.name": "io.debezium.time.Date"}),
            Kind::Timestamp => {
                json!({"type": "long", "connect.version": 1, "connect.name": "io.debezium.time.MicroTimestamp"})
            }
            Kind::TimestampTz => {
                json!({"type": "string", "connect.version": 1, "connect.name": "io.debezium.time.ZonedTimestamp"})
            }
            Kind::Time => json!({"type": "long", "connect.version": 1, "connect.name": "io.debezium.time.MicroTime"}),
            Kind::Interval => {
                json!({"type": "string", "connect.version": 1, "connect.name": "io.debezium.time.Interval"})
            }
            Kind::Bytes => json!("bytes"),
            Kind::Uuid => json!({"type": "string", "connect.version": 1, "connect.name": "io.debezium.data.Uuid"}),
            Kind::Json => json!({"type": "string", "connect.version": 1, "connect.name": "io.debezium.data.Json"}),
            Kind::Text => json!("string"),
        }
    }

    /// PostgreSQL text form → Avro value (not wrapped in a union).
    pub fn to_avro(self, column: &str, text: &str) -> Result<Value, TypeError> {
        let bad = |reason: String| TypeError::BadText {
            column: column.to_string(),
            kind: self,
            text: text.chars().take(64).collect(),
            reason,
        };
        Ok(match self {
            Kind::Boolean => match text {
                "t" => Value::Boolean(true),
                "f" => Value::Boolean(false),
                _ => return Err(bad("expected t or f".into())),
            },
            Kind::Int16 | Kind::Int32 => Value::Int(text.parse().map_err(|e| bad(format!("{e}")))?),
            Kind::Int64 => Value::Long(text.parse().map_err(|e| bad(format!("{e}")))?),
            Kind::Float32 => Value::Float(parse_float(text).map_err(|e| bad(e.to_string()))? as f32),
            Kind::Float64 => Value::Double(parse_float(text).map_err(|e| bad(e.to_string()))?),
            Kind::Date => Value::Int(pg_time::parse_date(text).map_err(|e| bad(e.to_string()))?),
            Kind::Timestamp => Value::Long(pg_time::parse_timestamp(text).map_err(|e| bad(e.to_string()))?),
            Kind::TimestampTz => Value::String(pg_time::format_iso_utc(
                pg_time::parse_timestamp(text).map_err(|e| bad(e.to_string()))?,
            )),
            Kind::Bytes => {
                let hex_digits = text
                    .strip_prefix("\\x")
                    .ok_or_else(|| bad("expected \\x hex form".into()))?;
                Value::Bytes(hex::decode(hex_digits).map_err(|e| bad(e.to_string()))?)
            }
            Kind::Time => Value::Long(pg_time::parse_time(text).map_err(|e| bad(e.to_string()))?),
            Kind::Uuid | Kind::Json | Kind::Interval | Kind::Text => Value::String(text.to_string()),
        })
    }

    /// Avro value (not a union) → PostgreSQL text form that reads back to the same value.
    pub fn to_text(self, column: &str, value: &Value) -> Result<String, TypeError> {
        let bad = |expected: &'static str| TypeError::BadAvro {
            column: column.to_string(),
            kind: self,
            expected,
            found: format!("{value:?}").chars().take(64).collect(),
        };
        Ok(match (self, value) {
            (Kind::Boolean, Value::Boolean(b)) => if *b { "t" } else { "f" }.to_string(),
            (Kind::Int16 | Kind::Int32, Value::Int(i)) => i.to_string(),
            (Kind::Int64, Value::Long(i)) => i.to_string(),
            (Kind::Float32, Value::Float(f)) => format_float(*f as f64, f.to_string()),
            (Kind::Float64, Value::Double(f)) => format_float(*f, f.to_string()),
            (Kind::Date, Value::Int(d)) => pg_time::format_date(*d),
            (Kind::Timestamp, Value::Long(us)) => pg_time::format_timestamp(*us, false),
            (Kind::TimestampTz, Value::String(s)) => {
                pg_time::format_timestamp(pg_time::parse_iso_utc(s).map_err(|_| bad("ISO-8601 UTC string"))?, true)
            }
            (Kind::Bytes, Value::Bytes(b)) => format!("\\x{}", hex::encode(b)),
            (Kind::Time, Value::Long(us)) => pg_time::format_time(*us),
            (Kind::Uuid | Kind::Json | Kind::Interval | Kind::Text, Value::String(s)) => s.clone(),
            (Kind::Boolean, _) => return Err(bad("boolean")),
            (Kind::Int16 | Kind::Int32 | Kind::Date, _) => return Err(bad("int")),
            (Kind::Int64 | Kind::Timestamp | Kind::Time, _) => return Err(bad("long")),
            (Kind::Float32, _) => return Err(bad("float")),
            (Kind::Float64, _) => return Err(bad("double")),
            (Kind::Bytes, _) => return Err(bad("bytes")),
            (Kind::TimestampTz | Kind::Uuid | Kind::Json | Kind::Interval | Kind::Text, _) => {
                return Err(bad("string"))
            }
        })
    }
}

/// PostgreSQL float text (`NaN`, `Infinity`, `-Infinity`, decimal/exponent forms) → f64.
fn parse_float(text: &str) -> Result<f64, std::num::ParseFloatError> {
    match text {
        "NaN" => Ok(f64::NAN),
        "Infinity" => Ok(f64::INFINITY),
        "-Infinity" => Ok(f64::NEG_INFINITY),
        _ => text.parse(),
    }
}

/// Float → PostgreSQL text; `shortest` is Rust's shortest round-trip form of the value in its
/// own width, which PostgreSQL's correctly rounded input reads back bit-identical.
fn format_float(f: f64, shortest: String) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f == f64::INFINITY {
        "Infinity".into()
    } else if f == f64::NEG_INFINITY {
        "-Infinity".into()
    } else {
        shortest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(kind: Kind, text: &str) -> String {
        let v = kind.to_avro("c", text).unwrap();
        kind.to_text("c", &v).unwrap()
    }

    #[test]
    fn text_round_trips_through_avro() {
        for (kind, text) in [
            (Kind::Boolean, "t"),
            (Kind::Int16, "-32768"),
            (Kind::Int32, "2147483647"),
            (Kind::Int64, "-9223372036854775808"),
            (Kind::Float32, "3.4028235e+38"),
            (Kind::Float64, "NaN"),
            (Kind::Float64, "-Infinity"),
            (Kind::Date, "2024-02-29"),
            (Kind::Timestamp, "2024-02-29 01:02:03.000004"),
            (Kind::TimestampTz, "2024-02-29 01:02:03.4+00"),
            (Kind::Bytes, "\\x00ff10"),
            (Kind::Time, "23:59:59.999999"),
            (Kind::Time, "24:00:00"),
            (Kind::Time, "00:00:00"),
            (Kind::Interval, "P1Y2M3DT4H5M6.78S"),
            (Kind::Json, "{\"a\": [1, 2]}"),
            (Kind::Text, "12345678901234567890.000000000000000001"),
        ] {
            let back = round_trip(kind, text);
            match kind {
                // Floats come back in Rust's shortest form; the value must be the same.
                Kind::Float32 => assert_eq!(back.parse::<f32>().unwrap(), text.parse::<f32>().unwrap()),
                _ => assert_eq!(back, text, "{kind:?}"),
            }
        }
        assert_eq!(round_trip(Kind::Float64, "0.1"), "0.1");
        assert_eq!(round_trip(Kind::Float32, "1.1"), "1.1");
    }

    #[test]
    fn bad_values_are_errors_not_panics() {
        assert!(Kind::Int32.to_avro("c", "x").is_err());
        assert!(Kind::Bytes.to_avro("c", "zz").is_err());
        assert!(Kind::Boolean.to_avro("c", "yes").is_err());
        assert!(Kind::Int32.to_text("c", &Value::String("1".into())).is_err());
        assert_eq!(Kind::from_name("timestamptz"), Some(Kind::TimestampTz));
    }
}
