//! `KvSpec`: the K/V precision setting a user gives (`--kv 8,4`, presets, groups, layout,
//! residual, sinks, rotation, per-layer overrides) and its validation.

use crate::error::{KvError, Result};
use std::fmt;
use std::str::FromStr;

/// Bit widths MLX's affine quantization supports; 16 means "keep in the float dtype".
pub const VALID_BITS: [u8; 7] = [2, 3, 4, 5, 6, 8, 16];
pub const VALID_GROUPS: [usize; 3] = [32, 64, 128];
pub const DEFAULT_GROUP: usize = 64;

/// Precision of one tensor (K or V): bits and group size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSpec {
    pub bits: u8,
    pub group: usize,
}

impl QuantSpec {
    pub fn is_quantized(&self) -> bool {
        self.bits < 16
    }
    /// Stored bits per element, counting one 16-bit scale and one 16-bit bias per group.
    pub fn bits_per_element(&self) -> f64 {
        if self.is_quantized() {
            self.bits as f64 + 32.0 / self.group as f64
        } else {
            16.0
        }
    }
}

/// How key quantization groups are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum KeyLayout {
    /// Groups run along head_dim, one scale per token and group (mlx-lm, llama.cpp).
    #[default]
    PerToken,
    /// Groups run along the token axis, so an outlier channel gets its own scale (KIVI).
    PerChannel,
    /// Per-token groups of keys less one per-channel mean, taken from the sequence's first
    /// keys. Softmax ignores a constant added to every score, and `q·(k - m)` differs from
    /// `q·k` by `q·m` for every key alike, so attention is unchanged while the channels whose
    /// offset would set every group's range no longer do. Fast paths read it as per-token.
    Centered,
}

impl FromStr for KeyLayout {
    type Err = KvError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "per-token" => Ok(KeyLayout::PerToken),
            "per-channel" => Ok(KeyLayout::PerChannel),
            "centered" => Ok(KeyLayout::Centered),
            _ => Err(invalid("--kv-key-layout", format!("expected per-token, per-channel or centered, got '{s}'"))),
        }
    }
}

/// Which tensors get the Hadamard rotation (QuaRot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Rotation {
    /// No rotation.
    #[default]
    None,
    /// Keys only.
    #[cfg_attr(feature = "clap", value(name = "k", alias = "keys"))]
    Keys,
    /// Keys and values.
    #[cfg_attr(feature = "clap", value(name = "kv", alias = "keys-values"))]
    KeysAndValues,
    /// Values only (the query is not rotated; the attention output is rotated back). Recipes
    /// choose it per layer where keys lose nothing from rotation but values gain.
    #[cfg_attr(feature = "clap", value(name = "v", alias = "values"))]
    Values,
}

impl Rotation {
    /// Keys (and so queries) are rotated.
    pub fn keys(self) -> bool {
        matches!(self, Rotation::Keys | Rotation::KeysAndValues)
    }
    /// Values are rotated (and so the attention output is rotated back).
    pub fn values(self) -> bool {
        matches!(self, Rotation::Values | Rotation::KeysAndValues)
    }
    /// The two parts as the kernels that rotate inside take them: bit 0 keys, bit 1 values.
    pub fn bits(self) -> u8 {
        self.keys() as u8 | (self.values() as u8) << 1
    }
    /// The rotation with these two parts.
    pub fn of(keys: bool, values: bool) -> Rotation {
        match (keys, values) {
            (false, false) => Rotation::None,
            (true, false) => Rotation::Keys,
            (true, true) => Rotation::KeysAndValues,
            (false, true) => Rotation::Values,
        }
    }
}

impl FromStr for Rotation {
    type Err = KvError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Rotation::None),
            "k" | "keys" => Ok(Rotation::Keys),
            "kv" | "keys-values" => Ok(Rotation::KeysAndValues),
            "v" | "values" => Ok(Rotation::Values),
            _ => Err(invalid("--kv-rotate", format!("expected none, k, v or kv, got '{s}'"))),
        }
    }
}

