"""FLOP counting, MFU and the step profiler (cf.perf) that the benchmarks report with."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cf.perf import StepProfiler, as_callback, count_flops, mfu, peak_matmul_flops


def test_count_flops_is_exact_for_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    flops, out = count_flops(lambda: a @ b)
    assert flops == 2 * 8 * 16 * 4
    assert torch.equal(out, a @ b)


def test_count_flops_includes_the_backward():
    lin = torch.nn.Linear(16, 4, bias=False)
    x = torch.randn(8, 16)  # no grad for the input: backward only computes the weight's gradient
    fwd, _ = count_flops(lambda: lin(x))
    both, _ = count_flops(lambda: lin(x).sum().backward())
    assert fwd == 2 * 8 * 16 * 4
    assert both == 2 * fwd


def test_mfu_formula():
    assert mfu(1e9, 0.5, 4e9) == pytest.approx(0.5)
    assert mfu(1e9, 0.0, 4e9) == 0.0


def test_peak_matmul_flops_is_positive_and_finite():
    peak = peak_matmul_flops("cpu", size=64, repeats=2, min_seconds=0.01)
    assert 0 < peak < float("inf")


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 4, bias=False)

    def training_step(self, batch, batch_idx):
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_step_profiler_times_every_batch_and_counts_one(tmp_path):
    prof = StepProfiler(count_batches=(2,))
    data = DataLoader(TensorDataset(torch.randn(48, 16)), batch_size=8)
    trainer = pl.Trainer(max_steps=6, callbacks=[as_callback(prof)], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(_Tiny(), data)
    assert len(prof.times) == 5 and all(t > 0 for t in prof.times)  # batch 2 was counted, not timed
    # forward matmul 2*8*16*4 and the weight gradient as much again; elementwise ops count nothing
    assert prof.flops == [2 * 2 * 8 * 16 * 4]


def test_count_flops_counts_attention():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    flops, _ = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert flops == 2 * (2 * 2 * 5 * 8 * 5)  # q @ k^T and scores @ v, per head


def test_compare_runs_the_baseline_with_its_own_cf(tmp_path):
    """The baseline tree's process imports the baseline's `cf`, not this checkout's editable install."""
    import subprocess
    import sys

    from benchmarks.compare import _BOOT

    (tmp_path / "cf").mkdir()
    (tmp_path / "cf" / "__init__.py").write_text("WHERE = 'baseline'\n")
    (tmp_path / "probe.py").write_text("import cf\nprint(cf.WHERE, cf.__file__)\n")
    out = subprocess.run([sys.executable, "-c", _BOOT, "probe"], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "baseline" and out[1].startswith(str(tmp_path))


def test_compare_table_gives_each_round_and_the_speed_up_of_the_means():
    from benchmarks.compare import table

    def run(*ms):
        common = {"device": "cpu (2 threads)", "dtype": "float32", "batch_size": 8, "steps_timed": 30}
        return {"stages": [{"stage": f"s{i}", "step_s": m / 1e3, **common} for i, m in enumerate(ms)]}

    md = table("tiny", "HEAD~1", "0" * 40, {"baseline": [run(100, 50), run(120, 50)],
                                            "current": [run(80, 50), run(80, 100)]})
    assert "| s0 | 100.0 / 120.0 | 80.0 / 80.0 | 1.38x |" in md
    assert "| s1 | 50.0 / 50.0 | 50.0 / 100.0 | 0.67x |" in md


def test_compare_refuses_a_revision_that_is_not_a_commit(capsys):
    from benchmarks.compare import main

    assert main(["no-such-rev-xyz"]) == 2
    assert "'no-such-rev-xyz' is not a commit" in capsys.readouterr().err
