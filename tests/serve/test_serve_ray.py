"""``flora serve --replicas 2`` on a local Ray instance, started as a user starts it (``python -m flora
serve``, in the foreground) once for the module: its answers equal one process's (`LiveServer`, same
settings) and `AdapterModel.generate`'s; multiplexed routing sends an adapter's requests to the replica
that loaded it; loads and unloads reach every replica, one started later included; a replica killed
mid-stream leaves its clients an answer or an error, never a hang, and is replaced; bad input gets the
single process's 4xx; SIGTERM stops the application and Ray. The bad command lines at the end start
no Ray."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from data.tiny import tiny_llama
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from flora import AdapterModel, LoraConfig
from flora.cli import main
from serve.support import ADAPTERS, LiveServer, save_adapters

MAX_MODEL_LEN = 512  # the tiny model's positions: streams long enough to be cut by a replica's death
KEY = "ray-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_REQUEST_BYTES = 65536
FRESH = {f"fresh{i}": LoraConfig(r=2 + i, alpha=4, target_modules=["q_proj", "v_proj"]) for i in range(4)}
PROMPTS = ["reverse the words: red green blue", "add 12 and 30", "sort: pear apple fig", "hello"]
START_TIMEOUT_S = 300  # Ray, Serve and two replicas on a busy 2-core machine
SETTINGS = {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": 8, "enable_runtime_lora_updating": True,
            "api_key": KEY, "max_request_bytes": MAX_REQUEST_BYTES}  # fmt: skip


@dataclass
class RayApp:
    url: str
    process: subprocess.Popen
    address: str  # the Ray cluster's
    log: Path

    def metrics(self) -> dict[str, dict[str, float]]:
        """``{replica: {sample name and labels but replica: value}}`` from the ingress's ``/metrics``."""
        samples: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics", timeout=60).text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "replica")
                samples.setdefault(s.labels["replica"], {})[f"{s.name}{{{labels}}}"] = s.value
        return samples

    def loads(self) -> dict[str, float]:
        return {r: values["flora:adapter_loads_total{model_name=tiny}"] for r, values in self.metrics().items()}

    def in_memory(self) -> dict[str, float]:
        return {r: values["flora:adapters_loaded{model_name=tiny}"] for r, values in self.metrics().items()}


def _eventually(read, expected, what: str, timeout_s: float = 30):
    """``read()`` once it equals ``expected`` (the engine publishes its gauges and counters at its next
    step, at most 0.5 s away when idle)."""
    deadline = time.monotonic() + timeout_s
    while (value := read()) != expected:
        assert time.monotonic() < deadline, f"{what}: {value} != {expected}"
        time.sleep(0.2)
    return value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """The model directory, the adapter directory (every kind, and `FRESH` LoRAs no test asks for before
    the routing test) and a directory run-time loads may read."""
    root = tmp_path_factory.mktemp("ray-served")
    tiny_llama(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    save_adapters(tokenizer, root / "adapters", ADAPTERS)
    save_adapters(tokenizer, root / "adapters", FRESH, seed=1)
    (root / "runtime").mkdir()
    return {"model": root / "model", "adapters": root / "adapters", "runtime": root / "runtime"}


@pytest.fixture(scope="module")
def app(served, tmp_path_factory):
    pytest.importorskip("ray.serve")
    port, log = _free_port(), tmp_path_factory.mktemp("ray-log") / "serve.log"  # the autotuner's file beside it
    command = [sys.executable, "-m", "flora", "serve", "--model", str(served["model"]), "--served-model-name", "tiny",
               "--dtype", "float64", "--adapter-dir", str(served["adapters"]), "--max-model-len", str(MAX_MODEL_LEN),
               "--max-num-seqs", "8", "--enable-runtime-lora-updating", "--allowed-adapter-paths",
               str(served["runtime"]), "--api-key", KEY, "--max-request-bytes", str(MAX_REQUEST_BYTES),
               "--replicas", "2", "--num-cpus-per-replica", "0.5", "--port", str(port),
               "--autotune-cache", str(log.parent / "autotune.json")]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            assert process.poll() is None, f"flora serve exited {process.returncode}:\n{log.read_text()[-5000:]}"
            assert time.monotonic() < deadline, f"not healthy in {START_TIMEOUT_S} s:\n{log.read_text()[-5000:]}"
            ready = re.search(r"on Ray at (\S+),", log.read_text())  # logged once the application runs
            if ready is not None and httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
            time.sleep(0.5)
        address = ready.group(1)
        yield RayApp(url, process, address, log)
    finally:
        if process.poll() is None:  # the SIGTERM test did not run or failed
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def single(served, tokenizer):
    """One process with the same settings, for the answers the application must equal."""
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), adapter_dir=str(served["adapters"]),
                      allowed_adapter_paths=[str(served["runtime"])], **SETTINGS)  # fmt: skip
    yield live
    live.stop()


