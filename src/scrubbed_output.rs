//! The process's own output with the configuration's secrets taken out: the log writer that
//! every tracing event goes through, and the panic hook. Errors already name endpoints and
//! keys rather than secrets; this is the net under everything else (a library that quotes a
//! connection string, a panic message that formats a value).

use std::io::Write;
use std::sync::OnceLock;

use pgferry_connectors::config::Secrets;

/// The secrets of the loaded configuration; empty until [`protect`] is called.
static SECRETS: OnceLock<Secrets> = OnceLock::new();

/// From now on every log line and panic message is scrubbed of `secrets` (call once, as soon as
/// the configuration is loaded; later calls are ignored).
pub fn protect(secrets: Secrets) {
    if SECRETS.set(secrets).is_err() {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let text = scrub(&info.to_string());
        let _ = writeln!(std::io::stderr(), "pgferry panicked: {text}");
    }));
}

fn scrub(text: &str) -> String {
    match SECRETS.get() {
        Some(s) => s.scrub(text),
        None => text.to_string(),
    }
}

/// Standard error, one log event at a time: [`tracing_subscriber`] formats an event into the
/// writer and drops it, and the drop writes the event scrubbed.
#[derive(Clone, Copy, Default)]
pub struct ScrubbedStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ScrubbedStderr {
    type Writer = EventBuffer;

    fn make_writer(&'a self) -> Self::Writer {
        EventBuffer(Vec::with_capacity(256))
    }
}

/// One formatted log event, written to standard error scrubbed when dropped.
pub struct EventBuffer(Vec<u8>);

impl Write for EventBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventBuffer {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        // Nothing to do when stderr is gone: a log line is not worth failing for.
        let _ = std::io::stderr().write_all(scrub(&text).as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_lose_the_secrets() {
        protect(Secrets {
            dsn_passwords: vec!["pgferry".into()],
            values: vec!["Sasl-Pw-7731".into()],
        });
        let mut line = EventBuffer(Vec::new());
        line.write_all(b"connecting to postgres://u:pgferry@h/db with Sasl-Pw-7731 for pgferry").unwrap();
        assert_eq!(
            scrub(&String::from_utf8_lossy(&line.0)),
            "connecting to postgres://u:***@h/db with *** for pgferry"
        );
    }
}
