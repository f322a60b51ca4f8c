"""The shared training machinery on a toy regression: exact resume, atomic checkpoints, NaN stops."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from cf.config import load_config
from cf.config.load import to_yaml
from cf.errors import CfError
from cf.train import callbacks as cbm
from cf.train.base import (
    EMA,
    adamw_with_schedule,
    build_optimizer,
    build_scheduler,
    ckpt_path,
    export_safetensors,
    fit,
    load_checkpoint,
    load_module_weights,
    lr_factor,
    make_trainer,
    resolve_precision,
    step_generator,
)
from cf.train.callbacks import AtomicCheckpointIO, NonFiniteError, check_weights_only_safe

B = 3  # batch size of the toy stream


class ToyStream(IterableDataset):
    """The data-stream protocol in miniature: sample i is a pure function of (seed, i)."""

    def __init__(self, seed: int = 0):
        self.seed, self.start, self.rank, self.world_size = seed, 0, 0, 1

    def sample(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        x = torch.randn(4, generator=g, dtype=torch.float64)
        return {"x": x, "y": x.sin().sum(0, keepdim=True), "i": i}

    def __iter__(self):
        k = 0
        while True:
            yield self.sample(self.start + self.rank + self.world_size * k)
            k += 1


class ToyData(LightningDataModule):
    def train_dataloader(self):
        return DataLoader(ToyStream(), batch_size=B)


class Toy(LightningModule):
    def __init__(self, cfg, nan_at: int | None = None):
        super().__init__()
        self.cfg, self.nan_at = cfg, nan_at
        torch.manual_seed(cfg.seed)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.ema = EMA(self.net, cfg.trainer.ema)
        self.seen: list[int] = []  # sample indices in the order this process trained on them

    def training_step(self, batch, batch_idx):
        g = step_generator(self.cfg.seed, self.global_step, self.global_rank, self.device)
        noise = torch.randn(batch["x"].shape, generator=g, dtype=batch["x"].dtype, device=self.device)
        loss = nn.functional.mse_loss(self.net(batch["x"] + 0.1 * noise), batch["y"])
        if self.nan_at is not None and self.global_step == self.nan_at:
            loss = loss * float("nan")
        self.log("toy/loss", loss, prog_bar=True)
        self.seen.extend(batch["i"].tolist())
        return loss

    def configure_optimizers(self):
        return adamw_with_schedule(self.net.parameters(), self.cfg.trainer)

    def on_train_batch_end(self, *args):
        self.ema.update(self.net)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint):
        self.ema.load_state_dict(checkpoint["ema"])


class ManualToy(Toy):
    """CDMD's shape: manual optimisation, a critic step every batch, a generator step on a shared
    random draw, its own clipping; global_step then grows by 1 or 2 per batch."""

    def __init__(self, cfg, nan_at=None):
        super().__init__(cfg, nan_at)
        self.automatic_optimization = False
        self.critic = nn.Linear(4, 1)

    def configure_optimizers(self):
        gen = adamw_with_schedule(self.net.parameters(), self.cfg.trainer)
        critic = adamw_with_schedule(self.critic.parameters(), self.cfg.trainer, lr=0.02)
        return [gen["optimizer"], critic["optimizer"]], [gen["lr_scheduler"], critic["lr_scheduler"]]

    def training_step(self, batch, batch_idx):
        (gen_opt, critic_opt), (gen_sched, critic_sched) = self.optimizers(), self.lr_schedulers()
        step = self.global_step
        noise = torch.randn(batch["x"].shape, generator=step_generator(0, step, self.global_rank),
                            dtype=batch["x"].dtype)
        x = batch["x"] + 0.1 * noise
        for opt, sched, net in ((critic_opt, critic_sched, self.critic), (gen_opt, gen_sched, self.net)):
            if opt is gen_opt and torch.rand(1, generator=step_generator(0, step)) < 0.5:
                continue  # shared draw: every rank skips the same generator steps
            opt.zero_grad()
            value = (net(x) - batch["y"]).pow(2).mean()
            self.manual_backward(value)
            self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
            opt.step()
            sched.step()
            self.log("toy/critic_loss" if opt is critic_opt else "toy/gen_loss", value)
        self.seen.extend(batch["i"].tolist())


class SimulatedKill(Exception):
    pass


class KillAt(Callback):
    """Simulates a kill after optimizer step `step` (not KeyboardInterrupt: Lightning calls exit on it)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            raise SimulatedKill(f"killed at step {self.step}")


