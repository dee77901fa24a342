"""One-to-Normal end to end with the offline config: `fsad fit` -> LoRA checkpoint -> `fsad test`,
then `fsad generate` (reusing the test's pool) and a second method fed with the pool (the paper's Fig. 4)."""

import glob
import math
import os
from pathlib import Path

import pytest
import torch

from fsad_lightning.commands.generate import generate_main
from fsad_lightning.commands.lightning_cli import run_cli
from fsad_lightning.data.synthetic import write_synthetic_category
from fsad_lightning.methods.one_to_normal import DreamBoothNormalModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
REAL_CONFIGS = ["mvtec", "visa", "ksdd", "elpv", "brainmri", "headct"]


@pytest.mark.slow
def test_fit_test_generate_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "fsad_cache"))  # where the tiny SD is built
    write_synthetic_category(tmp_path / "data", "widget", n_train=4, n_test_good=2, n_test_defect=1, size=64)
    runs, pools = tmp_path / "runs", tmp_path / "pools"
    data = [
        "--data.init_args.root",
        str(tmp_path / "data"),
        "--data.init_args.dataset",
        "folder",
        "--data.init_args.category",
        "widget",
    ]
    common = [
        "--config",
        str(CONFIGS / "one_to_normal_tiny.yaml"),
        *data,
        "--model.init_args.cache_dir",
        str(pools),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(runs),
        "--trainer.default_root_dir",
        str(runs),
    ]

    fit = run_cli(["fit", *common])
    assert int(fit.model.trained_epochs) >= 1
    ckpt = glob.glob(str(runs / "**" / "last.ckpt"), recursive=True)
    assert len(ckpt) == 1
    state = torch.load(ckpt[0], map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(".lora_" in k for k in state if k != "trained_epochs")  # adapters only

    test = run_cli(["test", *common, "--ckpt_path", ckpt[0]])
    results = test.model.test_results
    for key in ("image_auroc", "image_auprc", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= results[key] <= 1.0 and math.isfinite(results[key])
    assert glob.glob(str(runs / "**" / "results.json"), recursive=True)
    # the customized model's pool (pool_size 6 = 2 shots + 4 generated) and the class images are cached
    markers = sorted(pools.glob("*/pool.json"))
    assert len(markers) == 2
    pool_images = sorted(pools.glob("*/images/*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in pool_images}

    # `fsad generate` with the same checkpoint finds the test's pool and regenerates nothing
    cache = generate_main([*common, "--ckpt_path", ckpt[0]])
    assert cache.is_complete(4) and cache.marker in markers
    assert {p: p.stat().st_mtime_ns for p in sorted(pools.glob("*/images/*.png"))} == stamps

    # any method takes the pool as extra normals (Fig. 4: with vs. without generated normals)
    patchknn = [
        "--model",
        "fsad_lightning.methods.patchknn.PatchKNNModule",
        "--model.init_args.backbone",
        "tf_efficientnet_lite0",
        "--model.init_args.weights",
        "random",
        *data,
        "--data.init_args.k_shot",
        "2",
        "--data.init_args.image_size",
        "64",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(runs),
    ]
    with_pool = run_cli(["test", *patchknn, "--data.init_args.extra_normal_dirs", f"[{cache.image_dir}]"])
    extras = with_pool.datamodule.manifest["extra_normals"]
    assert len(extras) == 4 and all(os.path.dirname(p) == str(cache.image_dir) for p in extras)
    assert (
        with_pool.model.model.memory_bank.shape[0]
        == 3 * run_cli(["test", *patchknn]).model.model.memory_bank.shape[0]
    )


@pytest.mark.parametrize("name", [*REAL_CONFIGS, "tiny"])
def test_configs_name_real_arguments(name, checked_config):
    config = checked_config(
        CONFIGS / f"one_to_normal_{name}.yaml",
        "fsad_lightning.methods.one_to_normal.DreamBoothNormalModule",
        DreamBoothNormalModule,
    )
    args = config["model"]["init_args"]
    if name != "tiny":  # the paper's models and settings
        assert args["diffusion_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
        assert (args["clip_model"], args["clip_pretrained"], args["image_encoder"]) == (
            "ViT-L-14",
            "openai",
            "clip",
        )
        assert (args["strength"], args["alpha"], args["beta"], args["pool_size"]) == (0.3, 1.0, 0.5, 30)
        assert config["data"]["init_args"]["image_size"] == 240
