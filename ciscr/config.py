"""Typed, validated configuration: YAML -> defaults -> ``key=value`` overrides.

Every knob of ciscr lives in one pydantic model tree (:class:`Config`). Functions receive the
sub-config they need (``cfg.train``, ``cfg.data``), never the whole tree. Unknown keys and bad
values are rejected with one line naming the offending key (:class:`ConfigError`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ciscr.errors import ConfigError

_STRICT = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticCfg(BaseModel):
    """Size of the procedurally generated dataset (``data.format=synthetic``)."""

    model_config = _STRICT
    num_train: int = Field(240, ge=2, description="images in the train pool (labeled + unlabeled)")
    num_val: int = Field(60, ge=1, description="validation images")
    size: int = Field(96, ge=32, description="square image side in pixels")
    num_classes: int = Field(6, ge=2, le=20, description="classes incl. background (class 0)")
    difficulty: float = Field(
        1.0,
        ge=0.0,
        le=4.0,
        description="scales the texture-swap probability and hue spread (0 = colour and "
        "texture identify the class; 1 = hard with few labels)",
    )
    max_distractors: int = Field(
        3, ge=0, le=8, description="background blobs painted like objects, 0..N per image "
        "(0 = none: the easier task the demo uses)"
    )


class DataCfg(BaseModel):
    """Where the images are and which of them are labeled."""

    model_config = _STRICT
    format: Literal["folder", "voc", "cityscapes", "coco", "synthetic"] = "synthetic"
    root: str = Field(
        "", description="dataset root; for synthetic: cache dir ('' = ~/.cache/ciscr)"
    )
    split: str = Field(
        "",
        description="packaged split name, e.g. '1_8' (ST++ split_0) or 'stpp/pascal/1_8/split_1'",
    )
    labeled: str | float | int | None = Field(
        None, description="folder/synthetic: fraction (0,1), count (>=1) or a list file of ids"
    )
    train_split: str = Field("train", description="folder format: sub-folder of the pool")
    val_split: str = Field("val", description="folder format: sub-folder used for evaluation")
    ignore_index: int = 255
    background_class: int | None = Field(
        None, description="class never picked for rectification (VOC/COCO: 0); None = every class"
    )
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_workers: int = Field(0, ge=0)
    check: bool = Field(
        True, description="decode and check every unlabeled / val image and mask before "
        "training (labeled ones are always checked)"
    )
    max_val_images: int = Field(0, ge=0, description="evaluate on the first N val images (0 = all)")
    synthetic: SyntheticCfg = SyntheticCfg()

    @field_validator("labeled")
    @classmethod
    def _check_labeled(cls, v: Any) -> Any:
        if isinstance(v, float) and not (0.0 < v < 1.0):
            raise ValueError("a labeled fraction must lie in (0, 1)")
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError("a labeled count must be >= 1")
        return v


class ModelCfg(BaseModel):
    """DeepLabV3+ and its backbone."""

    model_config = _STRICT
    backbone: str = Field("resnet101", description="resnet18 | resnet50 | resnet101 | mobilenet_v2")
    pretrained: str = Field(
        "",
        description="'imagenet' (torchvision's file for the backbone: torch hub cache, else "
        "downloaded there), a local state_dict path, or '' = random init",
    )
    output_stride: Literal[8, 16] = 8
    aspp_dilations: tuple[int, int, int] | None = Field(
        None, description="None = (12, 24, 36) at output stride 8, (6, 12, 18) at 16"
    )
    dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="Dropout before the classifier (ST++'s and the paper's "
        "decoder; the online methods' preset: 0, as UniMatch's decoder)")
    aspp_dropout: float = Field(
        0.5, ge=0.0, lt=1.0, description="Dropout2d after the ASPP projection (ST++'s decoder; "
        "the online methods' preset: 0, as UniMatch's decoder)")
    channels: int = Field(
        256, ge=8, description="width of ASPP/decoder = feature channels C (paper: 256)"
    )
    init: str = Field(
        "",
        description="a ciscr checkpoint.pt to start from (improve a model you already have): "
        "online methods and SupOnly train on from it; stage-wise methods with later stages take "
        "it as their stage 1 (no stage-1 training; stages 2/3 warm, method.init=previous unless "
        "set). '' = train from model.pretrained",
    )
    init_sha256: str = Field(
        "",
        description="sha256 of model.init, filled in by the run (and then checked on resume); "
        "give it to insist on one exact file",
    )


class TrainCfg(BaseModel):
    """Optimisation of every training stage; each stage's length follows its own data."""

    model_config = _STRICT
    epochs: int = Field(80, ge=1, description="epochs of stage 1 (the labeled stage)")
    unlabeled_epochs: int = Field(
        0,
        ge=0,
        description="epochs of every stage that trains on unlabeled images (retraining stages "
        "2/3, online methods), each a pass over that stage's own list; 0 = train.epochs. Raised "
        "where needed so that such a stage shows the labeled images at least as often as stage 1 "
        "did",
    )
    iters_per_epoch: int = Field(
        0,
        ge=0,
        description="0 (default) = derived from each stage's own data: ceil(items of the "
        "stage's epoch list / batch); > 0 forces this many iterations per epoch in EVERY stage",
    )
    warm_epochs: int = Field(
        0, ge=0, description="with model.init: the run's budget T in passes over the labeled list "
        "(the iterations SupOnly continued trains; every method's training stages share them); "
        "0 = train.epochs")
    warm_lr: float = Field(
        0.0, ge=0, description="with model.init: the backbone learning rate of every stage that "
        "trains; 0 = train.lr")
    batch_size: int = Field(16, ge=1)
    unlabeled_batch_size: int = Field(0, ge=0, description="0 = same as batch_size")
    crop_size: int = Field(321, ge=16)
    scale_range: tuple[float, float] = (0.5, 2.0)
    unlabeled_resolution: float = Field(
        1.0, gt=0, le=1, description="online family: the unlabeled views at this fraction of the "
        "labeled views' resolution (scale_range and crop_size times it): the same field of view "
        "in fewer pixels, a cheaper unlabeled branch; 1 = the published recipes")
    lr: float = Field(0.001, gt=0, description="backbone learning rate")
    head_lr_mult: float = Field(10.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    poly_power: float = Field(0.9, ge=0)
    repeat_small_labeled: int = Field(
        200, ge=0, description="labeled sets smaller than this are repeated twice per epoch"
    )
    amp: Literal["auto", "none", "bf16", "fp16"] = Field(
        "auto",
        description="autocast for training, pseudo-labelling and evaluation: auto = bf16 where "
        "it is fast (CUDA with bf16, a CPU with AVX512-BF16 / AMX), else none (fp32); "
        "fp16 is CUDA only",
    )
    channels_last: bool = Field(
        False, description="train in channels_last (not faster for the training step on the "
        "CPUs measured: docs/results/speed_cpu.md)")
    infer_channels_last: bool = Field(
        True, description="frozen models (teacher, pseudo-labelling, selection, evaluation) run "
        "channels_last: same outputs, faster forwards on a CPU in bf16 "
        "(docs/results/infer_layout/speed_cpu.md)")
    ckpt_every: int = Field(200, ge=1, description="checkpoint every N iterations (and at the end)")
    log_every: int = Field(10, ge=1)
    eval_every_epochs: int = Field(0, ge=0, description="0 = only at the end of the stage")
    progress: bool = True


class EvalCfg(BaseModel):
    """How predictions are made for evaluation."""

    model_config = _STRICT
    mode: Literal["whole", "sliding", "multiscale"] = "whole"
    window: int = Field(0, ge=0, description="sliding window side; 0 = train.crop_size")
    stride_ratio: float = Field(2 / 3, gt=0, le=1)
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    flip: bool = True
    batch_size: int = Field(
        8, ge=1, description="validation images of one size predicted together (a CPU runs a "
        "batch several times faster per image than single images)"
    )


class MethodCfg(BaseModel):
    """The semi-supervised method. ``name`` is a preset; explicit keys override it."""

    model_config = _STRICT
    name: str = Field("ciscr", description="a registered method (ciscr.methods.RECIPES)")
    stage1_cisc_loss: bool = Field(True, description="add L_CISC on labeled pairs in stage 1")

    cisc_weight: float = Field(1.0, ge=0)
    pair_views: Literal["independent", "shared"] = Field(
        "independent",
        description="stage-1 partner image augmented on its own (default) or with the anchor's "
        "augmentation epoch ('shared': ciscr before the fix, half the views duplicated)",
    )
    pair_partner: Literal["class", "random"] = Field(
        "class",
        description="stage-1 partner: another labeled image sharing a class (the method) or any "
        "other image ('random': a control, CE only, no L_CISC)",
    )
    pair_loss_norm: Literal["pair", "image"] = Field(
        "pair",
        description="stage-1 loss per PAIR as the paper writes it (CE_i + CE_j + L_CISC: twice "
        "SupOnly's CE scale) or per IMAGE (the same / 2: SupOnly's CE scale)",
    )
    retrain: Literal["none", "one", "two"] = Field(
        "two", description="none = SupOnly; one = retrain once on all; two = reliable then all"
    )
    selection: Literal["cisc", "stpp", "random"] = Field(
        "cisc", description="how unlabeled images are split into reliable/unreliable halves"
    )
    rectify: Literal["none", "query", "bank", "anchor"] = Field(
        "query", description="CISC map source for the rectified loss (none = plain CE)"
    )
    rectify_classes: Literal["one", "all"] = "one"
    query_selection: Literal["cs", "rs", "as"] = Field(
        "cs", description="labeled images allowed as queries: CISC / random / accuracy half"
    )
    cisc_features: Literal["model", "imagenet"] = Field(
        "model", description="features of the CISC maps: stage model or ImageNet backbone"
    )
    num_prototypes: int = Field(1, ge=1, description="prototypes per class (k-means in the mask)")
    min_class_ratio: float = Field(
        0.03, ge=0, lt=1, description="a pseudo class this share of valid pixels can be rectified"
    )
    query_min_class_ratio: float = Field(
        0.03,
        ge=0,
        lt=1,
        description="a labeled image may be queried for class k only if k covers this share of "
        "its valid pixels (0 = any pixel, as the paper)",
    )
    distance: Literal["pixel", "balanced"] = Field(
        "pixel",
        description="Eq. 10 distance D_k: BCE mean over all pixels (the paper) or the mean of the "
        "class-k-pixel and other-pixel means ('balanced': does not favour images where k is small)",
    )
    tta_scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0)
    tta_flip: bool = True
    stpp_snapshots: int = Field(
        2,
        ge=1,
        description="earlier stage-1 checkpoints used by ST++ stability, at evenly spaced "
        "epochs (ST++: 2, at E/3 and 2E/3; the final model is always the last)",
    )
    # ---- the retraining stages (stage-wise family)
    retrain_batches: Literal["split", "mixed"] = Field(
        "split",
        description="'mixed' (ST++): one list of the labeled ids repeated ceil(N_u/N_l) times + "
        "the pseudo-labelled ids, batch B, one CE mean; 'split' (CISC-R): a labeled and an "
        "unlabeled stream, B each, loss_l + loss_u",
    )
    cutout: bool = Field(
        False, description="cutout (p=0.5, image random / label ignored) in the strong "
        "augmentation of pseudo-labelled images (ST++)"
    )
    init: Literal["fresh", "previous"] = Field(
        "fresh",
        description="stages 2/3 start from ImageNet like stage 1 (the paper) or from the "
        "previous stage's model ('previous', ours)",
    )
    unlabeled_weight: float = Field(1.0, ge=0, description="lambda of the unlabeled loss")
    unlabeled_rampup: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of a stage's iterations over which lambda ramps up (sigmoid "
        "exp(-5 (1 - t)^2)); 0 = full weight from the start",
    )
    confidence_threshold: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="pixels whose teacher confidence (TTA softmax max; online: the weak view's) "
        "is below this are ignored in the unlabeled loss (0 = off)",
    )
    labeled_loss: Literal["ce", "ohem"] = Field(
        "ce",
        description="loss of the labeled images: 'ce', or 'ohem' (CE over the hard pixels, "
        "UniMatch's on Cityscapes): SupOnly and the online methods only",
    )
    ohem_thresh: float = Field(
        0.7, gt=0, le=1, description="ohem: pixels whose true-class probability is <= this count")
    ohem_min_kept: int = Field(
        100_000, ge=1, description="ohem: at least this many hardest pixels count, per labeled "
        "image (UniMatch: 200000 per GPU batch of 2 crops)")
    confidence_weighting: bool = Field(
        False, description="multiply the unlabeled loss weight by the teacher's confidence"
    )
    class_balance: bool = Field(
        False,
        description="with confidence_threshold (or confidence_weighting): each class of the "
        "pseudo labels keeps its share of the unlabeled loss, the threshold choosing only which "
        "of its pixels teach (per batch; a class with no pixel kept stays out)",
    )
    image_score: Literal["present", "all"] = Field(
        "present",
        description="Algorithm 1 image distance: sum of D_k over the classes in the pseudo label "
        "(present) or over every class, as Eq. 10 / Algorithm 1 write it (all)",
    )
    # ---- the online family (FixMatch, UniMatch)
    strong_views: int = Field(2, ge=1, le=2, description="online: strongly augmented views")
    unlabeled_every: int = Field(
        1,
        ge=1,
        description="online: the unlabeled branch runs on every k-th step only (the others "
        "train on the labeled batch alone, at a SupOnly step's cost), at the recipe's own "
        "weights; 1 = every step (the published recipes). A lever on the cost per CPU hour "
        "(issue 32), off until protocol 4 shows it helps",
    )
    mix_source: Literal["stream", "batch"] = Field(
        "stream",
        description="online: where a view's CutMix partner comes from. 'stream' (the published "
        "recipes) = a second unlabeled stream, pseudo-labelled by its own forward pass (eval "
        "mode, no gradient); 'batch' = the next image of the same unlabeled batch, with the "
        "weak view's pseudo label and weight: no mixing batch loaded and no extra forward. A "
        "lever on the cost per CPU hour (issue 32), off until protocol 4 shows it helps",
    )
    labeled_weight: float = Field(
        1.0,
        gt=0,
        description="online: weight of the labeled CE in the loss. 1.0 (ciscr) = the labeled "
        "loss exactly as SupOnly trains it, the unlabeled terms added at FixMatch's / "
        "UniMatch's own weights; 0.5 = their code's (CE_l + L_u) / 2, which also halves the "
        "labeled gradient (docs/METHOD-NOTES.md: the labeled weight)",
    )
    feature_perturbation: bool = Field(
        True, description="online: UniMatch's FP branch (Dropout2d on the encoder features)"
    )
    fp_dropout: float = Field(0.5, ge=0, lt=1, description="online: dropout of the FP branch")
    cutmix_p: float = Field(0.5, ge=0, le=1, description="online: CutMix probability per view")
    online_cisc: Literal["none", "alone", "mask"] = Field(
        "none",
        description="online CISC rectification: 'mask' = CISC weight x confidence mask, 'alone' "
        "= CISC weight instead of the confidence mask, 'none' = off",
    )
    prototype_source: Literal["bank", "memory"] = Field(
        "bank",
        description="online CISC: where the labeled class prototypes come from: 'bank' = every "
        "labeled image, whole, through the current model (eval mode), recomputed every "
        "prototype_refresh steps; 'memory' = an EMA of each step's labeled-batch prototypes "
        "(no extra forward pass)",
    )
    prototype_refresh: int = Field(
        50, ge=1, description="online CISC, bank: steps between two recomputations of the bank"
    )
    prototype_bank_images: int = Field(
        64,
        ge=0,
        description="online CISC, bank: labeled images forwarded per refresh (a seeded sample "
        "when the labeled set is larger; a class absent from it keeps its previous prototype); "
        "0 = all. Bounds a refresh's cost on large labeled sets",
    )
    prototype_momentum: float = Field(
        0.9,
        ge=0,
        lt=1,
        description="online CISC, memory: EMA momentum of the class prototypes taken from each "
        "step's labeled batch",
    )
    crop_selection: int = Field(0, ge=0, description="select on crops of this side (0 = whole)")
    bank_views: int = Field(1, ge=1, description="augmented views averaged into the bank")
    score_final_pseudo: bool = Field(
        True,
        description="re-label the unlabeled pool with the final model to score it "
        "(only where its ground truth exists; reporting only, Table 5)",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if v not in METHOD_PRESETS:
            raise ValueError(f"unknown method '{v}'; valid: {', '.join(METHOD_PRESETS)}")
        return v

    def ohem(self) -> tuple[float, int] | None:
        """(thresh, min_kept per image) with ``labeled_loss=ohem``, else None (plain CE)."""
        return (self.ohem_thresh, self.ohem_min_kept) if self.labeled_loss == "ohem" else None

    @model_validator(mode="after")
    def _check_ohem(self) -> MethodCfg:
        # The CISC-R and ST stages keep the paper's CE: refused, not silently ignored.
        if self.labeled_loss == "ohem" and (self.stage1_cisc_loss or self.retrain != "none"):
            raise ValueError("method.labeled_loss=ohem is for SupOnly and the online methods "
                             f"(method.name={self.name} trains stage-wise with CE)")
        return self

    @model_validator(mode="after")
    def _check_mixed_batches(self) -> MethodCfg:
        # Checked here, not when stage 2 starts: the mixed list has no unlabeled stream to
        # rectify, and the user should learn it before stage 1 is trained.
        if self.retrain_batches == "mixed" and self.rectify != "none":
            raise ValueError("method.retrain_batches=mixed trains ST / ST++ without "
                             "rectification: set method.rectify=none or retrain_batches=split")
        return self


# What each preset means (METHOD.md section 8). Keys given explicitly by the user win. The run
# of each name (its stages and steps) is registered in ciscr.methods.RECIPES.
_ONLINE = {"retrain": "none", "rectify": "none", "stage1_cisc_loss": False,
           "confidence_threshold": 0.95}
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "suponly": {"stage1_cisc_loss": False, "retrain": "none", "rectify": "none"},
    "suponly_cisc": {"stage1_cisc_loss": True, "retrain": "none", "rectify": "none"},
    # ST / ST++ as ST++ trains them: one mixed list, cutout, stability from 2 snapshots.
    "st": {"stage1_cisc_loss": False, "retrain": "one", "rectify": "none",
           "retrain_batches": "mixed", "cutout": True},
    "stpp": {"stage1_cisc_loss": False, "retrain": "two", "selection": "stpp", "rectify": "none",
             "retrain_batches": "mixed", "cutout": True},
    # CISC-R trains on the teacher's confident pixels only (0.95, the online methods' threshold):
    # docs/METHOD-NOTES.md, "confident pixels for CISC-R".
    "ciscr": {"stage1_cisc_loss": True, "retrain": "two", "selection": "cisc", "rectify": "query",
              "confidence_threshold": 0.95},
    "ciscr_bank": {
        "stage1_cisc_loss": True,
        "retrain": "two",
        "selection": "cisc",
        "rectify": "bank",
        "rectify_classes": "all",
        "confidence_threshold": 0.95,
    },
    "fixmatch": {**_ONLINE, "strong_views": 1, "feature_perturbation": False},
    "unimatch": {**_ONLINE},
    "unimatch_cisc": {**_ONLINE, "online_cisc": "mask"},
    "custom": {},
}


