"""`AdapterModel`: a transformers causal LM carrying many adapters, a different one per row.

Adapters of any supported method, rank and set of target modules live side by side; a forward
or `generate` call takes ``adapter_names`` (one per row, ``None`` or ``"__base__"`` for the bare
base model) and runs the whole mixed batch at once. Names follow Hugging Face PEFT
(`add_adapter`, `load_adapter`, `delete_adapter`, `set_adapter`, ``adapter_names=``).

Layer adapters (LoRA, IA3, ...) live in banks inside the wrapped Linear/Conv1D layers; virtual-token
adapters (prompt and prefix tuning) live in `self.virtual_tokens` (`flora.virtual_tokens`), which
adds each row's soft prompt or attention prefix to the inputs of forward and generate.
"""

from __future__ import annotations

import copy
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.base import load_base
from flora.hub import resolve_adapter_dir
from flora.io import KEY_PREFIX, read_adapter_dir, split_key, write_adapter_dir
from flora.kernels.autotune import Autotuner, token_bucket
from flora.layer import ADAPTABLE, AdaptedLayer, layer_features, weight_out_in
from flora.methods import METHODS, AdapterConfig, Bank, method_for
from flora.methods.base import ADAPTER_NAME
from flora.methods.lora_group import link_groups
from flora.methods.prompt import PromptLearningConfig
from flora.routing import Routing, RoutingState
from flora.virtual_tokens import VIRTUAL_METHODS, VirtualTokens, virtual_config_class

BASE_NAME = "__base__"
STRATEGIES = ("auto", "bmm", "loop", "segmented", "stacked", "flora")

CARRIED_SHAPES = 32  # routing shapes whose compiled layers `AdapterModel.routing` keeps to carry over


