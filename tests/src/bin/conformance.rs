//! Runs the backend conformance suite on the current MLX backend and writes the table as
//! `<out>.csv` (streamed row by row, so a run cut short still leaves its rows) and `<out>.md`.
//!
//! On the lent GPU see scripts/gpu-conformance.sh. The exit status is 0 whenever the table was
//! written, failures included: on CUDA some cases are known to fail, and
//! tests/tests/conformance.rs is what judges them.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use kvsplit_tests::conformance::case_op;
use kvsplit_tests::{all_cases, report, run_cases, run_info, Case, Tamper};

#[derive(Parser, Debug)]
#[command(about = "MLX backend conformance against a float64 reference")]
struct Args {
    /// Output path prefix: writes PREFIX.md and PREFIX.csv (e.g. docs/conformance-cpu).
    #[arg(long)]
    out: PathBuf,
    /// Comma-separated ops to run, in this order (quantize, dequantize, quantized_matmul,
    /// gather_qmm, gather_mm, sdpa, rope, rms_norm). Default: all, in table order.
    #[arg(long, value_delimiter = ',')]
    ops: Vec<String>,
}

const OPS: [&str; 8] = [
    "quantize",
    "dequantize",
    "quantized_matmul",
    "gather_qmm",
    "gather_mm",
    "sdpa",
    "rope",
    "rms_norm",
];

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(bad) = args.ops.iter().find(|o| !OPS.contains(&o.as_str())) {
        bail!(
            "--ops: unknown op '{bad}', expected some of {}",
            OPS.join(",")
        );
    }
    let info = run_info();
    eprintln!(
        "conformance: backend {}, MLX {}",
        info.backend, info.mlx_version
    );

    // Cases run in --ops order, so a time-limited GPU run reaches the ops that matter first.
    let rank = |c: &Case| args.ops.iter().position(|o| o == case_op(c));
    let mut cases: Vec<Case> = all_cases()
        .into_iter()
        .filter(|c| args.ops.is_empty() || rank(c).is_some())
        .collect();
    cases.sort_by_key(rank);
    // Appended, not with_extension: a prefix like results/v0.3 must keep its ".3".
    let with_ext = |ext: &str| {
        let mut p = args.out.clone().into_os_string();
        p.push(ext);
        PathBuf::from(p)
    };
    let (csv_path, md_path) = (with_ext(".csv"), with_ext(".md"));
    if let Some(dir) = csv_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut csv = std::fs::File::create(&csv_path)
        .with_context(|| format!("creating {}", csv_path.display()))?;
    writeln!(csv, "{}", report::csv_header())?;

    let start = std::time::Instant::now();
    let total = cases.len();
    let mut done = 0;
    let results = run_cases(&cases, Tamper::None, |r| {
        done += 1;
        let _ = writeln!(csv, "{}", report::csv_row(&info, r)).and_then(|_| csv.flush());
        if !r.pass {
            eprintln!(
                "[{done}/{total}] FAIL {} {} {} bits={:?} err={:.3e} tol={:.3e} {}",
                r.op,
                r.shape_class,
                r.dtype,
                r.bits,
                r.max_rel_err,
                r.tolerance,
                r.error.as_deref().unwrap_or("")
            );
        }
    });
    std::fs::write(&md_path, report::render_markdown(&info, &results))
        .with_context(|| format!("writing {}", md_path.display()))?;

    let passed = results.iter().filter(|r| r.pass).count();
    println!(
        "conformance: {passed} of {} cases pass on {} (MLX {}) in {:.1} s; wrote {} and {}",
        results.len(),
        info.backend,
        info.mlx_version,
        start.elapsed().as_secs_f64(),
        md_path.display(),
        csv_path.display()
    );
    Ok(())
}
