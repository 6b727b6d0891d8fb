import pytest

from megadual.config.schema import OptimConfig
from megadual.train.schedule import lr_at


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(s, cfg, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 20) == pytest.approx(1.0)
    assert lr_at(12, cfg, 20) == pytest.approx(0.55)
    assert lr_at(20, cfg, 20) == pytest.approx(0.1)


def test_linear_and_constant():
    assert lr_at(5, OptimConfig(lr=2.0, schedule="linear", min_lr_ratio=0.0), 10) == pytest.approx(1.0)
    assert lr_at(9, OptimConfig(lr=2.0, schedule="constant"), 10) == 2.0
