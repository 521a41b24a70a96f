"""Prompt tuning: a trained soft prompt in front of each row's input embeddings.

Lester, Al-Rfou & Constant, *The Power of Scale for Parameter-Efficient Prompt Tuning* (EMNLP 2021,
arXiv 2104.08691). An adapter is one matrix ``P: [n, hidden]`` (``n = num_virtual_tokens``). A row
``x`` with ``tokens`` ids that uses it enters the first transformer layer as

    h_0 = [P ; E[x]]                                   # [n + tokens, hidden]

where ``E`` is the base model's (frozen) input embedding; only ``P`` is trained. The ``n`` virtual
tokens take positions ``0 .. n-1`` and the row's real tokens follow them. How the rows of one batch
each get their own prompt (or none): `flora.model.virtual_tokens`.

Files follow Hugging Face PEFT: ``adapter_config.json`` with ``peft_type = "PROMPT_TUNING"`` and
PEFT's field names, ``adapter_model.safetensors`` with one tensor ``"prompt_embeddings": [n, hidden]``.

Initialisation (``prompt_tuning_init``, as PEFT): ``"RANDOM"`` draws ``P`` from N(0, 1) (PEFT's
``nn.Embedding`` default), ``"TEXT"`` copies the embeddings of the tokens of
``prompt_tuning_init_text`` (cut or repeated to ``n``), ``"SAMPLE_VOCAB"`` those of ``n`` random
vocabulary entries.

This module also holds what prompt and prefix tuning share: `PromptLearningConfig` (PEFT's class of
that name) and `VirtualPlan`, the virtual tokens of a batch's rows.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

PROMPT_KEY = "prompt_embeddings"  # the one tensor of a prompt- or prefix-tuning adapter file (PEFT's name)


def check_prompt_shape(name: str, tensor: Tensor, expected: tuple[int, int], layout: str) -> None:
    """Refuse a loaded ``prompt_embeddings`` of the wrong shape, naming both shapes and ``layout``
    (what the expected shape is made of)."""
    if tuple(tensor.shape) != expected:
        raise ValueError(
            f"adapter {name!r}: {PROMPT_KEY} has shape {tuple(tensor.shape)} but this base model needs "
            f"{expected} ({layout})"
        )


INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclass
class PromptLearningConfig:
    """What every virtual-token method has (PEFT's ``PromptLearningConfig``).

    ``num_virtual_tokens`` is required. ``token_dim``, ``num_layers``, ``num_attention_heads`` and
    ``num_transformer_submodules`` describe the base model; left ``None`` they are filled in from it
    when the adapter is added (as PEFT does), and an adapter file whose values contradict the base
    model is refused.
    """

    peft_type: ClassVar[str]
    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"{self.peft_type}: num_virtual_tokens={n!r} is invalid (expected a positive integer)")
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError(
                f"{self.peft_type}: num_transformer_submodules={self.num_transformer_submodules!r} is not supported "
                f"(flora adapts decoder-only causal LMs: expected 1)"
            )

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content (PEFT's names)."""
        data = dataclasses.asdict(self)
        data.update(peft_type=self.peft_type, task_type="CAUSAL_LM", inference_mode=True, modules_to_save=None)
        return data

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> PromptLearningConfig:
        """Build from ``adapter_config.json`` content; PEFT bookkeeping fields are ignored."""
        if data.get("modules_to_save"):
            raise ValueError(
                f"{source}: {cls.peft_type} option modules_to_save={data['modules_to_save']!r} is not supported "
                f"by flora (expected None)"
            )
        task = data.get("task_type")
        if task not in (None, "CAUSAL_LM"):
            raise ValueError(f"{source}: task_type={task!r} is not supported by flora (expected 'CAUSAL_LM')")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def resolved(self, model_config) -> PromptLearningConfig:
        """A copy with the model fields filled in from ``model_config``; refuses contradicting values."""
        return check_fields(self, {"num_transformer_submodules": 1, **self.model_fields(model_config)}, model_config)

    def model_fields(self, model_config) -> dict[str, int]:
        """``{field: value}`` that the base model implies (PEFT's ``_prepare_prompt_learning_config``)."""
        raise NotImplementedError


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (PEFT's ``PromptTuningConfig``): ``num_virtual_tokens`` soft tokens per adapter.

    ``prompt_tuning_init``: ``"RANDOM"``, ``"TEXT"`` (needs ``prompt_tuning_init_text``; the tokenizer
    is ``tokenizer_name_or_path`` if given, else the `AdapterModel`'s) or ``"SAMPLE_VOCAB"``.
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)  # PEFT's PromptTuningInit enum
        if not isinstance(init, str) or init.upper() not in INITS:
            raise ValueError(
                f"PROMPT_TUNING: prompt_tuning_init={self.prompt_tuning_init!r} is unknown (expected one of "
                f"{', '.join(INITS)})"
            )
        self.prompt_tuning_init = init.upper()
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("PROMPT_TUNING: prompt_tuning_init='TEXT' needs prompt_tuning_init_text (got none)")

    def model_fields(self, model_config) -> dict[str, int]:
        text = text_config(model_config)
        return {
            "token_dim": text.hidden_size,
            "num_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads,
        }


def text_config(model_config):
    """The language-model part of a (possibly multimodal) transformers config."""
    return model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config


def check_fields(config: PromptLearningConfig, expected: dict[str, int], model_config) -> PromptLearningConfig:
    """``config`` with ``expected`` filled in where it has ``None``; a clear error where it disagrees."""
    bad = {k: (getattr(config, k), v) for k, v in expected.items() if getattr(config, k) not in (None, v)}
    if bad:
        details = ", ".join(f"{k}={got!r} (the base model needs {want!r})" for k, (got, want) in bad.items())
        raise ValueError(
            f"{config.peft_type} adapter does not fit this base model ({getattr(model_config, 'model_type', '?')}): "
            f"{details}"
        )
    return dataclasses.replace(config, **{k: v for k, v in expected.items() if getattr(config, k) is None})


class PromptBank(nn.Module):
    """The soft prompts of every prompt-tuning adapter: ``prompts[name]: [n, hidden]``."""

    method: ClassVar[str] = "PROMPT_TUNING"

    def __init__(self) -> None:
        super().__init__()
        self.prompts = nn.ParameterDict()

    def adapters(self) -> list[str]:
        return list(self.prompts)

    def holds(self, name: str) -> bool:
        return name in self.prompts

    def add(
        self,
        name: str,
        config: PromptTuningConfig,
        weights: dict[str, Tensor] | None,
        embeddings: nn.Module,
        tokenizer: Any = None,
    ) -> None:
        """Add adapter ``name``: ``weights["prompt_embeddings"]`` or a fresh ``config.prompt_tuning_init``,
        on the device and in the dtype of ``embeddings.weight`` (the base model's input embedding)."""
        like = embeddings.weight
        expected = (config.num_virtual_tokens, like.shape[1])
        if weights is None:
            prompt = initial_prompt(config, embeddings, tokenizer)
        else:
            prompt = weights[PROMPT_KEY]
            layout = f"num_virtual_tokens={config.num_virtual_tokens} x hidden size {like.shape[1]}"
            check_prompt_shape(name, prompt, expected, layout)
        self.prompts[name] = nn.Parameter(prompt.detach().to(device=like.device, dtype=like.dtype).clone())

    def remove(self, name: str) -> None:
        if name in self.prompts:
            del self.prompts[name]

    def length(self, name: str) -> int:
        """``n``: adapter ``name``'s number of virtual tokens."""
        return self.prompts[name].shape[0]

    def prompt(self, name: str) -> Tensor:
        """``[n, hidden]``: adapter ``name``'s soft prompt."""
        return self.prompts[name]

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        """What PEFT saves: ``{"prompt_embeddings": [n, hidden]}``."""
        return {PROMPT_KEY: self.prompts[name].detach()}

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {PROMPT_KEY: self.prompts[name]}


@torch.no_grad()
def initial_prompt(config: PromptTuningConfig, embeddings: nn.Module, tokenizer: Any = None) -> Tensor:
    """``[n, hidden]``: a fresh soft prompt following ``config.prompt_tuning_init`` (PEFT's rules)."""
    n = config.num_virtual_tokens
    weight = embeddings.weight
    if config.prompt_tuning_init == "RANDOM":
        return torch.randn(n, weight.shape[1], device=weight.device, dtype=weight.dtype)
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, weight.shape[0], (n,), device=weight.device)
        return embeddings(ids).clone()
    if config.tokenizer_name_or_path:
        from transformers import AutoTokenizer

        kwargs = dict(config.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # as PEFT: never run code from a tokenizer repository
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    if tokenizer is None:
        raise ValueError(
            "PROMPT_TUNING: prompt_tuning_init='TEXT' needs a tokenizer: set tokenizer_name_or_path or give the "
            "AdapterModel one"
        )
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(f"PROMPT_TUNING: prompt_tuning_init_text={config.prompt_tuning_init_text!r} has no tokens")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    return embeddings(torch.tensor(ids, device=weight.device)).clone()


@dataclass
class VirtualPlan:
    """The virtual tokens of a batch's rows (`flora.model.virtual_tokens` applies them), on the model's device.

    Attributes:
        prompt_len, prefix_len: ``[batch]``: each row's ``n_i`` / ``m_i`` (0 where it has none).
        prompt_index, prefix_index: ``[batch, Nv]`` / ``[batch, Np]``: row ``i``'s slot ``j`` reads row
            ``index[i, j]`` of the stacked table ``[zeros(1) ; adapter_1 ; adapter_2 ; ...]`` (0: padding).
        prompts, prefixes: the adapters in table order.
    """

    prompt_len: Tensor
    prefix_len: Tensor
    prompt_index: Tensor
    prefix_index: Tensor
    prompts: list[str]
    prefixes: list[str]

    @property
    def num_prompt(self) -> int:  # Nv
        return self.prompt_index.shape[1]

    @property
    def num_prefix(self) -> int:  # Np
        return self.prefix_index.shape[1]

    @property
    def offset(self) -> Tensor:
        """``[batch, 1]``: how far each row's real tokens move right in position."""
        return (self.prompt_len + self.prefix_len)[:, None]

    def virtual_mask(self, dtype: torch.dtype) -> Tensor:
        """``[batch, Np + Nv]``: 1 on each row's own prefix and prompt slots, 0 on padding."""
        return torch.cat([self.prefix_index, self.prompt_index], dim=1).ne(0).to(dtype)

    def prompt_positions(self) -> Tensor:
        """``[batch, Nv]``: ``0 .. n_i-1`` on row ``i``'s prompt slots, 0 on padding."""
        slots = torch.arange(self.num_prompt, device=self.prompt_len.device)
        return (slots[None, :] - (self.num_prompt - self.prompt_len)[:, None]).clamp(min=0)

    def repeated(self, k: int) -> VirtualPlan:
        """The plan of a batch whose rows repeat each row ``k`` times in place (`AdapterBatch.expanded`)."""

        def each(t: Tensor) -> Tensor:
            return t.repeat_interleave(k, dim=0)

        return VirtualPlan(each(self.prompt_len), each(self.prefix_len), each(self.prompt_index),
                           each(self.prefix_index), self.prompts, self.prefixes)  # fmt: skip
