//! The write workloads of the comparison — pgbench TPC-B (pgbench_history with a primary key),
//! wide rows, TPC-B on one branch per node for three writing nodes, and TPC-B on a few hot
//! rows that every node writes (conflicts) — run by `pgbench`
//! either as a fixed number of transactions or at a fixed rate, and the marker row that tells
//! when a replica has everything written before it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;

/// Every table the comparison replicates.
pub const TABLES: &[&str] = &[
    "public.pgbench_branches",
    "public.pgbench_tellers",
    "public.pgbench_accounts",
    "public.pgbench_history",
    "public.bench_wide",
    "public.bench_probe",
];

/// pgbench's four tables (the first of [`TABLES`]).
pub const PGBENCH_TABLES: &[&str] = TABLES.split_at(4).0;

/// The wide table (20 columns: jsonb, a 2 KB text, most common types) and the latency probe.
const WIDE_AND_PROBE: &str = "
    CREATE TABLE bench_wide (
        id bigserial PRIMARY KEY, c_int int, c_bigint bigint, c_small smallint, c_num numeric(14,2),
        c_real real, c_double double precision, c_bool boolean, c_date date, c_ts timestamp,
        c_tstz timestamptz, c_uuid uuid, c_name varchar(64), c_code char(8), c_bytes bytea,
        c_interval interval, c_inet inet, c_arr int[], c_json jsonb, c_text text);
    CREATE TABLE bench_probe (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());";

/// One wide row per transaction: 2,048 characters of distinct md5 hex (barely compressible,
/// so stored out of line by TOAST) and a nested jsonb document.
const WIDE_SCRIPT: &str = "\\set n random(1, 1000000000)
INSERT INTO bench_wide (c_int, c_bigint, c_small, c_num, c_real, c_double, c_bool, c_date, c_ts, c_tstz,
    c_uuid, c_name, c_code, c_bytes, c_interval, c_inet, c_arr, c_json, c_text)
VALUES (:n, (:n)::bigint * 1000, (:n) % 32000, (:n) / 7.0, (:n) / 3.0, (:n) / 11.0, (:n) % 2 = 0, current_date,
    localtimestamp, now(), gen_random_uuid(), 'name-' || (:n), lpad(((:n) % 100000000)::text, 8, '0'),
    decode(md5((:n)::text), 'hex'), make_interval(secs => (:n) % 86400),
    ('10.' || (:n) % 256 || '.' || ((:n) / 256) % 256 || '.1')::inet, ARRAY[(:n) % 10, (:n) % 100, (:n) % 1000],
    jsonb_build_object('n', :n, 'tags', jsonb_build_array('a', 'b', (:n) % 7),
        'nested', jsonb_build_object('x', (:n) / 13.0, 'note', md5((:n)::text))),
    (SELECT string_agg(md5(((:n) + g)::text), '') FROM generate_series(1, 64) g));
";

/// Tables and data: pgbench's four tables at `scale` (pgbench_history with a bigserial primary
/// key, which pgbench's built-in script fills as it names its columns), the wide table and the
/// probe table.
pub fn setup_sql(scale: u64) -> String {
    format!(
        "CREATE TABLE pgbench_branches (bid int PRIMARY KEY, bbalance int, filler char(88));
         CREATE TABLE pgbench_tellers (tid int PRIMARY KEY, bid int, tbalance int, filler char(84));
         CREATE TABLE pgbench_accounts (aid int PRIMARY KEY, bid int, abalance int, filler char(84));
         CREATE TABLE pgbench_history (hid bigserial PRIMARY KEY, tid int, bid int, aid int, delta int,
                                       mtime timestamp, filler char(22));
         INSERT INTO pgbench_branches SELECT b, 0, NULL FROM generate_series(1, {scale}) b;
         INSERT INTO pgbench_tellers SELECT t, (t - 1) / 10 + 1, 0, NULL FROM generate_series(1, 10 * {scale}) t;
         INSERT INTO pgbench_accounts SELECT a, (a - 1) / 100000 + 1, 0, '' FROM generate_series(1, 100000 * {scale}) a;
         ANALYZE pgbench_branches, pgbench_tellers, pgbench_accounts;
         {WIDE_AND_PROBE}"
    )
}

