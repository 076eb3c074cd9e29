"""`nnflow predict` against `nnUNetv2_predict` (nnU-Net 2.8.1) on CPU: the same model, images and settings.

Run by hand (not in CI), after `cargo build --release --bin nnflow --bin nnflow-torch`:

    /root/.cache/nnflow/nnunet-venv/bin/python benches/predict_vs_nnunet.py [--cases 3] [--shape 64,160,160]
        [--spacing 3.0,0.8,0.8] [--threads 1,2] [--tta both|on|off] [--repeats 1] [--keep DIR]

Model: tests/fixtures/predict_resenc/model.zip (ResidualEncoderUNet planned by nnUNetPlannerResEncM, trained by
nnU-Net's own nnUNetTrainer_5epochs: a trainer class nnU-Net ships, so its own command loads it). nnU-Net gets it
through `nnUNetv2_install_pretrained_model_from_zip` into a temporary nnUNet_results; nnflow reads the zip.

Images: `--cases` synthetic CT-like volumes (int16 HU; the predict fixture's `make_case`: organ ellipsoid, lesions,
a bright bar, blur and noise) of `--shape` (z, y, x) voxels at `--spacing` (z, y, x) mm, so both tools resample to
the plan's spacing (2.5, 1, 1) and back.

Settings, the same for both: fold 0, checkpoint_final.pth, step 0.5, gaussian, device cpu, TTA (mirroring) on and
off, on N cores for each N of `--threads`, pinned with `taskset -c 0..N-1`:
- nnflow: `nnflow predict -i images -o out -m model.zip -f 0 --step-size 0.5 [--disable-tta] --device cpu` in a
  fresh folder with a fresh cache (NNFLOW_CACHE_DIR), so the first run computes everything (cold); it uses the
  cores it may run on. The same command again (cached) is timed too. `nnflow predict` writes its one-stage
  pipeline without `threads`, i.e. the stage default of 1 thread, whatever N; so for N > 1 a third nnflow row runs
  that same pipeline with `threads = 0` (every core the run may use) through `nnflow run`, also cold.
- nnU-Net: `nnUNetv2_predict -i images -o out -d 990 -tr nnUNetTrainer_5epochs -p nnUNetResEncUNetMPlans
  -c 3d_fullres -f 0 -step_size 0.5 -chk checkpoint_final.pth -device cpu -npp N -nps N [--disable_tta]
  --disable_progress_bar`. With device cpu it sets torch's threads to multiprocessing.cpu_count(), which in Python
  3.11 counts every core of the machine whatever taskset allows; when N is less than all cores the script runs the
  same entry point (`predict_entry_point`, what the console script calls) with cpu_count reporting N.

Figures per run: wall time of the whole command; peak memory of the whole process tree (the command and every
descendant: nnflow's torch worker, nnU-Net's preprocessing and export workers), sampled from /proc every 50 ms, as
the sum of PSS (shared pages split between the processes that map them: libtorch loaded by several processes is
counted once) and the sum of RSS (shared pages counted in every process); the most processes alive at once; CPU
time (user + sys) of all reaped descendants (getrusage RUSAGE_CHILDREN). A check line says how many voxels of
nnflow's segmentations equal nnU-Net's for the same setting. Timing is noisy on a busy machine: `--repeats` takes
the best wall time of R cold runs (each in a fresh folder). Nothing is asserted.
"""

import argparse
import importlib.util
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
MODEL_ZIP = ROOT / "tests/fixtures/predict_resenc/model.zip"
NNFLOW = ROOT / "target/release/nnflow"
BIN = Path(sys.executable).parent
DATASET, TRAINER, PLANS, CONFIG = "990", "nnUNetTrainer_5epochs", "nnUNetResEncUNetMPlans", "3d_fullres"
SAMPLE_S = 0.05

# nnUNetv2_predict's own entry point with multiprocessing.cpu_count() reporting the cores this process may use
NNUNET_ON_N_CORES = (
    "import multiprocessing, os, sys\n"
    "multiprocessing.cpu_count = lambda: len(os.sched_getaffinity(0))\n"
    "from nnunetv2.inference.predict_from_raw_data import predict_entry_point\n"
    "sys.argv[0] = 'nnUNetv2_predict'\n"
    "sys.exit(predict_entry_point())\n"
)


