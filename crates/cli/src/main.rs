//! `kvsplit-mlx`: LLM inference on MLX with keys and values cached at different precisions.

mod generate;
mod info;
mod kv_args;
mod model_args;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kvsplit-mlx", version, about = "LLM inference on MLX with a split-precision (K/V) quantized KV cache")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the MLX version, backend, device, libmlx path and memory figures.
    Info,
    /// Generate text from a prompt.
    Generate(generate::GenerateArgs),
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info => info::run(),
        Command::Generate(a) => generate::run(a),
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
