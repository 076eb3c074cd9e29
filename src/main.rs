//! The `nnflow` binary: parse arguments, run, map the result to an exit code. It does not link
//! libtorch: torch work happens in the `nnflow-torch` worker.

fn main() {
    std::process::exit(nnflow::cli::main());
}