def toy_cfg(*overrides):
    base = ["trainer.max_steps=10", "trainer.ckpt_every=3", "trainer.warmup_steps=2", "trainer.lr=0.01",
            "trainer.precision=64-true", "trainer.accelerator=cpu", "trainer.ema=0.9",
            "tracking.enabled=false"]
    return load_config("smoke", overrides=[*base, *overrides])


def train(cfg, out, callbacks=(), nan_at=None, cls=Toy, **kw):
    module = cls(cfg, nan_at)
    fit(make_trainer(cfg, out, "toy", callbacks=callbacks, **kw), module, ToyData(), out, "toy")
    return module


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 10-step run, shared by the resume tests."""
    out = tmp_path_factory.mktemp("ref")
    return train(toy_cfg(), out), out


def assert_same_training(a: Toy, b: Toy):
    for (name, p), q in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        assert torch.equal(p, q), f"{name} differs by {(p - q).abs().max().item()}"
    for name, s in a.ema.shadow.items():
        assert torch.equal(s, b.ema.shadow[name]), f"EMA of {name} differs"


def test_killed_run_resumes_to_identical_weights(reference, tmp_path):
    """Killed after step 7 (last checkpoint: step 6) and resumed: bit-identical to never stopping.

    Exact equality holds because every random draw comes from (seed, step)-keyed generators and
    the data stream is a pure function of the sample index, in float64 on the CPU.
    """
    ref, _ = reference
    cfg = toy_cfg()
    with pytest.raises(SimulatedKill):
        train(cfg, tmp_path, callbacks=[KillAt(7)])
    assert load_checkpoint(ckpt_path(tmp_path, "toy"))["global_step"] == 6
    resumed = train(cfg, tmp_path)
    assert resumed.trainer.global_step == 10
    assert resumed.seen == list(range(6 * B, 10 * B))  # the stream picked up exactly after the checkpoint
    assert ref.seen == list(range(10 * B))
    assert_same_training(ref, resumed)
    assert load_checkpoint(ckpt_path(tmp_path, "toy"))["global_step"] == 10


def test_manual_optimisation_resumes_exactly(tmp_path):
    cfg = toy_cfg()
    ref = train(cfg, tmp_path / "ref", cls=ManualToy, grad_clip=0)
    with pytest.raises(SimulatedKill):
        train(cfg, tmp_path / "run", callbacks=[KillAt(7)], cls=ManualToy, grad_clip=0)
    saved = load_checkpoint(ckpt_path(tmp_path / "run", "toy"))
    resumed = train(cfg, tmp_path / "run", cls=ManualToy, grad_clip=0)
    done = saved["callbacks"]["StreamPosition"]["samples"]
    assert 0 < done < len(ref.seen) and done % B == 0
    assert B < len(ref.seen) < 10 * B  # some batches took two optimizer steps, some one
    assert resumed.seen == ref.seen[done:]  # batches, not global steps, position the stream
    assert_same_training(ref, resumed)
    assert all(torch.equal(p, q) for p, q in zip(ref.critic.parameters(), resumed.critic.parameters()))


def test_wall_clock_stop_saves_and_resumes_exactly(reference, tmp_path):
    ref, _ = reference
    first = train(toy_cfg("trainer.max_minutes=1e-9"), tmp_path)
    assert first.trainer.global_step == 1  # stopped cleanly after the step in which time ran out
    assert load_checkpoint(ckpt_path(tmp_path, "toy"))["global_step"] == 1
    resumed = train(toy_cfg(), tmp_path)
    assert resumed.seen == list(range(B, 10 * B))
    assert_same_training(ref, resumed)


def test_finished_stage_returns_at_once(reference):
    ref, out = reference
    again = train(toy_cfg(), out)
    assert again.seen == []
    assert_same_training(ref, again)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = toy_cfg("trainer.ckpt_every=1")
    with pytest.raises(NonFiniteError) as err:
        train(cfg, tmp_path, nan_at=5)
    msg = str(err.value)
    assert "toy/loss=nan" in msg and "batch 5" in msg and "last good checkpoint" in msg
    assert str(ckpt_path(tmp_path, "toy")) in msg
    ckpt = load_checkpoint(ckpt_path(tmp_path, "toy"))
    assert ckpt["global_step"] == 5  # the step that produced NaN was never saved
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.ones(3), "global_step": 1}, path)
    before = path.read_bytes()

    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")  # written through a file object, so a full disk is an OSError
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cbm.torch, "save", dying_save)
    with pytest.raises(CfError, match=r"no space left on device while writing '.*last.ckpt'"):
        io.save_checkpoint({"w": torch.zeros(3), "global_step": 2}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left behind
    assert io.load_checkpoint(path)["global_step"] == 1


def test_checkpoint_is_weights_only_safe_and_hands_off_weights(reference):
    ref, out = reference
    ckpt = torch.load(ckpt_path(out, "toy"), weights_only=True)
    assert ckpt["cf_config"] == to_yaml(ref.cfg) and ckpt["cf_stage"] == "toy"
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    net.load_state_dict(load_module_weights(ckpt_path(out, "toy"), prefix="net."))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), ref.net.parameters()))
    net.load_state_dict(load_module_weights(ckpt_path(out, "toy"), prefix="net.", ema_key="ema"))
    assert all(torch.equal(p, ref.ema.shadow[n]) for n, p in net.named_parameters())
    with pytest.raises(CfError, match="no weights under prefix 'critic.'"):
        load_module_weights(ckpt_path(out, "toy"), prefix="critic.")


def test_config_objects_are_refused_in_checkpoints():
    check_weights_only_safe({"a": [1, 2.0, "x", None, torch.zeros(1)], "b": {"c": (True, torch.float32)}})
    with pytest.raises(CfError, match=r"checkpoint\['lr'\] is a numpy.float64"):
        check_weights_only_safe({"lr": np.float64(0.1)})  # a float subclass, still refused by torch.load
    where = r"checkpoint\['hyper_parameters'\]\['cfg'\] is a omegaconf"
    with pytest.raises(CfError, match=where + ".*save_hyperparameters"):
        check_weights_only_safe({"hyper_parameters": {"cfg": toy_cfg()}})


def test_manual_optimisation_with_lightning_clipping_is_refused(tmp_path):
    module = Toy(toy_cfg())
    module.automatic_optimization = False
    with pytest.raises(CfError, match="grad_clip=0"):
        fit(make_trainer(toy_cfg(), tmp_path, "toy"), module, ToyData(), tmp_path, "toy")


def test_bare_dataloader_is_not_silently_resumed_from_zero(tmp_path):
    cfg = toy_cfg("trainer.max_steps=2", "trainer.ckpt_every=1")
    fit(make_trainer(cfg, tmp_path, "toy"), Toy(cfg),
        DataLoader(ToyStream(), batch_size=B), tmp_path, "toy")
    cfg = toy_cfg("trainer.max_steps=4")
    with pytest.raises(CfError, match="should continue at sample 6 but starts at 0"):
        fit(make_trainer(cfg, tmp_path, "toy"), Toy(cfg),
            DataLoader(ToyStream(), batch_size=B), tmp_path, "toy")


def test_ema_matches_hand_computation():
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema = EMA(lin, 0.5)
    for w in (1.0, 2.0):
        with torch.no_grad():
            lin.weight.fill_(w)
        ema.update(lin)
    assert ema.shadow["weight"].item() == 1.25  # 0.5 * (0.5 * 0 + 0.5 * 1) + 0.5 * 2
    with ema.average_parameters(lin):
        assert lin.weight.item() == 1.25
    assert lin.weight.item() == 2.0  # live weights back
    other = EMA(lin, 0.5)
    other.load_state_dict(ema.state_dict())
    other.copy_to(lin)
    assert lin.weight.item() == 1.25 and other.num_updates == 2
    off = EMA(lin, 0.0)
    off.update(lin)
    off.copy_to(lin)
    assert lin.weight.item() == 1.25 and off.state_dict()["shadow"] == {}
    with pytest.raises(ValueError, match="must be in"):
        EMA(lin, 1.0)


def test_lr_schedule_values():
    assert lr_factor(0, 10, 110, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, "cosine") == 1.0  # warm-up ends at full lr
    assert lr_factor(10, 10, 110, "cosine") == 1.0
    assert lr_factor(60, 10, 110, "cosine") == pytest.approx(0.5)
    assert lr_factor(110, 10, 110, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(109, 10, 110, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert lr_factor(110, 10, 110, "constant") == 1.0
    cfg = toy_cfg("trainer.warmup_steps=4", "trainer.max_steps=8", "trainer.lr=0.1")
    opt = build_optimizer([nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))], cfg.trainer)
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.trainer.weight_decay, 0.0]
    sched = build_scheduler(opt, cfg.trainer)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lrs[4] == pytest.approx(0.1) and lrs[6] == pytest.approx(0.05)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # at step max_steps


def test_step_generator_is_keyed_by_seed_step_rank():
    draw = lambda *a, **k: torch.rand(4, generator=step_generator(*a, **k))
    assert torch.equal(draw(0, 5), draw(0, 5)) and torch.equal(draw(0, 5, rank=1), draw(0, 5, rank=1))
    others = [draw(1, 5), draw(0, 6), draw(0, 5, rank=0), draw(0, 5, rank=1), draw(0, 5, stream=1)]
    assert all(not torch.equal(draw(0, 5), o) for o in others)
    assert not torch.equal(draw(0, 5, rank=0), draw(0, 5, rank=1))


def test_precision_follows_config():
    assert resolve_precision(toy_cfg("trainer.precision=auto")) == "32-true"
    assert resolve_precision(toy_cfg("trainer.precision=auto", "model.dtype=fp64")) == "64-true"
    assert resolve_precision(toy_cfg("trainer.precision=auto", "trainer.accelerator=gpu")) == "bf16-mixed"
    assert resolve_precision(toy_cfg("trainer.precision=16-mixed", "model.dtype=fp64")) == "16-mixed"


def test_export_safetensors_round_trip(tmp_path):
    from safetensors import safe_open

    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    net[1].weight = net[0].weight  # tied weights share storage
    path = export_safetensors(net, tmp_path / "net.safetensors", metadata={"stage": "toy"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"stage": "toy"}
        assert torch.equal(f.get_tensor("1.weight"), net[0].weight.detach())
        assert set(f.keys()) == set(net.state_dict())


DDP_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_train_base import KillAt, SimulatedKill, Toy, ToyData, toy_cfg
from cf.train.base import fit, make_trainer, step_generator

out, kill = sys.argv[1], int(sys.argv[2])
cfg = toy_cfg("trainer.strategy=ddp", "trainer.devices=2")
module = Toy(cfg)
trainer = make_trainer(cfg, out, "toy", callbacks=[KillAt(kill)] if kill else [])
try:
    fit(trainer, module, ToyData(), out, "toy")
except SimulatedKill:
    pass
shared = torch.rand(3, generator=step_generator(cfg.seed, 4)).tolist()
own = torch.rand(3, generator=step_generator(cfg.seed, 4, rank=trainer.global_rank)).tolist()
flat = torch.cat([p.detach().flatten() for p in module.net.parameters()]).tolist()
with open(f"{{out}}/rank{{trainer.global_rank}}-{{kill}}.json", "w") as f:
    json.dump({{"seen": module.seen, "weights": flat, "shared": shared, "own": own}}, f)
"""


