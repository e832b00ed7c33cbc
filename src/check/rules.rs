//! What `pgferry check` makes of what it read: pure functions from the facts read on a node,
//! in Kafka and in the registry to findings, each naming where (node, Kafka, registry), the
//! object (a setting, table, role, topic, subject) and the fix. No I/O here: the readers in
//! `node_facts` and `crate::check` gather the facts, and the unit tests below feed them by hand.

use std::collections::BTreeMap;

use pgferry_connectors::kafka::{ClusterDescription, TopicDescription, TRANSACTION_STATE_TOPIC};
use serde_json::{json, Value};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The prerequisite holds.
    Ok,
    /// It holds for now, but something will or may go wrong later; does not change the exit
    /// status.
    Warning,
    /// It does not hold: pgferry will not work (or not correctly) until it is fixed.
    Problem,
    /// It could not be checked (a server that does not answer, a refused login, a failed read).
    Unchecked,
}

impl Severity {
    /// The word in the text report and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Severity::Ok => "ok",
            Severity::Warning => "warning",
            Severity::Problem => "problem",
            Severity::Unchecked => "unchecked",
        }
    }
}

/// Where a finding is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// The configuration file.
    Config { path: String },
    /// A node's database (`endpoint`: `host:port/db`, never the password).
    Node { name: String, endpoint: String },
    /// The Kafka cluster.
    Kafka { bootstrap: String },
    /// The schema registry.
    Registry { url: String },
}

impl Place {
    /// As the text report names it: `node n1 (db1:5432/app)`, `Kafka at kafka1:9092`, …
    pub fn label(&self) -> String {
        match self {
            Place::Config { path } => format!("config {path}"),
            Place::Node { name, endpoint } => format!("node {name} ({endpoint})"),
            Place::Kafka { bootstrap } => format!("Kafka at {bootstrap}"),
            Place::Registry { url } => format!("registry {url}"),
        }
    }

    fn json(&self) -> Value {
        match self {
            Place::Config { path } => json!({"system": "config", "path": path}),
            Place::Node { name, endpoint } => json!({"system": "node", "node": name, "endpoint": endpoint}),
            Place::Kafka { bootstrap } => json!({"system": "kafka", "endpoint": bootstrap}),
            Place::Registry { url } => json!({"system": "registry", "endpoint": url}),
        }
    }
}

/// One result of `pgferry check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub place: Place,
    /// Which check (a stable name, e.g. `wal_level`, `primary_key`, `topic_partitions`).
    pub check: &'static str,
    /// What it is about: the setting, table, role, topic or subject.
    pub object: String,
    /// What was found, naming the object.
    pub message: String,
    /// What to do about it, when there is something to do.
    pub fix: Option<String>,
}

impl Finding {
    fn new(
        severity: Severity,
        place: &Place,
        check: &'static str,
        object: impl Into<String>,
        message: impl Into<String>,
    ) -> Finding {
        Finding {
            severity,
            place: place.clone(),
            check,
            object: object.into(),
            message: message.into(),
            fix: None,
        }
    }

    /// A prerequisite that holds.
    pub fn ok(place: &Place, check: &'static str, object: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding::new(Severity::Ok, place, check, object, message)
    }

    /// A prerequisite that does not hold.
    pub fn problem(
        place: &Place,
        check: &'static str,
        object: impl Into<String>,
        message: impl Into<String>,
    ) -> Finding {
        Finding::new(Severity::Problem, place, check, object, message)
    }

    /// Something that will or may go wrong later.
    pub fn warning(
        place: &Place,
        check: &'static str,
        object: impl Into<String>,
        message: impl Into<String>,
    ) -> Finding {
        Finding::new(Severity::Warning, place, check, object, message)
    }

    /// A check that could not run: `why` says what failed.
    pub fn unchecked(place: &Place, check: &'static str, object: impl Into<String>, why: impl Into<String>) -> Finding {
        Finding::new(Severity::Unchecked, place, check, object, why)
    }

    /// With what to do about it.
    pub fn fix(mut self, fix: impl Into<String>) -> Finding {
        self.fix = Some(fix.into());
        self
    }

    /// The line of the text report: `PROBLEM   node n1 (db1:5432/app): wal_level is … Fix: …`.
    pub fn line(&self) -> String {
        let label = match self.severity {
            Severity::Ok => "ok",
            Severity::Warning => "WARNING",
            Severity::Problem => "PROBLEM",
            Severity::Unchecked => "UNCHECKED",
        };
        let mut line = format!("{label:<9} {}: {}", self.place.label(), self.message);
        if let Some(fix) = &self.fix {
            line += &format!(". Fix: {fix}");
        }
        line
    }

    /// The finding as a JSON object (`--json`).
    pub fn json(&self) -> Value {
        let mut v = self.place.json();
        if let Value::Object(m) = &mut v {
            m.insert("severity".into(), json!(self.severity.name()));
            m.insert("check".into(), json!(self.check));
            m.insert("object".into(), json!(self.object));
            m.insert("message".into(), json!(self.message));
            m.insert("fix".into(), json!(self.fix));
        }
        v
    }
}

/// The exit status: 0 every check ran and passed (warnings allowed); 1: every check
/// ran and some found a problem; 2: some check could not run (then the problems listed may not
/// be all there are).
pub fn exit_status(findings: &[Finding]) -> i32 {
    if findings.iter().any(|f| f.severity == Severity::Unchecked) {
        2
    } else if findings.iter().any(|f| f.severity == Severity::Problem) {
        1
    } else {
        0
    }
}

/// The oldest PostgreSQL major version pgferry runs on (publication row filters and column
/// lists, `TABLES IN SCHEMA`, `GRANT SET ON PARAMETER`).
pub const PG_MIN_MAJOR: i32 = 15;
/// The newest PostgreSQL major version pgferry is known to run on.
pub const PG_MAX_MAJOR: i32 = 17;

/// What a node's server reports about itself and its capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFacts {
    /// `server_version_num` (`150008`).
    pub version_num: i32,
    /// `server_version` (`15.8 (Debian 15.8-0+deb12u1)`).
    pub version: String,
    pub wal_level: String,
    pub track_commit_timestamp: String,
    pub max_replication_slots: i64,
    /// Replication slots on the server (of any database).
    pub slots_in_use: i64,
    /// The setting that bounds replication origins with progress: `max_replication_slots`
    /// up to PostgreSQL 17, `max_active_replication_origins` from 18.
    pub origins_setting: String,
    pub max_origins: i64,
    /// Origins holding a progress slot (`pg_replication_origin_status`); `None` when this role
    /// may not read it.
    pub origins_in_use: Option<i64>,
    pub max_wal_senders: i64,
    /// WAL sender processes running (physical and logical).
    pub wal_senders_in_use: i64,
    pub max_connections: i64,
    /// Connections this role may not use (`superuser_reserved_connections`, and
    /// `reserved_connections` from 16, unless it is a superuser).
    pub reserved_connections: i64,
    /// Client backends connected now (this check's own session among them).
    pub connections_in_use: i64,
}

/// What the node's pgferry needs on its server besides settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNeeds {
    /// The node's slot.
    pub slot: String,
    pub slot_exists: bool,
    /// A capture streams from it now (so it already has its WAL sender).
    pub slot_active: bool,
    /// The node's replication origins that hold no progress slot yet (apply takes one each
    /// when it first applies that origin's changes).
    pub origins_without_progress: Vec<String>,
    /// Sessions `pgferry run --node <node>` opens on the node.
    pub sessions: i64,
    /// Of those, how many are connected now (pgferry already runs).
    pub sessions_open: i64,
}

