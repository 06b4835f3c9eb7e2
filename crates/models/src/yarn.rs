//! YaRN RoPE scaling (`rope_scaling` with `rope_type: yarn`), as mlx-lm's `YarnRoPE` and
//! Hugging Face's `_compute_yarn_parameters` define it: rotary dimensions whose wavelength fits
//! the original context many times keep their frequency, those that fit it less than once
//! are interpolated by `factor`, a linear ramp blends the two between, and queries and keys are
//! scaled by `mscale` (which scales every score by its square).

use serde::{Deserialize, Serialize};

/// The `rope_scaling` block of a YaRN config. Absent keys take mlx-lm's defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct YarnScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: f32,
    #[serde(default = "default_original_ctx")]
    pub original_max_position_embeddings: usize,
    #[serde(default = "default_beta_fast")]
    pub beta_fast: f32,
    #[serde(default = "default_one")]
    pub beta_slow: f32,
    #[serde(default = "default_one")]
    pub mscale: f32,
    #[serde(default)]
    pub mscale_all_dim: f32,
    /// Round the ramp's ends to whole dimensions (Hugging Face; gpt-oss sets `false`). mlx-lm
    /// 0.32.2 ignores the key and always rounds.
    #[serde(default = "default_true")]
    pub truncate: bool,
}

fn default_original_ctx() -> usize {
    4096
}

fn default_beta_fast() -> f32 {
    32.0
}

fn default_one() -> f32 {
    1.0
}

fn default_true() -> bool {
    true
}

fn get_mscale(factor: f32, m: f32) -> f32 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * m * factor.ln() + 1.0
    }
}

impl YarnScaling {
    /// The factor queries and keys are multiplied by before RoPE.
    pub fn mscale(&self) -> f32 {
        get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim)
    }

    /// The rotary dimension (of `dims / 2`) at which a wavelength fits the original context
    /// `rotations` times.
    fn correction_dim(&self, rotations: f32, dims: usize, base: f32) -> f32 {
        let ctx = self.original_max_position_embeddings as f32;
        dims as f32 * (ctx / (rotations * 2.0 * std::f32::consts::PI)).ln() / (2.0 * base.ln())
    }

    /// Where the ramp from kept to interpolated frequencies starts and ends.
    pub fn correction_range(&self, dims: usize, base: f32) -> (f32, f32) {
        let (mut low, mut high) = (self.correction_dim(self.beta_fast, dims, base), self.correction_dim(self.beta_slow, dims, base));
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        (low.max(0.0), high.min(dims as f32 - 1.0))
    }

    /// Periods (`base^(2i/dims)` scaled), as `fast::rope` takes them in place of a base.
    pub fn periods(&self, dims: usize, base: f32) -> Vec<f32> {
        let (low, mut high) = self.correction_range(dims, base);
        if low == high {
            high += 0.001;
        }
        (0..dims / 2)
            .map(|i| {
                let extra = base.powf(2.0 * i as f32 / dims as f32);
                let inter = self.factor * extra;
                // 1 keeps the original frequency, 0 interpolates fully.
                let keep = 1.0 - ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                inter * extra / (inter * keep + extra * (1.0 - keep))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt_oss(truncate: bool) -> YarnScaling {
        serde_json::from_value(serde_json::json!({"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "original_max_position_embeddings": 4096, "truncate": truncate}))
        .unwrap()
    }

    /// gpt-oss's block (head_dim 64, base 150000): by hand, the ramp runs from
    /// 64 ln(4096 / (32 · 2π)) / (2 ln 150000) = 8.09 to 64 ln(4096 / 2π) / (2 ln 150000) = 17.40,
    /// rounded out to 8 and 18; below it periods are `base^(2i/64)`, above it 32 times that, and
    /// on it `32 p / (32 k + 1 - k)` with `k` falling linearly from 1 to 0. mscale is
    /// `0.1 ln 32 + 1`.
    #[test]
    fn periods_follow_the_yarn_formula() {
        let (d, base) = (64, 150_000f32);
        let plain = |i: usize| 150_000f64.powf(2.0 * i as f64 / 64.0);
        let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-4 * b.abs();
        let dim = |rotations: f64| 64.0 * (4096.0 / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * 150_000f64.ln());
        let (low, high) = (dim(32.0), dim(1.0));
        assert!((low - 8.0928).abs() < 1e-4 && (high - 17.3980).abs() < 1e-4, "{low} {high}");
        for (truncate, (low, high)) in [(true, (8.0, 18.0)), (false, (low, high))] {
            let y = gpt_oss(truncate);
            let (l, h) = y.correction_range(d, base);
            assert!((l as f64 - low).abs() < 1e-4 && (h as f64 - high).abs() < 1e-4, "truncate {truncate}: range {l}..{h}");
            let p = y.periods(d, base);
            assert_eq!(p.len(), 32);
            for (i, &got) in p.iter().enumerate() {
                let k = 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let want = 32.0 * plain(i) / (32.0 * k + 1.0 - k);
                assert!(close(got, want), "truncate {truncate} dim {i}: {got} vs {want}");
            }
            assert!(close(p[3], plain(3)) && close(p[30], 32.0 * plain(30)));
        }
        assert!((gpt_oss(true).mscale() - (0.1 * 32f32.ln() + 1.0)).abs() < 1e-6);
        let mut no_boost = gpt_oss(true);
        no_boost.mscale_all_dim = 1.0;
        assert_eq!(no_boost.mscale(), 1.0, "equal mscale and mscale_all_dim cancel");
    }
}
