"""Endless, exactly resumable streams of training clips.

Sample i of a stream is a pure function of (seed, i). Indices are dealt out in blocks of
`block` consecutive samples (the batch size), block b going to DDP rank ``b % world_size`` and,
inside a rank, to DataLoader workers in turn. A DataLoader collects its workers' batches
round-robin, so the batches come out in index order whatever the number of workers, no index is
drawn twice, and a stream restarted at ``start = samples consumed`` continues exactly where the
last one stopped (with DDP: ``start = steps * batch_size * world_size``).

Every sample is a dict: video float32 ``[F, 3, H, W]`` in [-1, 1], camera float32 ``[F, 2]``,
prompt str, index int, age int32 ``[F, H, W]`` (see `cf.data.world.Clip`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import IterableDataset, get_worker_info

from cf.data.world import Clip, World
from cf.errors import CfError

# A world's clip starts at a random time in [0, START_RANGE): many camera round trips and subject
# bounces, so clips see the camera and the subjects in every phase of their motion.
START_RANGE = 1024


class SampleStream(IterableDataset):
    """Base of the streams: subclasses define `sample(i)`; this class deals out the indices."""

    def __init__(self, seed: int, start: int = 0, count: int | None = None, block: int = 1,
                 rank: int = 0, world_size: int = 1):
        if start < 0 or block < 1 or (count is not None and count < 0) or not 0 <= rank < world_size:
            raise CfError(f"bad sample stream: start={start}, count={count}, block={block}, "
                          f"rank={rank}, world_size={world_size}; need start >= 0, count >= 0, block >= 1, "
                          f"0 <= rank < world_size")
        self.seed, self.start, self.count, self.block = int(seed), int(start), count, int(block)
        self.rank, self.world_size = int(rank), int(world_size)

    def sample(self, i: int) -> dict[str, Any]:
        raise NotImplementedError

    def indices(self) -> Iterator[int]:
        """The sample indices this rank and worker draw, in order."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        end = None if self.count is None else self.start + self.count
        j = worker  # this rank's j-th block goes to worker j % workers
        while True:
            first = self.start + (j * self.world_size + self.rank) * self.block
            for i in range(first, first + self.block):
                if end is not None and i >= end:
                    return
                yield i
            j += workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in self.indices():
            yield self.sample(i)


def clip_sample(clip: Clip, index: int) -> dict[str, Any]:
    return {"video": clip.video, "camera": clip.camera, "prompt": clip.prompt, "index": index,
            "age": clip.age}


class WorldDataset(SampleStream):
    """Sample i: a fresh world drawn from seed (seed, i), `data.clip_frames` frames from a random time.

    `count=None` streams forever; a count makes a finite set (the held-out evaluation clips).
    """

    def __init__(self, data_cfg, seed: int | None = None, start: int = 0, count: int | None = None,
                 block: int = 1, rank: int = 0, world_size: int = 1):
        super().__init__(data_cfg.seed if seed is None else seed, start, count, block, rank, world_size)
        # a plain dataclass: reading an OmegaConf node costs more than building a small world
        self.data_cfg = OmegaConf.to_object(data_cfg) if isinstance(data_cfg, DictConfig) else data_cfg
        World(self.data_cfg, (self.seed, 0))  # fail here, not inside a worker, on a config the world rejects

    def clip(self, i: int) -> Clip:
        world = World(self.data_cfg, (self.seed, i))
        return world.render(int(self.data_cfg.clip_frames), world.random_start(START_RANGE))

    def sample(self, i: int) -> dict[str, Any]:
        return clip_sample(self.clip(i), i)

