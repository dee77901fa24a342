"""The generated-image pool cache: keyed, reused, resumable, atomic."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fsad_lightning.cache import ImagePoolCache, image_seed, load_image, pool_key

MANIFEST = {"category": "bottle", "k_shot": 2, "seed": 0, "files": ["a.png", "b.png"], "created": "today"}
REPO_ROOT = Path(__file__).resolve().parents[2]


def _maker(calls):
    def make(indices):
        calls.append(list(indices))
        images = []
        for i in indices:
            generator = torch.Generator().manual_seed(image_seed(7, i))
            images.append(torch.rand(3, 8, 8, generator=generator))
        return torch.stack(images)

    return make


def test_key_depends_on_what_changes_the_pixels():
    base = pool_key("sd15", MANIFEST, ["a photo"], 0)
    assert base == pool_key("sd15", dict(MANIFEST, created="tomorrow"), ["a photo"], 0)  # not a key field
    assert base != pool_key("sd15", dict(MANIFEST, files=["a.png", "c.png"]), ["a photo"], 0)
    assert base != pool_key("sd21", MANIFEST, ["a photo"], 0)
    assert base != pool_key("sd15", MANIFEST, ["another photo"], 0)
    assert base != pool_key("sd15", MANIFEST, ["a photo"], 1)
    assert base != pool_key("sd15", MANIFEST, ["a photo"], 0, extra={"strength": 0.3})


def test_pool_is_generated_once_and_reused(tmp_path):
    calls = []
    cache = ImagePoolCache(tmp_path, "sd15", MANIFEST, ["a photo"], seed=7)
    paths = cache.generate(5, _maker(calls), batch_size=2)
    assert [p.name for p in paths] == [f"{i:06d}.png" for i in range(5)]
    assert calls == [[0, 1], [2, 3], [4]]
    again = ImagePoolCache(tmp_path, "sd15", MANIFEST, ["a photo"], seed=7)
    assert again.generate(3, _maker(calls)) == paths[:3]
    assert len(calls) == 3, "a complete pool must not be regenerated"
    images = again.load_images()
    assert images.shape == (5, 3, 8, 8)
    expected = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(image_seed(7, 4)))
    assert torch.allclose(images[4], expected, atol=1 / 255)
    # asking for more extends the pool with only the missing images
    again.generate(6, _maker(calls))
    assert calls[-1] == [5]


def test_failed_generation_leaves_no_marker_and_resumes(tmp_path):
    calls = []
    make = _maker(calls)

    def crash_on_second_batch(indices):
        if len(calls) == 1:
            raise KeyboardInterrupt
        return make(indices)

    cache = ImagePoolCache(tmp_path, "sd15", None, ["p"], seed=7)
    with pytest.raises(KeyboardInterrupt):
        cache.generate(4, crash_on_second_batch, batch_size=2)
    assert not cache.is_complete()
    assert sorted(p.name for p in cache.image_dir.iterdir()) == ["000000.png", "000001.png"]
    with pytest.raises(FileNotFoundError, match="generate it first"):
        cache.load_images()
    cache.generate(4, make, batch_size=2)
    assert calls[-1] == [2, 3]
    assert cache.is_complete(4)


def test_killed_generation_leaves_no_partial_image(tmp_path):
    """SIGKILL a generating process mid-pool: every *.png on disk decodes, and a rerun completes it."""
    script = textwrap.dedent(
        f"""
        import time, torch
        from fsad_lightning.cache import ImagePoolCache
        def make(indices):
            time.sleep(0.05)
            return torch.rand(len(indices), 3, 256, 256)
        ImagePoolCache({str(tmp_path)!r}, "sd15", None, ["p"], seed=1).generate(10_000, make, batch_size=1)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    cache = ImagePoolCache(tmp_path, "sd15", None, ["p"], seed=1)
    deadline = time.time() + 60
    while time.time() < deadline and (
        not cache.image_dir.is_dir() or len(list(cache.image_dir.glob("*.png"))) < 3
    ):
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    pngs = sorted(cache.image_dir.glob("*.png"))
    assert len(pngs) >= 3 and not cache.is_complete()
    for png in pngs:
        assert load_image(png).shape == (3, 256, 256)
    done = len(pngs)
    calls = []
    cache.generate(done + 1, _maker(calls), batch_size=4)
    assert calls == [[done]]
    assert not list(cache.image_dir.glob(".*.tmp"))


def test_corrupt_marker_and_bad_count_are_clear_errors(tmp_path):
    cache = ImagePoolCache(tmp_path, "sd15", None, ["p"], seed=0)
    with pytest.raises(ValueError, match="count"):
        cache.generate(0, _maker([]))
    cache.folder.mkdir(parents=True)
    cache.marker.write_text("{not json")
    with pytest.raises(ValueError, match="pool.json"):
        cache.is_complete()
