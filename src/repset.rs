//! `pgferry repset list|add-table|remove-table`: what replicates, changed while the cluster runs.
//!
//! The config file stays the one source of truth: `add-table` and `remove-table` edit it (its
//! comments and `${VAR}` references kept), check the result as start-up would, and then do what
//! `init` does with it on every node (publication, tombstone trigger). Running apply services
//! pick an added table up by themselves: a change of a table outside their sets makes them read
//! the file again. A removed table leaves the publication first, so the changes already in the
//! topics are still applied by the services running with the old sets.

use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use pgferry_connectors::config::Config;
use pgferry_connectors::postgres::{self, quote_ident};
use serde_json::json;

#[derive(Subcommand)]
pub enum RepsetCommand {
    /// The replicated tables with their options, and on which nodes each is published now.
    List {
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Start replicating a table (it must exist with a primary key on the nodes that take it).
    AddTable(AddTableArgs),
    /// Stop replicating a table (its rows stay where they are).
    RemoveTable {
        /// `schema.table` (or `table`, meaning `public.table`).
        table: String,
    },
}

#[derive(Args)]
pub struct AddTableArgs {
    /// `schema.table` (or `table`, meaning `public.table`).
    table: String,
    /// Only rows matching this SQL condition replicate.
    #[arg(long, value_name = "SQL")]
    row_filter: Option<String>,
    /// Only these columns replicate (comma-separated; must include the key).
    #[arg(long, value_delimiter = ',', value_name = "COL,…")]
    columns: Option<Vec<String>>,
    /// Keep the table's rows in one region (data residency).
    #[arg(long)]
    region: Option<String>,
    /// Only these operations replicate (comma-separated: insert, update, delete, truncate).
    #[arg(long, value_delimiter = ',', value_name = "OP,…")]
    operations: Option<Vec<String>>,
}

pub async fn run(config: &Config, path: &Path, command: RepsetCommand) -> Result<()> {
    match command {
        RepsetCommand::List { json } => list(config, json).await,
        RepsetCommand::AddTable(args) => add_table(path, args).await,
        RepsetCommand::RemoveTable { table } => remove_table(config, path, &table).await,
    }
}

/// `schema.table` with `public` filled in.
fn qualified(table: &str) -> String {
    if table.contains('.') {
        table.to_string()
    } else {
        format!("public.{table}")
    }
}

/// The config file's text and its TOML document.
fn read(path: &Path) -> Result<(String, toml_edit::DocumentMut)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc = text.parse().with_context(|| format!("{}: not valid TOML", path.display()))?;
    Ok((text, doc))
}

/// Checks `doc` as start-up would, then writes it to `path` (atomically); the new config.
fn write_checked(path: &Path, doc: &toml_edit::DocumentMut) -> Result<Config> {
    let text = doc.to_string();
    let mut config = Config::parse(&text, &path.display().to_string())?;
    config.source = Some(path.to_path_buf());
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(config)
}

/// `replication.tables` of `doc` (created if missing).
fn tables_array(doc: &mut toml_edit::DocumentMut) -> Result<&mut toml_edit::Array> {
    let replication = doc
        .get_mut("replication")
        .and_then(|r| r.as_table_mut())
        .context("the config has no [replication] table")?;
    if !replication.contains_key("tables") {
        replication.insert("tables", toml_edit::value(toml_edit::Array::new()));
    }
    replication
        .get_mut("tables")
        .and_then(|t| t.as_array_mut())
        .context("replication.tables is not an array")
}

/// The entries of `array` naming `table` (qualified or not).
fn positions(array: &toml_edit::Array, table: &str) -> Vec<usize> {
    array
        .iter()
        .enumerate()
        .filter(|(_, v)| v.as_str().is_some_and(|s| qualified(s) == table))
        .map(|(i, _)| i)
        .collect()
}

