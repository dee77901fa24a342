"""Test-wide settings: no test touches the network, W&B stays offline, runs are deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# one thread per test process: with `pytest -n 2` on 2 cores, more threads make tiny-tensor ops many times slower
torch.set_num_threads(1)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data_root():
    """Real data beside the checkout (../shared/data); the test skips cleanly when it is absent."""
    root = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(root):
        pytest.skip("../shared/data is not present")
    return root


@pytest.fixture
def autocast_while_sampling(monkeypatch):
    """A list that receives, for every Stable Diffusion denoising loop run during the test, whether CPU
    autocast was on (the trainer's mixed precision reached the sampling)."""
    from fsad_lightning.backbones.diffusion import StableDiffusion

    seen: list[bool] = []
    denoise = StableDiffusion._denoise

    def recording_denoise(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return denoise(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusion, "_denoise", recording_denoise)
    return seen
