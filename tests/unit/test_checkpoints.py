"""Checkpoint files (read with one-line errors, written atomically), the periodic last.ckpt, the module's
checkpoint record and mismatch lines, run folders claimed once, and resumable training order."""

from __future__ import annotations

import errno
import os

import lightning
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from fsad_lightning.callbacks.checkpoints import PeriodicLastCheckpoint, ensure_periodic_last_checkpoint
from fsad_lightning.checkpoints import AtomicCheckpointIO, read_checkpoint
from fsad_lightning.commands.run_folder import claim_run_folder, find_last_checkpoint
from fsad_lightning.data.datamodule import EpochShuffleSampler
from fsad_lightning.methods.base import FewShotAnomalyModule, manifest_mismatch


def test_unreadable_checkpoints_are_one_line_naming_the_file(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, good)
    assert torch.equal(read_checkpoint(good)["state_dict"]["w"], torch.ones(3))
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "truncated.ckpt").write_bytes(good.read_bytes()[:200])
    (tmp_path / "config.ckpt").write_text("model:\n  class_path: x\n")
    torch.save({"weights": torch.ones(1)}, tmp_path / "plain.pt")
    (tmp_path / "folder.ckpt").mkdir()
    expected = {
        "empty.ckpt": "is empty (0 bytes)",
        "truncated.ckpt": "is truncated or corrupt (200 bytes",
        "config.ckpt": "is not a PyTorch checkpoint",
        "plain.pt": "not a Lightning checkpoint",
        "folder.ckpt": "is a folder",
    }
    for name, text in expected.items():
        with pytest.raises(ValueError) as info:
            read_checkpoint(tmp_path / name)
        message = str(info.value)
        assert text in message and name in message and "\n" not in message, message
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt does not exist"):
        read_checkpoint(tmp_path / "nowhere.ckpt")


def test_atomic_checkpoint_io_keeps_the_previous_checkpoint_on_a_failed_save(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "step": 1}, path)
    real_save = torch.save

    def full_disk(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as info:
        io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "step": 2}, path)
    assert info.value.errno == errno.ENOSPC and str(path) in str(info.value)
    monkeypatch.undo()
    assert read_checkpoint(path)["step"] == 1  # the previous checkpoint, whole
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temporary file left


def test_periodic_last_checkpoint_is_added_or_given_to_the_configs_own(tmp_path):
    def trainer(callbacks, **kwargs):
        return lightning.Trainer(
            accelerator="cpu", logger=False, default_root_dir=tmp_path, callbacks=callbacks, **kwargs
        )

    # no checkpoint callback in the config: Lightning's default one is replaced by a periodic last.ckpt
    plain = trainer([])
    added = ensure_periodic_last_checkpoint(plain, [])
    assert isinstance(added, PeriodicLastCheckpoint) and plain.checkpoint_callbacks == [added]
    assert added._train_time_interval.total_seconds() == 600 and added.save_last and added.save_top_k == 0
    # the method configs' end-only `save_last: true, save_top_k: 0` is replaced in its folder: one last.ckpt
    end_only = ModelCheckpoint(dirpath=tmp_path / "mine", save_last=True, save_top_k=0)
    configured = trainer([end_only])
    replaced = ensure_periodic_last_checkpoint(configured, [end_only], minutes=5)
    assert configured.checkpoint_callbacks == [replaced] and replaced.dirpath == str(tmp_path / "mine")
    assert replaced._train_time_interval.total_seconds() == 300
    # a config's own top-k checkpoints stay beside the added last.ckpt; with save_last they save it each epoch
    best = ModelCheckpoint(monitor="train/loss")
    both = trainer([best])
    assert isinstance(ensure_periodic_last_checkpoint(both, [best]), PeriodicLastCheckpoint)
    assert both.checkpoint_callbacks[0] is best and len(both.checkpoint_callbacks) == 2
    best_and_last = ModelCheckpoint(monitor="train/loss", save_last=True)
    assert ensure_periodic_last_checkpoint(trainer([best_and_last]), [best_and_last]) is best_and_last
    # a config that saves periodically already is left alone; no checkpointing at all stays off
    own = PeriodicLastCheckpoint(every_n_train_steps=50)
    assert ensure_periodic_last_checkpoint(trainer([own]), [own]) is own and own._train_time_interval is None
    assert ensure_periodic_last_checkpoint(trainer([], enable_checkpointing=False), []) is None
    with pytest.raises(ValueError, match="every_n_train_steps"):
        PeriodicLastCheckpoint(every_n_train_steps=0)


