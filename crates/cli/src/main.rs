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
    /// Run as one rank of a tensor-parallel group over MLX's distributed backend (ring: CPUs
    /// over TCP; nccl: NVIDIA GPUs), as MLX's launcher starts it (MLX_RANK and MLX_HOSTFILE for
    /// the ring; see scripts/launch-local.sh). Each rank holds its share of the attention heads,
    /// their KV cache and the MLP; rank 0 prints and serves.
    #[arg(long, global = true, value_enum, help_heading = "Distributed")]
    distributed: Option<mlx_ext::distributed::DistBackend>,
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
    if let Some(backend) = cli.distributed {
        // serve needs rank 0 to hand each request's steps to the other ranks, and the file
        // writers (ppl's baseline store, calibrate, convert) one writer per file: not built yet.
        if !matches!(cli.command, Command::Generate(_) | Command::Bench(_) | Command::Info) {
            anyhow::bail!("--distributed runs generate and bench; this command does not support it yet");
        }
        join_group(backend)?;
    }
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

/// Joins the launcher's group and installs it for the model loaders; ranks other than 0 stay
/// silent on stdout (their errors still reach stderr), so the group prints one answer.
fn join_group(backend: mlx_ext::distributed::DistBackend) -> Result<()> {
    use anyhow::Context;
    let group = mlx_ext::distributed::Group::init(backend, true).context("--distributed")?;
    let rank = group.rank();
    models::shard::install(group)?;
    if rank != 0 {
        let null = std::fs::OpenOptions::new().write(true).open("/dev/null").context("--distributed: opening /dev/null")?;
        // Safe: both descriptors are open; fd 1 is replaced atomically.
        if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1) } < 0 {
            anyhow::bail!("--distributed: rank {rank} could not silence its stdout");
        }
    }
    Ok(())
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
