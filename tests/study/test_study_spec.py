"""Study specs: the built-in specs and their profiles load; bad input is refused up front with an
error that names the key or value and what is allowed."""

from __future__ import annotations

import pytest

from flora.cli import main
from flora.study import builtin_specs, load_spec, parse_override
from flora.study.data import load_study_data
from flora.study.plan import plan_packs, plan_trials
from study.support import FAST

MINIMAL = """
name = "bad"
[data]
tasks = ["reverse_words", "add_numbers"]
test_tasks = ["delete_word"]
validation_tasks = 1
validation_task_instances = 1
train_instances = 4
validation_instances = 1
seen_instances = 1
unseen_instances = 1
[training]
max_steps = 2
[[experiments]]
name = "x"
method = "lora"
learning_rate = 1e-3
"""


def spec_file(tmp_path, text: str = MINIMAL, **replace: str):
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return str(path)


def test_every_builtin_spec_loads_with_every_profile():
    assert builtin_specs() == ["flora-domains", "peft-instruction"]
    for name in builtin_specs():
        for profile in ("smoke", "cpu", "paper"):
            spec = load_spec(name, profile)
            assert spec.profile == profile and spec.experiments
        assert load_spec(name).profile == "smoke"  # the default: minutes, not days


def test_the_smoke_plan_packs_adapter_trials_together_and_full_fine_tuning_and_zero_shot_alone():
    spec = load_spec("peft-instruction", "smoke")
    trials = plan_trials(spec, load_study_data(spec.data))
    assert len(trials) == 7 and len({t.id for t in trials}) == 7
    assert trials[0].zero_shot and trials[0].experiments == () and trials[0].num_tasks == 4
    shared = next(t for t in trials if t.method == "lora" and t.learning_rate == 1e-2 and t.num_tasks == 4
                  and t.size == 4)  # fmt: skip
    assert shared.experiments == ("learning-rate", "size", "num-tasks")  # one trial, three experiments
    packs = plan_packs(trials, spec)
    assert [sorted(t.method for t in p.trials) for p in packs] == [
        ["zero_shot"], ["ia3", "lora", "lora", "lora", "lora"], ["full"]]  # fmt: skip
    assert shared.config["settings"]["r"] == 4 and shared.config["settings"]["alpha"] == 4.0  # alpha follows r
    assert plan_trials(spec, load_study_data(spec.data))[0].id == trials[0].id  # ids are stable


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        ({'learning_rate = 1e-3': 'learning_rate = 1e-3\nrank = [4]'},
         r"unknown axis or key 'rank' \(axes: method, learning_rate, size, num_tasks, model, seed"),
        ({'method = "lora"': 'method = ["lora", "lorra"]'}, r"unknown method 'lorra' \(expected one of full, lora"),
        ({'learning_rate = 1e-3': 'learning_rate = "fast"'}, r"experiment 'x'.learning_rate: 'fast' is not a number"),
        ({'max_steps = 2': 'max_steps = "2"'}, r"training.max_steps: '2' is not an integer"),
        ({'method = "lora"': 'method = "ia3"\nsize = 4'}, r"method 'ia3' has no size"),
        ({'[training]': '[training]\nepochz = 2'}, r"training: unknown key 'epochz' \(expected one of max_steps"),
        ({'name = "bad"': 'name = "bad"\nseed = 3'}, r"unknown key 'seed' \(expected one of name"),
        ({'learning_rate = 1e-3': 'learning_rate = { ia3 = 1e-3 }'}, r"method 'ia3' is not an axis value"),
        ({'learning_rate = 1e-3': 'learning_rate = -1e-3'}, r"learning_rate: -0.001 is invalid"),
        ({'[training]': '[methods.lora]\nrank = 4\n[training]'}, r"methods.lora: lora has no hyperparameter 'rank'"),
        ({'[training]': '[training]\nlr_scheduler = "cosinus"'}, r"lr_scheduler 'cosinus' is not valid"),
        ({'name = "x"\n': ''}, r"experiments\[0\]: 'name' is missing"),
    ],
)  # fmt: skip
def test_bad_specs_are_refused_with_the_key_and_what_is_allowed(tmp_path, replace, message):
    with pytest.raises(ValueError, match=message):
        load_spec(spec_file(tmp_path, **replace))


