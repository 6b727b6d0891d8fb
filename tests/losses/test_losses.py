"""Loss terms and metrics: parity with scikit-image, hinge/adaptive values, LPIPS offline loading."""

import warnings

import numpy as np
import pytest
import torch

from megadual.losses import adaptive_weight, hinge_d_loss, hinge_g_loss, psnr, semantic_loss, ssim


def _pair(seed=0, noise=0.3, size=32):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    return (a + noise * torch.randn(a.shape, generator=g)).clamp(-1, 1), a


def test_psnr_and_ssim_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rec, ref = _pair()
    unit = lambda t: ((t + 1) / 2).permute(1, 2, 0).numpy().astype(np.float64)  # noqa: E731
    want_ssim = [structural_similarity(unit(ref[i]), unit(rec[i]), gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=1.0, channel_axis=-1) for i in range(2)]
    want_psnr = [peak_signal_noise_ratio(unit(ref[i]), unit(rec[i]), data_range=1.0) for i in range(2)]
    # float32 convolutions against skimage's float64 filters
    np.testing.assert_allclose(ssim(rec, ref, reduce=False).numpy(), want_ssim, rtol=1e-4)
    np.testing.assert_allclose(psnr(rec, ref, reduce=False).numpy(), want_psnr, rtol=1e-5)
    assert float(ssim(ref, ref)) == pytest.approx(1.0, abs=1e-5)


def test_hinge_losses():
    zeros = torch.zeros(2, 1, 3, 3)
    assert float(hinge_d_loss(zeros, zeros)) == pytest.approx(1.0)  # undecided discriminator
    assert float(hinge_d_loss(zeros + 2, zeros - 2)) == 0.0  # confident and right: no loss
    assert float(hinge_d_loss(zeros - 1, zeros + 1)) == pytest.approx(2.0)
    assert float(hinge_g_loss(zeros + 0.5)) == pytest.approx(-0.5)


def test_adaptive_weight_is_the_clamped_gradient_ratio():
    g = torch.full((4,), 1.0)
    assert float(adaptive_weight(3 * g, g, 0.0, 100.0, eps=0.0)) == pytest.approx(3.0)
    assert float(adaptive_weight(100 * g, g, 0.3, 10.0)) == pytest.approx(10.0)
    assert float(adaptive_weight(0.01 * g, g, 0.3, 10.0)) == pytest.approx(0.3)


def test_semantic_loss_is_mse_plus_one_minus_cos():
    x = torch.randn(2, 5, 8, requires_grad=True)
    loss, mse, cos = (t.detach() for t in semantic_loss(x, x.detach()))
    assert float(loss) == pytest.approx(0.0, abs=1e-6) and float(cos) == pytest.approx(1.0, abs=1e-6)
    loss, mse, cos = semantic_loss(x, -x.detach())
    assert float(cos) == pytest.approx(-1.0, abs=1e-6)
    assert float(loss) == pytest.approx(float(mse) + 2.0, rel=1e-6)
    loss.backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_lpips_random_backbone_warns_and_local_checkpoint_loads(tmp_path):
    import torchvision  # importable after megadual.models' torchvision fix (conftest)

    from megadual.losses.perceptual import PerceptualLoss

    with pytest.warns(RuntimeWarning, match="RANDOM alex backbone"):
        random_lpips = PerceptualLoss("alex")
    rec, ref = _pair(size=64)
    value = random_lpips(rec, ref)
    assert value.shape == () and float(value) > 0 and float(random_lpips(ref, ref)) == pytest.approx(0.0, abs=1e-6)

    torch.manual_seed(1)
    alex = torchvision.models.alexnet(weights=None)  # the torchvision layout: features.N.weight
    torch.save(alex.state_dict(), tmp_path / "alexnet.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no random-backbone warning now
        loaded = PerceptualLoss("alex", str(tmp_path / "alexnet.pth"))
    assert torch.equal(getattr(loaded.lpips.net.slice1, "0").weight, alex.features[0].weight)
    assert torch.equal(getattr(loaded.lpips.net.slice5, "10").weight, alex.features[10].weight)
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.train()
    assert not loaded.training  # lpips heads have dropout: the loss stays deterministic

    torch.save({"classifier.1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="lacks .* backbone tensors.*features.0.weight"):
        PerceptualLoss("alex", str(tmp_path / "wrong.pth"))
