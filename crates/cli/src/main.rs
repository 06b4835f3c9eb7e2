//! `kvsplit-mlx`: LLM inference on MLX with keys and values cached at different precisions.

mod bench;
mod bench_attention;
mod bench_pool;
mod calibrate;
mod cache_prompt;
mod compare;
mod cuda_profile;
mod convert;
mod flag_values;
mod generate;
mod info;
mod kv_args;
mod model_args;
mod plot;
mod ppl;
mod results;
mod serve;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kvsplit-mlx", version, about = "LLM inference on MLX with a split-precision (K/V) quantized KV cache")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Kernel-path choices, shared by every command and recorded in every result row.
    #[command(flatten)]
    engine: mlx_ext::EngineOptions,
}

// Parsed once at start-up, so variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Print the MLX version, backend, device, libmlx path and memory figures.
    Info,
    /// Generate text from a prompt.
    Generate(generate::GenerateArgs),
    /// Prefill a prompt file once and save its KV cache, for `generate --prompt-cache-file`.
    CachePrompt(cache_prompt::CachePromptArgs),
    /// Benchmark whole-model prefill/decode over K/V settings and depths (`bench attention`: one attention call).
    Bench(bench::BenchCmd),
    /// Draw PNG/SVG figures from bench and ppl result files.
    Plot(plot::PlotArgs),
    /// Calibrate a per-layer K/V recipe for a model at a byte budget (for --kv-recipe and presets).
    Calibrate(calibrate::CalibrateArgs),
    /// Perplexity, KL divergence and top-1 agreement of K/V settings (WikiText-2 or a file).
    Ppl(ppl::PplArgs),
    /// Quick side-by-side of fp16, k8v8, k8v4, k4v8, k4v4: KV bytes, decode speed, quality.
    Compare(compare::CompareArgs),
    /// Write an MLX model directory (safetensors, config, tokenizer) from a GGUF file or HF directory.
    Convert(convert::ConvertArgs),
    /// OpenAI-compatible HTTP server (chat and completions, streaming) whose conversations keep their split-precision KV cache between turns; a chat page at /
    Serve(serve::ServeArgs),
}

fn run(cli: Cli) -> Result<()> {
    mlx_ext::options::install(cli.engine)?;
    match cli.command {
        Command::Convert(a) => convert::run(a),
        Command::Info => info::run(),
        Command::Generate(a) => generate::run(a),
        Command::CachePrompt(a) => cache_prompt::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Ppl(a) => ppl::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Serve(a) => serve::run(a),
    }
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line (flag, file, cause); a user
            // error is not a crash, so no backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
