//! Avro-safe names and registry subjects (TopicRecordNameStrategy).

/// Makes one name part Avro-safe: `[A-Za-z_][A-Za-z0-9_]*`. Anything else becomes `_`, and a
/// leading digit gets a `_` prefix. Two different tables may map to the same name; callers
/// detect that ([`crate::envelope_schema::TableSchemas`] users keep a map and refuse collisions).
pub fn avro_safe(part: &str) -> String {
    let mut out = String::with_capacity(part.len() + 1);
    for (i, ch) in part.chars().enumerate() {
        if i == 0 && ch.is_ascii_digit() {
            out.push('_');
        }
        if ch.is_ascii_alphanumeric() || ch == '_' {
            out.push(ch);
        } else {
            out.push('_');
        }
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// The Avro namespace of a table: `<cluster>.<schema>.<table>`, each part Avro-safe.
pub fn table_namespace(cluster: &str, schema: &str, table: &str) -> String {
    format!("{}.{}.{}", avro_safe(cluster), avro_safe(schema), avro_safe(table))
}

/// The PostgreSQL replication origin under which a node's apply writes changes from node
/// `origin` (`pgferry_<origin>`); capture recognizes forwarded transactions by it.
pub fn replication_origin(origin: &str) -> String {
    format!("pgferry_{origin}")
}

/// The registry subject of a record under TopicRecordNameStrategy: `<topic>-<full name>`.
pub fn subject(topic: &str, record_full_name: &str) -> String {
    format!("{topic}-{record_full_name}")
}

/// The data topic of a region: `<cluster>.<region>.changes`.
pub fn region_topic(cluster: &str, region: &str) -> String {
    format!("{cluster}.{region}.changes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_names_avro_safe() {
        assert_eq!(avro_safe("orders"), "orders");
        assert_eq!(avro_safe("order-items"), "order_items");
        assert_eq!(avro_safe("1st"), "_1st");
        assert_eq!(avro_safe("Ünï"), "_n_");
        assert_eq!(avro_safe(""), "_");
        assert_eq!(table_namespace("prod", "public", "t x"), "prod.public.t_x");
        assert_eq!(
            subject("c.eu.changes", "c.public.t.Envelope"),
            "c.eu.changes-c.public.t.Envelope"
        );
    }
}
