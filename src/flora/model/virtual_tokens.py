"""Virtual-token adapters (prompt tuning, prefix tuning) with a different one, or none, per row.

`VirtualTokens` holds the adapters of both methods for an `AdapterModel`, works out a batch's
`flora.methods.prompt.VirtualPlan` (kept by the batch) and turns the batch into the base model's
inputs; the methods themselves (configs, parameters, files): `flora.methods.prompt` and
`flora.methods.prefix`.

A batch ``[batch, tokens]`` whose row ``i`` uses a soft prompt of ``n_i`` tokens or a prefix of
``m_i`` tokens (or nothing) becomes, with ``Nv = max n_i`` and ``Np = max m_i``:

* input embeddings ``[batch, Nv + tokens, hidden]``: row ``i`` is ``[0 x (Nv - n_i) ; P_i ; E[x_i]]``
  (virtual tokens left-padded, so every row's real tokens keep their columns);
* a cache (transformers ``DynamicCache``) pre-filled, per layer, with keys and values
  ``[batch, kv_heads, Np, head_dim]``: row ``i`` is ``[0 x (Np - m_i) ; K_i]``;
* attention mask ``[batch, Np + Nv + tokens]``: 0 on every padding slot, then the caller's mask;
* position ids: a row's real tokens are shifted by its own ``n_i`` or ``m_i`` (its prompt tokens
  take ``0 .. n_i-1``), so each row sees exactly what it would alone;
* labels: ``-100`` on the ``Nv`` virtual columns (and on the first real token of rows without a
  prompt, which alone has nothing before it to predict it from).

Compatibility with Hugging Face PEFT (0.21), which supports one adapter per batch:

* ``forward`` returns logits for the real tokens only, ``[batch, tokens, vocab]``: PEFT's prompt
  tuning returns ``[batch, n + tokens, vocab]``, of which flora's are ``[:, n:]``. ``logits_to_keep``
  counts real tokens too (an int: the last ones; a tensor: their positions). ``loss`` is PEFT's
  (the last virtual token predicts the first real one). ``hidden_states``/``attentions``, if asked
  for, include the ``Nv`` virtual columns.
* Positions: as PEFT in ``forward`` (``n + arange(tokens)``, or the caller's ``position_ids`` shifted
  by ``n``, where PEFT's prompt tuning drops them) and for prefix tuning in ``generate``. For prompt
  tuning in ``generate`` flora counts positions over the attention mask (``n + cumsum(mask) - 1``, as
  transformers does for the bare model); PEFT ignores left padding there, so a left-padded prompt-tuning
  row can generate differently under PEFT than alone, while under flora it generates the same.
* ``generate`` works as in PEFT: it replaces the base model's ``prepare_inputs_for_generation``
  for the duration of the call; the output is ``[batch, tokens + new]`` (no virtual tokens).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

from flora.base import CACHE_KEY, CACHE_KEYS
from flora.methods.batch import AdapterBatch
from flora.methods.prefix import KVGeometry, PrefixBank, PrefixTuningConfig, split_prefix
from flora.methods.prompt import PROMPT_KEY, PromptBank, PromptLearningConfig, PromptTuningConfig, VirtualPlan


def _index(lengths: list[int], starts: list[int], device: torch.device) -> Tensor:
    """``[batch, max(lengths)]`` table rows: row ``i`` is left-padded with 0, then ``starts[i] + arange(len)``."""
    width = max(lengths, default=0)
    index = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, (length, start) in enumerate(zip(lengths, starts, strict=True)):
        if length:
            index[row, width - length :] = torch.arange(start, start + length)
    return index.to(device)


class VirtualTokens(nn.Module):
    """The prompt- and prefix-tuning adapters of one `AdapterModel` and their per-row application."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt = PromptBank()
        self.prefix = PrefixBank()

    # -- adapters ------------------------------------------------------------------------------

    def holds(self, name: str) -> bool:
        return self.prompt.holds(name) or self.prefix.holds(name)

    def add(
        self,
        name: str,
        config: PromptLearningConfig,
        base_model: PreTrainedModel,
        weights: dict[str, Tensor] | None = None,
        tokenizer: Any = None,
    ) -> PromptLearningConfig:
        """Add adapter ``name`` (``weights``: an adapter file's tensors, or ``None`` for a fresh one).
        Returns ``config`` with its model fields filled in; refuses one that does not fit ``base_model``."""
        if weights is not None and set(weights) != {PROMPT_KEY}:
            raise ValueError(
                f"adapter {name!r}: a {config.peft_type} file holds one tensor {PROMPT_KEY!r}, got {sorted(weights)}"
            )
        try:
            config = config.resolved(base_model.config)
        except ValueError as err:
            raise ValueError(f"adapter {name!r}: {err}") from None
        embeddings = base_model.get_input_embeddings()
        if isinstance(config, PromptTuningConfig):
            self.prompt.add(name, config, weights, embeddings, tokenizer)
        elif isinstance(config, PrefixTuningConfig):
            self.prefix.add(name, config, weights, KVGeometry.of(base_model.config), embeddings.weight)
        else:
            raise TypeError(f"adapter {name!r}: {type(config).__name__} is not a virtual-token config")
        return config

    def remove(self, name: str) -> None:
        self.prompt.remove(name)
        self.prefix.remove(name)

    def _bank(self, name: str) -> PromptBank | PrefixBank:
        return self.prompt if self.prompt.holds(name) else self.prefix

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        """Adapter ``name``'s file tensors, PEFT's layout: ``{"prompt_embeddings": ...}``."""
        return self._bank(name).adapter_state(name)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return self._bank(name).adapter_parameters(name)

    # -- per batch -------------------------------------------------------------------------------

    def plan(self, batch: AdapterBatch) -> VirtualPlan | None:
        """The virtual tokens of ``batch``'s rows, or ``None`` when no row has any (the model keeps it
        in ``batch.virtual``)."""
        prompt_groups = batch.plan(self.prompt, self.prompt.holds)
        prefix_groups = batch.plan(self.prefix, self.prefix.holds)
        if prompt_groups is None and prefix_groups is None:
            return None
        tables = []
        for plan, bank in ((prompt_groups, self.prompt), (prefix_groups, self.prefix)):
            lengths, starts, start = [0] * batch.batch_size, [0] * batch.batch_size, 1
            for name, rows in (plan.groups if plan else {}).items():
                for row in rows:
                    lengths[row], starts[row] = bank.length(name), start
                start += bank.length(name)
            tables.append((torch.tensor(lengths, device=batch.device), _index(lengths, starts, batch.device)))
        (prompt_len, prompt_index), (prefix_len, prefix_index) = tables
        return VirtualPlan(prompt_len, prefix_len, prompt_index, prefix_index,
                           list(prompt_groups.groups if prompt_groups else ()),
                           list(prefix_groups.groups if prefix_groups else ()))  # fmt: skip

    def prompt_block(self, plan: VirtualPlan, dtype: torch.dtype) -> Tensor:
        """``[batch, Nv, hidden]``: each row's soft prompt, left-padded with zeros (differentiable)."""
        table = [self.prompt.prompt(name) for name in plan.prompts]
        table.insert(0, torch.zeros_like(table[0][:1]))
        return torch.cat(table).to(dtype)[plan.prompt_index]

    def prefix_cache(self, plan: VirtualPlan, geometry: KVGeometry, dtype: torch.dtype) -> Tensor:
        """``[L, 2, batch, kv_heads, Np, head_dim]``: each row's prefix keys and values, left-padded with zeros."""
        table = [self.prefix.prefix(name) for name in plan.prefixes]
        table.insert(0, torch.zeros_like(table[0][:1]))
        return split_prefix(torch.cat(table).to(dtype)[plan.prefix_index], geometry)

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        base_model: PreTrainedModel,
        batch: AdapterBatch | None,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        kwargs: dict[str, Any],
    ):
        """``base_model(input_ids, attention_mask=..., **kwargs)`` with each row's virtual tokens added
        (see the module docstring); ``logits`` cover the real tokens only."""
        plan = None if batch is None else batch.virtual
        if plan is None:
            return base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        embeds = kwargs.pop("inputs_embeds", None)
        source = input_ids if input_ids is not None else embeds
        rows, tokens = source.shape[:2]
        device = source.device
        given = [key for key in CACHE_KEYS if kwargs.get(key) is not None]
        if given:
            raise ValueError(
                f"forward with {given[0]} is not supported when a row uses a prompt- or prefix-tuning adapter "
                "(the virtual tokens go into a fresh cache); use generate for incremental decoding"
            )
        if kwargs.get("token_type_ids") is not None:
            raise ValueError("token_type_ids are not supported with prompt- or prefix-tuning adapters")
        if attention_mask is None:
            attention_mask = torch.ones(rows, tokens, dtype=torch.long, device=device)
        positions = kwargs.pop("position_ids", None)
        if positions is None:
            positions = torch.arange(tokens, device=device)
        positions = positions.reshape(-1, tokens).expand(rows, tokens) + plan.offset
        if plan.num_prompt:
            keep = kwargs.get("logits_to_keep")
            if isinstance(keep, Tensor):  # positions of the real tokens -> of the sequence with the prompt
                kwargs["logits_to_keep"] = keep + plan.num_prompt
            if embeds is None:
                embeds = base_model.get_input_embeddings()(input_ids)
            embeds = torch.cat([self.prompt_block(plan, embeds.dtype), embeds], dim=1)
            input_ids = None
            positions = torch.cat([plan.prompt_positions(), positions], dim=1)
            labels = kwargs.get("labels")
            if labels is not None:
                virtual = labels.new_full((rows, plan.num_prompt), -100)
                labels = torch.cat([virtual, labels], dim=1)
                labels[:, plan.num_prompt] = labels[:, plan.num_prompt].masked_fill(plan.prompt_len == 0, -100)
                kwargs["labels"] = labels
        if plan.num_prefix:
            if base_model.training and any(getattr(m, "gradient_checkpointing", False) for m in base_model.modules()):
                raise ValueError(
                    "prefix tuning does not work with gradient checkpointing (the recomputed layers would add their "
                    "keys to the prefix cache twice); disable it with base_model.gradient_checkpointing_disable()"
                )
            kv = self.prefix_cache(plan, KVGeometry.of(base_model.config), base_model.dtype)
            layers = list(zip(kv[:, 0], kv[:, 1], strict=True))
            kwargs[CACHE_KEY] = DynamicCache(layers, config=base_model.config)
        attention_mask = torch.cat([plan.virtual_mask(attention_mask.dtype), attention_mask], dim=1)
        output = base_model(
            input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, **kwargs
        )
        if plan.num_prompt and output.logits.shape[1] == plan.num_prompt + tokens:
            output.logits = output.logits[:, plan.num_prompt :]
        return output

    # -- generate --------------------------------------------------------------------------------

    @contextmanager
    def generating(self, base_model: PreTrainedModel, batch: AdapterBatch | None) -> Iterator[None]:
        """Within the block, ``base_model.generate`` adds each row's virtual tokens (PEFT's way: its
        ``prepare_inputs_for_generation`` is wrapped for the duration)."""
        if batch is None or batch.virtual is None:
            yield
            return
        own = base_model.__dict__.get("prepare_inputs_for_generation")
        original = base_model.prepare_inputs_for_generation
        steps = 0

        @functools.wraps(original)  # transformers inspects its signature
        def prepare_inputs_for_generation(input_ids: Tensor, *args, **kwargs) -> dict[str, Any]:
            nonlocal steps
            inputs = original(input_ids, *args, **kwargs)
            inputs = self._generation_inputs(base_model, batch, inputs, first_step=steps == 0)
            steps += 1
            return inputs

        base_model.prepare_inputs_for_generation = prepare_inputs_for_generation
        try:
            yield
        finally:
            if own is None:
                del base_model.prepare_inputs_for_generation
            else:
                base_model.prepare_inputs_for_generation = own

    def _generation_inputs(
        self, base_model: PreTrainedModel, batch: AdapterBatch, inputs: dict[str, Any], first_step: bool
    ) -> dict[str, Any]:
        """One step's model inputs with the virtual tokens: at the first step (empty cache) the prompts
        go before the input embeddings and the prefixes into the cache; every step extends the
        attention mask over them and shifts the position ids."""
        source = inputs.get("inputs_embeds")
        source = inputs["input_ids"] if source is None else source
        rows, tokens = source.shape[:2]
        plan = batch.expanded(rows).virtual
        cache = inputs.get(CACHE_KEY)
        if cache is None:
            raise ValueError("generate with prompt- or prefix-tuning adapters needs use_cache=True")
        seen = cache.get_seq_length()
        first = seen == 0
        if first_step and not first:
            raise ValueError(
                "generate with prompt- or prefix-tuning adapters cannot continue from a filled cache "
                f"({seen} cached tokens): the virtual tokens go into a fresh cache"
            )
        mask = inputs.get("attention_mask")
        if mask is None:  # transformers drops an all-ones mask
            real = tokens if first else seen - plan.num_prefix - plan.num_prompt + tokens
            mask = torch.ones(rows, real, dtype=torch.long, device=source.device)
        elif mask.ndim != 2:
            raise ValueError("generate with prompt- or prefix-tuning adapters needs a 2D attention mask")
        inputs["attention_mask"] = torch.cat([plan.virtual_mask(mask.dtype), mask], dim=1)
        positions = inputs.get("position_ids")
        if positions is not None:
            positions = positions + plan.offset
        if first and plan.num_prompt:
            embeds = inputs.get("inputs_embeds")
            if embeds is None:
                embeds = base_model.get_input_embeddings()(inputs["input_ids"])
            inputs["inputs_embeds"] = torch.cat([self.prompt_block(plan, embeds.dtype), embeds], dim=1)
            inputs["input_ids"] = None
            if positions is not None:
                positions = torch.cat([plan.prompt_positions(), positions], dim=1)
        if first and plan.num_prefix:
            kv = self.prefix_cache(plan, KVGeometry.of(base_model.config), base_model.dtype)
            for layer, (keys, values) in enumerate(zip(kv[:, 0], kv[:, 1], strict=True)):
                cache.update(keys, values, layer)
        if positions is not None:
            inputs["position_ids"] = positions
        return inputs
