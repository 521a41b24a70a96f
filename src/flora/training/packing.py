"""Packed training: several training jobs as adapters of one model, trained together in one mixed batch.

A *pack* is a set of jobs (`TrainConfig` s, its *members*) that share the base model and the
schedule (`SHARED_SETTINGS` and the number of optimizer steps). Each member keeps its own method
and hyperparameters (rank, size, ...), data, adapters (one, or one per task / category / group),
learning rate, batch size and seed. `train_packed` adds every member's adapters to one
`AdapterModel`, each initialised from its member's seed as `flora.training.train` does, and trains
them all at once with `transformers.Trainer` (`PackedTrainer`): the batch of an optimizer step is
the concatenation of every member's own batch for that step, cut into micro-batches of
``micro_batch_size`` rows (of any members) for the forward and backward passes.

Each member trains as it would alone (`train` with the same config):

- data: member m's batches are those `train` draws: for epoch e a permutation of its n_m examples,
  ``torch.randperm(n_m)`` from a generator seeded ``seed_m + e`` (Trainer's seedable sampler), cut
  into batches of ``batch_size_m`` (the last batch of an epoch may be smaller);
- loss: ``L = Σ_m L_m`` with ``L_m = (1 / N_m) Σ_{response tokens of m in the step} CE``, where
  ``N_m`` counts member m's response tokens over the whole step (all micro-batches). The
  parameters θ_m of member m only see its own rows, so ``∂L/∂θ_m = ∂L_m/∂θ_m``: its solo gradient
  (the logits are computed only at the positions where some row has a label, ``logits_to_keep``);
- clipping: each member's gradient is clipped to ``max_grad_norm`` by its own global norm;
- learning rate: one optimizer parameter group per adapter at its member's rate, all scaled by the
  one schedule (same shape, same length).

The adapters equal those of the solo runs up to float rounding (rows are batched differently),
when dropout is 0: dropout masks are drawn for the whole batch. A member whose loss or gradient
becomes NaN or infinite is dropped from the pack before that step's update (its update skipped,
its rows left out of later batches, `MemberResult.error` says when); the others go on unchanged.
Full fine-tuning changes the base model every member shares, so it trains alone (a pack of one).
One process only: scale packs out as separate jobs (e.g. `flora.study`'s Ray backend).

Checkpoints and resume: after each of ``checkpoint_steps`` a `FloraTrainer` checkpoint is written
into the output directory (only the latest is kept). Besides the adapters, optimizer, scheduler and
RNG state it holds ``pack_state.json``: each member's identity, losses and divergence, the members
still training, and the caller's ``extra_state`` (its ``state_dict()``, JSON). ``resume=True`` continues
from the latest checkpoint there (Trainer skips the batches already taken), restoring all of that:
the result equals that of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint

from flora.data import IGNORE_INDEX, collate_examples
from flora.model import AdapterModel
from flora.training.config import TrainConfig
from flora.training.data import encode_training_examples, resolve_job_data
from flora.training.hyperparameters import FULL
from flora.training.outputs import trainer_state, write_json
from flora.training.response_loss import response_losses
from flora.training.run import training_arguments
from flora.training.trainer import FloraTrainer
from flora.training.weights import load_checkpoint_weights

# Settings every member of a pack shares (and the number of optimizer steps).
SHARED_SETTINGS = (
    "model", "dtype", "device", "strategy", "lr_scheduler", "warmup_ratio", "warmup_steps", "weight_decay",
    "max_grad_norm", "training_args",
)  # fmt: skip
MEMBER_KEY = re.compile(r"[A-Za-z0-9_]+")  # a member's adapters are named "<key>-<adapter>"
PACK_STATE_FILE = "pack_state.json"  # in each checkpoint: the members' state and the caller's


class Stateful(Protocol):
    """What a caller checkpoints with a pack (``extra_state``): a JSON-able state and its restore."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def shared_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings of ``config`` that the members of one pack must share (besides their step count)."""
    return {name: getattr(config, name) for name in SHARED_SETTINGS}


