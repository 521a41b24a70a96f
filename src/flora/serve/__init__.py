"""``flora serve``: an OpenAI-compatible server where every request brings its own adapter.

Modules:

- `protocol`: request bodies and the error body (OpenAI's and vLLM's shapes).
- `app`: the HTTP routes (FastAPI), streaming, tokenization and detokenization.
- `engine`: continuous batching on one thread; every row through its own adapter in one forward.
- `slot_cache`: the running batch's key/value cache, one slot per row, written in place.
- `sampling`: greedy and seeded sampling per row.
- `registry`: adapters by name, loaded on first use, LRU eviction, pinning, in-place reloads.
- `metrics`: Prometheus metrics.
- `server`: `ServeSettings`, `build_state` and `serve`.
- `replicas`: ``--replicas N``: N servers as one Ray Serve application, routed by adapter.

The design, the API and measurements: ``docs/serving.md``.

The public names are imported on first use (PEP 562), as `flora`'s: the modules that need no model
(`protocol`, `auth`, `body_limit`, `replicas`: what Ray Serve's ingress runs) load no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it.
_EXPORTS = {"ServerState": "flora.serve.app", "create_app": "flora.serve.app", "ServeSettings": "flora.serve.server",
            "build_state": "flora.serve.server", "serve": "flora.serve.server"}  # fmt: skip

__all__ = ["ServeSettings", "ServerState", "build_state", "create_app", "serve"]

if TYPE_CHECKING:
    from flora.serve.app import ServerState, create_app
    from flora.serve.server import ServeSettings, build_state, serve


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
