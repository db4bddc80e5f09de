"""localv3: DeepSeek-V3-class MoE models on one GPU plus CPU RAM."""

from localv3.errors import LocalV3Error


def load(model, device=None, dtype=None, **kwargs):
    """Load a models.toml name, a pulled hub repo id, or a local model directory -> an engine."""
    from localv3.api import load as _load

    return _load(model, device=device, dtype=dtype, **kwargs)


__all__ = ["LocalV3Error", "load"]
