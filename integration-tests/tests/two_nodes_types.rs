//! Two nodes, one way: every common type, through insert, update and delete, arrives on n2
//! with exactly the values n1 has (whole rows compared, text form and IS NOT DISTINCT FROM).

use std::time::Duration;

use pgferry_integration_tests::Cluster;

const TABLE: &str = "
CREATE TABLE typed (
    id      bigint PRIMARY KEY,
    i2      smallint, i4 integer, i8 bigint,
    f4      real, f8 double precision,
    num     numeric, num_s numeric(12,4),
    txt     text, vc varchar(20),
    flag    boolean,
    d       date, ts timestamp, tstz timestamptz,
    u       uuid, j json, jb jsonb, b bytea
);";

/// Edge values per row: NULLs, extremes, NaN/Infinity, scale, microseconds, 8 KB+ text.
const ROWS: &str = "
INSERT INTO typed VALUES
 (1, -32768, -2147483648, -9223372036854775808, 1.5, 2.25, 1.50, 12.3400, 'a', 'b', true,
  '2024-02-29', '2024-02-29 23:59:59.999999', '2024-02-29 23:59:59.000001+00',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{ \"k\" :  [1, 2] }', '{\"b\": 1, \"a\": [true, null]}', '\\x00ff'),
 (2, 32767, 2147483647, 9223372036854775807, 'NaN', 'Infinity', 'NaN', -0.0001, '', '', false,
  'infinity', '-infinity', 'infinity', '00000000-0000-0000-0000-000000000000', 'null', '[]', '\\x'),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (4, 0, 0, 0, '-Infinity', 1e-300, 123456789012345678901234567890.123456789012345678901234567890, 0, repeat('x', 9000), 'ünïcödé ✓', true,
  '0044-03-15 BC', '1900-01-01 00:00:00.5', '1969-12-31 23:59:59.999999+00',
  'ffffffff-ffff-ffff-ffff-ffffffffffff', '\"str\"', '{\"nested\": {\"deep\": 1.0}}', decode(repeat('ab', 5000), 'hex')),
 (5, 1, 1, 1, 3.4028235e38, 1.7976931348623157e308, 1e-20, 99999999.9999, E'tab\\tnew\\nline', 'quote''s', false,
  '1970-01-01', '1970-01-01 00:00:00', '2000-01-01 00:00:00+00', gen_random_uuid(), '{}', '{}', '\\x5c78');
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_one_way_all_common_types() -> anyhow::Result<()> {
    let cluster = Cluster::start("types", &["r1", "r1"], TABLE, &["public.typed"]).await?;
    let _n1 = cluster.spawn("capture", 0)?;
    let _n2 = cluster.spawn("apply", 1)?;
    let n1 = cluster.sql(0).await?;
    n1.batch_execute(ROWS).await?;
    let (_, count) = cluster.wait_converged("typed", Duration::from_secs(60)).await?;
    assert_eq!(count, 5);

    // Updates touching every type, and deletes, in separate transactions.
    n1.batch_execute(
        "UPDATE typed SET i4 = i4 / 2, f8 = -0.0, num = 'Infinity', txt = repeat('y', 10000), jb = '{\"z\": 2}',
                          tstz = '2030-01-01 12:00:00.123456+00', b = '\\xdeadbeef' WHERE id = 1;
         UPDATE typed SET d = '2000-01-01', ts = 'infinity', flag = NULL WHERE id IN (2, 3);
         UPDATE typed SET id = 40 WHERE id = 4;",
    )
    .await?;
    n1.batch_execute("DELETE FROM typed WHERE id = 5").await?;
    let (_, count) = cluster.wait_converged("typed", Duration::from_secs(60)).await?;
    assert_eq!(count, 4);

    // Column by column with IS NOT DISTINCT FROM: n1's value, as text, read back as the
    // column's type on n2 must equal n2's value (json compared as text, it has no equality).
    let n2 = cluster.sql(1).await?;
    let cols = n2
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = 'typed'::regclass AND attnum > 0 AND NOT attisdropped",
            &[],
        )
        .await?;
    assert_eq!(cols.len(), 18);
    for id in [1i64, 2, 3, 40] {
        for col in &cols {
            let (name, ty): (String, String) = (col.get(0), col.get(1));
            let on_n1: Option<String> = n1
                .query_one(&format!("SELECT {name}::text FROM typed WHERE id = $1"), &[&id])
                .await?
                .get(0);
            let check = if ty == "json" {
                format!("SELECT {name}::text IS NOT DISTINCT FROM $1 FROM typed WHERE id = $2")
            } else {
                format!("SELECT {name} IS NOT DISTINCT FROM $1::text::{ty} FROM typed WHERE id = $2")
            };
            let same: bool = n2.query_one(&check, &[&on_n1, &id]).await?.get(0);
            assert!(same, "row {id} column {name} ({ty}) differs; n1 has {on_n1:?}");
        }
    }
    drop((_n1, _n2));
    cluster.cleanup().await
}
