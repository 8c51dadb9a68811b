"""Task files without a model: few-shot prompts, the generation metrics a spec asks for,
their summary, and task-file errors."""

import json
import math
import pathlib

import pytest

from llama_jax.errors import DataError
from llama_jax.evals import task_metrics, tasks


def _write_task(path, spec, examples):
    lines = [{"task": spec}, *examples]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_few_shot_prompts_follow_the_template(tmp_path):
    spec = {
        "type": "multiple_choice",
        "description": "Pick one.\n",
        "prompt": "Q: {q}\nA:",
        "target": " {choice}!",
        "fewshot_separator": "\n---\n",
        "choices": ["yes", "no"],
        "num_fewshot": 2,
    }
    examples = [{"q": "q0", "answer": 0}, {"q": "q1", "answer": 1}, {"q": "q2", "answer": "yes"}]
    task = tasks.load_task(_write_task(tmp_path / "t.jsonl", spec, examples))
    assert task.context(1, 0) == "Pick one.\nQ: q1\nA:"
    assert task.context(1, 2) == "Pick one.\nQ: q0\nA: yes!\n---\nQ: q2\nA: yes!\n---\nQ: q1\nA:"
    assert task.context(0, 2) == "Pick one.\nQ: q1\nA: no!\n---\nQ: q2\nA: yes!\n---\nQ: q0\nA:"

    # Lines marked _fewshot are only shots; the draw is seeded and never the scored one.
    pool = [{"q": f"s{i}", "answer": i % 2, "_fewshot": True} for i in range(6)]
    task = tasks.load_task(_write_task(tmp_path / "p.jsonl", spec, examples + pool))
    assert len(task.examples) == 3 and len(task.fewshot) == 6
    prompt = task.context(2, 2)
    assert prompt == tasks.load_task(tmp_path / "p.jsonl").context(2, 2)
    shots = [line for line in prompt.split("\n") if line.startswith("Q: s")]
    assert len(shots) == 2 and shots == sorted(shots)
    plain = tasks.load_task(_write_task(tmp_path / "q.jsonl", spec, examples * 4))
    for i in range(len(plain.examples)):
        assert all(s is not plain.examples[i] for s in plain.shots(i, 5))


def test_the_example_task_files_load():
    directory = pathlib.Path(__file__).parent.parent / "configs" / "tasks"
    loaded = {p.name: tasks.load_task(p) for p in sorted(directory.glob("*.jsonl"))}
    assert len(loaded) >= 3
    numbers = loaded["number_words_translate.jsonl"]
    assert [m.name for m in numbers.spec.metrics] == ["exact_match", "bleu", "chrf", "rougeL"]
    assert numbers.context(0, 3).startswith("Write each number in English words.\n\nNumber: ")


def test_cut_at_stop():
    assert tasks.cut_at_stop(" woof\nQ: next", ["\n", "Q:"]) == " woof"
    assert tasks.cut_at_stop("Q: x\n", ["\n", "Q:"]) == ""
    assert tasks.cut_at_stop("no stop here", ["\n"]) == "no stop here"


def test_generation_metrics_come_from_the_spec(tmp_path):
    spec = {"type": "generate", "prompt": "{q}"}
    task = tasks.load_task(_write_task(tmp_path / "g.jsonl", spec, [{"q": "a", "answer": "b"}]))
    assert [m.name for m in task.spec.metrics] == list(task_metrics.DEFAULT_METRICS)
    chosen = [{"metric": "exact_match", "ignore_case": True}, "bleu", "chrf++"]
    task = tasks.load_task(
        _write_task(tmp_path / "g.jsonl", {**spec, "metrics": chosen}, [{"q": "a", "answer": "b"}])
    )
    assert [(m.name, m.kwargs) for m in task.spec.metrics] == [
        ("exact_match", {"ignore_case": True}),
        ("bleu", {}),
        ("chrf++", {}),
    ]
    assert [m.corpus for m in task.spec.metrics] == [False, True, True]


MC = {"type": "multiple_choice", "prompt": "{q}"}
GOOD = {"q": "a", "choices": ["x", "y"], "answer": 1}
GEN = {"type": "generate", "prompt": "{q}"}
GEN_EX = {"q": "a", "answer": "b"}


@pytest.mark.parametrize(
    "lines,message",
    [
        ([], "is empty"),
        ([{"task": MC}, GOOD, '{"q": "b", '], r":3: not a valid JSON line"),
        ([GOOD], r":1: the first line must be"),
        ([{"task": {**MC, "type": "mc"}}, GOOD], r"task type 'mc' is unknown"),
        ([{"task": {**MC, "prompts": "x"}}, GOOD], r"unknown task spec keys \['prompts'\]"),
        ([{"task": MC}, GOOD, {"z": "b", "choices": ["x"], "answer": 0}], r":3: .*uses \{q\}"),
        ([{"task": MC}, {**GOOD, "answer": 2}], r"answer index 2 is out of range for 2"),
        ([{"task": MC}, {**GOOD, "answer": "z"}], r"answer 'z' is not one of"),
        ([{"task": MC}, {**GOOD, "choices": []}], r"choices is \[\]; expected a non-empty"),
        ([{"task": {**MC, "prompt": "{q} {choice}"}}, GOOD], r"exists only in the target"),
        ([{"task": {**MC, "num_fewshot": 3}}, GOOD, GOOD], r"num_fewshot=3 but only 1"),
        ([{"task": MC}], "no examples to score"),
        ([{"task": {"type": "generate", "prompt": "{q}"}}, {"q": "a"}], r"no field 'answer'"),
        ([{"task": {**GEN, "metrics": ["bleu", "bleu"]}}, GEN_EX], r"\['bleu'\] are listed more"),
        ([{"task": {**GEN, "metrics": []}}, GEN_EX], r"metrics is \[\]; expected a non-empty"),
        ([{"task": {**GEN, "metrics": ["rouge_l"]}}, GEN_EX], r":1: metric 'rouge_l' is unknown"),
        ([{"task": {**MC, "metrics": ["bleu"]}}, GOOD], r"metrics apply to generate tasks"),
    ],
)
def test_bad_task_files_are_named_errors(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with pytest.raises(DataError, match=message):
        tasks.load_task(path)


def test_summary_is_the_mean_with_its_standard_error():
    got = task_metrics.summarize({"acc": [1.0, 0.0, 1.0, 0.0], "one": [0.25]})
    assert got["acc"] == 0.5
    # Sample standard deviation sqrt(1/3) over sqrt(4) examples.
    assert got["acc_stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert got["one"] == 0.25 and got["one_stderr"] is None
