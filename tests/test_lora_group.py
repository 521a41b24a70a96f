"""LoRA of sibling layers that read the same input (q/k/v, gate/up), computed together: which layers
group, and that every strategy gives each row exactly what its adapter merged into the base gives."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

from flora import AdapterModel, LoraConfig
from flora.kernels.lowrank import lowrank_bmm, lowrank_loop, lowrank_segmented, lowrank_stacked
from flora.methods.batch import AdapterBatch, GroupRun
from flora.methods.slot_tables import GroupTables, SlotWrites

CONFIGS = {  # adapter -> config: mixed ranks, and adapters that leave some siblings unadapted
    "llama": {"r4": LoraConfig(r=4, alpha=8),
              "r2": LoraConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
              "r6": LoraConfig(r=6, alpha=3, target_modules=["k_proj", "gate_proj"])},
    "gpt2": {"r4": LoraConfig(r=4, alpha=8), "r2": LoraConfig(r=2, alpha=2, target_modules=["c_attn"]),
             "r6": LoraConfig(r=6, alpha=3, target_modules=["c_fc", "c_proj"])},
}  # fmt: skip
CONFIGS["qwen2"] = CONFIGS["llama"]


def _randomized(model: AdapterModel, seed: int = 0) -> AdapterModel:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in model.list_adapters():
            for key, parameter in model.adapter_parameters(name).items():
                if "lora_B" in key:
                    parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def _model() -> AdapterModel:
    model = AdapterModel(tiny_model("llama"))
    for name, config in CONFIGS["llama"].items():
        model.add_adapter(name, config)
    return _randomized(model)


def _group_of(model: AdapterModel, module: str):
    return model.base_model.get_submodule(module).banks["lora"].group


def test_siblings_that_read_the_same_input_share_one_group():
    model = _model()
    attention = "model.layers.0.self_attn"
    mlp = "model.layers.0.mlp"
    qkv = _group_of(model, f"{attention}.q_proj")
    assert _group_of(model, f"{attention}.k_proj") is qkv and _group_of(model, f"{attention}.v_proj") is qkv
    assert len(qkv.banks) == 3
    gate_up = _group_of(model, f"{mlp}.gate_proj")
    assert _group_of(model, f"{mlp}.up_proj") is gate_up and len(gate_up.banks) == 2
    assert _group_of(model, f"{attention}.o_proj").banks == [
        model.base_model.get_submodule(f"{attention}.o_proj").banks["lora"]
    ]
    assert _group_of(model, "model.layers.1.self_attn.q_proj") is not qkv  # another block, another group
    model.add_adapter("r3", LoraConfig(r=3))  # the same members: the groups (and what they keep) stay
    assert _group_of(model, f"{attention}.q_proj") is qkv and _group_of(model, f"{mlp}.up_proj") is gate_up
    model.delete_adapter("r3")
    model.delete_adapter("r4")  # o_proj loses its only LoRA adapter; q/k/v still group
    assert "lora" not in getattr(model.base_model.get_submodule(f"{attention}.o_proj"), "banks", {})
    assert len(_group_of(model, f"{attention}.q_proj").banks) == 3


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])  # qwen2: q/k/v with biases; gpt2: Conv1D, no siblings
@pytest.mark.parametrize("strategy", ["auto", "bmm", "loop", "segmented", "stacked"])
@pytest.mark.parametrize(
    "names",
    [
        ["r4", "r2", "r6", None],  # every row its own adapter, rows already in adapter order
        ["r6", None, "r4", "r6", "r2", "r4"],  # interleaved: a sort and a scatter
        ["r2", "r2", "r2"],  # one adapter for the whole batch
    ],
)
def test_each_row_equals_its_adapter_merged(arch, strategy, names):
    model = AdapterModel(tiny_model(arch))
    for name, config in CONFIGS[arch].items():
        model.add_adapter(name, config)
    _randomized(model)
    model.strategy = strategy
    ids = torch.randint(1, VOCAB, (len(names), 7), generator=torch.Generator().manual_seed(3))
    _assert_each_row_equals_its_adapter_merged(model, ids, names)


def _merged_logits(model: AdapterModel, ids: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    """Each row's logits alone through its adapter merged into the base (the base model for ``None``)."""
    with torch.no_grad():
        return torch.stack([(model.merge_adapter(name) if name else model.base_model)(ids[row : row + 1]).logits[0]
                            for row, name in enumerate(names)])  # fmt: skip


