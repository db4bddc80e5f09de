"""Optional dependencies: checked before work starts, refused with the pip line that adds them."""

from __future__ import annotations

from localv3.errors import LocalV3Error

LLAMA_EXTRA = "pip install 'localv3[llama]'"


class MissingExtraError(LocalV3Error):
    pass


def require_llama_cpp(needed_for: str, otherwise: str = "") -> None:
    """Raise, naming `needed_for`, the install line and `otherwise` (what works without it),
    when llama-cpp-python cannot be imported."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        alternative = f" ({otherwise})" if otherwise else ""
        raise MissingExtraError(f"{needed_for} needs llama-cpp-python: {LLAMA_EXTRA}{alternative}") from None
