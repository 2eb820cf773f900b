"""Everything a training run depends on, in one frozen dataclass: each setting's default and its help live here.

``simpsons-ray train``'s flags are built from these fields (:func:`flags`: each
field's metadata gives its flag, help, kind of value and group), so a default or a
help text is written once. The recipe knobs' defaults are the "default" recipe;
``--recipe notebook`` replaces them with :data:`simpsons_ray.train.recipe.NOTEBOOK`,
and a knob's own flag overrides either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from simpsons_ray.core.errors import UserError
from simpsons_ray.model.preprocess import AUGMENT_POLICIES, AugmentConfig, PreprocessConfig
from simpsons_ray.train.mixing import Mix
from simpsons_ray.train.recipe import LR_SCHEDULES, OPTIMIZERS, RECIPE_OVERRIDES
from simpsons_ray.train.selection import THRESHOLD_RULES

# "multilabel": a sigmoid per character, trained on composed frames of 0-3 characters
# (simpsons_ray.train.compose); "single": a softmax over characters, one per picture.
OBJECTIVES = ("multilabel", "single")
RECIPES = ("default", *RECIPE_OVERRIDES)

# Kinds of value a flag takes; the CLI turns each into an argparse type that says what is wrong.
POSITIVE_INT, INT, OPTIONAL_INT, FRACTION, UNIT_INTERVAL = "positive_int", "int", "optional_int", "fraction", "unit_interval"
POSITIVE_FLOAT, NON_NEGATIVE_FLOAT, STAGES, SWITCH, ON_OFF, TEXT = "positive_float", "non_negative_float", "stages", "switch", "on_off", "text"
URIS = "uris"  # a repeatable flag: each use adds one


def setting(default: Any, help: str, *, flag: str | None = None, kind: str = TEXT, choices: tuple[str, ...] | None = None,
            recipe: bool = False, required: bool = False, metavar: str | None = None, parent: bool = False) -> Any:
    """A TrainConfig field and its flag: ``--name-with-dashes`` unless ``flag`` says otherwise; ``recipe`` knobs form a group.

    A flag's default shows in its help; a recipe knob's flag defaults to "not given",
    so that ``--recipe`` decides what it is unless the flag is given. So does a
    ``parent`` setting's, which an ``--init-from`` model fixes: not given, it is the model's.
    """
    return field(default=default, metadata={"help": help, "flag": flag, "kind": kind, "choices": choices, "recipe": recipe,
                                            "required": required, "metavar": metavar, "parent": parent})


def no_flag(default: Any) -> Any:
    return field(default=default, metadata={"flag": None, "hidden": True})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved in the artifact's config.json and in the run's record."""

    data_uris: tuple[str, ...] = setting((), "training images, ROOT/<character>/*.jpg (local path or s3://); repeat --data to pool "
                                         "several roots, the characters of all of them; ROOT/_nobody/ holds frames that show nobody",
                                         flag="--data", kind=URIS, required=True, metavar="ROOT")
    output_uri: str = setting("", "model artifact directory (local path or s3://); rerun to resume", flag="--output", required=True)
    init_from: str = setting("", "start from this model artifact (local path or s3://), keeping its characters in their order and "
                             "appending new ones; its arch, image size, head and objective are the run's", metavar="MODEL")
    objective: str = setting("multilabel", "multilabel: a sigmoid per character, trained on pictures as they are, scenes of several and "
                             "composed frames of 0-3 characters, so a frame can hold several or nobody; single: a softmax, one character per picture", choices=OBJECTIVES, parent=True)
    boxes: str = setting("", "multilabel: the pictures' bounding boxes (path,x1,y1,x2,y2,character; default: annotation.csv beside "
                         "each --data, if there, for that root's pictures); 'none': whole pictures, flat backgrounds", metavar="CSV")
    # What a multi-label model's training frames are made of (simpsons_ray.train.mixing), and its thresholds.
    whole_share: float = setting(0.6, "multilabel: share of training frames that are a picture as it is", kind=UNIT_INTERVAL)
    scene_share: float = setting(0.1, "multilabel: share that are scenes of two or three pictures side by side or inset; the rest "
                                 "are composed of 0-3 characters cut to their boxes", kind=UNIT_INTERVAL)
    other_weight: float = setting(0.1, "multilabel: loss weight of 'absent' for the characters a picture or scene does not name "
                                  "(they may be in it)", kind=UNIT_INTERVAL)
    whole_ce: float = setting(1.0, "multilabel: weight of a softmax cross-entropy on pictures, asking that their character "
                              "be the most likely", kind=NON_NEGATIVE_FLOAT)
    strangers: bool = setting(True, "multilabel: the characters under --min-images-per-class train as strangers, named as nobody "
                              "(--no-strangers drops them)", kind=ON_OFF)
    threshold_rule: str = setting("count", "multilabel: per-character thresholds chosen on validation to name each character on as "
                                  "many frames as it is on (count: screen time) or for maximum F1 (f1)", flag="--thresholds",
                                  choices=THRESHOLD_RULES)
    arch: str = setting("resnet50", "resnet18, resnet34, resnet50 or resnet101", parent=True)
    # With --init-from every weight comes from that model: --weights is refused, and the run records "none".
    weights: str = setting("imagenet", "imagenet, none, or a state dict PATH_OR_URI; not with --init-from", parent=True)
    image_size: int = setting(224, "square input size", kind=POSITIVE_INT, parent=True)
    num_workers: int = setting(2, "Ray Train workers", kind=POSITIVE_INT)
    use_gpu: bool = setting(False, "one GPU per worker, mixed precision", flag="--gpu", kind=SWITCH)
    batch_size: int = setting(32, "images per worker per step", kind=POSITIVE_INT)
    frozen_epochs: int = setting(5, "phase 1: head only (with --init-from, only when characters are added)", kind=INT)
    finetune_epochs: int = setting(10, "phase 2: head + --unfreeze stages", kind=INT)
    unfreeze: tuple[str, ...] = setting(("layer4",), "stages trained in phase 2, e.g. layer3,layer4", kind=STAGES)
    val_fraction: float = setting(0.15, "share per class for validation: early stopping, best epoch, LR schedule, calibration",
                                  kind=FRACTION)
    test_fraction: float = setting(0.15, "share per class for test, scored once at the end and never used for a decision; "
                                   "0: no test split", kind=UNIT_INTERVAL)
    seed: int = setting(0, "split and init seed", kind=INT)
    min_images_per_class: int = setting(0, "drop rarer characters", kind=INT)
    max_images_per_class: int | None = setting(None, "cap per character, for quick runs (default: no cap)", kind=OPTIONAL_INT)
    patience: int = setting(3, "early stop after this many epochs without val-loss gain", kind=INT)
    max_failures: int = setting(2, "worker failures to recover from", kind=INT)
    # The recipe (simpsons_ray.train.recipe): these defaults are the "default" recipe.
    recipe: str = setting("default", "default: AdamW, warm-up + cosine, label smoothing, linear head; notebook: the original "
                          "notebook's Adam with the LR divided on plateau and a Dense(512) + Dropout(0.5) head", choices=RECIPES)
    optimizer: str = setting("adamw", "adamw (decoupled weight decay), adam or sgd", choices=OPTIMIZERS, recipe=True)
    lr: float = setting(2e-3, "phase 1 learning rate, or the only phase's with --weights none", kind=POSITIVE_FLOAT, recipe=True)
    # Not measured: no ImageNet weights on the machine that chose the rest of the recipe.
    finetune_lr: float = setting(2e-4, "phase 2 learning rate", kind=POSITIVE_FLOAT, recipe=True)
    weight_decay: float = setting(0.05, "decoupled with adamw, L2 with adam", kind=NON_NEGATIVE_FLOAT, recipe=True)
    lr_schedule: str = setting("cosine", "cosine: warm-up then anneal to 0 over each phase, per step; plateau: divide the LR by 10 "
                               "after --lr-patience flat epochs", choices=LR_SCHEDULES, recipe=True)
    warmup_epochs: float = setting(1.0, "cosine: linear warm-up length", kind=NON_NEGATIVE_FLOAT, recipe=True)
    lr_patience: int = setting(1, "plateau: flat epochs before the LR is divided", kind=INT, recipe=True)
    lr_factor: float = no_flag(0.1)
    label_smoothing: float = setting(0.1, "softmax targets smoothed by this much", kind=UNIT_INTERVAL, recipe=True)
    # The linear head was worth 8 points on the real Kaggle frames (bench/RESULTS.md, "Recipe").
    head_hidden: int = setting(0, "units of a hidden layer in the head; 0: linear head", kind=INT, recipe=True, parent=True)
    dropout: float = setting(0.0, "before the head's last layer", kind=UNIT_INTERVAL, recipe=True)
    augment_policy: str = setting("none", "policy on top of rotation/shift/zoom/flip", flag="--augment", choices=AUGMENT_POLICIES,
                                  recipe=True)
    random_erasing: float = setting(0.0, "probability of erasing a rectangle", kind=UNIT_INTERVAL, recipe=True)
    mixup_alpha: float = setting(0.0, "0: off", kind=NON_NEGATIVE_FLOAT, recipe=True)
    cutmix_alpha: float = setting(0.0, "0: off", kind=NON_NEGATIVE_FLOAT, recipe=True)
    ema_decay: float = setting(0.0, "weight moving average per step; 0: off", kind=UNIT_INTERVAL, recipe=True)
    tta_flip: bool = setting(False, "score each image and its mirror, in validation, evaluate and label", kind=ON_OFF, recipe=True)

    # Settings that may change between a run and its resumption (where it runs,
    # not what it learns).
    RESUMABLE_CHANGES = ("num_workers", "use_gpu", "max_failures")

    def __post_init__(self) -> None:
        # One root given as a string (a caller from Python, a record older than several roots) is a root, not its letters.
        roots = (self.data_uris,) if isinstance(self.data_uris, str) else tuple(self.data_uris)
        object.__setattr__(self, "data_uris", roots)

    @classmethod
    def for_recipe(cls, recipe: str = "default", **settings: Any) -> "TrainConfig":
        """``recipe``'s knobs, then ``settings`` on top (a None setting keeps the recipe's value).

        With ``init_from``, a ``parent`` setting left None is the model's own (and ``weights``
        is "none": every weight comes from the model); one given stays, for the driver to
        check against the model.
        """
        if recipe not in RECIPES:
            raise UserError(f"--recipe {recipe} is not one of {', '.join(RECIPES)}.")
        given = {k: v for k, v in settings.items() if v is not None}
        if given.get("init_from"):
            from simpsons_ray.model.artifact import read_artifact_config

            model_config, _ = read_artifact_config(given["init_from"], flag="--init-from")
            given = parent_settings(model_config) | {"weights": "none"} | given
        knobs = RECIPE_OVERRIDES.get(recipe, {}) | given
        return cls(recipe=recipe, **knobs)

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=self.image_size)

    @property
    def mix(self) -> Mix:
        return Mix(self.whole_share, self.scene_share, self.other_weight, self.whole_ce)

    @property
    def augment(self) -> AugmentConfig:
        return AugmentConfig(policy=self.augment_policy, erasing=self.random_erasing)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["unfreeze"], out["data_uris"] = list(self.unfreeze), list(self.data_uris)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = _older_fields(dict(data))
        data["unfreeze"] = tuple(data["unfreeze"])
        return cls(**data)


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a TrainConfig field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_choices(config: TrainConfig) -> None:
    """One sentence for a setting outside its choices (argparse checks them for the CLI; this is for callers from Python)."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise UserError(f"{flag_of(f)} {getattr(config, f.name)} is not one of {', '.join(choices)}.")


def recipe_defaults(recipe: str) -> dict[str, Any]:
    """Every recipe knob's value under ``recipe``."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.metadata.get("recipe")}
    return defaults | RECIPE_OVERRIDES.get(recipe, {})


