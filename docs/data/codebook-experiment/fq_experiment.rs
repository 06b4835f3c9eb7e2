//! EXPERIMENT (not for commit): fake quantization of K/V written into a float cache.
//! FQ_K / FQ_V = "aff:BITS:GROUP" (MLX affine) | "lm:BITS:GROUP" (scale per group, Gaussian
//! Lloyd-Max codebook, least-squares scale) | "lmc:..." (keys: centered first).
use crate::error::Result;
use mlx_rs::ops::{dequantize, quantize};
use mlx_rs::{Array, Dtype};

fn centroids(bits: u32) -> Vec<f32> {
    let half: &[f32] = match bits {
        1 => &[0.7979],
        2 => &[0.4528, 1.5104],
        3 => &[0.2451, 0.7560, 1.3440, 2.1520],
        4 => &[0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6181, 2.0690, 2.7326],
        _ => panic!("bits"),
    };
    let mut v: Vec<f32> = half.iter().rev().map(|x| -x).collect();
    v.extend_from_slice(half);
    v
}

pub fn apply(x: &Array, var: &str) -> Result<Array> {
    let Ok(s) = std::env::var(var) else { return Ok(x.clone()) };
    let parts: Vec<&str> = s.split(':').collect();
    let bits: u32 = parts[1].parse().unwrap();
    let group: i32 = parts[2].parse().unwrap();
    let dt = x.dtype();
    let xf = x.as_dtype(Dtype::Float32)?;
    let sh = xf.shape().to_vec();
    let d = sh[3];
    let out = match parts[0] {
        "aff" | "affc" => {
            let (w, sc, bi) = quantize(&xf, group, bits as i32)?;
            let sc = sc.as_dtype(Dtype::Float16)?.as_dtype(Dtype::Float32)?;
            let bi = bi.as_dtype(Dtype::Float16)?.as_dtype(Dtype::Float32)?;
            dequantize(&w, &sc, &bi, group, bits as i32)?
        }
        "lm" | "lmc" => {
            let g = xf.reshape(&[sh[0], sh[1], sh[2], d / group, group])?;
            let rms = g.square()?.mean_axis(-1, true)?.sqrt()?.add(Array::from_f32(1e-12))?;
            let u = g.divide(&rms)?;
            let c = centroids(bits);
            let bounds: Vec<f32> = c.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
            let b = Array::from_slice(&bounds, &[bounds.len() as i32]);
            let idx = u.expand_dims(-1)?.gt(&b)?.as_dtype(Dtype::Int32)?.sum_axis(-1, false)?;
            let ca = Array::from_slice(&c, &[c.len() as i32]);
            let q = ca.take(&idx)?;
            // least-squares scale per group, stored as f16
            let num = g.multiply(&q)?.sum_axis(-1, true)?;
            let den = q.square()?.sum_axis(-1, true)?.add(Array::from_f32(1e-12))?;
            let s = num.divide(&den)?.as_dtype(Dtype::Float16)?.as_dtype(Dtype::Float32)?;
            q.multiply(&s)?.reshape(&sh)?
        }
        other => panic!("unknown fq kind {other}"),
    };
    Ok(out.as_dtype(dt)?)
}