# A second driver on the application's cluster, in a process of its own (connecting needs the token of
# the instance `flora serve` started, Ray's default, read when ray is imported): it kills the replica
# named on its stdin.
KILLER = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
actors = {n: ray.get_actor(f"SERVE_REPLICA::flora#FloraReplica#{n}", namespace="serve") for n in sys.argv[2:]}
print("ready", flush=True)
victim = actors[sys.stdin.readline().strip()]
ray.kill(victim, no_restart=True)
try:
    while True:  # until it is dead (a kill is sent on its way, not waited for)
        ray.get(victim.__ray_ready__.remote(), timeout=10)
except ray.exceptions.RayActorError:
    print("killed", flush=True)
"""


def _client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _path(served, model: str) -> str | None:
    return None if model == "tiny" else str(served["adapters"] / model)


def _expected(reference, tokenizer, served, model: str, prompt: str, tokens: int) -> str:
    adapter = None if model == "tiny" else model
    return reference.text(adapter, _path(served, model), tokenizer(prompt).input_ids, tokens)


def _complete(url: str, model: str, prompt: str = PROMPTS[0], tokens: int = 6) -> tuple[str, str]:
    """A greedy completion's text and the replica that answered."""
    response = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=60,
                          json={"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                                "ignore_eos": True})  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"], response.headers["x-flora-replica"]


@pytest.mark.ray
def test_two_replicas_answer_mixed_requests_exactly_as_one_process_does(app, single, tokenizer, reference, served):
    ray_client, one_client = _client(app.url), _client(single.url)
    messages = [{"role": "user", "content": "sort: pear apple fig"}]
    jobs = [(kind, model, PROMPTS[i % len(PROMPTS)], 5 + i % 4)
            for i, (kind, model) in enumerate((k, m) for m in [*ADAPTERS, "tiny"]
                                              for k in ("text", "stream", "chat", "sampled"))]  # fmt: skip

    def ask(client: OpenAI, kind: str, model: str, prompt: str, tokens: int) -> tuple[str, dict]:
        options = {"max_tokens": tokens, "temperature": 0, "extra_body": {"ignore_eos": True}}
        if kind == "chat":
            reply = client.chat.completions.create(model=model, messages=messages, **options)
            return reply.choices[0].message.content, reply.usage.model_dump()
        if kind == "stream":
            chunks = list(client.completions.create(model=model, prompt=prompt, stream=True,
                                                    stream_options={"include_usage": True}, **options))  # fmt: skip
            return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.model_dump()
        if kind == "sampled":
            options |= {"temperature": 1.0, "top_p": 0.9, "seed": 11}
        reply = client.completions.create(model=model, prompt=prompt, **options)
        return reply.choices[0].text, reply.usage.model_dump()

    with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: the replicas batch them, adapters mixed
        answers = list(pool.map(lambda job: ask(ray_client, *job), jobs))
    for job, answer in zip(jobs, answers, strict=True):
        assert answer == ask(one_client, *job), job
        kind, model, prompt, tokens = job
        if kind in ("text", "stream"):
            assert answer[0] == _expected(reference, tokenizer, served, model, prompt, tokens), job
    assert {card.id for card in ray_client.models.list().data} == {"tiny", *ADAPTERS, *FRESH}
    assert len(app.metrics()) == 2


