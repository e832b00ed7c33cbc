//! Types beyond the common ones travel as PostgreSQL's text form and come back identical:
//! time/timetz, interval, arrays (multi-dimensional, NULL elements, empty), enums, domains,
//! ranges and multiranges, inet/cidr/macaddr, money, bit/varbit, xml, geometric types,
//! composite types, hstore and ltree (contrib extensions), and numeric/timestamps at their
//! edges. Enum, xml and ltree fields carry Debezium's logical names in the registered schema.

use std::time::Duration;

use pgferry_integration_tests::{read_topic, Cluster};

const SETUP: &str = "
CREATE EXTENSION IF NOT EXISTS hstore;
CREATE EXTENSION IF NOT EXISTS ltree;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TYPE pair AS (a int, b text);
CREATE TABLE wide (
    id bigint PRIMARY KEY,
    t time, ttz timetz, iv interval,
    a_int int[], a_txt text[], a_2d int[][], a_num numeric[],
    e mood, dom posint, comp pair,
    r_int int4range, r_ts tstzrange, r_num numrange, mr int4multirange,
    ip inet, net cidr, mac macaddr, mac8 macaddr8,
    cash money, bits bit(8), vbits varbit,
    x xml,
    pt point, ln line, lseg lseg, bx box, pth path, pg polygon, ci circle,
    n38 numeric(38,18), ch char(5), nm name, oi oid, tsv tsvector,
    hs hstore, lt ltree
);";

const ROWS: &str = "
INSERT INTO wide VALUES
 (1, '23:59:59.999999', '12:00:00+05:30', '1 year 2 mons 3 days 04:05:06.789',
  '{1,NULL,3}', '{\"a b\",NULL,\"\",\"q\\\"uote\"}', '{{1,2},{3,4}}', '{1.5,NaN,Infinity}',
  'happy', 42, ROW(1, 'x y'),
  '[1,10)', '[2024-01-01 00:00:00+00,infinity)', '(,5.5]', '{[1,3),[5,7)}',
  '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05',
  '-12.34', B'10101010', B'1',
  '<a x=\"1\">text &amp; more</a>',
  '(1.5,-2)', '{1,2,3}', '[(0,0),(1,1)]', '(2,2),(0,0)', '[(0,0),(1,1),(2,0)]', '((0,0),(1,1),(1,0))', '<(1,1),2.5>',
  -12345678901234567890.123456789012345678, 'ab', 'some_name', 4294967295, 'a fat cat',
  '\"a b\"=>\"1\", c=>NULL, \"\"=>\"q\\\"\"', 'top.science.astronomy'),
 (2, '00:00', '00:00:00-12', '-178000000 years', '{}', '{}', '{}', '{}',
  'sad', 1, ROW(NULL, NULL), 'empty', '(,)', 'empty', '{}',
  '::1', '::/0', 'ff:ff:ff:ff:ff:ff', 'ff:ff:ff:ff:ff:ff:ff:ff',
  '92233720368547758.07', B'00000000', B'',
  '', '(0,0)', '{0,1,0}', '[(0,0),(0,0)]', '(0,0),(0,0)', '((0,0))', '((0,0))', '<(0,0),0>',
  99999999999999999999.999999999999999999, '', '', 0, '', '', ''),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL);
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_form_types_round_trip() -> anyhow::Result<()> {
    let cluster = Cluster::start("moretypes", &["r1", "r1"], SETUP, &["public.wide"]).await?;
    let _capture = cluster.spawn("capture", 0)?;
    let _apply = cluster.spawn("apply", 1)?;
    let n1 = cluster.sql(0).await?;
    n1.batch_execute(ROWS).await?;
    n1.batch_execute("UPDATE wide SET a_int = '{{NULL}}', iv = '1 microsecond', e = 'ok' WHERE id = 2")
        .await?;
    let (_, count) = cluster.wait_converged("wide", Duration::from_secs(60)).await?;
    assert_eq!(count, 3);

    // Per column: text forms equal, and n1's text read back as the type on n2 IS NOT DISTINCT.
    let n2 = cluster.sql(1).await?;
    let cols = n2
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod),
                    EXISTS (SELECT 1 FROM pg_operator WHERE oprname = '=' AND oprleft = atttypid AND oprright = atttypid)
             FROM pg_attribute WHERE attrelid = 'wide'::regclass AND attnum > 0 AND NOT attisdropped",
            &[],
        )
        .await?;
    for id in [1i64, 2, 3] {
        for col in &cols {
            let (name, ty, has_eq): (String, String, bool) = (col.get(0), col.get(1), col.get(2));
            let select = format!("SELECT {name}::text FROM wide WHERE id = $1");
            let on_n1: Option<String> = n1.query_one(&select, &[&id]).await?.get(0);
            let on_n2: Option<String> = n2.query_one(&select, &[&id]).await?.get(0);
            assert_eq!(on_n1, on_n2, "row {id} column {name} ({ty}): text differs");
            if has_eq {
                let same: bool = n2
                    .query_one(
                        &format!("SELECT {name} IS NOT DISTINCT FROM $1::text::{ty} FROM wide WHERE id = $2"),
                        &[&on_n1, &id],
                    )
                    .await?
                    .get(0);
                assert!(same, "row {id} column {name} ({ty}) differs; n1 has {on_n1:?}");
            }
        }
    }

    // Debezium's logical names where Debezium has one for the string form.
    let msg = read_topic(&cluster.endpoints.kafka, &cluster.topic_of(0))?
        .into_iter()
        .find(|m| m.header("pgferry-kind") == Some("change"))
        .ok_or_else(|| anyhow::anyhow!("no change event in the topic"))?;
    let id = u32::from_be_bytes(msg.value[1..5].try_into()?);
    let url = format!("{}/schemas/ids/{id}", cluster.endpoints.registry);
    let schema: serde_json::Value = reqwest::get(&url).await?.json().await?;
    let schema = schema["schema"].as_str().unwrap_or_default().to_string();
    for expected in ["io.debezium.data.Enum", "\"allowed\":\"sad,ok,happy\"", "io.debezium.data.Xml", "io.debezium.data.Ltree"] {
        assert!(schema.contains(expected), "{expected} not in the registered schema {schema}");
    }
    drop((_capture, _apply));
    cluster.cleanup().await
}