def parent_settings(model_config: dict[str, Any]) -> dict[str, Any]:
    """The settings a model artifact's config.json fixes for a run that starts from it (its ``parent`` settings but weights)."""
    return {"arch": model_config["arch"], "image_size": int(model_config["image_size"]),
            # As load_artifact reads them: older artifacts are single-label, with the notebook's head.
            "objective": str(model_config.get("objective", "single")), "head_hidden": int(model_config.get("head_hidden", 512))}


def _older_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Records and artifacts in the fields of their day, in today's.

    Older than the flat fields, they kept ``augment: {policy, erasing, ...}``; older
    than several ``--data`` roots, ``data_uri``: one root, a string.
    """
    augment = data.pop("augment", None)
    if isinstance(augment, dict):
        data.setdefault("augment_policy", augment.get("policy", "none"))
        data.setdefault("random_erasing", augment.get("erasing", 0.0))
    if "data_uri" in data:
        root = data.pop("data_uri")
        data.setdefault("data_uris", [root] if isinstance(root, str) else list(root))
    return data


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    lr: float
    trainable: tuple[str, ...] | str  # stage names, or "all"


def plan_phases(config: TrainConfig, added_classes: bool = False) -> list[Phase]:
    """The phases a run goes through, skipping empty ones; ``added_classes``: an ``--init-from`` run's head grew."""
    if config.init_from:
        # The model's head is trained already: a frozen phase would only retrain it, so the run goes straight to
        # fine-tuning, at the gentler --finetune-lr. Characters the model lacked get fresh head rows, whose first
        # gradients are large and random: they learn on the frozen network first, as a new head does on ImageNet's.
        phases = [Phase("frozen", config.frozen_epochs, config.lr, ())] if added_classes else []
        phases.append(Phase("finetune", config.finetune_epochs, config.finetune_lr, tuple(config.unfreeze)))
    elif config.weights == "none":
        phases = [Phase("full", config.finetune_epochs, config.lr, "all")]
    else:
        phases = [
            Phase("frozen", config.frozen_epochs, config.lr, ()),
            Phase("finetune", config.finetune_epochs, config.finetune_lr, tuple(config.unfreeze)),
        ]
    return [p for p in phases if p.epochs > 0]


def recorded_config(record: dict[str, Any]) -> dict[str, Any]:
    """A run record as a full config: a setting it lacks ran with the default of its day.

    Records older than ``--recipe`` ran the notebook's recipe, without a test split;
    records older than ``--objective`` trained a softmax.
    """
    record = _older_fields(dict(record))
    legacy = "recipe" not in record
    base = TrainConfig.for_recipe("notebook", test_fraction=0.0) if legacy else TrainConfig.for_recipe(record["recipe"])
    return base.to_dict() | {"objective": "single", "boxes": ""} | record
