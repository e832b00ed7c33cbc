//! Keeping secrets out of logs and error messages.

/// Describes a PostgreSQL DSN (URL or `key=value` form) as `host:port/dbname`, never the
/// password or other parameters, for logs and errors.
pub fn dsn_endpoint(dsn: &str) -> String {
    if let Some(rest) = dsn
        .strip_prefix("postgres://")
        .or_else(|| dsn.strip_prefix("postgresql://"))
    {
        let rest = rest.split(['?', '#']).next().unwrap_or("");
        let hostpart = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
        return hostpart.to_string();
    }
    let mut host = "localhost";
    let mut port = "5432";
    let mut db = "";
    for kv in dsn.split_whitespace() {
        match kv.split_once('=') {
            Some(("host", v)) => host = v,
            Some(("port", v)) => port = v,
            Some(("dbname", v)) => db = v,
            _ => {}
        }
    }
    format!("{host}:{port}/{db}")
}

/// Replaces each password where a connection string would carry it (`:<pw>@` in a URL,
/// `password=<pw>` in key=value form) with `***`. Only those forms: a short password such as
/// `pgferry` must not blank out ordinary words of a message.
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out
            .replace(&format!(":{s}@"), ":***@")
            .replace(&format!("password={s}"), "password=***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_never_show_passwords() {
        assert_eq!(
            dsn_endpoint("postgres://u:s3cret@db1:5433/app?sslmode=require"),
            "db1:5433/app"
        );
        assert_eq!(
            dsn_endpoint("host=db2 port=6000 dbname=x password=s3cret"),
            "db2:6000/x"
        );
        assert!(!dsn_endpoint("postgresql://u:s3cret@h/d").contains("s3cret"));
        assert_eq!(
            scrub("at postgres://u:s3cret@h/d, password=s3cret", &["s3cret"]),
            "at postgres://u:***@h/d, password=***"
        );
        assert_eq!(scrub("pgferry needs a key", &["pgferry"]), "pgferry needs a key");
    }
}
