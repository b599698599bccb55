"""Pruning pictures for the report (SpAtten Fig. 22/23): which tokens of a few real inputs survive each
layer. ``dynaprune report --pictures`` (and the demo) draws ``DEFAULT_PICTURES``:

- MiniLM on real sentences: two from STS-B dev and one from the SST-2 dev set (the first of at least
  ``min_words`` words, so the choice is fixed by the data);
- SmolLM2 on one long generation: the dense model answers the first MT-Bench prompt (chat template,
  greedy), then prompt + answer run as one sequence under token pruning. The answer is cached
  (``$DYNAPRUNE_CACHE/generations``), so a second report does not generate again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dynaprune.errors import DynapruneError


@dataclass(frozen=True)
class PictureSpec:
    model: str
    recipe: str
    source: str  # "sts" | "sst2" (a sentence of that data set) or "generate" (MT-Bench answer)
    min_words: int = 12  # sentences: the first with at least this many words
    skip: int = 0  # sentences: take the (skip+1)-th such sentence
    max_new_tokens: int = 96  # generate: answer length


@dataclass(frozen=True)
class Picture:
    caption: str
    path: Path


DEFAULT_PICTURES = (
    PictureSpec("minilm-l6", "token=0.5", "sts", min_words=12),
    PictureSpec("minilm-l6", "token=0.4,head=0.8", "sts", min_words=20),
    PictureSpec("minilm-l6", "token=0.4", "sst2", min_words=18),
    PictureSpec("smollm2-135m", "token=0.3", "generate"),
)


def pick_sentence(source: str, min_words: int, skip: int = 0) -> str:
    """The (skip+1)-th sentence of the task's default data with at least ``min_words`` words."""
    from dynaprune.eval.data import load_labeled_text, load_sts
    from dynaprune.paths import default_data

    data = default_data(source).get("data")
    if data is None or not Path(data).is_file():
        raise DynapruneError(f"pictures: data file for {source!r} not found: {data}")
    if source == "sts":
        texts = [t for pair in load_sts(data) for t in (pair.s1, pair.s2)]
    else:
        texts = [item.text for item in load_labeled_text(data)]
    long_enough = [t for t in texts if len(t.split()) >= min_words]
    if len(long_enough) <= skip:
        raise DynapruneError(f"pictures: no sentence of {min_words}+ words in {data}")
    return long_enough[skip]


def first_mtbench_prompt() -> str:
    from dynaprune.paths import shared_data_dir

    path = shared_data_dir() / "mt-bench" / "questions.jsonl"
    if not path.is_file():
        raise DynapruneError(f"pictures: MT-Bench questions not found: {path}")
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    return str(first["turns"][0])


def generated_ids(model, model_name: str, prompt: str, max_new_tokens: int) -> list[int]:
    """Prompt (chat template) + the dense greedy answer, as token ids; cached on disk."""
    from dynaprune.models.registry import cache_dir

    key = hashlib.sha1(json.dumps([model_name, prompt, max_new_tokens]).encode()).hexdigest()[:16]
    path = cache_dir() / "generations" / f"{key}.json"
    if path.is_file():
        return [int(i) for i in json.loads(path.read_text())["ids"]]
    out = model.generate(prompt, chat=True, max_new_tokens=max_new_tokens)
    ids = [int(i) for i in out.prompt_ids] + [int(i) for i in out.new_ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": model_name, "prompt": prompt, "max_new_tokens": max_new_tokens,
                               "ids": ids}))
    tmp.replace(path)
    return ids


def draw_pictures(
    folder: Path,
    specs: tuple[PictureSpec, ...] = DEFAULT_PICTURES,
    load: Callable[[str], object] | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> list[Picture]:
    """Draw every spec's picture as a PNG in ``folder``; returns them with their captions."""
    from dynaprune.report.pruning_picture import plot_survival, trace_survival

    if load is None:
        from dynaprune import load
    models: dict[str, object] = {}
    pictures = []
    for i, spec in enumerate(specs):
        if spec.model not in models:
            say(f"loading {spec.model}")
            models.clear()  # one model in memory at a time
            models[spec.model] = load(spec.model)
        model = models[spec.model]
        if spec.source == "generate":
            prompt = first_mtbench_prompt()
            say(f"{spec.model}: dense answer to the first MT-Bench prompt ({spec.max_new_tokens} tokens)")
            ids = generated_ids(model, spec.model, prompt, spec.max_new_tokens)
            survival = trace_survival(model, None, spec.recipe, ids=ids)
            caption = (f"{spec.model}, recipe {spec.recipe}: the first MT-Bench prompt (chat template) and "
                       f"the dense model's greedy answer ({len(ids)} tokens), run as one sequence")
        else:
            text = pick_sentence(spec.source, spec.min_words, spec.skip)
            say(f"{spec.model}: {spec.recipe} on a {spec.source} sentence")
            survival = trace_survival(model, text, spec.recipe)
            caption = f"{spec.model}, recipe {spec.recipe}, a {spec.source.upper()} dev sentence: “{text}”"
        survival.model = spec.model
        name = f"picture-{i + 1}-{spec.model}-{spec.source}.png"
        pictures.append(Picture(caption, plot_survival(survival, folder / name)))
    return pictures
