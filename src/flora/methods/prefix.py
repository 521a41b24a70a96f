"""Prefix tuning: trained keys and values that every attention layer attends to, before the row's tokens.

Li & Liang, *Prefix-Tuning: Optimizing Continuous Prompts for Generation* (ACL 2021, arXiv
2101.00190). An adapter holds, for each of the model's ``L`` layers, ``n = num_virtual_tokens``
key and value vectors per key/value head. Layer ``l`` of a row that uses it computes

    Attention(Q, [K_l^prefix ; K], [V_l^prefix ; V])    # K_l^prefix, V_l^prefix: [kv_heads, n, head_dim]

with ``Q, K, V`` the row's own (the prefix keys are used as stored: no rotary embedding is applied
to them). The row's real tokens take positions ``n, n+1, ...``. Nothing else of the model changes.

Layout (Hugging Face PEFT's): one matrix ``[n, L * 2 * kv_heads * head_dim]``; viewed as
``[n, L, 2, kv_heads, head_dim]``, ``[:, l, 0]`` are layer ``l``'s keys and ``[:, l, 1]`` its values.
PEFT calls ``kv_heads * head_dim`` ``token_dim`` and ``kv_heads`` ``num_attention_heads`` (grouped-query
models: the key/value heads). Files: ``adapter_config.json`` with ``peft_type = "PREFIX_TUNING"``,
``adapter_model.safetensors`` with ``"prompt_embeddings": [n, L * 2 * token_dim]``: the final prefixes.

Reparametrisation (``prefix_projection=True``, the paper's MLP, for stabler training): the adapter
is then an embedding ``[n, token_dim]`` and an MLP ``Linear(token_dim, encoder_hidden_size) -> tanh
-> Linear(encoder_hidden_size, L * 2 * token_dim)``; the prefixes are its output. Saving writes that
output, and loading gives a plain (projection-free) prefix, as PEFT does.

Initialisation (``init_weights``, as PEFT): ``None`` draws the prefix (or the embedding) from N(0, 1)
with ``nn.Linear``'s default for the MLP; ``"zero"`` starts at zero prefixes (the last MLP layer zero).
How the rows of one batch each get their own prefix (or none): `flora.model.virtual_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from flora.methods.prompt import PROMPT_KEY, PromptLearningConfig, check_prompt_shape, text_config

INIT_WEIGHTS = (None, "zero")


@dataclass(frozen=True)
class KVGeometry:
    """What a prefix must fit: ``num_layers`` attention layers of ``kv_heads`` key/value heads of ``head_dim``."""

    num_layers: int
    kv_heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def width(self) -> int:
        """Columns of the stored prefix matrix: ``num_layers * 2 * kv_heads * head_dim``."""
        return self.num_layers * 2 * self.token_dim

    @classmethod
    def of(cls, model_config) -> KVGeometry:
        """The geometry of a transformers config (PEFT's rule, grouped-query attention included)."""
        text = text_config(model_config)
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(text.num_hidden_layers, kv_heads, head_dim)

    def describe(self) -> str:
        return f"{self.num_layers} layers x 2 x {self.kv_heads} key/value heads x head_dim {self.head_dim}"


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (PEFT's ``PrefixTuningConfig``): ``num_virtual_tokens`` keys and values per layer.

    ``prefix_projection``: train through the MLP (``encoder_hidden_size`` wide, default ``token_dim``).
    ``init_weights``: ``None`` (random) or ``"zero"``.
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in INIT_WEIGHTS:
            raise ValueError(
                f"PREFIX_TUNING: init_weights={self.init_weights!r} is unknown (expected None for random or 'zero')"
            )
        size = self.encoder_hidden_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise ValueError(f"PREFIX_TUNING: encoder_hidden_size={size!r} is invalid (expected a positive integer)")

    def model_fields(self, model_config) -> dict[str, int]:
        geometry = KVGeometry.of(model_config)
        return {
            "token_dim": geometry.token_dim,
            "num_layers": geometry.num_layers,
            "num_attention_heads": geometry.kv_heads,
        }

    def resolved(self, model_config) -> PrefixTuningConfig:
        config = super().resolved(model_config)
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim
        return config


class PrefixEncoder(nn.Module):
    """The reparametrised prefix of one adapter (PEFT's ``PrefixEncoder`` with ``prefix_projection``):
    ``embedding: [n, token_dim]`` through ``transform`` to ``[n, L * 2 * token_dim]``."""

    def __init__(self, config: PrefixTuningConfig, geometry: KVGeometry) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.num_virtual_tokens, geometry.token_dim)
        self.transform = nn.Sequential(
            nn.Linear(geometry.token_dim, config.encoder_hidden_size),
            nn.Tanh(),
            nn.Linear(config.encoder_hidden_size, geometry.width),
        )
        if config.init_weights == "zero":
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)

    def forward(self) -> Tensor:
        return self.transform(self.embedding.weight)


