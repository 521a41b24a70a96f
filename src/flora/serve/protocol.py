"""Request bodies of the HTTP API, in the shapes of OpenAI's and vLLM's (pydantic models: FastAPI
validates them and publishes them in the OpenAPI schema), and the error body.

Every field OpenAI's API and vLLM's server define for these requests is either honoured or refused:
a field flora does not implement (``suffix``, ``tools``, a ``response_format`` other than text, vLLM's
guided decoding, ...) is a 400 naming it, never silently ignored; so is an unknown field. ``user``
(an end user's id for the provider's monitoring) is accepted and has no effect on the answer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# OpenAI's limits: at most 128 choices, 20 alternatives per token (vLLM's default --max-logprobs).
MAX_CHOICES = 128
MAX_LOGPROBS = 20

Finite = Annotated[float, Field(allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="an adapter's name, or the base model's")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices per prompt")
    temperature: Finite = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: Finite = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="the k likeliest tokens only (vLLM); 0 or -1: all")
    min_p: Finite = Field(0.0, ge=0.0, le=1.0, description="tokens of min_p x the likeliest's probability (vLLM)")
    repetition_penalty: Finite = Field(1.0, gt=0.0, le=10.0, description="vLLM's; 1: none")
    presence_penalty: Finite = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Finite = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Finite] | None = Field(None, description="token id -> bias in [-100, 100]")
    allowed_token_ids: list[int] | None = Field(None, min_length=1, description="only these tokens (vLLM)")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stop_token_ids: list[int] | None = Field(None, description="tokens that end the text, not part of it (vLLM)")
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="an end user's id: accepted, no effect")

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops) or len(stops) > 16:
            raise ValueError("stop: expected at most 16 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias: key {token[:40]!r} is not a token id (expected a string of digits)")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: bias {bias} of token {token} is out of range (expected -100 to 100)")
        return value


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: a prompt (text or token ids) or a list of them."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of lists of token ids"
    )
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: score the prompt")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="alternatives per token")
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: str | None = Field(None, description="not supported: must be null")
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix: inserting after a suffix is not supported by this server (expected null)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: the list of prompts is empty")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo (expected at least 1)")
        if self.best_of is not None:
            if self.best_of < self.n:
                raise ValueError(f"best_of: {self.best_of} is less than n ({self.n}); expected best_of >= n")
            if self.stream and self.best_of > self.n:
                raise ValueError("best_of: cannot be larger than n when streaming")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text (the ``text`` parts of a list of content parts)."""
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages: content part {str(part)[:80]} is not supported (expected text parts)")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: messages rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError(f"response_format: type {self.response_format.type!r} is not supported by this server "
                             "(expected 'text')")  # fmt: skip
        if self.tools:
            raise ValueError("tools: tool calling is not supported by this server (expected none)")
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice: tool calling is not supported by this server (expected 'none' or null)")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs to be true")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message: cannot be used with add_generation_prompt (set it to false)")
        return self


class TokenizeCompletionRequest(BaseModel):
    """``POST /tokenize`` (vLLM's) of a prompt."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="a served model (optional: every one has the same tokenizer)")
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(BaseModel):
    """``POST /tokenize`` (vLLM's) of messages rendered with the chat template."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """``POST /detokenize`` (vLLM's)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class LoadLoraAdapterRequest(BaseModel):
    """``POST /v1/load_lora_adapter`` (vLLM's), for adapters of any flora method."""

    lora_name: str
    lora_path: str = Field(min_length=1, max_length=4096, description="a directory under --adapter-dir or "
                                                                     "--allowed-adapter-paths")  # fmt: skip
    load_inplace: bool = False


class UnloadLoraAdapterRequest(BaseModel):
    """``POST /v1/unload_lora_adapter`` (vLLM's)."""

    model_config = ConfigDict(extra="allow")

    lora_name: str


ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
               413: "RequestTooLargeError", 429: "RateLimitError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}  # fmt: skip


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "BadRequestError"), "param": param,
                      "code": status}}  # fmt: skip