class AdapterModel(nn.Module):
    """A base model plus adapter banks in its Linear/Conv1D layers.

    Args:
        base_model: a transformers ``PreTrainedModel`` (its parameters are frozen).
        tokenizer: optional, kept as ``self.tokenizer`` for convenience.
        strategy: how per-row adapters are computed; ``"auto"`` (measure and cache the fastest per
            layer shape and batch composition), ``"bmm"``, ``"loop"``, ``"segmented"``, ``"stacked"``
            or ``"flora"``.
            A method that lacks the named strategy uses its own default (see each method).
    """

    def __init__(
        self,
        base_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        strategy: str = "auto",
    ) -> None:
        super().__init__()
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.routing_state = RoutingState()
        self.routing_state.tuner = Autotuner()
        self.strategy = strategy
        self.adapter_configs: dict[str, AdapterConfig | PromptLearningConfig] = {}
        self.active_adapter: str | None = None
        for parameter in base_model.parameters():
            parameter.requires_grad_(False)
        self.virtual_tokens = VirtualTokens()
        # What decides a routing's `Routing.shape`: per adapter, the layers it adapts and its rank in
        # each (interned: equal kinds share one number), and the layers, banks and LoRA groups there
        # are (a new token whenever they change).
        self._kinds: dict[str, int] = {}
        self._kind_numbers: dict[tuple, int] = {}
        self._structure: tuple = ()
        self._structure_token = object()
        self._carriers: OrderedDict[tuple, Routing] = OrderedDict()  # shape -> its last routing (`routing`)
        # Every Linear/Conv1D of the base model by name, in module order: the layer, or the `AdaptedLayer`
        # wrapping it. Found by one walk when adapters are added or deleted (`_adaptable_modules`) and
        # kept up to date by `_wrap` and `_uninstall`, so that the rest of an install or a delete (a
        # server's LRU) walks no module tree.
        self._layers: dict[str, nn.Module] = self._find_layers()
        # ``(in_features, out_features)`` of each of them: what `check_adapter` reads (never the modules)
        self._layer_shapes = {name: layer_features(module) for name, module in self._layers.items()}
        self.train(base_model.training)  # the base model's mode (eval, as `load_base` gives it), for all

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        dtype=torch.float32,
        device="cpu",
        allow_download: bool | None = None,
        **kwargs,
    ):
        """`flora.load_base` then wrap: ``AdapterModel.from_pretrained("smollm2-135m")`` (or a directory, or a
        Hugging Face id in the local cache; ``allow_download=True`` fetches one that is not there)."""
        model, tokenizer = load_base(name_or_path, dtype=dtype, device=device, allow_download=allow_download)
        return cls(model, tokenizer, **kwargs)

    @property
    def config(self):
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return self.base_model.device

    @property
    def strategy(self) -> str:
        return self.routing_state.strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        if value not in STRATEGIES:
            raise ValueError(f"strategy {value!r} is unknown (expected one of {', '.join(STRATEGIES)})")
        self.routing_state.strategy = value

    @property
    def adapters_read_only(self) -> bool:
        """A promise that adapter parameters are never written in place, only added, replaced or
        deleted (as in a server). What flora derives from them and keeps between batches (LoRA's
        per-row tables) is then reused without reading every parameter's version counter on each new
        batch composition. Default ``False``: in-place updates (an optimizer step) are seen."""
        return self.routing_state.adapters_read_only

    @adapters_read_only.setter
    def adapters_read_only(self, value: bool) -> None:
        self.routing_state.adapters_read_only = bool(value)

    # -- adapters ------------------------------------------------------------------------------

    def list_adapters(self) -> list[str]:
        return list(self.adapter_configs)

    def add_adapter(self, adapter_name: str, config: AdapterConfig | PromptLearningConfig) -> None:
        """A new, freshly initialised adapter (LoRA: ``B = 0``; FLoRA, IA3: ones: the identity; prompt and
        prefix tuning: ``config``'s init)."""
        self._check_new_name(adapter_name)
        if isinstance(config, PromptLearningConfig):
            self._install_virtual(adapter_name, config, None)
            return
        targets = [name for name, _ in self._adaptable_modules() if config.targets(name, self._is_output(name))]
        if not targets:
            raise ValueError(
                f"adapter {adapter_name!r}: target_modules={config.target_modules!r} matches no Linear or "
                f"Conv1D layer of the base model (e.g. {self._example_layer_names()})"
            )
        self._install(adapter_name, config, {name: None for name in targets})

    def load_adapter(
        self, path: str | os.PathLike, adapter_name: str = "default", allow_download: bool | None = None
    ) -> str:
        """Load a Hugging Face PEFT adapter directory (or one saved by flora), or a Hugging Face id in the
        local cache (`flora.hub`; ``allow_download=True`` fetches one that is not there), as ``adapter_name``."""
        path = resolve_adapter_dir(path, allow_download)
        return self.install_adapter(adapter_name, *read_adapter_dir(path), path=path)

    def install_adapter(
        self, adapter_name: str, data: dict, tensors: dict[str, Tensor], path: str | os.PathLike = "<memory>"
    ) -> str:
        """Add ``adapter_name`` from an adapter directory already read (``flora.io.read_adapter_dir``:
        its ``adapter_config.json`` content and tensors), so that the files can be read on another
        thread than the one that changes the model (a server). Refuses, changing nothing, an adapter
        whose layers or shapes do not fit this base model (`check_adapter`)."""
        self._check_new_name(adapter_name)
        shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
        config, bank_class, modules = self._parse_adapter(adapter_name, data, shapes, path)
        if bank_class is None:
            self._install_virtual(adapter_name, config, tensors)
        else:
            weights = {
                module: {param: tensors[key] for param, key in params.items()} for module, params in modules.items()
            }
            self._install(adapter_name, config, weights)
        return adapter_name

    def check_adapter(
        self, adapter_name: str, data: dict, shapes: dict[str, tuple[int, ...]], path: str | os.PathLike = "<memory>"
    ) -> None:
        """`ValueError` (naming the adapter and what is wrong) for an adapter that `install_adapter`
        would refuse for its config, its layers or the shapes of its tensors (``shapes``: by file key,
        e.g. from the safetensors header: no tensor is read). Reads only the base layers' shapes, never
        the modules, so it may run beside the thread that runs and changes the model."""
        self._parse_adapter(adapter_name, data, shapes, path)

    def _parse_adapter(
        self, adapter_name: str, data: dict, shapes: dict[str, tuple[int, ...]], path: str | os.PathLike
    ) -> tuple[AdapterConfig | PromptLearningConfig, type[Bank] | None, dict[str, dict[str, str]]]:
        """An adapter file's config, its bank class (``None`` for prompt and prefix tuning) and, per
        layer it adapts, its tensors' file keys by parameter name; checked against this base model."""
        source = str(Path(path) / "adapter_config.json")
        virtual = virtual_config_class(data["peft_type"])
        if virtual is not None:
            return virtual.from_peft_dict(data, source), None, {}
        if str(data["peft_type"]).upper() not in METHODS:
            raise ValueError(
                f"{source}: peft_type {data['peft_type']!r} is not supported (expected one of "
                f"{', '.join([*METHODS, *VIRTUAL_METHODS])})"
            )
        config_class, bank_class = method_for(data["peft_type"], source)
        config = config_class.from_peft_dict(data, source)
        modules: dict[str, dict[str, str]] = {}
        tensor_file = str(Path(path) / "adapter_model.safetensors")
        for key in shapes:
            module, param = split_key(key, bank_class.param_names, tensor_file)
            modules.setdefault(module, {})[param] = key
        for module, params in modules.items():
            if module not in self._layer_shapes:
                raise ValueError(
                    f"adapter {adapter_name!r} ({path}): layer {module!r} is not a Linear/Conv1D layer of this "
                    f"base model ({type(self.base_model).__name__}); was it trained for another model?"
                )
            missing = set(bank_class.param_names) - set(params)
            if missing:
                raise ValueError(f"adapter {adapter_name!r} ({path}): layer {module!r} lacks {sorted(missing)}")
            in_features, out_features = self._layer_shapes[module]
            own = {param: shapes[key] for param, key in params.items()}
            bank_class.check_shapes(adapter_name, config, module, in_features, out_features, own)
        return config, bank_class, modules

    def save_adapter(self, adapter_name: str, path: str | os.PathLike) -> Path:
        """Write ``adapter_name`` in Hugging Face PEFT's format (loadable by ``PeftModel.from_pretrained``)."""
        config = self._config_of(adapter_name)
        tensors = {
            f"{KEY_PREFIX}{module}.{param}": tensor
            for module, layer in self._adapted_layers()
            for bank in layer.banks.values()
            if adapter_name in bank.adapters()
            for param, tensor in bank.adapter_state(adapter_name).items()
        }
        if self.virtual_tokens.holds(adapter_name):  # PEFT's key, without a module prefix
            tensors = self.virtual_tokens.adapter_state(adapter_name)
        data = config.to_peft_dict()
        data["base_model_name_or_path"] = config.base_model_name_or_path or getattr(
            self.base_model.config, "_name_or_path", None
        )
        return write_adapter_dir(path, data, tensors)

    def delete_adapter(self, adapter_name: str) -> None:
        self._config_of(adapter_name)
        self._uninstall(adapter_name)
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def set_adapter(self, adapter_name: str | None) -> None:
        """The adapter for every row when a call passes no ``adapter_names`` (``None``: base model)."""
        if adapter_name is not None and adapter_name != BASE_NAME:
            self._config_of(adapter_name)
        self.active_adapter = None if adapter_name == BASE_NAME else adapter_name

    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """``{"<module>.<tensor>": parameter}`` of one adapter (what an optimizer trains); prompt and
        prefix tuning: ``{"prompt_embeddings": parameter}`` (or the ``prompt_encoder.*`` of a
        reparametrised prefix)."""
        self._config_of(adapter_name)
        if self.virtual_tokens.holds(adapter_name):
            return self.virtual_tokens.adapter_parameters(adapter_name)
        return {
            f"{module}.{param}": tensor
            for module, layer in self._adapted_layers()
            for bank in layer.banks.values()
            if adapter_name in bank.adapters()
            for param, tensor in bank.adapter_state(adapter_name).items()
        }

    def merge_adapter(self, adapter_name: str) -> PreTrainedModel:
        """A plain transformers model (a copy) with ``adapter_name`` folded into its weights.

        The copy's config declares every merged parameter, so ``save_pretrained`` then
        ``from_pretrained`` gives back the same model: where the merge adds biases that the config
        lacks (BitFit on Llama), the config options that create them are turned on (Llama's
        ``attention_bias``, ``mlp_bias``) and the other layers they cover get zero biases; where it
        changes an output layer tied to the input embeddings, the two are untied
        (``tie_word_embeddings=False``). Where no config option declares an added bias (Qwen2's
        ``o_proj`` and MLP), a ValueError names the layers instead of a model that loses them."""
        config = self._config_of(adapter_name)
        if self.virtual_tokens.holds(adapter_name):
            raise ValueError(
                f"adapter {adapter_name!r} is {config.peft_type}: it adds virtual tokens, not a change of weights, "
                f"so it cannot be merged into the base model (run it with adapter_names=[...] instead)"
            )
        merged = copy.deepcopy(self.base_model)
        tied = _tied_parameter_ids(merged)
        with torch.no_grad():
            for module, layer in list(_adapted_layers_of(merged)):
                for bank in layer.banks.values():
                    if adapter_name in bank.adapters():
                        _merge_into_layer(merged, layer, bank, adapter_name, tied)
                merged.set_submodule(module, layer.base_layer)
            _declare_merged_parameters(merged, f"adapter {adapter_name!r} ({config.peft_type})")
        for parameter in merged.parameters():
            parameter.requires_grad_(True)
        return merged

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """The base model's activation (gradient) checkpointing; ``transformers.Trainer`` calls this.

        Non-reentrant checkpointing only: the recomputation in backward runs outside the forward's
        `routed` block, so each checkpointed block records the routing in force and restores it
        when it is recomputed (``context_fn``)."""
        options = dict(activation_checkpointing_kwargs or {})
        if options.get("use_reentrant"):
            raise ValueError("use_reentrant=True is not supported with adapters (expected use_reentrant=False)")
        options.update(use_reentrant=False, context_fn=self._checkpoint_contexts)
        self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.base_model.activation_checkpointing_disable()

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        adapter_names: Sequence[str | None] | None = None,
        **kwargs,
    ):
        """The base model's forward (``[batch, tokens]`` in, its output with ``logits`` and, given
        ``labels``, ``loss``), each row through its own adapter ``adapter_names[i]``. ``logits`` are
        ``[batch, tokens, vocab]`` also when rows use prompt tuning (PEFT also returns the virtual
        tokens' logits, in front; see `flora.virtual_tokens`)."""
        batch = _batch_size(input_ids, kwargs.get("inputs_embeds"))
        if labels is not None:
            kwargs["labels"] = labels
        with self.routed(adapter_names, batch) as routing:
            return self.virtual_tokens(self.base_model, routing, input_ids, attention_mask, kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        adapter_names: Sequence[str | None] | None = None,
        **kwargs,
    ):
        """transformers' ``generate``, each row through its own adapter. Returns ``[batch, prompt + new]``."""
        batch = _batch_size(input_ids, kwargs.get("inputs_embeds"))
        if self.tokenizer is not None and "pad_token_id" not in kwargs:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        with self.routed(adapter_names, batch) as routing, self.virtual_tokens.generating(self.base_model, routing):
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def routed(self, adapter_names: Sequence[str | None] | Routing | None, batch_size: int | None = None):
        """Within the block, forward passes route row ``i`` through ``adapter_names[i]`` (or through a
        `Routing` from `routing`, reused across calls so that its per-routing work is done once)."""
        if isinstance(adapter_names, Routing) or (adapter_names is None and batch_size is None):
            return self._routing_in_force(adapter_names)
        return self._routing_in_force(self._routing(adapter_names, batch_size))

    def routing(self, adapter_names: Sequence[str | None], carry: bool = False) -> Routing | None:
        """The `Routing` of a batch whose row ``i`` uses ``adapter_names[i]`` (``None`` when no row uses
        an adapter). A caller that runs many forward passes over the same rows (incremental decoding)
        keeps it and passes it to `routed`: strategies and per-row weights are then worked out once.
        A caller whose rows keep changing (a server) asks to ``carry``: what the layers compiled for
        the last routing of the same shape (`_shape`) serves this one too where it reads the rows'
        adapters when it runs (`flora.routing`). The last routing of each of the 32 shapes seen last
        is kept for that."""
        routing = self._routing(adapter_names, len(adapter_names))
        if routing is not None and carry and (shape := self._shape(routing.names)) is not None:
            for kept in [key for key, last in self._carriers.items() if not last.reusable]:
                del self._carriers[kept]  # what they compiled holds row indices and tensors of their own
            routing.shape = shape
            routing.carry_over(self._carriers.pop(shape, None))
            self._carriers[shape] = routing
            if len(self._carriers) > CARRIED_SHAPES:
                self._carriers.popitem(last=False)
        return routing

    def _shape(self, names: tuple[str | None, ...]) -> tuple | None:
        """What decides each layer's compiled function for rows ``names`` apart from which adapter each
        row uses: the layers and banks there are, the strategy setting, mode, dtype and device, and,
        when every adapter in the batch adapts the same layers with the same ranks, what the
        autotuner's key reads of the batch (`Bank.choose_strategy`: sizes bucketed, whether one
        adapter serves every row). ``None`` (nothing carries over) for a batch mixing kinds of
        adapters."""
        kinds, adapters, rows = set(), set(), 0
        for name in names:
            if name is not None:
                kinds.add(self._kinds[name])
                adapters.add(name)
                rows += 1
        if len(kinds) != 1:
            return None
        whole_batch = len(adapters) == 1 and rows == len(names)
        sizes = tuple(map(token_bucket, (len(names), len(adapters), rows)))
        model = (self._structure_token, self.strategy, self.training, self.base_model.dtype, self.device)
        return (*model, kinds.pop(), sizes, whole_batch)

    def _restructured(self, layers: list[tuple[str, AdaptedLayer]]) -> None:
        """A new structure token when the adapted layers, their banks or the LoRA groups changed."""
        structure = tuple(
            (layer, *layer.banks.values(), layer.banks["lora"].group if "lora" in layer.banks else None)
            for _, layer in layers
        )
        if structure != self._structure:
            self._structure, self._structure_token = structure, object()
            self._carriers.clear()

    def _set_kind(self, name: str, kind: tuple) -> None:
        self._kinds[name] = self._kind_numbers.setdefault(kind, len(self._kind_numbers))

    def virtual_token_layout(self, routing: Routing | None) -> tuple[Tensor, Tensor] | None:
        """For incremental decoding outside `generate`: what `forward` puts in front of each row's tokens
        for prompt- and prefix-tuning adapters, ``(mask [batch, Np + Nv], shift [batch])``: the cache
        columns of the virtual tokens (1 on a row's own, 0 on padding) and how far the positions of
        the row's real tokens move. ``None`` when no row of ``routing`` has virtual tokens."""
        plan = self.virtual_tokens.plan(routing)
        if plan is None:
            return None
        return plan.virtual_mask(torch.long), plan.offset[:, 0]

    def adapter_nbytes(self, adapter_name: str) -> int:
        """Bytes held by ``adapter_name``'s tensors."""
        return sum(t.numel() * t.element_size() for t in self.adapter_parameters(adapter_name).values())

    @contextmanager
    def _routing_in_force(self, routing: Routing | None) -> Iterator[Routing | None]:
        previous, self.routing_state.current = self.routing_state.current, routing
        try:
            yield routing
        finally:
            self.routing_state.current = previous

    def _checkpoint_contexts(self):
        """``torch.utils.checkpoint``'s ``context_fn``: nothing around the forward; around the
        recomputation, the routing that was in force when the forward ran."""
        return nullcontext(), self._routing_in_force(self.routing_state.current)

    def _routing(self, adapter_names, batch_size: int) -> Routing | None:
        if adapter_names is None:
            adapter_names = [self.active_adapter] * batch_size
        elif isinstance(adapter_names, str):
            raise ValueError(f"adapter_names={adapter_names!r}: expected a list with one name per row")
        if len(adapter_names) != batch_size:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {batch_size} rows "
                f"(expected one adapter name or None per row)"
            )
        names = tuple(None if n == BASE_NAME else n for n in adapter_names)
        unknown = sorted({n for n in names if n is not None and n not in self.adapter_configs})
        if unknown:
            raise ValueError(
                f"unknown adapter name(s) {', '.join(map(repr, unknown))}; loaded adapters: "
                f"{self.list_adapters() or 'none'} (or None / {BASE_NAME!r} for the base model)"
            )
        if all(n is None for n in names):
            return None
        return Routing(names, self.base_model.device)

    # -- internals -----------------------------------------------------------------------------

    def _check_new_name(self, name: str) -> None:
        if name in self.adapter_configs:
            raise ValueError(f"an adapter named {name!r} is already loaded (loaded: {self.list_adapters()})")
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or name == BASE_NAME:
            raise ValueError(
                f"adapter name {name!r} is invalid (expected letters, digits, '_' or '-', not {BASE_NAME!r})"
            )

    def _config_of(self, name: str) -> AdapterConfig:
        if name not in self.adapter_configs:
            raise ValueError(f"unknown adapter {name!r}; loaded adapters: {self.list_adapters() or 'none'}")
        return self.adapter_configs[name]

    def _install(self, name: str, config: AdapterConfig, weights: dict[str, dict[str, Tensor] | None]) -> None:
        """Add ``name`` to the layers in ``weights``; on any error, undo every layer already done."""
        bank_class = METHODS[config.peft_type][1]
        self.adapter_configs[name] = config
        banks = {}
        try:
            for module in weights:
                layer = self._wrap(module)
                like = layer.base_layer.weight
                banks[module] = layer.bank(bank_class)
                banks[module].add(name, config, module, weights[module], like)
        except BaseException:
            self._uninstall(name)
            raise
        self._link_groups()
        self._set_kind(name, (bank_class.method, *sorted((module, bank.rank(name)) for module, bank in banks.items())))
        for bank in banks.values():
            for parameter in bank.adapter_state(name).values():
                parameter.requires_grad_(True)

    def _install_virtual(self, name: str, config: PromptLearningConfig, weights: dict[str, Tensor] | None) -> None:
        """Add prompt- or prefix-tuning adapter ``name`` (``weights``: its file's tensors, or ``None``)."""
        self.adapter_configs[name] = self.virtual_tokens.add(name, config, self.base_model, weights, self.tokenizer)
        self._set_kind(name, (str(config.peft_type),))

    def _uninstall(self, name: str) -> None:
        self.adapter_configs.pop(name, None)
        self._kinds.pop(name, None)
        self.virtual_tokens.remove(name)
        self._find_layers()
        for module, layer in list(self._adapted_layers()):
            for bank in layer.banks.values():
                bank.remove(name)
            layer.drop_empty_banks()
            if not layer.banks:
                self.base_model.set_submodule(module, layer.base_layer)
                self._layers[module] = layer.base_layer
        self._link_groups()

    def _link_groups(self) -> None:
        """LoRA banks of sibling layers that read the same input compute together (`flora.methods.lora_group`)."""
        layers = list(self._adapted_layers())
        link_groups((module, layer.banks["lora"]) for module, layer in layers if "lora" in layer.banks)
        self._restructured(layers)

    def _wrap(self, module_name: str) -> AdaptedLayer:
        module = self._layers[module_name]
        if not isinstance(module, AdaptedLayer):
            module = AdaptedLayer(module, self.routing_state).train(module.training)
            self.base_model.set_submodule(module_name, module)
            self._layers[module_name] = module
        return module

    def _adapted_layers(self) -> Iterator[tuple[str, AdaptedLayer]]:
        return ((name, layer) for name, layer in self._layers.items() if isinstance(layer, AdaptedLayer))

    def _adaptable_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """Every Linear/Conv1D of the base model (wrapped or not), by its name in the base model, found
        afresh: its layers may have been replaced since (`_layers`)."""
        return iter(self._find_layers().items())

    def _find_layers(self) -> dict[str, nn.Module]:
        """`_layers` found afresh by walking the base model (not into the layers: an `AdaptedLayer` holds
        its banks' many modules), in module order, each module once (as ``named_modules``)."""
        seen: set[int] = set()

        def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
            for name, child in module._modules.items():
                if child is None or id(child) in seen:
                    continue
                seen.add(id(child))
                if isinstance(child, (AdaptedLayer, *ADAPTABLE)):
                    yield prefix + name, child
                else:
                    yield from walk(child, f"{prefix}{name}.")

        self._layers = dict(walk(self.base_model, ""))
        return self._layers

    def _is_output(self, name: str) -> bool:
        output = self.base_model.get_output_embeddings()
        module = self._layers[name]
        return output is not None and (module is output or getattr(module, "base_layer", None) is output)

    def _example_layer_names(self) -> str:
        names = [name for name, _ in self._adaptable_modules()]
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        return ", ".join(leaves[:12])


