"""Two CPU processes (gloo) split a test set unevenly; the Evaluator's metrics equal one process's.

The worker processes are forked rather than spawned: a spawned child would import torch and torchmetrics
again (several seconds each); torch's multiprocessing API, the gloo backend and torchmetrics' gathering
are the same either way.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fsad_lightning.metrics import Evaluator

WORLD_SIZE = 2
#: images per batch on each rank: rank 0 gets three batches (6 images), rank 1 one batch (2 images,
#: both anomalous -- alone, rank 1 could not compute an AUROC)
SHARDS = {0: [3, 1, 2], 1: [2]}
#: categories of the 8 images in the multi-class case: rank 1 sees no image of "a" at all
CATEGORIES = ["a", "b", "a", "b", "a", "b", "b", "b"]


def _test_set() -> list[tuple[SimpleNamespace, dict]]:
    """8 images in (output, batch) pairs of the contract; maps 6x6, ground truth of varied sizes."""
    g = torch.Generator().manual_seed(1234)
    sizes = [(12, 12), (10, 14), (9, 9), (12, 8), (6, 6), (15, 10), (8, 16), (11, 11)]
    labels = [0, 1, 1, 0, 1, 0, 1, 1]
    images = []
    for i, ((h, w), label) in enumerate(zip(sizes, labels)):
        gt = torch.zeros(h, w, dtype=torch.uint8)
        if label:
            y, x = (
                int(torch.randint(0, h - 3, (1,), generator=g)),
                int(torch.randint(0, w - 3, (1,), generator=g)),
            )
            gt[y : y + 3, x : x + 2] = 1
            gt[0, 0] = 1  # a second, one-pixel region
        score = torch.rand(1, generator=g) + 0.5 * label
        amap = torch.rand(6, 6, generator=g)
        images.append((score, amap, label, gt, f"/test/{i:03d}.png"))
    batches, start = [], 0
    for rank in range(WORLD_SIZE):
        for size in SHARDS[rank]:
            chunk = images[start : start + size]
            start += size
            output = SimpleNamespace(
                pred_score=torch.cat([c[0] for c in chunk]), anomaly_map=torch.stack([c[1] for c in chunk])
            )
            batch = {
                "label": torch.tensor([c[2] for c in chunk]),
                "has_mask": torch.ones(size, dtype=torch.bool),
                "path": [c[4] for c in chunk],
                "gt_mask": [c[3] for c in chunk],
                "category": CATEGORIES[start - size : start],
            }
            batches.append((rank, output, batch))
    return batches


def _evaluator(multi_class: bool) -> Evaluator:
    evaluator = Evaluator()
    evaluator.set_categories(sorted(set(CATEGORIES)) if multi_class else None)
    return evaluator


def _run_rank(rank: int, init_file: str, expected: dict, multi_class: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        evaluator = _evaluator(multi_class)
        for batch_rank, output, batch in _test_set():
            if batch_rank == rank:
                evaluator.update(output, batch)
        result = evaluator.compute()
        assert set(result) == set(expected), (sorted(result), sorted(expected))
        flat = [(key, value, result[key]) for key, value in expected.items() if key != "per_category"]
        for name, values in expected.get("per_category", {}).items():
            flat += [((name, key), value, result["per_category"][name][key]) for key, value in values.items()]
        for key, value, got in flat:
            if isinstance(value, float):
                assert got == pytest.approx(value, abs=1e-9), (rank, key, got, value)
            else:
                assert got == value, (rank, key)
        # the local (unsynced) state is restored after compute: rank 0 keeps its 6 images
        local = sum(t.numel() for group in evaluator.groups for t in group.image_metrics.scores)
        assert local == sum(SHARDS[rank])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("multi_class", [False, True], ids=["one-class", "multi-class"])
def test_ddp_metrics_equal_single_process(tmp_path, multi_class):
    evaluator = _evaluator(multi_class)
    for _, output, batch in _test_set():
        evaluator.update(output, batch)
    expected = evaluator.compute()
    assert "pixel_aupro" in expected and expected["num_images"] == 8
    assert ("per_category" in expected) == multi_class

    mp.start_processes(
        _run_rank,
        args=(str(tmp_path / "rendezvous"), expected, multi_class),
        nprocs=WORLD_SIZE,
        join=True,
        start_method="fork",
    )


def _sampler_rank(rank: int, init_file: str, root: str, queue) -> None:
    from fsad_lightning.data import FewShotDataModule

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        datamodule = FewShotDataModule(root=root, category="widget", k_shot=2, image_size=32)
        datamodule.setup("test")
        paths = [p for batch in datamodule.test_dataloader() for p in batch["path"]]
        queue.put((rank, paths))
    finally:
        dist.destroy_process_group()


def test_ddp_test_split_is_shared_without_repeats(tmp_path):
    """Each rank scores a disjoint share; together they cover the test split exactly once (no padding)."""
    from fsad_lightning.data import FewShotDataModule
    from fsad_lightning.data.synthetic import write_synthetic_category

    # 3 good + 2 x 2 defective = 7 test images: an odd count that a padding sampler would repeat
    write_synthetic_category(tmp_path / "data", "widget", n_train=4, n_test_good=3, n_test_defect=2, size=32)
    single = FewShotDataModule(root=str(tmp_path / "data"), category="widget", k_shot=2, image_size=32)
    single.setup("test")
    expected = [p for batch in single.test_dataloader() for p in batch["path"]]
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    init_file = str(tmp_path / "sampler_init")
    mp.start_processes(
        _sampler_rank, args=(init_file, str(tmp_path / "data"), queue), nprocs=WORLD_SIZE, start_method="fork"
    )
    shares = dict(queue.get() for _ in range(WORLD_SIZE))
    assert len(expected) == 7
    assert sorted(shares[0] + shares[1]) == sorted(expected)
    assert not set(shares[0]) & set(shares[1])
