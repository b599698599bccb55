"""The ``generate`` task: MT-Bench first-turn answers under a recipe, scored against the dense answers.

The model (an instruct decoder, SmolLM2-135M-Instruct by default) answers the first turn of every
MT-Bench question (``questions.jsonl``: ``question_id``, ``category``, ``turns``) with its chat
template, greedy, up to ``max_new_tokens`` new tokens, in left-padded batches of at most
``batch_size`` prompts of similar length (:func:`length_batches`). The same answers of the dense
model are the reference (computed once and cached as JSON, see :func:`answers_cache_path`).
Metrics, all on the tokenizer's token ids of the answers (the stop token that ended an answer is not
part of it):

- ``rouge_l_f1`` (the task's value): mean over prompts of ROUGE-L F1, the longest common subsequence
  of the two answers' tokens against their lengths (1.0 when both are empty);
- ``match32``: fraction of prompts whose first 32 generated tokens equal the dense answer's (an
  answer that stopped earlier is compared as it is); None (n/a) when fewer than 32 new tokens were asked;
- ``prefix_agreement``: mean over prompts of the common prefix's share of the longer answer (1.0: the
  same answer), and ``prefix_tokens_agreed``: the mean length of that common prefix, in tokens;
- ``mean_length`` / ``dense_mean_length``: mean answer length in tokens.

Under a KV budget (``kv=``) a batch shares one budget: the fraction is of the batch's longest prompt,
at most ``LENGTH_SPREAD`` (10 %) longer than any other prompt of the batch; ``batch_size=1`` gives
each prompt exactly its own budget. The dense reference is cached per batch size (batches are the
same for every recipe), so dense against dense is exactly 1.0.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dynaprune.errors import DynapruneError
from dynaprune.eval.result import TaskResult, write_json_atomic
from dynaprune.runtime.attention import RunContext
from dynaprune.runtime.generate import default_stop_tokens, encode_prompts, generate

MATCH_PREFIX = 32
LENGTH_SPREAD = 1.1  # the longest prompt of a batch is at most 10 % longer than its shortest
ANSWERS_FORMAT = "dynaprune.answers/1"


@dataclass(frozen=True)
class Question:
    """One MT-Bench question: its id, category and first-turn prompt."""

    question_id: int | str
    category: str
    prompt: str


def load_questions(path: str | Path, max_examples: int | None = None) -> list[Question]:
    """The first turns of the MT-Bench questions in ``path`` (JSON lines), in file order, at most
    ``max_examples``. Raises DynapruneError for a missing, empty or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise DynapruneError(f"{path}: no such questions file")
    if max_examples is not None and max_examples <= 0:
        raise DynapruneError(f"max_examples must be > 0 (got {max_examples})")
    questions = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DynapruneError(f"{path}:{i}: not JSON ({e.msg})") from None
        turns = row.get("turns") if isinstance(row, dict) else None
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise DynapruneError(f"{path}:{i}: needs a 'turns' list whose first turn is non-empty text")
        questions.append(Question(row.get("question_id", i), str(row.get("category", "")), turns[0]))
    if not questions:
        raise DynapruneError(f"{path}: no questions in the file")
    return questions[:max_examples] if max_examples is not None else questions


def lcs_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a) * len(b)) DP)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f1(candidate: list[int], reference: list[int]) -> float:
    """ROUGE-L F1 of ``candidate`` against ``reference``: 2PR / (P + R) with P = LCS / len(candidate),
    R = LCS / len(reference). Two empty sequences agree (1.0); one empty one does not (0.0)."""
    if not candidate and not reference:
        return 1.0
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def agreement(answers: list[list[int]], reference: list[list[int]], prefix: int = MATCH_PREFIX,
              max_new_tokens: int | None = None) -> dict[str, Any]:
    """The agreement metrics of ``answers`` against ``reference`` (same prompts, same order); ``match{prefix}``
    is None when answers of at most ``max_new_tokens`` < ``prefix`` tokens cannot show ``prefix`` tokens."""
    if len(answers) != len(reference) or not answers:
        raise DynapruneError(f"agreement needs as many answers as references (got {len(answers)}, {len(reference)})")
    n = len(answers)
    rouge = [rouge_l_f1(a, r) for a, r in zip(answers, reference, strict=True)]
    return {
        "rouge_l_f1": sum(rouge) / n,
        f"match{prefix}": None if max_new_tokens is not None and max_new_tokens < prefix else
        sum(a[:prefix] == r[:prefix] for a, r in zip(answers, reference, strict=True)) / n,
        "prefix_agreement": sum(common_prefix(a, r) / max(len(a), len(r)) if a or r else 1.0
                                for a, r in zip(answers, reference, strict=True)) / n,
        "prefix_tokens_agreed": sum(common_prefix(a, r) for a, r in zip(answers, reference, strict=True)) / n,
        "mean_length": sum(len(a) for a in answers) / n,
        "dense_mean_length": sum(len(r) for r in reference) / n,
        "per_prompt_rouge_l": rouge,
    }


def model_fingerprint(model: Any) -> str:
    """A short hash of the model's name, config and first weights (tells apart two models of one name)."""
    config = getattr(model, "config", None)
    config_text = json.dumps(config.to_hf() if hasattr(config, "to_hf") else repr(config), sort_keys=True,
                             default=str)
    first = next(model.parameters()).detach().flatten()[:256].float().cpu().numpy().tobytes()
    h = hashlib.sha1(getattr(model, "name", "").encode() + config_text.encode() + first)
    return h.hexdigest()[:16]


