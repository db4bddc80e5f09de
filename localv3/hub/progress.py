"""How a pull reports what it does: the dry-run plan, bytes saved, waits and retries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from localv3.hub.pulling import PullPlan


class PullProgress(Protocol):
    def planned(self, plan: PullPlan) -> None:
        """The dry run is done; downloads start next."""

    def advanced(self, nbytes: int) -> None:
        """`nbytes` more bytes were saved (negative when a server ignored a Range request)."""

    def waiting(self, message: str) -> None:
        """A request is slow or is being tried again (called from a timer thread too)."""


class QuietProgress:
    def planned(self, plan: PullPlan) -> None:
        pass

    def advanced(self, nbytes: int) -> None:
        pass

    def waiting(self, message: str) -> None:
        pass
