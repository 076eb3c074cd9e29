"""nnU-Net 2.8.1's own training augmentation on 1 x 128^3 patches, for comparison with benches/augment.rs.

Builds the transforms with nnUNetTrainer.get_training_transforms exactly as a 3d_fullres run with a
128^3 patch does (rotation +-30 deg, nnU-Net's enlarged initial patch, mirror axes (0, 1, 2), no
deep supervision downsampling, no regions, no cascade, no mask-for-norm) and times them on one core
(torch.set_num_threads(1), single process), on the same input as the Rust bench: one channel of the
enlarged patch size with the same synthetic image and 3-label block segmentation.

    /root/.cache/nnflow/nnunet-venv/bin/python benches/augment_nnunet.py [n_patches, default 32]

Prints patches/s on one core (wall time, and per CPU-second, which stays comparable on a machine busy
with other work), the time of one patch with a forced rotation (as benches/augment.rs does), and the
wall and CPU time of each transform forced on (probability 1) on its own, inputs cloned outside the
timing.
"""
import sys
import time
from copy import deepcopy

import numpy as np
import torch

from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform


def build(patch_size):
    """nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size for an isotropic 3D patch."""
    rot = (-30. / 360 * 2. * np.pi, 30. / 360 * 2. * np.pi)
    initial = [int(i) for i in get_patch_size(patch_size, rot, rot, rot, (0.85, 1.25))]
    transforms = nnUNetTrainer.get_training_transforms(
        patch_size, rot, None, (0, 1, 2), False, use_mask_for_norm=None, is_cascaded=False,
        foreground_labels=None, regions=None, ignore_label=None)
    return transforms, initial


def make_input(shape):
    """The same synthetic sample as benches/augment.rs."""
    a, b, c = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    image = (((a * 31 + b * 7 + c) % 101) / 50.0 - 1.0).astype(np.float32)[None]
    seg = ((a // 20 + b // 25 + c // 30) % 3).astype(np.int16)[None]
    return torch.from_numpy(image), torch.from_numpy(seg)


def run(transform, image, seg):
    # the loader hands each sample over as fresh tensors; transforms may work in place
    return transform(image=image.clone(), segmentation=seg.clone())


def throughput(transform, image, seg, n):
    """patches/s by wall and by CPU time, each sample cloned outside the timing (as benches/augment.rs)."""
    wall = cpu = 0.0
    for _ in range(n):
        img, sg = image.clone(), seg.clone()
        t, c = time.perf_counter(), time.process_time()
        out = transform(image=img, segmentation=sg)
        wall += time.perf_counter() - t
        cpu += time.process_time() - c
        del out
    return n / wall, n / cpu


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    torch.set_num_threads(1)
    np.random.seed(0)
    torch.manual_seed(0)
    patch = (128, 128, 128)
    transforms, initial = build(patch)
    image, seg = make_input(initial)
    z, y, x = initial
    with torch.no_grad():
        run(transforms, image, seg)  # warm-up (first-call allocations, grid cache)
        one, one_cpu = throughput(transforms, image, seg, n)

        forced = deepcopy(transforms)
        spatial = next(t for t in forced.transforms if isinstance(t, SpatialTransform))
        spatial.p_rotation = 1.0
        t = time.perf_counter()
        run(forced, image, seg)
        rot = time.perf_counter() - t

        print(f"nnU-Net 2.8.1 default pipeline, 1x128^3 patches from 1x{z}x{y}x{x}, {n} patches")
        print(f"  1 thread : {one:.2f} patches/s ({one_cpu:.2f} per CPU-second)")
        print(f"  one patch with forced rotation: {rot:.3f} s")

        # each transform on its own, forced on; everything after the spatial one sees a 128^3 patch
        print("  per transform, forced on, 1 thread (ms wall, ms CPU):")
        patch_in = run(spatial, image, seg)
        def timed(name, tr, src, reps):
            wall = cpu = 0.0
            for _ in range(reps):
                img, sg = src[0].clone(), src[1].clone()
                t, c = time.perf_counter(), time.process_time()
                tr(image=img, segmentation=sg)
                wall += time.perf_counter() - t
                cpu += time.process_time() - c
            print(f"    {name:<40} {1e3 * wall / reps:8.1f} {1e3 * cpu / reps:8.1f}")

        for tr in transforms.transforms:
            inner = tr.transform if isinstance(tr, RandomTransform) else tr
            name = type(inner).__name__
            if isinstance(inner, SpatialTransform):
                rotated = deepcopy(inner)
                rotated.p_rotation, rotated.p_scaling = 1.0, 1.0
                timed(name + " (rotation+scaling)", rotated, (image, seg), 2)
                # batchgeneratorsv2's defaults for the deformation, which nnU-Net leaves off
                elastic = deepcopy(rotated)
                elastic.p_elastic_deform = 1.0
                timed(name + " (rotation+scaling+elastic)", elastic, (image, seg), 2)
            else:
                timed(name, inner, (patch_in["image"], patch_in["segmentation"]), 5)


if __name__ == "__main__":
    main()