@pytest.mark.slow
def test_two_process_ddp_on_cpu_agrees_and_resumes(tmp_path):
    """gloo DDP, 2 ranks: identical weights, shared draws agree, and a killed run resumes exactly."""
    import json

    script = tmp_path / "ddp_toy.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    for out, kills in ((tmp_path / "straight", [0]), (tmp_path / "killed", [7, 0])):
        out.mkdir()
        for kill in kills:
            subprocess.run([sys.executable, str(script), str(out), str(kill)], check=True, env=env,
                           cwd=tmp_path, timeout=300, capture_output=True)
    res = {(o, r): json.loads((tmp_path / o / f"rank{r}-0.json").read_text())
           for o in ("straight", "killed") for r in (0, 1)}
    a, b = res["straight", 0], res["straight", 1]
    assert a["weights"] == b["weights"] and a["shared"] == b["shared"] and a["own"] != b["own"]
    assert sorted(a["seen"] + b["seen"]) == list(range(10 * B * 2))  # each sample once across ranks
    assert res["killed", 0]["weights"] == a["weights"]  # resumed at step 6 of 10, exactly
    assert sorted(res["killed", 0]["seen"] + res["killed", 1]["seen"]) == list(range(6 * B * 2, 10 * B * 2))


@pytest.mark.parametrize("minutes,cut", [(None, 0.0), (1e-9, 1.0)])
def test_a_stage_reports_its_steps_and_whether_a_wall_clock_cut_it_short(tmp_path, monkeypatch, minutes, cut):
    import contextlib

    from cf import tracking
    from cf.train.base import run_stage

    logged: dict[str, float] = {}

    class Recorder(tracking._NullRun):
        def log_metrics(self, metrics, step=None):
            logged.update(metrics)

    monkeypatch.setattr(tracking, "start_run", lambda *a, **k: contextlib.nullcontext(Recorder()))
    cfg = toy_cfg(f"trainer.max_minutes={'null' if minutes is None else minutes}")
    run_stage(cfg, tmp_path, "toy", Toy(cfg, None), ToyData, max_steps=10, clock="trainer.max_minutes")
    assert logged == {"toy/steps": 1.0 if cut else 10.0, "toy/planned_steps": 10.0, "toy/cut_short": cut}