@pytest.mark.ray
def test_multiplexed_routing_answers_an_adapters_requests_where_it_is_loaded(app, tokenizer, reference, served):
    before = sum(app.loads().values())
    first = {name: _complete(app.url, name)[1] for name in FRESH}  # one at a time: each a load on one replica
    _eventually(lambda: sum(app.loads().values()) - before, len(FRESH), "loads")
    loaded = app.loads()
    time.sleep(1.0)  # replicas report the adapters they serve to Serve's routers every 0.1 s
    for _ in range(3):
        for name in FRESH:
            text, replica = _complete(app.url, name)
            assert replica == first[name], name  # where it is already loaded
            assert text == _expected(reference, tokenizer, served, name, PROMPTS[0], 6)
    assert app.loads() == loaded  # 12 more requests, no more loads


@pytest.mark.ray
def test_loads_and_unloads_reach_every_replica(app, single, tokenizer, reference, served):
    shutil.copytree(served["adapters"] / "lora4", served["runtime"] / "late")
    shutil.copytree(served["adapters"] / "lora2", served["runtime"] / "kept")
    held = app.in_memory()
    for server in (app, single):
        load = {"lora_name": "late", "lora_path": str(served["runtime"] / "late")}
        response = httpx.post(f"{server.url}/v1/load_lora_adapter", json=load, headers=AUTH, timeout=60)
        assert response.status_code == 200 and response.text == "Success: LoRA adapter 'late' added successfully."
    assert app.in_memory() == {r: n + 1 for r, n in held.items()}  # in every replica before the answer
    text, _ = _complete(app.url, "late")
    assert text == reference.text("late", str(served["runtime"] / "late"), tokenizer(PROMPTS[0]).input_ids, 6)
    for server in (app, single):
        response = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "late"}, headers=AUTH)
        assert response.status_code == 200
        kept = {"lora_name": "kept", "lora_path": str(served["runtime"] / "kept")}
        assert httpx.post(f"{server.url}/v1/load_lora_adapter", json=kept, headers=AUTH, timeout=60).status_code == 200
    _eventually(app.in_memory, {r: n + 1 for r, n in held.items()}, "adapters in memory")  # late out, kept in
    gone = {"model": "late", "prompt": "hi"}
    answers = [httpx.post(f"{s.url}/v1/completions", json=gone, headers=AUTH) for s in (app, single)]
    assert [a.status_code for a in answers] == [404, 404] and answers[0].json() == answers[1].json()


