//! Resident-byte accounting against MLX's own active-memory counter. This lives in its own test
//! binary because the counter is process-wide: tests running on other threads would pollute it.

mod common;

use common::Host;
use mlx_kv::{CacheOptions, KvCache, KvSpec};

const D: usize = 64;

#[test]
fn reported_bytes_equal_the_formula_and_mlx_active_memory() {
    let (layers, hkv, t) = (3usize, 2usize, 512usize);
    for spec in [KvSpec::bits(8, 4), KvSpec::bits(4, 2), KvSpec::bits(8, 8)] {
        mlx_rs::transforms::eval(std::iter::empty::<&mlx_rs::Array>()).unwrap();
        let before = mlx_rs::memory::active_memory().unwrap();
        let x = Host::random([1, hkv, t, D], 17).array();
        x.eval().unwrap();
        let with_input = mlx_rs::memory::active_memory().unwrap();
        let mut caches: Vec<KvCache> = (0..layers).map(|_| KvCache::new(spec.clone(), D, CacheOptions::default()).unwrap()).collect();
        for c in &mut caches {
            c.update(&x, &x).unwrap();
            c.eval().unwrap();
        }
        let after = mlx_rs::memory::active_memory().unwrap();
        let reported: usize = caches.iter().map(|c| c.bytes().total()).sum();
        let (kb, vb) = spec.bytes_per_token_per_head(D, 2);
        let formula = ((t * layers * hkv) as f64 * (kb + vb)) as usize;
        assert_eq!(reported, formula, "{spec}: reported bytes differ from the closed form");
        assert_eq!(after - with_input, reported, "{spec}: MLX active memory disagrees (before {before})");
    }
}
