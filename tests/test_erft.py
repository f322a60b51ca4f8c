import io
import math

import pytest
import torch

from cf.train.erft import ResidualBank, draw_injection


def test_bank_appends_then_replaces_the_nearest_entry():
    bank = ResidualBank(bins=2, size=2, frame_shape=(2,), dtype=torch.float32)
    sig = torch.tensor([0.1])  # bin 0
    bank.add(torch.tensor([[0.0, 0.0]]), sig)
    bank.add(torch.tensor([[10.0, 10.0]]), sig)
    assert bank.counts.tolist() == [2, 0]
    bank.add(torch.tensor([[9.0, 9.0]]), sig)  # full: replaces [10, 10], its nearest
    assert bank.counts.tolist() == [2, 0]
    assert sorted(bank.residuals[0].tolist()) == [[0.0, 0.0], [9.0, 9.0]]
    bank.add(torch.tensor([[1.0, 1.0]]), torch.tensor([0.9]))  # bin 1
    assert bank.counts.tolist() == [2, 1]


def test_bins_follow_sigma():
    bank = ResidualBank(bins=50, size=1, frame_shape=(1,))
    assert bank.bin_of(torch.tensor([0.0, 0.019, 0.02, 0.5, 1.0])).tolist() == [0, 0, 1, 25, 49]


def test_empty_bins_borrow_from_the_nearest_filled_bin():
    bank = ResidualBank(bins=4, size=3, frame_shape=(1, 1), dtype=torch.float32)
    assert bank.sample(torch.tensor([0.5])).abs().sum() == 0  # nothing collected yet: no perturbation
    bank.add(torch.full((1, 1, 1), 7.0), torch.tensor([0.9]))  # bin 3
    g = torch.Generator().manual_seed(0)
    out = bank.sample(torch.tensor([0.0, 0.3, 0.9]), generator=g)
    assert out.shape == (3, 1, 1) and torch.all(out == 7.0)


def test_sample_draws_only_stored_entries():
    bank = ResidualBank(bins=1, size=5, frame_shape=(1,), dtype=torch.float32)
    bank.add(torch.tensor([[1.0], [2.0], [3.0]]), torch.zeros(3))
    g = torch.Generator().manual_seed(1)
    drawn = bank.sample(torch.zeros(3000), generator=g).flatten()
    assert set(drawn.tolist()) == {1.0, 2.0, 3.0}  # never an empty slot (zeros)
    for v in (1.0, 2.0, 3.0):
        assert abs((drawn == v).float().mean().item() - 1 / 3) < 0.05


def test_bank_survives_a_checkpoint_round_trip():
    bank = ResidualBank(bins=3, size=4, frame_shape=(2, 2))
    bank.add(torch.randn(5, 2, 2), torch.tensor([0.1, 0.5, 0.9, 0.9, 0.9]))
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    other = ResidualBank(bins=3, size=4, frame_shape=(2, 2))
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other.residuals, bank.residuals) and torch.equal(other.counts, bank.counts)


@pytest.mark.parametrize("p", [dict(p_clean=0.5, p_history=0.9, p_target=0.9, p_noise=0.01),
                               dict(p_clean=0.0, p_history=0.3, p_target=0.6, p_noise=0.5)])
def test_injection_rates_match_the_config(p):
    n = 40_000
    inj = draw_injection(n, **p, generator=torch.Generator().manual_seed(0))
    perturbed = 1 - p["p_clean"]
    for part, rate in (("history", p["p_history"]), ("target", p["p_target"]), ("noise", p["p_noise"])):
        expected = perturbed * rate
        tol = 4 * math.sqrt(expected * (1 - expected) / n) + 1e-9
        assert abs(getattr(inj, part).float().mean().item() - expected) < tol, part
    # untouched samples: the p_clean share plus perturbed ones that drew nothing
    q = perturbed * (1 - p["p_history"]) * (1 - p["p_target"]) * (1 - p["p_noise"])
    expected_clean = p["p_clean"] + q
    assert abs(inj.clean.float().mean().item() - expected_clean) < 4 * math.sqrt(expected_clean / n) + 1e-3


def test_bad_bank_shape_is_refused():
    with pytest.raises(ValueError, match="bins=0"):
        ResidualBank(bins=0, size=3, frame_shape=(1,))
