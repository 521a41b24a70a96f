"""`AdapterModel`: a transformers causal LM carrying many adapters, a different one per row.

Adapters of any supported method, rank and set of target modules live side by side; a forward
or `generate` call takes ``adapter_names`` (one per row, ``None`` or ``"__base__"`` for the bare
base model) and runs the whole mixed batch at once. Names follow Hugging Face PEFT
(`add_adapter`, `load_adapter`, `delete_adapter`, `set_adapter`, ``adapter_names=``).

Layer adapters (LoRA, IA3, ...) live in banks inside the wrapped Linear/Conv1D layers
(`flora.model.layer`); virtual-token adapters (prompt and prefix tuning) live in
`self.virtual_tokens` (`flora.model.virtual_tokens`), which adds each row's soft prompt or
attention prefix to the inputs. Each call makes one `flora.methods.batch.AdapterBatch` (`routing`),
which owns all that the call's rows need from their adapters, and runs under it (`routed`); a
server's engine runs its prefills and decoding steps through `step`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

from flora.base import CACHE_KEY, load_base
from flora.hub import resolve_adapter_dir
from flora.io import KEY_PREFIX, read_adapter_dir, split_key, write_adapter_dir
from flora.methods import METHODS, AdapterConfig, Bank, method_for
from flora.methods.base import ADAPTER_NAME
from flora.methods.batch import AdapterBatch, AdapterRuntime
from flora.methods.lora_group import link_groups
from flora.methods.prompt import PromptLearningConfig
from flora.model.layer import ADAPTABLE, AdaptedLayer, layer_features
from flora.model.merge import merged_copy
from flora.model.virtual_tokens import VirtualTokens

BASE_NAME = "__base__"  # the base model's one name, besides ``None``, in ``adapter_names``
# "auto" and every strategy of a method that has a choice (`flora.methods.METHODS`)
STRATEGIES = ("auto", *dict.fromkeys(s for m in METHODS.values() if len(m.strategies) > 1 for s in m.strategies))


@dataclass
class StepOutput:
    """What `AdapterModel.step` gives: ``logits [rows, kept, vocab]``, the ``cache`` holding the rows'
    keys and values, and ``columns [rows, cache columns]``: 1 on the columns that hold each row's
    tokens (its virtual tokens, then its real ones), 0 on padding."""

    logits: Tensor
    cache: Cache
    columns: Tensor


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

    def __init__(self, base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None,
                 strategy: str = "auto") -> None:  # fmt: skip
        super().__init__()
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.runtime = AdapterRuntime()  # what the adapted layers share: the batch in force, settings, LoRA tables
        self.strategy = strategy
        self.adapter_configs: dict[str, AdapterConfig | PromptLearningConfig] = {}
        self.active_adapter: str | None = None
        for parameter in base_model.parameters():
            parameter.requires_grad_(False)
        self.virtual_tokens = VirtualTokens()
        # Every Linear/Conv1D of the base model by name, in module order: the layer, or the `AdaptedLayer`
        # wrapping it. Found by one walk when adapters are added or deleted (`_find_layers`) and
        # kept up to date by `_wrap` and `_uninstall`, so that the rest of an install or a delete (a
        # server's LRU) walks no module tree.
        self._layers: dict[str, nn.Module] = self._find_layers()
        # ``(in_features, out_features)`` of each of them: what `check_adapter` reads (never the modules)
        self._layer_shapes = {name: layer_features(module) for name, module in self._layers.items()}
        self.train(base_model.training)  # the base model's mode (eval, as `load_base` gives it), for all

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, dtype=torch.float32, device="cpu",
                        allow_download: bool | None = None, **kwargs):  # fmt: skip
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
        return self.runtime.strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        if value not in STRATEGIES:
            raise ValueError(f"strategy {value!r} is unknown (expected one of {', '.join(STRATEGIES)})")
        self.runtime.strategy = value

    @property
    def adapters_read_only(self) -> bool:
        """A promise that adapter parameters are never written in place, only added, replaced or
        deleted (as in a server). What flora derives from them (LoRA's per-row tables and stacked
        factors) is then kept between batches. Default ``False``: it is derived again for each new
        batch, which reads the weights as they are (after an optimizer step, fused or not)."""
        return self.runtime.read_only

    @adapters_read_only.setter
    def adapters_read_only(self, value: bool) -> None:
        self.runtime.read_only = bool(value)

    @property
    def adapter_dtype(self) -> torch.dtype | None:
        """The dtype of LoRA's per-row tables, which decoding with many adapters reads at every step:
        ``None`` (default) the adapters' own; ``torch.bfloat16`` halves those bytes, rounding each
        adapter's factors to bfloat16 (an opt-in change of numerics: ``docs/performance.md``)."""
        return self.runtime.adapter_dtype

    @adapter_dtype.setter
    def adapter_dtype(self, value: torch.dtype | None) -> None:
        if value not in (None, torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"adapter_dtype {value!r} is not a floating dtype (expected e.g. torch.bfloat16 or None)")
        self.runtime.adapter_dtype = value

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
        layers = self._find_layers()  # afresh: the base model's layers may have been replaced since
        targets = [name for name in layers if config.targets(name, self._is_output(name))]
        if not targets:
            leaves = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in layers})[:12])
            raise ValueError(
                f"adapter {adapter_name!r}: target_modules={config.target_modules!r} matches no Linear or "
                f"Conv1D layer of the base model (e.g. {leaves})"
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
        method = method_for(data["peft_type"], source)
        config, bank_class = method.config.from_peft_dict(data, source), method.bank
        if bank_class is None:
            return config, None, {}
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
        if self.virtual_tokens.holds(adapter_name):  # PEFT's key, without a module prefix
            tensors = self.virtual_tokens.adapter_state(adapter_name)
        else:
            tensors = {KEY_PREFIX + key: tensor for key, tensor in self.adapter_parameters(adapter_name).items()}
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
            if bank.holds(adapter_name)
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
        return merged_copy(self.base_model, adapter_name, f"adapter {adapter_name!r} ({config.peft_type})")

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

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, adapter_names: Sequence[str | None] | None = None, **kwargs):  # fmt: skip
        """The base model's forward (``[batch, tokens]`` in, its output with ``logits`` and, given
        ``labels``, ``loss``), each row through its own adapter ``adapter_names[i]``. ``logits`` are
        ``[batch, tokens, vocab]`` also when rows use prompt tuning (PEFT also returns the virtual
        tokens' logits, in front; see `flora.model.virtual_tokens`). Inside `routed`, ``adapter_names``
        is left out: the rows are that batch's."""
        if labels is not None:
            kwargs["labels"] = labels
        with self._routed_call(adapter_names, _batch_size(input_ids, kwargs.get("inputs_embeds"))) as batch:
            return self.virtual_tokens(self.base_model, batch, input_ids, attention_mask, kwargs)

    @torch.no_grad()
    def generate(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                 adapter_names: Sequence[str | None] | None = None, **kwargs):  # fmt: skip
        """transformers' ``generate``, each row through its own adapter. Returns ``[batch, prompt + new]``."""
        if self.tokenizer is not None and "pad_token_id" not in kwargs:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        rows = _batch_size(input_ids, kwargs.get("inputs_embeds"))
        with self._routed_call(adapter_names, rows) as batch, self.virtual_tokens.generating(self.base_model, batch):
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def step(
        self, input_ids: Tensor, positions: Tensor, attention_mask: Tensor, batch: AdapterBatch | None,
        cache: Cache | None = None, logits_to_keep: int = 1,
    ) -> StepOutput:  # fmt: skip
        """One forward of a server's engine, a prefill or a decoding step: ``input_ids [rows, tokens]`` at
        ``positions [rows, tokens]`` (each row's own, counted over its real tokens from 0), through
        ``batch`` (`routing`). ``cache`` ``None``: the rows' first step (their prompts), in a new cache
        with each row's virtual tokens in front and ``attention_mask [rows, tokens]``; else a cache
        holding the rows' earlier tokens (`flora.serve.slot_cache`), ``attention_mask`` covering its
        columns and the new tokens, and rows with virtual tokens moved by them in position. Keeps the
        logits of the last ``logits_to_keep`` positions (0: all)."""
        options = {"position_ids": positions, "use_cache": True, "logits_to_keep": logits_to_keep}
        virtual = None if batch is None else batch.virtual
        with self.runtime.using(batch):
            if cache is None:
                output = self.virtual_tokens(self.base_model, batch, input_ids, attention_mask, options)
                columns = attention_mask if virtual is None else torch.cat(
                    [virtual.virtual_mask(attention_mask.dtype), attention_mask], dim=1)  # fmt: skip
                return StepOutput(output.logits, getattr(output, CACHE_KEY), columns)
            if virtual is not None:
                options["position_ids"] = positions + virtual.offset
            options[CACHE_KEY] = cache
            output = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **options)
        return StepOutput(output.logits, cache, attention_mask)

    def routed(self, batch: AdapterBatch | None):
        """Within the block, forward passes (`forward`, or the base model's own) run ``batch``'s rows
        (`routing`), so that its per-batch work is done once for many calls (incremental decoding)."""
        return self.runtime.using(batch)

    def routing(self, adapter_names: Sequence[str | None], carry: bool = False) -> AdapterBatch | None:
        """The `flora.methods.batch.AdapterBatch` of a batch whose row ``i`` uses ``adapter_names[i]``
        (``None`` when no row uses an adapter). A caller that runs many forward passes over the same rows
        keeps it and runs them in `routed`: strategies and per-row weights are then worked out once. A
        caller whose rows keep changing (a server) asks to ``carry``: what the layers compiled for the
        last batch of the same shape serves this one (`flora.methods.batch.AdapterRuntime.shape`)."""
        return self._batch(self._names(adapter_names, len(adapter_names)), carry)

    def _routed_call(self, adapter_names: Sequence[str | None] | None, rows: int):
        """The batch of one call: `routed`'s batch when the call names no adapters inside it, else one of
        its own (``adapter_names``, or `set_adapter`'s adapter for every row)."""
        if adapter_names is None and self.runtime.current is not None:
            return nullcontext(self.runtime.current)
        names = self._names([self.active_adapter] * rows if adapter_names is None else adapter_names, rows)
        return self.runtime.using(self._batch(names, carry=False))

    def _batch(self, names: tuple[str | None, ...] | None, carry: bool) -> AdapterBatch | None:
        """The batch of rows ``names`` (`routing`)."""
        if names is None:
            return None
        mode = (self.base_model.dtype, self.device) if carry and not self.training else None
        batch = self.runtime.batch(names, self.base_model.device, mode)
        batch.virtual = self.virtual_tokens.plan(batch)
        return batch

    def _checkpoint_contexts(self):
        """``torch.utils.checkpoint``'s ``context_fn``: nothing around the forward; around the
        recomputation, the batch that was in force when the forward ran."""
        return nullcontext(), self.runtime.using(self.runtime.current)

    def _names(self, adapter_names: Sequence[str | None], batch_size: int) -> tuple[str | None, ...] | None:
        """``adapter_names`` checked, ``"__base__"`` as ``None``; ``None`` when no row uses an adapter."""
        if isinstance(adapter_names, str):
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
        return None if all(n is None for n in names) else names

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
        bank_class = METHODS[config.peft_type].bank
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
        kinds = sorted((module, bank.kind(name)) for module, bank in banks.items())
        self.runtime.added(name, (bank_class.method, *kinds))
        for bank in banks.values():
            for parameter in bank.adapter_state(name).values():
                parameter.requires_grad_(True)

    def _install_virtual(self, name: str, config: PromptLearningConfig, weights: dict[str, Tensor] | None) -> None:
        """Add prompt- or prefix-tuning adapter ``name`` (``weights``: its file's tensors, or ``None``)."""
        self.adapter_configs[name] = self.virtual_tokens.add(name, config, self.base_model, weights, self.tokenizer)
        self.runtime.added(name, (str(config.peft_type),))

    def _uninstall(self, name: str) -> None:
        self.adapter_configs.pop(name, None)
        self.runtime.removed(name)
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
        layers = [layer for _, layer in self._adapted_layers()]
        link_groups((module, layer.banks["lora"]) for module, layer in self._adapted_layers() if "lora" in layer.banks)
        self.runtime.restructured(tuple(
            (layer, *layer.banks.values(), layer.banks["lora"].group if "lora" in layer.banks else None)
            for layer in layers))  # fmt: skip

    def _wrap(self, module_name: str) -> AdaptedLayer:
        module = self._layers[module_name]
        if not isinstance(module, AdaptedLayer):
            module = AdaptedLayer(module, self.runtime).train(module.training)
            self.base_model.set_submodule(module_name, module)
            self._layers[module_name] = module
        return module

    def _adapted_layers(self) -> Iterator[tuple[str, AdaptedLayer]]:
        return ((name, layer) for name, layer in self._layers.items() if isinstance(layer, AdaptedLayer))

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


def _batch_size(input_ids: Tensor | None, inputs_embeds: Tensor | None) -> int:
    if input_ids is not None:
        return input_ids.shape[0]
    if inputs_embeds is not None:
        return inputs_embeds.shape[0]
    raise ValueError("expected input_ids or inputs_embeds")
