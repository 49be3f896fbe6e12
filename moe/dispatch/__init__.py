"""Dispatchers: the seam between routing and experts (local gather here; all-to-all for EP)."""

from moe.dispatch.local import Dispatched, LocalDispatcher

__all__ = ["Dispatched", "LocalDispatcher"]