class PrefixBank(nn.Module):
    """The prefixes of every prefix-tuning adapter: ``prefixes[name]: [n, L * 2 * token_dim]``, or
    ``encoders[name]`` (a `PrefixEncoder`) for one trained with ``prefix_projection``."""

    method: ClassVar[str] = "PREFIX_TUNING"

    def __init__(self) -> None:
        super().__init__()
        self.prefixes = nn.ParameterDict()
        self.encoders = nn.ModuleDict()

    def adapters(self) -> list[str]:
        return [*self.prefixes, *self.encoders]

    def holds(self, name: str) -> bool:
        return name in self.prefixes or name in self.encoders

    def add(
        self,
        name: str,
        config: PrefixTuningConfig,
        weights: dict[str, Tensor] | None,
        geometry: KVGeometry,
        like: Tensor,
    ) -> None:
        """Add adapter ``name``: ``weights["prompt_embeddings"]`` (final prefixes) or a fresh
        initialisation, on the device and in the dtype of ``like``."""
        expected = (config.num_virtual_tokens, geometry.width)
        if weights is not None:
            prefix = weights[PROMPT_KEY]
            layout = f"num_virtual_tokens={config.num_virtual_tokens} x {geometry.describe()}"
            check_prompt_shape(name, prefix, expected, layout)
            self.prefixes[name] = nn.Parameter(prefix.detach().to(device=like.device, dtype=like.dtype).clone())
        elif config.prefix_projection:
            self.encoders[name] = PrefixEncoder(config, geometry).to(device=like.device, dtype=like.dtype)
        else:
            prefix = torch.zeros(expected) if config.init_weights == "zero" else torch.randn(expected)
            self.prefixes[name] = nn.Parameter(prefix.to(device=like.device, dtype=like.dtype))

    def remove(self, name: str) -> None:
        for store in (self.prefixes, self.encoders):
            if name in store:
                del store[name]

    def length(self, name: str) -> int:
        """``n``: adapter ``name``'s number of virtual tokens."""
        if name in self.encoders:
            return self.encoders[name].embedding.num_embeddings
        return self.prefixes[name].shape[0]

    def prefix(self, name: str) -> Tensor:
        """``[n, L * 2 * token_dim]``: adapter ``name``'s keys and values (through its MLP if it has one)."""
        if name in self.encoders:
            return self.encoders[name]()
        return self.prefixes[name]

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        """What PEFT saves: the final prefixes, ``{"prompt_embeddings": [n, L * 2 * token_dim]}``."""
        return {PROMPT_KEY: self.prefix(name).detach()}

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        if name in self.encoders:
            return {f"prompt_encoder.{k}": p for k, p in self.encoders[name].named_parameters()}
        return {PROMPT_KEY: self.prefixes[name]}


def split_prefix(prefix: Tensor, geometry: KVGeometry) -> Tensor:
    """``[batch, n, L * 2 * token_dim] -> [L, 2, batch, kv_heads, n, head_dim]`` (PEFT's ``get_prompt`` order:
    ``[l, 0]`` are layer ``l``'s keys, ``[l, 1]`` its values)."""
    batch, n, _ = prefix.shape
    view = prefix.view(batch, n, geometry.num_layers, 2, geometry.kv_heads, geometry.head_dim)
    return view.permute(2, 3, 0, 4, 1, 5)
