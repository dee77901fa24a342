"""Whole quickstart speed (issue 15): ``fsad test --config configs/quickstart.yaml`` of main before issue 15
and of this checkout, timed alternately in one run on the same machine.

The source tree of ``--old-ref`` (default ``38aa3e8``, main just before issue 15's first commit) is exported
with ``git archive`` into a temporary folder; each repeat then runs, one after the other,

- ``old``: that tree's ``fsad test`` with that tree's ``configs/quickstart.yaml`` (0.5 / 0.5 inputs, each
  stage pooled 3 x 3 before the concatenation, contiguous backbone, ``argmin`` neighbour search, RGB
  decoding), and
- ``new``: this checkout's ``fsad test`` with its ``configs/quickstart.yaml`` (ImageNet inputs, the
  stride-8, -16 and -32 stages where the old one took 8 and 16, concat then 5 x 5 pooling, channels-last
  backbone, grayscale decoding, and the label-free leave-one-out threshold on top: four more memory builds
  the old command did not do; a BatchNorm-folded copy of the backbone, the blocked first-minimum search
  with the stride-32 stage factored into it (:class:`~fsad_lightning.scoring.SpatialFactor`), and the
  ``fsad`` process keeping freed memory for reuse, :mod:`fsad_lightning.allocator`), and
- with ``--allocator-off-too``, also ``new, allocator off``: the same with ``FSAD_KEEP_FREED_MEMORY=0``, to
  show how much of the gain is the page faults saved on this machine (that share depends on what a page
  fault costs here; on a virtual machine it is large),

each in a fresh ``python -m fsad_lightning.commands`` process (so the wall time is what a user waits for:
start-up, imports, weights, shots, 1,931 test images, metrics, files). The child checks that it imported
the tree it was meant to. Prints each run's wall time and image AUROC, then the medians, the test images
per second (test images / median wall) and the ratio::

    python benchmarks/quickstart_speed.py --repeats 2 --allocator-off-too

Run it on a quiet machine: both commands use every core, and a job beside them moves the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: run in the child: import fsad_lightning from the tree named by argv[1], check it, then run ``fsad``
CHILD = (
    "import os, runpy, sys; import fsad_lightning; tree = os.path.realpath(sys.argv[1]); "
    "found = os.path.realpath(fsad_lightning.__file__); "
    "sys.exit(f'imported {found}, not from {tree}') if not found.startswith(tree + os.sep) else None; "
    "sys.argv = ['fsad'] + sys.argv[2:]; runpy.run_module('fsad_lightning.commands', run_name='__main__')"
)


def export_tree(ref: str, into: str) -> str:
    """``git archive`` of ``ref`` unpacked into ``into``; returns the folder."""
    archive = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", ref], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return into


def run_quickstart(tree: str, save_dir: str, extra_env: dict[str, str]) -> tuple[float, dict]:
    """One ``fsad test`` of ``tree``'s quickstart into the fresh folder ``save_dir``; returns (wall seconds,
    its ``results.json``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults for all
    env.update(PYTHONPATH=tree, HF_HUB_OFFLINE="1", WANDB_MODE="offline", **extra_env)
    command = [sys.executable, "-c", CHILD, tree, "test", "--config", os.path.join(tree, "configs", "quickstart.yaml"),
               f"--trainer.logger.init_args.save_dir={save_dir}"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"fsad test of {tree} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    with open(os.path.join(save_dir, "quickstart", "version_0", "results.json")) as handle:
        return wall, json.load(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-ref", default="38aa3e8", help="git revision of the old quickstart (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--allocator-off-too", action="store_true",
                        help="also time this checkout with FSAD_KEEP_FREED_MEMORY=0")
    args = parser.parse_args()

    # name -> (tree key, extra environment)
    variants = {"old": ("old", {}), "new": ("new", {})}
    if args.allocator_off_too:
        variants["new, allocator off"] = ("new", {"FSAD_KEEP_FREED_MEMORY": "0"})
    with tempfile.TemporaryDirectory(prefix="fsad_quickstart_speed_") as scratch:
        os.makedirs(os.path.join(scratch, "old"))
        trees = {"old": export_tree(args.old_ref, os.path.join(scratch, "old")), "new": REPO}
        walls: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for index, (name, (tree, extra_env)) in enumerate(variants.items()):
                save_dir = os.path.join(scratch, f"runs_{index}_{repeat}")
                wall, record = run_quickstart(trees[tree], save_dir, extra_env)
                walls[name].append(wall)
                print(f"repeat {repeat + 1} {name}: {wall:.1f} s, image AUROC {100 * record['image_auroc']:.1f}",
                      flush=True)
                if name == "new":  # the test split both commands score (main before issue 15 did not record it)
                    images = record["num_images"]
    print(f"{images} ELPV test images, {os.cpu_count()} cores, {args.repeats} repeats (median wall of fsad test)")
    medians = {name: statistics.median(values) for name, values in walls.items()}
    for name in variants:
        label = args.old_ref if name == "old" else "this checkout" + name[3:]
        print(f"{name} ({label}): {medians[name]:.1f} s, {images / medians[name]:.1f} test images/s, "
              f"{medians['old'] / medians[name]:.2f}x faster than old")


if __name__ == "__main__":
    main()
