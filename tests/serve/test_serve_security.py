"""What a client may do: ``--api-key`` (401 on every route but /health, /version and /metrics), run-time
adapter loading off unless enabled (403), and then only from under the allowed roots with symlinks
followed (403 otherwise, adapter-dir entries included); what errors echo back."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest
from data.tiny import tiny_llama
from openai import OpenAI

from flora import AdapterModel, LoraConfig
from flora.io import CONFIG_NAME, WEIGHTS_NAME
from flora.serve.auth import OPEN_PATHS
from serve.support import LiveServer, save_adapters

PROMPT = "reverse the words: red green blue"
KEY = "sk-flora-test-0123456789"


def _client(url: str, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def _complete(url: str, model: str, key: str = "unused") -> str:
    reply = _client(url, key).completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0,
                                                 extra_body={"ignore_eos": True})  # fmt: skip
    return reply.choices[0].text


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


def _load(url: str, name: str, path, **headers) -> httpx.Response:
    return httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=60,
                      headers=headers)  # fmt: skip


# -- --api-key -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tokenizer, adapter_dir):
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), adapter_dir=str(adapter_dir), api_key=KEY,
                      enable_runtime_lora_updating=True, max_model_len=128)  # fmt: skip
    yield live
    live.stop()


def test_the_api_key_is_needed_and_checked(keyed, tokenizer, reference, adapter_dir):
    with pytest.raises(openai.AuthenticationError) as raised:
        _complete(keyed.url, "lora2", key="sk-wrong")
    assert raised.value.status_code == 401
    assert raised.value.body == {"message": "Incorrect API key provided.", "type": "AuthenticationError",
                                 "param": None, "code": 401}  # fmt: skip
    bare = httpx.post(f"{keyed.url}/v1/completions", json={"model": "lora2", "prompt": PROMPT}, timeout=60)
    assert _error(bare, 401)["message"] == "Missing API key: send 'Authorization: Bearer <key>'."
    assert bare.headers["www-authenticate"] == "Bearer"
    ids = tokenizer(PROMPT).input_ids
    assert _complete(keyed.url, "lora2", key=KEY) == reference.text("lora2", str(adapter_dir / "lora2"), ids, 6)
    assert {model.id for model in _client(keyed.url, KEY).models.list().data} >= {"tiny", "lora2"}


def test_every_route_but_health_version_and_metrics_is_closed_without_the_key(keyed):
    routes = [(route.path, method) for route in keyed.server.config.app.routes for method in route.methods]
    closed = [(path, method) for path, method in routes if path not in OPEN_PATHS]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter", "/openapi.json"} <= {path for path, _ in closed}  # fmt: skip
    for path, method in closed:
        response = httpx.request(method, f"{keyed.url}{path}", json={}, timeout=60)
        assert response.status_code == 401, (method, path, response.text)
        wrong = httpx.request(method, f"{keyed.url}{path}", json={}, headers={"Authorization": f"Bearer {KEY}x"})
        assert wrong.status_code == 401, (method, path, wrong.text)
    for path in sorted(OPEN_PATHS):
        assert httpx.get(f"{keyed.url}{path}", timeout=60).status_code == 200, path
    assert httpx.get(f"{keyed.url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_runtime_loading_needs_the_key_too(keyed, adapter_dir):
    assert _load(keyed.url, "late", adapter_dir / "lora4").status_code == 401
    assert "late" not in keyed.state.registry.names()
    assert _load(keyed.url, "late", adapter_dir / "lora4", Authorization=f"Bearer {KEY}").status_code == 200


# -- run-time loading off by default -----------------------------------------------------------------


def test_runtime_loading_and_unloading_are_off_by_default(tokenizer, adapter_dir):
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), adapter_dir=str(adapter_dir), max_model_len=128)
    try:
        for path, body in [("load_lora_adapter", {"lora_name": "x", "lora_path": str(adapter_dir / "lora4")}),
                           ("unload_lora_adapter", {"lora_name": "lora4"})]:  # fmt: skip
            error = _error(httpx.post(f"{live.url}/v1/{path}", json=body, timeout=60), 403)
            assert "--enable-runtime-lora-updating" in error["message"], error
            assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in error["message"] and error["type"] == "PermissionDeniedError"
        assert "x" not in live.state.registry.names()
        assert _complete(live.url, "lora4")  # adapter-dir entries are served all the same
    finally:
        live.stop()


# -- confined to the roots ----------------------------------------------------------------------------


@pytest.fixture
def roots(tokenizer, tmp_path):
    """``allowed/`` (an --allowed-adapter-paths root) and ``outside/`` (no root), an adapter in each,
    and ways from the first into the second."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    inside = save_adapters(tokenizer, allowed, {"inside": LoraConfig(r=2)}, seed=3)["inside"]
    away = save_adapters(tokenizer, outside, {"away": LoraConfig(r=2)}, seed=4)["away"]
    (allowed / "link").symlink_to(away, target_is_directory=True)  # a directory that points outside
    half = allowed / "half"  # a real directory whose weights file points outside
    half.mkdir()
    shutil.copy(outside / "away" / CONFIG_NAME, half / CONFIG_NAME)
    (half / WEIGHTS_NAME).symlink_to(outside / "away" / WEIGHTS_NAME)
    return {"allowed": allowed, "outside": outside, "inside": inside, "away": away}


