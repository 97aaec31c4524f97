import pytest
import torch

from merge_ops.select import RadixSelect, kth_largest

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
        t = kth_largest(x, k, block=8192)  # several blocks per pass
        ref = torch.kthvalue(x.double(), n - k + 1).values.item()
        assert t.value == ref
        assert t.n_greater == int((x.double() > ref).sum())
        assert t.n_equal == int((x.double() == ref).sum())
        assert 0 < t.ties_kept <= t.n_equal


def test_blocking_does_not_change_the_answer() -> None:
    x = magnitudes(torch.float32, 10000, ties=True, seed=3)
    assert kth_largest(x, 4321, block=997) == kth_largest(x, 4321, block=1 << 20)


def test_special_values_order_like_numbers() -> None:
    x = torch.tensor([0.0, float("inf"), 1e-45, 3.0, 3.0, 2.0], dtype=torch.float32)
    assert kth_largest(x, 1).value == float("inf")
    assert kth_largest(x, 2).value == 3.0 and kth_largest(x, 2).n_equal == 2
    assert kth_largest(x, 5).value == pytest.approx(1e-45)  # subnormal above zero
    assert kth_largest(x, 6).value == 0.0


def test_bad_k_is_refused() -> None:
    x = torch.ones(5)
    with pytest.raises(ValueError):
        kth_largest(x, 6)
    with pytest.raises(ValueError):
        RadixSelect(0, torch.float32)
    sel = RadixSelect(10, torch.float32)
    sel.add(x)
    with pytest.raises(ValueError, match="larger than"):
        sel.next_pass()