/// `server_version`: PostgreSQL 15 to 17.
pub fn server_version(place: &Place, s: &ServerFacts) -> Finding {
    let major = s.version_num / 10_000;
    let version = s.version.split_whitespace().next().unwrap_or(&s.version).to_string();
    if major < PG_MIN_MAJOR {
        Finding::problem(
            place,
            "server_version",
            "server_version",
            format!(
                "PostgreSQL {version} is older than {PG_MIN_MAJOR}, the oldest pgferry runs on (it needs publication row filters and column lists, and GRANT SET ON PARAMETER)"
            ),
        )
        .fix(format!("upgrade the server to PostgreSQL {PG_MIN_MAJOR}–{PG_MAX_MAJOR}"))
    } else if major > PG_MAX_MAJOR {
        Finding::warning(
            place,
            "server_version",
            "server_version",
            format!(
                "PostgreSQL {version} is newer than {PG_MAX_MAJOR}, the newest pgferry is known to run on: untested"
            ),
        )
    } else {
        Finding::ok(
            place,
            "server_version",
            "server_version",
            format!("PostgreSQL {version}"),
        )
    }
}

/// `wal_level = logical` and `track_commit_timestamp = on`.
pub fn settings(place: &Place, s: &ServerFacts) -> Vec<Finding> {
    let mut out = Vec::new();
    let wanted = [
        (
            "wal_level",
            s.wal_level.as_str(),
            "logical",
            "capture decodes the node's changes from the WAL",
        ),
        (
            "track_commit_timestamp",
            s.track_commit_timestamp.as_str(),
            "on",
            "conflict resolution compares the commit times PostgreSQL records for each row",
        ),
    ];
    for (setting, have, want, why) in wanted {
        out.push(if have == want {
            Finding::ok(place, setting, setting, format!("{setting} is {have}"))
        } else {
            Finding::problem(
                place,
                setting,
                setting,
                format!("{setting} is {have}; pgferry needs {want} ({why})"),
            )
            .fix(format!("ALTER SYSTEM SET {setting} = {want}; then restart PostgreSQL"))
        });
    }
    out
}

/// Room for the node's slot (`max_replication_slots`), and one spare for the temporary slot
/// `node add`/`node rebuild` create when this node is the peer they copy from.
pub fn replication_slots(place: &Place, s: &ServerFacts, n: &NodeNeeds) -> Finding {
    let free = s.max_replication_slots - s.slots_in_use;
    let usage = format!(
        "max_replication_slots is {} and {} in use",
        s.max_replication_slots,
        plural(s.slots_in_use, "slot is", "slots are")
    );
    let raise = |to: i64| format!("ALTER SYSTEM SET max_replication_slots = {to}; then restart PostgreSQL");
    let needed = i64::from(!n.slot_exists);
    if free < needed {
        return Finding::problem(
            place,
            "replication_slots",
            "max_replication_slots",
            format!("no free replication slot for the node's slot {}: {usage}", n.slot),
        )
        .fix(format!(
            "{}, or drop a slot nothing uses (SELECT slot_name, database, active FROM pg_replication_slots)",
            raise(s.slots_in_use + needed + 1)
        ));
    }
    if free - needed < 1 {
        return Finding::warning(
            place,
            "replication_slots",
            "max_replication_slots",
            format!(
                "no replication slot to spare once {} exists ({usage}): `pgferry node add`/`node rebuild --copy-from` this node needs one for a temporary slot",
                n.slot
            ),
        )
        .fix(raise(s.slots_in_use + needed + 1));
    }
    let slot = if n.slot_exists {
        format!("slot {} exists", n.slot)
    } else {
        format!("room for slot {} (init creates it)", n.slot)
    };
    Finding::ok(
        place,
        "replication_slots",
        "max_replication_slots",
        format!("{slot}; {usage}"),
    )
}

/// Room for a progress slot of each of the node's replication origins (bounded by
/// `max_replication_slots` up to PostgreSQL 17).
pub fn replication_origins(place: &Place, s: &ServerFacts, n: &NodeNeeds) -> Finding {
    let setting = &s.origins_setting;
    let needed = n.origins_without_progress.len() as i64;
    let Some(in_use) = s.origins_in_use else {
        return Finding::warning(
            place,
            "replication_origins",
            setting.clone(),
            format!(
                "cannot count the replication origins in use (this role may not read pg_replication_origin_status); {setting} is {} and the node's apply needs room for {needed} more",
                s.max_origins
            ),
        )
        .fix("run pgferry check as a superuser to check it");
    };
    let usage = format!(
        "{setting} is {} and {} in use",
        s.max_origins,
        plural(in_use, "replication origin is", "replication origins are")
    );
    if s.max_origins - in_use < needed {
        return Finding::problem(
            place,
            "replication_origins",
            setting.clone(),
            format!(
                "no room for the node's replication origins {}: {usage}, and apply needs {} more (one per node whose changes it applies)",
                n.origins_without_progress.join(", "),
                needed
            ),
        )
        .fix(format!(
            "ALTER SYSTEM SET {setting} = {}; then restart PostgreSQL, or drop origins nothing uses (SELECT pg_replication_origin_drop(external_id) FROM pg_replication_origin_status WHERE …)",
            in_use + needed + 1
        ));
    }
    Finding::ok(
        place,
        "replication_origins",
        setting.clone(),
        format!("room for the node's replication origins: {usage}"),
    )
}

/// A free WAL sender for capture's replication stream (unless capture streams already).
pub fn wal_senders(place: &Place, s: &ServerFacts, n: &NodeNeeds) -> Finding {
    let usage = format!(
        "max_wal_senders is {} and {} running",
        s.max_wal_senders,
        plural(s.wal_senders_in_use, "WAL sender is", "WAL senders are")
    );
    let needed = i64::from(!n.slot_active);
    if s.max_wal_senders - s.wal_senders_in_use < needed {
        return Finding::problem(
            place,
            "wal_senders",
            "max_wal_senders",
            format!("no free WAL sender for capture's replication stream: {usage}"),
        )
        .fix(format!(
            "ALTER SYSTEM SET max_wal_senders = {}; then restart PostgreSQL",
            (s.wal_senders_in_use + needed + 1).max(10)
        ));
    }
    let what = if n.slot_active {
        "capture streams already"
    } else {
        "a WAL sender is free for capture's replication stream"
    };
    Finding::ok(place, "wal_senders", "max_wal_senders", format!("{what}: {usage}"))
}

/// Room for the sessions (backend processes) pgferry's services open on the node.
pub fn connections(place: &Place, s: &ServerFacts, n: &NodeNeeds) -> Finding {
    let needed = (n.sessions - n.sessions_open).max(0);
    let available = s.max_connections - s.reserved_connections - s.connections_in_use;
    let reserved = if s.reserved_connections > 0 {
        format!(", {} reserved for superusers", s.reserved_connections)
    } else {
        String::new()
    };
    let usage = format!(
        "max_connections is {}{reserved}, {} connected",
        s.max_connections,
        plural(s.connections_in_use, "session", "sessions")
    );
    if needed > 0 && available < needed {
        return Finding::problem(
            place,
            "connections",
            "max_connections",
            format!(
                "not enough connections for pgferry: `pgferry run` of the node opens {} (capture 3; apply 2, plus 1 per node it applies, 2 with [apply] read_ahead){}, {usage}",
                n.sessions,
                if n.sessions_open > 0 {
                    format!(", {} of them open now", n.sessions_open)
                } else {
                    String::new()
                }
            ),
        )
        .fix(format!(
            "ALTER SYSTEM SET max_connections = {}; then restart PostgreSQL",
            s.connections_in_use + s.reserved_connections + needed + 10
        ));
    }
    Finding::ok(
        place,
        "connections",
        "max_connections",
        format!("room for pgferry's {} sessions: {usage}", n.sessions),
    )
}

