"""Prompt tuning and prefix tuning: equal to Hugging Face PEFT for one adapter, and per row in mixed
batches (with each other, with LoRA and with the bare model) in forward, training and generate."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import adam_losses, batch, tiny_model
from peft import PeftModel, get_peft_model
from peft import PrefixTuningConfig as PeftPrefixTuningConfig
from peft import PromptTuningConfig as PeftPromptTuningConfig
from safetensors.torch import load_file, save_file

from flora import AdapterModel, LoraConfig, PrefixTuningConfig, PromptTuningConfig
from flora.base import CACHE_KEY, CACHE_KEYS
from flora.io import CONFIG_NAME, WEIGHTS_NAME

TOL = 1e-4
GENERATE = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}


def _labels(ids, mask):
    return ids.masked_fill(mask == 0, -100)


def _peft_virtual(arch: str, config, tmp_path, name: str):
    """A PEFT model with one virtual-token adapter (random values) and its directory."""
    peft_model = get_peft_model(tiny_model(arch), config).eval()
    peft_model.save_pretrained(tmp_path / name)
    return peft_model, tmp_path / name


def _peft_configs():
    return {
        "prompt": PeftPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "prefix": PeftPrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "prefix_mlp": PeftPrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=12
        ),
    }


# -- equivalence with PEFT ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["prompt", "prefix", "prefix_mlp"])
def test_peft_adapter_loads_and_matches_peft(arch, tmp_path, kind):
    """PEFT makes and saves the adapter (the MLP one saves its output); flora's logits on the real tokens
    and its loss equal PEFT's, for a left-padded batch."""
    peft_model, directory = _peft_virtual(arch, _peft_configs()[kind], tmp_path, kind)
    assert set(load_file(directory / WEIGHTS_NAME)) == {"prompt_embeddings"}
    model = AdapterModel(tiny_model(arch))
    model.load_adapter(directory, adapter_name="v")
    ids, mask = batch()
    labels = _labels(ids, mask)
    expected = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    got = model(ids, attention_mask=mask, labels=labels, adapter_names=["v"] * len(ids))
    assert got.logits.shape == ids.shape + (tiny_model(arch).config.vocab_size,)
    # PEFT's prompt tuning also returns logits for the virtual tokens, in front: compare the real ones
    assert (got.logits - expected.logits[:, -ids.shape[1] :]).abs().max() <= TOL
    assert abs(got.loss.item() - expected.loss.item()) <= TOL


@pytest.mark.filterwarnings("ignore:Position ids are not supported")
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_generate_matches_peft(tmp_path, kind):
    """Greedy generation (with its key/value cache) equals greedy decoding by PEFT's forward over the
    whole sequence at every step, on rows without padding. PEFT's own ``generate`` is not the
    reference: PEFT 0.21's prompt learning misreads the cache that transformers 5.25 renamed."""
    peft_model, directory = _peft_virtual("gpt2", _peft_configs()[kind], tmp_path, kind)
    model = AdapterModel(tiny_model("gpt2"))
    model.load_adapter(directory, adapter_name="v")
    ids, _ = batch()
    expected, expected_logits = ids, []
    with torch.no_grad():
        for _ in range(GENERATE["max_new_tokens"]):
            logits = peft_model(input_ids=expected, attention_mask=torch.ones_like(expected)).logits
            expected_logits.append(logits[:, -1])
            expected = torch.cat([expected, expected_logits[-1].argmax(-1, keepdim=True)], dim=1)
    got = model.generate(
        ids, attention_mask=torch.ones_like(ids), adapter_names=["v"] * len(ids), output_logits=True,
        return_dict_in_generate=True, **GENERATE,
    )  # fmt: skip
    assert torch.equal(got.sequences, expected)
    assert max((a - b).abs().max().item() for a, b in zip(got.logits, expected_logits, strict=True)) <= TOL


