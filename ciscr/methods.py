"""Methods as registered recipes: which stages a method runs (and so what each step computes).

``method.name`` picks a :class:`Recipe` from :data:`RECIPES`; its switches (``method.*``, with
the preset of ``ciscr.config.METHOD_PRESETS``) parametrise the family's stages:

- ``stagewise`` (SupOnly, ST, ST++, CISC-R): stage1 -> pseudo0 -> selection -> stage2 ->
  pseudo1 -> stage3 (``ciscr.pipeline``), each with its own step function;
- ``online`` (FixMatch, UniMatch, UniMatch + CISC): one stage (``ciscr.online``).

Every method then ends the same way (``pseudo_final`` where the unlabeled pool has ground truth,
``results.json``), and runs through the same ``ciscr train/run/eval``, run directory,
checkpoint and resume, DDP, bf16, report, bench and demo.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ciscr.config import METHOD_PRESETS, Config, MethodCfg
from ciscr.errors import ConfigError

if TYPE_CHECKING:
    from ciscr.run_services import RunContext

StageRun = Callable[["RunContext"], tuple[dict[str, dict[str, Any]], str]]


def online_only_settings(cfg: Config) -> list[str]:
    """The online family's cost levers set away from their defaults (a stage-wise method has
    no such branch: it would ignore them)."""
    return [key for key, moved in (
        ("train.unlabeled_resolution", cfg.train.unlabeled_resolution != 1.0),
        ("method.unlabeled_every", cfg.method.unlabeled_every != 1),
        ("method.mix_source", cfg.method.mix_source != "stream")) if moved]


def _stagewise(ctx: RunContext) -> tuple[dict[str, dict[str, Any]], str]:
    from ciscr.pipeline import run_stagewise

    moved = online_only_settings(ctx.cfg)
    if moved:  # refused, not silently ignored
        raise ConfigError(f"{', '.join(moved)}: settings of the online methods (fixmatch, "
                          f"unimatch, unimatch_cisc); method.name={ctx.cfg.method.name} trains "
                          "stage-wise and has no unlabeled branch to apply them to")
    return run_stagewise(ctx)


def _online(ctx: RunContext) -> tuple[dict[str, dict[str, Any]], str]:
    from ciscr.online import run_online

    return run_online(ctx)


def _stagewise_stages(m: MethodCfg) -> list[str]:
    if m.retrain == "none":
        return ["stage1"]
    names = ["stage1", "pseudo0"]
    if m.rectify != "none" or m.retrain == "two":
        names.append("selection")
    return names + (["stage2"] if m.retrain == "one" else ["stage2", "pseudo1", "stage3"])


@dataclass(frozen=True)
class Recipe:
    """A method: its family, one line for the help and README, its stage folders in order
    (``pseudo_final`` excluded), and the function that runs them."""

    family: str
    summary: str
    stages: Callable[[MethodCfg], list[str]]
    run: StageRun


_STAGEWISE = {"family": "stagewise", "stages": _stagewise_stages, "run": _stagewise}
_ONLINE = {"family": "online", "stages": lambda m: ["online"], "run": _online}

RECIPES: dict[str, Recipe] = {
    "suponly": Recipe(summary="CE on the labeled images only", **_STAGEWISE),
    "suponly_cisc": Recipe(summary="SupOnly + L_CISC on class-sharing pairs", **_STAGEWISE),
    "st": Recipe(summary="self-training: pseudo-label everything, retrain once", **_STAGEWISE),
    "stpp": Recipe(summary="ST++: the stability-selected reliable half first", **_STAGEWISE),
    "ciscr": Recipe(summary="CISC-R, the paper (query mode)", **_STAGEWISE),
    "ciscr_bank": Recipe(summary="CISC-R with a prototype bank, every class", **_STAGEWISE),
    "custom": Recipe(summary="stage-wise, every switch explicit", **_STAGEWISE),
    "fixmatch": Recipe(summary="FixMatch: weak -> one strong view with CutMix", **_ONLINE),
    "unimatch": Recipe(summary="UniMatch: two strong views + feature perturbation", **_ONLINE),
    "unimatch_cisc": Recipe(summary="UniMatch + CISC rectification (ours)", **_ONLINE),
}


def register_method(name: str, recipe: Recipe, preset: dict[str, Any] | None = None) -> None:
    """Add a method: ``recipe`` (its stages and the function that runs them) here, and its
    ``method.*`` preset in :data:`ciscr.config.METHOD_PRESETS` (what makes
    ``method.name=<name>`` a valid setting). A method written in its own file (or a test) calls
    this once at import; docs/DESIGN.md "Adding a method" walks through one.
    """
    if name in RECIPES or name in METHOD_PRESETS:
        raise ConfigError(f"method.name: '{name}' is registered already")
    RECIPES[name] = recipe
    METHOD_PRESETS[name] = dict(preset or {})


def unregister_method(name: str) -> None:
    """Remove a method added by :func:`register_method` (tests clean up with it)."""
    RECIPES.pop(name, None)
    METHOD_PRESETS.pop(name, None)


def get_recipe(name: str) -> Recipe:
    """The recipe registered as ``name``; ConfigError listing the valid names otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(
            f"method.name: unknown method '{name}'; valid: {', '.join(RECIPES)}"
        ) from None


def stage_names(m: MethodCfg) -> list[str]:
    """The stage folders a configured method makes, in order (``pseudo_final`` excluded)."""
    return get_recipe(m.name).stages(m)


def run_method(ctx: RunContext) -> dict[str, Any]:
    """Run or finish every stage of the configured method; returns the run's summary."""
    from ciscr.run_services import evaluate_init, finish_run

    start = evaluate_init(ctx)  # model.init of a method that trains on from it: the start
    stages, final = get_recipe(ctx.cfg.method.name).run(ctx)
    return finish_run(ctx, {"init": start, **stages} if start else stages, final)


assert set(RECIPES) == set(METHOD_PRESETS), "every preset needs a recipe and vice versa"