@dataclass
class MemberResult:
    """What one member of a pack trained, and how it went.

    ``adapters`` maps the member's own adapter names (``"default"``, a task, a category) to their
    names in the packed model (``"<key>-<name>"``); ``losses`` has one entry per optimizer step it
    took (the mean over its response tokens); ``diverged_step`` and ``error`` are set when its loss
    or gradient became NaN or infinite (it was dropped before that step's update).
    """

    key: str
    method: str
    adapters: dict[str, str]
    tasks: dict[str, list[str]]
    examples: int
    trainable_parameters: int
    losses: list[float] = field(default_factory=list)
    diverged_step: int | None = None
    error: str | None = None


@dataclass
class PackResult:
    """The trained model (every member's adapters in it), each member's result, and Trainer's metrics."""

    model: AdapterModel
    members: dict[str, MemberResult]
    steps: int
    metrics: dict[str, Any]


@dataclass
class _Member:
    key: str
    config: TrainConfig
    result: MemberResult
    parameters: list[nn.Parameter]
    offset: int
    size: int


def member_batches(size: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """The example indices of a job's optimizer steps, as `train` draws them: per epoch e,
    ``torch.randperm(size)`` from a generator seeded ``seed + e``, in batches of ``batch_size``
    (the last of an epoch may be smaller); endless."""
    epoch = 0
    while True:
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, size, batch_size):
            yield order[start : start + batch_size]
        epoch += 1


class PackBatchSampler:
    """Per optimizer step, the dataset indices of every member's batch for that step, member after member.

    ``members``: ``(offset, size, batch_size, seed)`` of each member's examples in the packed dataset.
    """

    def __init__(self, members: Sequence[tuple[int, int, int, int]], steps: int) -> None:
        self.members = list(members)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        streams = [(offset, member_batches(size, batch, seed)) for offset, size, batch, seed in self.members]
        for _ in range(self.steps):
            yield [offset + index for offset, stream in streams for index in next(stream)]


class PackCollator:
    """One optimizer step's rows -> ``{"micro_batches": [batch, ...]}``: rows of active members only,
    longest first (rows of similar length share a micro-batch: less padding), cut into micro-batches
    of ``micro_batch_size`` rows (all in one when None), each right-padded
    (`flora.data.collate_examples`) with ``adapter_names`` and ``members`` (one per row). A member's
    loss is normalised over the whole step, so how its rows are spread over micro-batches changes
    nothing but float rounding."""

    def __init__(self, pad_token_id: int, micro_batch_size: int | None, active: Collection[str]) -> None:
        self.pad_token_id = pad_token_id
        self.micro_batch_size = micro_batch_size
        self.active = active

    def __call__(self, items: list[dict]) -> dict[str, list[dict]]:
        rows = sorted((item for item in items if item["member"] in self.active), key=lambda r: -len(r["input_ids"]))
        size = self.micro_batch_size or max(len(rows), 1)
        chunks = []
        for start in range(0, len(rows), size):
            part = rows[start : start + size]
            batch = collate_examples(part, self.pad_token_id)
            batch["adapter_names"] = [row["adapter_name"] for row in part]
            batch["members"] = [row["member"] for row in part]
            chunks.append(batch)
        return {"micro_batches": chunks}


