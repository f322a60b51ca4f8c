"""Data for distillation: what the student is asked to generate, not videos.

DMD is data-free: a training sample is a prompt and a camera path (the conditioning of one
rollout), drawn from a fresh world per sample. Student initialisation trains on a fixed set of
teacher ODE trajectories, dealt out in a seeded shuffled order. Both follow the resumable stream
protocol of `cf.train.callbacks` (sample i is a pure function of (seed, i); `start` positions it).

Samples: prompt str, camera float32 [F, 2], index int (+ the trajectory tensors for `PairStream`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader

from cf.data.datasets import START_RANGE, SampleStream
from cf.data.world import World
from cf.errors import CfError


class ConditionStream(SampleStream):
    """Sample i: the prompt of world (seed, i) and its camera path for `frames` frames from a random time."""

    def __init__(self, data_cfg, frames: int, seed: int | None = None, **kwargs: Any):
        super().__init__(data_cfg.seed if seed is None else seed, **kwargs)
        self.data_cfg = OmegaConf.to_object(data_cfg) if isinstance(data_cfg, DictConfig) else data_cfg
        self.frames = int(frames)

    def sample(self, i: int) -> dict[str, Any]:
        world = World(self.data_cfg, (self.seed, i))
        xs = world.camera_x(world.random_start(START_RANGE), self.frames)
        camera = torch.from_numpy(np.stack([xs, np.zeros_like(xs)], 1).astype(np.float32))  # [F, 2]
        return {"prompt": world.prompt, "camera": camera, "index": i}


class PairStream(SampleStream):
    """Sample i: trajectory `order(epoch)[i % n]` of a fixed set, epoch = i // n, order a seeded shuffle.

    pairs: {"video": [N, F, C, H, W] the teacher's clean output, "states": [N, K, F, C, H, W] the
    trajectory at the student's K noise levels, "camera": [N, F, 2]}; prompts: N strings.
    """

    def __init__(self, pairs: dict[str, Tensor], prompts: list[str], seed: int, **kwargs: Any):
        super().__init__(seed, **kwargs)
        self.pairs, self.prompts = pairs, list(prompts)
        self.n = len(self.prompts)
        if self.n == 0 or any(len(v) != self.n for v in pairs.values()):
            raise CfError(
                f"ODE pair set is empty or inconsistent: {self.n} prompts, "
                f"{ {k: len(v) for k, v in pairs.items()} } trajectories"
            )

    def order(self, epoch: int) -> Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def sample(self, i: int) -> dict[str, Any]:
        j = int(self.order(i // self.n)[i % self.n])
        return {**{k: v[j] for k, v in self.pairs.items()}, "prompt": self.prompts[j], "index": i}


class StreamDataModule(pl.LightningDataModule):
    """A training stream built on demand (so `StreamPosition` can position it; sharded across ranks)."""

    def __init__(self, cfg, make_stream):
        super().__init__()
        self.cfg, self.make_stream = cfg, make_stream

    def train_dataloader(self) -> DataLoader:
        rank, world = (0, 1) if self.trainer is None else (self.trainer.global_rank, self.trainer.world_size)
        b = self.cfg.data.batch_size
        return DataLoader(self.make_stream(block=b, rank=rank, world_size=world), batch_size=b)
