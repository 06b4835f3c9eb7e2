//! The backend conformance suite as a test: MLX's ops on the backend in use against the
//! float64 reference, and the engine's shape choices (`mlx_kv::Backend`) against the result.

use std::sync::OnceLock;

use kvsplit_tests::conformance::{case_op, score};
use kvsplit_tests::{all_cases, run_case, run_suite, Case, CaseResult, Tamper};
use mlx_kv::Backend;
use mlx_rs::Dtype;

/// The suite runs once per test binary; every test below reads the same rows.
fn suite() -> &'static [CaseResult] {
    static RESULTS: OnceLock<Vec<CaseResult>> = OnceLock::new();
    RESULTS.get_or_init(run_suite)
}

/// MLX 0.32.2 CUDA defects reproduced on the H200 (shared PLATFORM.md): quantized_matmul on
/// 4-D/5-D inputs and quantize of a column-major input.
fn is_known_cuda_bug(r: &CaseResult) -> bool {
    (r.op == "quantized_matmul" && r.rank >= 4) || (r.op == "quantize" && !r.row_major)
}

/// MLX 0.32.2's CPU `gather_mm` refuses every dtype but float32 ("Currently only supports
/// float32").
fn is_known_cpu_limit(r: &CaseResult) -> bool {
    r.op == "gather_mm" && r.dtype != "f32" && r.error.as_deref().is_some_and(|e| e.contains("only supports float32"))
}

/// Whether the engine ever emits this case's shape and layout on `backend`.
fn engine_uses(r: &CaseResult, backend: Backend) -> bool {
    match r.op {
        // On the CPU the MoE block runs expert by expert (models/src/moe.rs `on_host_route`).
        "gather_qmm" | "gather_mm" => backend != Backend::Cpu,
        "quantized_matmul" => r.rank <= backend.max_qmm_rank(),
        "quantize" => r.row_major || backend.quantize_accepts_transposed(),
        _ => true,
    }
}

fn describe(r: &CaseResult) -> String {
    format!(
        "{} {} {} bits={:?} group={:?} transpose={:?} {}: err {:.3e} > {} {:.3e} {}",
        r.op,
        r.shape_class,
        r.dtype,
        r.bits,
        r.group,
        r.transpose,
        r.shape,
        r.max_rel_err,
        r.tolerance_name,
        r.tolerance,
        r.error.as_deref().unwrap_or("")
    )
}

#[test]
fn every_case_passes_or_is_a_known_backend_bug() {
    let backend = Backend::current();
    let failures: Vec<&CaseResult> = suite().iter().filter(|r| !r.pass).collect();
    let unexplained: Vec<String> = failures
        .iter()
        .filter(|r| match backend {
            Backend::Cpu => !is_known_cpu_limit(r),
            _ => !is_known_cuda_bug(r),
        })
        .map(|r| describe(r))
        .collect();
    assert!(
        unexplained.is_empty(),
        "{} failing cases on {}:\n{}",
        unexplained.len(),
        backend.name(),
        unexplained.join("\n")
    );
    for r in failures {
        assert!(
            !engine_uses(r, backend),
            "known {} bug hits a shape the engine uses: {}",
            backend.name(),
            describe(r)
        );
    }
}

#[test]
fn engine_shape_choices_are_conformant() {
    let backend = Backend::current();
    let used: Vec<&CaseResult> = suite().iter().filter(|r| engine_uses(r, backend)).collect();
    let bad: Vec<String> = used
        .iter()
        .filter(|r| !r.pass)
        .map(|r| describe(r))
        .collect();
    assert!(
        bad.is_empty(),
        "engine-used shapes fail on {}:\n{}",
        backend.name(),
        bad.join("\n")
    );
    // The filter must keep what the engine runs, not just drop everything risky.
    for rank in 2..=backend.max_qmm_rank() {
        for transpose in [true, false] {
            let n = used
                .iter()
                .filter(|r| {
                    r.op == "quantized_matmul" && r.rank == rank && r.transpose == Some(transpose)
                })
                .count();
            assert!(
                n > 0,
                "no {rank}-D transpose={transpose} quantized_matmul case checked"
            );
        }
    }
    assert!(used.iter().any(|r| r.op == "quantize" && r.row_major));
    for op in ["dequantize", "sdpa", "rope", "rms_norm"] {
        assert!(used.iter().any(|r| r.op == op), "no {op} case checked");
    }
    if backend != Backend::Cpu {
        for op in ["gather_qmm", "gather_mm"] {
            assert!(used.iter().any(|r| r.op == op), "no {op} case checked");
        }
    }
}

