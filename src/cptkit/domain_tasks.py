"""Benchmarks generated from the user's own documents, with no labels and no model writing them.

From the domain's characteristic terms (domain_terms) and the held-out domain documents (the domain
evaluation set, never the training split):

- *term cloze*: a passage of `context_words` words up to an occurrence of a term, the term as the
  answer; scored as the term's log-likelihood and whether it is the greedy continuation;
- *multiple choice*: the same passage, the true term among `distractors` other terms that take the same
  places in sentences (similar neighbours in the training text) and have a similar frequency, in an
  order drawn with the seed; accuracy by log-likelihood (random: 1/(k+1));
- *term-span perplexity*: perplexity on the tokens of the domain terms in the held-out documents, beside
  perplexity on all their tokens (from the evaluation's own scoring, `scoring.score(per_token=True)`).

Items whose passage overlaps the training text are dropped (decontamination). Both tasks are written
as lm-evaluation-harness tasks (YAML + JSONL) in `<evaluation>/domain_tasks/`, so `lm_eval
--include_path` runs them on any model; cptkit scores them itself the way the harness does (the
context and `" " + choice` tokenized as the harness's HFLM tokenizes them, the summed log-probability of
the continuation, the first highest choice wins), so the numbers agree and the per-item answers give
the bootstrap intervals and the examples in the report.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cptkit.artifacts import atomic_path, write_json_atomic
from cptkit.base_scores import BaseIdentity, read_arrays, write_arrays
from cptkit.config import Config, DomainTasksConfig
from cptkit.datasets import TRAIN, TRAIN_TEXT, domain_dir, replay_dir
from cptkit.decontamination import contaminated, overlap_shares, training_texts
from cptkit.domain_terms import Term, context_profiles, extract_terms, term_pattern
from cptkit.results import DomainTaskResults, DomainTaskScore, Interval, ItemExample
from cptkit.scoring import ModelRunner, SetScore, TextTokenizer

TASKS_DIR = "domain_tasks"
TERMS_FILE = "terms.json"
CLOZE_TASK, MC_TASK = "cptkit_domain_cloze", "cptkit_domain_mc"
_EXAMPLES = 5
_NON_SPACE = re.compile(r"\S+")


@dataclass(frozen=True)
class Item:
    """A passage of a held-out document ending just before a term (which follows after one space)."""

    document: int  # index in the domain evaluation set
    context: str
    answer: str
    choices: list[str]
    label: int  # index of the answer among the choices


@dataclass(frozen=True)
class DomainTaskSet:
    """What was built: the terms, the items, how many items the decontamination dropped, the files."""

    terms: list[Term]
    items: list[Item]
    contaminated: int
    folder: Path
    seconds: float

    @property
    def pattern(self) -> re.Pattern[str] | None:
        return term_pattern(self.terms)


# ---------------------------------------------------------------- building


def build(config: Config, domain_texts: list[str], out: Path) -> DomainTaskSet | str:
    """Terms from the training text, items from `domain_texts` (the held-out domain documents), the
    task files in `out/domain_tasks`; or the reason they cannot be built."""
    started = time.perf_counter()
    settings = config.evaluate.domain_tasks
    domain, replay = domain_dir(config), replay_dir(config)
    if not _has_training_text(domain):
        return f"no domain training text in {domain} (the terms come from it; run cptkit prepare)"
    if config.data.replay is None or not _has_training_text(replay):
        return "no general (replay) training text to contrast the domain with (data.replay, then cptkit prepare)"
    terms = extract_terms(training_texts([domain]), training_texts([replay]), settings)
    if len(terms) <= settings.distractors:
        return (
            f"{len(terms)} domain terms found, fewer than the {settings.distractors + 1} choices of an item "
            "(evaluate.domain_tasks.min_count, min_documents, min_score)"
        )
    profiles = None
    if settings.distractors_by == "context":
        profiles = context_profiles(
            training_texts([domain]), terms, settings.max_ngram, settings.max_training_documents
        )
    items = make_items(domain_texts, terms, settings, profiles)
    dc = config.evaluate.decontamination
    dropped = 0
    if items and dc.mode != "off":
        passages = [f"{it.context} {it.answer}" for it in items]
        shares = overlap_shares({"items": passages}, training_texts([domain, replay]), dc.ngram)["items"]
        hits = contaminated(shares, dc.min_share)
        dropped = int(hits.sum())
        if dc.mode == "drop":
            items = [it for it, hit in zip(items, hits, strict=True) if not hit]
    if not items:
        return f"no item could be made: none of the {len(terms)} terms follows a space in the held-out documents"
    folder = out / TASKS_DIR
    write_task_files(folder, terms, items, settings)
    return DomainTaskSet(terms, items, dropped, folder, time.perf_counter() - started)


def _has_training_text(folder: Path) -> bool:
    return (folder / TRAIN).is_file() or (folder / TRAIN_TEXT).is_dir()


def make_items(
    texts: Sequence[str], terms: Sequence[Term], settings: DomainTasksConfig, profiles: np.ndarray | None = None
) -> list[Item]:
    """Items from every occurrence of every term (a term inside a longer one too: `flux` and `flux
    capacitor` each make items) that follows a space after at least four words: at most `per_document`
    per document and `items` in all, drawn with the seed; in document order. With the terms' context
    `profiles` (rows aligned with `terms`), the distractors are the terms most alike in context."""
    index = {t.text: i for i, t in enumerate(terms)}
    # Cosine similarities, rounded so that a tie is a tie on any machine (BLAS sums in its own order).
    similarity = None if profiles is None else np.round(profiles @ profiles.T, 9)
    patterns = [(t.text, term_pattern([t])) for t in sorted(terms, key=lambda t: t.text)]
    rng = random.Random(settings.seed)
    candidates: list[tuple[int, int, str]] = []
    for doc, text in enumerate(texts):
        found = sorted(
            (doc, m.start(), spelling)
            for spelling, pattern in patterns
            if pattern is not None
            for m in pattern.finditer(text)
            if text[m.start() - 1 : m.start()] == " "
        )
        if len(found) > settings.per_document:
            found = sorted(rng.sample(found, settings.per_document))
        candidates += found
    if len(candidates) > settings.items:
        candidates = sorted(rng.sample(candidates, settings.items))
    items = []
    starts_of: dict[int, list[int]] = {}
    for doc, start, answer in candidates:
        text = texts[doc]
        starts = starts_of.setdefault(doc, [m.start() for m in _NON_SPACE.finditer(text)])
        before = bisect.bisect_left(starts, start - 1)  # words that start before the separating space
        if before < 4:
            continue
        context = text[starts[max(0, before - settings.context_words)] : start - 1]
        if context != context.rstrip():  # the space is not the only separator
            continue
        row = index[answer]
        alike = None if similarity is None else similarity[row]
        choices = [answer, *distractors(terms[row], terms, settings.distractors, alike)]
        rng.shuffle(choices)
        items.append(Item(doc, context, answer, choices, choices.index(answer)))
    return items


# A distractor chosen by context is at most this many times more or less frequent than the answer: a
# rare term the model has barely seen is an easy one to rule out, whatever its neighbours.
FREQUENCY_RATIO = 4.0


def distractors(term: Term, terms: Sequence[Term], k: int, similarity: np.ndarray | None = None) -> list[str]:
    """k wrong choices for `term`, none containing it or contained in it. By frequency (no `similarity`):
    the terms nearest in frequency (log of the domain count) and length (characters, relative). By
    context (`similarity[i]`: how alike terms[i]'s neighbours are to `term`'s): the terms most alike
    among those within FREQUENCY_RATIO of its frequency, topped up by frequency where fewer are. Ties by
    the term, so the same terms give the same choices."""

    def distance(other: Term) -> float:
        frequency = abs(np.log(other.domain_count) - np.log(term.domain_count))
        return float(frequency + abs(len(other.text) - len(term.text)) / max(len(term.text), 1))

    answer = term.text.lower()
    others = [(i, t) for i, t in enumerate(terms) if t.text.lower() not in answer and answer not in t.text.lower()]
    by_frequency = [t.text for _, t in sorted(others, key=lambda it: (distance(it[1]), it[1].text))]
    if similarity is None:
        return by_frequency[:k]
    window = np.log(FREQUENCY_RATIO)
    near = [(i, t) for i, t in others if abs(np.log(t.domain_count) - np.log(term.domain_count)) <= window]
    by_context = [t.text for _, t in sorted(near, key=lambda it: (-similarity[it[0]], it[1].text))]
    chosen: list[str] = []
    for text in [*by_context, *by_frequency]:
        # Alike terms nest ("chronometric gauge" in "against chronometric gauge"): one of them is enough.
        lower = text.lower()
        if not any(lower in c.lower() or c.lower() in lower for c in chosen):
            chosen.append(text)
        if len(chosen) == k:
            break
    return chosen


def write_task_files(folder: Path, terms: Sequence[Term], items: Sequence[Item], settings: DomainTasksConfig) -> None:
    """terms.json, and each task as an lm-evaluation-harness task: a JSONL of its items and a YAML that
    names it (with the JSONL's absolute path, so that `lm_eval --include_path` works from anywhere)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        folder / TERMS_FILE,
        {"settings": settings.model_dump(mode="json"), "terms": [t.to_json() for t in terms]},
    )
    cloze = [{"document": it.document, "context": it.context, "answer": it.answer} for it in items]
    mc = [{"document": it.document, "context": it.context, "choices": it.choices, "answer": it.label} for it in items]
    for task, rows, kind in ((CLOZE_TASK, cloze, "loglikelihood"), (MC_TASK, mc, "multiple_choice")):
        data = folder / f"{task}.jsonl"
        with atomic_path(data) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        with atomic_path(folder / f"{task}.yaml") as tmp:
            tmp.write_text(_task_yaml(task, data.resolve(), kind), encoding="utf-8")


