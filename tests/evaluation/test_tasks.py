"""Multiple-choice tasks on a bigram stub whose log-probs are known exactly, and task-file errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from puzzle.errors import DataError
from puzzle.evaluation import evaluate_tasks, read_task_file
from puzzle.evaluation.tasks import Question, choice_logprobs, score_choices
from puzzle.model import PuzzleConfig, PuzzleForCausalLM

ALPHABET = "xabcd"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tasks" / "python_stdlib_mc.jsonl"


class CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ALPHABET.index(ch) for ch in text]


class BigramLM(torch.nn.Module):
    """p(next | previous token) from a fixed table: logits at position t depend on ids[t] only."""

    def __init__(self) -> None:
        super().__init__()
        rows = {ch: [0.1, 0.4, 0.3, 0.15, 0.05] for ch in ALPHABET}  # x a b c d
        rows["a"] = [0.1, 0.2, 0.5, 0.1, 0.1]  # after "a", "b" is likely
        self.table = torch.nn.Parameter(torch.tensor([rows[ch] for ch in ALPHABET]).log(), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 0, **kwargs) -> SimpleNamespace:
        logits = self.table[input_ids]  # (B, T, V); no state, so the KV cache it is given stays unused
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_choice_logprobs_score_exactly_the_choice_tokens():
    q = Question(context="xa", choices=("b", "ab", "c"), answer=0, where="t:1")
    got = choice_logprobs(BigramLM(), CharTokenizer(), q)
    # "b" after "a": 0.5; "ab" after "a": p(a|a) p(b|a) = 0.2 * 0.5; "c" after "a": 0.1
    expected = [(math.log(0.5), 1), (math.log(0.2) + math.log(0.5), 2), (math.log(0.1), 1)]
    for (s, n), (es, en) in zip(got, expected):
        assert n == en and s == pytest.approx(es, rel=1e-6)


@pytest.mark.parametrize("tokens_per_batch", [512, 8])  # all questions in one batch, or a few per batch
def test_batched_scores_equal_one_plain_forward_per_choice(tokens_per_batch):
    # a heterogeneous runtime model: the contexts' KV cache only fills the GQA layers' slots
    torch.manual_seed(0)
    swiglu = {"kind": "swiglu", "intermediate_size": 48}
    blocks = [{"attention": {"kind": "gqa", "num_key_value_heads": 2}, "ffn": swiglu},
              {"attention": {"kind": "no_op"}, "ffn": swiglu},
              {"attention": {"kind": "gqa", "num_key_value_heads": 1}, "ffn": {"kind": "no_op"}}]
    config = PuzzleConfig(vocab_size=len(ALPHABET), hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=48, block_configs=blocks, initializer_range=0.5)
    model = PuzzleForCausalLM(config).eval()
    questions = [Question(context="xabxc", choices=("d", "abc", "ddab", "ca"), answer=0, where="t:1"),
                 Question(context="b", choices=("a", "cc"), answer=0, where="t:2"),  # shorter: padded
                 Question(context="xxcabd", choices=("b", "d"), answer=0, where="t:3")]  # one-token choices
    tok = CharTokenizer()
    got = score_choices(model, tok, questions, tokens_per_batch=tokens_per_batch)
    for q, scores in zip(questions, got):
        for (score, n), choice in zip(scores, q.choices):
            ids = torch.tensor([tok.encode(q.context + choice)])  # (1, L): characters, no boundary issue
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].double(), -1)
            expected = logp[torch.arange(len(q.context) - 1, ids.shape[1] - 1), ids[0, len(q.context):]].sum()
            assert n == len(choice) and score == pytest.approx(float(expected), abs=1e-5)


def test_accuracy_is_what_the_table_implies(tmp_path):
    path = _write(tmp_path / "toy.jsonl", [
        json.dumps({"context": "x", "choices": ["a", "b"], "answer": 0}),    # a .4 > b .3: right
        json.dumps({"context": "x", "choices": ["c", "a"], "answer": 0}),    # a .4 > c .15: wrong
        "",
        # sum: b .3 > ab .4*.5=.2: wrong; per token: ab sqrt(.2)=.45 > b .3: right
        json.dumps({"context": "x", "choices": ["b", "ab"], "label": 1}),
        # after "a", b .5 > a .2: right (scoring from "x" instead would pick a: the boundary matters)
        json.dumps({"context": "xa", "choices": ["a", "b"], "answer": 1}),
    ])
    results = evaluate_tasks(BigramLM(), CharTokenizer(), [path])
    assert results == {"toy": {"accuracy": 2 / 4, "accuracy_norm": 3 / 4, "questions": 4, "chance": 0.5}}


@pytest.mark.parametrize("line,message", [
    ('{"context": "x", "choices": ["a", "b"], "answer": 0', "not valid JSON"),
    ('{"context": "x", "answer": 0}', "'choices' must be a list"),
    ('{"context": "x", "choices": ["a", "b"], "answer": 2}', "'answer' \\(or 'label'\\) must be"),
    ('{"context": "x", "choices": ["a", "b"], "answer": true}', "'answer' \\(or 'label'\\) must be"),
    ('{"context": "", "choices": ["a", "b"], "answer": 0}', "'context' must be"),
    ('["x"]', "expected a JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"context": "x", "choices": ["a", "b"], "answer": 0})
    path = _write(tmp_path / "bad.jsonl", [good, "", line])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: {message}"):
        read_task_file(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_task_file(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="holds no questions"):
        read_task_file(_write(tmp_path / "empty.jsonl", ["", "  "]))


def test_example_task_file_is_well_formed():
    questions = read_task_file(EXAMPLE)
    assert len(questions) >= 20
    assert {q.answer for q in questions} == {0, 1, 2, 3}  # answers not all in one position
