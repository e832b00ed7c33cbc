//! TLS for the SQL sessions, with libpq's meaning of the DSN parameters `sslmode`,
//! `sslrootcert`, `sslcert` and `sslkey`, so one DSN means the same to tokio-postgres (SQL
//! sessions) and to libpq (the replication stream, which reads them itself).
//!
//! - `disable`: no TLS.
//! - `prefer` (the default, as in libpq): TLS if the server offers it, else plain; the
//!   certificate is not checked.
//! - `require`: TLS or no session; the certificate is not checked, unless `sslrootcert` is
//!   given, which makes it `verify-ca` (as libpq does when the root certificate file exists).
//! - `verify-ca`: TLS, and the server's certificate must chain to `sslrootcert` (and be valid
//!   now).
//! - `verify-full`: `verify-ca`, and the certificate must name the host connected to (a DNS or
//!   IP subject alternative name).
//!
//! `sslrootcert` defaults to `~/.postgresql/root.crt` as in libpq; `sslrootcert=system` trusts
//! the system's CA store. `sslcert`/`sslkey` (PEM, the key in PKCS#8) authenticate the client.

use std::path::{Path, PathBuf};

use native_tls::{Certificate, Identity, TlsConnector};
use postgres_native_tls::MakeTlsConnector;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, unverified.
    #[default]
    Prefer,
    /// TLS, unverified.
    Require,
    /// TLS, certificate chain verified.
    VerifyCa,
    /// TLS, certificate chain and host name verified.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<SslMode, String> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                ))
            }
        })
    }
}

/// The TLS parameters of a DSN.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgTls {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert` (`system` for the system's CA store).
    pub root_cert: Option<String>,
    /// `sslcert`.
    pub cert: Option<PathBuf>,
    /// `sslkey`.
    pub key: Option<PathBuf>,
}

/// A DSN split into what tokio-postgres reads and the TLS parameters it does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsDsn {
    /// The DSN without `sslmode`, `sslrootcert`, `sslcert`, `sslkey`.
    pub dsn: String,
    /// Those parameters.
    pub tls: PgTls,
}

const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

impl TlsDsn {
    /// Splits a URL (`postgres://…?sslmode=verify-full&sslrootcert=/ca.pem`) or key=value
    /// (`host=db sslmode=require`) DSN. The error says which parameter is wrong, never the
    /// password.
    pub fn parse(dsn: &str) -> Result<TlsDsn, String> {
        let (dsn, params) = if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
            split_url(dsn)
        } else {
            split_key_value(dsn)?
        };
        let mut tls = PgTls::default();
        for (k, v) in params {
            match k.as_str() {
                "sslmode" => tls.mode = SslMode::parse(&v)?,
                "sslrootcert" => tls.root_cert = Some(v),
                "sslcert" => tls.cert = Some(PathBuf::from(v)),
                _ => tls.key = Some(PathBuf::from(v)),
            }
        }
        Ok(TlsDsn { dsn, tls })
    }
}

impl PgTls {
    /// The mode in effect: `require` with an explicit `sslrootcert` verifies the chain.
    pub fn effective_mode(&self) -> SslMode {
        match self.mode {
            SslMode::Require if self.root_cert.is_some() => SslMode::VerifyCa,
            m => m,
        }
    }

