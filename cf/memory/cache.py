"""KVCache: per-layer buffers of un-rotated keys and values, one slot per held frame.

Writes happen explicitly after a forward (`write(out.kv, ...)`), then the policy says which
frames to forget; forgotten slots are refilled from the end (swap-remove), so held frames always
occupy slots [0, used) and `read` hands out views, not copies. Attention does not depend on the
order of keys (each carries its own position), so slot order never matters. Buffers are
allocated on the first write (batch, tokens, heads and dtype come from the model) with room for
the policy's capacity, so bounded policies never reallocate; `full` grows by doubling.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cf.memory.base import MemoryPolicy
from cf.model.read import CacheRead


class KVCache:
    def __init__(self, policy: MemoryPolicy):
        self.policy = policy
        self._k: list[Tensor] = []  # per layer [B, cap, N, H, Dh]
        self._v: list[Tensor] = []
        self._cam: Tensor | None = None  # [B, cap, 2]
        self.reset()

    def reset(self) -> None:
        """Start a new video: forget every frame and the policy's state (buffers are reused)."""
        self.state = self.policy.init_state()
        self.slot_times: list[int] = []  # absolute frame index held in each used slot
        self._has_cam = False

    # ------------------------------------------------------------------ sizes
    @property
    def used(self) -> int:
        return len(self.slot_times)

    @property
    def n_written(self) -> int:
        """Frames written since the last reset = the absolute index of the next frame."""
        return self.state.n

    def nbytes(self) -> int:
        """Bytes of the frames held now (keys, values, cameras)."""
        if not self._k:
            return 0
        per_frame = sum(t[:, :1].nbytes for t in self._k + self._v)
        if self._cam is not None and self._has_cam:
            per_frame += self._cam[:, :1].nbytes
        return per_frame * self.used

    def allocated_bytes(self) -> int:
        return sum(t.nbytes for t in self._k + self._v) + (self._cam.nbytes if self._cam is not None else 0)

    # ------------------------------------------------------------------ write / read
    @torch.no_grad()
    def write(self, kv: list[tuple[Tensor, Tensor]], cameras: Tensor | None = None,
              mean_keys: Tensor | None = None) -> list[int]:
        """Append frames (the next absolute indices) and apply the policy. Returns forgotten frames.

        kv: per layer un-rotated (k, v) [B, m, N, H, Dh] (ModelOutput.kv of a sigma-0 pass);
        cameras [B, m, 2] or None; mean_keys [B, m, Dk] (ModelOutput.mean_key).
        """
        m = kv[0][0].shape[1]
        self._ensure(kv, self.used + m, cameras is not None)
        lo = self.used
        for buf, (k, _) in zip(self._k, kv):
            buf[:, lo:lo + m].copy_(k)
        for buf, (_, v) in zip(self._v, kv):
            buf[:, lo:lo + m].copy_(v)
        if cameras is not None:
            self._cam[:, lo:lo + m].copy_(cameras)
            self._has_cam = True
        first = self.state.n
        self.slot_times.extend(range(first, first + m))
        dropped = self.policy.admit(self.state, m, mean_keys)
        self._forget(dropped)
        return dropped

    def read(self, n_query: int | None = None) -> CacheRead:
        """The held frames (views of the buffers) with the positions the policy gives them."""
        frames, positions, query = self.policy.layout(self.state, n_query)
        pos_of = dict(zip(frames, positions))
        device = self._k[0].device if self._k else torch.device("cpu")
        u = self.used
        # built on the host and copied without waiting: no device sync in the rollout loop
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long).to(device, non_blocking=True)
        return CacheRead(
            k=[b[:, :u] for b in self._k],
            v=[b[:, :u] for b in self._v],
            positions=as_long([pos_of[t] for t in self.slot_times]),
            times=as_long(self.slot_times),
            cameras=self._cam[:, :u] if self._has_cam else None,
            query_positions=as_long(query),
        )

    # ------------------------------------------------------------------ storage
    def _ensure(self, kv: list[tuple[Tensor, Tensor]], need: int, with_cam: bool) -> None:
        k0 = kv[0][0]
        shape = (k0.shape[0], *k0.shape[2:])  # [B, N, H, Dh]
        fits = (self._k and len(self._k) == len(kv) and (self._k[0].shape[0], *self._k[0].shape[2:]) == shape
                and self._k[0].dtype == k0.dtype and self._k[0].device == k0.device)
        if fits and self._k[0].shape[1] >= need and (self._cam is not None or not with_cam):
            return
        cap_policy = self.policy.capacity
        if cap_policy is not None:
            cap = max(need, cap_policy + k0.shape[1])
        else:
            cap = max(need, 2 * self._k[0].shape[1] if fits else need)
        keep = self.used if fits else 0
        if not fits and self.used:
            raise RuntimeError("KVCache: a write of another batch/shape/dtype/device while frames are held; "
                               "call reset() before starting a new video")
        new = lambda old, like: self._grow(old, like, cap, keep)
        self._k = [new(self._k[i] if fits else None, k) for i, (k, _) in enumerate(kv)]
        self._v = [new(self._v[i] if fits else None, v) for i, (_, v) in enumerate(kv)]
        if with_cam or self._cam is not None:
            cam_like = torch.empty(k0.shape[0], 1, 2, dtype=torch.float64 if k0.dtype == torch.float64
                                   else torch.float32, device=k0.device)
            self._cam = self._grow(self._cam if fits else None, cam_like, cap, keep)

    @staticmethod
    def _grow(old: Tensor | None, like: Tensor, cap: int, keep: int) -> Tensor:
        buf = like.new_empty((like.shape[0], cap, *like.shape[2:]))
        if old is not None and keep:
            buf[:, :keep].copy_(old[:, :keep])
        return buf

    def _forget(self, dropped: list[int]) -> None:
        """Swap-remove: move frames from the end into the freed slots, one gather per buffer."""
        if not dropped:
            return
        gone = set(dropped)
        n_keep = self.used - len(gone)
        holes = [i for i in range(n_keep) if self.slot_times[i] in gone]
        movers = [i for i in range(n_keep, self.used) if self.slot_times[i] not in gone]
        if holes:
            dev = self._k[0].device
            dst = torch.tensor(holes, dtype=torch.long).to(dev, non_blocking=True)
            src = torch.tensor(movers, dtype=torch.long).to(dev, non_blocking=True)
            for buf in self._k + self._v + ([self._cam] if self._cam is not None else []):
                buf.index_copy_(1, dst, buf.index_select(1, src))
            for h, mv in zip(holes, movers):
                self.slot_times[h] = self.slot_times[mv]
        del self.slot_times[n_keep:]
