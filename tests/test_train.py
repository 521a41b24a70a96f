"""`flora.train` / ``flora train``: settings parsed against the method's config, data selection and
adapter groups, output layout (PEFT adapters, config, per-step log, adapter-only checkpoints),
many adapters with their own learning rate and rank, gradient accumulation, full fine-tuning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data.tiny import tiny_llama, tiny_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import flora
from flora import AdapterModel, LoraConfig
from flora.cli import main
from flora.data import build_suite
from flora.training import (
    AdapterExample,
    TrainConfig,
    assign_adapters,
    build_adapter_config,
    load_training_samples,
    train,
    train_adapters,
)

FIXTURES = Path(__file__).parent / "data" / "fixtures"
TASKS = ["reverse_words", "add_numbers"]


def save_tiny_model(directory: Path) -> str:
    """A tiny random Llama (float32) and its tokenizer, saved as a transformers directory."""
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer, dtype=torch.float32).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def quick(tiny_dir: str, output_dir: Path, **settings) -> dict:
    """Settings for a few-second run on the tiny model."""
    base = dict(model=tiny_dir, output_dir=str(output_dir), tasks=["reverse_words"], suite_train=8, max_steps=4,
                batch_size=4, save_steps=2, strategy="bmm", progress=False, settings={"r": 4})  # fmt: skip
    base.update(settings)
    return base


def log_records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


# -- settings -------------------------------------------------------------------------------------


def test_flora_train_is_the_training_function_imported_on_first_use():
    import flora.training

    assert flora.train is flora.training.train and "train" in flora.__all__
    code = "import sys, flora; print('flora.training' in sys.modules, 'transformers.trainer' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.split() == ["False", "False"]  # import flora stays light


def test_settings_are_parsed_against_the_config_fields():
    config = build_adapter_config(
        "LoRA",
        {
            "r": "4",
            "alpha": "16",
            "use_rslora": "true",
            "target_modules": "q_proj,v_proj",
            "rank_pattern": '{"q_proj": 2}',
        },
    )
    assert config == LoraConfig(r=4, alpha=16.0, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                rank_pattern={"q_proj": 2})  # fmt: skip
    assert build_adapter_config("lora", {"target_modules": "all-linear"}).target_modules == "all-linear"
    assert build_adapter_config("lora", {"target_modules": r".*\.q_proj"}).target_modules == r".*\.q_proj"
    assert build_adapter_config("lora", {"target_modules": '["q_proj"]'}).target_modules == ["q_proj"]


def test_unknown_method_or_hyperparameter_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method 'lorra' \(expected one of full, lora, flora, ia3"):
        build_adapter_config("lorra", {})
    with pytest.raises(ValueError, match=r"lora has no hyperparameter 'rank' \(valid: .*\br\b.*alpha"):
        build_adapter_config("lora", {"rank": 4})
    with pytest.raises(ValueError, match=r"lora r: 'x' is not an integer"):
        build_adapter_config("lora", {"r": "x"})
    with pytest.raises(ValueError, match=r"LoRA rank r=0 is invalid"):
        build_adapter_config("lora", {"r": 0})
    with pytest.raises(TypeError, match=r"unknown setting 'epochz'"):
        train(epochz=2)


# -- data and adapter groups ------------------------------------------------------------------


def test_suite_training_instances_are_disjoint_from_the_heldout_ones():
    samples = load_training_samples(TrainConfig(tasks=TASKS, suite_train=30).normalized())
    assert {s.task for s, _ in samples} == set(TASKS) and len(samples) == 60
    heldout = build_suite(0, n_train=0, n_heldout=100, tasks=TASKS).heldout
    assert not {s.input for s, _ in samples} & {i.input for task in heldout for i in task.instances}
    default = load_training_samples(TrainConfig(suite_train=1).normalized())
    assert {s.category for s, _ in default}.isdisjoint({"Comparison", "Date Conversion", "Sequences", "Text Editing"})


def test_data_files_in_every_format(tmp_path):
    sni = load_training_samples(TrainConfig(data=[str(FIXTURES / "sni")]).normalized())
    assert {s.task for s, _ in sni} == {"task901_antonyms", "task902_title_generation", "task903_sentiment"}
    split = load_training_samples(TrainConfig(data=[str(FIXTURES / "sni")], split=str(FIXTURES / "sni" / "splits"))
                                  .normalized())  # fmt: skip
    assert {s.task for s, _ in split} == {"task901_antonyms", "task903_sentiment"}  # the split's train_tasks.txt
    mixed = load_training_samples(
        TrainConfig(data=[str(FIXTURES / "alpaca.jsonl"), str(FIXTURES / "plain.jsonl")]).normalized()
    )
    assert {(s.task, template) for s, template in mixed} == {("alpaca", "alpaca"), ("plain", "plain")}
    build_suite(0, n_train=3, n_heldout=2, tasks=["reverse_words", "compare_numbers"]).export(tmp_path / "suite")
    exported = load_training_samples(TrainConfig(data=[str(tmp_path / "suite")]).normalized())
    assert {s.task for s, _ in exported} == {"reverse_words"}  # the seen tasks of the default split
    asked = load_training_samples(TrainConfig(data=[str(tmp_path / "suite")], tasks=["Comparison"]).normalized())
    assert {s.task for s, _ in asked} == {"compare_numbers"}
    assert all("-train-" in s.id for s, _ in exported)


def test_adapter_groups_per_task_per_category_and_explicit():
    samples = [s for s, _ in load_training_samples(TrainConfig(tasks=["Word Order", "add_numbers"], suite_train=2)
                                                   .normalized())]  # fmt: skip
    _, per_task = assign_adapters(samples, TrainConfig(adapter_per="task").normalized())
    assert list(per_task) == sorted(per_task) and "sort_words_alphabetically" in per_task and len(per_task) == 5
    names, per_category = assign_adapters(samples, TrainConfig(adapter_per="category").normalized())
    assert per_category == {"arithmetic": ["add_numbers"], "word_order": sorted({s.task for s in samples[:8]})}
    explicit = TrainConfig(adapters={"words": ["Word Order"], "math": ["add_numbers"]}).normalized()
    names, groups = assign_adapters(samples, explicit)
    assert groups["math"] == ["add_numbers"] and len(groups["words"]) == 4
    assert names == ["math" if s.task == "add_numbers" else "words" for s in samples]
    _, rest = assign_adapters(samples, TrainConfig(adapters={"rev": ["reverse_words"], "other": ["*"]}).normalized())
    assert rest["rev"] == ["reverse_words"] and "add_numbers" in rest["other"]
    with pytest.raises(ValueError, match=r"tasks \['add_numbers'\] belong to no adapter"):
        assign_adapters(samples, TrainConfig(adapters={"words": ["Word Order"]}).normalized())
    with pytest.raises(ValueError, match=r"adapters \{'num': \['Counting'\]\} have no training examples"):
        assign_adapters(samples, TrainConfig(adapters={"num": ["Counting"], "all": ["*"]}).normalized())
    with pytest.raises(ValueError, match=r"task 'reverse_words' belongs to adapters \['a', 'b'\]"):
        assign_adapters(samples, TrainConfig(adapters={"a": ["Word Order"], "b": ["reverse_words"], "c": ["*"]})
                        .normalized())  # fmt: skip


# -- runs -----------------------------------------------------------------------------------------


def test_one_adapter_run_writes_adapter_config_log_and_small_checkpoints(tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = flora.train(**quick(tiny_dir, out))  # flora.train is flora.training.train
    assert result.global_step == 4 and set(result.adapters) == {"default"}
    saved = adapter_tensors(out / "adapters" / "default")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())  # trained: B left zero
    fresh = AdapterModel.from_pretrained(tiny_dir)
    fresh.load_adapter(out / "adapters" / "default", "default")
    trained = result.model.adapter_parameters("default")
    for key, parameter in fresh.adapter_parameters("default").items():
        torch.testing.assert_close(parameter, trained[key], rtol=0, atol=0)

    config = json.loads((out / "train_config.json").read_text())
    assert set(config["config"]) == set(TrainConfig.__dataclass_fields__)
    assert config["config"]["learning_rate"] == 1e-3 and config["config"]["settings"] == {"r": 4}
    resolved = config["resolved"]["adapters"]["default"]
    assert resolved["config"]["r"] == 4 and resolved["tasks"] == ["reverse_words"] and resolved["examples"] == 8
    records = log_records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # linear schedule with one warm-up step (10% of 4, rounded up), as TrainingArguments computes it
    assert [r["learning_rate"] for r in records] == pytest.approx([0.0, 1e-3, 2e-3 / 3, 1e-3 / 3])
    assert all(r["examples"] == 4 and r["tokens"] > 0 and r["loss"] > 0 for r in records)
    assert json.loads((out / "train_result.json").read_text())["metrics"]["train_loss"] == pytest.approx(
        sum(r["loss"] for r in records) / 4
    )
    checkpoint = out / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapters", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= names
    assert not any(n.startswith("model") for n in names)  # the frozen base model is not in checkpoints
    adapter_bytes = sum(p.stat().st_size for p in (checkpoint / "adapters").rglob("*") if p.is_file())
    model_bytes = (Path(tiny_dir) / "model.safetensors").stat().st_size
    assert adapter_bytes < model_bytes / 2
    assert not list(out.glob(".staging-*"))


def test_many_adapters_with_their_own_learning_rate_and_rank(tiny_dir, tmp_path):
    out = tmp_path / "many"
    result = train(**quick(tiny_dir, out, tasks=TASKS, adapter_per="task", adapter_lr={"add_numbers": 0.0},
                           adapter_settings={"reverse_words": {"r": 2}}))  # fmt: skip
    assert set(result.adapters) == set(TASKS)
    frozen = adapter_tensors(out / "adapters" / "add_numbers")
    moved = adapter_tensors(out / "adapters" / "reverse_words")
    assert all(v.abs().sum() == 0 for k, v in frozen.items() if "lora_B" in k)  # learning rate 0: B stays 0
    assert any(v.abs().sum() > 0 for k, v in moved.items() if "lora_B" in k)
    assert {v.shape[0] for k, v in moved.items() if "lora_A" in k} == {2}
    assert {v.shape[0] for k, v in frozen.items() if "lora_A" in k} == {4}
    records = log_records(out)
    assert all(sum(r["adapters"].values()) == 4 for r in records)
    assert sum(r["adapters"]["add_numbers"] for r in records) > 0 and sum(r["adapters"]["reverse_words"]
                                                                            for r in records) > 0  # fmt: skip
    assert all(r["learning_rates"]["add_numbers"] == 0.0 for r in records)
    assert records[1]["learning_rates"]["reverse_words"] == pytest.approx(1e-3)


def test_gradient_accumulation_gives_the_same_adapter(tiny_dir, tmp_path):
    runs = {}
    for micro in (4, 2, 1):
        result = train(**quick(tiny_dir, tmp_path / f"micro{micro}", micro_batch_size=micro, save_steps=0))
        runs[micro] = adapter_tensors(result.adapters["default"])
        records = log_records(tmp_path / f"micro{micro}")
        assert all(r["examples"] == 4 for r in records)
    for micro in (2, 1):
        for key, tensor in runs[4].items():
            torch.testing.assert_close(runs[micro][key], tensor, rtol=1e-4, atol=1e-6)


def test_full_fine_tuning_saves_the_model(tiny_dir, tmp_path):
    out = tmp_path / "full"
    result = train(**quick(tiny_dir, out, method="full", settings={}, max_steps=2, learning_rate=1e-3))
    assert result.adapters == {} and result.model_dir == out / "model"
    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    original = AutoModelForCausalLM.from_pretrained(tiny_dir)
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, original.get_parameter(n))]
    assert len(changed) == len(list(original.parameters()))
    assert (out / "checkpoint-2" / "model.safetensors").is_file()


def test_cli_trains_alpaca_data_with_the_alpaca_template(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["train", "--model", tiny_dir, "--output-dir", str(out), "--data", str(FIXTURES / "alpaca.jsonl"),
                 "--method", "ia3", "--set", "target_modules=q_proj,down_proj",
                 "--set", "feedforward_modules=down_proj",
                 "--max-steps", "2", "--batch-size", "2", "--no-progress", "--adapter-name", "alp"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "saved" in capsys.readouterr().out
    config = json.loads((out / "adapters" / "alp" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]
    stored = json.loads((out / "train_config.json").read_text())
    assert stored["config"]["learning_rate"] == 5e-3  # the method's default
    assert stored["resolved"]["templates"]["alpaca"]["name"] == "alpaca"


def test_train_adapters_on_an_in_memory_model(tmp_path):
    tokenizer = tiny_tokenizer()
    model = AdapterModel(tiny_llama(tokenizer, dtype=torch.float32), tokenizer, strategy="bmm")
    model.add_adapter("a", LoraConfig(r=2))
    model.add_adapter("b", LoraConfig(r=2))
    examples = [AdapterExample("a" if i % 2 else "b", f"Input: {i} words\nOutput: ", f"{i} done") for i in range(8)]
    train_adapters(model, examples, tmp_path, max_steps=3, batch_size=4, adapter_lr={"b": 0.0})
    assert all(p.abs().sum() > 0 for k, p in model.adapter_parameters("a").items() if "lora_B" in k)
    assert all(p.abs().sum() == 0 for k, p in model.adapter_parameters("b").items() if "lora_B" in k)
