"""Budget allocation: never over the byte budget, frequent tokens first, close to optimal."""
import pytest
import torch

from tensorslm.rank_store.budget import BudgetError, allocate_budget, calibration_counts, frequency_prior

COSTS = torch.tensor([100.0, 50.0, 20.0, 5.0])


def _errors(V: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = torch.tensor([0.0, 1.0, 3.0, 8.0])  # richer options leave less error
    return base + 0.1 * torch.rand(V, 4, generator=g)


@pytest.mark.parametrize("budget", [5 * 100, 5 * 100 + 1, 1234.5, 20 * 100, 100 * 100])
def test_never_over_budget(budget: float) -> None:
    choice = allocate_budget(_errors(100), COSTS, budget, frequency_prior(100))
    assert float(COSTS[choice].sum()) <= budget
    assert choice.shape == (100,) and choice.dtype == torch.int64


def test_frequent_tokens_get_richer_options() -> None:
    errors = torch.tensor([0.0, 1.0, 3.0, 8.0]).expand(1000, 4)  # every token alike...
    choice = allocate_budget(errors, COSTS, 1000 * 30, frequency_prior(1000))  # ...but usage differs
    spent = COSTS[choice]  # (V,)
    assert float(spent[:100].mean()) > float(spent[-100:].mean())
    assert bool((spent[:-1] >= spent[1:]).all())  # bytes never rise as the id (usage) falls


def test_uses_most_of_the_budget_and_beats_uniform() -> None:
    V = 400
    errors, weights = _errors(V), frequency_prior(V, offset=1.0)  # strongly skewed usage
    budget = V * 20.0
    choice = allocate_budget(errors, COSTS, budget, weights)
    assert float(COSTS[choice].sum()) > 0.9 * budget
    uniform = (errors[:, 2] * weights).sum()  # every token at the 20-byte option
    assert float((errors.gather(1, choice[:, None])[:, 0] * weights).sum()) < float(uniform)


def test_budget_below_cheapest() -> None:
    with pytest.raises(BudgetError, match="below the 500 bytes of the cheapest option"):
        allocate_budget(_errors(100), COSTS, 499)


def test_calibration_counts() -> None:
    w = calibration_counts(torch.tensor([1, 1, 1, 2]), 5, smoothing=0.5)
    assert w.argmax() == 1 and abs(float(w.sum()) - 1) < 1e-6 and float(w[0]) > 0
    with pytest.raises(BudgetError, match=r"must lie in 0..4"):
        calibration_counts([7], 5)


def test_prior_decreases() -> None:
    w = frequency_prior(1000)
    assert bool((w[:-1] > w[1:]).all()) and abs(float(w.sum()) - 1) < 1e-5
