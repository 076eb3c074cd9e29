//! Links nnflow's binaries and tests against libtorch with an rpath, so they run without
//! LD_LIBRARY_PATH (tch's own link flags do not reach downstream binaries). RUNPATH semantics are
//! kept so an LD_LIBRARY_PATH pointing at a CUDA-enabled PyTorch still wins.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        return;
    };
    let lib = PathBuf::from(libtorch).join("lib");
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
