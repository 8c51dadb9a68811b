"""Task files without a model: few-shot prompts, the generation metrics and their summary,
and task-file errors."""

import json
import math

import pytest

from llama_jax import tasks
from llama_jax.errors import DataError


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


def test_rouge_l_and_exact_match_by_hand():
    # LCS "the cat on the mat" = 5 of 6 words on both sides.
    assert tasks.rouge_l("the cat sat on the mat", "The cat is on the mat") == pytest.approx(5 / 6)
    # LCS "b c": precision 2/3, recall 2/4, F1 = 2 * (1/3) / (7/6) = 4/7.
    assert tasks.rouge_l("A B C", "b c d e") == pytest.approx(4 / 7)
    assert tasks.rouge_l("x y", "y x") == pytest.approx(0.5)
    assert tasks.rouge_l("", "word") == 0.0 and tasks.rouge_l("", "  ") == 1.0
    assert tasks.rouge_l("alpha", "beta") == 0.0
    assert tasks.exact_match(" 42\n", "42") == 1.0
    assert tasks.exact_match("42.", "42") == 0.0
    assert tasks.cut_at_stop(" woof\nQ: next", ["\n", "Q:"]) == " woof"
    assert tasks.cut_at_stop("no stop here", ["\n"]) == "no stop here"


MC = {"type": "multiple_choice", "prompt": "{q}"}
GOOD = {"q": "a", "choices": ["x", "y"], "answer": 1}


@pytest.mark.parametrize(
    "lines,message",
    [
        ([], "is empty"),
        ([{"task": MC}, GOOD, '{"q": "b", '], r":3: not valid JSON"),
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
    ],
)
def test_bad_task_files_are_named_errors(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with pytest.raises(DataError, match=message):
        tasks.load_task(path)


def test_summary_is_the_mean_with_its_standard_error():
    got = tasks.summarize({"acc": [1.0, 0.0, 1.0, 0.0], "one": [0.25]})
    assert got["acc"] == 0.5
    # Sample standard deviation sqrt(1/3) over sqrt(4) examples.
    assert got["acc_stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert got["one"] == 0.25 and got["one_stderr"] is None
