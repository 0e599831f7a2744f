"""sdfast's numpy noise equals torch.randn with a seeded CPU generator."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sdfast.sampling.noise import TorchCompatibleGenerator, randn


@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (2, 4, 96, 96), (1, 4, 8, 8), (1, 4, 9, 9), (17,), (3, 5), (1,)])
@pytest.mark.parametrize("seed", [0, 42, 123456789, 2**32 + 7])
def test_randn_matches_torch(shape, seed):
    expected = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)).numpy()
    ours = randn(shape, seed)
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 1e-5


def test_successive_draws_follow_torchs_stream():
    """Several draws from one generator (as ancestral samplers do) stay in step with torch, including its cached normal."""
    ours = TorchCompatibleGenerator(7)
    theirs = torch.Generator("cpu").manual_seed(7)
    for shape in [(3,), (1, 4, 8, 8), (5,), (20,), (1, 4, 8, 8)]:
        assert np.abs(ours.randn(shape) - torch.randn(shape, generator=theirs).numpy()).max() <= 1e-5


def test_different_seeds_differ():
    assert not np.allclose(randn((1, 4, 8, 8), 1), randn((1, 4, 8, 8), 2))