@pytest.mark.parametrize("kind", ["prompt", "prefix", "prefix_mlp"])
def test_flora_adapter_loads_into_peft_and_round_trips(arch, tmp_path, kind):
    model = AdapterModel(tiny_model(arch))
    config = {
        "prompt": PromptTuningConfig(num_virtual_tokens=3),
        "prefix": PrefixTuningConfig(num_virtual_tokens=2),
        "prefix_mlp": PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8),
    }[kind]
    model.add_adapter("mine", config)
    model.save_adapter("mine", tmp_path / "mine")
    peft_model = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "mine").eval()
    ids, mask = batch()
    expected = peft_model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1] :]
    got = model(ids, attention_mask=mask, adapter_names=["mine"] * len(ids)).logits
    assert (got - expected).abs().max() <= TOL
    # and back into flora: the saved tensor bit for bit, the same logits
    again = AdapterModel(tiny_model(arch))
    again.load_adapter(tmp_path / "mine", adapter_name="mine")
    saved = again.adapter_parameters("mine")["prompt_embeddings"]
    assert torch.equal(saved, model.virtual_tokens.adapter_state("mine")["prompt_embeddings"])
    assert torch.equal(again(ids, attention_mask=mask, adapter_names=["mine"] * len(ids)).logits, got)
    saved_config, own_config = (
        again.adapter_configs["mine"].to_peft_dict(),
        model.adapter_configs["mine"].to_peft_dict(),
    )
    assert {**saved_config, "base_model_name_or_path": None} == {**own_config, "base_model_name_or_path": None}


def test_text_init_matches_peft(tmp_path):
    from data.tiny import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    text = "Reverse the words"
    peft_model = get_peft_model(
        tiny_llama(tokenizer, dtype=torch.float32),
        PeftPromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=12,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=str(tmp_path / "tok"),
        ),
    )
    model = AdapterModel(tiny_llama(tokenizer, dtype=torch.float32), tokenizer)
    model.add_adapter(
        "t", PromptTuningConfig(num_virtual_tokens=12, prompt_tuning_init="TEXT", prompt_tuning_init_text=text)
    )
    expected = peft_model.get_prompt_embedding_to_save("default")
    assert torch.equal(model.adapter_parameters("t")["prompt_embeddings"].detach(), expected)
    assert len(tokenizer(text)["input_ids"]) < 12  # the text was repeated to fill the prompt


# -- mixed batches ------------------------------------------------------------------------------------


def _mixed_model(arch: str) -> AdapterModel:
    """p, r: prompts of 3 and 5 tokens; q: a prefix of 2 (through its MLP); s: a prefix of 4; l: LoRA."""
    torch.manual_seed(0)
    model = AdapterModel(tiny_model(arch))
    model.add_adapter("p", PromptTuningConfig(num_virtual_tokens=3))
    model.add_adapter("r", PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB"))
    model.add_adapter("q", PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True))
    model.add_adapter("s", PrefixTuningConfig(num_virtual_tokens=4))
    model.add_adapter("l", LoraConfig(r=2, alpha=4))
    with torch.no_grad():
        for key, parameter in model.adapter_parameters("l").items():
            if "lora_B" in key:
                parameter.normal_(0, 0.3)
    return model


NAMES = ["p", None, "q", "p", "l", "r", "s"]


def test_mixed_batch_equals_each_row_alone(arch):
    model = _mixed_model(arch)
    ids, mask = batch(rows=len(NAMES))
    labels = _labels(ids, mask)
    mixed = model(ids, attention_mask=mask, labels=labels, adapter_names=NAMES)
    total, count = 0.0, 0
    for row, name in enumerate(NAMES):
        one = slice(row, row + 1)
        alone = model(ids[one], attention_mask=mask[one], labels=labels[one], adapter_names=[name])
        assert (mixed.logits[row] - alone.logits[0]).abs().max() <= TOL, (row, name)
        # the row's loss terms: a prompt's last virtual token predicts the first real token
        predicted = labels[row] if name in ("p", "r") else labels[row, 1:]
        total, count = total + alone.loss.item() * (predicted != -100).sum().item(), count + (predicted != -100).sum()
    assert abs(mixed.loss.item() - total / count.item()) <= TOL
    bare = tiny_model(arch)(input_ids=ids, attention_mask=mask).logits
    assert (mixed.logits[1] - bare[1]).abs().max() <= TOL
    assert (mixed.logits[0] - bare[0]).abs().max() > 1e-3 and (mixed.logits[2] - bare[2]).abs().max() > 1e-3


