"""Which CPU kernels the quantised modules use, for tests that need one path."""

from localv3.formats import ggml
from localv3.kernels import products


def dequantise_products(monkeypatch) -> None:
    """Block-quantised weights dequantised on every call, as on a GPU: exact arithmetic, with
    neither localv3's nor ggml's CPU kernels (which quantise activations to 8 bits)."""
    monkeypatch.setattr(products, "library", lambda: None)
    monkeypatch.setattr(ggml, "available", lambda: False)
