"""`VideoDataModule`: the training stream and the held-out evaluation clips of `data.source`.

Batches are dicts: video float32 ``[B, F, 3, H, W]``, camera float32 ``[B, F, 2]``, prompt list of
B str, index int64 ``[B]``, age int32 ``[B, F, H, W]``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from cf.data import DATA_SOURCES


class VideoDataModule(pl.LightningDataModule):
    """Train: the endless stream from sample `start` on (seeds ``(data.seed, i)``); resume a run by
    passing ``start = samples already consumed = global_step * batch_size * world_size``.
    Eval: ``data.eval_clips`` fixed clips (seeds ``(data.eval_seed, i)``), never trained on."""

    def __init__(self, cfg, start: int = 0):
        super().__init__()
        self.cfg = cfg
        self.start = int(start)

    def _shard(self) -> dict[str, int]:
        trainer = self.trainer  # None when used outside a Trainer
        if trainer is None:
            return {"rank": 0, "world_size": 1}
        return {"rank": trainer.global_rank, "world_size": trainer.world_size}

    def train_dataset(self):
        d = self.cfg.data
        return DATA_SOURCES.get(d.source)(d, seed=d.seed, start=self.start, block=d.batch_size,
                                          **self._shard())

    def eval_dataset(self):
        d = self.cfg.data
        return DATA_SOURCES.get(d.source)(d, seed=d.eval_seed, count=d.eval_clips, block=d.batch_size,
                                          **self._shard())

    def _loader(self, dataset) -> DataLoader:
        d = self.cfg.data
        workers = int(d.num_workers)
        return DataLoader(dataset, batch_size=d.batch_size, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset())