/// The full setting for one layer's cache.
#[derive(Debug, Clone, PartialEq)]
pub struct KvSpec {
    pub k: QuantSpec,
    pub v: QuantSpec,
    pub key_layout: KeyLayout,
    /// Newest tokens kept in full precision, quantized in blocks as they age.
    pub residual: usize,
    /// First tokens kept in full precision forever (attention sinks).
    pub sinks: usize,
    pub rotation: Rotation,
    /// Quantization starts once the cache holds this many tokens.
    pub quantized_kv_start: usize,
}

impl Default for KvSpec {
    fn default() -> Self {
        KvSpec::dense()
    }
}

fn invalid(flag: &'static str, message: String) -> KvError {
    KvError::InvalidSpec { flag, message }
}

fn parse_bits(s: &str, flag: &'static str) -> Result<u8> {
    let bits = match s.trim() {
        "fp16" | "f16" | "bf16" | "16" => 16,
        other => other
            .parse::<u8>()
            .map_err(|_| invalid(flag, format!("'{other}' is not a bit width; use one of {VALID_BITS:?}")))?,
    };
    if !VALID_BITS.contains(&bits) {
        return Err(invalid(flag, format!("unsupported bit width {bits}; use one of {VALID_BITS:?}")));
    }
    Ok(bits)
}

/// Parses `K,V`, a single width for both, or a preset (`fp16`, `k8v8`, `k8v4`, `k4v8`, ...).
pub fn parse_bits_pair(s: &str, flag: &'static str) -> Result<(u8, u8)> {
    let s = s.trim().to_ascii_lowercase();
    if let Some(rest) = s.strip_prefix('k') {
        if let Some((k, v)) = rest.split_once('v') {
            return Ok((parse_bits(k, flag)?, parse_bits(v, flag)?));
        }
    }
    match s.split_once(',') {
        Some((k, v)) => Ok((parse_bits(k, flag)?, parse_bits(v, flag)?)),
        None => {
            let b = parse_bits(&s, flag)?;
            Ok((b, b))
        }
    }
}

/// Parses `--kv-group-size`: one size for both, or `K,V`.
pub fn parse_groups(s: &str) -> Result<(usize, usize)> {
    let one = |x: &str| -> Result<usize> {
        let g = x
            .trim()
            .parse::<usize>()
            .map_err(|_| invalid("--kv-group-size", format!("'{x}' is not a number")))?;
        if !VALID_GROUPS.contains(&g) {
            return Err(invalid("--kv-group-size", format!("unsupported group size {g}; use one of {VALID_GROUPS:?}")));
        }
        Ok(g)
    };
    match s.split_once(',') {
        Some((k, v)) => Ok((one(k)?, one(v)?)),
        None => {
            let g = one(s)?;
            Ok((g, g))
        }
    }
}

impl KvSpec {
    /// No quantization: a plain float cache.
    pub fn dense() -> Self {
        KvSpec {
            k: QuantSpec { bits: 16, group: DEFAULT_GROUP },
            v: QuantSpec { bits: 16, group: DEFAULT_GROUP },
            key_layout: KeyLayout::PerToken,
            residual: 0,
            sinks: 0,
            rotation: Rotation::None,
            quantized_kv_start: 0,
        }
    }

    /// `k_bits`/`v_bits` at the default group size, every other setting at its default.
    pub fn bits(k_bits: u8, v_bits: u8) -> Self {
        let mut spec = KvSpec::dense();
        spec.k.bits = k_bits;
        spec.v.bits = v_bits;
        spec
    }

    /// Parses `--kv` (e.g. `8,4`, `fp16`, `k8v4`).
    pub fn parse(kv: &str) -> Result<Self> {
        let (k, v) = parse_bits_pair(kv, "--kv")?;
        Ok(KvSpec::bits(k, v))
    }

    pub fn is_dense(&self) -> bool {
        !self.k.is_quantized() && !self.v.is_quantized()
    }

    /// Tokens a quantization block spans: per-channel keys need a whole group of tokens.
    pub fn block_tokens(&self) -> usize {
        if self.k.is_quantized() && self.key_layout == KeyLayout::PerChannel {
            self.k.group
        } else {
            1
        }
    }

