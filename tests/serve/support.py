"""What the server tests share: adapters of every kind, a live server on 127.0.0.1 (uvicorn on a
thread, on a port the OS picks) and the reference every answer is checked against
(`AdapterModel.generate` of the prompt alone with its adapter)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import torch
import uvicorn
from data.tiny import tiny_llama
from prometheus_client.parser import text_string_to_metric_families

from flora import AdapterModel, FloraConfig, Ia3Config, LoraConfig, PromptTuningConfig
from flora.serve import ServeSettings, build_state, create_app

ADAPTERS = {
    "lora2": LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]),
    "lora4": LoraConfig(r=4, alpha=8),
    "flora": FloraConfig(r=1),
    "ia3": Ia3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prompt": PromptTuningConfig(num_virtual_tokens=3),
}
MAX_MODEL_LEN = 128


def save_adapters(tokenizer, directory, configs: dict, seed: int = 0) -> dict[str, str]:
    """Random (non-identity) adapters of ``configs`` saved under ``directory``; ``{name: path}``."""
    model = AdapterModel(tiny_llama(tokenizer), tokenizer)
    paths = {}
    for index, (name, config) in enumerate(configs.items()):
        model.add_adapter(name, config)
        generator = torch.Generator().manual_seed(seed * 100 + index)
        with torch.no_grad():
            for parameter in model.adapter_parameters(name).values():
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        paths[name] = str(model.save_adapter(name, directory / name))
    return paths


class Reference:
    """Greedy `AdapterModel.generate` of one prompt alone, with adapters loaded from files."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.model = AdapterModel(tiny_llama(tokenizer), tokenizer)

    def _name(self, adapter: str | None, path: str | None) -> str | None:
        if adapter is None:
            return None
        name = f"ref-{abs(hash(path))}"
        if name not in self.model.list_adapters():
            self.model.load_adapter(path, adapter_name=name)
        return name

    def ids(self, adapter: str | None, path: str | None, prompt_ids: list[int], tokens: int, **generate) -> list[int]:
        """The generated token ids; ``generate``: more arguments of `generate` (logits processors ...)."""
        ids = torch.tensor([prompt_ids])
        # no end of sequence: the server's requests set ignore_eos (which generates past it, unlike min_new_tokens)
        options = {"eos_token_id": None} | generate
        out = self.model.generate(ids, adapter_names=[self._name(adapter, path)], max_new_tokens=tokens,
                                  do_sample=False, **options)  # fmt: skip
        return out[0, ids.shape[1] :].tolist()

    def text(self, adapter: str | None, path: str | None, prompt_ids: list[int], tokens: int, **generate) -> str:
        ids = self.ids(adapter, path, prompt_ids, tokens, **generate)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def logprobs(self, adapter: str | None, path: str | None, ids: list[int]) -> torch.Tensor:
        """``[len(ids), vocab]``: the log probabilities of the token after each of ``ids``, from one forward."""
        with torch.no_grad():
            logits = self.model(torch.tensor([ids]), adapter_names=[self._name(adapter, path)]).logits[0]
        return torch.log_softmax(logits, dim=-1)


class LiveServer:
    """`flora.serve` for ``model`` with ``settings``, serving on ``self.url`` until `stop`; the autotuner's
    choices in memory only unless ``autotune_cache`` is given."""

    def __init__(self, model: AdapterModel, **settings) -> None:
        settings.setdefault("autotune_cache", None)
        self.state = build_state(ServeSettings(model="tiny", **settings), model=model)
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(create_app(self.state), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()

    def metric(self, name: str, **labels: str) -> float:
        """The value of the Prometheus sample ``name`` with ``labels`` on ``/metrics`` (0 if absent)."""
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics").text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0