# The model a method's reference code trains (keys given explicitly by the user win). WHY: the
# ST++ / CISC-R decoder drops half the ASPP channels in training; UniMatch's has no dropout, and
# its online pseudo labels come from that train-mode forward, so the dropout would make them
# noisier and thin out the pixels above its 0.95 threshold.
_NO_DECODER_DROPOUT = {"dropout": 0.0, "aspp_dropout": 0.0}
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    name: _NO_DECODER_DROPOUT for name in ("fixmatch", "unimatch", "unimatch_cisc")}


def method_names() -> list[str]:
    """Every valid ``method.name``."""
    return list(METHOD_PRESETS)


class Config(BaseModel):
    """The whole run. ``ciscr train``/``run``/``eval`` all read this."""

    model_config = _STRICT
    seed: int = 0
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    deterministic: bool = True
    threads: int | Literal["auto"] = Field(
        "auto",
        description="CPU threads torch uses per process: 'auto' = the cores free when the "
        "command starts (other work's load subtracted; OMP_NUM_THREADS / MKL_NUM_THREADS win "
        "when set), N = N, 0 = torch's default (all cores, or OMP_NUM_THREADS), cores / "
        "processes under torchrun on CPU",
    )
    report: bool = Field(
        True,
        description="write report.html when ciscr train/run ends (its figures take seconds on a "
        "CPU); `ciscr report RUN` writes it at any time",
    )
    data: DataCfg = DataCfg()
    model: ModelCfg = ModelCfg()
    train: TrainCfg = TrainCfg()
    eval: EvalCfg = EvalCfg()
    method: MethodCfg = MethodCfg()

    @model_validator(mode="before")
    @classmethod
    def _apply_method_preset(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        method = values.get("method")
        if isinstance(method, dict):
            name = method.get("name", "ciscr")
            preset = METHOD_PRESETS.get(name, {})
            values = {**values, "method": {**preset, **method}}
            # WHY: a run started from a trained model (model.init) keeps what it learned in
            # every later stage too, unless the user asks for the paper's fresh stages.
            model_raw = values.get("model")
            if isinstance(model_raw, dict) and model_raw.get("init") and "init" not in method:
                values["method"]["init"] = "previous"
            model = values.get("model", {})
            if name in MODEL_PRESETS and isinstance(model, dict):
                values["model"] = {**MODEL_PRESETS[name], **model}
        return values

    @field_validator("threads")
    @classmethod
    def _check_threads(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be auto, 0 (torch's default) or a number of threads >= 1")
        return v

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda", "mps") and not v.startswith("cuda:"):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return v


# --------------------------------------------------------------------------- loading

CONFIG_DIR = Path(__file__).parent / "configs"


def builtin_configs() -> list[str]:
    """Names of the configs shipped with the package (``ciscr train synthetic``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A file path, or the name of a packaged config (``camvid`` -> configs/camvid.yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    raise ConfigError(
        f"config '{name_or_path}' is neither a file nor a packaged config "
        f"(packaged: {', '.join(builtin_configs())})"
    )


def _parse_value(text: str) -> Any:
    # YAML's safe loader types the value ("8" -> 8, "[1,2]" -> list, "true" -> bool) and never
    # executes anything; plain strings stay strings. Split names like 1_8 would be read as the
    # YAML 1.1 integer 18, so they are kept as text.
    if re.fullmatch(r"\d+(_\d+)+", text.strip()):
        return text.strip()
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings to a nested dict (a new dict is returned)."""
    out = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.epochs=5)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{key}': '{part}' is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _section_model(loc: list[str]) -> type[BaseModel] | None:
    """The pydantic model that holds the last key of *loc* (None if the path leaves the tree)."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        ann = field.annotation if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _closest_key(loc: list[str]) -> str | None:
    """``train.epochs`` for ``train.epoch``: the nearest valid key of the same section."""
    import difflib

    model = _section_model(loc)
    if model is None or not loc:
        return None
    match = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return ".".join([*loc[:-1], match[0]]) if match else None


def _override_for(loc: list[str], overrides: list[str]) -> str | None:
    """The last ``key=value`` override that set *loc* (or a section above it), if any."""
    dotted = ".".join(loc)
    for item in reversed(overrides):
        key = item.split("=", 1)[0].strip()
        if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
            return item
    return None


def _format_error(err: ValidationError, source: str, overrides: list[str] = ()) -> str:
    first = err.errors()[0]
    parts = [str(x) for x in first["loc"] if not str(x).startswith("function-")]
    loc = ".".join(parts)
    msg = first["msg"]
    if msg.startswith("Value error, "):  # pydantic's prefix for a validator's ValueError
        msg = msg[len("Value error, "):]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
        hint = _closest_key(parts)
        if hint:
            msg += f" (did you mean {hint}?)"
    elif first["type"] == "literal_error":
        msg = f"invalid value {first.get('input')!r}: {msg}"
    elif "input" in first and not isinstance(first["input"], dict):
        msg = f"invalid value {first['input']!r}: {msg}"
    override = _override_for(parts, list(overrides))
    if override is not None:
        # The user typed it on the command line: blame the override, not the YAML file.
        return f"override {override}: {loc or 'config'}: {msg}"
    return f"{source}: {loc or 'config'}: {msg}"


def from_dict(
    raw: dict[str, Any], source: str = "config", overrides: list[str] | None = None
) -> Config:
    """Validate a nested dict into a :class:`Config` (one-line :class:`ConfigError` on failure).

    ``overrides``: the ``key=value`` strings applied to *raw*, so that an error in one of them
    names the override rather than *source*.
    """
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source, overrides or [])) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """YAML file (or packaged name) -> defaults -> ``key=value`` overrides -> :class:`Config`.

    Relative paths written in the YAML file resolve against its folder (a packaged config's:
    against the repository root, see :func:`resolve_yaml_paths`); paths given as overrides
    resolve against the current folder, like any command-line path.
    """
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        p = resolve_config_path(str(path))
        source = str(p)
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML ({str(err).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        raw = resolve_yaml_paths(loaded or {}, p, overrides or [])
    raw = apply_overrides(raw, overrides or [])
    return from_dict(raw, source, overrides)


# --------------------------------------------------------------------------- paths in YAML

# Keys holding a file or folder path. model.pretrained may also be a weight name (imagenet),
# data.labeled a fraction or a count: those are left alone.
# model.pretrained values that name weights rather than a file (ciscr.models.weights'
# NAMED_WEIGHTS, which checks it is the same set: config sits below the models).
WEIGHT_NAMES = ("imagenet",)
PATH_KEYS = (("data", "root"), ("data", "labeled"), ("model", "pretrained"), ("model", "init"))
# A packaged config's paths are defaults for the repository layout (the repo with ../shared
# beside it): they resolve against the repository root, which holds the ciscr package.
REPO_ROOT = CONFIG_DIR.parent.parent
# (key, value as it stays in the config) -> where it was looked for, for the error that says
# it is missing (ciscr.models.backbones, ciscr.data.formats): see path_hint.
_PATH_NOTES: dict[tuple[str, str], str] = {}


def _is_relative_path(key: str, value: Any) -> bool:
    if not isinstance(value, str) or not value or value.startswith("~") or Path(value).is_absolute():
        return False
    if key == "model.pretrained":
        return value not in WEIGHT_NAMES  # imagenet: a name, not a path
    if key == "data.labeled":
        from ciscr.utils.misc import parse_number

        return parse_number(value) is None
    return True


def resolve_yaml_paths(raw: dict[str, Any], yaml_file: Path,
                       overrides: list[str]) -> dict[str, Any]:
    """*raw* with its relative :data:`PATH_KEYS` resolved against *yaml_file*'s folder.

    A path that lands where the current folder would put it stays as written (``ciscr run
    camvid`` from the repo root records ``../shared/...`` as before). A path found only
    relative to the current folder keeps that meaning: a run's saved ``config.yaml`` records
    command-line paths that way, and configs were read so before. Keys set by *overrides* are
    skipped: the command line wins, relative to the current folder.
    """
    packaged = yaml_file.resolve().parent == CONFIG_DIR.resolve()
    base = REPO_ROOT if packaged else yaml_file.parent
    overridden = {o.split("=", 1)[0].strip() for o in overrides}
    out = _deep_copy(raw)
    for section, name in PATH_KEYS:
        key, node = f"{section}.{name}", out.get(section)
        if key in overridden or not isinstance(node, dict) or not _is_relative_path(key,
                                                                                  node.get(name)):
            continue
        node[name] = _resolve_one(key, node[name], base, yaml_file, packaged)
    return out


def _resolve_one(key: str, value: str, base: Path, yaml_file: Path, packaged: bool) -> str:
    """*value* resolved against *base* (absolute) where it exists there, else as written (the
    same place, or found only from the current folder); a path found nowhere stays as written
    and is noted for its error message."""
    log = logging.getLogger("ciscr")
    there, here = os.path.abspath(base / value), os.path.abspath(value)
    against = "the repo root" if packaged else f"the folder of {yaml_file}"
    if there != here and os.path.exists(there):
        log.debug("config path %s=%s -> %s (against %s)", key, value, there, against)
        return there
    if os.path.exists(here):
        log.debug("config path %s=%s -> %s (against the current folder)", key, value, here)
        return value
    where = (f"the packaged config {yaml_file.stem}'s default for the repo layout (the repo "
             f"with ../shared beside it); override it: {key}=PATH" if packaged
             else f"written in {yaml_file}; a path in a YAML file resolves against its folder")
    looked = there if there == here else f"{there}, nor {here} (current folder)"
    _PATH_NOTES[(key, value)] = f"{key}={value}: {where}; looked for {looked}"
    return value


def path_hint(key: str, value: str | os.PathLike) -> str:
    """Where a missing path was looked for, for its error message ('' for an absolute path)."""
    note = _PATH_NOTES.get((key, str(value)))
    if note:
        return f" ({note})"
    if str(value) and not Path(value).expanduser().is_absolute():
        return (f" ({key}: a path on the command line or in a saved run config resolves against "
                f"the current folder, {Path.cwd()})")
    return ""


# Method options a config may set for its own method (synthetic.yaml: CISC-R (bank)'s demo
# recipe); preset_overrides gives any other method its own preset's values instead, so that
# e.g. UniMatch run on that config keeps UniMatch's threshold.
RECIPE_KEYS = ("stage1_cisc_loss", "init", "confidence_threshold")


def preset_overrides(method: str, config: str = "synthetic") -> list[str]:
    """``method.k=v`` overrides restoring ``method``'s preset for :data:`RECIPE_KEYS` where
    the config's method section set them for another method ([] for the config's own)."""
    own = load_config(config, []).method
    if method == own.name:
        return []
    preset = Config.model_validate({"method": {"name": method}}).method
    out = []
    for k in RECIPE_KEYS:
        v = getattr(preset, k)
        out.append(f"method.{k}={str(v).lower() if isinstance(v, bool) else v}")
    return out


def non_default_settings(cfg: Config) -> list[str]:
    """``key=value`` for every setting that differs from its default under ``cfg``'s method
    preset (what -v prints at the start of a command: the config that really runs)."""
    base = config_to_dict(from_dict({"method": {"name": cfg.method.name}}))

    def walk(new: dict[str, Any], old: dict[str, Any], prefix: str) -> list[str]:
        out = []
        for k, v in new.items():
            if isinstance(v, dict):
                out += walk(v, old.get(k, {}), f"{prefix}{k}.")
            elif old.get(k, object()) != v:
                out.append(f"{prefix}{k}={v}")
        return out

    return walk(config_to_dict(cfg), base, "")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain, YAML/JSON-safe dict (tuples become lists)."""
    return cfg.model_dump(mode="json")


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config next to a run (atomically)."""
    from ciscr.utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
