"""Multiple-choice task files: which continuation of a context does the model find most likely?

A task file is JSONL, one question a line (blank lines are skipped)::

    {"context": "In Python, the keyword to define a function is", "choices": [" def", " func"], "answer": 0}

``label`` is accepted for ``answer``. Each choice is scored by the sum of the model's
log-probabilities of its tokens after the context:

    ids    = encode(context) + encode(choice)       # encoded apart, then concatenated
    score  = sum_t log p(choice_t | context, choice_<t)

Encoding the two apart fixes the boundary: the choice's tokens are exactly ``encode(choice)``,
whatever a joint encoding would merge across it (so a leading space belongs in the choice).
No BOS is added, as in the held-out data (``add_special_tokens=False``).
``accuracy`` takes the choice with the highest sum, ``accuracy_norm`` the highest mean per
token (long choices are not penalized for their length). Ties go to the earlier choice.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from puzzle.errors import DataError

log = logging.getLogger(__name__)

TOKENS_PER_BATCH = 512  # padded tokens per forward: bounds the (rows, length, vocab) logits held at once


@dataclass(frozen=True)
class Question:
    """One multiple-choice question of a task file."""

    context: str
    """Text the choices continue."""
    choices: tuple[str, ...]
    """Candidate continuations (at least two)."""
    answer: int
    """Index of the correct choice."""
    where: str
    """``file:line`` (1-based), for messages."""


def _question(data: Any, where: str) -> Question:
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
    context, choices = data.get("context"), data.get("choices")
    answer = data["answer"] if "answer" in data else data.get("label")
    if not isinstance(context, str) or not context:
        raise DataError(f"{where}: 'context' must be a non-empty string")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)):
        raise DataError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: 'answer' (or 'label') must be an integer index into the "
                        f"{len(choices)} choices, got {answer!r}")
    return Question(context=context, choices=tuple(choices), answer=answer, where=where)


def read_task_file(path: str | os.PathLike[str]) -> list[Question]:
    """The questions of one JSONL task file; any malformed line is a :class:`DataError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file {path} does not exist")
    questions = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            questions.append(_question(data, where))
    if not questions:
        raise DataError(f"task file {path} holds no questions")
    return questions


def load_tasks(paths: Sequence[str | os.PathLike[str]]) -> dict[str, list[Question]]:
    """{task name: questions}; the name is the file stem (the path when two stems collide)."""
    stems = [Path(p).stem for p in paths]
    return {(Path(p).stem if stems.count(Path(p).stem) == 1 else str(p)): read_task_file(p) for p in paths}


def _encode_question(tokenizer: Any, question: Question) -> tuple[list[int], list[list[int]]]:
    context = list(tokenizer.encode(question.context, add_special_tokens=False))
    choices = [list(tokenizer.encode(c, add_special_tokens=False)) for c in question.choices]
    if not context or not all(choices):
        raise DataError(f"{question.where}: the context and every choice must encode to at least one token")
    return context, choices


def _groups(encoded: Sequence[tuple[list[int], list[list[int]]]], budget: int) -> Iterator[list[int]]:
    """Consecutive question indices whose padded context batch (and choice batch) fit ``budget`` tokens."""
    group: list[int] = []
    for k in range(len(encoded)):
        trial = [*group, k]
        width = max(len(encoded[i][0]) for i in trial)
        rows = [len(c) for i in trial for c in encoded[i][1]]
        if group and (len(trial) * width > budget or len(rows) * max(rows) > budget):
            yield group
            trial = [k]
        group = trial
    if group:
        yield group


@torch.no_grad()
def _score_group(model: Any, encoded: Sequence[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, int]]]:
    """(summed log-prob, tokens) of every choice of a few questions, with two forwards.

        contexts (Q, Lc), right-padded            -> cache; last real position predicts each first choice token
        choices minus last token (R, T), R = sum C -> against the cache rows of their question, padding masked
    """
    device = next(model.parameters()).device
    contexts = [c for c, _ in encoded]
    lengths = torch.tensor([len(c) for c in contexts])  # (Q,)
    width = int(lengths.max())
    ids = torch.zeros(len(contexts), width, dtype=torch.long)  # (Q, Lc); padding after a row never affects it
    for q, c in enumerate(contexts):
        ids[q, :len(c)] = torch.tensor(c)
    cache = DynamicCache()  # filled by the attention layers (a model without any leaves it empty)
    logits = model(input_ids=ids.to(device), cache=cache, use_cache=True).logits  # (Q, Lc, V)
    last = logits[torch.arange(len(contexts)), lengths.to(logits.device) - 1]  # (Q, V)
    first = F.log_softmax(last.float(), dim=-1).double().cpu()
    rows = [(q, choice) for q, (_, choices) in enumerate(encoded) for choice in choices]
    sums = [float(first[q, choice[0]]) for q, choice in rows]
    steps = max(len(choice) for _, choice in rows) - 1
    if steps:
        rest = torch.zeros(len(rows), steps, dtype=torch.long)  # (R, T): each choice but its last token
        mask = torch.ones(len(rows), width + steps, dtype=torch.long)  # (R, Lc + T)
        positions = torch.zeros(len(rows), steps, dtype=torch.long)  # (R, T): continue each row's own context
        for r, (q, choice) in enumerate(rows):
            rest[r, :len(choice) - 1] = torch.tensor(choice[:-1], dtype=torch.long)
            mask[r, len(contexts[q]):width] = 0  # the padding after a shorter context
            positions[r] = torch.arange(len(contexts[q]), len(contexts[q]) + steps)
        cache.batch_select_indices(torch.tensor([q for q, _ in rows], device=device))  # (Q, ...) -> (R, ...)
        logits = model(input_ids=rest.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device), cache=cache, use_cache=True).logits  # (R, T, V)
        logp = F.log_softmax(logits.float(), dim=-1).double().cpu()  # position j predicts choice token j+1
        for r, (_, choice) in enumerate(rows):
            sums[r] += float(logp[r, torch.arange(len(choice) - 1), torch.tensor(choice[1:], dtype=torch.long)].sum())
    out: list[list[tuple[float, int]]] = [[] for _ in encoded]
    for (q, choice), score in zip(rows, sums):
        out[q].append((score, len(choice)))
    return out


def score_choices(model: Any, tokenizer: Any, questions: Sequence[Question], *,
                  tokens_per_batch: int = TOKENS_PER_BATCH) -> list[list[tuple[float, int]]]:
    """Per question, the (summed log-prob, token count) of each choice after its context.

    Questions are scored in groups of about ``tokens_per_batch`` padded tokens; within a group
    every context runs once and its KV cache is shared by its choices.
    """
    encoded = [_encode_question(tokenizer, q) for q in questions]
    scores: list[list[tuple[float, int]]] = []
    for group in _groups(encoded, tokens_per_batch):
        scores.extend(_score_group(model, [encoded[i] for i in group]))
    return scores


def choice_logprobs(model: Any, tokenizer: Any, question: Question) -> list[tuple[float, int]]:
    """(summed log-prob, token count) of each choice of one question."""
    return score_choices(model, tokenizer, [question])[0]


def evaluate_task(model: Any, tokenizer: Any, questions: Sequence[Question]) -> dict[str, float]:
    """``accuracy``, ``accuracy_norm``, ``questions`` and ``chance`` (mean of 1 / number of choices)."""
    correct = correct_norm = 0
    for q, scores in zip(questions, score_choices(model, tokenizer, questions)):
        best = max(range(len(scores)), key=lambda i: (scores[i][0], -i))
        best_norm = max(range(len(scores)), key=lambda i: (scores[i][0] / scores[i][1], -i))
        correct += best == q.answer
        correct_norm += best_norm == q.answer
    n = len(questions)
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "questions": n,
            "chance": sum(1 / len(q.choices) for q in questions) / n}


TaskFiles = Sequence[str | os.PathLike[str]]


def evaluate_tasks(model: Any, tokenizer: Any, tasks: TaskFiles | Mapping[str, Sequence[Question]]
                   ) -> dict[str, dict[str, float]]:
    """{task name: metrics} for task files (paths) or tasks already read with :func:`load_tasks`."""
    loaded = tasks if isinstance(tasks, Mapping) else load_tasks(tasks)
    results = {}
    for name, questions in loaded.items():
        results[name] = evaluate_task(model, tokenizer, questions)
        log.debug("task %s: accuracy %.3f over %d questions", name, results[name]["accuracy"], len(questions))
    return results