def _stream(url: str, model: str, tokens: int, replicas: dict[int, str], index: int, started: threading.Event):
    """A streamed completion: its status and data events (``replicas[index]``: the replica serving it;
    ``started`` set at its first event), or its status and error body."""
    body = {"model": model, "prompt": PROMPTS[1], "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        if response.status_code != 200:
            return response.status_code, json.loads(response.read())
        replicas[index] = response.headers["x-flora-replica"]
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                started.set()
    return 200, events


def _replica_gone(error: dict) -> None:
    """``error`` is the application's answer to a request whose replica died."""
    assert error["type"] == "ServiceUnavailableError" and error["code"] == 503
    assert "the replica serving this request stopped before it finished" in error["message"]


@pytest.mark.ray
def test_a_replica_killed_mid_stream_is_replaced_and_its_clients_get_an_answer_or_an_error(
    app, tokenizer, reference, served
):
    names = list(app.metrics())
    environment = {**os.environ, "RAY_AUTH_MODE": "token"}
    killer = subprocess.Popen([sys.executable, "-c", KILLER, app.address, *names], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=environment)  # fmt: skip
    assert killer.stdout.readline() == "ready\n"
    models = ["lora2", "lora4", "flora", "tiny"] * 2
    tokens = MAX_MODEL_LEN - 16
    replicas: dict[int, str] = {}
    started = [threading.Event() for _ in models]
    with ThreadPoolExecutor(len(models)) as pool:
        streams = [pool.submit(_stream, app.url, m, tokens, replicas, i, started[i]) for i, m in enumerate(models)]
        assert started[0].wait(timeout=60)
        victim = replicas[0]
        assert killer.communicate(f"{victim}\n", timeout=60)[0] == "killed\n"
        outcomes = [stream.result(timeout=120) for stream in streams]  # never a hang
    expected = {m: _expected(reference, tokenizer, served, m, PROMPTS[1], tokens) for m in set(models)}
    cut = 0
    for index, (model, (status, events)) in enumerate(zip(models, outcomes, strict=True)):
        if status != 200:  # its replica died before its first token
            assert status == 503
            _replica_gone(events["error"])
            cut += 1
            continue
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        if "error" in last:  # its replica died under it
            assert replicas[index] == victim
            _replica_gone(last["error"])
            cut += 1
            continue
        text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        assert text == expected[model], model
    assert cut >= 1  # the killed replica was mid-stream
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (len(now := app.metrics()) == 2 and victim not in now):
        assert time.monotonic() < deadline, "Ray Serve did not replace the killed replica"
        time.sleep(1)
    (successor,) = set(now) - set(names)
    _eventually(lambda: app.in_memory()[successor], 1, "the successor's adapters")  # it replayed the loads: kept
    for model in [*ADAPTERS, "tiny", "kept"]:
        text, _ = _complete(app.url, model, PROMPTS[2])
        path = str(served["runtime"] / "kept") if model == "kept" else _path(served, model)
        assert text == reference.text(None if model == "tiny" else model, path, tokenizer(PROMPTS[2]).input_ids, 6)


@pytest.mark.ray
def test_a_client_that_hangs_up_frees_its_row_on_the_replica(app):
    body = {"model": "lora4", "prompt": PROMPTS[0], "max_tokens": MAX_MODEL_LEN - 16, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    key = "flora:request_success_total{adapter=lora4,finished_reason=abort,model_name=tiny}"

    def aborted() -> float:
        return sum(values.get(key, 0) for values in app.metrics().values())

    before = aborted()
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{app.url}/v1/completions", json=body,
                                                       headers=AUTH) as response:  # fmt: skip
        for _ in zip(range(3), response.iter_lines(), strict=False):
            pass  # read a few events, then hang up
    _eventually(aborted, before + 1, "aborted requests")
    running = "flora:num_requests_running{model_name=tiny}"
    _eventually(lambda: {values[running] for values in app.metrics().values()}, {0}, "running requests")


BAD = [
    ("POST", "/v1/completions", AUTH, {"model": "nope", "prompt": "hi"}),
    ("POST", "/v1/completions", AUTH, {"model": "nope", "prompt": "hi", "stream": True}),
    ("POST", "/v1/chat/completions", AUTH, {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/completions", {}, {"model": "lora2", "prompt": "hi"}),
    ("POST", "/v1/completions", {"authorization": "Bearer wrong"}, {"model": "lora2", "prompt": "hi"}),
    ("POST", "/v1/completions", AUTH, b'{"model": "lora2", "prompt": '),
    ("POST", "/v1/completions", AUTH, {"model": "lora2", "prompt": "hi", "tools": []}),
    ("POST", "/v1/completions", AUTH, {"model": "lora2", "prompt": [5] * (2 * MAX_MODEL_LEN)}),
    ("POST", "/v1/completions", AUTH, {"model": "lora2", "prompt": "hi", "max_tokens": 10 * MAX_MODEL_LEN}),
    ("POST", "/v1/completions", AUTH, {"model": "lora2", "prompt": "x" * (2 * MAX_REQUEST_BYTES)}),
    ("POST", "/v1/load_lora_adapter", AUTH, {"lora_name": "elsewhere", "lora_path": "/"}),
    ("POST", "/v1/load_lora_adapter", AUTH, {"lora_name": "a/b", "lora_path": "x"}),
    ("POST", "/v1/unload_lora_adapter", AUTH, {"lora_name": "never-loaded"}),
    ("GET", "/v1/no-such-path", AUTH, None),
]


@pytest.mark.ray
@pytest.mark.parametrize(("method", "path", "headers", "body"), BAD, ids=lambda v: str(v)[:40])
def test_bad_input_gets_the_same_4xx_as_one_process(app, single, method, path, headers, body):
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    headers = {**headers, "content-type": "application/json"}
    answers = [httpx.request(method, f"{server.url}{path}", content=content, headers=headers, timeout=60)
               for server in (app, single)]  # fmt: skip
    assert 400 <= answers[1].status_code < 500
    assert answers[0].status_code == answers[1].status_code, answers[0].text
    assert answers[0].json() == answers[1].json()


@pytest.mark.ray
def test_sigterm_stops_the_application_and_its_ray_instance(app):
    app.process.send_signal(signal.SIGTERM)
    assert app.process.wait(timeout=120) == 0, app.log.read_text()[-5000:]
    host, port = app.address.rsplit(":", 1)
    for where in [(host, int(port)), ("127.0.0.1", int(app.url.rsplit(":", 1)[1]))]:  # Ray's GCS, the API
        with pytest.raises(OSError):
            socket.create_connection(where, timeout=5).close()


# -- bad command lines: refused before Ray starts -------------------------------------------------------


def _refused(argv: list[str], capsys) -> str:
    assert main(["serve", *argv]) == 2
    ray = sys.modules.get("ray")  # not imported at all where flora[ray] is not installed
    assert ray is None or not ray.is_initialized()
    return capsys.readouterr().err


def test_zero_replicas_is_refused(capsys):
    assert "--replicas 0: expected at least 1" in _refused(["--replicas", "0"], capsys)


def test_an_unreachable_ray_address_is_refused_at_once(tiny_dir, capsys):
    pytest.importorskip("ray")
    port = _free_port()  # nothing listens there
    err = _refused(["--model", tiny_dir, "--replicas", "2", "--ray-address", f"127.0.0.1:{port}"], capsys)
    assert f"--ray-address '127.0.0.1:{port}': no Ray cluster answers there" in err
    assert "ray start --head" in err
    assert "--ray-address 'nowhere': expected HOST:PORT" in _refused(["--model", tiny_dir, "--ray-address", "nowhere"],
                                                                      capsys)  # fmt: skip


def test_a_missing_adapter_dir_is_refused_before_ray_starts(tiny_dir, tmp_path, capsys):
    err = _refused(["--model", tiny_dir, "--replicas", "2", "--adapter-dir", str(tmp_path / "none")], capsys)
    assert f"--adapter-dir '{tmp_path / 'none'}' is not a directory" in err


def test_routing_and_autoscaling_are_checked(tiny_dir, capsys):
    pytest.importorskip("ray")  # Ray Serve's own checks of the autoscaling config
    with pytest.raises(SystemExit):
        main(["serve", "--routing", "sticky"])
    assert "invalid choice: 'sticky'" in capsys.readouterr().err
    err = _refused(["--model", tiny_dir, "--autoscaling-config", '{"min_replicas": -1}'], capsys)
    assert "--autoscaling-config" in err and "min_replicas" in err and "greater than or equal to 0" in err
    err = _refused(["--model", tiny_dir, "--autoscaling-config", '{"max_replica": 4}'], capsys)
    assert "unknown keys ['max_replica']" in err and "max_replicas" in err
    err = _refused(["--model", tiny_dir, "--replicas", "2", "--autoscaling-config", '{"max_replicas": 4}'], capsys)
    assert "--replicas 2 and --autoscaling-config: give one of them" in err


def test_the_kuberay_example_builds_its_application():
    serve = pytest.importorskip("ray.serve")
    import yaml

    from flora.serve.replicas import build_app

    manifest = yaml.safe_load((Path(__file__).parents[2] / "docs" / "rayservice.yaml").read_text())
    (application,) = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    assert application["import_path"] == "flora.serve.replicas:build_app"
    assert isinstance(build_app(application["args"]), serve.Application)
    with pytest.raises(ValueError, match="--replicas 0: expected at least 1"):
        build_app({"flags": "--replicas 0"})
    with pytest.raises(ValueError, match=r"args \['flag'\]: expected only 'flags'"):
        build_app({"flag": "--replicas 2"})


@pytest.mark.ray
def test_a_replica_that_cannot_start_stops_the_start_naming_why(served, tmp_path):
    command = [sys.executable, "-m", "flora", "serve", "--model", str(served["model"]), "--dtype", "float64",
               "--adapter", f"big={served['adapters'] / 'lora4'}", "--adapter-memory-mb", "0.0001",
               "--replicas", "2", "--num-cpus-per-replica", "0.5", "--port", str(_free_port()),
               "--autotune-cache", "none"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    assert done.returncode == 2
    assert "flora: error: the application did not start: FloraReplica: ValueError: --adapter big=" in done.stderr
    assert "more than the adapters' memory (--adapter-memory-mb 0.0001)" in done.stderr
