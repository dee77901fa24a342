"""Speed and memory of fsad's exact AUPRO against a plain exact numpy implementation.

Builds a synthetic test set the size of MVTec AD's (1725 maps of 256 x 256 by default, 73 % of them
anomalous with 1-4 blob regions of varied sizes, float32 scores = noise + signal inside the regions),
checks that :func:`fsad_lightning.metrics.aupro` and the reference below agree to 1e-6, and prints the
median time over ``--repeats`` runs, the speed-up and the peak memory of each::

    python benchmarks/aupro.py                      # MVTec AD size
    python benchmarks/aupro.py --n-images 200 --size 128 --repeats 2

Peak memory is the growth of the process's peak resident set during the call (``VmHWM`` in
``/proc/self/status``, reset before each call through ``/proc/self/clear_refs``); where that is not
available, ``tracemalloc``'s peak (numpy allocations only). With a CUDA device the fsad metric is also
timed on the GPU (peak = ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage

from fsad_lightning.metrics import aupro, pixel_metrics


# ---------------------------------------------------------------------------------------------- data
def make_test_set(
    n_images: int, size: int, anomalous_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(maps float32 [N, S, S], masks bool [N, S, S])``: blob defects of varied sizes, noisy scores."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_images, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    n_anomalous = round(anomalous_fraction * n_images)
    for i in rng.choice(n_images, n_anomalous, replace=False):
        for _ in range(rng.integers(1, 5)):
            radius = max(1.0, size * rng.uniform(0.005, 0.15))  # from a few pixels to 30 % of the side
            ry, rx = radius * rng.uniform(0.4, 1.6, size=2)
            cy, cx = rng.uniform(0, size, size=2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    maps = rng.standard_normal(masks.shape, dtype=np.float32)
    strength = rng.uniform(0.0, 3.0, size=(n_images, 1, 1)).astype(np.float32)  # some defects barely show
    maps += strength * masks
    return maps, masks


# ---------------------------------------------------------------------------------------------- reference
def aupro_numpy_reference(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Plain exact AUPRO (MVTec AD definition): label regions, sort all pixels once, cumulate.

    Every pixel gets a PRO weight (``1 / |region|`` for defect pixels, 0 for normal ones); after a
    descending sort, cumulative sums at the last pixel of every group of equal scores give FPR and PRO at
    every distinct threshold. The curve starts at (0, 0); the end point at ``fpr_limit`` is interpolated
    linearly; the trapezoidal area is divided by ``fpr_limit``.
    """
    weights = np.zeros(maps.shape, dtype=np.float64)
    num_regions = 0
    for i in range(maps.shape[0]):
        labels, count = ndimage.label(masks[i], structure=np.ones((3, 3)))
        if count:
            sizes = np.bincount(labels.ravel())
            weights[i] = np.where(labels > 0, 1.0 / sizes[labels], 0.0)
            num_regions += count
    scores = maps.ravel()
    normal = ~masks.ravel()
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    false_positives = np.cumsum(normal[order])
    overlap = np.cumsum(weights.ravel()[order])
    group_ends = np.r_[np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), scores.size - 1]
    fpr = np.r_[0.0, false_positives[group_ends] / normal.sum()]
    pro = np.r_[0.0, overlap[group_ends] / num_regions]
    beyond = np.searchsorted(fpr, fpr_limit, side="right")
    if beyond < fpr.size:
        t = (fpr_limit - fpr[beyond - 1]) / (fpr[beyond] - fpr[beyond - 1])
        end = pro[beyond - 1] + t * (pro[beyond] - pro[beyond - 1])
        fpr, pro = np.r_[fpr[:beyond], fpr_limit], np.r_[pro[:beyond], end]
    return float(np.trapezoid(pro, fpr) / fpr_limit)


# ---------------------------------------------------------------------------------------------- measuring
def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_memory_mib(fn: Callable[[], float]) -> tuple[float, str]:
    """Peak extra memory of one call in MiB, and how it was measured."""
    baseline = _read_status_kib("VmRSS")
    if baseline is not None and _reset_peak_rss():
        fn()
        return (_read_status_kib("VmHWM") - baseline) / 1024, "peak RSS growth"
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return peak, "tracemalloc peak (numpy only)"


