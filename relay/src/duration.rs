//! Durations as users type them on the command line: `10` (seconds, as
//! socat's `-T 10`), `1.5s`, `250ms`, `2m`, `1h`; and, where a timeout may
//! be turned off, `none`.

use std::time::Duration;

/// Parses a duration; the error says what was expected. Zero is refused:
/// every duration the relay takes is a timeout, and a zero timeout would
/// close connections before they start.
pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale = match unit {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" => 1e-6,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}`; expected a number with s, ms, m or h (for example 10s or 250ms)"
            ));
        }
    };
    let value: f64 = number.parse().map_err(|_| {
        format!("`{text}` is not a duration; expected for example 10s, 1.5s or 250ms")
    })?;
    let seconds = value * scale;
    if seconds > MAX.as_secs_f64() {
        return Err(format!(
            "`{text}` is too long: a timeout may be at most {}h (365 days)",
            MAX.as_secs() / 3600
        ));
    }
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("`{text}`: a duration must be greater than zero"))
}

/// The longest timeout taken. Longer ones are typos (or "never", which
/// has its own spelling where it is allowed), and a deadline that far out
/// would overflow the clock arithmetic of the timers.
pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// A duration as the command line takes it and prints it (`10s`, `2m`):
/// lets clap show a default that is defined once, as a `Duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl std::str::FromStr for Dur {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        parse(text).map(Dur)
    }
}

impl std::fmt::Display for Dur {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format(self.0))
    }
}

/// A timeout that may be turned off (`none`, or its synonym `off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(pub Option<Duration>);

impl std::str::FromStr for Timeout {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "none" | "off" => Ok(Timeout(None)),
            "0" | "0s" => Err(format!(
                "`{text}`: a zero timeout would close every connection at once; write `none` to turn the timeout off"
            )),
            _ => parse(text).map(|d| Timeout(Some(d))),
        }
    }
}

impl std::fmt::Display for Timeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("none"),
            Some(d) => f.write_str(&format(d)),
        }
    }
}

/// `d` in the largest unit that writes it whole, as [`parse`] reads it back.
pub fn format(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 {
        format!("{}ms", d.as_millis())
    } else if secs != 0 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs != 0 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_may_be_turned_off_but_not_zero() {
        assert_eq!("none".parse(), Ok(Timeout(None)));
        assert_eq!("off".parse(), Ok(Timeout(None)));
        assert_eq!("10m".parse(), Ok(Timeout(Some(Duration::from_secs(600)))));
        let err = "0".parse::<Timeout>().expect_err("zero");
        assert!(err.contains("none"), "{err}");
    }

    #[test]
    fn format_writes_what_parse_reads() {
        for text in ["10m", "1h", "30s", "250ms", "90s"] {
            assert_eq!(format(parse(text).expect(text)), text);
        }
    }

    #[test]
    fn accepts_the_forms_users_type() {
        assert_eq!(parse("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn refuses_durations_too_long_for_a_timeout() {
        for long in ["18446744073709551616", "8761h", "1e400"] {
            let err = parse(long).expect_err(long);
            assert!(err.contains(&format!("`{long}`")), "{err}");
        }
        let err = parse("18446744073709551616").expect_err("u64::MAX + 1 seconds");
        assert!(err.contains("too long"), "{err}");
        assert_eq!(parse("8760h"), Ok(MAX));
    }

    #[test]
    fn rejects_nonsense_naming_it() {
        for bad in ["", "soon", "10x", "0", "0s", "-1", "1..2s"] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains(&format!("`{bad}`")), "{err}");
        }
    }
}