/// A replicated table as the node has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFacts {
    pub schema: String,
    pub table: String,
    /// `pg_class.relkind`; `None` when there is no relation of that name.
    pub kind: Option<String>,
    pub has_primary_key: bool,
    /// `pg_class.relreplident`: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: String,
    /// Its `delta_columns` in the config.
    pub delta_columns: Vec<String>,
    /// Its columns whose values PostgreSQL may store out of line (TOAST: variable length,
    /// storage `extended` or `external`), in column order.
    pub toast_columns: Vec<String>,
    /// Whether the session's role owns it (or is a member of its owner).
    pub owned: bool,
    /// Of SELECT, INSERT, UPDATE, DELETE, TRUNCATE: those the role lacks.
    pub missing_privileges: Vec<String>,
}

impl TableFacts {
    fn name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    fn is_table(&self) -> bool {
        matches!(self.kind.as_deref(), Some("r" | "p"))
    }
}

/// Every replicated table exists, is a table and has a primary key.
pub fn primary_keys(place: &Place, tables: &[TableFacts]) -> Vec<Finding> {
    let mut out = Vec::new();
    for t in tables {
        let name = t.name();
        if t.kind.is_none() {
            out.push(
                Finding::problem(place, "tables", name.clone(), format!("replicated table {name} does not exist"))
                    .fix("create it (with a primary key; empty on a node that has no data yet), or remove it from replication.tables"),
            );
        } else if !t.is_table() {
            out.push(
                Finding::problem(
                    place,
                    "tables",
                    name.clone(),
                    format!("replicated {name} is not a table"),
                )
                .fix("replicate tables only: remove it from replication.tables"),
            );
        } else if !t.has_primary_key {
            out.push(
                Finding::problem(
                    place,
                    "primary_key",
                    name.clone(),
                    format!("table {name} has no primary key; pgferry needs one to find rows on the other nodes"),
                )
                .fix(format!(
                    "ALTER TABLE {name} ADD PRIMARY KEY (…), or remove it from replication.tables"
                )),
            );
        }
    }
    if out.is_empty() {
        out.push(Finding::ok(
            place,
            "primary_key",
            "replication.tables",
            if tables.is_empty() {
                "no replicated table on this node yet".to_string()
            } else {
                format!(
                    "{}, each with a primary key",
                    plural(tables.len() as i64, "replicated table", "replicated tables")
                )
            },
        ));
    }
    out
}

/// `REPLICA IDENTITY FULL` on every table with delta columns (updates must carry the old
/// values the deltas are computed from): a problem. And on every table with columns that can be
/// stored out of line (TOAST): a warning — without it an update that leaves such a value
/// unchanged does not carry it, apply keeps the local value, and concurrent updates of a row
/// on two nodes can leave nodes with different values (issue 16, scenario 5).
pub fn replica_identity(place: &Place, tables: &[TableFacts]) -> Vec<Finding> {
    let mut out = delta_replica_identity(place, tables);
    for t in tables.iter().filter(|t| t.is_table() && t.delta_columns.is_empty() && !t.toast_columns.is_empty()) {
        if t.replica_identity == "f" {
            continue;
        }
        let name = t.name();
        out.push(
            Finding::warning(
                place,
                "replica_identity",
                name.clone(),
                format!(
                    "table {name} has columns that can be stored out of line (TOAST) {:?} and REPLICA IDENTITY {}, so an update that leaves such a value unchanged does not carry it: when two nodes update a row concurrently, nodes can keep different values",
                    t.toast_columns,
                    identity_name(&t.replica_identity)
                ),
            )
            .fix(format!(
                "ALTER TABLE {name} REPLICA IDENTITY FULL (not needed if only one node ever updates a row)"
            )),
        );
    }
    out
}

/// `REPLICA IDENTITY` as SQL spells it, from `pg_class.relreplident`.
fn identity_name(code: &str) -> &str {
    match code {
        "d" => "DEFAULT",
        "n" => "NOTHING",
        "i" => "USING INDEX",
        "f" => "FULL",
        other => other,
    }
}

/// The delta-column half of [`replica_identity`].
fn delta_replica_identity(place: &Place, tables: &[TableFacts]) -> Vec<Finding> {
    let delta: Vec<&TableFacts> = tables
        .iter()
        .filter(|t| !t.delta_columns.is_empty() && t.is_table())
        .collect();
    let mut out = Vec::new();
    for t in &delta {
        if t.replica_identity != "f" {
            let name = t.name();
            let ident = identity_name(&t.replica_identity);
            out.push(
                Finding::problem(
                    place,
                    "replica_identity",
                    name.clone(),
                    format!(
                        "table {name} has delta_columns {:?} but REPLICA IDENTITY {ident}, so updates do not carry the old values the deltas need",
                        t.delta_columns
                    ),
                )
                .fix(format!("ALTER TABLE {name} REPLICA IDENTITY FULL")),
            );
        }
    }
    if out.is_empty() && !delta.is_empty() {
        out.push(Finding::ok(
            place,
            "replica_identity",
            "delta_columns",
            format!(
                "{} with delta columns, REPLICA IDENTITY FULL",
                plural(delta.len() as i64, "table", "tables")
            ),
        ));
    }
    out
}

/// The role pgferry connects as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleFacts {
    pub name: String,
    /// The node's database.
    pub database: String,
    pub superuser: bool,
    /// `REPLICATION` attribute.
    pub replication: bool,
    /// Why `SET session_replication_role = replica` failed, if it did.
    pub replica_role_refused: Option<String>,
    /// Functions pgferry calls that the role may not execute (`name(argument types)`).
    pub functions_denied: Vec<String>,
    /// `CREATE` on the database (init creates schema `pgferry` and the publication).
    pub create_on_database: bool,
}

/// The functions pgferry calls that PostgreSQL does not grant to every role.
pub const FUNCTIONS: &[&str] = &[
    "pg_replication_origin_create(text)",
    "pg_replication_origin_drop(text)",
    "pg_replication_origin_session_setup(text)",
    "pg_replication_origin_session_reset()",
    "pg_replication_origin_session_is_setup()",
    "pg_replication_origin_xact_setup(pg_lsn, timestamp with time zone)",
    "pg_replication_origin_advance(text, pg_lsn)",
    "pg_replication_origin_progress(text, boolean)",
    "pg_logical_emit_message(boolean, text, text)",
    "pg_logical_emit_message(boolean, text, bytea)",
];

