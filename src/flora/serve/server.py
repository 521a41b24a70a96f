"""A server assembled from its settings: base model, adapter registry, engine, HTTP application.

`build_state` loads the model (or takes one), starts the engine and loads the ``--adapter``
adapters (pinned) before anything is served; `serve` runs the application with uvicorn.
`ServeSettings` holds flora's settings under vLLM's names where vLLM has one (``flora serve``'s
command line maps vLLM's flags onto them: `flora.cli.serve`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flora.base import cache_dir, resolve_model_dir
from flora.kernels.autotune import Autotuner, machine_fingerprint
from flora.model import AdapterModel
from flora.serve.app import DEFAULT_MAX_REQUEST_BYTES, ServerState, create_app
from flora.serve.engine import BATCHING, Engine, EngineLimits
from flora.serve.metrics import ServerMetrics
from flora.serve.registry import AdapterLoadError, AdapterRegistry
from flora.serve.replicas import ReplicaSettings, serve_replicas

logger = logging.getLogger("flora.serve")


DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "half": torch.float16, "float64": torch.float64, "auto": "auto"}  # fmt: skip
ADAPTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ServeSettings:
    """Every setting of ``flora serve`` (see ``flora serve --help``). ``dtype`` ``auto``: the checkpoint's."""

    model: str = "smollm2-135m"
    served_model_name: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    adapter_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    max_queue: int = 1024
    max_loaded_adapters: int = 64
    adapter_memory_mb: float | None = None
    batching: str = "continuous"
    dtype: str = "float32"
    device: str = "cpu"
    adapter_dtype: str | None = None
    strategy: str = "auto"
    autotune_cache: str | None = "auto"  # the autotuner's choices kept in this JSON file (`autotune_cache_path`)
    max_loras: int | None = None
    max_lora_rank: int | None = None
    api_key: str | None = field(default=None, repr=False)
    enable_runtime_lora_updating: bool = False
    allowed_adapter_paths: list[str] = field(default_factory=list)
    metrics_prefix: str = "flora"
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES

    def check(self) -> None:
        for key in ("max_num_seqs", "max_queue", "max_loaded_adapters", "max_request_bytes"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} {getattr(self, key)}: expected at least 1")
        for key in ("max_num_batched_tokens", "max_model_len", "adapter_memory_mb", "max_loras", "max_lora_rank"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"--{key.replace('_', '-')} {value}: expected a positive number")
        if self.batching not in BATCHING:
            raise ValueError(f"--batching {self.batching!r}: expected one of {', '.join(BATCHING)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.adapter_dtype is not None and self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"--adapter-dtype {self.adapter_dtype!r}: expected one of {', '.join(ADAPTER_DTYPES)}")
        if len(self.adapters) > self.max_loaded_adapters:
            raise ValueError(f"{len(self.adapters)} --adapter given but --max-loaded-adapters is "
                             f"{self.max_loaded_adapters}: pinned adapters must fit")  # fmt: skip
        if self.max_loras is not None and self.max_loras > self.max_loaded_adapters:
            raise ValueError(f"--max-loras {self.max_loras} is more than --max-cpu-loras (--max-loaded-adapters) "
                             f"{self.max_loaded_adapters}: a batch's adapters must all be in memory")  # fmt: skip
        if self.api_key == "":
            raise ValueError("--api-key: the key is empty (expected a non-empty key, or none to serve without one)")


def autotune_cache_path(setting: str, device: str) -> Path:
    """``--autotune-cache``'s file: ``auto`` is ``$FLORA_CACHE/autotune/<this machine>.json``, whose name
    changes with the processor, the threads torch runs on and torch's version."""
    if setting == "auto":
        return cache_dir() / "autotune" / f"{machine_fingerprint(device)}.json"
    return Path(setting)


def build_state(settings: ServeSettings, model: AdapterModel | None = None) -> ServerState:
    """Everything a server needs, its engine running and its ``--adapter`` adapters loaded. A
    ``model`` given is put in eval mode with read-only adapters (`AdapterModel.adapters_read_only`)."""
    settings.check()
    base_path = settings.model
    if model is None:
        base_path = str(resolve_model_dir(settings.model))
        model = AdapterModel.from_pretrained(
            base_path, dtype=DTYPES[settings.dtype], device=settings.device, strategy=settings.strategy
        )
    if model.tokenizer is None:
        raise ValueError("the server needs the model's tokenizer (AdapterModel(..., tokenizer=...))")
    model.eval()
    model.adapters_read_only = True  # the registry installs and deletes adapters, never writes them in place
    if settings.adapter_dtype is not None:
        model.adapter_dtype = ADAPTER_DTYPES[settings.adapter_dtype]
    if settings.autotune_cache is not None:
        model.runtime.tuner = Autotuner(path=autotune_cache_path(settings.autotune_cache, settings.device))
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    max_model_len = settings.max_model_len or context
    if max_model_len > context:
        raise ValueError(f"--max-model-len {max_model_len} is longer than the model's {context} positions")
    base_name = settings.served_model_name or settings.model
    registry = AdapterRegistry(
        base_name, settings.adapter_dir, settings.max_loaded_adapters, settings.adapter_memory_mb,
        allowed_roots=settings.allowed_adapter_paths, max_rank=settings.max_lora_rank, model=model,
    )  # fmt: skip
    limits = EngineLimits(
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens or max(max_model_len, 2048),
        max_model_len=max_model_len,
        max_queue=settings.max_queue,
        max_loras=settings.max_loras,
    )
    tokenizer = model.tokenizer
    eos = model.base_model.generation_config.eos_token_id
    eos_ids = {*([eos] if isinstance(eos, int) else eos or []), tokenizer.eos_token_id} - {None}
    metrics = ServerMetrics(base_name, settings.metrics_prefix, max_model_len)
    engine = Engine(model, registry, limits, metrics, settings.batching, eos_ids, tokenizer.pad_token_id or 0)
    metrics.track(engine)
    registry.on_change = engine.wake
    engine.start()
    for name, path in settings.adapters.items():
        try:
            version = registry.register(name, path, pinned=True)
        except AdapterLoadError as err:
            engine.stop()
            raise ValueError(f"--adapter {name}={path}: {err}") from None
        version.settled.wait()
        if version.state == "failed":
            engine.stop()
            raise ValueError(f"--adapter {name}={path}: {version.error}")
    if registry.adapter_dir is not None and next(registry.adapter_dir.iterdir(), None) is None:
        logger.warning("--adapter-dir %s is empty: only the base model %r is served until adapters are added there",
                       registry.adapter_dir, base_name)  # fmt: skip
    if settings.enable_runtime_lora_updating and not registry.roots:
        logger.warning("runtime adapter loading is on, but no --adapter-dir or --allowed-adapter-paths is given: "
                       "every /v1/load_lora_adapter is refused")  # fmt: skip
    return ServerState(
        base_name, base_path, tokenizer, engine, registry, metrics, max_model_len, int(time.time()),
        api_key=settings.api_key, runtime_lora_updating=settings.enable_runtime_lora_updating,
        max_request_bytes=settings.max_request_bytes,
    )  # fmt: skip


def serve(settings: ServeSettings, replicas: ReplicaSettings | None = None) -> None:
    """Run the server until interrupted: in this process, or as a Ray Serve application when
    ``replicas`` asks for Ray (`flora.serve.replicas`)."""
    if replicas is not None and replicas.on_ray:
        serve_replicas(settings, replicas)
        return
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = build_state(settings)
    uvicorn.run(create_app(state), host=settings.host, port=settings.port, log_level="info")
