import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from cf.config import load_config
from cf.data import DATA_SOURCES, VideoDataModule, WorldDataset
from cf.data.world import World
from cf.registry import UnknownNameError


def batches(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_datamodule_batches_have_the_documented_shapes_and_dtypes(smoke_cfg):
    d = smoke_cfg.data  # 16x16, 8 frames, batch 2
    dm = VideoDataModule(smoke_cfg)
    for batch in batches(dm.train_dataloader(), 2) + batches(dm.val_dataloader(), 1):
        assert set(batch) == {"video", "camera", "prompt", "index", "age"}
        assert batch["video"].shape == (d.batch_size, d.clip_frames, 3, d.height, d.width)
        assert batch["video"].dtype == torch.float32
        assert batch["video"].min() >= -1 and batch["video"].max() <= 1
        assert batch["camera"].shape == (d.batch_size, d.clip_frames, 2)
        assert batch["camera"].dtype == torch.float32
        assert batch["age"].shape == (d.batch_size, d.clip_frames, d.height, d.width)
        assert batch["age"].dtype == torch.int32
        assert batch["index"].dtype == torch.int64 and batch["index"].shape == (d.batch_size,)
        assert isinstance(batch["prompt"], list) and all(isinstance(p, str) and p for p in batch["prompt"])


def test_sample_is_a_pure_function_of_seed_and_index(smoke_cfg):
    ds = WorldDataset(smoke_cfg.data, seed=3)
    a, b = ds.sample(5), ds.sample(5)
    assert torch.equal(a["video"], b["video"]) and a["prompt"] == b["prompt"]
    # sample i is world (seed, i) from a random time drawn from that seed, clip_frames long
    world = World(smoke_cfg.data, (3, 5))
    start = world.random_start(1024)
    assert torch.equal(a["video"], world.render(smoke_cfg.data.clip_frames, start).video)
    assert not torch.equal(a["video"], ds.sample(6)["video"])
    assert not torch.equal(a["video"], WorldDataset(smoke_cfg.data, seed=4).sample(5)["video"])
    starts = {World(smoke_cfg.data, (3, i)).random_start(1024) for i in range(20)}
    assert len(starts) > 10  # clips start at different times


def test_two_workers_give_the_same_stream_without_duplicates(smoke_cfg):
    d = smoke_cfg.data
    ds = WorldDataset(d, block=d.batch_size)
    serial = batches(DataLoader(ds, batch_size=d.batch_size), 6)
    parallel = batches(DataLoader(ds, batch_size=d.batch_size, num_workers=2), 6)
    idx = torch.cat([b["index"] for b in parallel]).tolist()
    assert idx == list(range(12))  # every index once, in order, across both workers
    for s, p in zip(serial, parallel):
        assert torch.equal(s["video"], p["video"]) and s["prompt"] == p["prompt"]


def test_start_resumes_the_stream_exactly(smoke_cfg):
    d = smoke_cfg.data
    full = batches(VideoDataModule(smoke_cfg).train_dataloader(), 5)
    resumed = batches(VideoDataModule(smoke_cfg, start=2 * d.batch_size).train_dataloader(), 3)
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["video"], b["video"])
        assert torch.equal(a["age"], b["age"]) and a["prompt"] == b["prompt"]
    # the attribute the training loop sets on resume works the same
    ds = WorldDataset(d, block=d.batch_size)
    ds.start = 2 * d.batch_size
    assert torch.equal(next(iter(DataLoader(ds, batch_size=d.batch_size)))["video"], full[2]["video"])


def test_ranks_split_the_stream_in_blocks(smoke_cfg):
    d = smoke_cfg.data
    ranks = [list(itertools.islice(WorldDataset(d, block=2, rank=r, world_size=2).indices(), 6))
             for r in (0, 1)]
    assert ranks == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]]
    resumed = list(itertools.islice(WorldDataset(d, block=2, start=4, rank=1, world_size=2).indices(), 4))
    assert resumed == [6, 7, 10, 11]  # step 1 of rank 1, as in the uninterrupted run


def test_eval_set_is_finite_held_out_and_fixed(smoke_cfg):
    d = smoke_cfg.data
    dm = VideoDataModule(smoke_cfg)
    val = list(dm.val_dataloader())
    assert torch.cat([b["index"] for b in val]).tolist() == list(range(d.eval_clips))
    again = list(VideoDataModule(smoke_cfg, start=10).val_dataloader())
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(val, again))
    train = batches(dm.train_dataloader(), 2)
    assert not any(torch.equal(v, t) for b in val for v in b["video"] for c in train for t in c["video"])


def test_data_sources_registry():
    assert DATA_SOURCES.names() == ["folder", "world"]
    with pytest.raises(UnknownNameError, match="folder, world"):
        load_config("smoke", overrides=["data.source=youtube"])
