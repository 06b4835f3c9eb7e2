//! Values of flags that several commands share, parsed one way everywhere: byte sizes and
//! comma-separated counts. Errors name the flag.

use anyhow::{bail, Result};

/// Parses a byte count with an optional suffix: `K`/`M`/`G`/`T` and `KiB`/`MiB`/... are powers
/// of 1024, `KB`/`MB`/`GB`/`TB` powers of 1000 (`8G` = 8 GiB; `1.5GB` = 1.5e9).
pub fn parse_size(s: &str, flag: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| anyhow::anyhow!("{flag}: '{s}' does not start with a number"))?;
    let mult: f64 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => bail!("{flag}: unknown size suffix '{other}' in '{s}'; use K, M, G, T (powers of 1024) or KB, MB, GB, TB"),
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 1.0 {
        bail!("{flag}: '{s}' is not a positive size");
    }
    Ok(bytes as u64)
}


/// Parses a comma-separated list of counts for `flag`.
pub fn parse_list(s: &str, flag: &str) -> Result<Vec<usize>> {
    let v = s
        .split(',')
        .map(|x| x.trim().parse::<usize>().map_err(|_| anyhow::anyhow!("{flag}: '{x}' is not a whole number")))
        .collect::<Result<Vec<_>>>()?;
    if v.is_empty() {
        bail!("{flag}: give at least one value");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_suffixes() {
        assert_eq!(parse_size("8G", "--memory-budget").unwrap(), 8 << 30);
        assert_eq!(parse_size("8GiB", "--memory-budget").unwrap(), 8 << 30);
        assert_eq!(parse_size("1.5GB", "--memory-budget").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("512m", "--memory-budget").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096", "--memory-budget").unwrap(), 4096);
        for bad in ["", "G", "8X", "-1G", "0"] {
            let e = parse_size(bad, "--memory-budget").unwrap_err().to_string();
            assert!(e.contains("--memory-budget"), "{bad}: {e}");
        }
    }

    #[test]
    fn one_size_syntax_for_every_flag() {
        // convert's --max-shard-size takes what --memory-budget takes, spaces included.
        assert_eq!(parse_size("5G", "--max-shard-size").unwrap(), 5 << 30);
        assert_eq!(parse_size("5GB", "--max-shard-size").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("1.5 MiB", "--max-shard-size").unwrap(), 1_572_864);
        assert_eq!(parse_size("123", "--max-shard-size").unwrap(), 123);
        for bad in ["5XB", "-1GB"] {
            assert!(parse_size(bad, "--max-shard-size").unwrap_err().to_string().contains("--max-shard-size"), "{bad}");
        }
    }

    #[test]
    fn count_lists() {
        assert_eq!(parse_list("0, 16,4096", "--depth").unwrap(), vec![0, 16, 4096]);
        assert!(parse_list("1,x", "--depth").unwrap_err().to_string().contains("--depth"));
    }
}