    /// tokio-postgres's mode for [`PgTls::effective_mode`].
    pub fn postgres_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }

    fn verifies(&self) -> bool {
        matches!(self.effective_mode(), SslMode::VerifyCa | SslMode::VerifyFull)
    }

    /// The root certificate file that verification uses (`None`: the system's store, or no
    /// verification).
    fn root_file(&self) -> Option<PathBuf> {
        if !self.verifies() {
            return None;
        }
        match self.root_cert.as_deref() {
            Some("system") => None,
            Some(f) => Some(PathBuf::from(f)),
            None => Some(
                std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_default()
                    .join(".postgresql/root.crt"),
            ),
        }
    }

    /// Checks that the files the parameters name can be read (at start-up, so a typo is
    /// reported before anything connects).
    pub fn check_files(&self) -> Result<(), String> {
        if self.cert.is_some() != self.key.is_some() {
            return Err("sslcert and sslkey go together".into());
        }
        let files = [
            ("sslrootcert", self.root_file()),
            ("sslcert", self.cert.clone()),
            ("sslkey", self.key.clone()),
        ];
        for (param, file) in files {
            if let Some(f) = file {
                read(&f).map_err(|e| format!("{param}: {e}"))?;
            }
        }
        Ok(())
    }

    /// The connector for these parameters.
    pub fn connector(&self) -> Result<MakeTlsConnector, String> {
        let mut b = TlsConnector::builder();
        match self.effective_mode() {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => {
                b.danger_accept_invalid_certs(true)
                    .danger_accept_invalid_hostnames(true);
            }
            SslMode::VerifyCa => {
                b.danger_accept_invalid_hostnames(true);
            }
            SslMode::VerifyFull => {}
        }
        if let Some(file) = self.root_file() {
            let pem = read(&file).map_err(|e| format!("sslrootcert: {e}"))?;
            let certs = pem_blocks(&pem, "CERTIFICATE");
            if certs.is_empty() {
                return Err(format!("sslrootcert: {} holds no PEM certificate", file.display()));
            }
            for c in certs {
                let cert =
                    Certificate::from_pem(c.as_bytes()).map_err(|e| format!("sslrootcert: {}: {e}", file.display()))?;
                b.add_root_certificate(cert);
            }
            b.disable_built_in_roots(true);
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            let (c, k) = (
                read(cert).map_err(|e| format!("sslcert: {e}"))?,
                read(key).map_err(|e| format!("sslkey: {e}"))?,
            );
            let id = Identity::from_pkcs8(c.as_bytes(), k.as_bytes()).map_err(|e| {
                format!(
                    "sslcert/sslkey {} / {}: {e} (the key must be PKCS#8 PEM)",
                    cert.display(),
                    key.display()
                )
            })?;
            b.identity(id);
        }
        let connector = b.build().map_err(|e| format!("setting up TLS: {e}"))?;
        Ok(MakeTlsConnector::new(connector))
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The `-----BEGIN <label>-----` … `-----END <label>-----` blocks of a PEM text.
fn pem_blocks(pem: &str, label: &str) -> Vec<String> {
    let (begin, end) = (format!("-----BEGIN {label}-----"), format!("-----END {label}-----"));
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(s) = rest.find(&begin) {
        let Some(e) = rest[s..].find(&end) else { break };
        out.push(rest[s..s + e + end.len()].to_string());
        rest = &rest[s + e + end.len()..];
    }
    out
}

/// Removes the TLS parameters from a URL's query string; the parameters percent-decoded.
fn split_url(dsn: &str) -> (String, Vec<(String, String)>) {
    let (body, fragment) = match dsn.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (dsn, None),
    };
    // The query starts at the first '?' after the userinfo (a password may hold a '?' only
    // percent-encoded, but be lenient).
    let host_from = body.rfind('@').unwrap_or(0);
    let Some(q) = body[host_from..].find('?').map(|i| i + host_from) else {
        return (dsn.to_string(), Vec::new());
    };
    let (base, query) = (&body[..q], &body[q + 1..]);
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if TLS_KEYS.contains(&k) {
            taken.push((k.to_string(), percent_decode(v)));
        } else {
            kept.push(pair);
        }
    }
    let mut out = base.to_string();
    if !kept.is_empty() {
        out = format!("{out}?{}", kept.join("&"));
    }
    if let Some(f) = fragment {
        out = format!("{out}#{f}");
    }
    (out, taken)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes the TLS parameters from a `key=value` DSN (values may be single-quoted with `\`
/// escapes, as libpq reads them); the other parameters are kept exactly as written.
fn split_key_value(dsn: &str) -> Result<(String, Vec<(String, String)>), String> {
    let chars: Vec<(usize, char)> = dsn.char_indices().collect();
    let mut i = 0;
    let mut kept: Vec<&str> = Vec::new();
    let mut taken = Vec::new();
    let at = |i: usize| chars.get(i).map(|&(_, c)| c);
    let offset = |i: usize| chars.get(i).map(|&(o, _)| o).unwrap_or(dsn.len());
    loop {
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        if at(i).is_none() {
            break;
        }
        let start = i;
        while at(i).is_some_and(|c| c != '=' && !c.is_whitespace()) {
            i += 1;
        }
        let key = &dsn[offset(start)..offset(i)];
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        if at(i) != Some('=') {
            return Err(format!("DSN parameter {key:?} has no '=' and value"));
        }
        i += 1;
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        let mut value = String::new();
        if at(i) == Some('\'') {
            i += 1;
            loop {
                match at(i) {
                    None => return Err(format!("DSN parameter {key:?}: unterminated quoted value")),
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some('\\') => {
                        value.extend(at(i + 1));
                        i += 2;
                    }
                    Some(c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while let Some(c) = at(i).filter(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(at(i + 1));
                    i += 2;
                } else {
                    value.push(c);
                    i += 1;
                }
            }
        }
        if TLS_KEYS.contains(&key) {
            taken.push((key.to_string(), value));
        } else {
            kept.push(&dsn[offset(start)..offset(i)]);
        }
    }
    Ok((kept.join(" "), taken))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_taken_out() {
        let d = TlsDsn::parse(
            "postgres://u:p%3F@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
        )
        .unwrap();
        assert_eq!(d.dsn, "postgres://u:p%3F@h:5/db?application_name=x");
        assert_eq!(d.tls.mode, SslMode::VerifyFull);
        assert_eq!(d.tls.root_cert.as_deref(), Some("/tmp/ca.pem"));
        let d = TlsDsn::parse("postgresql://h/db?sslmode=disable").unwrap();
        assert_eq!((d.dsn.as_str(), d.tls.mode), ("postgresql://h/db", SslMode::Disable));
        let d = TlsDsn::parse("postgres://u:pw@h/db").unwrap();
        assert_eq!((d.dsn.as_str(), d.tls.mode), ("postgres://u:pw@h/db", SslMode::Prefer));
    }

    #[test]
    fn key_value_parameters_are_taken_out() {
        let d = TlsDsn::parse("host=h password='a b\\'c' sslmode = require sslcert='/x y/c.pem' sslkey=/k dbname=d")
            .unwrap();
        assert_eq!(d.dsn, "host=h password='a b\\'c' dbname=d");
        assert_eq!(d.tls.mode, SslMode::Require);
        assert_eq!(d.tls.cert, Some(PathBuf::from("/x y/c.pem")));
        assert_eq!(d.tls.effective_mode(), SslMode::Require);
        assert!(TlsDsn::parse("host=h sslmode=allow")
            .unwrap_err()
            .contains("verify-full"));
        assert!(TlsDsn::parse("host=h password='open").is_err());
    }

    #[test]
    fn require_with_a_root_certificate_verifies() {
        let tls = PgTls {
            mode: SslMode::Require,
            root_cert: Some("/ca".into()),
            ..Default::default()
        };
        assert_eq!(tls.effective_mode(), SslMode::VerifyCa);
        let e = tls.check_files().unwrap_err();
        assert!(e.starts_with("sslrootcert: cannot read /ca"), "{e}");
        assert!(PgTls::default().check_files().is_ok());
    }

    #[test]
    fn pem_blocks_are_split() {
        let pem = "x\n-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nB\n-----END CERTIFICATE-----\n";
        assert_eq!(pem_blocks(pem, "CERTIFICATE").len(), 2);
    }
}
