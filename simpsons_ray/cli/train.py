"""``simpsons-ray train`` and ``simpsons-ray evaluate``: flags -> TrainConfig / EvaluateConfig -> one library call."""

from __future__ import annotations

import argparse
import dataclasses

from simpsons_ray.cli.args import add_config_flags, non_negative_int, positive_int, probability
from simpsons_ray.core.errors import UserError


def add_train(sub: argparse._SubParsersAction) -> None:
    from simpsons_ray.train.config import TrainConfig

    p = sub.add_parser("train", help="fine-tune a ResNet on a Kaggle-layout folder with Ray Train")
    recipe = p.add_argument_group("recipe", "--recipe sets every knob below; a knob's own flag overrides it. "
                                  "Defaults shown are the 'default' recipe's.")
    add_config_flags(p, TrainConfig, {"recipe": recipe})
    p.set_defaults(run=run_train)


def train_config(args: argparse.Namespace):
    """The TrainConfig that ``train``'s parsed flags ask for: the recipe's knobs, then each flag given."""
    from simpsons_ray.train.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.for_recipe(args.recipe, **{k: v for k, v in vars(args).items() if k in names and k != "recipe"})


def run_train(args: argparse.Namespace) -> int:
    from simpsons_ray.train.driver import train

    train(train_config(args))
    return 0


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="accuracy, macro-F1 and confusion matrix of a model on a labelled set")
    p.add_argument("--model", required=True, help="model artifact directory (local path or s3://)")
    p.add_argument("--data", required=True, help="ROOT/<character>/*.jpg, or a flat folder of <character>_<N>.jpg")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default %(default)s)")
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line of the metrics")
    p.add_argument("--composites", type=non_negative_int, default=0, metavar="N",
                   help="score N frames composed of 0-3 of the set's characters on real backgrounds (per-character F1, "
                        "exact sets, 'nobody', screen-time error) instead of the single pictures")
    p.add_argument("--seed", type=int, default=0, help="composites: which pictures and frames (default %(default)s)")
    p.add_argument("--boxes", default="", metavar="CSV",
                   help="composites: the pictures' boxes (default: annotation.csv beside --data, if there; 'none': whole pictures)")
    p.add_argument("--min-confidence", type=probability, default=None,
                   help="one probability cut for every character instead of the model's own thresholds (a single-label model: "
                        "the top-1 it needs to name anyone)")
    p.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from simpsons_ray.train.evaluation import EvaluateConfig, evaluate_model

    if args.composites == 0 and args.boxes:
        raise UserError("--boxes applies to --composites N only.")
    evaluate_model(EvaluateConfig(model_uri=args.model, data_uri=args.data, batch_size=args.batch_size, as_json=args.json,
                                  composites=args.composites, seed=args.seed, boxes=args.boxes, min_confidence=args.min_confidence))
    return 0
