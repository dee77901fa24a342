"""ADP end to end with the offline tiny twins: `fsad fit` learns c_n* then c_a* (checkpoint = the learned
vectors only), `fsad test --ckpt_path` self-tunes and reproduces the fitted module's scores; the generated
pseudo-anomalies are cached and reused. Plus the configs and the schedule check."""

import math
from pathlib import Path

import pytest
import torch

from fsad_lightning.commands.lightning_cli import run_cli
from fsad_lightning.data.synthetic import write_synthetic_category
from fsad_lightning.methods.adp import ADPConceptModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LEARNED_KEYS = {"trained_epochs", "model.normal_concept", "model.normal_concept_learned"}


def _common_args(tmp_path: Path) -> list[str]:
    return [
        "--config",
        str(CONFIGS / "adp_tiny.yaml"),
        f"--data.init_args.root={tmp_path / 'data'}",
        "--data.init_args.dataset=folder",
        "--data.init_args.category=widget",
        "--data.init_args.batch_size=8",
        f"--model.init_args.cache_dir={tmp_path / 'pools'}",
        "--model.init_args.class_name=null",
        "--trainer.enable_progress_bar=false",
    ]


@pytest.mark.slow
def test_fit_both_concepts_then_test_from_checkpoint(tmp_path, monkeypatch, score_test_split):
    monkeypatch.chdir(tmp_path)  # the CLI logs to ./runs
    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "fsad_cache"))  # where the tiny SD is built
    write_synthetic_category(tmp_path / "data", "widget", n_train=3, n_test_good=2, n_test_defect=1, size=64)
    common = _common_args(tmp_path)

    fit = run_cli(["fit", *common])
    module = fit.model
    assert int(module.trainer.global_step) == 4 and bool(module.model.normal_concept_learned)
    checkpoints = sorted(tmp_path.glob("runs/**/last.ckpt"))
    assert len(checkpoints) == 1, checkpoints
    stored = torch.load(checkpoints[0], map_location="cpu", weights_only=False)["state_dict"]
    concept_keys = [k for k in stored if k.endswith("token_embedding.new_embeddings")]
    assert len(concept_keys) == 1 and set(stored) == LEARNED_KEYS | set(concept_keys)  # no frozen weight
    normal, anomalous = stored["model.normal_concept"], stored[concept_keys[0]][0]
    object_id = module.model.diffusion.tokenizer("object", add_special_tokens=False).input_ids[0]
    initial = module.model.token_embedding.base.weight[object_id]
    assert not torch.equal(normal, initial) and not torch.equal(anomalous, normal)
    # step 2's pseudo-anomalies were generated once, into the cache
    assert len(sorted((tmp_path / "pools").glob("*/pool.json"))) == 1
    fitted_scores, fitted_maps, _ = score_test_split(fit)

    test = run_cli(["test", *common, "--ckpt_path", str(checkpoints[0])])
    restored = test.model.model
    assert torch.equal(restored.normal_concept, normal) and torch.equal(restored.concept_vector(), anomalous)
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= test.model.test_results[key] <= 1.0 and math.isfinite(test.model.test_results[key])
    assert restored.self_tuning is not None and restored.self_tuning.weights.shape == (2,)
    # the self-tuning pseudo-anomalies (made with c_a*) joined the cache; the fit scores are reproduced
    pools = sorted((tmp_path / "pools").glob("*/pool.json"))
    assert len(pools) == 2
    images = sorted((tmp_path / "pools").glob("*/images/*.png"))
    assert len(images) == 4 + 4
    stamps = {p: p.stat().st_mtime_ns for p in images}
    restored_scores, restored_maps, _ = score_test_split(test)
    torch.testing.assert_close(restored_scores, fitted_scores, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(restored_maps, fitted_maps, atol=1e-6, rtol=1e-6)
    assert {p: p.stat().st_mtime_ns for p in sorted((tmp_path / "pools").glob("*/images/*.png"))} == stamps


def test_fit_refuses_a_schedule_that_is_not_two_concepts_long(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FSAD_CACHE_DIR", str(tmp_path / "fsad_cache"))
    write_synthetic_category(tmp_path / "data", "widget", n_train=2, n_test_good=1, n_test_defect=1, size=64)
    with pytest.raises(ValueError, match="set trainer.max_steps to 4"):
        run_cli(["fit", *_common_args(tmp_path), "--trainer.max_steps=3"])
    with pytest.raises(ValueError, match="max_epochs: -1"):
        run_cli(["fit", *_common_args(tmp_path), "--trainer.max_epochs=1"])


@pytest.mark.parametrize("name", ["mvtec", "visa", "tiny"])
def test_configs_name_real_arguments_and_the_papers_settings(name, checked_config):
    config = checked_config(CONFIGS / f"adp_{name}.yaml", "fsad_lightning.methods.adp.ADPConceptModule", ADPConceptModule)
    args, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
    assert trainer["max_steps"] == 2 * args["steps_per_concept"] and trainer["max_epochs"] == -1
    assert data["augment"] is False
    if name != "tiny":  # Appendix A-B
        assert args["diffusion_model"] == "stabilityai/stable-diffusion-2-1-base"
        assert (args["clip_model"], args["clip_pretrained"], args["clip_image_size"]) == (
            "ViT-H-14",
            "laion2b_s32b_b79k",
            224,
        )
        assert (args["steps_per_concept"], args["learning_rate"], data["train_batch_size"]) == (3000, 5e-4, 4)
        assert args["scale_lr"] is False  # the paper's 5e-4 as printed
        # memory: a batch-4 fit on 24 GB (checkpointing, frozen SD / CLIP in the trainer's bf16)
        assert args["gradient_checkpointing"] is True and trainer["precision"] == "bf16-mixed"
        assert args["diffusion_dtype"] is None and args["clip_precision"] is None
        assert (args["normal_alpha"], args["anomaly_alpha"], args["margin"]) == (0.003, 0.002, 0.8)
        assert (args["strength"], args["guidance_scale"], args["num_inference_steps"]) == (0.5, 7.5, 30)
        assert (args["num_self_tuning_anomalies"], args["resolution"], data["image_size"]) == (20, 512, 512)
