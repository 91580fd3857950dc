"""What a downstream comparison is made of: the protocol (EvalConfig), the tables (TableSpec) and one run's result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from reaemb_trl.evaluation.metrics import DEFAULT_KS
from reaemb_trl.evaluation.split import HISTORY_RULES

MOSTPOP = "mostpop"
FIXED_TABLES = ("id", MOSTPOP)  # the tables that are no file
# The choices of each EvalConfig field, one home for the modules that implement them (no torch needed to list them).
MODELS = ("sasrec", "gru4rec", "bert4rec")  # evaluation.models
LOSSES = ("ce", "bce")  # evaluation.losses
PROPOSALS = ("uniform", "popularity")  # the sampled softmax's, evaluation.losses
TABLE_MODES = ("frozen", "init", "hybrid")  # evaluation.tables
ENSEMBLE = "ensemble"  # a TableSpec mode: the score ensemble of `id` and the file's frozen run (evaluation.ensemble)
NORMALIZATIONS = ("center_scale", "whiten", "none")  # evaluation.tables
PROTOCOLS = ("full", "sampled")  # evaluation.metrics
DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class EvalConfig:
    """The downstream protocol. Defaults: CE-trained models, history excluded where items do not repeat."""

    model: str = "sasrec"  # sasrec, gru4rec or bert4rec
    loss: str = "ce"  # ce (softmax over the catalogue) or bce (the papers': one sampled negative)
    history: str = "auto"  # exclude, keep, or auto (exclude when no sequence repeats an item)
    table_mode: str = "frozen"  # for table files: frozen (+ adapter), init (IDs from its PCA), hybrid (IDs + adapter)
    normalization: str = "center_scale"  # what the adapter reads: center_scale, whiten or none
    hidden: int = 128
    inner_size: int | None = None  # feed-forward width (None: hidden for SASRec, 4 x hidden for BERT4Rec)
    max_len: int = 200
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    adapter_hidden: int = 256
    lr: float = 1e-3
    batch_size: int = 1024  # training windows per update
    max_epochs: int = 200
    patience: int = 20  # validations without a gain in NDCG@10 before stopping
    eval_every: int = 1  # validate every this many epochs
    sampled_softmax_above: int = 100_000  # catalogues larger than this train with a sampled softmax
    num_sampled: int = 8192  # negatives per batch of the sampled softmax
    sampled_proposal: str = "uniform"  # its proposal: uniform or popularity (count^0.75)
    protocol: str = "full"  # full: rank against the whole catalogue; sampled: against 100 negatives
    num_negatives: int = 100
    ks: tuple[int, ...] = DEFAULT_KS
    tail_user_threshold: int = 10  # tail user: test history shorter than this
    tail_item_threshold: int = 20  # tail item: target bought by fewer distinct training users than this
    mask_prob: float = 0.2  # BERT4Rec cloze masking rate
    eval_batch_size: int = 512
    device: str = "cpu"
    dtype: str = "auto"  # training matmuls: auto (bf16 where the hardware runs it fast), float32 or bfloat16
    # Cold items (data.cold): this share of the catalogue, drawn from `cold_item_seed`, loses its interactions from
    # every training signal (training sequences, validation histories) and is no training candidate; users whose
    # held-out target is cold form the `cold_item` group. 0: no cold items.
    cold_items: float = 0.0
    cold_item_seed: int = 0
    # Hybrid tables only: while training, each item's ID row is left out (the item scored and read from its
    # table row alone) with this probability, per item and batch, so the model learns to place items from text
    # alone, as it must for an item it has no ID row for (DropoutNet's input dropout). 0: the plain hybrid.
    id_dropout: float = 0.0

    def __post_init__(self):
        choices = {"model": MODELS, "loss": LOSSES, "history": HISTORY_RULES, "table_mode": TABLE_MODES,
                   "normalization": NORMALIZATIONS, "sampled_proposal": PROPOSALS, "protocol": PROTOCOLS,
                   "dtype": DTYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"EvalConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("max_len", "batch_size", "max_epochs", "patience", "eval_every", "num_sampled"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.cold_items < 1.0:
            raise ValueError(f"EvalConfig.cold_items is a share of the catalogue in [0, 1), got {self.cold_items}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"EvalConfig.id_dropout is a probability in [0, 1), got {self.id_dropout}")
        self.ks = tuple(self.ks)

    def as_dict(self) -> dict:
        return asdict(self)

    def training_dtype(self):
        """The autocast dtype of training (None: float32). Ranking always runs in float32: bf16 rounding would
        create ties, and ties rank pessimistically."""
        import torch

        from reaemb_trl.hardware import fast_bf16_available

        if self.dtype == "bfloat16" or (self.dtype == "auto" and fast_bf16_available(torch.device(self.device))):
            return torch.bfloat16
        return None


@dataclass
class TableSpec:
    """One row of a comparison: `source` is "id", "mostpop" or a .safetensors table used in `mode` (one of
    TABLE_MODES, or ENSEMBLE: the scores of the `id` run and of this file's frozen run, combined)."""

    name: str
    source: str
    mode: str = "frozen"


@dataclass
class RunResult:
    """One (table, seed) run: its test metrics per user group and what early stopping saw."""

    seed: int
    table: str
    best_epoch: int
    epochs_run: int
    best_valid_ndcg10: float
    metrics: dict[str, dict[str, float]]  # group -> metric -> value (test split)
    group_sizes: dict[str, int]
    history: list[float] = field(default_factory=list)  # validation NDCG@10 per validation (ensemble: per weight)
    test_ranks: list[int] = field(default_factory=list)  # per test user, in split.test order
    seconds: float = 0.0
    ensemble_weight: float | None = None  # an ensemble's weight of the table model, chosen on validation
    # What an ensemble needs of a run (`ranking.Scoring`: the best epoch's user states and item vectors); kept
    # only for runs an ensemble combines, never written to results.json.
    scoring: object | None = field(default=None, repr=False, compare=False)