@pytest.mark.parametrize("keep", [torch.tensor([0, 3, 4, 7]), 3], ids=["positions", "last"])
def test_logits_to_keep_counts_real_tokens_in_a_mixed_batch(keep):
    """Rows with soft prompts, prefixes, LoRA or nothing: the kept logits are the full logits at the
    real-token positions asked for (what `flora.training.response_losses` relies on)."""
    model = _mixed_model("llama")
    ids, mask = batch(rows=len(NAMES))
    full = model(ids, attention_mask=mask, adapter_names=NAMES).logits
    kept = model(ids, attention_mask=mask, adapter_names=NAMES, logits_to_keep=keep).logits
    expected = full[:, keep] if isinstance(keep, torch.Tensor) else full[:, -keep:]
    assert kept.shape == expected.shape
    assert (kept - expected).abs().max() <= TOL


def test_response_losses_equal_the_cross_entropy_of_full_logits():
    """Per row, the loss over its response tokens from the kept logits equals that from every
    position's logits, in one batch and batched otherwise (`validation_losses`)."""
    from flora.data import collate_examples
    from flora.training.response_loss import response_losses, validation_losses

    model = _mixed_model("llama")
    ids, mask = batch(rows=len(NAMES))
    items = []
    for row in range(len(NAMES)):
        tokens = ids[row][mask[row] == 1].tolist()
        items.append({"input_ids": tokens, "labels": [-100] * (len(tokens) - 3) + tokens[-3:]})  # 3-token answers
    padded = collate_examples(items, 0)  # right-padded: positions count from each row's first token
    inputs = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"], "adapter_names": NAMES}
    sums, tokens, _ = response_losses(model, inputs, padded["labels"])
    logits = model(**inputs).logits
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), padded["labels"][:, 1:],
                                                  reduction="none")  # fmt: skip
    assert tokens.tolist() == [3] * len(NAMES)
    assert (sums - per_token.sum(dim=1)).abs().max() <= TOL
    model.tokenizer = type("Tokenizer", (), {"pad_token_id": 0})()
    losses = validation_losses(model, items, NAMES, batch_size=3)
    assert [count for _, count in losses] == [3] * len(NAMES)
    assert max(abs(loss - total / 3) for (loss, _), total in zip(losses, sums.tolist(), strict=True)) <= TOL


def _new_tokens(out, prompt_length: int, eos: int = 2) -> list[int]:
    """The generated tokens up to the first EOS (Llama's id 2), without the padding of finished rows."""
    tokens = out[prompt_length:].tolist()
    if eos in tokens:
        return tokens[: tokens.index(eos) + 1]
    while tokens and tokens[-1] == GENERATE["pad_token_id"]:
        tokens.pop()
    return tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_mixed_batch_equals_each_row_alone(arch):
    model = _mixed_model(arch)
    ids, mask = batch(rows=len(NAMES))
    together = model.generate(ids, attention_mask=mask, adapter_names=NAMES, **GENERATE)
    assert together.shape[0] == len(NAMES)
    for row, name in enumerate(NAMES):
        real = ids[row][mask[row] == 1][None]  # alone and without its padding
        alone = model.generate(real, adapter_names=[name], **GENERATE)
        assert _new_tokens(together[row], ids.shape[1]) == _new_tokens(alone[0], real.shape[1]), (row, name)
    assert "prepare_inputs_for_generation" not in model.base_model.__dict__


def test_generate_with_beams_and_several_sequences_per_row():
    model = _mixed_model("llama")
    ids, mask = batch(rows=3)
    names = ["p", "s", None]
    kwargs = {**GENERATE, "num_beams": 2, "num_return_sequences": 2}
    together = model.generate(ids, attention_mask=mask, adapter_names=names, **kwargs)
    for row, name in enumerate(names):
        one = slice(row, row + 1)
        alone = model.generate(ids[one], attention_mask=mask[one], adapter_names=[name], **kwargs)
        for k in range(2):
            assert _new_tokens(together[2 * row + k], ids.shape[1]) == _new_tokens(alone[k], ids.shape[1])