/// The first case of every op, to exercise the checker once per scoring path.
fn one_case_per_op() -> Vec<Case> {
    let mut seen = Vec::new();
    all_cases()
        .into_iter()
        .filter(|c| {
            let op = case_op(c);
            let new = !seen.contains(&op);
            seen.push(op);
            new
        })
        .collect()
}

#[test]
fn checker_fails_a_result_moved_past_its_tolerance() {
    let cases = one_case_per_op();
    assert_eq!(cases.len(), 8);
    for case in &cases {
        assert!(
            run_case(case, Tamper::None).pass || Backend::current() != Backend::Cpu,
            "{case:?} fails untampered"
        );
        // Moving one output by two tolerances leaves at least one tolerance of error whatever
        // the backend's own error was.
        let r = run_case(case, Tamper::ShiftFirst(2.0));
        assert!(
            !r.pass,
            "shift by 2 tolerances passed: {case:?}: {}",
            describe(&r)
        );
        let r = run_case(case, Tamper::Reverse);
        assert!(
            !r.pass,
            "reversed outputs passed: {case:?}: {}",
            describe(&r)
        );
    }
}

#[test]
fn checker_fails_a_wrongly_packed_code() {
    // A top-bit flip moves code 0 by 8 steps at 4 bits, far past half a step plus one of clip.
    for case in [
        Case::Quantize {
            dtype: Dtype::Float32,
            bits: 4,
            group: 64,
            transposed: false,
        },
        Case::Dequantize {
            dtype: Dtype::Float32,
            bits: 4,
            group: 64,
        },
    ] {
        assert!(run_case(&case, Tamper::None).pass || Backend::current() != Backend::Cpu);
        let r = run_case(&case, Tamper::FlipFirstCode);
        assert!(!r.pass, "flipped code passed: {}", describe(&r));
    }
}

#[test]
fn an_mlx_exception_is_a_failing_row() {
    // Group 48 is not a size MLX quantizes with; the row must record the error and fail.
    let r = run_case(
        &Case::Quantize {
            dtype: Dtype::Float32,
            bits: 4,
            group: 48,
            transposed: false,
        },
        Tamper::None,
    );
    assert!(!r.pass && r.error.is_some(), "{r:?}");
}

#[test]
fn score_never_passes_nan_or_missing_outputs() {
    assert_eq!(
        score(&[1.0, f64::NAN], &[1.0, 1.0], &[1.0, 1.0]),
        f64::INFINITY
    );
    assert_eq!(score(&[1.0], &[1.0, 1.0], &[1.0, 1.0]), f64::INFINITY);
    assert_eq!(score(&[], &[], &[]), f64::INFINITY);
    assert_eq!(score(&[1.5, 2.0], &[1.0, 2.0], &[0.5, 1.0]), 1.0);
}

#[test]
fn suite_covers_the_brief() {
    let rows = suite();
    let count = |op: &str| rows.iter().filter(|r| r.op == op).count();
    // 6 bit widths x 3 groups x 3 dtypes, row-major and transposed.
    assert_eq!(count("quantize"), 108);
    assert_eq!(count("dequantize"), 54);
    // 3 bit widths x 2 dtypes x 2 transposes x ranks 2..=5.
    assert_eq!(count("quantized_matmul"), 48);
    // 3 bit widths x 2 dtypes x (tokens x top-k, sorted pairs); dense: 2 dtypes x 2 layouts.
    assert_eq!(count("gather_qmm"), 12);
    assert_eq!(count("gather_mm"), 4);
    for class in [
        "no mask",
        "causal",
        "causal offset",
        "causal offset gqa",
        "decode no mask gqa",
    ] {
        assert!(
            rows.iter()
                .any(|r| r.op == "sdpa" && r.shape_class == class),
            "no sdpa {class}"
        );
    }
    assert!(rows
        .iter()
        .all(|r| !r.tolerance_name.is_empty() || r.error.is_some()));
}
