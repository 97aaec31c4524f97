import pytest
import torch

from merge_ops.static.topk import TopK, kth_largest

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def magnitudes(dtype: torch.dtype, n: int, ties: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 0.05
    if ties:  # few distinct values: most elements tie with many others
        x = torch.round(x * 40) / 40
    x[:7] = 0.0
    return x.to(dtype).abs()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_kth_largest_matches_kthvalue(dtype: torch.dtype, ties: bool) -> None:
    x = magnitudes(dtype, 20011, ties)
    n = x.numel()
    for k in (1, 2, 1000, n // 2, n - 7, n - 1, n):
        t = kth_largest(x, k, block=8192)  # several blocks
        ref = torch.kthvalue(x.double(), n - k + 1).values.item()
        assert t.value == ref
        assert t.n_greater == int((x.double() > ref).sum())
        assert t.n_equal == int((x.double() == ref).sum())
        assert 0 < t.ties_kept <= t.n_equal


def test_the_dropped_ties_are_the_last_ones_by_index() -> None:
    x = magnitudes(torch.bfloat16, 5000, ties=True, seed=1)
    for k in (10, 2500, 4000):
        t = kth_largest(x, k, block=999)
        ties = (x == t.value).nonzero().squeeze(1)
        assert torch.equal(t.dropped_ties, ties[t.ties_kept:])
        kept = (x > t.value).sum() + ties[:t.ties_kept].numel()
        assert int(kept) == k


def test_one_pass_serves_several_k() -> None:
    x = magnitudes(torch.float32, 10000, ties=False, seed=3)
    top = TopK(x.numel(), x.dtype)
    for s in range(0, x.numel(), 997):
        top.add(s, x[s:s + 997])
    for k in (1, 4321, 10000):
        assert top.threshold(k, lambda idx: x[idx]).value == torch.kthvalue(x, x.numel() - k + 1).values


def test_special_values_order_like_numbers() -> None:
    x = torch.tensor([0.0, float("inf"), 1e-45, 3.0, 3.0, 2.0], dtype=torch.float32)
    assert kth_largest(x, 1).value == float("inf")
    assert kth_largest(x, 2).value == 3.0 and kth_largest(x, 2).n_equal == 2
    assert kth_largest(x, 5).value == pytest.approx(1e-45)  # subnormal above zero
    assert kth_largest(x, 6).value == 0.0


def test_bad_input_is_refused() -> None:
    x = torch.ones(5)
    with pytest.raises(ValueError):
        kth_largest(x, 6)
    with pytest.raises(ValueError):
        kth_largest(x, 0)
    top = TopK(10, torch.float32)
    top.add(0, x)
    with pytest.raises(ValueError, match="5 of 10"):
        top.threshold(1, lambda idx: x[idx])
    with pytest.raises(TypeError):
        top.add(5, x.double())