class PackedTrainer(FloraTrainer):
    """`FloraTrainer` for a pack: per-member batches, loss normalisation, clipping and NaN drop.

    Trainer sees one batch per optimizer step (``{"micro_batches": [...]}``, no gradient
    accumulation of its own); `training_step` runs the micro-batches. ``learning_rates`` (an
    adapter's rate, ``adapter_lr``) puts every adapter in its own parameter group.
    """

    def __init__(self, *args, members: Sequence[_Member], batch_sampler: PackBatchSampler, active: set[str],
                 extra_state: Stateful | None = None, **kwargs) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = True  # each member's loss is its mean over the whole step
        self.members = {member.key: member for member in members}
        self.batch_sampler = batch_sampler
        self.active = active
        self.member_tokens: dict[str, Tensor] = {}
        self.member_loss: dict[str, Tensor | float] = dict.fromkeys(self.members, 0.0)
        self.extra_state = extra_state
        self.remove_callback(PrinterCallback)  # no log dicts on stdout; the progress bar (if any) stays

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            write_json(Path(output_dir or self.args.output_dir) / PACK_STATE_FILE, self.pack_state())

    def pack_state(self) -> dict[str, Any]:
        """What `restore` needs besides Trainer's checkpoint (JSON)."""
        members = {key: {"identity": _identity(m.config), "losses": m.result.losses,
                         "diverged_step": m.result.diverged_step, "error": m.result.error}
                   for key, m in self.members.items()}  # fmt: skip
        extra = self.extra_state.state_dict() if self.extra_state is not None else None
        return {"members": members, "active": sorted(self.active), "extra": extra}

    def restore(self, checkpoint: str) -> None:
        """The members' losses, divergence and activity and the caller's state as ``checkpoint`` saved them;
        raises when it was written by another pack."""
        state = json.loads((Path(checkpoint) / PACK_STATE_FILE).read_text())
        saved = {key: member["identity"] for key, member in state["members"].items()}
        current = {key: _identity(m.config) for key, m in self.members.items()}
        if saved != current:
            changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ValueError(f"checkpoint {checkpoint!r} was written by another pack (members that differ: "
                             f"{', '.join(changed)}); remove it or train into another directory")  # fmt: skip
        for key, member in state["members"].items():
            result = self.members[key].result
            result.losses, result.diverged_step = member["losses"], member["diverged_step"]
            result.error = member["error"]
        self.active.intersection_update(state["active"])  # in place: the collator reads the same set
        if self.extra_state is not None:
            self.extra_state.load_state_dict(state["extra"])

    def get_train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_sampler=self.batch_sampler, collate_fn=self.data_collator)

    def training_step(self, model, inputs, num_items_in_batch=None):
        chunks = inputs["micro_batches"]
        tokens: dict[str, Tensor] = {}
        for chunk in chunks:
            per_row = (chunk["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
            for row, key in enumerate(chunk["members"]):
                tokens[key] = tokens.get(key, 0) + per_row[row]
        self.member_tokens = tokens
        total = torch.zeros((), dtype=torch.float32, device=self.args.device)
        for chunk in chunks:
            total = total + super().training_step(model, chunk).to(total.dtype)
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        members = inputs.pop("members")
        labels = inputs.pop("labels")
        per_row, _, outputs = response_losses(model, inputs, labels)
        loss = per_row.new_zeros(())
        for key in dict.fromkeys(members):
            rows = torch.tensor([i for i, m in enumerate(members) if m == key], device=per_row.device)
            part = per_row.index_select(0, rows).sum() / self.member_tokens[key].to(per_row.device)
            self.member_loss[key] = self.member_loss[key] + part.detach()
            # A non-finite part stays out of the sum (its member is dropped at the step's end), so
            # the step's logged loss stays finite; NaN gradients can only reach that member's adapters.
            loss = loss + torch.where(torch.isfinite(part), part, torch.zeros_like(part))
        return (loss, outputs) if return_outputs else loss

    def _clip_grad_norm(self, model):
        """Each active member's gradient clipped by its own norm; returns the norm over all of them."""
        norms = []
        for key in sorted(self.active):
            grads = [p for p in self.members[key].parameters if p.grad is not None]
            if grads:
                norms.append(torch.nn.utils.clip_grad_norm_(grads, self.args.max_grad_norm).to(torch.float32))
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())

    def finish_step(self, step: int) -> None:
        """Before the update of ``step``: record each active member's loss, drop those that are not finite."""
        for key in sorted(self.active):
            member = self.members[key]
            loss = float(self.member_loss[key])
            self.member_loss[key] = 0.0
            grads = [p.grad for p in member.parameters if p.grad is not None]
            finite = math.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads)
            if finite:
                member.result.losses.append(loss)
                continue
            self.active.discard(key)
            for parameter in member.parameters:
                parameter.grad = None  # no update for it, now or later
            member.result.diverged_step = step
            member.result.error = (
                f"the loss or a gradient became NaN or infinite at step {step} (learning rate "
                f"{self._member_rate(member):.3g}); training of this member stopped before that step's update"
            )

    def _member_rate(self, member: _Member) -> float:
        names = set(member.result.adapters.values())
        for group in self.optimizer.param_groups:
            if group.get("adapter") in names or (not names and "adapter" not in group):
                return float(group["lr"])
        return float("nan")


