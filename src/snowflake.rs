//! Snowflake ids (DESIGN.md, "Replication sets, sequences, nodes"): 64-bit keys that every node
//! can generate without coordination. `pgferry init` installs on each node:
//!
//! - `pgferry.node_id()`: this node's id (1–1023) from the config;
//! - `pgferry.snowflake_nextval(seq regclass)`: `ms << 22 | node_id << 12 | nextval(seq) % 4096`,
//!   where `ms` is milliseconds since 2024-01-01 UTC (41 bits: until 2093);
//! - `pgferry.snowflake_node(id)`, `pgferry.snowflake_time(id)`: decode an id.
//!
//! Ids from different nodes never collide (the node id is in every id). On one node, ids of the
//! same millisecond differ in the counter taken from the sequence; two collide only if one node
//! issues 4096 or more ids within one millisecond of its clock (several million a second,
//! beyond a single PostgreSQL) or its clock steps back onto a millisecond it already used with a
//! counter exactly a multiple of 4096 further.

/// The statements that install the snowflake functions for node id `node_id`. Idempotent.
pub fn install_sql(node_id: u16) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION pgferry.node_id() RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT {node_id}';
         CREATE OR REPLACE FUNCTION pgferry.snowflake_nextval(seq regclass) RETURNS bigint LANGUAGE sql VOLATILE AS $$
             SELECT ((floor(extract(epoch FROM clock_timestamp() - timestamptz '2024-01-01 00:00:00+00') * 1000)::bigint) << 22)
                    | ((pgferry.node_id()::bigint & 1023) << 12)
                    | (nextval(seq) % 4096)
         $$;
         CREATE OR REPLACE FUNCTION pgferry.snowflake_node(id bigint) RETURNS int LANGUAGE sql IMMUTABLE AS
             'SELECT ((id >> 12) & 1023)::int';
         CREATE OR REPLACE FUNCTION pgferry.snowflake_time(id bigint) RETURNS timestamptz LANGUAGE sql IMMUTABLE AS
             $$ SELECT timestamptz '2024-01-01 00:00:00+00' + (id >> 22) * interval '1 millisecond' $$;"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_id_is_baked_in() {
        let sql = super::install_sql(517);
        assert!(sql.contains("AS 'SELECT 517'"), "{sql}");
    }
}