def time_interleaved(
    candidates: dict[str, Callable[[], float]], repeats: int
) -> dict[str, tuple[float, list[float]]]:
    """``{name: (value, times in s)}``; the candidates take turns in every repeat, so a machine whose load
    changes during the benchmark slows them alike."""
    results: dict[str, tuple[float, list[float]]] = {name: (float("nan"), []) for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            value = fn()
            results[name][1].append(time.perf_counter() - start)
            results[name] = (value, results[name][1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=1725, help="maps in the test set (MVTec AD: 1725)")
    parser.add_argument("--size", type=int, default=256, help="side of every map in pixels")
    parser.add_argument("--anomalous-fraction", type=float, default=1258 / 1725)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (median)")
    parser.add_argument("--fpr-limit", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    maps, masks = make_test_set(args.n_images, args.size, args.anomalous_fraction, args.seed)
    pixels = maps.size
    print(
        f"{args.n_images} maps of {args.size}x{args.size} = {pixels / 1e6:.1f} M pixels, "
        f"{masks.sum() / 1e6:.2f} M defect pixels; torch threads {torch.get_num_threads()}, "
        f"repeats {args.repeats}"
    )

    def all_pixel_metrics() -> float:
        return pixel_metrics(maps, masks, args.fpr_limit)["pixel_aupro"]

    candidates: dict[str, Callable[[], float]] = {
        "numpy reference (argsort)": lambda: aupro_numpy_reference(maps, masks, args.fpr_limit),
        "fsad aupro": lambda: aupro(maps, masks, args.fpr_limit),
        "fsad pixel_metrics (AUROC+AUPRO+F1)": all_pixel_metrics,
    }
    timed = time_interleaved(candidates, args.repeats)
    rows = []
    how = ""
    for name, fn in candidates.items():
        peak, how = peak_memory_mib(fn)
        rows.append((name, "cpu", *timed[name], peak))
    ref_value, ref_times = timed["numpy reference (argsort)"]
    value = timed["fsad aupro"][0]
    for name, (result, _) in timed.items():
        if abs(result - ref_value) > 1e-6:
            raise AssertionError(f"{name} gives {result!r}, the reference {ref_value!r}")

    if torch.cuda.is_available():
        maps_gpu, masks_gpu = torch.from_numpy(maps).cuda(), torch.from_numpy(masks).cuda()

        def on_gpu() -> float:
            result = aupro(maps_gpu, masks_gpu, args.fpr_limit)
            torch.cuda.synchronize()
            return result

        on_gpu()  # warm-up (CUDA context, kernels)
        torch.cuda.reset_peak_memory_stats()
        gpu_value, gpu_times = time_interleaved({"gpu": on_gpu}, args.repeats)["gpu"]
        gpu_peak = torch.cuda.max_memory_allocated() / 2**20
        rows.append((f"fsad aupro ({torch.cuda.get_device_name()})", "cuda", gpu_value, gpu_times, gpu_peak))
        if abs(gpu_value - ref_value) > 1e-6:
            raise AssertionError(f"fsad aupro on GPU {gpu_value!r} differs from the reference {ref_value!r}")

    reference_median = statistics.median(ref_times)
    header = ("implementation", "device", "AUPRO", "median s", "speed-up", "peak MiB")
    print("\n{:40s} {:6s} {:>10s} {:>9s} {:>9s} {:>9s}".format(*header))
    for name, device, result, run_times, peak_mib in rows:
        median = statistics.median(run_times)
        print(
            f"{name:40s} {device:6s} {result:10.7f} {median:9.3f} {reference_median / median:8.1f}x "
            f"{peak_mib:9.0f}"
        )
    print(
        f"\nvalues agree to 1e-6 (|fsad aupro - reference| = {abs(value - ref_value):.2e}); "
        f"times interleaved; memory: {how} (GPU: max_memory_allocated)"
    )


if __name__ == "__main__":
    main()
