#!/usr/bin/env bash
# Installs the CPU part of libtorch 2.11.0 (what tch 0.24 is built for) from PyPI wheels into a cache
# directory outside git, then links it as `.libtorch` in the repository so `.cargo/config.toml` finds it.
# Idempotent: a completed install is marked by a stamp file and not repeated.
# Why PyPI: the pytorch.org download site is unreachable here; the torch wheel carries libtorch.
set -euo pipefail

version=2.11.0
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${NNFLOW_LIBTORCH_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nnflow/libtorch-$version}
stamp="$dest/.complete"

if [ ! -f "$stamp" ]; then
    echo "installing libtorch $version into $dest" >&2
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    python3 -m pip download --quiet --no-deps --dest "$work" \
        "torch==$version" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cupti==13.0.*"
    staging="$dest.partial"
    rm -rf "$staging"
    mkdir -p "$staging/lib"
    # Only what a CPU build links against (about 500 MB unpacked); CUDA is dlopen'ed at run time
    # from a PyTorch installation when one is present.
    unzip -q "$work"/torch-*.whl 'torch/include/*' 'torch/lib/libtorch_cpu.so' 'torch/lib/libtorch.so' \
        'torch/lib/libc10.so' 'torch/lib/libgomp*' -d "$work/torch"
    mv "$work/torch/torch/include" "$staging/include"
    mv "$work/torch/torch/lib/"* "$staging/lib/"
    for wheel in "$work"/nvidia_cuda_runtime-*.whl "$work"/nvidia_cuda_cupti-*.whl; do
        unzip -q "$wheel" 'nvidia/cu13/lib/*' -d "$work/nv"
    done
    cp -a "$work"/nv/nvidia/cu13/lib/libcudart.so.13* "$work"/nv/nvidia/cu13/lib/libcupti.so.13* "$staging/lib/"
    echo "$version" > "$staging/build-version"
    rm -rf "$dest"
    mv "$staging" "$dest"
    touch "$stamp"
fi

ln -sfn "$dest" "$repo/.libtorch"
