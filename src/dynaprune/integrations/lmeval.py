"""lm-evaluation-harness model ``dynaprune``: any lm-eval task on one of our decoders under a recipe.

``DynapruneLM(pretrained="smollm2-135m", recipe="kv=0.25")`` (or ``model=`` a loaded model) implements
lm-eval's three request types:

- ``loglikelihood``: dense, batches of left-padded (context + continuation) in one forward each; under a
  recipe, each request as our ``lm --protocol continue`` does it: the context prefilled into the KV cache
  (where a KV budget evicts), then the continuation teacher-forced over that cache, one context per request.
- ``loglikelihood_rolling``: the document cut into disjoint windows of ``max_length`` tokens scored as
  our ``lm --protocol window`` scores them (``eval/lm.py``: the first token of a window is context only;
  under token pruning only the positions alive at the last layer are scored), so its word perplexity is
  the one ``dynaprune eval lm`` gives on the same text.
- ``generate_until``: ``model.generate`` (greedy), batched, cut at the first stop string.

Model args: ``pretrained``, ``recipe``, ``batch_size``, ``max_length``, ``max_gen_toks``; recipe keys may
follow ``recipe=`` as further comma-separated args (``recipe=token=0.5,head=0.8``), since lm-eval splits
model args on commas. Any other key is one error naming the known ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dynaprune.errors import DynapruneError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # the optional extra
    raise DynapruneError("lm-eval is not installed: pip install 'dynaprune[lm-eval]'") from e

MODEL_ARGS = ("pretrained", "model", "recipe", "batch_size", "max_length", "max_gen_toks")
IGNORED_ARGS = ("device", "max_batch_size", "dtype", "trust_remote_code")  # lm-eval's own defaults pass these


def _recipe_keys() -> set[str]:
    from dynaprune.prune.registry import KEYS

    return set(KEYS)


@register_model("dynaprune")
class DynapruneLM(LM):
    def __init__(self, pretrained: str | None = None, recipe: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, model: Any = None, **extra: Any) -> None:
        super().__init__()
        extra = {k: v for k, v in extra.items() if k not in IGNORED_ARGS}
        recipe_keys = _recipe_keys()
        unknown = sorted(k for k in extra if recipe is None or k not in recipe_keys)
        if unknown:
            raise DynapruneError(
                f"unknown model_args key {unknown[0]!r} for the dynaprune model; known: {', '.join(MODEL_ARGS)} "
                "(and recipe keys after recipe=, e.g. recipe=token=0.5,head=0.8)")
        if model is None and pretrained is None:
            raise DynapruneError("model_args need pretrained=NAME_OR_PATH (e.g. pretrained=smollm2-135m)")
        from dynaprune.prune.recipe import Recipe
        from dynaprune.runtime.pruning import make_context

        text = ",".join([str(recipe)] * (recipe is not None) + [f"{k}={v}" for k, v in extra.items()])
        self.recipe = Recipe.parse(text)
        if model is None:
            from dynaprune import load

            model = load(str(pretrained))
        if not hasattr(model, "generate") or getattr(model, "tokenizer", None) is None:
            raise DynapruneError(f"{getattr(model, 'name', 'the model')} is not a decoder with a tokenizer")
        self.model = model.eval()
        make_context(self.recipe, self.model)  # the recipe checked against the model before any request
        self.batch_size = max(1, int(str(batch_size).split(":")[0]) if str(batch_size) != "auto" else 8)
        self.max_length = int(max_length or min(1024, model.config.max_positions))
        self.max_gen_toks = int(max_gen_toks)
        self.tok = model.tokenizer
        self._device = next(model.parameters()).device

    # ---- helpers ----------------------------------------------------------------------------------------

    @property
    def prefix_id(self) -> int:
        """The token an empty context starts from (lm-eval's convention: BOS, else EOS)."""
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self.tok, name, None) is not None:
                return int(getattr(self.tok, name))
        return 0

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), split where lm-eval's HF model splits: trailing spaces of the
        context move to the continuation, the whole string is tokenized once."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx_ids = self._encode(context)
        cont = whole[len(ctx_ids):]
        return (ctx_ids or [self.prefix_id]), cont

    def _context(self):
        from dynaprune.runtime.pruning import make_context

        return make_context(self.recipe, self.model)

    # ---- lm-eval's three request types --------------------------------------------------------------------

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._pair(*r.args) for r in requests]
        out: list[tuple[float, bool]] = []
        with torch.inference_mode():
            if self.recipe.is_dense:
                for start in range(0, len(pairs), self.batch_size):
                    out += self._dense_batch(pairs[start:start + self.batch_size])
            else:
                out = [self._pruned_one(ctx_ids, cont) for ctx_ids, cont in pairs]
        return out

    def _score(self, logits: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
        target = torch.tensor(cont, device=logits.device)
        logp = F.log_softmax(logits.float(), dim=-1)
        return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())

    def _dense_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        seqs = [(c + k)[-(self.max_length + 1):][:-1] for c, k in pairs]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long, device=self._device)
        mask = torch.zeros(len(seqs), width, dtype=torch.bool, device=self._device)
        for i, s in enumerate(seqs):  # left padding: every row's continuation ends at the last position
            ids[i, width - len(s):] = torch.tensor(s, device=self._device)
            mask[i, width - len(s):] = True
        logits = self.model(ids, attention_mask=mask)
        return [self._score(logits[i, width - len(k):], k) for i, (_, k) in enumerate(pairs)]

    def _pruned_one(self, ctx_ids: list[int], cont: list[int]) -> tuple[float, bool]:
        room = self.max_length + 1 - len(cont)
        prompt = torch.tensor(ctx_ids[-max(1, room):], device=self._device)
        target = torch.tensor(cont, device=self._device)
        ctx = self._context()
        cache = self.model.new_cache(1, len(prompt) + len(cont))
        last = self.model(prompt[None], cache=cache, ctx=ctx, last_only=True)[0]
        rest = [self.model(target[None, :-1], cache=cache, ctx=ctx)[0]] if len(cont) > 1 else []
        return self._score(torch.cat([last, *rest]), cont)

    def loglikelihood_rolling(self, requests) -> list[float]:
        from dynaprune.eval.lm import _window_nll

        out = []
        with torch.inference_mode():
            for r in requests:
                ids = torch.tensor(self._encode(r.args[0]), dtype=torch.long, device=self._device)
                pieces = [ids[i:i + self.max_length] for i in range(0, len(ids), self.max_length)]
                nll = 0.0
                for piece in (p for p in pieces if len(p) >= 2):  # as evaluate_lm's window protocol
                    nll += _window_nll(self.model, piece, None if self.recipe.is_dense else self._context())[0]
                out.append(-nll)
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start:start + self.batch_size]
            kwargs = [dict(r.args[1]) for r in batch]
            until = [k.get("until") or [] for k in kwargs]
            until = [[u] if isinstance(u, str) else list(u) for u in until]
            new = max(int(k.get("max_gen_toks", self.max_gen_toks)) for k in kwargs)
            prompts = [self._encode(r.args[0])[-(self.max_length - new):] or [self.prefix_id] for r in batch]
            result = self.model.generate(prompts, max_new_tokens=new,
                                         recipe=None if self.recipe.is_dense else self.recipe)
            texts = result.text if isinstance(result.text, list) else [result.text]
            for text, stops in zip(texts, until, strict=True):
                cut = min((text.find(s) for s in stops if s and s in text), default=len(text))
                out.append(text[:cut])
        return out
