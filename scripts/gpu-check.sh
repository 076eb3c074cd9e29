#!/usr/bin/env bash
# GPU check, run on a machine with a CUDA GPU and PyTorch 2.11 installed, with a release binary
# built elsewhere: `scripts/gpu-check.sh [path/to/nnflow]` (with nnflow-torch beside it). Prints what nnflow sees and shows GPU
# stages getting distinct CUDA devices.
set -euo pipefail
nnflow=$(realpath "${1:-target/release/nnflow}")
if torch_lib=$(python3 -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))" 2>/dev/null); then
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
    echo "no PyTorch here: CUDA will not be found"
fi
echo "== nnflow doctor"
"$nnflow" doctor
count=$("$nnflow" doctor --json | python3 -c "import json,sys; print(json.load(sys.stdin)['torch']['gpu_count'])")
echo "== GPU stages: one instance per device, each sees its own CUDA_VISIBLE_DEVICES"
work=$(mktemp -d)
cat > "$work/p.toml" <<TOML
[vars]
devices = [$(seq -s, 0 $((count > 0 ? count - 1 : 0)))]
[stages.probe]
kind = "command"
matrix = { device = "\${devices}" }
gpus = 1
cmd = "echo CUDA_VISIBLE_DEVICES=\$CUDA_VISIBLE_DEVICES > \$NNFLOW_OUT/seen; nvidia-smi -L >> \$NNFLOW_OUT/seen 2>&1 || true"
TOML
"$nnflow" run "$work/p.toml"
cat "$work"/.nnflow/p/out/probe/*/seen
echo "== second run: nothing runs"
"$nnflow" run "$work/p.toml"
rm -rf "$work"
echo "== training step, nnU-Net 3d_fullres topology at 128^3, batch 2 (nnU-Net on an H100: 69 ms eager, 45 ms compiled)"
"$(dirname "$nnflow")/nnflow-torch" bench-step --fullres128 --device cuda --amp --steps 20
"$(dirname "$nnflow")/nnflow-torch" bench-step --fullres128 --device cuda --steps 10
