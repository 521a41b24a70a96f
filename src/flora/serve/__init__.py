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
"""

from flora.serve.app import ServerState, create_app
from flora.serve.server import ServeSettings, build_state, serve

__all__ = ["ServeSettings", "ServerState", "build_state", "create_app", "serve"]