def _assert_each_row_equals_its_adapter_merged(model: AdapterModel, ids: torch.Tensor, names: list[str | None]):
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
    expected = _merged_logits(model, ids, names)
    for row, name in enumerate(names):
        assert torch.allclose(mixed[row], expected[row], atol=2e-5, rtol=1e-4), (row, name)


def test_generation_decodes_with_the_group_as_each_row_alone():
    model = _model()
    ids = torch.randint(1, VOCAB, (4, 6), generator=torch.Generator().manual_seed(5))
    names = ["r4", "r2", "r6", None]
    together = model.generate(ids, adapter_names=names, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    for row, name in enumerate(names):
        alone = model.generate(
            ids[row : row + 1], adapter_names=[name], max_new_tokens=6, min_new_tokens=6, do_sample=False
        )
        assert torch.equal(together[row], alone[0])


@pytest.mark.parametrize("read_only", [False, True])
def test_generate_writes_the_row_tables_once_for_its_prompts_and_steps(read_only):
    """`generate`'s one-token steps read the tables its prompts wrote (`flora.methods.slot_tables`), so a
    routing writes its rows once, not twice; its tokens stay each row's own."""
    model = _model()
    model.strategy, model.adapters_read_only = "bmm", read_only
    one_token, prompts = model.runtime.tables
    ids = torch.randint(1, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    for names in (["r4", "r2", "r6"], ["r6", None, "r4"]):
        writes = prompts.count
        together = model.generate(ids, adapter_names=names, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert (prompts.count - writes, one_token.count) == (1, 0)
        for row, name in enumerate(names):
            alone = model.generate(ids[row : row + 1], adapter_names=[name], max_new_tokens=4, min_new_tokens=4,
                                   do_sample=False)  # fmt: skip
            assert torch.equal(together[row], alone[0])


def test_kept_row_factors_follow_weight_updates_reloads_and_removals(tmp_path):
    """`bmm` keeps each adapter's row of the per-row tables across routings; an in-place update (an
    optimizer step), an adapter loaded again under the same name, and a removal must all be seen."""
    model = _model()
    model.strategy = "bmm"
    ids = torch.randint(1, VOCAB, (3, 5), generator=torch.Generator().manual_seed(7))

    def check(names: list[str | None]) -> None:
        _assert_each_row_equals_its_adapter_merged(model, ids, names)

    names = ["r4", "r2", "r4"]
    check(names)
    for other in (["r2", "r2", "r2"], ["r2", "r6", None], ["r6", "r4", "r2"]):  # other members and ranks per routing
        check(other)
    model.save_adapter("r2", tmp_path / "r2")
    with torch.no_grad():
        for name in ("r4", "r2"):
            for key, parameter in model.adapter_parameters(name).items():
                parameter.add_(0.1 if "lora_B" in key else 0.0)
    check(names)
    model.delete_adapter("r2")
    model.load_adapter(tmp_path / "r2", adapter_name="r2")  # the weights from before the update
    check(names)
    model.to(torch.float64)  # new storage, no new versions
    ids = ids.clone()
    check(names)
    model.to(torch.float32)
    model.delete_adapter("r4")
    check(["r2", None, "r2"])
    assert all("r4" not in group._factors for group in {id(b.group): b.group for b in _lora_banks(model)}.values())


@pytest.mark.parametrize("strategy", ["bmm", "loop", "segmented", "stacked"])
@pytest.mark.parametrize("fused", [True, False])
def test_kept_row_factors_follow_optimizer_steps_fused_or_not(strategy, fused):
    """A fused optimizer (transformers' default ``adamw_torch_fused``) writes the adapters in place
    without counting their tensors' versions: evaluating between training steps (a study's learning
    curves) must still read each step's weights, not those kept from the evaluation before it."""
    model = _model()
    model.strategy = strategy
    ids = torch.randint(1, VOCAB, (3, 5), generator=torch.Generator().manual_seed(9))
    names = ["r4", "r2", None]
    parameters = [p for name in ("r4", "r2") for p in model.adapter_parameters(name).values()]
    optimizer = torch.optim.AdamW(parameters, lr=0.05, fused=fused, foreach=None if fused else False)
    for _ in range(2):
        _assert_each_row_equals_its_adapter_merged(model, ids, names)  # keeps the factors it read
        model.train()
        model(ids, adapter_names=names, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
    _assert_each_row_equals_its_adapter_merged(model, ids, names)


def test_read_only_adapters_keep_row_factors_through_loads_and_removals(tmp_path):
    """With `AdapterModel.adapters_read_only` (a server's promise) kept factors are reused without
    reading version counters: adapters loaded again, removed and added are still seen; an in-place
    update, which breaks the promise, is not, until the flag is cleared."""
    model = _model()
    model.strategy = "bmm"
    model.adapters_read_only = True
    ids = torch.randint(1, VOCAB, (3, 5), generator=torch.Generator().manual_seed(8))
    names = ["r4", "r2", "r4"]
    _assert_each_row_equals_its_adapter_merged(model, ids, names)
    model.save_adapter("r2", tmp_path / "r2")
    model.delete_adapter("r2")
    model.add_adapter("r2", LoraConfig(r=3, alpha=6))  # a new adapter under the old name, another rank
    with torch.no_grad():  # before its first use: nothing of it is kept yet
        model.adapter_parameters("r2")[next(k for k in model.adapter_parameters("r2") if "lora_B" in k)].fill_(0.2)
    _assert_each_row_equals_its_adapter_merged(model, ids, names)
    model.delete_adapter("r2")
    model.load_adapter(tmp_path / "r2", adapter_name="r2")
    _assert_each_row_equals_its_adapter_merged(model, ids, ["r2", None, "r4"])

    with torch.no_grad():
        before = model(ids, adapter_names=names).logits
        model.adapter_parameters("r4")[next(k for k in model.adapter_parameters("r4") if "lora_B" in k)].add_(0.5)
        assert torch.equal(model(ids, adapter_names=names).logits, before)  # kept: the update is not read
    model.adapters_read_only = False
    _assert_each_row_equals_its_adapter_merged(model, ids, names)


def test_kept_tables_serve_routings_that_alternate_across_inference_and_no_grad_modes():
    """`bmm`'s per-row tables outlive a routing (`SlotTables`): routings of other sizes and adapters
    that take turns, in inference mode and in no_grad mode, each still get their own rows."""
    model = _model()
    model.strategy = "bmm"
    batches = {
        "a": (["r4", "r2", "r6", None], torch.randint(1, VOCAB, (4, 5), generator=torch.Generator().manual_seed(1))),
        "b": (["r2", "r2", None, "r4", "r6", "r6", "r4", "r2", "r4"],
              torch.randint(1, VOCAB, (9, 5), generator=torch.Generator().manual_seed(2))),
        "c": (["r6", "r2", "r6", "r4"], torch.randint(1, VOCAB, (4, 5), generator=torch.Generator().manual_seed(3))),
    }  # fmt: skip
    routings = {key: model.routing(names) for key, (names, _) in batches.items()}
    expected = {key: _merged_logits(model, ids, names) for key, (names, ids) in batches.items()}
    for key, mode in [("a", torch.inference_mode), ("b", torch.no_grad), ("a", torch.no_grad),
                      ("c", torch.inference_mode), ("a", torch.inference_mode), ("b", torch.no_grad)]:  # fmt: skip
        with mode(), model.routed(routings[key]):
            logits = model.base_model(batches[key][1]).logits
        assert torch.allclose(logits, expected[key], atol=2e-5, rtol=1e-4), key


def test_kept_tables_write_a_changed_row_once_for_every_group(monkeypatch):
    """A server's routings differ from the last in a row or two (`flora.methods.slot_tables`): each
    changed row is written once for all the groups together, the others not at all; rows that
    grow the batch past its slots, and layouts that change with the batch's ranks, still give each
    row its own adapter."""
    model = _model()
    model.strategy = "bmm"
    model.adapters_read_only = True
    writes, runs = [], []  # (group tables, row) collected for writing; writes run
    collect, run = GroupTables.collect, SlotWrites.run
    monkeypatch.setattr(GroupTables, "collect", lambda self, r, *a: writes.append((self, r)) or collect(self, r, *a))
    monkeypatch.setattr(SlotWrites, "run", lambda self: runs.append(self) or run(self))
    ids = torch.randint(1, VOCAB, (12, 5), generator=torch.Generator().manual_seed(4))
    groups = len({id(bank.group) for bank in _lora_banks(model)})
    steps = [  # (rows, rows written)
        (["r4", "r6", "r2"], None),  # first routing: every group's tables are made
        (["r4", "r6", "r4"], 1),  # one row changed, the same layout
        (["r4", "r6", "r4"], 0),  # a new routing with the same rows
        (["r4", "r6"], 0),  # a row left from the end
        (["r4", "r6", "r4", None], 1),  # its slot still holds r4; a base-model row joined (zeros)
        (["r4", "r6", "r2", "r2"], 2),
        (["r2", "r2"], None),  # smaller ranks: other layouts, whose new tables hold only these rows
        (["r2", "r2", "r2", "r2"], 2),  # so the slots that held r2 in the others are written again
        (["r6", "r2", "r4", None, "r2", "r6", "r4", "r4", "r2", "r6", None, "r4"], None),  # past 8 slots
        (["r6", "r2", "r4"], 0),
    ]
    for names, written in steps:
        writes.clear(), runs.clear()
        routing = model.routing(names, carry=True)
        with torch.inference_mode(), model.routed(routing):
            logits = model.base_model(ids[: len(names)]).logits
        expected = _merged_logits(model, ids[: len(names)], names)
        assert torch.allclose(logits, expected, atol=2e-5, rtol=1e-4), names
        if written is not None:
            rows = {r for _, r in writes}
            assert len(rows) == written and len(runs) == 1, names  # all the changed rows' copies at once
            if "r4" in names:  # each of them in every group's tables
                assert all(sum(row == r for _, row in writes) == groups for r in rows)


def _lora_banks(model: AdapterModel):
    return [m.banks["lora"] for m in model.base_model.modules() if "lora" in getattr(m, "banks", {})]


def test_a_group_computes_once_per_input_and_again_for_another():
    calls = []

    def kernel(batch, x):
        calls.append(x)
        return [x * 2, x * 3]

    first, second = object(), object()
    run = GroupRun(kernel, {id(first): 0, id(second): 1})
    batch = AdapterBatch(("a", "b"), torch.device("cpu"))
    x = torch.ones(2, 1, 4)
    assert torch.equal(run.delta(first, batch, x), 2 * x) and torch.equal(run.delta(second, batch, x), 3 * x)
    assert len(calls) == 1 and run.input is None  # both read it: nothing is held
    y = torch.full((2, 1, 4), 5.0)
    assert torch.equal(run.delta(second, batch, y), 3 * y)  # a member meeting a new input computes again
    assert torch.equal(run.delta(first, batch, x), 2 * x) and len(calls) == 3


def test_training_with_dropout_gives_each_layer_its_own_mask():
    model = AdapterModel(tiny_model("llama"))
    model.add_adapter("d", LoraConfig(r=4, dropout=0.5))
    group = _group_of(model, "model.layers.0.self_attn.q_proj")
    routing = model.routing(["d", "d"])
    model.eval()
    assert group.computes_together(routing)
    model.train()
    assert not group.computes_together(routing)


@pytest.mark.parametrize("tokens", [1, 5])
def test_strategies_of_the_kernels_agree(tokens):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, tokens, 8, generator=generator)
    adapters = [(torch.randn(3, 8, generator=generator), torch.randn(3, 6, generator=generator)) for _ in range(3)]
    rows = [[0, 1], [2], [3, 4]]  # rows already in adapter order
    expected = torch.cat([x[r] @ a.T @ b for r, (a, b) in zip(rows, adapters, strict=True)])
    (loop,) = lowrank_loop(x, [(torch.tensor(r), a, [(0, 3, b)]) for r, (a, b) in zip(rows, adapters, strict=True)])
    segments = [(r[0], r[-1] + 1, a, [(0, 3, b)]) for r, (a, b) in zip(rows, adapters, strict=True)]
    (in_order,) = lowrank_segmented(x, None, segments)
    a_rows = torch.stack([adapters[i][0] for i, r in enumerate(rows) for _ in r])
    b_rows = torch.stack([adapters[i][1] for i, r in enumerate(rows) for _ in r])
    (bmm,) = lowrank_bmm(x, a_rows, [(0, 3, b_rows)])
    row_mask = torch.zeros(5, 1, 9)
    for i, r in enumerate(rows):
        row_mask[r, :, 3 * i : 3 * i + 3] = 1
    a_stack, b_stack = torch.cat([a for a, _ in adapters]), torch.cat([b for _, b in adapters])
    (stacked,) = lowrank_stacked(x, a_stack, row_mask, [(0, 9, b_stack)])
    for result in (loop, in_order, bmm, stacked):
        assert torch.allclose(result, expected, atol=1e-5)
    # Two layers sharing the input: ranks 0:3 feed the first output, 3:6 the second (a doubled B).
    first, second = lowrank_bmm(x, torch.cat([a_rows, a_rows], dim=1), [(0, 3, b_rows), (3, 6, 2 * b_rows)])
    assert torch.allclose(first, expected, atol=1e-5) and torch.allclose(second, 2 * expected, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 4])
def test_loop_and_segmented_scatter_each_output_to_its_rows(tokens):
    """Two outputs reading ranks 0:3 and 3:5 of ``x Aᵀ``, adapters on rows out of order, and rows
    without an adapter (zeros in every output)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, tokens, 8, generator=generator)
    adapters = {
        name: (torch.randn(5, 8, generator=generator),
               [(0, 3, torch.randn(3, 6, generator=generator)), (3, 5, torch.randn(2, 4, generator=generator))])
        for name in ("p", "q")
    }  # fmt: skip
    rows = {"p": [3, 0], "q": [2]}
    expected = [torch.zeros(5, tokens, 6), torch.zeros(5, tokens, 4)]
    for name, (a, b_parts) in adapters.items():
        for output, (start, stop, b) in zip(expected, b_parts, strict=True):
            output[rows[name]] = (x[rows[name]] @ a.T)[..., start:stop] @ b
    loop = lowrank_loop(x, [(torch.tensor(rows[name]), *adapters[name]) for name in ("p", "q")])
    segmented = lowrank_segmented(x, torch.tensor([3, 0, 2]), [(0, 2, *adapters["p"]), (2, 3, *adapters["q"])])
    for result in (loop, segmented):
        assert len(result) == 2
        for got, want in zip(result, expected, strict=True):
            assert torch.allclose(got, want, atol=1e-5)


def test_adapters_added_to_a_model_in_eval_mode_apply_no_dropout():
    model = AdapterModel(tiny_model("llama"))  # load_base and tiny_model give models in eval mode
    assert not model.training
    model.add_adapter("d", LoraConfig(r=4, dropout=0.5))
    _randomized(model)
    assert not any(module.training for module in model.modules())
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first, second = (model(ids, adapter_names=["d", "d"]).logits for _ in range(2))
        merged = model.merge_adapter("d")(ids).logits
    assert torch.equal(first, second) and torch.allclose(first, merged, atol=1e-5)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids, adapter_names=["d", "d"]).logits, first)  # training: dropout


def test_bfloat16_tables_change_only_the_adapted_rows_by_bfloat16_rounding():
    """`AdapterModel.adapter_dtype` bfloat16 (``flora serve --adapter-dtype``): the per-row tables hold each
    adapter's factors in bfloat16 and its delta is computed in bfloat16, the base path stays float32: a
    row without an adapter is unchanged, an adapted row moves by bfloat16's rounding of its adapter's
    effect (not more), and float32 tables again give the float32 logits exactly."""
    model = _model().eval()
    model.strategy = "bmm"
    ids = torch.randint(1, VOCAB, (4, 7), generator=torch.Generator().manual_seed(3))
    names = ["r4", "r2", "r6", None]
    with torch.no_grad():
        full = model(ids, adapter_names=names).logits
        base = model.base_model(ids).logits
        model.adapter_dtype = torch.bfloat16
        half = model(ids, adapter_names=names).logits
        model.adapter_dtype = None
        again = model(ids, adapter_names=names).logits
    assert torch.equal(half[3], full[3]) and torch.equal(again, full)
    for row in range(3):
        effect, moved = (full[row] - base[row]).abs().max(), (half[row] - full[row]).abs().max()
        assert 0 < moved <= 0.05 * effect, (row, float(moved), float(effect))
    with pytest.raises(ValueError, match="torch.int8"):
        model.adapter_dtype = torch.int8
