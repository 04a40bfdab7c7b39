"""The recipe schema: one typed dataclass per section, completed and checked as a whole by ``Recipe.complete``
(``resolve`` fills the values other keys decide, ``check`` only checks)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from squat_cli.errors import RecipeError
from squat_cli.quant.methods import KD_SUFFIX, METHODS, get_method, names_where
from squat_cli.recipe.checks import MIXED_RE, check_recipe
from squat_cli.task_file import TaskSpec, looks_like_file, read_spec_file
from squat_cli.typed import build

WEIGHT_ONLY_METHODS = names_where(weight_only=True, selectable=True)
"""Methods whose activations stay FP32 (their variant is always ``a32``)."""
POST_TRAINING_METHODS = names_where(post_training=True)
"""Methods that make no training step."""


@dataclass
class ModelConfig:
    """Which pre-trained encoder to start from."""

    name_or_path: str = "bert-base-uncased"
    """Hub id, local folder, or ``packaged-minilm`` (all-MiniLM-L6-v2 from PyPI)."""
    trust_remote_code: bool = False
    """Allow code from the model repository to run (off unless asked)."""


@dataclass
class DataConfig:
    """GLUE task and how its examples are read and tokenised."""

    task: Union[str, TaskSpec] = "cola"
    """A GLUE task's name, a task file (``my-task.yaml``), or a task defined inline (``task_file.TaskSpec``);
    a task file is stored inline (absolute paths) once the recipe is resolved."""
    data_dir: Optional[str] = None
    """Folder in GLUE's original layout; falls back to ``$SQUAT_DATA_DIR``, then the hub."""
    source: Literal["auto", "local", "hub"] = "auto"
    fallback: Literal["none", "embedded"] = "none"
    """``embedded``: with no data folder and no reachable hub, use the data packaged with squat (STS-B)."""
    max_seq_length: int = 128
    train_subset: Optional[int] = None
    """Use only the first N training examples (after a seeded shuffle)."""
    eval_subset: Optional[int] = None
    """Use only the first N examples of each dev split."""


@dataclass
class TrainConfig:
    """Optimisation loop shared by every method."""

    epochs: float = 5.0
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides epochs when set)."""
    batch_size: int = 32
    eval_batch_size: int = 128
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 2e-5
    weight_decay: float = 0.01
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.1
    max_grad_norm: Optional[float] = 1.0
    seed: int = 42
    eval_strategy: Literal["epoch", "steps", "end"] = "epoch"
    eval_steps: int = 500
    eval_at_start: bool = False
    """Also evaluate before the first step (quantize: the converted model as it starts)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    aux_precision: Literal["same", "bf16"] = "same"
    """Precision of the passes that only steer an update: SAM's ascent pass (eps) and SQuAT's
    step-size pass. ``bf16`` runs them under bf16 autocast (the weight-update pass keeps
    ``precision``): SAM and SQuAT steps get cheaper, eps and the step-size gradient slightly noisier."""
    log_every: int = 10
    save_every: Optional[int] = 500
    """Write a resumable checkpoint every N steps (and at each epoch end); null: epoch ends only."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding)."""
    fast_dropout: bool = True
    """On CPU, draw dropout masks from 32 random bits per element instead of torch's Bernoulli sampler.

    Same distribution (keep probability exact to 2^-32), about half the time of a
    training step's dropout; runs are not bit-identical to ``nn.Dropout`` ones.
    No effect on other devices."""
    save_model: bool = True
    report_to: Literal["none", "tensorboard"] = "none"
    """Experiment tracking through accelerate: ``tensorboard`` writes event files to ``<run>/tensorboard/``
    (loss, learning rate, SAM's gradient norm, mean step sizes, every evaluation); needs ``pip install tensorboard``
    (the ``track`` extra)."""