/// What the transactions write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// pgbench's built-in TPC-B-like script: 3 updates and 1 insert.
    TpcB,
    /// One insert into `bench_wide`.
    Wide,
    /// TPC-B-like on node `.0`'s own branch, tellers and accounts (1-based), so writing nodes
    /// never touch the same row.
    TpcBBranch(u64),
    /// TPC-B-like on the first `.0` accounts, the first 10 tellers and branch 1 only: every
    /// node running it updates the same rows (the conflict-heavy drain).
    TpcBHot(u64),
}

impl Workload {
    /// Name in the tables.
    pub fn label(self) -> &'static str {
        match self {
            Workload::TpcB | Workload::TpcBBranch(_) | Workload::TpcBHot(_) => "TPC-B",
            Workload::Wide => "wide rows",
        }
    }

    /// Short key in the results file.
    pub fn key(self) -> &'static str {
        match self {
            Workload::TpcB | Workload::TpcBBranch(_) | Workload::TpcBHot(_) => "tpcb",
            Workload::Wide => "wide",
        }
    }

    /// Row changes per transaction.
    pub fn rows_per_txn(self) -> u64 {
        match self {
            Workload::TpcB | Workload::TpcBBranch(_) | Workload::TpcBHot(_) => 4,
            Workload::Wide => 1,
        }
    }

    /// The table (and its bigint key column) the marker row goes into.
    fn marker_table(self) -> (&'static str, &'static str) {
        match self {
            Workload::TpcB | Workload::TpcBBranch(_) | Workload::TpcBHot(_) => ("pgbench_history", "hid"),
            Workload::Wide => ("bench_wide", "id"),
        }
    }

    /// The pgbench script text, for the workloads that are not built in.
    fn script(self) -> Option<String> {
        match self {
            Workload::TpcB => None,
            Workload::Wide => Some(WIDE_SCRIPT.to_string()),
            Workload::TpcBBranch(bid) => {
                let (a0, t0) = ((bid - 1) * 100_000, (bid - 1) * 10);
                Some(tpcb_script((a0 + 1, a0 + 100_000), (t0 + 1, t0 + 10), bid))
            }
            Workload::TpcBHot(accounts) => Some(tpcb_script((1, accounts.max(1)), (1, 10), 1)),
        }
    }

    /// File name of the pgbench script (the workloads that are not built in).
    fn script_name(self) -> String {
        match self {
            Workload::TpcBBranch(bid) => format!("tpcb-branch-{bid}.sql"),
            Workload::TpcBHot(accounts) => format!("tpcb-hot-{accounts}.sql"),
            _ => format!("{}.sql", self.key()),
        }
    }
}

/// pgbench's TPC-B-like transaction on accounts and tellers drawn from the inclusive ranges
/// `accounts` and `tellers`, and branch `bid`.
fn tpcb_script(accounts: (u64, u64), tellers: (u64, u64), bid: u64) -> String {
    format!(
        "\\set aid random({}, {})
\\set tid random({}, {})
\\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = {bid};
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, {bid}, :aid, :delta, CURRENT_TIMESTAMP);
END;
",
        accounts.0, accounts.1, tellers.0, tellers.1
    )
}

/// How pgbench paces the transactions.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// As fast as it can, `per_client` transactions on each of `clients` connections.
    Count { clients: u64, per_client: u64 },
    /// `tps` transactions per second (pgbench's `-R` schedule) for `seconds`.
    Rate { clients: u64, tps: u64, seconds: u64 },
}

/// What pgbench reported.
#[derive(Debug, Clone, Copy)]
pub struct PgbenchRun {
    /// Transactions it committed.
    pub transactions: u64,
    /// Its tps (without the initial connection time).
    pub tps: f64,
}

/// Runs pgbench and where its scripts go.
pub struct Pgbench {
    bin: PathBuf,
    scripts: PathBuf,
}

impl Pgbench {
    /// pgbench from `pg_bin`, script files in `scripts` (created).
    pub fn new(pg_bin: &Path, scripts: &Path) -> Result<Pgbench> {
        std::fs::create_dir_all(scripts).with_context(|| format!("creating {}", scripts.display()))?;
        Ok(Pgbench {
            bin: pg_bin.join("pgbench"),
            scripts: scripts.to_path_buf(),
        })
    }