def test_set_adapter_applies_to_every_row_and_inputs_embeds_work():
    model = _mixed_model("llama")
    ids, mask = batch(rows=3)
    named = model(ids, attention_mask=mask, adapter_names=["p"] * 3).logits
    model.set_adapter("p")
    assert torch.equal(model(ids, attention_mask=mask).logits, named)
    embeds = model.base_model.get_input_embeddings()(ids)
    for name in ("p", "q"):
        by_ids = model(ids, attention_mask=mask, adapter_names=[name] * 3).logits
        by_embeds = model(inputs_embeds=embeds, attention_mask=mask, adapter_names=[name] * 3).logits
        assert (by_ids - by_embeds).abs().max() <= TOL
    names = ["p", "s", None]
    by_ids = model.generate(ids, attention_mask=mask, adapter_names=names, **GENERATE)
    by_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, adapter_names=names, **GENERATE)
    assert torch.equal(by_ids[:, ids.shape[1] :], by_embeds)


# -- training -----------------------------------------------------------------------------------------


def test_gradients_reach_only_the_used_adapters():
    model = _mixed_model("llama").train()
    ids, mask = batch(rows=4)
    model(ids, attention_mask=mask, labels=_labels(ids, mask), adapter_names=["p", None, "q", "p"]).loss.backward()
    for name in ("p", "q"):
        for key, parameter in model.adapter_parameters(name).items():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, (name, key)
    for name in ("r", "s", "l"):
        assert all(p.grad is None for p in model.adapter_parameters(name).values()), name
    assert all(p.grad is None for p in model.base_model.parameters() if not p.requires_grad)
    assert sorted(model.adapter_parameters("q")) == [
        "prompt_encoder.embedding.weight",
        "prompt_encoder.transform.0.bias",
        "prompt_encoder.transform.0.weight",
        "prompt_encoder.transform.2.bias",
        "prompt_encoder.transform.2.weight",
    ]


def test_adam_steps_lower_the_loss():
    model = _mixed_model("gpt2").train()
    ids, mask = batch(rows=4)
    names = ["p", "q", "s", "l"]
    losses = adam_losses(model, ids, mask, _labels(ids, mask), names, lr=1e-2, steps=8)
    assert losses[-1] < losses[0] - 0.05, losses