async fn add_table(path: &Path, args: AddTableArgs) -> Result<()> {
    let table = qualified(&args.table);
    let (_, mut doc) = read(path)?;
    let tables = tables_array(&mut doc)?;
    if !positions(tables, &table).is_empty() {
        bail!("{table} is already in replication.tables of {}", path.display());
    }
    tables.push(table.as_str());
    let mut options = toml_edit::Table::new();
    if let Some(f) = &args.row_filter {
        options.insert("row_filter", toml_edit::value(f.as_str()));
    }
    let list = |items: &[String]| toml_edit::value(items.iter().map(String::as_str).collect::<toml_edit::Array>());
    if let Some(c) = &args.columns {
        options.insert("columns", list(c));
    }
    if let Some(r) = &args.region {
        options.insert("region", toml_edit::value(r.as_str()));
    }
    if let Some(o) = &args.operations {
        options.insert("operations", list(o));
    }
    if !options.is_empty() {
        let replication = doc["replication"].as_table_mut().context("[replication] is not a table")?;
        let per_table = replication.entry("table").or_insert_with(|| {
            let mut t = toml_edit::Table::new();
            t.set_implicit(true);
            toml_edit::Item::Table(t)
        });
        per_table
            .as_table_mut()
            .context("replication.table is not a table")?
            .insert(&table, toml_edit::Item::Table(options));
    }
    // Checked as start-up would check it, and on every node, before the file changes.
    let text = doc.to_string();
    let config = Config::parse(&text, &path.display().to_string())?;
    crate::init::check(&config)
        .await
        .with_context(|| format!("{table} cannot be added; {} is unchanged", path.display()))?;
    // The file first, then the publication: an apply that meets the table's first change
    // finds it in the file.
    let config = write_checked(path, &doc)?;
    eprintln!("{}: {table} added to replication.tables", path.display());
    crate::init::run(&config)
        .await
        .with_context(|| format!("{table} is in {} but not yet published everywhere; run `pgferry init` again", path.display()))?;
    eprintln!("{table}: published on every node");
    Ok(())
}

async fn remove_table(config: &Config, path: &Path, table: &str) -> Result<()> {
    let table = qualified(table);
    let (_, mut doc) = read(path)?;
    let tables = tables_array(&mut doc)?;
    let found = positions(tables, &table);
    if found.is_empty() {
        let schema = table.split('.').next().unwrap_or_default();
        if config.replicates_schema(schema) {
            bail!("{table} is in schema {schema}, which replicates whole (replication.schemas); it cannot be taken out alone");
        }
        bail!("{table} is not in replication.tables of {}", path.display());
    }
    for i in found.into_iter().rev() {
        tables.remove(i);
    }
    if let Some(per_table) = doc
        .get_mut("replication")
        .and_then(|r| r.get_mut("table"))
        .and_then(|t| t.as_table_like_mut())
    {
        let keys: Vec<String> = per_table.iter().map(|(k, _)| k.to_string()).filter(|k| qualified(k) == table).collect();
        for k in keys {
            per_table.remove(&k);
        }
    }
    let new = write_checked(path, &doc)?;
    eprintln!("{}: {table} removed from replication.tables", path.display());
    crate::init::run(&new)
        .await
        .with_context(|| format!("{table} is out of {} but still published somewhere; run `pgferry init` again", path.display()))?;
    let (schema, name) = table.split_once('.').unwrap_or(("public", &table));
    let qualified_name = format!("{}.{}", quote_ident(schema), quote_ident(name));
    for node in &new.nodes {
        let sql = postgres::connect(&node.dsn, "pgferry-repset").await?;
        // A table already dropped there (DROP TABLE replicates) has no trigger left to drop.
        let exists: bool = sql
            .client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified_name])
            .await
            .map_err(sql.err(format!("looking up {table}")))?
            .get(0);
        if !exists {
            continue;
        }
        sql.client
            .batch_execute(&format!(
                "SET pgferry.local_ddl = on; SET client_min_messages = warning;
                 DROP TRIGGER IF EXISTS pgferry_tombstone ON {qualified_name};
                 DROP TRIGGER IF EXISTS pgferry_key_change ON {qualified_name};
                 DROP TRIGGER IF EXISTS pgferry_truncation ON {qualified_name}"
            ))
            .await
            .map_err(sql.err(format!("dropping the tombstone trigger of {table}")))?;
    }
    eprintln!("{table}: no longer published on any node");
    Ok(())
}