    /// Runs `workload` against `dsn` at `pace`. The load generator's own commits are
    /// asynchronous (`synchronous_commit=off`, the same for every system): the WAL decoded and
    /// applied is the same, and the probes of the latency runs commit synchronously.
    pub async fn run(&self, dsn: &str, workload: Workload, pace: Pace) -> Result<PgbenchRun> {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(["-n", "-j", "2"]);
        match workload.script() {
            None => {
                cmd.args(["-b", "tpcb-like"]);
            }
            Some(text) => {
                let path = self.scripts.join(workload.script_name());
                // Several nodes may run the same script at once: rewriting the file while a
                // pgbench reads it would hand that one a truncated script.
                if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
                }
                cmd.arg("-f").arg(path);
            }
        }
        match pace {
            Pace::Count { clients, per_client } => {
                cmd.args(["-c", &clients.to_string(), "-t", &per_client.to_string()]);
            }
            Pace::Rate { clients, tps, seconds } => {
                cmd.args([
                    "-c",
                    &clients.to_string(),
                    "-R",
                    &tps.to_string(),
                    "-T",
                    &seconds.to_string(),
                ]);
            }
        }
        let out = cmd
            .arg(dsn)
            .env("PGOPTIONS", "-c synchronous_commit=off")
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {}", self.bin.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "pgbench ({}) failed ({}): {}",
                workload.label(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .rev()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" / ")
            );
        }
        parse_pgbench(&stdout).with_context(|| format!("reading pgbench's report: {stdout}"))
    }
}

/// Transactions and tps from pgbench's report.
fn parse_pgbench(out: &str) -> Option<PgbenchRun> {
    let transactions = out.lines().find_map(|l| {
        let rest = l.strip_prefix("number of transactions actually processed: ")?;
        rest.split(['/', ' ']).next()?.parse().ok()
    })?;
    let tps = out
        .lines()
        .find_map(|l| l.strip_prefix("tps = ")?.split_whitespace().next()?.parse().ok())?;
    Some(PgbenchRun { transactions, tps })
}

/// Inserts the marker row of `workload` (one more transaction after the workload's) and
/// returns its key: a replica that has it has everything committed before it on this node.
pub async fn insert_marker(client: &Client, workload: Workload) -> Result<i64> {
    let sql = match workload {
        Workload::Wide => "INSERT INTO bench_wide (c_text) VALUES ('marker') RETURNING id",
        _ => "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 0, now()) RETURNING hid",
    };
    let row = client.query_one(sql, &[]).await.context("inserting the marker row")?;
    Ok(row.get(0))
}

/// Whether the marker row `key` of `workload` is visible.
pub async fn has_marker(client: &Client, workload: Workload, key: i64) -> Result<bool> {
    let (table, column) = workload.marker_table();
    let row = client
        .query_opt(&format!("SELECT 1 FROM {table} WHERE {column} = $1"), &[&key])
        .await
        .with_context(|| format!("looking for the marker row in {table}"))?;
    Ok(row.is_some())
}

/// Rows of the table the workload inserts into (for checking a replica has them all).
pub async fn inserted_rows(client: &Client, workload: Workload) -> Result<i64> {
    let (table, _) = workload.marker_table();
    let row = client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .with_context(|| format!("counting {table}"))?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pgbench_reports() {
        let count =
            "transaction type: <builtin: TPC-B (sort of)>\nnumber of transactions actually processed: 2000/2000\n\
                     latency average = 1.2 ms\ntps = 3211.456789 (without initial connection time)\n";
        let run = parse_pgbench(count).expect("parsed");
        assert_eq!(run.transactions, 2000);
        assert!((run.tps - 3211.456789).abs() < 1e-9);
        let rate = "number of transactions actually processed: 29871\ntps = 995.7 (without initial connection time)\n";
        assert_eq!(parse_pgbench(rate).map(|r| r.transactions), Some(29871));
        assert!(parse_pgbench("nothing").is_none());
    }

    #[test]
    fn branch_scripts_stay_on_their_branch() {
        let text = Workload::TpcBBranch(2).script().expect("a script");
        assert!(text.contains("random(100001, 200000)"));
        assert!(text.contains("random(11, 20)"));
        assert!(text.contains("WHERE bid = 2"));
        let hot = Workload::TpcBHot(1000).script().expect("a script");
        assert!(hot.contains("random(1, 1000)"));
        assert!(hot.contains("random(1, 10)"));
        assert!(hot.contains("WHERE bid = 1"));
    }
}