def _task_yaml(task: str, data: Path, kind: str) -> str:
    if kind == "multiple_choice":
        target = 'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        metrics = "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    else:  # the harness's loglikelihood task: perplexity of the term, acc = it is the greedy continuation
        target = 'doc_to_target: "{{answer}}"\n'
        metrics = (
            "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        )
    return (
        "# Generated by cptkit evaluate from the held-out domain documents (see docs/evaluate.md).\n"
        f"task: {task}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        f"output_type: {kind}\n"
        'doc_to_text: "{{context}}"\n'
        'target_delimiter: " "\n'
        f"{target}"
        f"metric_list:\n{metrics}"
        "metadata:\n  version: 1.0\n"
    )


# ---------------------------------------------------------------- scoring


@dataclass(frozen=True)
class ItemScores:
    """One model on the items: each choice's summed log-likelihood, and whether the answer's tokens are
    all the greedy continuation."""

    loglikelihoods: np.ndarray  # (items, choices)
    answer_greedy: np.ndarray  # (items,) bool

    def correct(self, items: Sequence[Item]) -> np.ndarray:
        """Multiple choice: the first choice with the highest log-likelihood (np.argmax, as the harness)."""
        return np.asarray([int(np.argmax(row)) == it.label for row, it in zip(self.loglikelihoods, items, strict=True)])

    def answer_loglikelihood(self, items: Sequence[Item]) -> np.ndarray:
        return np.asarray([row[it.label] for row, it in zip(self.loglikelihoods, items, strict=True)])


def request_tokens(tokenizer: Any, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """The tokens lm-evaluation-harness scores for one request, and how many of them are the
    continuation: the context alone and context + continuation tokenized without special tokens, the
    continuation being what the whole has beyond the context's length; cut on the left to max_length + 1."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :]
    return (ctx + cont)[-(max_length + 1) :], len(cont)


def item_requests(tokenizer: Any, items: Sequence[Item], max_length: int) -> list[tuple[list[int], int]]:
    """Every choice of every item as a request (`request_tokens`), item by item."""
    return [request_tokens(tokenizer, it.context, " " + c, max_length) for it in items for c in it.choices]


def score_items(
    runner: ModelRunner,
    tokenizer: Any,
    items: Sequence[Item],
    max_length: int,
    batch_tokens: int,
    device: Any = "cpu",
    bf16: bool = False,
    requests: Sequence[tuple[list[int], int]] | None = None,
) -> ItemScores:
    """Every choice of every item scored (`requests`: their `item_requests`, where already made). The
    choices of an item share its context, so the context runs once and its key/value cache serves all the
    choices (a third of the compute of scoring each request whole, at the passages' length); an item whose
    requests the length limit cuts is scored request by request, in right-padded batches of at most
    `batch_tokens` tokens (no attention mask is needed under causal attention: padding after a row cannot
    change it)."""
    import torch

    per_item = len(items[0].choices) if items else 0
    if requests is None:
        requests = item_requests(tokenizer, items, max_length)
    contexts = [tokenizer(it.context, add_special_tokens=False)["input_ids"] for it in items]
    lls = np.zeros(len(requests))
    greedy = np.zeros(len(requests), dtype=bool)
    cut = [
        k
        for k, ctx in enumerate(contexts)
        if any(len(tokens) - n != len(ctx) for tokens, n in requests[k * per_item : (k + 1) * per_item])
    ]
    whole = [k * per_item + j for k in cut for j in range(per_item)]
    order = sorted(whole, key=lambda i: (-len(requests[i][0]), i))
    device = torch.device(device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.inference_mode(), autocast, runner() as model:
        for k in sorted(set(range(len(items))) - set(cut)):
            first, stop = k * per_item, (k + 1) * per_item
            conts = [requests[i][0][-requests[i][1] :] for i in range(first, stop)]
            lls[first:stop], greedy[first:stop] = _shared_context(model, contexts[k], conts, device)
        for rows in _batches(order, [len(r[0]) for r in requests], batch_tokens):
            width = max(len(requests[i][0]) for i in rows) - 1
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=bool)
            targets = []
            for r, i in enumerate(rows):
                tokens, n = requests[i]
                ids[r, : len(tokens) - 1] = tokens[:-1]
                mask[r, len(tokens) - 1 - n : len(tokens) - 1] = True
                targets += tokens[-n:]
            logits = _logits_at(model, torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
            lp = torch.log_softmax(logits.float(), dim=-1)
            t = torch.tensor(targets, device=device)
            token_lp = lp.gather(-1, t[:, None])[:, 0].double().cpu().numpy()
            is_max = (lp.argmax(-1) == t).cpu().numpy()
            at = 0
            for i in rows:
                n = requests[i][1]
                lls[i] = float(token_lp[at : at + n].sum())
                greedy[i] = bool(is_max[at : at + n].all())
                at += n
    labels = np.asarray([k * per_item + it.label for k, it in enumerate(items)], dtype=np.int64)
    return ItemScores(lls.reshape(len(items), per_item), greedy[labels])


def _shared_context(model: Any, context: list[int], continuations: list[list[int]], device: Any) -> tuple[Any, Any]:
    """Summed log-likelihood of each continuation after `context`, and whether it is all greedy: the
    context once (its last logits predict each continuation's first token), then the continuations as
    one right-padded batch over copies of the context's cache."""
    import torch

    out = model(input_ids=torch.tensor([context], device=device), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    # transformers 5 names the cache `cache` (in and out), transformers 4 `past_key_values`.
    cache = getattr(out, "cache", None)
    name = "cache" if cache is not None else "past_key_values"
    cache = cache if cache is not None else out.past_key_values
    cache.batch_repeat_interleave(len(continuations))
    width = max(len(c) for c in continuations)
    ids = torch.zeros((len(continuations), width), dtype=torch.long, device=device)
    for r, c in enumerate(continuations):
        ids[r, : len(c)] = torch.tensor(c, device=device)
    lp = torch.log_softmax(model(input_ids=ids, use_cache=True, **{name: cache}).logits.float(), dim=-1)
    lls, greedy = [], []
    for r, c in enumerate(continuations):
        rest = torch.tensor(c[1:], dtype=torch.long, device=device)
        steps = lp[r, : len(c) - 1]
        lls.append(float(first[c[0]]) + float(steps.gather(-1, rest[:, None]).sum(dtype=torch.float64)))
        greedy.append(bool(int(first.argmax()) == c[0] and bool((steps.argmax(-1) == rest).all())))
    return np.asarray(lls), np.asarray(greedy)


def _batches(order: list[int], lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Consecutive runs of `order` (longest first) whose padded size stays within `batch_tokens`."""
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _logits_at(model: Any, ids: Any, mask: Any) -> Any:
    """Logits at the masked positions, (positions, vocabulary): the LM head only where it is needed."""
    from cptkit.loss import decoder_and_head

    parts = decoder_and_head(model)
    if parts is None:
        return model(input_ids=ids, use_cache=False).logits[mask]
    decoder, head = parts
    return head(decoder(input_ids=ids, use_cache=False).last_hidden_state[mask])


@dataclass(frozen=True)
class TermSpan:
    """Perplexity on the domain terms' tokens and on all tokens of the same documents."""

    term_perplexity: float | None
    all_perplexity: float
    term_tokens: int
    all_tokens: int


def term_span(texts: Sequence[str], tok: TextTokenizer, scored: SetScore, pattern: re.Pattern[str] | None) -> TermSpan:
    """From the evaluation's per-token NLLs of `texts` (tokenized by `tok`, as scoring did): a token is a
    term token when its characters overlap an occurrence of a term."""
    assert scored.token_nll is not None
    encoded = tok.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    prefix = 0 if tok.prefix_id is None else 1
    term_nll = all_nll = 0.0
    term_n = all_n = 0
    at = 0
    for text, ids, spans in zip(texts, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        nll = scored.token_nll[at + prefix : at + prefix + len(ids)].astype(np.float64)
        at += prefix + len(ids)
        inside = np.zeros(len(text), dtype=np.int64)
        for m in pattern.finditer(text) if pattern is not None else ():
            inside[m.start() : m.end()] = 1
        covered = np.concatenate([[0], np.cumsum(inside)])
        starts = np.asarray([s for s, _ in spans], dtype=np.int64)
        ends = np.asarray([e for _, e in spans], dtype=np.int64)
        is_term = covered[ends] - covered[starts] > 0 if len(spans) else np.zeros(0, dtype=bool)
        counted = ~np.isnan(nll)
        all_nll += float(nll[counted].sum())
        all_n += int(counted.sum())
        term_nll += float(nll[counted & is_term].sum())
        term_n += int((counted & is_term).sum())
    if at != len(scored.token_nll):
        raise ValueError(f"term-span: {at} tokens here, {len(scored.token_nll)} scored: not the same tokenization")
    return TermSpan(
        term_perplexity=float(np.exp(term_nll / term_n)) if term_n else None,
        all_perplexity=float(np.exp(all_nll / all_n)) if all_n else float("nan"),
        term_tokens=term_n,
        all_tokens=all_n,
    )


# ---------------------------------------------------------------- results


def bootstrap(
    values: Sequence[np.ndarray],
    statistic: Callable[..., float],
    resamples: int,
    seed: int,
    documents: np.ndarray | None = None,
) -> Interval:
    """The statistic of the paired per-item arrays and its 95% percentile interval over `resamples`
    resamples (with replacement; seeded, so a rerun gives the same interval). With `documents` (each
    item's document), the documents are resampled, each drawn document bringing all its items: items of
    one passage share its topic and its terms, so they are not independent, and resampling them one by
    one would give too narrow an interval (the cluster bootstrap). Without, the items."""
    n = len(values[0])
    rng = np.random.default_rng(seed)
    if documents is None:
        draws = list(rng.integers(0, n, size=(resamples, n)))
    else:
        members = [np.flatnonzero(documents == d) for d in np.unique(documents)]
        picks = rng.integers(0, len(members), size=(resamples, len(members)))
        draws = [np.concatenate([members[k] for k in row]) for row in picks]
    samples = np.asarray([statistic(*(v[d] for v in values)) for d in draws])
    low, high = np.percentile(samples, [2.5, 97.5])
    return Interval(value=float(statistic(*values)), low=float(low), high=float(high))


def _mean(a: np.ndarray) -> float:
    return float(np.mean(a))


def _mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(b.astype(np.float64) - a.astype(np.float64)))


def results(
    built: DomainTaskSet,
    scores: dict[str, ItemScores],
    spans: dict[str, TermSpan],
    settings: DomainTasksConfig,
    seconds: float,
) -> DomainTaskResults:
    """The typed result: both models' scores with intervals, the paired changes, examples of items
    whose answer changed."""
    items = built.items
    correct = {name: s.correct(items) for name, s in scores.items()}
    exact = {name: s.answer_greedy for name, s in scores.items()}
    documents = np.asarray([it.document for it in items])
    resampling = (settings.bootstrap, settings.seed, documents)
    per_model = {}
    for name, s in scores.items():
        span = spans.get(name)
        per_model[name] = DomainTaskScore(
            mc_accuracy=bootstrap([correct[name]], _mean, *resampling),
            cloze_loglikelihood=float(np.mean(s.answer_loglikelihood(items))),
            cloze_exact_match=bootstrap([exact[name]], _mean, *resampling),
            term_perplexity=span.term_perplexity if span else None,
            all_perplexity=span.all_perplexity if span else None,
            term_tokens=span.term_tokens if span else 0,
            all_tokens=span.all_tokens if span else 0,
        )

    def examples(right: str, wrong: str) -> list[ItemExample]:
        out: list[ItemExample] = []
        for k, it in enumerate(items):
            if correct[right][k] and not correct[wrong][k] and len(out) < _EXAMPLES:
                choice = {name: it.choices[int(np.argmax(s.loglikelihoods[k]))] for name, s in scores.items()}
                out.append(ItemExample(context=it.context, answer=it.answer, base=choice["base"], cpt=choice["cpt"]))
        return out

    return DomainTaskResults(
        status="ok",
        terms=len(built.terms),
        items=len(items),
        documents=len(set(documents.tolist())),
        contaminated_items=built.contaminated,
        distractors=settings.distractors,
        random_baseline=1 / (settings.distractors + 1),
        folder=TASKS_DIR,
        base=per_model["base"],
        cpt=per_model["cpt"],
        accuracy_change=bootstrap([correct["base"], correct["cpt"]], _mean_difference, *resampling),
        exact_match_change=bootstrap([exact["base"], exact["cpt"]], _mean_difference, *resampling),
        loglikelihood_change=bootstrap(
            [scores["base"].answer_loglikelihood(items), scores["cpt"].answer_loglikelihood(items)],
            _mean_difference,
            *resampling,
        ),
        items_gained=int((correct["cpt"] & ~correct["base"]).sum()),
        items_lost=int((correct["base"] & ~correct["cpt"]).sum()),
        gained=examples("cpt", "base"),
        lost=examples("base", "cpt"),
        seconds=round(seconds, 2),
    )


def run(
    built: DomainTaskSet | str | None,
    models: Iterable[tuple[str, ModelRunner, TextTokenizer]],
    spans: dict[str, TermSpan],
    settings: DomainTasksConfig,
    max_length: int,
    batch_tokens: int,
    device: Any,
    bf16: bool,
    base: BaseIdentity | None = None,
) -> DomainTaskResults:
    """Score the built tasks with each (name, runner, tokenizer) of base and cpt; or say why not. With
    `base` (evaluate.base_score_cache), the base's scores of these exact items are read from the cache,
    or computed and cached: the next evaluation of another adapter of the same base skips them."""
    if built is None:
        return DomainTaskResults(status="not_run", reason="evaluate.domain_tasks.enabled is false")
    if isinstance(built, str):
        return DomainTaskResults(status="not_run", reason=built)
    started = time.perf_counter()
    scores = {}
    for name, runner, tok in models:
        requests = item_requests(tok.tokenizer, built.items, max_length)
        key = None
        if name == "base" and base is not None:
            # The exact tokens scored (so the tokenizer is in the key), and what decides the batches.
            batching = {"max_length": max_length, "batch_tokens": batch_tokens}
            key = base.key("items", batching, [json.dumps(requests).encode()])
            cached = read_arrays(key)
            if cached is not None:
                scores[name] = ItemScores(cached["loglikelihoods"], cached["answer_greedy"])
                continue
        scores[name] = score_items(
            runner, tok.tokenizer, built.items, max_length, batch_tokens, device, bf16, requests=requests
        )
        if key is not None:
            write_arrays(
                key, {"loglikelihoods": scores[name].loglikelihoods, "answer_greedy": scores[name].answer_greedy}
            )
    return results(built, scores, spans, settings, built.seconds + time.perf_counter() - started)