def test_trained_projected_prefix_saves_its_output(tmp_path):
    model = _mixed_model("llama")
    ids, mask = batch(rows=2)
    before = model(ids, attention_mask=mask, adapter_names=["q", "p"]).logits
    model.save_adapter("q", tmp_path / "q")
    model.save_adapter("p", tmp_path / "p")
    again = AdapterModel(tiny_model("llama"))
    again.load_adapter(tmp_path / "q", adapter_name="q")
    again.load_adapter(tmp_path / "p", adapter_name="p")
    assert (again(ids, attention_mask=mask, adapter_names=["q", "p"]).logits - before).abs().max() <= 1e-6
    assert list(again.adapter_parameters("q")) == ["prompt_embeddings"]  # loaded: the plain prefix
    saved = json.loads((tmp_path / "q" / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["prefix_projection"] is True
    assert saved["num_attention_heads"] == 2 and saved["token_dim"] == 16  # key/value heads, as PEFT


# -- management and bad input -------------------------------------------------------------------------


def test_list_delete_and_merge():
    model = _mixed_model("llama")
    assert model.list_adapters() == ["p", "r", "q", "s", "l"]
    with pytest.raises(ValueError, match="'p' is PROMPT_TUNING.*cannot be merged"):
        model.merge_adapter("p")
    with pytest.raises(ValueError, match="'q' is PREFIX_TUNING.*cannot be merged"):
        model.merge_adapter("q")
    model.delete_adapter("p")
    model.delete_adapter("q")
    assert model.list_adapters() == ["r", "s", "l"]
    assert not model.virtual_tokens.holds("p") and not model.virtual_tokens.holds("q")
    with pytest.raises(ValueError, match="unknown adapter name"):
        model(*batch(rows=1), adapter_names=["p"])


@pytest.mark.parametrize("n", [0, -2, None, 1.5, True])
def test_num_virtual_tokens_must_be_positive(n):
    for config in (PromptTuningConfig, PrefixTuningConfig):
        with pytest.raises(ValueError, match=rf"num_virtual_tokens={n!r} is invalid \(expected a positive integer\)"):
            config(num_virtual_tokens=n)


def test_unknown_inits():
    with pytest.raises(ValueError, match=r"prompt_tuning_init='GLOVE' is unknown \(expected one of RANDOM, TEXT"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="GLOVE")
    with pytest.raises(ValueError, match="init_weights='ones' is unknown"):
        PrefixTuningConfig(num_virtual_tokens=2, init_weights="ones")
    with pytest.raises(ValueError, match="needs prompt_tuning_init_text"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT")
    model = AdapterModel(tiny_model("llama"))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        model.add_adapter(
            "t", PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="a")
        )
    assert model.list_adapters() == []


def test_prefix_for_another_model_names_both_shapes(tmp_path):
    _, directory = _peft_virtual("llama", _peft_configs()["prefix"], tmp_path, "prefix")
    model = AdapterModel(tiny_model("gpt2"))
    with pytest.raises(
        ValueError,
        match=r"adapter 'x': PREFIX_TUNING .* token_dim=16 \(the base model needs 32\).*num_attention_heads=2",
    ):
        model.load_adapter(directory, adapter_name="x")
    # the same file with the config fields removed: the tensor's shape is checked against the model's
    config = json.loads((directory / CONFIG_NAME).read_text())
    for key in ("token_dim", "num_attention_heads", "num_layers"):
        del config[key]
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"has shape \(4, 64\) but this base model needs \(4, 128\).*2 layers x 2 x 4 key/value heads"
    ):
        model.load_adapter(directory, adapter_name="x")
    save_file({"prompt_embeddings": torch.zeros(3, 32)}, directory / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"has shape \(3, 32\) but this base model needs \(4, 128\)"):
        model.load_adapter(directory, adapter_name="x")
    save_file({"other": torch.zeros(4, 128)}, directory / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="holds one tensor 'prompt_embeddings', got \\['other'\\]"):
        model.load_adapter(directory, adapter_name="x")
    assert model.list_adapters() == []


def test_prompt_of_wrong_width_and_bad_forward_arguments(tmp_path):
    _, directory = _peft_virtual("llama", _peft_configs()["prompt"], tmp_path, "prompt")
    save_file({"prompt_embeddings": torch.zeros(3, 16)}, directory / WEIGHTS_NAME)
    model = _mixed_model("llama")
    with pytest.raises(ValueError, match=r"has shape \(3, 16\) but this base model needs \(3, 32\)"):
        model.load_adapter(directory, adapter_name="x")
    ids, mask = batch(rows=2)
    for key in CACHE_KEYS:  # transformers' name (``cache`` from 5.25) and the older one
        with pytest.raises(ValueError, match=f"forward with {key} is not supported"):
            model(ids, attention_mask=mask, adapter_names=["p", None], **{key: object()})
    config = json.loads((directory / CONFIG_NAME).read_text())
    (directory / CONFIG_NAME).write_text(json.dumps({**config, "task_type": "SEQ_2_SEQ_LM"}))
    with pytest.raises(ValueError, match="task_type='SEQ_2_SEQ_LM' is not supported"):
        model.load_adapter(directory, adapter_name="x")


def test_prefix_refuses_gradient_checkpointing_and_a_filled_cache():
    from transformers import DynamicCache

    model = _mixed_model("llama")
    ids, mask = batch(rows=2)
    cache = DynamicCache(config=model.config)
    model(ids, attention_mask=mask, adapter_names=[None, None], **{CACHE_KEY: cache})
    with pytest.raises(ValueError, match="cannot continue from a filled cache"):
        model.generate(ids, attention_mask=mask, adapter_names=["p", "q"], **{CACHE_KEY: cache}, **GENERATE)
    assert "prepare_inputs_for_generation" not in model.base_model.__dict__
    model.base_model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="prefix tuning does not work with gradient checkpointing"):
        model(ids, attention_mask=mask, labels=ids, adapter_names=["q", None])
