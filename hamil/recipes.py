"""Training recipes of ``hamil mil-bench`` as data (``config/reference/recipes.yaml``).

A recipe names the optimizer (``sgd`` or ``adam``), learning rate, momentum (SGD) or betas (Adam), weight
decay, epochs (one number, or per data set with a ``default``), bags per step, dropout, the models that
run it by default, and its source (publication, file and line). Each model runs the recipe that lists it;
a model listed by none runs :data:`DEFAULT_RECIPE`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from preprocessing.errors import InputError

RECIPES_FILE = Path(__file__).resolve().parents[1] / "config" / "reference" / "recipes.yaml"
DEFAULT_RECIPE = "paper"
OPTIMIZERS = ("sgd", "adam")
FIELDS = ("optimizer", "lr", "momentum", "betas", "weight_decay", "epochs", "batch_bags", "dropout")
_KEYS = set(FIELDS) | {"models", "source"}
#: The training values a run needs, all taken from the recipe unless given explicitly.
TRAINING = ("optimizer", "lr", "momentum", "betas", "weight_decay", "epochs", "batch_bags", "dropout")


@dataclass(frozen=True)
class Recipe:
    name: str
    optimizer: str
    lr: float
    weight_decay: float
    epochs: Mapping[str, int]  # data set -> epochs, always with "default"
    batch_bags: int
    dropout: float
    source: str
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    models: tuple[str, ...] = ()

    def epochs_for(self, dataset: str | None) -> int:
        return int(self.epochs.get((dataset or "").lower(), self.epochs["default"]))

    def training(self, dataset: str | None = None) -> dict[str, Any]:
        """The training values for ``dataset`` (epochs per data set where the recipe has them)."""
        values = {k: getattr(self, k) for k in TRAINING}
        values["epochs"] = self.epochs_for(dataset)
        values["betas"] = tuple(self.betas)
        return values


def _number(where: str, value: Any, kind: type, ok: bool | None = None) -> Any:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not isinstance(value, int))
    ):
        raise InputError(f"{where}: must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _parse(name: str, raw: Any, source: str) -> Recipe:
    where = f"{source}: recipe {name!r}"
    if not isinstance(raw, dict):
        raise InputError(f"{where}: must be a mapping of fields")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    missing = [
        k
        for k in ("optimizer", "lr", "weight_decay", "epochs", "batch_bags", "dropout", "source")
        if k not in raw
    ]
    if missing:
        raise InputError(f"{where}: missing field {missing[0]!r}")
    optimizer = str(raw["optimizer"]).lower()
    if optimizer not in OPTIMIZERS:
        raise InputError(
            f"{where}: optimizer must be one of {', '.join(OPTIMIZERS)}, got {raw['optimizer']!r}"
        )
    lr = _number(f"{where} lr", raw["lr"], float)
    wd = _number(f"{where} weight_decay", raw["weight_decay"], float)
    momentum = _number(f"{where} momentum", raw.get("momentum", 0.0), float)
    betas = raw.get("betas", [0.9, 0.999])
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise InputError(f"{where} betas: must be two numbers, got {betas!r}")
    betas = tuple(_number(f"{where} betas", b, float) for b in betas)
    epochs = raw["epochs"]
    epochs = dict(epochs) if isinstance(epochs, dict) else {"default": epochs}
    if "default" not in epochs:
        raise InputError(f"{where} epochs: a per-data-set map needs a 'default'")
    epochs = {str(k).lower(): _number(f"{where} epochs {k}", v, int) for k, v in epochs.items()}
    batch = _number(f"{where} batch_bags", raw["batch_bags"], int)
    dropout = _number(f"{where} dropout", raw["dropout"], float)
    models = raw.get("models", []) or []
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise InputError(f"{where} models: must be a list of model names")
    bad = {
        "lr": lr > 0,
        "weight_decay": wd >= 0,
        "momentum": 0 <= momentum < 1,
        "betas": all(0 <= b < 1 for b in betas),
        "epochs": all(e >= 1 for e in epochs.values()),
        "batch_bags": batch >= 1,
        "dropout": 0 <= dropout < 1,
    }
    for key, ok in bad.items():
        if not ok:
            raise InputError(f"{where}: {key} out of range ({raw.get(key, raw.get('epochs'))!r})")
    return Recipe(
        name=name,
        optimizer=optimizer,
        lr=lr,
        weight_decay=wd,
        epochs=epochs,
        batch_bags=batch,
        dropout=dropout,
        source=str(raw["source"]).strip(),
        momentum=momentum,
        betas=betas,
        models=tuple(models),
    )


def load_recipes(path: str | os.PathLike[str] = RECIPES_FILE) -> dict[str, Recipe]:
    """All recipes of ``path``; a bad file, recipe or field raises :class:`InputError` (one line)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"{path}: cannot read recipes ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{path}: no recipes (expected a mapping of recipe name -> fields)")
    recipes = {str(name): _parse(str(name), fields, str(path)) for name, fields in raw.items()}
    if DEFAULT_RECIPE not in recipes:
        raise InputError(f"{path}: the default recipe {DEFAULT_RECIPE!r} is missing")
    owners: dict[str, str] = {}
    for recipe in recipes.values():
        for model in recipe.models:
            if model in owners:
                raise InputError(
                    f"{path}: model {model!r} is listed by recipes {owners[model]!r} and {recipe.name!r}"
                )
            owners[model] = recipe.name
    return recipes


def get_recipe(name: str, recipes: Mapping[str, Recipe] | None = None) -> Recipe:
    recipes = load_recipes() if recipes is None else recipes
    if name not in recipes:
        raise InputError(f"unknown recipe {name!r} (known: {', '.join(recipes)})")
    return recipes[name]


def recipe_for(model: str, recipes: Mapping[str, Recipe] | None = None) -> Recipe:
    """The recipe ``model`` runs by default: the one listing it, else :data:`DEFAULT_RECIPE`."""
    recipes = load_recipes() if recipes is None else recipes
    for recipe in recipes.values():
        if model in recipe.models:
            return recipe
    return recipes[DEFAULT_RECIPE]


def choose(models: Sequence[str], recipe: str | None = None) -> dict[str, Recipe]:
    """Recipe per model: ``recipe`` for all when given, else each model's own."""
    recipes = load_recipes()
    if recipe is not None:
        forced = get_recipe(recipe, recipes)
        return {m: forced for m in models}
    return {m: recipe_for(m, recipes) for m in models}
