//! The `nnflow` binary: parse arguments, run, map the result to an exit code.

fn main() {
    // Before any tch call, so CUDA-enabled libtorch is visible when present.
    nnflow::torch_env::load_cuda();
    std::process::exit(nnflow::cli::main());
}
