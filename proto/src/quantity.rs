//! Kubernetes resource quantities for memory ("512Mi", "1Gi", "1.5G", "1048576"): the format of
//! the API's memory fields, shared by the agent and its clients.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a memory quantity (examples: 512Mi, 1Gi, 1073741824): {why}")]
pub struct QuantityError {
    pub input: String,
    pub why: &'static str,
}

/// Parses a quantity into bytes. Fractions are allowed when the result is a whole number of bytes.
pub fn parse_bytes(input: &str) -> Result<u64, QuantityError> {
    let err = |why| QuantityError {
        input: input.to_string(),
        why,
    };
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let multiplier: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        _ => return Err(err("unknown suffix")),
    };
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() && frac.is_empty() {
        return Err(err("no number"));
    }
    if frac.contains('.') || frac.len() > 18 || whole.len() > 20 {
        return Err(err("malformed number"));
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| err("malformed number"))?
    };
    let frac_digits: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| err("malformed number"))?
    };
    let scale = 10u128.pow(frac.len() as u32);
    let scaled = (whole * scale + frac_digits)
        .checked_mul(multiplier)
        .ok_or_else(|| err("too large"))?;
    if scaled % scale != 0 {
        return Err(err("not a whole number of bytes"));
    }
    u64::try_from(scaled / scale).map_err(|_| err("too large"))
}

/// Formats bytes in the largest binary unit that divides them exactly ("1536Mi", "2Gi").
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u32); 6] = [
        ("Ei", 60),
        ("Pi", 50),
        ("Ti", 40),
        ("Gi", 30),
        ("Mi", 20),
        ("Ki", 10),
    ];
    for (unit, shift) in UNITS {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_suffixes() {
        assert_eq!(parse_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes(" 2Ki "), Ok(2048));
        assert_eq!(parse_bytes(".5Ki"), Ok(512));
    }

    #[test]
    fn rejects_what_is_not_a_quantity() {
        for bad in [
            "",
            "8XB",
            "Gi",
            "-1Gi",
            "1..5Gi",
            "1.5",
            "0.3",
            "1e3",
            "1 Gi",
            "99999999999Ei",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} should be rejected");
        }
        let e = parse_bytes("8XB").unwrap_err();
        assert!(e.to_string().contains("8XB") && e.to_string().contains("suffix"));
    }

    #[test]
    fn formats_in_the_largest_exact_unit() {
        assert_eq!(format_bytes(512 << 20), "512Mi");
        assert_eq!(format_bytes(1 << 30), "1Gi");
        assert_eq!(format_bytes(1536 << 20), "1536Mi");
        assert_eq!(format_bytes(1000), "1000");
        assert_eq!(format_bytes(0), "0");
        for b in [1u64 << 20, 3 << 29, 12345 << 10] {
            assert_eq!(parse_bytes(&format_bytes(b)), Ok(b));
        }
    }
}