async fn list(config: &Config, as_json: bool) -> Result<()> {
    // Per node: the tables its publication holds now (None: the node did not answer).
    let mut published = Vec::new();
    for node in &config.nodes {
        let tables = match postgres::connect(&node.dsn, "pgferry-repset").await {
            Ok(sql) => Some(
                sql.client
                    .query(
                        "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
                        &[&pgferry_schemas::naming::publication_name()],
                    )
                    .await
                    .map_err(sql.err("reading the publication's tables"))?
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>(),
            ),
            Err(e) => {
                eprintln!("node {}: {e}", node.name);
                None
            }
        };
        published.push((node, tables));
    }
    let mut names: Vec<String> = config.tables().iter().map(|(s, t)| format!("{s}.{t}")).collect();
    for (_, tables) in &published {
        for t in tables.iter().flatten() {
            if !names.contains(t) {
                names.push(t.clone());
            }
        }
    }
    let rows: Vec<serde_json::Value> = names
        .iter()
        .map(|name| {
            let (schema, table) = name.split_once('.').unwrap_or(("public", name));
            let o = config.replication.table.iter().find(|(k, _)| qualified(k) == *name).map(|(_, o)| o);
            let nodes: serde_json::Map<String, serde_json::Value> = published
                .iter()
                .map(|(n, t)| {
                    let state = match t {
                        None => json!(null),
                        Some(t) => json!(t.contains(name)),
                    };
                    (n.name.clone(), state)
                })
                .collect();
            json!({
                "table": name,
                "source": if config.tables().iter().any(|(s, t)| s == schema && t == table) {
                    "tables"
                } else if config.replicates_schema(schema) {
                    "schemas"
                } else if config.replicates_table(schema, table) {
                    "pattern"
                } else {
                    "published, not in the config"
                },
                "region": o.and_then(|o| o.region.clone()),
                "operations": o.and_then(|o| o.operations.as_ref()).map(|ops| ops.iter().map(|op| format!("{op:?}").to_lowercase()).collect::<Vec<_>>()),
                "columns": o.and_then(|o| o.columns.clone()),
                "row_filter": o.and_then(|o| o.row_filter.clone()),
                "resolver": format!("{:?}", config.resolver(schema, table)),
                "delta_columns": config.delta_columns(schema, table),
                "published_on": nodes,
            })
        })
        .collect();
    if as_json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let show = |v: &serde_json::Value, all: &str| match v {
        serde_json::Value::Null => all.to_string(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    };
    let mut out = vec![["table", "region", "operations", "columns", "row filter", "published on"].map(String::from).to_vec()];
    for r in &rows {
        let on: Vec<String> = config
            .nodes
            .iter()
            .map(|n| match &r["published_on"][&n.name] {
                serde_json::Value::Bool(true) => n.name.clone(),
                serde_json::Value::Bool(false) => format!("-{}", n.name),
                _ => format!("?{}", n.name),
            })
            .collect();
        out.push(vec![
            show(&r["table"], ""),
            show(&r["region"], "all"),
            show(&r["operations"], "all"),
            show(&r["columns"], "all"),
            show(&r["row_filter"], "-"),
            on.join(" "),
        ]);
    }
    let widths: Vec<usize> = (0..out[0].len()).map(|c| out.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for r in out {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
    println!("(published on: node = in its publication now, -node = not, ?node = did not answer)");
    Ok(())
}
