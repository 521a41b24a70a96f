"""Request bodies of the HTTP API, in the shapes of OpenAI's and vLLM's (pydantic models: FastAPI
validates them and publishes them in the OpenAPI schema), and the error body.

Fields flora does not implement are refused with a clear error when set to anything but their
neutral value (``n`` > 1, ``logprobs``, ``echo``, penalties), never silently ignored. vLLM's
``ignore_eos`` and ``min_tokens`` are supported. Other unknown fields are accepted and ignored, as
OpenAI clients send some (``user``, ...).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="an adapter's name, or the base model's")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops) or len(stops) > 16:
            raise ValueError("stop: expected at most 16 non-empty strings")
        return stops

    def unsupported(self) -> str | None:
        """The first field set to a value flora does not implement, as an error message."""
        if self.logprobs not in (None, False, 0):
            return "logprobs are not supported by this server (expected logprobs to be null)"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty are not supported (expected 0)"
        return None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt (text, or token ids)."""

    prompt: str | list[int] | list[str] = Field(description="a string, a list of token ids, or a list of one string")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo is not supported by this server (expected false)"
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            return "prompt: a batch of several prompts is not supported; send one request per prompt"
        return super().unsupported()


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (the ``text`` parts of a list of content parts)."""
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages: content part {part!r} is not supported (expected text parts)")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: messages rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


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
