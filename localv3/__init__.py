"""localv3: DeepSeek-V3-class MoE models on one GPU plus CPU RAM."""

from localv3.errors import LocalV3Error


def load(model, *args, **kwargs):
    """Load a models.toml name, a pulled hub repo id, a model directory or a GGUF file -> an
    engine; the arguments are localv3.api.load's (imported on first use: torch is heavy)."""
    from localv3.api import load as _load

    return _load(model, *args, **kwargs)


__all__ = ["LocalV3Error", "load"]
