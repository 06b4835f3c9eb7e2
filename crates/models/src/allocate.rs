//! The allocation behind `kvsplit-mlx calibrate`: given, for every tensor of every layer, a few
//! settings with their cost and measured damage, choose one setting each so that the total damage
//! is least within a byte budget.
//!
//! Damage is the KL divergence measured with only that tensor quantized. For small errors KLD is
//! second order in the logit error and errors of different layers add, so the sum over tensors
//! predicts the KLD of the whole recipe (calibrate measures the recipe too and records both).
//! Under that model the choice is a multiple-choice knapsack, solved exactly by dynamic
//! programming over the cost in quarter bits per element.

/// One setting of one tensor: what it costs and what it does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    /// Stored bits per element in quarter bits (8 bits at group 64 is 8.5 bits: 34).
    pub cost: u32,
    /// Measured KLD with only this tensor at this setting.
    pub damage: f64,
}

/// Quarter bits per element of a setting of `bits` at `group` (16-bit scale and bias per group).
/// Every valid group (32, 64, 128) makes this a whole number of quarter bits.
pub fn quarter_bits(bits: u8, group: usize) -> u32 {
    4 * bits as u32 + 128 / group as u32
}

/// The choice per item (index into its list) with the least total damage among those whose total
/// cost is at most `budget`; `None` when even the cheapest choices exceed it. Ties go to the
/// cheaper total.
pub fn allocate(items: &[Vec<Choice>], budget: u32) -> Option<Vec<usize>> {
    let b = budget as usize;
    // best[c]: least damage of the items so far at total cost exactly c.
    let mut best = vec![f64::INFINITY; b + 1];
    best[0] = 0.0;
    let mut pick: Vec<Vec<u16>> = Vec::with_capacity(items.len());
    for choices in items {
        let mut next = vec![f64::INFINITY; b + 1];
        let mut took = vec![u16::MAX; b + 1];
        for (c, &d) in best.iter().enumerate().filter(|(_, d)| d.is_finite()) {
            for (j, ch) in choices.iter().enumerate() {
                let nc = c + ch.cost as usize;
                if nc <= b && d + ch.damage < next[nc] {
                    next[nc] = d + ch.damage;
                    took[nc] = j as u16;
                }
            }
        }
        best = next;
        pick.push(took);
    }
    let (mut c, _) = best.iter().enumerate().filter(|(_, d)| d.is_finite()).min_by(|a, b| a.1.total_cmp(b.1))?;
    let mut out = vec![0usize; items.len()];
    for (i, choices) in items.iter().enumerate().rev() {
        let j = pick[i][c] as usize;
        out[i] = j;
        c -= choices[j].cost as usize;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(cost: u32, damage: f64) -> Choice {
        Choice { cost, damage }
    }

    /// Every combination, for checking the DP on small cases.
    fn brute(items: &[Vec<Choice>], budget: u32) -> Option<f64> {
        fn go(items: &[Vec<Choice>], left: i64) -> Option<f64> {
            let Some((first, rest)) = items.split_first() else { return Some(0.0) };
            first.iter().filter_map(|c| go(rest, left - c.cost as i64).filter(|_| left >= c.cost as i64).map(|d| d + c.damage)).min_by(f64::total_cmp)
        }
        go(items, budget as i64)
    }

    #[test]
    fn quarter_bits_match_the_byte_formula() {
        assert_eq!(quarter_bits(8, 64), 34);
        assert_eq!(quarter_bits(4, 32), 20);
        assert_eq!(quarter_bits(2, 128), 9);
    }

    #[test]
    fn spends_bits_where_they_remove_the_most_damage() {
        // Two tensors; the first is ten times as sensitive, so it gets the wide setting.
        let items = vec![vec![ch(18, 1.0), ch(34, 0.01)], vec![ch(18, 0.1), ch(34, 0.001)]];
        assert_eq!(allocate(&items, 52), Some(vec![1, 0]));
        assert_eq!(allocate(&items, 68), Some(vec![1, 1]));
        assert_eq!(allocate(&items, 35), None);
    }

    #[test]
    fn matches_brute_force_on_random_cases() {
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        for _ in 0..200 {
            let items: Vec<Vec<Choice>> = (0..4).map(|_| (0..3).map(|_| ch(9 + rnd() % 26, (rnd() % 1000) as f64 / 1000.0)).collect()).collect();
            let budget = 40 + rnd() % 80;
            let got = allocate(&items, budget).map(|p| {
                let cost: u32 = p.iter().zip(&items).map(|(&j, it)| it[j].cost).sum();
                assert!(cost <= budget);
                p.iter().zip(&items).map(|(&j, it)| it[j].damage).sum::<f64>()
            });
            match (got, brute(&items, budget)) {
                (Some(g), Some(b)) => assert!((g - b).abs() < 1e-12, "dp {g} vs brute {b}"),
                (g, b) => assert_eq!(g.is_some(), b.is_some()),
            }
        }
    }
}