@dataclass
class QuantConfig:
    """Quantizers, the modules they wrap, and the step-size optimizer."""

    method: Literal[METHODS] = "squat"
    """One of the method table's names (``quant/methods.py``)."""
    wbits: int = 4
    abits: int = 8
    per_channel: bool = False
    """One step size per output channel instead of one per tensor."""
    quantize_embeddings: bool = False
    """Also quantize the word embeddings, at ``wbits`` (LSQ family and PTQ; ``embedding_bits`` sets another width)."""
    embedding_bits: Optional[int] = None
    """LSQ family and PTQ: quantize the word embeddings at this many bits (2..8), one learned step per row (per
    token), trained like the other weights (SAM and SQuAT's step-size pass included); None: FP32 unless
    ``quantize_embeddings``. Lookups need no activation quantizer."""
    include: Optional[list[str]] = None
    """fnmatch patterns of module names whose nn.Linear layers are quantized; None: every nn.Linear inside
    the encoder's repeated blocks, found by structure (any BERT-family encoder)."""
    exclude: list[str] = field(default_factory=lambda: ["*classifier*", "*pooler*"])
    act_init: Literal["max", "lsq"] = "max"
    """Activation step init: max|x|/Qp, or LSQ's 2*mean|x|/sqrt(Qp)."""
    calib_batches: int = 4
    step_optimizer: Literal["sgd", "adam"] = "sgd"
    step_lr: float = 0.1
    """Step-size learning rate. LSQ's gradient scale makes step gradients small (~1e-4 on BERT
    weights), so SGD needs a far larger lr than Adam does for the weights; too small freezes the steps."""
    step_momentum: float = 0.0
    step_size_grad: Literal["fresh", "reuse"] = "fresh"
    """squat only: ``fresh`` = extra pass at w_{t+1}; ``reuse`` = next step's first pass."""
    act_grad_scale: Literal["tensor", "token"] = "tensor"
    """N in the activation step-gradient scale ``1/sqrt(N*Qp)``: ``tensor`` = every element of the
    (padded) batch tensor, so the scale varies with batch size and length; ``token`` = the features
    of one token, the same for every batch."""
    ptq_step: Literal["minmax", "mse"] = "mse"
    q8bert_ema: float = 0.9999
    gobo_threshold: float = -4.0
    """gobo: a weight is an outlier (kept FP32) when its log-density under the matrix's Gaussian fit is at or
    below this (-4: about 3.5-3.7 sigma for BERT's weights, as in the public re-implementation)."""
    gobo_embedding_bits: Optional[int] = None
    """gobo: bits of the word-embedding codebook; None = as published (2 for W2, else max(4, wbits)); 32 = FP32."""
    qbert_groups: int = 128
    """qbert: row groups per weight matrix, each with its own range (12 = one per BERT-base head; 128 = the
    paper's finest setting). Must divide every quantized matrix's rows."""
    qbert_embedding_bits: int = 8
    """qbert: bits of the word embeddings (one range for the table); 32 = FP32."""
    qbert_act_momentum: float = 0.99
    """qbert: EMA momentum of the activation ranges."""
    mixed: Optional[str] = None
    """qbert: mixed precision ``"L/H"`` (e.g. ``2/3``): the most Hessian-sensitive encoder layers get H bits,
    the others L (``quant.wbits`` is then L)."""
    mixed_share: float = 0.5
    """qbert mixed precision: the share of encoder layers that get the higher bit width."""
    hessian_subsets: int = 4
    """qbert mixed precision: random training subsets the top Hessian eigenvalue is computed on (paper: 10)."""
    hessian_examples: int = 64
    """qbert mixed precision: training examples per subset (paper: 10% of the training set)."""
    hessian_iters: int = 20
    """qbert mixed precision: power-iteration steps (at most) per eigenvalue."""

    def variant_parts(self) -> tuple[str, int, int]:
        """(method label, weight bits, activation bits) of the run folder's variant: weight-only methods are
        ``a32``, fp-sam ``w32a32``, Q-BERT's mixed precision ``qbert-mp<H>`` with W = the lower bit width."""
        wbits, abits = get_method(self.method).variant_bits(self.wbits, self.abits)
        mixed = self.mixed_bits()
        return (f"qbert-mp{mixed[1]}" if mixed else self.method), wbits, abits

    def mixed_bits(self) -> Optional[tuple[int, int]]:
        """(low, high) of ``mixed``, or None."""
        if self.mixed is None:
            return None
        low, high = (int(x) for x in self.mixed.split("/"))
        return low, high

    def word_embedding_bits(self) -> Optional[int]:
        """Bits of the word embeddings for this method (None: kept FP32)."""
        return get_method(self.method).embedding_bits(self)