class _Learner(FewShotAnomalyModule):
    learning_type = "trainable"

    def __init__(self, width: int = 3, sigma: float = 4.0, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.prompt = torch.nn.Parameter(torch.zeros(width))
        self.draws = torch.Generator().manual_seed(0)


class _Steps(_Learner):
    def training_step(self, batch, batch_idx):
        return (self.prompt * batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD([self.prompt], lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(5, 3), batch_size=1)


def test_periodic_last_checkpoint_also_saves_the_end_of_the_fit(tmp_path):
    periodic = PeriodicLastCheckpoint(every_n_train_steps=2, dirpath=tmp_path)
    trainer = lightning.Trainer(
        accelerator="cpu",
        logger=False,
        max_epochs=1,
        callbacks=[periodic],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_Steps())
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 5  # not the periodic save at step 4


def test_checkpoint_record_and_mismatch_lines(caplog):
    fitted = _Learner(width=3)
    checkpoint = {"state_dict": fitted.state_dict()}
    fitted.draws.manual_seed(7)
    fitted.on_save_checkpoint(checkpoint)
    record = checkpoint["fsad"]
    assert record["method"].endswith("test_checkpoints._Learner") and record["fsad_version"]
    assert record["hyper_parameters"] == {"width": 3, "lr": 0.1}  # sigma acts only when scoring
    assert set(checkpoint["state_dict"]) == {"prompt", "trained_epochs"}
    assert _Learner(width=3, sigma=1.0).checkpoint_mismatch(checkpoint, "a.ckpt") is None
    line = _Learner(width=5).checkpoint_mismatch(checkpoint, "a.ckpt")
    assert line == (
        "checkpoint a.ckpt was fitted with width=3 but the config sets width=5: set it as the fit did, "
        "or fit again with the new value"
    )
    other = FewShotAnomalyModule().checkpoint_mismatch(checkpoint, "a.ckpt")
    assert other.startswith(
        "checkpoint a.ckpt was written by _Learner but the config runs FewShotAnomalyModule"
    )
    older = {**checkpoint, "fsad": {**record, "fsad_version": "0.0.1"}}
    with caplog.at_level("WARNING", logger="fsad_lightning"):
        assert _Learner(width=3).checkpoint_mismatch(older, "old.ckpt") is None  # a warning, not a refusal
    assert "fsad: warning: checkpoint old.ckpt was written by fsad 0.0.1, this is fsad" in caplog.text
    # a resumed fit's generators continue from the checkpoint's state
    resumed = _Learner(width=3)
    resumed.on_load_checkpoint(checkpoint)
    resumed.on_train_start()
    assert torch.equal(resumed.draws.get_state(), torch.Generator().manual_seed(7).get_state())


def test_manifest_mismatch_names_other_shots_and_a_regenerated_dataset():
    fitted = {"files": ["a.png"], "dataset_version": "111", "category": "c", "k_shot": 1, "seed": 0}
    assert manifest_mismatch(fitted, dict(fitted), "ckpt") is None
    other_shots = manifest_mismatch(fitted, {**fitted, "files": ["b.png"], "seed": 3}, "ckpt")
    assert "other shots (category=c, k_shot=1, seed=0)" in other_shots and "seed=3" in other_shots
    regenerated = manifest_mismatch(fitted, {**fitted, "dataset_version": "222", "root": "/d"}, "ckpt")
    assert "dataset version 111 but /d is version 222" in regenerated


def test_two_runs_never_share_a_version_folder(tmp_path, monkeypatch):
    # two runs started together both find no version folder yet: both would pick version_0
    monkeypatch.setattr(CSVLogger, "_get_next_version", lambda self: 0)
    first, second = CSVLogger(tmp_path, name="runs"), CSVLogger(tmp_path, name="runs")
    assert claim_run_folder(first).endswith("version_0")
    assert claim_run_folder(second).endswith("version_1")  # its os.mkdir lost: the next number
    monkeypatch.undo()
    (tmp_path / "runs" / "version_0" / "results.json").write_text("{}")
    with pytest.raises(ValueError, match=r"version_0 already holds a run \(results.json\)"):
        claim_run_folder(CSVLogger(tmp_path, name="runs", version=0))


def test_last_checkpoint_is_the_newest_or_a_one_line_error(tmp_path):
    logger = CSVLogger(tmp_path, name="runs")
    with pytest.raises(
        ValueError, match=r"--ckpt_path last: no last.ckpt at .*runs/\*/checkpoints/last.ckpt"
    ):
        find_last_checkpoint(logger, [], "fit")
    for version, mtime in (("version_0", 200), ("version_1", 100)):
        path = tmp_path / "runs" / version / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
    assert find_last_checkpoint(logger, [], "test").endswith("version_0/checkpoints/last.ckpt")
    assert logger._version is None  # looking picked no version


def test_train_sampler_continues_an_interrupted_epoch():
    uninterrupted = EpochShuffleSampler(10, seed=3)
    uninterrupted.set_epoch(2)
    epoch_two = list(uninterrupted)
    resumed = EpochShuffleSampler(10, seed=3, start=(2, 4))
    assert list(resumed) == epoch_two[4:]
    assert list(resumed) == list(EpochShuffleSampler(10, seed=3, start=(3, 0)))  # then the next epoch


def test_each_trainable_method_names_real_scoring_only_settings():
    """A test may change a method's scoring-only settings (e.g. One-to-Normal's eq. 7 weights, PromptAD's
    map size) with a checkpoint fitted under others; each named setting is a real argument and is left out
    of the fitted settings a checkpoint is checked against."""
    import inspect

    from fsad_lightning.methods.adp import ADPConceptModule
    from fsad_lightning.methods.anomalysd import InpaintFinetuneModule
    from fsad_lightning.methods.one_to_normal import DreamBoothNormalModule
    from fsad_lightning.methods.promptad import PromptADModule

    expected = {
        PromptADModule: {"map_size", "vision_guided"},
        DreamBoothNormalModule: {"alpha", "beta", "strength", "use_pool"},
        ADPConceptModule: {"use_reference_association", "label_aware"},
        InpaintFinetuneModule: {"noise_strength", "scales", "alpha", "threshold_rule"},
    }
    for cls, some in expected.items():
        arguments = set(inspect.signature(cls.__init__).parameters)
        assert cls.inference_hparams <= arguments, cls.inference_hparams - arguments
        assert some <= cls.inference_hparams, (cls.__name__, some - cls.inference_hparams)
    module = PromptADModule(model_name="fsad-tiny-vit", pretrained=None, image_size=64, memory_layers=[1, 2],
                            vv_layers=2, map_size=64)
    fitted = module.fitted_hparams()
    assert "map_size" not in fitted and "image_normal_prompts" in fitted
