"""Packed training (`flora.training.packing`): trials trained together as adapters of one model in one
mixed batch give the same adapters as each trial trained alone with `flora.train`; a diverging
trial is dropped without touching its pack-mates; what cannot pack is refused."""

from __future__ import annotations

import pytest
import torch

from flora.training import TrainConfig, train
from flora.training.packing import member_batches, train_packed

BASE = dict(tasks=["reverse_words", "add_numbers"], suite_train=10, batch_size=4, max_steps=6, dtype="float64",
            strategy="loop", progress=False, save_steps=0, warmup_ratio=0.2, weight_decay=0.01)  # fmt: skip


def configs(tiny_dir: str) -> dict[str, TrainConfig]:
    """Four jobs of different methods, ranks, adapter layouts, batch sizes, learning rates and seeds."""
    common = dict(BASE, model=tiny_dir)
    return {
        "a": TrainConfig(**common, method="lora", settings={"r": 2, "alpha": 4}, learning_rate=1e-2, seed=1),
        "b": TrainConfig(**common, method="lora", settings={"r": 4}, learning_rate=3e-3, seed=2, adapter_per="task"),
        "c": TrainConfig(**{**common, "batch_size": 3}, method="ia3", learning_rate=5e-2, seed=3),
        "d": TrainConfig(**common, method="prompt_tuning", settings={"num_virtual_tokens": 3}, learning_rate=1e-2,
                         seed=4),
    }  # fmt: skip


def max_difference(packed_model, prefix: str, solo_model, names) -> float:
    worst = 0.0
    for name in names:
        packed = packed_model.adapter_parameters(f"{prefix}-{name}")
        for key, tensor in solo_model.adapter_parameters(name).items():
            worst = max(worst, (packed[key] - tensor).abs().max().item())
    return worst


def test_member_batches_follow_trainers_seeded_epochs():
    batches = list(zip(range(5), member_batches(10, 4, seed=7), strict=False))
    first = torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()
    second = torch.randperm(10, generator=torch.Generator().manual_seed(8)).tolist()
    assert [b for _, b in batches] == [first[0:4], first[4:8], first[8:10], second[0:4], second[4:8]]


def test_packed_trials_equal_each_trial_trained_alone(tiny_dir, tmp_path):
    jobs = configs(tiny_dir)
    packed = train_packed(jobs, tmp_path / "pack", micro_batch_size=5)
    assert packed.steps == 6 and set(packed.members) == set(jobs)
    for key, config in jobs.items():
        solo = train(config, output_dir=str(tmp_path / f"solo-{key}"))
        member = packed.members[key]
        assert member.adapters == {name: f"{key}-{name}" for name in solo.adapters}
        assert max_difference(packed.model, key, solo.model, solo.adapters) < 1e-10, key
        assert len(member.losses) == 6 and member.diverged_step is None
        assert len(set(member.losses)) > 1
        assert member.trainable_parameters == sum(
            p.numel() for name in solo.adapters for p in solo.model.adapter_parameters(name).values()
        )


def test_the_packed_adapters_moved_from_their_initialisation(tiny_dir, tmp_path):
    jobs = configs(tiny_dir)
    packed = train_packed({"a": jobs["a"], "c": jobs["c"]}, tmp_path / "pack")
    lora_b = [p for k, p in packed.model.adapter_parameters("a-default").items() if "lora_B" in k]
    ia3 = list(packed.model.adapter_parameters("c-default").values())
    assert min(p.abs().max().item() for p in lora_b) > 1e-4  # LoRA B starts at zero
    assert min((p - 1).abs().max().item() for p in ia3) > 1e-4  # IA3 starts at ones


def test_a_diverging_member_is_dropped_and_its_pack_mates_train_as_alone(tiny_dir, tmp_path):
    jobs = configs(tiny_dir)
    jobs = {"a": jobs["a"], "nan": TrainConfig(**dict(BASE, model=tiny_dir), method="lora", settings={"r": 2},
                                               learning_rate=1e30, seed=5), "c": jobs["c"]}  # fmt: skip
    packed = train_packed(jobs, tmp_path / "pack")
    diverged = packed.members["nan"]
    assert diverged.diverged_step is not None and 1 < diverged.diverged_step <= 6
    assert "NaN or infinite at step" in diverged.error and len(diverged.losses) == diverged.diverged_step - 1
    for key in ("a", "c"):
        solo = train(jobs[key], output_dir=str(tmp_path / f"solo-{key}"))
        assert packed.members[key].diverged_step is None and len(packed.members[key].losses) == 6
        assert max_difference(packed.model, key, solo.model, solo.adapters) < 1e-10, key
    nan_weights = packed.model.adapter_parameters("nan-default").values()
    assert all(torch.isfinite(p).all() for p in nan_weights)  # the NaN update was never applied


def test_what_cannot_pack_is_refused(tiny_dir, tmp_path):
    common = dict(BASE, model=tiny_dir)
    full = TrainConfig(**common, method="full", learning_rate=1e-4)
    lora = TrainConfig(**common, method="lora")
    with pytest.raises(ValueError, match=r"member 'f' is full fine-tuning: .* trains alone"):
        train_packed({"f": full, "l": lora}, tmp_path / "x")
    with pytest.raises(ValueError, match=r"members of a pack share .*lr_scheduler: 'linear' for 'l', 'cosine' for 'c'"):
        train_packed({"l": lora, "c": TrainConfig(**{**common, "lr_scheduler": "cosine"})}, tmp_path / "x")
    with pytest.raises(ValueError, match=r"same number of optimizer steps \(got \{'l': 6, 'm': 7\}\)"):
        train_packed({"l": lora, "m": TrainConfig(**{**common, "max_steps": 7})}, tmp_path / "x")
    with pytest.raises(ValueError, match=r"pack member key 'a-b' is invalid"):
        train_packed({"a-b": lora}, tmp_path / "x")


