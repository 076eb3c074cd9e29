//! The `nnflow` binary: parse arguments, run, map the result to an exit code. It does not link
//! libtorch: torch work happens in the `nnflow-torch` worker.

fn main() {
    keep_freed_memory();
    std::process::exit(nnflow::cli::main());
}

/// Stages allocate and free volumes of hundreds of megabytes case after case. By default glibc
/// serves each from a fresh mmap and returns it on free, so every case pays for page faults and
/// zeroing again (it showed as a third of preprocessing time). Keeping freed memory in the heap
/// lets the next case reuse it.
fn keep_freed_memory() {
    // SAFETY: mallopt only tunes allocator thresholds; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