@dataclass
class SamConfig:
    """Sharpness-aware minimisation settings."""

    rho: Optional[float] = None
    """None = the paper's choice: 0.1 for 2- and 3-bit weights, 0.15 for 4-bit and wider."""
    sync_perturbation: bool = False
    """All-reduce the ascent gradient across processes (default: per-process eps)."""
    weight_ste: Literal["masked", "identity"] = "masked"
    """Gradient of SAM's weight step (joint, squat) through the weight quantizer: ``masked`` = LSQ's
    straight-through estimator (weights whose w/s is clipped get 0); ``identity`` = the paper's
    Eq. 7 / Algorithm 1 as written, ``w <- w - lr * grad_Q L(Q(w,s)+eps)`` (dQ/dw = 1 everywhere)."""
    dropout_replay: bool = False
    """Every pass of one SAM-type step (ascent, weight step, step-size step) draws the same dropout
    masks as the first; the random stream then advances as after a single pass, so joint at rho 0
    reproduces an lsq run exactly. Off: each pass draws new masks."""
    every: int = 1
    """Ascent every k steps; the steps between reuse the last eps as it is (plain reuse of eps)."""
    probability: float = 1.0
    """Each step is a SAM step with this probability, else a plain step without perturbation (RST)."""
    ascent_fraction: float = 1.0
    """The ascent runs on the first ceil(f * batch) examples; the descent on the whole batch (ESAM-style)."""


@dataclass
class DistillConfig:
    """Knowledge distillation from an FP teacher (off unless the section is present).

    The training loss of every pass (SAM's ascent, the weight step, SQuAT's step-size pass) is
    ``labels * task loss + logits * L_logits + hidden * L_hidden + attention * L_attention``."""

    logits: float = 1.0
    """Weight of the logits term: soft cross-entropy at ``temperature`` (times T^2) for classification,
    MSE between the scores for regression (STS-B)."""
    hidden: float = 0.0
    """Weight of the hidden-state term: the sum over layers (the embeddings' output included) of the MSE
    between student and teacher hidden states."""
    attention: float = 0.0
    """Weight of the attention term: the sum over layers of the MSE between attention scores before the
    softmax, masked positions set to 0 (TernaryBERT's). Runs attention through squat's eager kernel."""
    labels: float = 1.0
    """Weight of the usual task loss against the gold labels (TernaryBERT: 0)."""
    temperature: float = 1.0
    teacher: Optional[str] = None
    """Folder of the teacher model; None: the FP run the quantized run starts from."""

    def uses(self) -> tuple[str, ...]:
        """The terms with a non-zero weight."""
        return tuple(k for k in ("labels", "logits", "hidden", "attention") if getattr(self, k) > 0)


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: Optional[QuantConfig] = None
    sam: SamConfig = field(default_factory=SamConfig)
    distill: Optional[DistillConfig] = None
    """Distillation from the FP model (quantized runs only); absent: no teacher, today's loss."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for section in ("quant", "distill"):  # absent sections stay absent in recipe.yaml
            if d[section] is None:
                del d[section]
        return d

    def variant_parts(self) -> tuple[str, int, int]:
        """(method label, W, A) of a quantized run's folder: ``+kd`` marks a distilled run (``lsq+kd-w2a8``)."""
        label, wbits, abits = self.quant.variant_parts()
        return (f"{label}{KD_SUFFIX}" if self.distill is not None else label), wbits, abits

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def complete(self) -> "Recipe":
        """The recipe as it runs: the values derived from others filled in (``resolve``), then every cross-field
        rule checked (``check``)."""
        return self.resolve().check()

    def resolve(self) -> "Recipe":
        """Fill the values other keys decide: SAM's radius by the paper's rule when unset (0.1 for W2/W3, 0.15 for
        W4 and wider), and Q-BERT mixed precision's lower bit width as ``quant.wbits``."""
        q = self.quant
        if isinstance(self.data.task, str) and looks_like_file(self.data.task):
            self.data.task = read_spec_file(self.data.task)
        if self.sam.rho is None:
            self.sam.rho = 0.15 if q is not None and q.wbits >= 4 else 0.1
        if q is not None and q.mixed is not None and MIXED_RE.match(q.mixed):
            q.wbits = int(q.mixed.split("/")[0])
        return self

    def check(self) -> "Recipe":
        """Cross-field checks that the types alone cannot express (nothing is changed): ``checks.check_recipe``."""
        check_recipe(self)
        return self


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError("recipe: the file must hold a mapping of sections (model, data, train, quant, sam)")
    return build(Recipe, data)


