//! Kubernetes quantities ("8Gi", "512Mi", "1.5G") as byte counts, for scheduling arithmetic.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {value:?} is not a quantity such as 512Mi or 8Gi")]
pub struct QuantityError {
    pub field: String,
    pub value: String,
}

/// Parses `value` (of `field`, for the error) into bytes, rounding fractions up.
pub fn parse_bytes(field: &str, value: &str) -> Result<u64, QuantityError> {
    let err = || QuantityError {
        field: field.into(),
        value: value.into(),
    };
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(split);
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1000,
        "M" => 1000u64.pow(2),
        "G" => 1000u64.pow(3),
        "T" => 1000u64.pow(4),
        "P" => 1000u64.pow(5),
        "E" => 1000u64.pow(6),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return Err(err()),
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || frac.contains('.') || (number.contains('.') && frac.is_empty()) {
        return Err(err());
    }
    let whole: u64 = whole.parse().map_err(|_| err())?;
    let mut bytes = whole.checked_mul(multiplier).ok_or_else(err)?;
    if !frac.is_empty() {
        let digits = frac.len().min(18) as u32;
        let frac: u128 = frac[..digits as usize].parse().map_err(|_| err())?;
        let scale = 10u128.pow(digits);
        let part = (frac * multiplier as u128).div_ceil(scale);
        bytes = bytes.checked_add(part as u64).ok_or_else(err)?;
    }
    Ok(bytes)
}

/// Bytes as the shortest exact binary quantity ("512Mi", "8Gi"), as status reports memory.
pub fn format_bytes(bytes: u64) -> String {
    for (suffix, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seed_sizes() {
        assert_eq!(parse_bytes("m", "8Gi"), Ok(8 << 30));
        assert_eq!(parse_bytes("m", "512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes("m", "50G"), Ok(50_000_000_000));
        assert_eq!(parse_bytes("m", "1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("m", "1024"), Ok(1024));
        for bad in ["8XB", "", "Gi", "1.Gi", "1..2Gi", "-1Gi", "99999999999Ei"] {
            let e = parse_bytes("spec.memory", bad).unwrap_err();
            assert!(e.to_string().starts_with("spec.memory: "), "{bad}: {e}");
        }
    }

    #[test]
    fn formats_exact_binary_units() {
        assert_eq!(format_bytes(256 << 20), "256Mi");
        assert_eq!(format_bytes(8 << 30), "8Gi");
        assert_eq!(format_bytes(1536 << 20), "1536Mi");
        assert_eq!(format_bytes(1000), "1000");
    }
}
