"""Data for distillation: what the student is asked to generate, not videos.

DMD is data-free: a training sample is a prompt and a camera path (the conditioning of one
rollout), drawn from a fresh world per sample. Student initialisation trains on a fixed set of
teacher ODE trajectories, dealt out in a seeded shuffled order. Both follow the resumable stream
protocol of `cf.train.callbacks` (sample i is a pure function of (seed, i); `start` positions it).

Samples: prompt str, camera float32 [Fc + F, 2], context float32 [Fc, 3, H, W] (clean world frames
the rollout continues; Fc = student.context_frames, may be 0), index int (+ the trajectory tensors
for `PairStream`).
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
    """Sample i: world (seed, i) from a random time: its prompt, its first `context` frames (clean,
    what the rollout continues) and its camera path over `context + frames` frames."""

    def __init__(self, data_cfg, frames: int, context: int = 0, seed: int | None = None, **kwargs: Any):
        super().__init__(data_cfg.seed if seed is None else seed, **kwargs)
        self.data_cfg = OmegaConf.to_object(data_cfg) if isinstance(data_cfg, DictConfig) else data_cfg
        self.frames, self.context = int(frames), int(context)

    def sample(self, i: int) -> dict[str, Any]:
        world = World(self.data_cfg, (self.seed, i))
        start = world.random_start(START_RANGE)
        xs = world.camera_x(start, self.context + self.frames)
        camera = torch.from_numpy(np.stack([xs, np.zeros_like(xs)], 1).astype(np.float32))  # [Fc + F, 2]
        d = self.data_cfg
        context = (
            world.render(self.context, start).video if self.context else torch.zeros(0, 3, d.height, d.width)
        )  # [Fc, 3, H, W]
        return {"prompt": world.prompt, "camera": camera, "context": context, "index": i}


class PairStream(SampleStream):
    """Sample i: trajectory `order(epoch)[i % n]` of a fixed set, epoch = i // n, order a seeded shuffle.

    pairs: {"context": [N, Fc, C, H, W] the clean frames the teacher continued, "video": [N, F, C, H, W]
    its clean output, "states": [N, K, F, C, H, W] the trajectory at the student's K noise levels,
    "camera": [N, Fc + F, 2]}; prompts: N strings.
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