def test_full_fine_tuning_alone_equals_flora_train(tiny_dir, tmp_path):
    config = TrainConfig(**dict(BASE, model=tiny_dir), method="full", learning_rate=1e-3, seed=3)
    packed = train_packed({"f": config}, tmp_path / "pack")
    solo = train(config, output_dir=str(tmp_path / "solo"))
    packed_state, solo_state = packed.model.base_model.state_dict(), solo.model.base_model.state_dict()
    assert max((packed_state[k] - solo_state[k]).abs().max().item() for k in solo_state) < 1e-10
    assert packed.members["f"].trainable_parameters == sum(p.numel() for p in solo.model.base_model.parameters())


class Evaluations:
    """A caller's state checkpointed with a pack: the steps and members ``on_evaluate`` saw."""

    def __init__(self) -> None:
        self.seen: list[list] = []

    def __call__(self, step: int, keys: list[str]) -> None:
        self.seen.append([step, keys])

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]


class Killed(Exception):
    pass


def resumable_jobs(tiny_dir: str) -> dict[str, TrainConfig]:
    jobs = configs(tiny_dir)
    diverging = TrainConfig(**dict(BASE, model=tiny_dir), method="lora", settings={"r": 2}, learning_rate=1e30, seed=5)
    return {"a": jobs["a"], "c": jobs["c"], "d": jobs["d"], "nan": diverging}


def same_weights(model, other, name: str) -> bool:
    mine, theirs = model.adapter_parameters(name), other.adapter_parameters(name)
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def run_pack(jobs, out, kill_at: int | None = None, resume: bool = False):
    evaluations, steps = Evaluations(), []

    def on_step(step, total, losses):
        steps.append(step)
        if step == kill_at:
            raise Killed(step)

    result = train_packed(jobs, out, eval_steps=[0, 2, 4, 6], on_evaluate=evaluations, checkpoint_steps=[2, 4, 6],
                          on_step=on_step, resume=resume, extra_state=evaluations)  # fmt: skip
    return result, evaluations.seen, steps


def test_a_pack_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tiny_dir, tmp_path):
    jobs = resumable_jobs(tiny_dir)
    whole, whole_seen, _ = run_pack(jobs, tmp_path / "whole")
    diverged = whole.members["nan"].diverged_step
    assert diverged is not None and diverged <= 4  # dropped before the checkpoint the run resumes from
    with pytest.raises(Killed):
        run_pack(jobs, tmp_path / "killed", kill_at=5)
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-4"]  # the latest only

    resumed, resumed_seen, steps = run_pack(jobs, tmp_path / "killed", resume=True)
    assert steps == [5, 6]  # steps 1-4 came from the checkpoint
    assert resumed.steps == whole.steps == 6
    assert resumed_seen == whole_seen and [s for s, _ in whole_seen] == [0, 2, 4, 6]
    for key in jobs:
        assert resumed.members[key] == whole.members[key], key
        for name in whole.members[key].adapters.values():
            assert same_weights(resumed.model, whole.model, name), name

    again, again_seen, steps = run_pack(jobs, tmp_path / "killed", resume=True)  # finished: nothing to train
    assert steps == [] and again_seen == whole_seen and again.members == whole.members
    assert all(same_weights(again.model, whole.model, f"{key}-default") for key in jobs)


def test_resuming_a_checkpoint_of_other_members_is_refused(tiny_dir, tmp_path):
    jobs = configs(tiny_dir)
    train_packed({"a": jobs["a"]}, tmp_path / "pack", checkpoint_steps=[2])
    changed = {"a": TrainConfig(**{**dict(BASE, model=tiny_dir), "learning_rate": 5e-3}, method="lora", seed=1)}
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint-2' was written by another pack \(members that "
                                         r"differ: a\)"):  # fmt: skip
        train_packed(changed, tmp_path / "pack", resume=True)
    fresh = train_packed(changed, tmp_path / "pack", resume=False)  # without resume the checkpoint is not read
    assert fresh.steps == 6 and len(fresh.members["a"].losses) == 6


def test_after_bfloat16_training_the_model_runs_in_its_own_dtype(tiny_dir, tmp_path):
    """Trainer leaves accelerate's autocast wrapper on ``forward``; after training, the model's
    outputs are its class's float32 forward's, not bfloat16 autocast's."""
    settings = {**BASE, "dtype": "float32", "max_steps": 2, "strategy": "bmm", "device": "cpu"}
    config = TrainConfig(**settings, model=tiny_dir, method="lora", learning_rate=1e-2, training_args={"bf16": True})
    for model in (
        train_packed({"a": config}, tmp_path / "pack").model,
        train(config, output_dir=str(tmp_path / "solo")).model,
    ):
        assert "_original_forward" not in model.__dict__ and not hasattr(model.forward, "__wrapped__")
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        names = model.list_adapters()[:1]
        with torch.no_grad():
            called = model(ids, adapter_names=names).logits
            own = type(model).forward(model, ids, adapter_names=names).logits
        assert called.dtype == torch.float32 and torch.equal(called, own)