def _adapted_layers_of(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def _merge_into_layer(
    model: PreTrainedModel, layer: AdaptedLayer, bank: Bank, adapter_name: str, tied: set[int]
) -> None:
    """Fold ``adapter_name`` of ``bank`` into ``layer.base_layer`` in place (a bias-less layer first
    gets a zero bias if the method adds to it). A weight tied to another parameter (an output layer
    sharing the input embeddings) is untied first, in the module and in ``model.config``
    (``tie_word_embeddings = False``): the merge changes the output layer only."""
    base = layer.base_layer
    if bank.merge_adds_bias and base.bias is None:
        base.bias = nn.Parameter(base.weight.new_zeros(layer.out_features))
    if id(base.weight) in tied:
        base.weight = nn.Parameter(base.weight.detach().clone())
        model.config.tie_word_embeddings = False
    bank.merge_into(adapter_name, weight_out_in(base), base.bias)


def _declare_merged_parameters(merged: PreTrainedModel, what: str) -> None:
    """Make ``merged.config`` declare the parameters the merge added, so that ``from_pretrained`` of
    ``merged.save_pretrained(...)`` rebuilds them: turn on the config's boolean ``*bias*`` options
    that create them; the other layers those options cover get zero biases (the identity). A
    ValueError, naming the layers, where no option creates them or where a reload would tie tensors
    that the merge made different."""
    model_class = type(merged)
    shapes, ties = _parameter_layout(merged)
    expected, expected_ties = _layout_from_config(model_class, merged.config)
    added = shapes.keys() - expected.keys()
    options = {}
    if added:
        options = {
            k: created for k, created in _bias_options(model_class, merged.config, expected).items() if created & added
        }
        for option in options:
            setattr(merged.config, option, True)
        expected, expected_ties = _layout_from_config(model_class, merged.config)
    undeclared = shapes.keys() - expected.keys()
    if undeclared:
        with_bias = [n.removesuffix(".bias") for n in expected if n.endswith(".bias")]
        with_bias = [n for n in with_bias if isinstance(merged.get_submodule(n), ADAPTABLE)]
        raise ValueError(
            f"cannot merge {what} into {model_class.__name__}: the merge adds biases to "
            f"{_layer_patterns(undeclared)}, which {type(merged.config).__name__} has no option to declare, so "
            f"save_pretrained + from_pretrained would drop them (expected target_modules with a bias of their own: "
            f"{_layer_patterns(with_bias) or 'none'}; or run the adapter unmerged with adapter_names=[...])"
        )
    for name in sorted(set().union(*options.values()) - shapes.keys()):
        module_name, _, param = name.rpartition(".")
        module = merged.get_submodule(module_name)
        setattr(module, param, nn.Parameter(module.weight.new_zeros(expected[name])))
    retied = [group for group in expected_ties if group not in ties]
    if retied:
        raise ValueError(
            f"cannot merge {what} into {model_class.__name__}: the merge makes {_layer_patterns(retied[0])} "
            f"different, but the config ties them, so save_pretrained + from_pretrained would make them equal again"
        )


def _parameter_layout(model: nn.Module) -> tuple[dict[str, torch.Size], set[frozenset[str]]]:
    """``({parameter name: shape}, {the names of each tensor shared under several names})``."""
    names_of: dict[int, list[str]] = {}
    shapes = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        shapes[name] = parameter.shape
        names_of.setdefault(id(parameter), []).append(name)
    return shapes, {frozenset(names) for names in names_of.values() if len(names) > 1}


def _layout_from_config(
    model_class: type[PreTrainedModel], config
) -> tuple[dict[str, torch.Size], set[frozenset[str]]]:
    """The `_parameter_layout` of the model that ``from_pretrained`` builds from ``config`` (on the meta device)."""
    with torch.device("meta"):
        return _parameter_layout(model_class(copy.deepcopy(config)))


def _bias_options(model_class: type[PreTrainedModel], config, expected: dict[str, torch.Size]) -> dict[str, set[str]]:
    """``config``'s boolean options named ``*bias*`` that are off and, turned on, only add ``.bias``
    parameters to the ``expected`` layout: ``{option: the parameter names it adds}``."""
    options = {}
    for option, value in config.to_dict().items():
        if "bias" not in option or value is not False:
            continue
        trial = copy.deepcopy(config)
        setattr(trial, option, True)
        names = _layout_from_config(model_class, trial)[0].keys()
        created = names - expected.keys()
        if created and expected.keys() <= names and all(n.endswith(".bias") for n in created):
            options[option] = created
    return options


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    """The ids of parameters that ``model`` holds under more than one name (tied weights)."""
    _, ties = _parameter_layout(model)
    return {id(model.get_parameter(name)) for names in ties for name in names}


def _layer_patterns(names) -> str:
    """``"model.layers.*.mlp.up_proj, ..."``: module names with the layer numbers folded, parameter suffixes dropped."""
    return ", ".join(
        sorted({re.sub(r"\.\d+\.", ".*.", n.removesuffix(".bias").removesuffix(".weight")) for n in names})
    )


def _batch_size(input_ids: Tensor | None, inputs_embeds: Tensor | None) -> int:
    if input_ids is not None:
        return input_ids.shape[0]
    if inputs_embeds is not None:
        return inputs_embeds.shape[0]
    raise ValueError("expected input_ids or inputs_embeds")