    /// Tokens after which a cache of this spec has taken every one of its code paths at least
    /// once: the dense start and sinks, the residual's first block quantized, a per-channel key
    /// group completed and the step after it. A warm-up that decodes this far meets every
    /// kernel variant the spec uses (on CUDA each is compiled at its first use).
    pub fn first_use_tokens(&self) -> usize {
        self.quantized_kv_start + self.sinks + self.residual + self.block_tokens() + 2
    }

    /// Checks the setting against the model's head_dim; errors name the offending flag.
    pub fn validate(&self, head_dim: usize) -> Result<()> {
        let per_token_k = self.key_layout != KeyLayout::PerChannel;
        if self.k.is_quantized() && per_token_k && !head_dim.is_multiple_of(self.k.group) {
            return Err(KvError::GroupMismatch { which: "key", head_dim, group: self.k.group });
        }
        if self.v.is_quantized() && !head_dim.is_multiple_of(self.v.group) {
            return Err(KvError::GroupMismatch { which: "value", head_dim, group: self.v.group });
        }
        let block = self.block_tokens();
        if !self.residual.is_multiple_of(block) {
            return Err(invalid(
                "--kv-residual",
                format!("residual {} must be a multiple of the key group size {block} with per-channel keys", self.residual),
            ));
        }
        if self.rotation != Rotation::None && !head_dim.is_power_of_two() {
            return Err(invalid("--kv-rotate", format!("Hadamard rotation needs a power-of-two head_dim, got {head_dim}")));
        }
        Ok(())
    }

    /// Bytes of one element of a dense (unquantized) cache for a model computing in `compute`:
    /// 16 bits on the CPU, which narrows its f32 (see `cache::Body`), else the compute dtype's.
    pub fn dense_element_bytes(compute: mlx_rs::Dtype) -> usize {
        if compute == mlx_rs::Dtype::Float32 && crate::Backend::current() != crate::Backend::Cpu { 4 } else { 2 }
    }

    /// Bytes per cached token per KV head, K and V, as the closed-form formula gives them.
    pub fn bytes_per_token_per_head(&self, head_dim: usize, float_bytes: usize) -> (f64, f64) {
        let per = |q: &QuantSpec| {
            if q.is_quantized() {
                head_dim as f64 * q.bits_per_element() / 8.0
            } else {
                (head_dim * float_bytes) as f64
            }
        };
        (per(&self.k), per(&self.v))
    }
}

/// The canonical text form, which [`KvSpec::from_canonical`] reads back: `fp16` or `k8v4`, then
/// only the settings that differ from their defaults (`-g32,64`, `-pc`, `-r16`, `-s4`, `-rotk`,
/// `-rotkv`, `-rotv`, `-qs256`). A dense spec has no group suffix: its group sizes are never used.
impl fmt::Display for KvSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_dense() {
            write!(f, "fp16")?;
        } else {
            let b = |q: &QuantSpec| if q.is_quantized() { q.bits.to_string() } else { "16".into() };
            write!(f, "k{}v{}", b(&self.k), b(&self.v))?;
            if self.k.group != DEFAULT_GROUP || self.v.group != DEFAULT_GROUP {
                write!(f, "-g{},{}", self.k.group, self.v.group)?;
            }
        }
        match self.key_layout {
            KeyLayout::PerToken => {}
            KeyLayout::PerChannel => write!(f, "-pc")?,
            KeyLayout::Centered => write!(f, "-kc")?,
        }
        if self.residual > 0 {
            write!(f, "-r{}", self.residual)?;
        }
        if self.sinks > 0 {
            write!(f, "-s{}", self.sinks)?;
        }
        match self.rotation {
            Rotation::None => {}
            Rotation::Keys => write!(f, "-rotk")?,
            Rotation::KeysAndValues => write!(f, "-rotkv")?,
            Rotation::Values => write!(f, "-rotv")?,
        }
        if self.quantized_kv_start > 0 {
            write!(f, "-qs{}", self.quantized_kv_start)?;
        }
        Ok(())
    }
}