@pytest.fixture
def confined(tokenizer, adapter_dir, roots):
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), adapter_dir=str(adapter_dir),
                      allowed_adapter_paths=[str(roots["allowed"])], enable_runtime_lora_updating=True,
                      max_model_len=128)  # fmt: skip
    yield live
    live.stop()


def test_loading_from_under_an_allowed_root_serves_the_adapter(confined, roots, tokenizer, reference, adapter_dir):
    assert _load(confined.url, "inside", roots["inside"]).status_code == 200
    ids = tokenizer(PROMPT).input_ids
    assert _complete(confined.url, "inside") == reference.text("inside", roots["inside"], ids, 6)
    assert _load(confined.url, "from-dir", adapter_dir / "lora4").status_code == 200  # --adapter-dir is a root too
    assert _complete(confined.url, "from-dir") == reference.text("lora4", str(adapter_dir / "lora4"), ids, 6)
    unload = httpx.post(f"{confined.url}/v1/unload_lora_adapter", json={"lora_name": "inside"}, timeout=60)
    assert unload.status_code == 200


@pytest.mark.parametrize("way", ["outside", "link", "half", "dotdot", "relative"])
def test_loading_from_outside_the_roots_is_a_403_naming_the_rule(confined, roots, adapter_dir, way, monkeypatch):
    path = {"outside": roots["away"], "link": roots["allowed"] / "link", "half": roots["allowed"] / "half",
            "dotdot": f"{roots['allowed']}/../outside/away", "relative": "away"}[way]  # fmt: skip
    monkeypatch.chdir(roots["outside"])  # the relative path resolves from the server's working directory
    error = _error(_load(confined.url, "escape", path), 403)
    assert error["param"] == "lora_path" and error["type"] == "PermissionDeniedError"
    assert f"lora_path {str(path)!r}" in error["message"]
    rule = "adapters are loaded only from under --adapter-dir or --allowed-adapter-paths, symlinks followed"
    assert rule in error["message"]
    assert f"allowed: {str(adapter_dir.resolve())!r}, {str(roots['allowed'].resolve())!r}" in error["message"]
    away = roots["outside"].resolve() / "away"
    if way == "link":
        assert f", which resolves to {str(away)!r}, is outside" in error["message"]
    if way == "half":
        assert f", whose {WEIGHTS_NAME} resolves to {str(away / WEIGHTS_NAME)!r}, is outside" in error["message"]
    assert "escape" not in confined.state.registry.names()


def test_with_runtime_loading_on_but_no_root_every_load_is_refused(tokenizer, adapter_dir):
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), enable_runtime_lora_updating=True,
                      max_model_len=128)  # fmt: skip
    try:
        error = _error(_load(live.url, "x", adapter_dir / "lora4"), 403)
        assert "allowed: none: start the server with one" in error["message"]
    finally:
        live.stop()


def test_an_adapter_dir_entry_that_resolves_outside_is_not_served(tokenizer, reference, roots, tmp_path):
    directory = tmp_path / "dir"
    save_adapters(tokenizer, directory, {"real": LoraConfig(r=2)}, seed=5)
    (directory / "escape").symlink_to(roots["away"], target_is_directory=True)
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), adapter_dir=str(directory), max_model_len=128)
    try:
        assert {card["id"] for card in httpx.get(f"{live.url}/v1/models").json()["data"]} == {"tiny", "real"}
        body = {"model": "escape", "prompt": PROMPT, "max_tokens": 4}
        error = _error(httpx.post(f"{live.url}/v1/completions", json=body, timeout=60), 403)
        assert error["param"] == "model"
        assert error["message"].startswith(f"model 'escape' (the --adapter-dir entry {str(directory / 'escape')!r}), "
                                           f"which resolves to {str(roots['away'])!r}, is outside")  # fmt: skip
        assert _complete(live.url, "real")
    finally:
        live.stop()
    # the operator allows where it points: served
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), adapter_dir=str(directory), max_model_len=128,
                      allowed_adapter_paths=[str(roots["outside"])])  # fmt: skip
    try:
        ids = tokenizer(PROMPT).input_ids
        assert _complete(live.url, "escape") == reference.text("away", roots["away"], ids, 6)
    finally:
        live.stop()


# -- what errors say -----------------------------------------------------------------------------------


def test_load_errors_name_the_field_at_fault(server, tmp_path):
    error = _error(_load(server.url, "ghost", tmp_path / "nowhere"), 400)
    assert error["param"] == "lora_path" and "is not a PEFT adapter directory" in error["message"]
    error = _error(_load(server.url, "a/b", tmp_path), 400)
    assert error["param"] == "lora_name" and "may not contain" in error["message"]


def test_a_long_name_is_not_echoed_back_whole(server, tmp_path):
    name = "x" * 10_000
    body = {"model": name, "prompt": PROMPT, "max_tokens": 4}
    error = _error(httpx.post(f"{server.url}/v1/completions", json=body, timeout=60), 404)
    assert "... (10000 characters)" in error["message"] and len(error["message"]) < 1000
    for path, body in [("unload_lora_adapter", {"lora_name": name}),
                       ("load_lora_adapter", {"lora_name": name, "lora_path": str(tmp_path)})]:  # fmt: skip
        message = httpx.post(f"{server.url}/v1/{path}", json=body, timeout=60).json()["error"]["message"]
        assert "(10000 characters)" in message and len(message) < 1000, path
