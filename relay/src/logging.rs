//! Log setup: `tracing` to stderr (or appended to a file, socat's `-lf`),
//! as text or JSON lines, at a level set by `-v`/`-q` (or `RUST_LOG`, which
//! wins when set). stdout stays free for output a command was asked to
//! write.
//!
//! Field values come from outside (route names, addresses, container and
//! TLS names), so text lines escape control characters in every field: a
//! name with a newline in it cannot pose as a second log line. JSON lines
//! are escaped by the JSON encoder.

use std::fmt::Write as _;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `verbosity` counts `-v` up and `-q` down from info. With `file`, lines
/// are appended there (created if missing) instead of going to stderr.
pub fn init(
    verbosity: i8,
    format: LogFormat,
    file: Option<&std::path::Path>,
) -> Result<(), String> {
    let level = match verbosity {
        i8::MIN..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("relay={level},{level}")));
    let writer = match file {
        None => BoxMakeWriter::new(std::io::stderr),
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
            BoxMakeWriter::new(std::sync::Mutex::new(file))
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(file.is_none() && std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.fmt_fields(escaped_fields()).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

/// The text format's fields, `key=value` separated by spaces (the message
/// bare, as the default format writes it), each value with its control
/// characters escaped.
fn escaped_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> {
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        let value = format!("{value:?}");
        let value = escape_controls(&value);
        if field.name() == "message" {
            write!(writer, "{value}")
        } else {
            write!(writer, "{field}={value}")
        }
    })
    .delimited(" ")
}

/// `text` with every control character written as an escape (`\n`, `\r`,
/// `\t`, else `\u{..}`), so that it stays on one line and cannot carry
/// terminal escape sequences.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(escaped, "\\u{{{:x}}}", c as u32);
            }
            c => escaped.push(c),
        }
    }
    escaped.into()
}

#[cfg(test)]
mod tests {
    use super::escape_controls;

    #[test]
    fn control_characters_cannot_break_a_line() {
        assert_eq!(escape_controls("web"), "web");
        assert_eq!(escape_controls("x\ny"), "x\\ny");
        assert_eq!(escape_controls("a\r\tb"), "a\\r\\tb");
        assert_eq!(escape_controls("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(escape_controls("caf\u{e9}"), "caf\u{e9}");
        assert!(!escape_controls("x\u{85}y").chars().any(char::is_control));
    }
}