/// What the role may do: a superuser may do everything; any other role needs `REPLICATION`,
/// `SET` on `session_replication_role`, the replication-origin functions, `CREATE` on the
/// database, and to own the replicated tables and hold every privilege on them. `DDL`
/// replication and schemas replicated whole need a superuser (event triggers; publications
/// `FOR TABLES IN SCHEMA`): `needs_superuser` names the key that asks for them.
pub fn privileges(
    place: &Place,
    role: &RoleFacts,
    tables: &[TableFacts],
    needs_superuser: Option<&str>,
) -> Vec<Finding> {
    let r = &role.name;
    if role.superuser {
        return vec![Finding::ok(
            place,
            "privileges",
            r.clone(),
            format!("role {r} is a superuser"),
        )];
    }
    let mut out = Vec::new();
    if let Some(key) = needs_superuser {
        out.push(
            Finding::problem(
                place,
                "privileges",
                r.clone(),
                format!(
                    "{key} needs a superuser (init installs event triggers and publishes schemas whole, which PostgreSQL allows superusers only), and role {r} is not one"
                ),
            )
            .fix(format!("ALTER ROLE {r} SUPERUSER, or turn {key} off")),
        );
    }
    if !role.replication {
        out.push(
            Finding::problem(
                place,
                "privileges",
                r.clone(),
                format!("role {r} has neither REPLICATION nor SUPERUSER; capture's replication stream and init's slot need it"),
            )
            .fix(format!("ALTER ROLE {r} REPLICATION")),
        );
    }
    if let Some(why) = &role.replica_role_refused {
        out.push(
            Finding::problem(
                place,
                "privileges",
                "session_replication_role",
                format!(
                    "role {r} may not set session_replication_role (apply writes as a replica, so users' triggers and foreign-key actions do not fire again on applied rows): {why}"
                ),
            )
            .fix(format!("GRANT SET ON PARAMETER session_replication_role TO {r}")),
        );
    }
    if !role.functions_denied.is_empty() {
        let list = role.functions_denied.join(", ");
        out.push(
            Finding::problem(
                place,
                "privileges",
                list.clone(),
                format!("role {r} may not execute {list}, which apply and init call (replication origins)"),
            )
            .fix(format!("GRANT EXECUTE ON FUNCTION {list} TO {r}")),
        );
    }
    if !role.create_on_database {
        let db = &role.database;
        out.push(
            Finding::problem(
                place,
                "privileges",
                format!("database {db}"),
                format!("role {r} has no CREATE privilege on database {db} (init creates schema pgferry and the publication)"),
            )
            .fix(format!("GRANT CREATE ON DATABASE \"{db}\" TO {r}")),
        );
    }
    let present: Vec<&TableFacts> = tables.iter().filter(|t| t.is_table()).collect();
    let not_owned: Vec<String> = present.iter().filter(|t| !t.owned).map(|t| t.name()).collect();
    if !not_owned.is_empty() {
        let list = not_owned.join(", ");
        out.push(
            Finding::problem(
                place,
                "privileges",
                list.clone(),
                format!(
                    "role {r} does not own {} {list} (publishing a table and enabling its tombstone trigger take its owner)",
                    if not_owned.len() == 1 { "table" } else { "tables" }
                ),
            )
            .fix(
                not_owned
                    .iter()
                    .map(|t| format!("ALTER TABLE {t} OWNER TO {r}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        );
    }
    for t in present.iter().filter(|t| !t.missing_privileges.is_empty()) {
        let name = t.name();
        let list = t.missing_privileges.join(", ");
        out.push(
            Finding::problem(
                place,
                "privileges",
                name.clone(),
                format!("role {r} lacks {list} on table {name} (apply writes every change, truncates included)"),
            )
            .fix(format!("GRANT {list} ON {name} TO {r}")),
        );
    }
    if out.is_empty() {
        out.push(Finding::ok(
            place,
            "privileges",
            r.clone(),
            format!("role {r} (not a superuser) has every privilege pgferry needs"),
        ));
    }
    out
}

/// What `pgferry check` needs to know about the cluster's topics: each name and the
/// partitions the config needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicNeed {
    pub name: String,
    pub partitions: i32,
    /// Where the number comes from (`kafka.partitions`).
    pub why: String,
}

/// What the config asks of Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaNeeds {
    pub bootstrap: String,
    pub topics: Vec<TopicNeed>,
    /// `kafka.replication_factor` (of the topics init creates).
    pub replication_factor: i32,
    /// `kafka.retention_ms`.
    pub retention_ms: Option<i64>,
    /// The capture producer's `message.max.bytes` (`[kafka.properties]` or pgferry's default):
    /// the largest event capture sends, which each topic's `max.message.bytes` should allow.
    pub message_max_bytes: u64,
}

/// Whether a transactional producer cannot work, judged from the metadata alone (the
/// transaction state topic is missing and cannot be created): the problem; then there is no
/// point in trying one (it would time out).
pub fn transactions_impossible(place: &Place, d: &ClusterDescription) -> Option<Finding> {
    if d.topics.contains_key(TRANSACTION_STATE_TOPIC) {
        return None;
    }
    let factor: usize = d
        .broker_config
        .get("transaction.state.log.replication.factor")?
        .parse()
        .ok()?;
    (factor > d.brokers.len()).then(|| {
        Finding::problem(
            place,
            "transactions",
            "transaction.state.log.replication.factor",
            format!(
                "transactions are not available: the transaction state topic {TRANSACTION_STATE_TOPIC} does not exist and cannot be created: the brokers' transaction.state.log.replication.factor is {factor} but the cluster has {}",
                plural(d.brokers.len() as i64, "broker", "brokers")
            ),
        )
        .fix(format!(
            "set transaction.state.log.replication.factor and transaction.state.log.min.isr to at most {} in the brokers' configuration and restart them, or add brokers",
            d.brokers.len()
        ))
    })
}

/// Transactions (capture produces inside Kafka transactions): `probe` is the outcome of
/// initializing a transactional producer, when one was tried.
pub fn transactions(place: &Place, d: &ClusterDescription, probe: Option<&Result<(), String>>) -> Finding {
    if let Some(impossible) = transactions_impossible(place, d) {
        return impossible;
    }
    if let Some(t) = d.topics.get(TRANSACTION_STATE_TOPIC) {
        if let Some(isr) = min_isr(t).filter(|isr| *isr > t.replication_factor) {
            return Finding::problem(
                place,
                "transactions",
                TRANSACTION_STATE_TOPIC,
                format!(
                    "transactions cannot commit: {TRANSACTION_STATE_TOPIC} has min.insync.replicas={isr} but replication factor {}",
                    t.replication_factor
                ),
            )
            .fix(format!(
                "kafka-configs.sh --alter --entity-type topics --entity-name {TRANSACTION_STATE_TOPIC} --add-config min.insync.replicas={}",
                t.replication_factor
            ));
        }
    }
    match probe {
        Some(Ok(())) => Finding::ok(place, "transactions", "transactions", "a transactional producer initializes"),
        Some(Err(e)) => Finding::problem(
            place,
            "transactions",
            "transactions",
            format!("transactions are not available: initializing a transactional producer failed: {e}"),
        )
        .fix("let pgferry's user use transactions (ACLs on transactional ids pgferry-<cluster>-*, IdempotentWrite), and check the brokers' transaction.* settings and logs"),
        None => Finding::unchecked(place, "transactions", "transactions", "no transactional producer was tried"),
    }
}

fn min_isr(t: &TopicDescription) -> Option<usize> {
    t.config.get("min.insync.replicas")?.parse().ok()
}

/// `retention.ms` as a duration for people (`7 days`, `1 h`, `forever`).
fn retention_text(ms: i64) -> String {
    match ms {
        ms if ms < 0 => "forever".to_string(),
        ms if ms % 86_400_000 == 0 => plural(ms / 86_400_000, "day", "days"),
        ms if ms % 3_600_000 == 0 => format!("{} h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{} min", ms / 60_000),
        ms => format!("{ms} ms"),
    }
}

/// The cluster's topics: partitions, cleanup policy, retention, `min.insync.replicas` against
/// the replication factor; for topics not there yet, whether init can create them as the
/// config says.
pub fn topics(place: &Place, needs: &KafkaNeeds, d: &ClusterDescription) -> Vec<Finding> {
    let mut out = Vec::new();
    let alter = |topic: &str, config: &str| {
        format!(
            "kafka-configs.sh --bootstrap-server {} --alter --entity-type topics --entity-name {topic} --add-config {config}",
            needs.bootstrap
        )
    };
    let missing: Vec<&TopicNeed> = needs
        .topics
        .iter()
        .filter(|t| !d.topics.contains_key(&t.name))
        .collect();
    if !missing.is_empty() {
        let names = missing.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ");
        let brokers = d.brokers.len() as i64;
        let broker_isr: Option<i64> = d.broker_config.get("min.insync.replicas").and_then(|v| v.parse().ok());
        if i64::from(needs.replication_factor) > brokers {
            out.push(
                Finding::problem(
                    place,
                    "replication_factor",
                    "kafka.replication_factor",
                    format!(
                        "kafka.replication_factor is {} but the cluster has {}: init cannot create {names}",
                        needs.replication_factor,
                        plural(brokers, "broker", "brokers")
                    ),
                )
                .fix(format!(
                    "set kafka.replication_factor to at most {brokers}, or add brokers"
                )),
            );
        } else if let Some(isr) = broker_isr.filter(|isr| *isr > i64::from(needs.replication_factor)) {
            out.push(
                Finding::problem(
                    place,
                    "min_insync_replicas",
                    "kafka.replication_factor",
                    format!(
                        "the brokers' min.insync.replicas is {isr} but kafka.replication_factor is {}: the topics init creates ({names}) would refuse every write of capture (acks=all)",
                        needs.replication_factor
                    ),
                )
                .fix(format!(
                    "set kafka.replication_factor to at least {isr}, or the brokers' min.insync.replicas to at most {}",
                    needs.replication_factor
                )),
            );
        } else {
            out.push(Finding::ok(
                place,
                "topic_partitions",
                names.clone(),
                format!(
                    "{names}: not there yet; init creates them (replication factor {})",
                    needs.replication_factor
                ),
            ));
        }
    }
    for need in needs.topics.iter().filter(|t| d.topics.contains_key(&t.name)) {
        let Some(t) = d.topics.get(&need.name) else { continue };
        let name = need.name.as_str();
        let before = out.len();
        if (t.partitions as i64) < i64::from(need.partitions) {
            out.push(
                Finding::problem(
                    place,
                    "topic_partitions",
                    name,
                    format!(
                        "topic {name} has {}; the config needs at least {} ({})",
                        plural(t.partitions as i64, "partition", "partitions"),
                        need.partitions,
                        need.why
                    ),
                )
                .fix(format!(
                    "kafka-topics.sh --bootstrap-server {} --alter --topic {name} --partitions {}",
                    needs.bootstrap, need.partitions
                )),
            );
        }
        let policy = t.config.get("cleanup.policy").map(String::as_str).unwrap_or("delete");
        if policy.contains("compact") {
            out.push(
                Finding::problem(
                    place,
                    "topic_retention",
                    name,
                    format!(
                        "topic {name} has cleanup.policy={policy}: compaction keeps only the last message of each key, so nodes would miss changes and transactions would lose rows"
                    ),
                )
                .fix(alter(name, "cleanup.policy=delete")),
            );
        }
        let retention: Option<i64> = t.config.get("retention.ms").and_then(|v| v.parse().ok());
        if let (Some(want), Some(have)) = (needs.retention_ms, retention) {
            let short = match (want, have) {
                (_, -1) => false,
                (-1, _) => true,
                (want, have) => have < want,
            };
            if short {
                out.push(
                    Finding::problem(
                        place,
                        "topic_retention",
                        name,
                        format!(
                            "topic {name} keeps messages {} (retention.ms={have}), less than kafka.retention_ms ({}): a node down longer than that could not catch up",
                            retention_text(have),
                            retention_text(want)
                        ),
                    )
                    .fix(alter(name, &format!("retention.ms={want}"))),
                );
            }
        }
        let max_message: Option<u64> = t.config.get("max.message.bytes").and_then(|v| v.parse().ok());
        if let Some(have) = max_message.filter(|have| *have < needs.message_max_bytes) {
            out.push(
                Finding::warning(
                    place,
                    "topic_message_size",
                    name,
                    format!(
                        "topic {name} accepts messages (batches) up to {have} bytes (max.message.bytes), less than the {} bytes capture's producer sends (message.max.bytes): an event between the two stops capture until the topic's limit is raised",
                        needs.message_max_bytes
                    ),
                )
                .fix(alter(name, &format!("max.message.bytes={}", needs.message_max_bytes))),
            );
        }
        let bytes: Option<i64> = t.config.get("retention.bytes").and_then(|v| v.parse().ok());
        if let Some(b) = bytes.filter(|b| *b >= 0) {
            out.push(
                Finding::warning(
                    place,
                    "topic_retention",
                    name,
                    format!(
                        "topic {name} also deletes by size (retention.bytes={b} per partition): a busy spell can delete messages a node has not applied, whatever retention.ms says"
                    ),
                )
                .fix(alter(name, "retention.bytes=-1")),
            );
        }
        match min_isr(t) {
            Some(isr) if isr > t.replication_factor => out.push(
                Finding::problem(
                    place,
                    "min_insync_replicas",
                    name,
                    format!(
                        "topic {name} has min.insync.replicas={isr} but replication factor {}: every write with acks=all (capture's) is refused with NOT_ENOUGH_REPLICAS",
                        t.replication_factor
                    ),
                )
                .fix(alter(name, &format!("min.insync.replicas={}", t.replication_factor))),
            ),
            Some(isr) if isr == t.replication_factor && isr > 1 => out.push(
                Finding::warning(
                    place,
                    "min_insync_replicas",
                    name,
                    format!(
                        "topic {name} has min.insync.replicas={isr} equal to its replication factor: one broker down stops capture"
                    ),
                )
                .fix(alter(name, &format!("min.insync.replicas={}", isr - 1))),
            ),
            _ => {}
        }
        if out.len() == before {
            out.push(Finding::ok(
                place,
                "topic_partitions",
                name,
                format!(
                    "topic {name}: {}, replication factor {}, min.insync.replicas {}, retention {}",
                    plural(t.partitions as i64, "partition", "partitions"),
                    t.replication_factor,
                    min_isr(t).map_or("-".to_string(), |v| v.to_string()),
                    retention.map_or("-".to_string(), retention_text)
                ),
            ));
        }
    }
    out
}

/// The compatibility levels that matter: the registry's global one and those of this
/// cluster's subjects (`subject → level`, as the registry answers for each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryFacts {
    pub global: String,
    pub subjects: BTreeMap<String, String>,
}

/// Compatibility `NONE` (globally and on this cluster's subjects): any other level lets the
/// registry refuse a schema version that ordinary DDL makes (a `NOT NULL` column added, a
/// column's type changed, a `NOT NULL` column dropped), and capture then stops at that table's
/// next change until the level is changed. A warning: nothing fails until such DDL happens.
pub fn compatibility(place: &Place, r: &RegistryFacts) -> Vec<Finding> {
    let why = "the registry then refuses the new schema version of a table after some DDL (a NOT NULL column added or dropped, a column type changed), and capture stops at that table's next change";
    let mut out = Vec::new();
    if r.global != "NONE" {
        out.push(
            Finding::warning(
                place,
                "compatibility",
                "global compatibility",
                format!("the global compatibility level is {}, not NONE: {why}", r.global),
            )
            .fix("curl -X PUT -H 'Content-Type: application/json' -d '{\"compatibility\": \"NONE\"}' <registry.url>/config (or set NONE on pgferry's subjects alone: PUT <registry.url>/config/<subject>)"),
        );
    }
    let own: Vec<(&String, &String)> = r
        .subjects
        .iter()
        .filter(|(_, level)| **level != "NONE" && **level != r.global)
        .collect();
    for (subject, level) in &own {
        out.push(
            Finding::warning(
                place,
                "compatibility",
                (*subject).clone(),
                format!("subject {subject} has compatibility level {level}, not NONE: {why}"),
            )
            .fix(format!(
                "curl -X PUT -H 'Content-Type: application/json' -d '{{\"compatibility\": \"NONE\"}}' <registry.url>/config/{subject}"
            )),
        );
    }
    if out.is_empty() {
        out.push(Finding::ok(
            place,
            "compatibility",
            "global compatibility",
            format!(
                "compatibility level {} ({} of this cluster, none with a level of its own)",
                r.global,
                plural(r.subjects.len() as i64, "subject", "subjects")
            ),
        ));
    }
    out
}

/// `"1 slot is"`, `"3 slots are"`.
fn plural(n: i64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Place {
        Place::Node {
            name: "n1".into(),
            endpoint: "db1:5432/app".into(),
        }
    }

    fn server() -> ServerFacts {
        ServerFacts {
            version_num: 150008,
            version: "15.8 (Debian 15.8-0+deb12u1)".into(),
            wal_level: "logical".into(),
            track_commit_timestamp: "on".into(),
            max_replication_slots: 10,
            slots_in_use: 2,
            origins_setting: "max_replication_slots".into(),
            max_origins: 10,
            origins_in_use: Some(1),
            max_wal_senders: 10,
            wal_senders_in_use: 1,
            max_connections: 100,
            reserved_connections: 0,
            connections_in_use: 5,
        }
    }

    fn needs() -> NodeNeeds {
        NodeNeeds {
            slot: "pgferry_prod_n1".into(),
            slot_exists: false,
            slot_active: false,
            origins_without_progress: vec!["pgferry_prod_n1_from_n2".into(), "pgferry_prod_n1_from_n3".into()],
            sessions: 7,
            sessions_open: 0,
        }
    }

    fn severities(findings: &[Finding]) -> Vec<Severity> {
        findings.iter().map(|f| f.severity).collect()
    }

    #[test]
    fn supported_versions_are_15_to_17() {
        let at = |num: i32, text: &str| {
            server_version(
                &node(),
                &ServerFacts {
                    version_num: num,
                    version: text.into(),
                    ..server()
                },
            )
        };
        let old = at(140011, "14.11");
        assert_eq!(old.severity, Severity::Problem);
        assert_eq!(
            old.line(),
            "PROBLEM   node n1 (db1:5432/app): PostgreSQL 14.11 is older than 15, the oldest pgferry runs on (it needs publication row filters and column lists, and GRANT SET ON PARAMETER). Fix: upgrade the server to PostgreSQL 15–17"
        );
        assert_eq!(at(150008, "15.8 (Debian 15.8-0+deb12u1)").message, "PostgreSQL 15.8");
        assert_eq!(at(170002, "17.2").severity, Severity::Ok);
        let new = at(180000, "18.0");
        assert_eq!(new.severity, Severity::Warning);
        assert_eq!(
            new.message,
            "PostgreSQL 18.0 is newer than 17, the newest pgferry is known to run on: untested"
        );
    }

    #[test]
    fn wal_level_and_commit_timestamps() {
        assert_eq!(severities(&settings(&node(), &server())), [Severity::Ok, Severity::Ok]);
        let bad = settings(
            &node(),
            &ServerFacts {
                wal_level: "replica".into(),
                track_commit_timestamp: "off".into(),
                ..server()
            },
        );
        assert_eq!(
            bad[0].line(),
            "PROBLEM   node n1 (db1:5432/app): wal_level is replica; pgferry needs logical (capture decodes the node's changes from the WAL). Fix: ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
        );
        assert_eq!(bad[1].object, "track_commit_timestamp");
        assert_eq!(
            bad[1].fix.as_deref(),
            Some("ALTER SYSTEM SET track_commit_timestamp = on; then restart PostgreSQL")
        );
    }

    #[test]
    fn slots_count_the_node_slot_and_a_spare() {
        let f = replication_slots(&node(), &server(), &needs());
        assert_eq!(f.severity, Severity::Ok);
        assert_eq!(
            f.message,
            "room for slot pgferry_prod_n1 (init creates it); max_replication_slots is 10 and 2 slots are in use"
        );
        let full = ServerFacts {
            max_replication_slots: 2,
            ..server()
        };
        let f = replication_slots(&node(), &full, &needs());
        assert_eq!(f.severity, Severity::Problem);
        assert_eq!(
            f.message,
            "no free replication slot for the node's slot pgferry_prod_n1: max_replication_slots is 2 and 2 slots are in use"
        );
        assert!(f
            .fix
            .as_deref()
            .unwrap_or_default()
            .starts_with("ALTER SYSTEM SET max_replication_slots = 4;"));
        // The node's own slot exists: no new one needed, but none to spare.
        let exists = NodeNeeds {
            slot_exists: true,
            ..needs()
        };
        assert_eq!(replication_slots(&node(), &full, &exists).severity, Severity::Warning);
        let three = ServerFacts {
            max_replication_slots: 3,
            ..server()
        };
        assert_eq!(replication_slots(&node(), &three, &needs()).severity, Severity::Warning);
        assert_eq!(replication_slots(&node(), &three, &exists).severity, Severity::Ok);
    }

    #[test]
    fn origins_need_progress_slots() {
        assert_eq!(replication_origins(&node(), &server(), &needs()).severity, Severity::Ok);
        let full = ServerFacts {
            max_origins: 2,
            ..server()
        };
        let f = replication_origins(&node(), &full, &needs());
        assert_eq!(f.severity, Severity::Problem);
        assert_eq!(
            f.message,
            "no room for the node's replication origins pgferry_prod_n1_from_n2, pgferry_prod_n1_from_n3: max_replication_slots is 2 and 1 replication origin is in use, and apply needs 2 more (one per node whose changes it applies)"
        );
        let hidden = ServerFacts {
            origins_in_use: None,
            ..server()
        };
        assert_eq!(
            replication_origins(&node(), &hidden, &needs()).severity,
            Severity::Warning
        );
        let none_needed = NodeNeeds {
            origins_without_progress: vec![],
            ..needs()
        };
        assert_eq!(
            replication_origins(
                &node(),
                &ServerFacts {
                    max_origins: 1,
                    ..server()
                },
                &none_needed
            )
            .severity,
            Severity::Ok
        );
    }

    #[test]
    fn wal_senders_needed_unless_capture_streams() {
        assert_eq!(wal_senders(&node(), &server(), &needs()).severity, Severity::Ok);
        let none = ServerFacts {
            max_wal_senders: 0,
            wal_senders_in_use: 0,
            ..server()
        };
        let f = wal_senders(&node(), &none, &needs());
        assert_eq!(
            f.line(),
            "PROBLEM   node n1 (db1:5432/app): no free WAL sender for capture's replication stream: max_wal_senders is 0 and 0 WAL senders are running. Fix: ALTER SYSTEM SET max_wal_senders = 10; then restart PostgreSQL"
        );
        let busy = ServerFacts {
            max_wal_senders: 1,
            wal_senders_in_use: 1,
            ..server()
        };
        let streaming = NodeNeeds {
            slot_exists: true,
            slot_active: true,
            ..needs()
        };
        assert_eq!(wal_senders(&node(), &busy, &streaming).severity, Severity::Ok);
        assert_eq!(wal_senders(&node(), &busy, &needs()).severity, Severity::Problem);
    }

    #[test]
    fn connections_leave_room_for_every_session() {
        assert_eq!(connections(&node(), &server(), &needs()).severity, Severity::Ok);
        let tight = ServerFacts {
            max_connections: 10,
            reserved_connections: 3,
            connections_in_use: 1,
            ..server()
        };
        let f = connections(&node(), &tight, &needs());
        assert_eq!(f.severity, Severity::Problem);
        assert_eq!(
            f.message,
            "not enough connections for pgferry: `pgferry run` of the node opens 7 (capture 3; apply 2, plus 1 per node it applies, 2 with [apply] read_ahead), max_connections is 10, 3 reserved for superusers, 1 session connected"
        );
        // pgferry runs already: its own sessions are among those connected.
        let running = NodeNeeds {
            sessions_open: 7,
            ..needs()
        };
        assert_eq!(
            connections(
                &node(),
                &ServerFacts {
                    connections_in_use: 8,
                    ..tight
                },
                &running
            )
            .severity,
            Severity::Ok
        );
    }

    fn table(name: &str) -> TableFacts {
        TableFacts {
            schema: "public".into(),
            table: name.into(),
            kind: Some("r".into()),
            has_primary_key: true,
            replica_identity: "d".into(),
            delta_columns: vec![],
            toast_columns: vec![],
            owned: true,
            missing_privileges: vec![],
        }
    }

    #[test]
    fn tables_with_toast_columns_are_warned_about_without_replica_identity_full() {
        let doc = TableFacts {
            toast_columns: vec!["body".into()],
            ..table("doc")
        };
        let f = replica_identity(&node(), std::slice::from_ref(&doc));
        assert_eq!(severities(&f), [Severity::Warning]);
        assert_eq!(
            f[0].line(),
            "WARNING   node n1 (db1:5432/app): table public.doc has columns that can be stored out of line (TOAST) [\"body\"] and REPLICA IDENTITY DEFAULT, so an update that leaves such a value unchanged does not carry it: when two nodes update a row concurrently, nodes can keep different values. Fix: ALTER TABLE public.doc REPLICA IDENTITY FULL (not needed if only one node ever updates a row)"
        );
        let full = TableFacts {
            replica_identity: "f".into(),
            ..doc.clone()
        };
        assert!(replica_identity(&node(), &[full]).is_empty());
        // A delta table without FULL is a problem already; no second finding.
        let delta = TableFacts {
            delta_columns: vec!["n".into()],
            ..doc
        };
        assert_eq!(severities(&replica_identity(&node(), &[delta])), [Severity::Problem]);
    }

    #[test]
    fn tables_exist_with_primary_keys() {
        let ok = primary_keys(&node(), &[table("a"), table("b")]);
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].message, "2 replicated tables, each with a primary key");
        let bad = primary_keys(
            &node(),
            &[
                TableFacts {
                    kind: None,
                    ..table("gone")
                },
                TableFacts {
                    has_primary_key: false,
                    ..table("nokey")
                },
                TableFacts {
                    kind: Some("v".into()),
                    ..table("view")
                },
            ],
        );
        assert_eq!(severities(&bad), [Severity::Problem; 3]);
        assert_eq!(bad[0].message, "replicated table public.gone does not exist");
        assert_eq!(
            bad[1].line(),
            "PROBLEM   node n1 (db1:5432/app): table public.nokey has no primary key; pgferry needs one to find rows on the other nodes. Fix: ALTER TABLE public.nokey ADD PRIMARY KEY (…), or remove it from replication.tables"
        );
        assert_eq!(bad[2].message, "replicated public.view is not a table");
    }

    #[test]
    fn delta_tables_need_replica_identity_full() {
        assert!(replica_identity(&node(), &[table("a")]).is_empty());
        let delta = TableFacts {
            delta_columns: vec!["balance".into()],
            ..table("accounts")
        };
        let f = replica_identity(&node(), std::slice::from_ref(&delta));
        assert_eq!(
            f[0].line(),
            "PROBLEM   node n1 (db1:5432/app): table public.accounts has delta_columns [\"balance\"] but REPLICA IDENTITY DEFAULT, so updates do not carry the old values the deltas need. Fix: ALTER TABLE public.accounts REPLICA IDENTITY FULL"
        );
        let full = TableFacts {
            replica_identity: "f".into(),
            ..delta
        };
        assert_eq!(severities(&replica_identity(&node(), &[full])), [Severity::Ok]);
    }

    fn role() -> RoleFacts {
        RoleFacts {
            name: "pgferry".into(),
            database: "app".into(),
            superuser: false,
            replication: true,
            replica_role_refused: None,
            functions_denied: vec![],
            create_on_database: true,
        }
    }

    #[test]
    fn privileges_of_a_role() {
        let su = RoleFacts {
            superuser: true,
            replication: false,
            ..role()
        };
        assert_eq!(
            privileges(&node(), &su, &[table("a")], Some("replication.ddl"))[0].message,
            "role pgferry is a superuser"
        );
        let granted = privileges(&node(), &role(), &[table("a")], None);
        assert_eq!(severities(&granted), [Severity::Ok]);
        let bare = RoleFacts {
            replication: false,
            replica_role_refused: Some("permission denied to set parameter \"session_replication_role\"".into()),
            functions_denied: vec!["pg_replication_origin_create(text)".into()],
            create_on_database: false,
            ..role()
        };
        let tables = [
            TableFacts {
                owned: false,
                missing_privileges: vec!["INSERT".into(), "TRUNCATE".into()],
                ..table("a")
            },
            TableFacts {
                kind: None,
                owned: false,
                ..table("gone")
            },
        ];
        let f = privileges(&node(), &bare, &tables, Some("replication.ddl"));
        let messages: Vec<&str> = f.iter().map(|f| f.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "replication.ddl needs a superuser (init installs event triggers and publishes schemas whole, which PostgreSQL allows superusers only), and role pgferry is not one",
                "role pgferry has neither REPLICATION nor SUPERUSER; capture's replication stream and init's slot need it",
                "role pgferry may not set session_replication_role (apply writes as a replica, so users' triggers and foreign-key actions do not fire again on applied rows): permission denied to set parameter \"session_replication_role\"",
                "role pgferry may not execute pg_replication_origin_create(text), which apply and init call (replication origins)",
                "role pgferry has no CREATE privilege on database app (init creates schema pgferry and the publication)",
                "role pgferry does not own table public.a (publishing a table and enabling its tombstone trigger take its owner)",
                "role pgferry lacks INSERT, TRUNCATE on table public.a (apply writes every change, truncates included)",
            ]
        );
        let fixes: Vec<&str> = f.iter().filter_map(|f| f.fix.as_deref()).collect();
        assert_eq!(fixes[1], "ALTER ROLE pgferry REPLICATION");
        assert_eq!(fixes[2], "GRANT SET ON PARAMETER session_replication_role TO pgferry");
        assert_eq!(
            fixes[3],
            "GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text) TO pgferry"
        );
        assert_eq!(fixes[6], "GRANT INSERT, TRUNCATE ON public.a TO pgferry");
    }

    fn kafka() -> Place {
        Place::Kafka {
            bootstrap: "k1:9092".into(),
        }
    }

    fn topic(partitions: usize, config: &[(&str, &str)]) -> TopicDescription {
        TopicDescription {
            partitions,
            replication_factor: 1,
            config: config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    fn cluster(brokers: usize, topics: &[(&str, TopicDescription)]) -> ClusterDescription {
        ClusterDescription {
            brokers: (1..=brokers as i32).collect(),
            broker_config: [
                ("min.insync.replicas", "1"),
                ("transaction.state.log.replication.factor", "1"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            topics: topics.iter().map(|(n, t)| (n.to_string(), t.clone())).collect(),
        }
    }

    fn kafka_needs() -> KafkaNeeds {
        KafkaNeeds {
            bootstrap: "k1:9092".into(),
            topics: vec![
                TopicNeed {
                    name: "prod.eu.changes".into(),
                    partitions: 3,
                    why: "kafka.partitions".into(),
                },
                TopicNeed {
                    name: "prod.dlq".into(),
                    partitions: 1,
                    why: "pgferry's dead-letter topic".into(),
                },
            ],
            replication_factor: 1,
            retention_ms: Some(604_800_000),
            message_max_bytes: 16_777_216,
        }
    }

    #[test]
    fn missing_topics_can_be_created() {
        let f = topics(&kafka(), &kafka_needs(), &cluster(1, &[]));
        assert_eq!(severities(&f), [Severity::Ok]);
        let f = topics(
            &kafka(),
            &KafkaNeeds {
                replication_factor: 3,
                ..kafka_needs()
            },
            &cluster(1, &[]),
        );
        assert_eq!(
            f[0].line(),
            "PROBLEM   Kafka at k1:9092: kafka.replication_factor is 3 but the cluster has 1 broker: init cannot create prod.eu.changes, prod.dlq. Fix: set kafka.replication_factor to at most 1, or add brokers"
        );
        let mut strict = cluster(3, &[]);
        strict.broker_config.insert("min.insync.replicas".into(), "2".into());
        let f = topics(&kafka(), &kafka_needs(), &strict);
        assert_eq!(f[0].check, "min_insync_replicas");
    }

    #[test]
    fn existing_topics_are_checked() {
        let good = topic(
            3,
            &[
                ("cleanup.policy", "delete"),
                ("retention.ms", "-1"),
                ("retention.bytes", "-1"),
                ("min.insync.replicas", "1"),
            ],
        );
        let f = topics(
            &kafka(),
            &kafka_needs(),
            &cluster(1, &[("prod.eu.changes", good.clone()), ("prod.dlq", topic(1, &[]))]),
        );
        assert_eq!(severities(&f), [Severity::Ok, Severity::Ok]);
        assert_eq!(
            f[0].message,
            "topic prod.eu.changes: 3 partitions, replication factor 1, min.insync.replicas 1, retention forever"
        );
        let bad = topic(
            1,
            &[
                ("cleanup.policy", "compact"),
                ("retention.ms", "3600000"),
                ("retention.bytes", "1073741824"),
                ("min.insync.replicas", "2"),
            ],
        );
        let f = topics(
            &kafka(),
            &kafka_needs(),
            &cluster(1, &[("prod.eu.changes", bad), ("prod.dlq", topic(1, &[]))]),
        );
        let lines: Vec<String> = f.iter().map(Finding::line).collect();
        assert_eq!(
            lines[..5],
            [
                "PROBLEM   Kafka at k1:9092: topic prod.eu.changes has 1 partition; the config needs at least 3 (kafka.partitions). Fix: kafka-topics.sh --bootstrap-server k1:9092 --alter --topic prod.eu.changes --partitions 3",
                "PROBLEM   Kafka at k1:9092: topic prod.eu.changes has cleanup.policy=compact: compaction keeps only the last message of each key, so nodes would miss changes and transactions would lose rows. Fix: kafka-configs.sh --bootstrap-server k1:9092 --alter --entity-type topics --entity-name prod.eu.changes --add-config cleanup.policy=delete",
                "PROBLEM   Kafka at k1:9092: topic prod.eu.changes keeps messages 1 h (retention.ms=3600000), less than kafka.retention_ms (7 days): a node down longer than that could not catch up. Fix: kafka-configs.sh --bootstrap-server k1:9092 --alter --entity-type topics --entity-name prod.eu.changes --add-config retention.ms=604800000",
                "WARNING   Kafka at k1:9092: topic prod.eu.changes also deletes by size (retention.bytes=1073741824 per partition): a busy spell can delete messages a node has not applied, whatever retention.ms says. Fix: kafka-configs.sh --bootstrap-server k1:9092 --alter --entity-type topics --entity-name prod.eu.changes --add-config retention.bytes=-1",
                "PROBLEM   Kafka at k1:9092: topic prod.eu.changes has min.insync.replicas=2 but replication factor 1: every write with acks=all (capture's) is refused with NOT_ENOUGH_REPLICAS. Fix: kafka-configs.sh --bootstrap-server k1:9092 --alter --entity-type topics --entity-name prod.eu.changes --add-config min.insync.replicas=1",
            ]
        );
        // Forever is never too short; anything is too short for forever.
        let forever = KafkaNeeds {
            retention_ms: Some(-1),
            ..kafka_needs()
        };
        let week = topic(3, &[("retention.ms", "604800000")]);
        let f = topics(
            &kafka(),
            &forever,
            &cluster(1, &[("prod.eu.changes", week), ("prod.dlq", topic(1, &[]))]),
        );
        assert_eq!(f[0].check, "topic_retention");
        assert_eq!(f[0].severity, Severity::Problem);
    }

    #[test]
    fn a_topic_should_take_what_capture_sends() {
        let small = topic(3, &[("max.message.bytes", "1048588")]);
        let f = topics(
            &kafka(),
            &kafka_needs(),
            &cluster(
                1,
                &[
                    ("prod.eu.changes", small),
                    ("prod.dlq", topic(1, &[("max.message.bytes", "16777216")])),
                ],
            ),
        );
        let sizes: Vec<String> = f
            .iter()
            .filter(|f| f.check == "topic_message_size")
            .map(|f| f.line())
            .collect();
        assert_eq!(
            sizes,
            ["WARNING   Kafka at k1:9092: topic prod.eu.changes accepts messages (batches) up to 1048588 bytes (max.message.bytes), less than the 16777216 bytes capture's producer sends (message.max.bytes): an event between the two stops capture until the topic's limit is raised. Fix: kafka-configs.sh --bootstrap-server k1:9092 --alter --entity-type topics --entity-name prod.eu.changes --add-config max.message.bytes=16777216"]
        );
    }

    #[test]
    fn transactions_need_their_state_topic() {
        let mut d = cluster(1, &[]);
        d.broker_config
            .insert("transaction.state.log.replication.factor".into(), "3".into());
        let f = transactions(&kafka(), &d, None);
        assert_eq!(
            f.line(),
            "PROBLEM   Kafka at k1:9092: transactions are not available: the transaction state topic __transaction_state does not exist and cannot be created: the brokers' transaction.state.log.replication.factor is 3 but the cluster has 1 broker. Fix: set transaction.state.log.replication.factor and transaction.state.log.min.isr to at most 1 in the brokers' configuration and restart them, or add brokers"
        );
        let d = cluster(1, &[]);
        assert!(transactions_impossible(&kafka(), &d).is_none());
        assert_eq!(transactions(&kafka(), &d, Some(&Ok(()))).severity, Severity::Ok);
        let refused = transactions(&kafka(), &d, Some(&Err("Transactional Id authorization failed".into())));
        assert_eq!(refused.severity, Severity::Problem);
        let d = cluster(
            1,
            &[(TRANSACTION_STATE_TOPIC, topic(1, &[("min.insync.replicas", "2")]))],
        );
        assert_eq!(transactions(&kafka(), &d, Some(&Ok(()))).severity, Severity::Problem);
    }

    #[test]
    fn compatibility_none_or_a_warning() {
        let place = Place::Registry {
            url: "http://r/apis/ccompat/v7".into(),
        };
        let none = RegistryFacts {
            global: "NONE".into(),
            subjects: [("prod.eu.changes-x.Key".to_string(), "NONE".to_string())].into(),
        };
        let f = compatibility(&place, &none);
        assert_eq!(
            f[0].message,
            "compatibility level NONE (1 subject of this cluster, none with a level of its own)"
        );
        let strict = RegistryFacts {
            global: "NONE".into(),
            subjects: [("prod.eu.changes-x.Envelope".to_string(), "FULL_TRANSITIVE".to_string())].into(),
        };
        let f = compatibility(&place, &strict);
        assert_eq!(severities(&f), [Severity::Warning]);
        assert!(f[0]
            .message
            .starts_with("subject prod.eu.changes-x.Envelope has compatibility level FULL_TRANSITIVE, not NONE: "));
        let global = RegistryFacts {
            global: "BACKWARD".into(),
            subjects: [("prod.eu.changes-x.Key".to_string(), "BACKWARD".to_string())].into(),
        };
        assert_eq!(compatibility(&place, &global).len(), 1);
    }

    #[test]
    fn exit_status_like_diff() {
        let p = node();
        let ok = Finding::ok(&p, "wal_level", "wal_level", "fine");
        let warn = Finding::warning(&p, "x", "x", "hm");
        let bad = Finding::problem(&p, "x", "x", "bad");
        let gone = Finding::unchecked(&p, "connection", "dsn", "down");
        assert_eq!(exit_status(&[ok.clone(), warn.clone()]), 0);
        assert_eq!(exit_status(&[ok.clone(), bad.clone()]), 1);
        assert_eq!(exit_status(&[bad, gone, ok]), 2);
        let json = warn.json();
        assert_eq!(json["severity"], "warning");
        assert_eq!(json["node"], "n1");
        assert_eq!(json["system"], "node");
    }
}
