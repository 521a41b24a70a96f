"""The adapters a server can serve, by public name, and which of them are in memory.

Adapters come from three places: ``--adapter NAME=PATH`` (loaded at start and pinned: never
evicted), ``--adapter-dir DIR`` (every PEFT-format directory inside, servable by its directory name
and loaded on its first request) and ``POST /v1/load_lora_adapter`` at run time.

What a client can make the server read is confined (`AdapterRegistry.confine`): an adapter-dir
entry and a run-time ``lora_path`` are served only if the directory, its ``adapter_config.json``
and its ``adapter_model.safetensors``, symlinks followed, lie under a *root*: the adapter dir or an
``--allowed-adapter-paths`` directory. Pinned adapters, named by the operator, are not confined. An
adapter whose rank (LoRA's and FLoRA's ``r``, the largest of ``rank_pattern``) is above
``max_rank`` (``--max-lora-rank``) is refused when it is leased, registered and read.

Adapters live in tiers: the directory on disk (thousands of entries, listed only when asked, never
read at start) -> host memory, at most ``memory_mb`` of tensors (and ``max_loaded`` adapters) ->
the engine's per-step tables, for the rows that run (`flora.methods.slot_tables`). A request
*leases* its adapter's current `AdapterVersion` for as long as it waits or runs, and a lease moves
it up:

1. *inspected* when leased (off the event loop): its config and its safetensors header are read and
   checked against the base model (`AdapterModel.check_adapter`: method, layers, shapes, the
   config's rank against the tensors'), its size worked out: an adapter that cannot be served, or
   that is larger than ``memory_mb`` alone, is refused there, before anything is evicted for it;
2. *queued* for memory, in lease order: the engine's thread (`apply`) starts reading the head of
   the queue once its bytes fit under ``memory_mb``, evicting least recently used adapters that no
   request holds and that are not pinned to make them fit. So adapters of queued requests are read
   ahead of their turn (prefetch), as far as memory allows, and the bytes held never pass the cap;
3. *read* on a worker thread, then installed into the model by the engine's thread, between decoding
   steps (*ready*). The engine waits for a read it starts for at most `READ_WAIT_S` (a few ms is the
   usual read), so the adapter joins the step boundary it was asked at; a slower read never stalls
   the other requests longer than that.

A version that fails to load is *failed*: the requests that hold it are answered with its error,
nothing else is. Loading a new version under a name in use (``load_inplace``) makes it the current
version at once for new requests, while requests that hold the old one finish on it; the old one is
removed when the last of them ends. The model itself is only ever changed by the engine's thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import itertools
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from flora.io import CONFIG_NAME, WEIGHTS_NAME, AdapterFiles, inspect_adapter_dir
from flora.model import AdapterModel

logger = logging.getLogger("flora.serve")

MAX_NAME_LENGTH = 200
SHOWN_LENGTH = 120  # characters of a client's name or path echoed in an error message
READ_WAIT_S = 0.05
"""How long `AdapterRegistry.apply` (the engine's thread, between steps) waits for the reads it has
just started. A LoRA adapter read from the page cache takes a few milliseconds (rank 32 on SmolLM2's
``q_proj,v_proj``: 1-7 ms), far less than a decoding step: waiting for it installs the adapter at the
step boundary where it was asked for, instead of one step (100-300 ms under load) later, at the cost
of that wait to the running rows once per cold adapter. A slower read (a cold disk) goes on in the
background after it, and the running rows keep decoding."""
TRIM_INTERVAL_S = 1.0
"""How often at most `AdapterRegistry.apply` hands the heap memory of dropped adapters back to the
operating system (glibc's ``malloc_trim``). An adapter's tensors are many small allocations that
the allocator keeps for reuse, so a server that reads and evicts adapters keeps growing past its
``memory_mb`` (a replay of 300 steps over 2,000 SmolLM2 adapters, 38 in memory: peak resident
memory 1,851 MB untrimmed, 1,695 MB trimmed after every step); a trim takes 1.5 ms (at most 10 ms),
once a second at most and only after an adapter left memory."""


class UnknownAdapterError(KeyError):
    """No adapter of that name (HTTP 404)."""


class AdapterLoadError(ValueError):
    """An adapter that cannot be served: bad name, missing or invalid files, a rank above the limit,
    another base model (HTTP 400). ``param`` names the request field at fault."""

    def __init__(self, message: str, param: str = "lora_name") -> None:
        super().__init__(message)
        self.param = param


class AdapterAccessError(PermissionError):
    """Files outside every root the server may read adapters from (HTTP 403)."""


def shown(text: Any) -> str:
    """``repr(text)``, cut to `SHOWN_LENGTH` characters with the full length said: a client's
    10,000-character name is not echoed back."""
    text = str(text)
    if len(text) <= SHOWN_LENGTH:
        return repr(text)
    return f"{text[:SHOWN_LENGTH]!r}... ({len(text)} characters)"


def adapter_rank(config: dict[str, Any]) -> int | None:
    """The largest rank of an adapter config (``r`` and ``rank_pattern``, PEFT's names: LoRA, FLoRA);
    ``None`` for methods without a rank (IA3, BitFit, bottleneck adapters, prompt and prefix tuning)."""
    if "r" not in config:
        return None
    pattern = config.get("rank_pattern") or {}
    ranks = [config["r"], *(pattern.values() if isinstance(pattern, dict) else [pattern])]
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        raise ValueError(f"r {config['r']!r} and rank_pattern {pattern!r}: expected integers")
    return max(ranks)


@dataclass(eq=False)
class AdapterVersion:
    """One version of an adapter, and how far up the tiers it is.

    Attributes:
        name: the public name (what requests put in ``model``).
        internal: its name inside the `AdapterModel` (unique per version).
        state: ``unloaded`` (on disk), ``inspecting``, ``queued`` (waiting for memory), ``reading``,
            ``read`` (tensors in memory, not installed), ``ready`` (in the model), ``failed``
            (``error`` says why).
        nbytes: its tensors' bytes in the model's dtype (known once inspected).
        users: requests holding it (waiting or running).
        retired: replaced by a newer version or unloaded: removed from the model once unused.
        settled: set once it is ready or failed.
    """

    name: str
    internal: str
    path: Path
    pinned: bool = False
    state: str = "unloaded"
    error: str | None = None
    users: int = 0
    nbytes: int = 0
    last_used: float = 0.0
    retired: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    settled: threading.Event = field(default_factory=threading.Event)
    files: AdapterFiles | None = None
    tensors: dict[str, Tensor] | None = None  # read, not installed yet
    _on_settled: list[Callable[[], None]] = field(default_factory=list)
    _settle_lock: threading.Lock = field(default_factory=threading.Lock)

    def settle(self) -> None:
        """It is ready or failed: `settled` is set and the callbacks waiting for it run (on this thread)."""
        with self._settle_lock:
            self.settled.set()
            callbacks, self._on_settled = self._on_settled, []
        for callback in callbacks:
            callback()

    def on_settled(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once it is settled (now, if it is): how an event loop waits for it
        without a thread."""
        with self._settle_lock:
            if not self.settled.is_set():
                self._on_settled.append(callback)
                return
        callback()


def check_name(name: Any, what: str = "lora_name") -> str:
    """A public adapter name: a non-empty string without ``/`` or ``..`` (never a path)."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
        raise AdapterLoadError(f"{what} {shown(name)} is invalid (expected a non-empty string of at most "
                               f"{MAX_NAME_LENGTH} characters)", what)  # fmt: skip
    if "/" in name or "\\" in name or ".." in name or name.strip() != name:
        raise AdapterLoadError(f"{what} {shown(name)} is invalid: an adapter name may not contain '/', '\\\\' or "
                               f"'..' or surrounding spaces (it names an adapter, not a path)", what)  # fmt: skip
    return name


class AdapterRegistry:
    """Public adapter names, their versions, leases, loading and LRU eviction (see the module docstring).

    Args:
        base_name: the served name of the base model (never an adapter's).
        adapter_dir: directory whose sub-directories are servable adapters, or ``None``.
        max_loaded: adapters in memory at most.
        memory_mb: megabytes of adapter tensors in memory at most (``None``: no limit).
        on_change: called (from any thread) when the engine has work to apply.
        allowed_roots: directories besides ``adapter_dir`` that confined adapters may be read from.
        max_rank: adapters of a higher rank are refused (``None``: no limit).
        model: the model adapters are checked against (`AdapterModel.check_adapter`) and whose dtype
            their bytes are counted in (``None``: not checked before they are installed; 4 bytes).
    """

    def __init__(
        self,
        base_name: str,
        adapter_dir: str | os.PathLike | None = None,
        max_loaded: int = 64,
        memory_mb: float | None = None,
        on_change: Callable[[], None] = lambda: None,
        allowed_roots: Sequence[str | os.PathLike] = (),
        max_rank: int | None = None,
        model: AdapterModel | None = None,
    ) -> None:
        if max_loaded < 1:
            raise ValueError(f"--max-loaded-adapters {max_loaded}: expected at least 1")
        if max_rank is not None and max_rank < 1:
            raise ValueError(f"--max-lora-rank {max_rank}: expected at least 1")
        if adapter_dir is not None and not Path(adapter_dir).is_dir():
            raise FileNotFoundError(f"--adapter-dir {str(adapter_dir)!r} is not a directory")
        for root in allowed_roots:
            if not Path(root).is_dir():
                raise FileNotFoundError(f"--allowed-adapter-paths {str(root)!r} is not a directory")
        self.base_name = base_name
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir is not None else None
        self.roots = list(dict.fromkeys([*([self.adapter_dir] if self.adapter_dir else []),
                                         *(Path(root).resolve() for root in allowed_roots)]))  # fmt: skip
        self.max_rank = max_rank
        self.max_loaded = max_loaded
        self.memory_mb = memory_mb
        self.memory_bytes = None if memory_mb is None else int(memory_mb * 2**20)
        self.on_change = on_change
        self.current: dict[str, AdapterVersion] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.model = model
        self.element_size = 4 if model is None else next(model.base_model.parameters()).element_size()
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flora-adapter-reader")
        self._queue: deque[AdapterVersion] = deque()  # inspected, waiting for memory to be read
        self._read: deque[AdapterVersion] = deque()  # read, to be installed
        self._removals: deque[AdapterVersion] = deque()
        self._loaded: list[AdapterVersion] = []  # in the model
        self.held_bytes = 0  # tensors of the versions being read, read or in the model
        self.counters = {"loads": 0, "hits": 0, "evictions": 0}
        self._freed = False  # an adapter left memory since the last trim
        self._trimmed_at = 0.0

    # -- names ---------------------------------------------------------------------------------

    def names(self) -> dict[str, AdapterVersion | Path]:
        """Every servable name: registered versions, then adapter directories not loaded yet."""
        with self._lock:
            return self._names()

    def _names(self) -> dict[str, AdapterVersion | Path]:
        served: dict[str, AdapterVersion | Path] = dict(self.current)
        for path in self._dir_entries():
            served.setdefault(path.name, path)
        return served

    def _dir_entries(self) -> list[Path]:
        """The adapter dir's servable entries, resolved (an entry whose files resolve outside every root
        is left out)."""
        if self.adapter_dir is None:
            return []
        entries = (p for p in self.adapter_dir.iterdir() if (p / CONFIG_NAME).is_file() and ".." not in p.name)
        return sorted(p for p in entries if self._outside(p) is None)

    # -- what may be read ------------------------------------------------------------------------

    def confine(self, path: str | os.PathLike, subject: str | None = None) -> Path:
        """``path`` resolved (symlinks followed), if it, its ``adapter_config.json`` and its
        ``adapter_model.safetensors`` lie under a root; `AdapterAccessError` naming ``subject`` (the
        path by default), the rule and the roots otherwise."""
        outside = self._outside(Path(path))
        if outside is not None:
            target, resolved = outside
            roots = ", ".join(repr(str(root)) for root in self.roots) or "none: start the server with one"
            where = "" if str(resolved) == str(path) else f", which resolves to {shown(resolved)},"
            if target != Path(path):
                where = f", whose {target.name} resolves to {shown(resolved)},"
            raise AdapterAccessError(
                f"{subject or f'lora_path {shown(path)}'}{where} is outside the directories adapters may be read "
                f"from: adapters are loaded only from under --adapter-dir or --allowed-adapter-paths, symlinks "
                f"followed (allowed: {roots})"
            )
        return Path(path).resolve()

    def _outside(self, path: Path) -> tuple[Path, Path] | None:
        """The first of ``path`` and its two adapter files that resolves outside every root, and where it
        resolves to (``None``: all inside)."""
        for target in (path, path / CONFIG_NAME, path / WEIGHTS_NAME):
            try:
                resolved = target.resolve()
            except (OSError, RuntimeError):  # a symlink loop
                return target, target
            if not any(resolved.is_relative_to(root) for root in self.roots):
                return target, resolved
        return None

    def _check_rank(self, name: str, config: dict[str, Any], param: str) -> None:
        if self.max_rank is None:
            return
        try:
            rank = adapter_rank(config)
        except ValueError as err:
            raise AdapterLoadError(f"adapter {shown(name)}: {err}", param) from None
        if rank is not None and rank > self.max_rank:
            raise AdapterLoadError(f"adapter {shown(name)} has rank {rank}, above the server's --max-lora-rank "
                                   f"{self.max_rank}", param)  # fmt: skip

    def _new_version(self, name: str, path: Path, pinned: bool) -> AdapterVersion:
        return AdapterVersion(name, f"adapter-{next(self._ids)}", path, pinned=pinned)

    # -- leases (request side) -----------------------------------------------------------------

    def lease(self, name: str) -> tuple[AdapterVersion, bool]:
        """The current version of ``name`` for a new request, held until `release`, and whether it was in
        the model when leased (a hit: decided here, as the engine may install it a moment later); one not
        in memory is inspected (file reads: call it off the event loop) and queued to be read. Raises
        `UnknownAdapterError` for a name nobody serves, `AdapterAccessError` for an adapter-dir entry
        outside the roots and `AdapterLoadError` for one that cannot be served (its error says why)."""
        with self._lock:
            version = self.current.get(name)
            if version is None:
                path = self._find_in_dir(name)
                version = self.current[name] = self._new_version(name, path, pinned=False)
            version.users += 1
            version.last_used = time.monotonic()
            hit = version.state == "ready"
            if hit:
                self.counters["hits"] += 1
            if version.state != "unloaded":
                return version, hit
            version.state = "inspecting"
        try:
            self._inspect(version, "model")
        except AdapterLoadError:
            self.release(version)
            raise
        return version, False

    def _inspect(self, version: AdapterVersion, param: str) -> None:
        """Inspect ``version``'s files and queue it to be read, or fail it (`AdapterLoadError`)."""
        try:
            files = inspect_adapter_dir(version.path)
            self._check_rank(version.name, files.config, param)
            if self.model is not None:
                self.model.check_adapter(version.internal, files.config, files.shapes, version.path)
            nbytes = files.nbytes(self.element_size)
            if self.memory_bytes is not None and nbytes > self.memory_bytes:
                raise ValueError(f"its tensors take {nbytes / 2**20:.2f} MB, more than the adapters' memory "
                                 f"(--adapter-memory-mb {self.memory_mb:g})")  # fmt: skip
        except (OSError, ValueError) as err:
            message = f"adapter {version.name!r} cannot be loaded: {_reason(err)}"
            self._fail(version, message)
            raise AdapterLoadError(message, param) from None
        with self._lock:
            version.files, version.nbytes, version.state = files, nbytes, "queued"
            self._queue.append(version)
        self.on_change()

    def hold(self, version: AdapterVersion) -> None:
        """Count one more user of ``version`` (released with `release`)."""
        with self._lock:
            version.users += 1
            version.last_used = time.monotonic()

    def release(self, version: AdapterVersion) -> None:
        """A request no longer holds ``version``."""
        with self._lock:
            version.users -= 1
            if version.retired and version.users == 0 and version.state == "ready":
                self._removals.append(version)
        self.on_change()

    def _find_in_dir(self, name: str) -> Path:
        """The adapter dir's entry ``name``, resolved and confined, its rank checked."""
        if name == self.base_name:
            raise AssertionError("the base model is not an adapter")
        try:
            check_name(name, "model")
        except AdapterLoadError:
            raise UnknownAdapterError(self._unknown_message(name)) from None
        path = self.adapter_dir / name if self.adapter_dir is not None else None
        if path is None or not (path / CONFIG_NAME).is_file():
            raise UnknownAdapterError(self._unknown_message(name))
        path = self.confine(path, f"model {shown(name)} (the --adapter-dir entry {shown(path)})")
        if self.max_rank is not None:
            self._check_rank(name, _read_config(path, "model"), "model")
        return path

    def _unknown_message(self, name: str) -> str:
        known = sorted(self._names())  # only for the error: listing thousands of entries is not free
        names = ", ".join(repr(n) for n in [self.base_name, *known][:50])
        more = f" and {len(known) - 49} more" if len(known) > 49 else ""
        return f"The model {shown(name)} does not exist. Available models: {names}{more}."

    def _read_files(self, version: AdapterVersion) -> None:
        """The reader thread: ``version``'s tensors into memory, for the engine to install."""
        try:
            tensors = version.files.read()
            shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
            if shapes != version.files.shapes:
                raise ValueError(f"{version.files.weights_file} changed since it was inspected")
        except (OSError, ValueError) as err:
            self._fail(version, f"adapter {version.name!r} cannot be loaded: {_reason(err)}")
        else:
            with self._lock:
                version.tensors, version.state = tensors, "read"
                self._read.append(version)
        self.on_change()

    def _fail(self, version: AdapterVersion, message: str) -> None:
        with self._lock:
            if version.state in ("reading", "read"):
                self.held_bytes -= version.nbytes
            version.state, version.error, version.tensors = "failed", message, None
            if self.current.get(version.name) is version and not version.pinned:
                del self.current[version.name]  # a later request tries the files again
        version.settle()
        logger.warning("%s", message)

    # -- run-time API --------------------------------------------------------------------------

    def register(
        self, name: str, path: str | os.PathLike, pinned: bool = False, inplace: bool = False, confined: bool = False
    ) -> AdapterVersion:
        """A new adapter (or, with ``inplace``, a new version of one) read from ``path``: inspected
        (`AdapterLoadError` if it cannot be served) and queued. ``confined``: ``path`` must lie under a
        root (`confine`; a client's path). Returns the version; wait for ``version.settled`` to know
        whether it loaded."""
        check_name(name)
        if name == self.base_name:
            raise AdapterLoadError(f"lora_name {shown(name)} is the base model's name")
        path = self.confine(path) if confined else Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise AdapterLoadError(f"lora_path {shown(path)} is not a PEFT adapter directory (no {CONFIG_NAME})",
                                   "lora_path")  # fmt: skip
        if self.max_rank is not None:
            self._check_rank(name, _read_config(path, "lora_path"), "lora_path")
        with self._lock:
            old = self.current.get(name)
            if old is not None and old.state != "failed" and not inplace:
                raise AdapterLoadError(
                    f"The lora adapter {name!r} has already been loaded. If you want to load a new version under "
                    f"the same name, set load_inplace to true"
                )
            version = self.current[name] = self._new_version(name, path, pinned)
            version.state = "inspecting"
            if old is not None:
                self._retire(old)
        self._inspect(version, "lora_path")
        return version

    def unregister(self, name: str) -> None:
        """``name`` is no longer served as registered (an adapter-dir entry stays servable: it is only
        dropped from memory). Requests running on it finish first."""
        with self._lock:
            version = self.current.pop(name, None)
            if version is None:
                raise UnknownAdapterError(f"The lora adapter {shown(name)} cannot be found.")
            self._retire(version)
        self.on_change()

    def _retire(self, version: AdapterVersion) -> None:
        version.retired = True
        if version.users == 0 and version.state == "ready":
            self._removals.append(version)

    # -- engine side ---------------------------------------------------------------------------

    def apply(self, model: AdapterModel) -> bool:
        """The engine's thread, between steps: remove retired adapters, install those read, and start
        reading queued ones that fit in memory (evicting idle ones for them); reads started here are
        waited for up to `READ_WAIT_S` and installed if done, so a cold adapter read in time joins the
        step it was asked for rather than the next one. Returns whether the model's adapters changed."""
        changed = self._remove_retired(model)
        changed |= self._install_read(model)
        started = self._start_reads(model)
        if started:
            wait_for(started, timeout=READ_WAIT_S)
            changed |= self._install_read(model)
        if self._freed and time.monotonic() - self._trimmed_at >= TRIM_INTERVAL_S:
            self._freed, self._trimmed_at = False, time.monotonic()
            return_freed_memory()
        return changed

    def _remove_retired(self, model: AdapterModel) -> bool:
        changed = False
        with self._lock:
            while self._removals:
                version = self._removals.popleft()
                if version.state == "ready" and version.users == 0:
                    self._remove(model, version)
                    changed = True
        return changed

    def _install_read(self, model: AdapterModel) -> bool:
        """Install the versions read, as far as adapters not in use can make room; whether any was."""
        changed = False
        with self._lock:
            waiting = deque()
            while self._read:
                version = self._read.popleft()
                if version.state != "read":
                    continue
                if version.retired and version.users == 0:  # replaced or unloaded before anyone used it
                    self._forget(version)
                    continue
                if not self._make_room(model, count=1, nbytes=0):
                    waiting.append(version)  # every adapter in the model is in use: next step
                    continue
                changed |= self._install(model, version)
            self._read = waiting
        return changed

    def _start_reads(self, model: AdapterModel) -> list[Future]:
        """Start reading queued versions, in lease order, while their bytes fit (evicting for them)."""
        started = []
        with self._lock:
            while self._queue:
                version = self._queue[0]
                if version.state != "queued" or (version.retired and version.users == 0):
                    self._queue.popleft()
                    if version.state == "queued":
                        version.state = "unloaded"
                    continue
                if not self._make_room(model, count=0, nbytes=version.nbytes):
                    break  # the head waits for memory: later ones wait behind it (lease order)
                self._queue.popleft()
                version.state = "reading"
                self.held_bytes += version.nbytes
                self.counters["loads"] += 1
                started.append(self._reader.submit(self._read_files, version))
        return started

    def _install(self, model: AdapterModel, version: AdapterVersion) -> bool:
        tensors, version.tensors = version.tensors, None
        try:
            model.install_adapter(version.internal, version.files.config, tensors, version.path)
        except ValueError as err:  # `check_adapter` passed: this is not expected, but answers only its requests
            self.held_bytes -= version.nbytes
            version.state, version.error = "failed", f"adapter {version.name!r} cannot be served: {err}"
            if self.current.get(version.name) is version and not version.pinned:
                del self.current[version.name]
            logger.warning("%s", version.error)
            version.settle()
            return False
        version.state = "ready"
        self._loaded.append(version)
        version.settle()
        return True

    def _make_room(self, model: AdapterModel, count: int, nbytes: int) -> bool:
        """Evict idle adapters (least recently used first) until ``count`` more adapters and ``nbytes``
        more bytes fit; whether they do."""

        def over() -> bool:
            too_many = len(self._loaded) + count > self.max_loaded
            too_big = self.memory_bytes is not None and self.held_bytes + nbytes > self.memory_bytes
            return too_many or too_big

        while over():
            idle = [v for v in self._loaded if v.users == 0 and not v.pinned]
            if not idle:
                return False
            self._remove(model, min(idle, key=lambda v: v.last_used))
            self.counters["evictions"] += 1
        return True

    def _remove(self, model: AdapterModel, version: AdapterVersion) -> None:
        model.delete_adapter(version.internal)
        self._loaded.remove(version)
        self._forget(version)

    def _forget(self, version: AdapterVersion) -> None:
        """``version``'s tensors leave memory: it is on disk only again."""
        self.held_bytes -= version.nbytes
        version.state, version.tensors = "unloaded", None
        self._freed = True
        version.settled.clear()

    def waiting_installs(self) -> bool:
        """Whether `apply` has work that does not wait for a request to end."""
        with self._lock:
            return bool(self._read or self._removals)

    def loaded(self) -> list[AdapterVersion]:
        with self._lock:
            return list(self._loaded)

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)


def _read_config(path: Path, param: str) -> dict[str, Any]:
    """The ``adapter_config.json`` of ``path`` (a JSON object), or `AdapterLoadError`."""
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterLoadError(f"{path / CONFIG_NAME}: cannot be read as JSON ({err})", param) from None
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{path / CONFIG_NAME}: expected a JSON object", param)
    return config


def _reason(err: BaseException) -> str:
    """An error's message (a missing file's ``FileNotFoundError`` says which)."""
    return err.args[0] if isinstance(err, KeyError) and err.args else str(err)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): nothing to call
        return None


def return_freed_memory() -> None:
    """Give the heap's free pages back to the operating system (glibc's ``malloc_trim(0)``; nothing
    elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
