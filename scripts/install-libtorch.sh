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
    # from a PyTorch installation when one is present. Python's zipfile, so no unzip is needed.
    python3 - "$work" "$staging" <<'PY'
import glob, os, shutil, sys, zipfile
work, staging = sys.argv[1], sys.argv[2]
def extract(wheel, keep, target):
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            relative = keep(member)
            if relative and not member.endswith("/"):
                destination = os.path.join(staging, target, relative)
                os.makedirs(os.path.dirname(destination), exist_ok=True)
                with archive.open(member) as source, open(destination, "wb") as out:
                    shutil.copyfileobj(source, out)
                os.chmod(destination, 0o755)
libs = ("libtorch_cpu.so", "libtorch.so", "libc10.so")
def torch_member(name):
    if name.startswith("torch/include/"):
        return os.path.join("..", "include", name[len("torch/include/"):])
    base = os.path.basename(name)
    if name.startswith("torch/lib/") and (base in libs or base.startswith("libgomp")):
        return base
def cuda_member(name):
    base = os.path.basename(name)
    if name.startswith("nvidia/cu13/lib/") and base.startswith(("libcudart.so.13", "libcupti.so.13")):
        return base
extract(glob.glob(os.path.join(work, "torch-*.whl"))[0], torch_member, "lib")
for wheel in glob.glob(os.path.join(work, "nvidia_cuda_*.whl")):
    extract(wheel, cuda_member, "lib")
PY
    echo "$version" > "$staging/build-version"
    rm -rf "$dest"
    mv "$staging" "$dest"
    touch "$stamp"
fi

ln -sfn "$dest" "$repo/.libtorch"
