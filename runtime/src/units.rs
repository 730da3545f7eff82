//! Human-friendly quantities in config and policy files: byte sizes ("512MiB", "4G") and
//! durations ("30s", "5m").
//!
//! Pure parsing with no I/O. Decimal suffixes (K, M, G, T, with or without `B`) are powers of
//! 1000 and binary ones (Ki, Mi, Gi, Ti, with or without `B`) powers of 1024, as in Kubernetes
//! resource quantities; a bare number is bytes. Errors say what was given and what is accepted.

use std::fmt;
use std::time::Duration;

/// A parse failure for a size or duration, naming the input and the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot parse {input:?} as a {kind}: {reason}")]
pub struct UnitError {
    input: String,
    kind: &'static str,
    reason: String,
}

/// A number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

const SIZE_SUFFIXES: &[(&str, u64)] = &[
    ("", 1),
    ("B", 1),
    ("K", 1_000),
    ("KB", 1_000),
    ("M", 1_000_000),
    ("MB", 1_000_000),
    ("G", 1_000_000_000),
    ("GB", 1_000_000_000),
    ("T", 1_000_000_000_000),
    ("TB", 1_000_000_000_000),
    ("Ki", 1 << 10),
    ("KiB", 1 << 10),
    ("Mi", 1 << 20),
    ("MiB", 1 << 20),
    ("Gi", 1 << 30),
    ("GiB", 1 << 30),
    ("Ti", 1 << 40),
    ("TiB", 1 << 40),
];

/// Splits "12.5GiB" into ("12.5", "GiB").
fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    (&s[..end], s[end..].trim())
}

impl ByteSize {
    /// Parses a size such as `512MiB`, `4G`, `1.5Gi` or `1048576`.
    pub fn parse(input: &str) -> Result<Self, UnitError> {
        let err = |reason: String| UnitError {
            input: input.to_owned(),
            kind: "size",
            reason,
        };
        let trimmed = input.trim();
        let (number, suffix) = split_number(trimmed);
        if number.is_empty() {
            return Err(err(
                "expected a number followed by an optional unit, e.g. 512MiB".into(),
            ));
        }
        let Some(&(_, multiplier)) = SIZE_SUFFIXES.iter().find(|(s, _)| *s == suffix) else {
            return Err(err(format!(
                "unknown unit {suffix:?}; use B, K, M, G, T (powers of 1000) or Ki, Mi, Gi, Ti (powers of 1024)"
            )));
        };
        let bytes = if let Ok(whole) = number.parse::<u64>() {
            whole.checked_mul(multiplier)
        } else {
            let value: f64 = number
                .parse()
                .map_err(|_| err(format!("{number:?} is not a number")))?;
            let bytes = (value * multiplier as f64).round();
            (bytes.is_finite() && bytes < u64::MAX as f64).then_some(bytes as u64)
        };
        bytes
            .map(ByteSize)
            .ok_or_else(|| err("value does not fit in 64 bits".into()))
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    /// Prints the largest binary unit that divides the size exactly, so values round-trip.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (suffix, multiplier) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 >= multiplier && self.0.is_multiple_of(multiplier) {
                return write!(f, "{}{}", self.0 / multiplier, suffix);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl serde::Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

/// Accepts either a bare integer (bytes) or a string with a unit.
impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Size;
        impl serde::de::Visitor<'_> for Size {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes, or with a unit such as 512MiB or 4GiB")
            }

            fn visit_u64<E: serde::de::Error>(self, bytes: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(bytes))
            }

            fn visit_i64<E: serde::de::Error>(self, bytes: i64) -> Result<ByteSize, E> {
                u64::try_from(bytes)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("{bytes} is negative; a size is 0 or more")))
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ByteSize, E> {
                ByteSize::parse(text).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Size)
    }
}

/// Parses a duration such as `30s`, `500ms`, `5m`, `1h` or a bare number of seconds.
pub fn parse_duration(input: &str) -> Result<Duration, UnitError> {
    let err = |reason: String| UnitError {
        input: input.to_owned(),
        kind: "duration",
        reason,
    };
    let (number, suffix) = split_number(input.trim());
    let value: f64 = number
        .parse()
        .map_err(|_| err("expected a number followed by ms, s, m or h, e.g. 30s".into()))?;
    let seconds = match suffix {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(err(format!("unknown unit {other:?}; use ms, s, m or h"))),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| err(e.to_string()))
}

/// Serde adapter for `Duration` fields written as "30s".
pub mod duration_str {
    use std::time::Duration;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: serde::Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", value.as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_decimal_and_binary_units() {
        assert_eq!(ByteSize::parse("512").unwrap().bytes(), 512);
        assert_eq!(ByteSize::parse("4K").unwrap().bytes(), 4000);
        assert_eq!(ByteSize::parse("4KiB").unwrap().bytes(), 4096);
        assert_eq!(ByteSize::parse("2Gi").unwrap().bytes(), 2 << 30);
        assert_eq!(ByteSize::parse(" 1.5GiB ").unwrap().bytes(), 3 << 29);
        assert_eq!(ByteSize::parse("10MB").unwrap().bytes(), 10_000_000);
    }

    #[test]
    fn unparsable_sizes_name_the_input_and_the_units() {
        let e = ByteSize::parse("10XB").unwrap_err().to_string();
        assert!(
            e.contains("\"10XB\"") && e.contains("unknown unit \"XB\"") && e.contains("Gi,"),
            "{e}"
        );
        assert!(ByteSize::parse("").is_err());
        assert!(ByteSize::parse("G").is_err());
        assert!(ByteSize::parse("1.2.3G").is_err());
        assert!(ByteSize::parse("99999999999TiB")
            .unwrap_err()
            .to_string()
            .contains("64 bits"));
    }

    #[test]
    fn sizes_display_round_trip() {
        for text in ["4GiB", "512MiB", "3KiB", "1000B"] {
            assert_eq!(ByteSize::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