def _identity(config: TrainConfig) -> dict[str, Any]:
    """The settings that decide what a member trains, as JSON reads them back."""
    return json.loads(json.dumps(config.identity(), default=str))


class _PackCallback(TrainerCallback):
    """Per step: member losses and NaN drops (before the update), then ``on_step``, the evaluations
    (step 0, when asked for: before the first step) and the checkpoints."""

    def __init__(self, eval_steps: Collection[int], checkpoint_steps: Collection[int], on_evaluate, on_step) -> None:
        self.trainer: PackedTrainer | None = None
        self.eval_steps = set(eval_steps)
        self.checkpoint_steps = set(checkpoint_steps)
        self.on_evaluate = on_evaluate
        self.on_step = on_step

    def on_train_begin(self, args, state, control, **kwargs):
        if self.on_evaluate is not None and 0 in self.eval_steps and state.global_step == 0:  # as initialised
            self.on_evaluate(0, sorted(self.trainer.active))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.finish_step(state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        trainer, step = self.trainer, state.global_step
        if self.on_step is not None:
            losses = {key: trainer.members[key].result.losses[-1] for key in sorted(trainer.active)}
            self.on_step(step, state.max_steps, losses)
        if self.on_evaluate is not None and step in self.eval_steps and trainer.active:
            self.on_evaluate(step, sorted(trainer.active))
        if not trainer.active:
            control.should_training_stop = True
        control.should_save = step in self.checkpoint_steps


def train_packed(
    members: Mapping[str, TrainConfig],
    output_dir: str | os.PathLike,
    *,
    micro_batch_size: int | None = None,
    model: AdapterModel | None = None,
    eval_steps: Collection[int] | Callable[[int], Collection[int]] = (),
    on_evaluate: Callable[[int, list[str]], None] | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    checkpoint_steps: Collection[int] | Callable[[int], Collection[int]] = (),
    resume: bool = False,
    extra_state: Stateful | None = None,
    progress: bool = False,
) -> PackResult:
    """Train the jobs ``members`` (``{key: TrainConfig}``) together, as adapters of one model.

    Args:
        members: the jobs, by key (letters, digits, ``_``); member ``k``'s adapter ``a`` is named
            ``"k-a"`` in the model. They must share `SHARED_SETTINGS` and their number of steps.
            Only their training settings count (not ``output_dir``, checkpoints or logging).
        output_dir: Trainer's working directory: the checkpoints, if any.
        micro_batch_size: rows per forward pass over the whole pack (None: a step's rows at once).
        model: the base model to add the adapters to (default: ``members``' model, loaded).
        eval_steps, on_evaluate: after each of these optimizer steps (or of ``eval_steps(steps)``,
            given the pack's number of steps; 0: before the first), ``on_evaluate(step, keys)``
            with the keys of the members still training (the model holds their weights of that step).
        on_step: after every optimizer step, ``on_step(step, steps, {key: its loss})`` (active members).
        checkpoint_steps: after each of these steps (or of ``checkpoint_steps(steps)``), after its
            evaluation, a checkpoint in ``output_dir`` (the latest kept; see the module docstring).
        resume: continue from the latest checkpoint in ``output_dir``, if there is one; raises when
            it belongs to other members.
        extra_state: the caller's state saved with each checkpoint and restored on resume.
        progress: Trainer's progress bar.

    Returns a `PackResult`: the model with every member's adapters (in eval mode), and per member
    its adapters, tasks, example count, trainable parameters, per-step losses and divergence.
    """
    if not members:
        raise ValueError("train_packed got no members (expected at least one TrainConfig)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("packed training runs in one process (under torchrun, train each job with flora.train)")
    configs = {str(key): config.normalized() for key, config in members.items()}
    for key in configs:
        if not MEMBER_KEY.fullmatch(key):
            raise ValueError(f"pack member key {key!r} is invalid (expected letters, digits and '_')")
    first_key, first = next(iter(configs.items()))
    for key, config in configs.items():
        differences = [f"{name}: {value!r} for {first_key!r}, {getattr(config, name)!r} for {key!r}"
                       for name, value in shared_settings(first).items() if getattr(config, name) != value]  # fmt: skip
        if differences:
            raise ValueError(f"members of a pack share {', '.join(SHARED_SETTINGS)}; {'; '.join(differences)}")
    full = [key for key, config in configs.items() if config.method == FULL]
    if full and len(configs) > 1:
        raise ValueError(f"member {full[0]!r} is full fine-tuning: it changes the base model the others share, "
                         f"so it trains alone (a pack of one)")  # fmt: skip

    resolved = {key: resolve_job_data(config) for key, config in configs.items()}  # bad input before the model
    if model is None:
        model = AdapterModel.from_pretrained(first.model, dtype=getattr(torch, first.dtype), strategy=first.strategy)
    tokenizer = model.tokenizer
    model_max = getattr(model.config, "max_position_embeddings", None)

    import transformers

    packed: list[_Member] = []
    items: list[dict] = []
    adapter_lr: dict[str, float] = {}
    for key, config in configs.items():
        loaded, adapter_of, groups, adapter_configs = resolved[key]
        transformers.set_seed(config.seed)
        if config.method == FULL:
            for parameter in model.base_model.parameters():
                parameter.requires_grad_(True)
        names = {name: f"{key}-{name}" for name in adapter_configs}
        for name, adapter_config in adapter_configs.items():
            model.add_adapter(names[name], adapter_config)
            adapter_lr[names[name]] = config.adapter_lr.get(name, config.learning_rate)
        routed = [names[a] if a is not None else None for a in adapter_of]
        dataset, _, _ = encode_training_examples(config, loaded, routed, tokenizer, config.max_length or model_max)
        if config.method == FULL:
            parameters = [p for p in model.base_model.parameters() if p.requires_grad]
        else:
            parameters = [p for name in names.values() for p in model.adapter_parameters(name).values()]
        result = MemberResult(key, config.method, names, dict(groups), len(dataset),
                              sum(p.numel() for p in parameters if p.requires_grad))  # fmt: skip
        packed.append(_Member(key, config, result, parameters, len(items), len(dataset)))
        items += [{**item, "member": key} for item in dataset.items]

    steps = {m.key: m.config.steps_for(m.size) for m in packed}
    if len(set(steps.values())) > 1:
        raise ValueError(f"members of a pack take the same number of optimizer steps (got {steps})")
    total_steps = steps[first_key]
    schedule = dataclasses.replace(first, output_dir=str(output_dir), max_steps=total_steps, save_steps=0,
                                   save_total_limit=1, progress=progress)  # fmt: skip
    args = training_arguments(schedule, micro_batch=1, accumulation=1, multiple=True)
    active = {m.key for m in packed}
    sampler = PackBatchSampler([(m.offset, m.size, m.config.batch_size, m.config.seed) for m in packed], total_steps)
    at = [when(total_steps) if callable(when) else when for when in (eval_steps, checkpoint_steps)]
    callback = _PackCallback(*at, on_evaluate, on_step)
    trainer = PackedTrainer(
        model=model,
        args=args,
        train_dataset=items,
        data_collator=PackCollator(tokenizer.pad_token_id, micro_batch_size, active),
        adapter_lr=None if full else adapter_lr,
        full=bool(full),
        callbacks=[callback],
        members=packed,
        batch_sampler=sampler,
        active=active,
        extra_state=extra_state,
    )
    callback.trainer = trainer
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    checkpoint = get_last_checkpoint(str(output_dir)) if resume else None
    if checkpoint is not None:
        trainer.restore(checkpoint)
    step = int(trainer_state(checkpoint).get("global_step", 0))
    if checkpoint is not None and (step >= total_steps or not active):  # nothing left to train: the weights
        load_checkpoint_weights(model, checkpoint, bool(full))
        metrics: dict[str, Any] = {}
    else:
        metrics = dict(trainer.train(resume_from_checkpoint=checkpoint).metrics)
        step = trainer.state.global_step
    model.eval()
    return PackResult(model, {m.key: m.result for m in packed}, step, metrics)