def answers_cache_path(model: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> Path:
    """Where the dense answers for this (model, prompt set, max_new_tokens, batch size) are cached:
    ``$DYNAPRUNE_CACHE/answers/`` (default ``~/.cache/dynaprune/answers/``), one JSON file per key."""
    from dynaprune.models.registry import cache_dir

    prompt_hash = hashlib.sha1(json.dumps(prompts).encode()).hexdigest()[:16]
    key = hashlib.sha1(json.dumps([model_fingerprint(model), prompt_hash, max_new_tokens, batch_size,
                                   LENGTH_SPREAD, ANSWERS_FORMAT]).encode()).hexdigest()[:16]
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in getattr(model, "name", "model"))
    return cache_dir() / "answers" / f"{name}-{key}.json"


def _strip_stop(ids: list[int], stops: set[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in stops else ids


def length_batches(lengths: list[int], batch_size: int, spread: float = LENGTH_SPREAD) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches: sorted by length (ties by index), a new batch
    whenever one holds ``batch_size`` items or the next length exceeds ``spread`` x its shortest."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        if not batches or len(batches[-1]) >= batch_size or lengths[i] > spread * lengths[batches[-1][0]]:
            batches.append([])
        batches[-1].append(i)
    return batches


def generate_answers(
    model: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    ctx_factory: Callable[[], RunContext | None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Greedy answers (token ids, stop token removed) to ``prompts`` (token ids), in their order; one
    fresh context from ``ctx_factory`` per batch (None: dense); batches from :func:`length_batches`."""
    stops = default_stop_tokens(model.tokenizer)
    answers: list[list[int]] = [[] for _ in prompts]
    done = 0
    for rows in length_batches([len(p) for p in prompts], batch_size):
        ctx = ctx_factory() if ctx_factory is not None else None
        out = generate(model, [prompts[i] for i in rows], max_new_tokens=max_new_tokens, stop_tokens=stops,
                       ctx=ctx)
        for i, ids in zip(rows, out.new_ids, strict=True):
            answers[i] = _strip_stop(ids, stops)
        done += len(rows)
        if progress is not None:
            progress(done, len(prompts))
    return answers


def dense_answers(
    model: Any, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int
) -> tuple[list[list[int]], bool, float]:
    """The dense answers to ``prompts``, from the cache when there (else generated and cached,
    written atomically); returns (answers, whether they came from the cache, seconds spent)."""
    path = answers_cache_path(model, prompts, max_new_tokens, batch_size)
    t0 = time.perf_counter()
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            answers = data["answers"]
            if (data.get("format") == ANSWERS_FORMAT and data.get("prompts") == prompts
                    and isinstance(answers, list) and len(answers) == len(prompts)):
                return [list(map(int, a)) for a in answers], True, time.perf_counter() - t0
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or stale: compute again and overwrite
    answers = generate_answers(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    write_json_atomic(path, {
        "format": ANSWERS_FORMAT, "model": getattr(model, "name", ""), "fingerprint": model_fingerprint(model),
        "max_new_tokens": max_new_tokens, "batch_size": batch_size, "prompts": prompts, "answers": answers,
    })
    return answers, False, time.perf_counter() - t0


def evaluate_generate(
    model: Any,
    questions_path: str | Path,
    *,
    max_new_tokens: int = 128,
    max_examples: int | None = None,
    batch_size: int = 16,
    ctx_factory: Callable[[], RunContext | None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TaskResult:
    """MT-Bench first-turn answers of ``model`` under the contexts of ``ctx_factory`` (one per batch;
    None: dense), scored against the cached dense answers (see the module docstring)."""
    if max_new_tokens <= 0:
        raise DynapruneError(f"max_new_tokens must be > 0 (got {max_new_tokens})")
    if batch_size <= 0:
        raise DynapruneError(f"batch_size must be > 0 (got {batch_size})")
    questions = load_questions(questions_path, max_examples)
    if model.tokenizer is None:
        raise DynapruneError(f"model {getattr(model, 'name', '?')} has no tokenizer")
    prompts, _ = encode_prompts(model, [q.prompt for q in questions], chat=True)
    limit = model.config.max_positions
    if max(len(p) for p in prompts) + max_new_tokens > limit:
        raise DynapruneError(f"a prompt + {max_new_tokens} new tokens exceeds the model's {limit} positions")
    with torch.inference_mode():
        reference, cached, reference_seconds = dense_answers(model, prompts, max_new_tokens=max_new_tokens,
                                                             batch_size=batch_size)
        t0 = time.perf_counter()
        answers = generate_answers(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   ctx_factory=ctx_factory, progress=progress)
        seconds = time.perf_counter() - t0
    scores = agreement(answers, reference, max_new_tokens=max_new_tokens)
    per_prompt = scores.pop("per_prompt_rouge_l")
    generated = sum(len(a) for a in answers)
    return TaskResult(
        model=getattr(model, "name", type(model).__name__),
        task="generate",
        data=str(questions_path),
        n=len(questions),
        metric={"name": "rouge_l_f1", "value": scores["rouge_l_f1"], **scores},
        cost={},
        seconds=seconds,
        extra={
            "max_new_tokens": max_new_tokens, "batch_size": batch_size, "rouge_on": "token ids",
            "batches": len(length_batches([len(p) for p in prompts], batch_size)),
            "match_prefix": MATCH_PREFIX, "reference_cached": cached,
            "reference_seconds": round(reference_seconds, 3),
            "seconds_per_token": seconds / max(1, generated),
            "per_prompt": [{"question_id": q.question_id, "category": q.category, "rouge_l_f1": r,
                            "length": len(a), "dense_length": len(d)}
                           for q, r, a, d in zip(questions, per_prompt, answers, reference, strict=True)],
        },
    )
