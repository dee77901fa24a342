"""One-to-Normal end to end with the offline config: `fsad fit` -> LoRA checkpoint -> `fsad test`,
then `fsad generate` (reusing the test's pool) and a second method fed with the pool (the paper's Fig. 4)."""

import glob
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from fsad_lightning.commands.generate import generate_main
from fsad_lightning.commands.lightning_cli import run_cli
from fsad_lightning.data import FewShotDataModule
from fsad_lightning.data.augment import AugmentConfig
from fsad_lightning.data.synthetic import write_synthetic_category
from fsad_lightning.methods.one_to_normal import DreamBoothNormalModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: the paper's 11 datasets (§4.1) and the whole-UNet fine-tune, with the flips each config opts in to
#: (orientation-changing augmentation stays off where orientation carries meaning)
REAL_CONFIGS = {
    "mvtec": (0.0, 0.0), "mvtec_full": (0.0, 0.0), "visa": (0.0, 0.0), "ksdd": (0.5, 0.5),
    "afid": (0.5, 0.5), "elpv": (0.5, 0.5), "oct2017": (0.5, 0.0), "brainmri": (0.5, 0.0),
    "headct": (0.5, 0.0), "resc": (0.5, 0.0), "mnist": (0.0, 0.0), "cifar10": (0.5, 0.0),
}
DATASETS = {"mnist": "mnist", "cifar10": "cifar10", "visa": "visa", "elpv": "elpv"}


@pytest.mark.slow
def test_fit_test_generate_round_trip(tmp_path, monkeypatch, autocast_while_sampling):
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

    # `fsad generate` samples a new pool in the trainer's precision, as `fsad test` builds its own
    autocast_while_sampling.clear()
    generate_main([*common, "--ckpt_path", ckpt[0], "--num_images", "1", "--trainer.precision", "bf16-mixed"])
    assert autocast_while_sampling == [True]


@pytest.mark.parametrize("name", [*REAL_CONFIGS, "tiny"])
def test_configs_name_real_arguments(name, checked_config, tmp_path):
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
        assert (args["num_inference_steps"], args["num_prompts"], args["clip_image_size"]) == (20, 3, None)
        assert args["finetune"] == ("full" if name == "mvtec_full" else "lora")
        data = config["data"]["init_args"]
        assert data["image_size"] == 240 and data["k_shot"] == 4 and data["augment"] is True
        assert data["dataset"] == DATASETS.get(name, "folder")
        augment = AugmentConfig.from_dict(data.get("augment_options"))
        assert (augment.hflip, augment.vflip, augment.rot90) == (*REAL_CONFIGS[name], 0.0)
        assert augment.affine > 0 and augment.color_jitter > 0  # photometric + small affine jitter everywhere
        if name in ("afid", "oct2017", "resc"):  # the expected layout is written in the config
            text = (CONFIGS / f"one_to_normal_{name}.yaml").read_text()
            for folder in ("train/good", "test/good"):
                assert f"{data['root']}/{data['category']}/{folder}" in text
        if data["dataset"] == "folder":  # the datamodule reads that layout with the config's settings
            write_synthetic_category(
                tmp_path, data["category"], n_train=4, n_test_good=1, n_test_defect=1, size=32
            )
            datamodule = FewShotDataModule(**{**data, "root": str(tmp_path)})
            datamodule.setup("fit")
            assert len(datamodule.manifest["files"]) == 4


def test_full_finetune_config_trains_the_whole_unet_at_dreambooth_rate():
    config = yaml.safe_load((CONFIGS / "one_to_normal_mvtec_full.yaml").read_text())
    args = config["model"]["init_args"]
    assert args["learning_rate"] == 5e-6 and config["trainer"]["max_steps"] == 800
