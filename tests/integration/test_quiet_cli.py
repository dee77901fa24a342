"""A normal ``fsad`` run prints no third-party tips or deprecation noise; ``--verbose`` shows them.

One fresh process (what the console script does: ``sys.exit(main())`` on ``sys.argv``) runs a tiny
PatchKNN fit on synthetic data, which triggers every filtered message (Lightning's two tips, torch's
``LeafSpec`` deprecation via Lightning, the eval-mode and logging-interval hints), then the same fit
with ``--verbose``; one process instead of two saves an import of Lightning.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fsad_lightning.data.synthetic import write_synthetic_category

NOISE = (
    "💡",
    "Tip: For seamless",
    "litlogger",
    "litmodels",
    "LeafSpec",
    "is deprecated",
    "_register_pytree_node",
    "module(s) in eval mode",
    "smaller than the logging interval",
)
MARKER = "=== the same fit with --verbose ==="
PATCHKNN = {
    "class_path": "fsad_lightning.methods.patchknn.PatchKNNModule",
    "init_args": {"backbone": "tf_efficientnet_lite0", "weights": "random", "sigma": 1.0},
}


@pytest.mark.slow
def test_a_normal_run_is_quiet_and_verbose_shows_everything(tmp_path, write_config):
    write_synthetic_category(tmp_path / "data", "widget", n_train=4, n_test_good=2, n_test_defect=1, size=32)
    data = {"root": str(tmp_path / "data"), "category": "widget", "k_shot": 2, "image_size": 32}
    config = write_config(PATCHKNN, data, {"enable_progress_bar": False})
    env = {k: v for k, v in os.environ.items() if k not in ("FSAD_DEBUG", "FSAD_VERBOSE", "PYTHONWARNINGS")}
    env["OMP_NUM_THREADS"] = "1"
    script = (
        "import sys\n"
        "from fsad_lightning.commands.dispatch import main\n"
        f"sys.argv = ['fsad', 'fit', '--config', {config!r}]\n"
        "main()\n"
        f"print({MARKER!r}, file=sys.stderr, flush=True)\n"
        "sys.argv = sys.argv[:1]\n"
        f"sys.exit(main(['--verbose', 'fit', '--config', {config!r}]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    quiet, verbose = done.stderr.split(MARKER)
    assert "`Trainer.fit` stopped" in quiet and "GPU available" in quiet  # the run's own lines stay
    assert not [noise for noise in NOISE if noise in quiet or noise in done.stdout], quiet
    for expected in ("💡 Tip: For seamless", "litlogger", "litmodels", "LeafSpec", "module(s) in eval mode"):
        assert expected in verbose, verbose