impl KvSpec {
    /// Reads the [`Display`](fmt::Display) form back (saved caches record specs this way).
    /// `what` names where the text came from, for the error.
    pub fn from_canonical(text: &str, what: &str) -> Result<Self> {
        let bad = |why: String| KvError::Format(format!("{what}: '{text}' is not a KV spec: {why}"));
        let mut parts = text.split('-');
        let head = parts.next().unwrap_or_default();
        let mut spec = if head == "fp16" {
            KvSpec::dense()
        } else {
            let (k, v) = parse_bits_pair(head, "--kv").map_err(|e| bad(e.to_string()))?;
            KvSpec::bits(k, v)
        };
        let num = |x: &str| x.parse::<usize>().map_err(|_| bad(format!("'{x}' is not a number")));
        for part in parts {
            if let Some(g) = part.strip_prefix('g') {
                let (gk, gv) = parse_groups(g).map_err(|e| bad(e.to_string()))?;
                spec.k.group = gk;
                spec.v.group = gv;
            } else if part == "pc" {
                spec.key_layout = KeyLayout::PerChannel;
            } else if part == "kc" {
                spec.key_layout = KeyLayout::Centered;
            } else if part == "rotk" {
                spec.rotation = Rotation::Keys;
            } else if part == "rotkv" {
                spec.rotation = Rotation::KeysAndValues;
            } else if part == "rotv" {
                spec.rotation = Rotation::Values;
            } else if let Some(n) = part.strip_prefix("qs") {
                spec.quantized_kv_start = num(n)?;
            } else if let Some(n) = part.strip_prefix('r') {
                spec.residual = num(n)?;
            } else if let Some(n) = part.strip_prefix('s') {
                spec.sinks = num(n)?;
            } else {
                return Err(bad(format!("unknown part '{part}'")));
            }
        }
        Ok(spec)
    }
}

/// One `--kv-layers` entry: a layer selector.
#[derive(Debug, Clone, PartialEq)]
enum LayerSelector {
    First(usize),
    Last(usize),
    Range(usize, usize),
}

/// What an entry gives its layers: new bit widths on the base setting, or a whole setting of
/// their own (a calibrated recipe's layer: bits, groups, layout and rotation).
#[derive(Debug, Clone, PartialEq)]
enum Override {
    Bits(u8, u8),
    Spec(Box<KvSpec>),
}

/// Per-layer overrides, e.g. `first:2=8,8;last:2=fp16;10-12=4,4` (bits on the base setting) or
/// `3=k8v4-g128,32-rotv` (a whole setting in canonical text). Later entries win.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LayerOverrides {
    entries: Vec<(LayerSelector, Override)>,
}

/// The `--kv-layers` form [`LayerOverrides::parse`] reads back (bits as `K,V`; whole settings
/// always carry their `-g` part, which is what tells them from bits).
impl fmt::Display for LayerOverrides {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (sel, what)) in self.entries.iter().enumerate() {
            if i > 0 {
                write!(f, ";")?;
            }
            match *sel {
                LayerSelector::First(n) => write!(f, "first:{n}")?,
                LayerSelector::Last(n) => write!(f, "last:{n}")?,
                LayerSelector::Range(a, b) if a == b => write!(f, "{a}")?,
                LayerSelector::Range(a, b) => write!(f, "{a}-{b}")?,
            }
            match what {
                Override::Bits(k, v) => write!(f, "={k},{v}")?,
                Override::Spec(spec) => {
                    let text = spec.to_string();
                    if text.contains("-g") {
                        write!(f, "={text}")?
                    } else {
                        write!(f, "={text}-g{},{}", spec.k.group, spec.v.group)?
                    }
                }
            }
        }
        Ok(())
    }
}

impl LayerOverrides {
    /// No layer overridden.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// One whole setting per layer, in order (a recipe).
    pub fn per_layer(specs: &[KvSpec]) -> Self {
        let entries = specs.iter().enumerate().map(|(i, s)| (LayerSelector::Range(i, i), Override::Spec(Box::new(s.clone())))).collect();
        LayerOverrides { entries }
    }

