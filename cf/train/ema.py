"""The averages and the randomness a stage module keeps: `EMA` (and the `EMACheckpoint` mixin that saves it
and hands out the averaged network), `step_generator` (random numbers that are a pure function of the step,
so a resumed run draws what an uninterrupted one would). `cf.train.base` re-exports all three."""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cf.config.load import ConfigError
from cf.errors import CfError


class EMA:
    """Exponential moving average of a module's parameters: `shadow <- d * shadow + (1 - d) * param`.

    With decay 0 it is off: `update`, `copy_to` and `average_parameters` do nothing, and the live
    weights are the answer. The shadow follows the parameters' device and dtype lazily, so it can
    be built in `__init__`, before Lightning moves or casts the module.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay={decay} must be in [0, 1) (0 disables the EMA), e.g. 0.999")
        self.decay, self.num_updates = float(decay), 0
        self.shadow: dict[str, torch.Tensor] = (
            {n: p.detach().clone() for n, p in model.named_parameters()} if self.enabled else {}
        )

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = dict(model.named_parameters())
        if params.keys() != self.shadow.keys():
            missing, extra = params.keys() - self.shadow.keys(), self.shadow.keys() - params.keys()
            raise CfError(
                f"EMA was built for another model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(extra)[:5]}"
            )
        for n, p in params.items():
            s = self.shadow[n]
            if s.device != p.device or s.dtype != p.dtype:
                self.shadow[n] = s.to(device=p.device, dtype=p.dtype)
        names = list(params)
        return [self.shadow[n] for n in names], [params[n].detach() for n in names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if not self.enabled:
            return
        shadow, params = self._pairs(model)
        torch._foreach_lerp_(shadow, params, 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averages."""
        if not self.enabled:
            return
        shadow, params = self._pairs(model)
        torch._foreach_copy_(params, shadow)

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run the block with the averaged weights in `model`, then put the live ones back."""
        if not self.enabled:
            yield model
            return
        live = [p.detach().clone() for p in model.parameters()]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in model.parameters()], live)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["shadow"].keys() != self.shadow.keys():
            raise CfError(
                f"EMA state does not match this model: {len(state['shadow'])} saved entries vs "
                f"{len(self.shadow)} here (was the EMA decay 0 when it was saved?)"
            )
        self.shadow = {k: v.detach().clone() for k, v in state["shadow"].items()}
        self.num_updates = int(state["num_updates"])


class EMACheckpoint:
    """Mixin for a LightningModule whose `self.ema` (an `EMA`) travels in its checkpoints.

    List it before LightningModule (`class M(EMACheckpoint, LightningModule)`): the averages are saved
    under `ckpt["ema"]` and restored on resume, which `load_module_weights(..., ema_key="ema")` reads.
    """

    ema: EMA
    net: torch.nn.Module

    def ema_net(self) -> torch.nn.Module:
        """A copy of `self.net` with the EMA weights (what sampling, evaluation and the next stage use)."""
        net = copy.deepcopy(self.net)
        if self.ema.enabled:
            self.ema.copy_to(net)
        return net.eval()

    def on_save_checkpoint(self, ckpt: dict) -> None:
        ckpt["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, ckpt: dict) -> None:
        if "ema" in ckpt:
            self.ema.load_state_dict(ckpt["ema"])


def step_generator(
    seed: int, step: int, rank: int | None = None, device: torch.device | str = "cpu", stream: int = 0
) -> torch.Generator:
    """A torch.Generator that is a pure function of (seed, step, rank, stream): resumable randomness.

    Draw a training step's random numbers from it (timesteps, noise, rollout choices) and a
    resumed run draws exactly what an uninterrupted one would have, since global_step is in the
    checkpoint. `rank=None` gives the same numbers on every rank: use it for choices the ranks
    must agree on (CDMD's exit step, rollout length); pass `self.global_rank` for per-rank draws
    (noise). `stream` separates independent uses within one step.
    """
    key = f"{seed}/{step}/{'shared' if rank is None else int(rank)}/{stream}".encode()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1))
    return g