def make_case_function():
    """`make_case` of tests/fixtures/predict/generate.py. Importing that file sets nnU-Net variables in os.environ
    (and imports nnunetv2); they are undone so that both tools run with this process's environment."""
    saved = dict(os.environ)
    spec = importlib.util.spec_from_file_location("predict_fixture_generate",
                                                  ROOT / "tests/fixtures/predict/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.environ.clear()
    os.environ.update(saved)
    return module.make_case, module.direction_zrot, module.write_nifti


def write_images(folder, n, shape, spacing, seed=2024):
    make_case, direction_zrot, write_nifti = make_case_function()
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        img, _ = make_case(rng, shape, spacing, n_lesions=3)
        write_nifti(img, spacing, folder / f"Bench_{i:03d}_0000.nii.gz", origin=tuple(rng.uniform(-100, 100, 3)),
                    direction=direction_zrot(rng.uniform(-15, 15)))


class TreeSampler:
    """Peak PSS / RSS sums and process count of a process and all its descendants, sampled from /proc."""

    def __init__(self, root_pid):
        self.root = root_pid
        self.known = {root_pid}
        self.peak_pss = self.peak_rss = self.peak_procs = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    @staticmethod
    def parents():
        out = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    with open(f"/proc/{entry.name}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                # the command name may hold spaces: the fields after it follow the last ')'
                out[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
        return out

    @staticmethod
    def memory_kib(pid):
        pss = rss = 0
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss = int(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss = int(line.split()[1])
        except OSError:
            pass
        return pss, rss

    def sample(self):
        parents = self.parents()
        children = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        # descendants of the root and of every process seen before (a worker whose parent died stays counted)
        alive = {p for p in self.known if p in parents}
        todo = list(alive)
        while todo:
            for c in children.get(todo.pop(), []):
                if c not in alive:
                    alive.add(c)
                    todo.append(c)
        self.known = alive | {self.root}
        pss = rss = 0
        for pid in alive:
            p, r = self.memory_kib(pid)
            pss, rss = pss + p, rss + r
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, len(alive))

    def loop(self):
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(SAMPLE_S)

    def finish(self):
        self.stop.set()
        self.thread.join()


def measure(cmd, cwd, env):
    """Runs cmd; wall s, peak PSS MiB, peak RSS MiB, most processes, CPU s of the reaped tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sampler = TreeSampler(proc.pid)
    output, _ = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.finish()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{output.decode(errors='replace')[-4000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "pss": sampler.peak_pss / 1024, "rss": sampler.peak_rss / 1024,
            "procs": sampler.peak_procs, "cpu": cpu}


def taskset(n):
    return ["taskset", "-c", ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:n])]


def run_nnflow(work, images, n, tta):
    folder = Path(tempfile.mkdtemp(prefix="nnflow_", dir=work))
    shutil.copytree(images, folder / "images")
    shutil.copy(MODEL_ZIP, folder / "model.zip")
    env = dict(os.environ, NNFLOW_CACHE_DIR=str(folder / "cache"))
    cmd = taskset(n) + [str(NNFLOW), "predict", "-i", "images", "-o", "out", "-m", "model.zip", "-f", "0",
                        "--step-size", "0.5", "--device", "cpu"] + ([] if tta else ["--disable-tta"])
    cold = measure(cmd, folder, env)
    warm = measure(cmd, folder, env)
    return cold, warm, folder / "out"


def run_nnflow_all_cores(work, images, n, tta):
    """The pipeline `nnflow predict` wrote, with `threads = 0`, run cold in a fresh folder and cache."""
    first = next(work.glob("nnflow_*/nnflow-predict.toml"))
    folder = Path(tempfile.mkdtemp(prefix="nnflow_threads_", dir=work))
    shutil.copytree(images, folder / "images")
    shutil.copy(MODEL_ZIP, folder / "model.zip")
    lines = [line for line in first.read_text().splitlines() if not line.startswith("#")]
    mirroring = f"mirroring = {'true' if tta else 'false'}"
    text = "\n".join(mirroring if line.startswith("mirroring =") else line for line in lines)
    (folder / "p.toml").write_text(text.replace('device = "cpu"', 'device = "cpu"\nthreads = 0') + "\n")
    env = dict(os.environ, NNFLOW_CACHE_DIR=str(folder / "cache"))
    return measure(taskset(n) + [str(NNFLOW), "run", "p.toml"], folder, env)


def run_nnunet(work, images, results, n, tta):
    folder = Path(tempfile.mkdtemp(prefix="nnunet_", dir=work))
    env = dict(os.environ, nnUNet_results=str(results), nnUNet_raw=str(work / "nnUNet_raw"),
               nnUNet_preprocessed=str(work / "nnUNet_preprocessed"))
    args = ["-i", str(images), "-o", str(folder / "out"), "-d", DATASET, "-tr", TRAINER, "-p", PLANS, "-c", CONFIG,
            "-f", "0", "-step_size", "0.5", "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", str(n),
            "-nps", str(n), "--disable_progress_bar"] + ([] if tta else ["--disable_tta"])
    if n >= os.cpu_count():
        exe = [str(BIN / "nnUNetv2_predict")]
    else:
        exe = [sys.executable, "-c", NNUNET_ON_N_CORES]
    return measure(taskset(n) + exe + args, folder, env), folder / "out"


def agreement(a_dir, b_dir):
    same = total = 0
    for f in sorted(b_dir.glob("*.nii.gz")):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(a_dir / f.name)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        same += int((a == b).sum())
        total += b.size
    return same / total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--shape", default="64,160,160", help="z,y,x voxels")
    ap.add_argument("--spacing", default="3.0,0.8,0.8", help="z,y,x mm")
    ap.add_argument("--threads", default="1,2", help="core counts, comma-separated")
    ap.add_argument("--tta", choices=("both", "on", "off"), default="both", help="mirroring test-time augmentation")
    ap.add_argument("--repeats", type=int, default=1, help="cold runs per setting; the best wall time is shown")
    ap.add_argument("--keep", help="work folder to keep (default: a temporary one, removed)")
    a = ap.parse_args()
    shape = tuple(int(x) for x in a.shape.split(","))
    spacing = tuple(float(x) for x in a.spacing.split(","))
    threads = [int(x) for x in a.threads.split(",")]
    for need in (NNFLOW, NNFLOW.with_name("nnflow-torch"), MODEL_ZIP):
        if not need.exists():
            sys.exit(f"missing {need} (cargo build --release --bin nnflow --bin nnflow-torch)")
    if max(threads) > len(os.sched_getaffinity(0)):
        sys.exit(f"--threads {max(threads)}: this process may use {len(os.sched_getaffinity(0))} cores")

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_predict_vs_nnunet_"))
    work.mkdir(parents=True, exist_ok=True)
    images = work / "images"
    if not images.exists():
        write_images(images, a.cases, shape, spacing)
    results = work / "nnUNet_results"
    if not results.exists():
        env = dict(os.environ, nnUNet_results=str(results), nnUNet_raw=str(work / "nnUNet_raw"),
                   nnUNet_preprocessed=str(work / "nnUNet_preprocessed"))
        subprocess.run([str(BIN / "nnUNetv2_install_pretrained_model_from_zip"), str(MODEL_ZIP)], env=env,
                       check=True, stdout=subprocess.DEVNULL)

    print(f"model {MODEL_ZIP.relative_to(ROOT)} ({TRAINER}__{PLANS}__{CONFIG}, fold 0)")
    print(f"{a.cases} images {'x'.join(map(str, shape))} (z,y,x) at {spacing} mm, step 0.5, CPU, "
          f"{os.cpu_count()} cores on this machine, best of {a.repeats} cold run(s)")
    print(f"{'tool':<26}{'cores':>6}{'TTA':>5}{'wall s':>9}{'peak PSS MiB':>14}{'peak RSS MiB':>14}"
          f"{'procs':>7}{'CPU s':>8}")

    def row(tool, n, tta, m):
        print(f"{tool:<26}{n:>6}{'on' if tta else 'off':>5}{m['wall']:>9.2f}{m['pss']:>14.0f}{m['rss']:>14.0f}"
              f"{m['procs']:>7}{m['cpu']:>8.1f}", flush=True)

    for n in threads:
        for tta in {"both": (True, False), "on": (True,), "off": (False,)}[a.tta]:
            ours, theirs, warms, all_cores = [], [], [], []
            for _ in range(a.repeats):
                cold, warm, ours_out = run_nnflow(work, images, n, tta)
                ours.append(cold)
                warms.append(warm)
                if n > 1:
                    all_cores.append(run_nnflow_all_cores(work, images, n, tta))
                m, theirs_out = run_nnunet(work, images, results, n, tta)
                theirs.append(m)
            best = lambda ms: min(ms, key=lambda m: m["wall"])  # noqa: E731
            row("nnUNetv2_predict", n, tta, best(theirs))
            row("nnflow predict (cold)", n, tta, best(ours))
            row("nnflow predict (cached)", n, tta, best(warms))
            if all_cores:
                row("nnflow, threads = 0 (cold)", n, tta, best(all_cores))
            print(f"  nnflow == nnU-Net on {agreement(ours_out, theirs_out) * 100:.3f}% of voxels; "
                  f"wall nnU-Net / nnflow = {best(theirs)['wall'] / best(ours)['wall']:.2f}x", flush=True)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