def test_bad_data_is_refused_before_anything_runs(tmp_path, capsys, tiny_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "out")
    assert main(["study", "run", "peft-instruction", "--profile", "cpu", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "data.path is not set" in err and "pass --data DIR" in err
    assert main(["study", "run", "peft-instruction", "--profile", "cpu", "--data", str(empty), "--out", out]) == 2
    assert "holds no Super-NaturalInstructions tasks" in capsys.readouterr().err
    assert main(["study", "run", "peft-instruction", "--profile", "cpu", "--data", str(tmp_path / "nope"),
                 "--out", out]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err
    many = spec_file(tmp_path, **{"learning_rate = 1e-3": "learning_rate = 1e-3\nnum_tasks = [5]"})
    assert main(["study", "run", many, "--model", tiny_dir, "--out", out, *FAST]) == 2
    assert "num_tasks=5 is more than the 1 training tasks" in capsys.readouterr().err
    assert main(["study", "run", "peft-instruction", "--profile", "gpu", "--out", out]) == 2
    assert "no profile 'gpu' (profiles: paper, smoke, cpu)" in capsys.readouterr().err
    assert main(["study", "run", "no-such-study", "--out", out]) == 2
    assert "neither a file nor a built-in spec (built-in: flora-domains, peft-instruction)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_the_data_split_is_deterministic_disjoint_and_recorded():
    spec = load_spec("peft-instruction", "smoke")
    data = load_study_data(spec.data)
    record = data.split_record()
    assert [t for t, e in record.items() if e["role"] == "validation"] == data.validation_tasks
    assert len(data.validation_tasks) == 1 and data.validation_tasks[0] not in data.train_tasks
    assert {e["role"] for e in record.values()} == {"train", "validation", "test"}
    for task in data.train_tasks:
        splits = record[task]["splits"]
        assert set(splits) == {"validation", "seen"} and len(splits["validation"]) == 2 == len(splits["seen"])
        assert not set(splits["validation"]) & set(splits["seen"])
        assert record[task]["train"] == 32
    assert [len(record[t]["splits"]["unseen"]) for t in data.test_tasks] == [2, 2]
    again = load_spec("peft-instruction", "smoke", {"data.task_order_seed": 0})
    assert load_study_data(again.data).split_record() == record  # the same spec: the same split
    other = load_study_data(load_spec("peft-instruction", "smoke", {"data.task_order_seed": 1}).data)
    assert other.train_tasks + other.validation_tasks != data.train_tasks + data.validation_tasks


def test_unseen_scores_need_validation_tasks(tmp_path):
    with pytest.raises(ValueError, match=r"data.validation_tasks is 0 but the study has test tasks"):
        load_study_data(load_spec(spec_file(tmp_path, **{"validation_tasks = 1": "validation_tasks = 0"})).data)
    with pytest.raises(ValueError, match=r"data.validation_tasks=2 leaves no training task"):
        load_study_data(load_spec(spec_file(tmp_path, **{"validation_tasks = 1": "validation_tasks = 2"})).data)


def test_the_cpu_profile_plans_resumable_packs_of_at_most_four(tmp_path):
    from flora.data import suite
    from study.support import write_sni_dir

    names = [s.name for s in suite.SPECS]
    data = write_sni_dir(tmp_path / "sni", names[:29], names[29:39], instances=60)
    spec = load_spec("peft-instruction", "cpu", {"data.path": str(data)})
    study = load_study_data(spec.data)
    assert (len(study.train_tasks), len(study.validation_tasks), len(study.test_tasks)) == (24, 5, 10)
    trials = plan_trials(spec, study)
    packs = plan_packs(trials, spec)
    assert len(trials) == 43 and max(len(p.trials) for p in packs) == 4
    methods = {t.method for t in trials}
    assert {"prefix_tuning", "bitfit", "prompt_tuning", "zero_shot"} <= methods
    lora = sorted({t.learning_rate for t in trials if t.method == "lora" and t.size == 8 and t.num_tasks == 24})
    assert lora == [3e-3, 1e-2, 3e-2]  # brackets the previous run's best (1e-2, its grid's top)
    assert {t.seed for t in trials if t.method == "full"} == {42, 127}


def test_overrides_are_read_as_toml():
    assert parse_override("training.max_steps=10") == ("training.max_steps", 10)
    assert parse_override("model.strategy=bmm") == ("model.strategy", "bmm")
    assert parse_override("data.tasks=['a', 'b']") == ("data.tasks", ["a", "b"])
    with pytest.raises(ValueError, match=r"expected SECTION.KEY=VALUE"):
        parse_override("training.max_steps")
    spec = load_spec("peft-instruction", "smoke", {"training.max_steps": 3})
    assert spec.training["max_steps"] == 3