    pub fn parse(s: &str) -> Result<Self> {
        const FLAG: &str = "--kv-layers";
        let mut entries = Vec::new();
        for item in s.split(';').map(str::trim).filter(|x| !x.is_empty()) {
            let (sel, bits) = item
                .split_once('=')
                .ok_or_else(|| invalid(FLAG, format!("'{item}' needs the form SELECTOR=K,V or SELECTOR=SETTING")))?;
            let num = |x: &str| {
                x.trim()
                    .parse::<usize>()
                    .map_err(|_| invalid(FLAG, format!("'{x}' in '{item}' is not a layer number")))
            };
            let sel = sel.trim();
            let selector = if let Some(n) = sel.strip_prefix("first:") {
                LayerSelector::First(num(n)?)
            } else if let Some(n) = sel.strip_prefix("last:") {
                LayerSelector::Last(num(n)?)
            } else if let Some((a, b)) = sel.split_once('-') {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(invalid(FLAG, format!("empty layer range {a}-{b}")));
                }
                LayerSelector::Range(a, b)
            } else {
                let i = num(sel)?;
                LayerSelector::Range(i, i)
            };
            let what = if bits.contains('-') {
                let spec = KvSpec::from_canonical(bits.trim(), FLAG).map_err(|e| invalid(FLAG, e.to_string()))?;
                Override::Spec(Box::new(spec))
            } else {
                let (k, v) = parse_bits_pair(bits, FLAG)?;
                Override::Bits(k, v)
            };
            entries.push((selector, what));
        }
        Ok(LayerOverrides { entries })
    }

    /// The spec for `layer` of `n_layers`, starting from `base`.
    pub fn apply(&self, base: &KvSpec, layer: usize, n_layers: usize) -> KvSpec {
        let mut spec = base.clone();
        for (sel, what) in &self.entries {
            let hit = match *sel {
                LayerSelector::First(n) => layer < n,
                LayerSelector::Last(n) => layer + n >= n_layers,
                LayerSelector::Range(a, b) => (a..=b).contains(&layer),
            };
            if hit {
                match what {
                    Override::Bits(k, v) => {
                        spec.k.bits = *k;
                        spec.v.bits = *v;
                    }
                    Override::Spec(s) => spec = (**s).clone(),
                }
            }
        }
        spec
    }

    /// Layers named beyond the model's depth are a user error, not something to ignore.
    pub fn validate(&self, n_layers: usize) -> Result<()> {
        for (sel, _) in &self.entries {
            let bad = match *sel {
                LayerSelector::First(n) | LayerSelector::Last(n) => n > n_layers,
                LayerSelector::Range(_, b) => b >= n_layers,
            };
            if bad {
                return Err(invalid("--kv-layers", format!("{sel:?} is outside the model's {n_layers} layers")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_presets_and_dense() {
        assert_eq!(KvSpec::parse("8,4").unwrap(), KvSpec::bits(8, 4));
        assert_eq!(KvSpec::parse("k4v8").unwrap(), KvSpec::bits(4, 8));
        assert!(KvSpec::parse("fp16").unwrap().is_dense());
        assert!(KvSpec::parse("16").unwrap().is_dense());
        assert_eq!(KvSpec::parse("4").unwrap(), KvSpec::bits(4, 4));
        assert_eq!(KvSpec::parse("8,4").unwrap().to_string(), "k8v4");
    }

    #[test]
    fn rejects_unknown_bits_naming_the_flag() {
        let err = KvSpec::parse("7,4").unwrap_err().to_string();
        assert!(err.starts_with("--kv:") && err.contains('7'), "{err}");
        assert!(KvSpec::parse("8;4").is_err());
        assert!(parse_groups("48").unwrap_err().to_string().contains("--kv-group-size"));
    }

    #[test]
    fn validation_names_group_and_residual_problems() {
        let mut spec = KvSpec::bits(8, 4);
        spec.k.group = 128;
        assert!(spec.validate(64).unwrap_err().to_string().contains("head_dim 64"));
        let mut spec = KvSpec::bits(4, 4);
        spec.key_layout = KeyLayout::PerChannel;
        spec.residual = 40;
        assert!(spec.validate(64).unwrap_err().to_string().starts_with("--kv-residual"));
        spec.residual = 128;
        spec.validate(64).unwrap();
    }

    #[test]
    fn layer_overrides_select_first_last_and_ranges() {
        let o = LayerOverrides::parse("first:2=8,8; last:1=fp16; 5-6=k4v2").unwrap();
        let base = KvSpec::bits(4, 4);
        assert_eq!(o.apply(&base, 0, 10).k.bits, 8);
        assert_eq!(o.apply(&base, 2, 10), base);
        assert_eq!(o.apply(&base, 6, 10).v.bits, 2);
        assert!(o.apply(&base, 9, 10).is_dense());
        assert!(o.validate(10).is_ok());
        assert!(o.validate(5).is_err());
        assert!(LayerOverrides::parse("first=8").is_err());
    }

    #[test]
    fn canonical_text_round_trips_every_setting() {
        let mut specs = vec![KvSpec::dense(), KvSpec::bits(8, 4), KvSpec::bits(16, 4), KvSpec::bits(4, 16)];
        let mut s = KvSpec::bits(4, 2);
        s.k.group = 32;
        s.v.group = 128;
        s.key_layout = KeyLayout::PerChannel;
        s.residual = 64;
        s.sinks = 4;
        s.rotation = Rotation::KeysAndValues;
        s.quantized_kv_start = 300;
        specs.push(s.clone());
        s.rotation = Rotation::Keys;
        specs.push(s.clone());
        s.rotation = Rotation::Values;
        specs.push(s);
        let mut d = KvSpec::dense();
        d.sinks = 4;
        d.residual = 8;
        specs.push(d);
        for spec in specs {
            let text = spec.to_string();
            assert_eq!(KvSpec::from_canonical(&text, "test").unwrap(), spec, "{text}");
        }
        let err = KvSpec::from_canonical("k8v4-zz", "file x").unwrap_err().to_string();
        assert!(err.contains("file x") && err.contains("'zz'"), "{err}");
    }

    #[test]
    fn layer_overrides_display_parses_back() {
        let o = LayerOverrides::parse("first:2=8,8; last:1=fp16; 5-6=k4v2; 3=2,2").unwrap();
        assert_eq!(o.to_string(), "first:2=8,8;last:1=16,16;5-6=4,2;3=2,2");
        assert_eq!(LayerOverrides::parse(&o.to_string()).unwrap(), o);
        assert_eq!(LayerOverrides::default().to_string(), "");
    }

    #[test]
    fn whole_layer_settings_replace_the_base_and_round_trip() {
        let mut a = KvSpec::bits(8, 4);
        a.rotation = Rotation::Values;
        a.k.group = 128;
        let b = KvSpec::bits(4, 2);
        let o = LayerOverrides::per_layer(&[a.clone(), b.clone(), KvSpec::dense()]);
        let mut base = KvSpec::bits(2, 2);
        base.rotation = Rotation::KeysAndValues;
        assert_eq!(o.apply(&base, 0, 3), a);
        // A whole setting does not inherit the base's rotation, unlike bits-only entries.
        assert_eq!(o.apply(&base, 1, 3), b);
        assert!(o.apply(&base, 2, 3).is_dense());
        let text = o.to_string();
        assert_eq!(text, "0=k8v4-g128,64-rotv;1=k4v2-g64,64;2=fp16-g64,64");
        assert_eq!(LayerOverrides::parse(&text).unwrap(), o);
        assert!(LayerOverrides::parse("0=k8v4-zz").unwrap_err().to_string().contains("--kv-layers"));
    }

    #[test]
    fn rotation_parts_compose() {
        for r in [Rotation::None, Rotation::Keys, Rotation::Values, Rotation::KeysAndValues] {
            assert_eq!(Rotation::of(r.keys(), r.values()), r);
        }
        assert_eq!("v".parse::<Rotation>().unwrap(), Rotation::Values);
    }

    #[test]
    fn formula_matches_the_issue_ratio_for_k8v4() {
        // (8 + 32/64) + (4 + 32/64) = 13 bits vs 32 for a 16-bit K+V pair: 13/32.
        let (k, v) = KvSpec::bits(8, 4).bytes_per_token_per_head(64, 2);
        let (dk, dv) = KvSpec::dense().bytes_per_token_per_head(64, 2);
        assert!(((k + v) / (dk + dv) - 13.0 / 32.0).abs() < 1e-12);
    }
}
