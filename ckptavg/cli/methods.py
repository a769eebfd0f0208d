"""The averaging commands (`swa`, `ema`, `graft`, `linear`, `soup`) and their own options.

Each is registered twice by `add_method`: `ckptavg NAME` does the work, `ckptavg plan NAME` shows it.
"""

from typing import Annotated, Any

import typer

from ..errors import PlanError
from ..methods.ema import Ema
from ..methods.graft import GROUPINGS, MODES, Graft
from ..methods.linear import Linear, parse_weights
from ..methods.schedules import HOLDS, INITS
from ..methods.soup import Soup
from ..methods.uniform import Swa
from ..userfn import load_callable
from .app import _opt, add_method, choices

M = "Method"


Hold = choices("Hold", HOLDS)
Init = choices("Init", INITS)
GraftMode = choices("GraftMode", MODES)
GraftGroups = choices("GraftGroups", GROUPINGS)
SoupMode = choices("SoupMode", ("max", "min"))
Per = choices("Per", ("checkpoint", "step"))


def _o(name: str, annotation: Any, default: Any, help: str, **kw: Any) -> Any:
    return _opt(name, Annotated[annotation, typer.Option(help=help, rich_help_panel=M, **kw)], default)


add_method(
    "swa", Swa, [],
    help="Uniform average of the selected checkpoints (stochastic weight averaging).\n\n"
    "Example: ckptavg swa runs/ --last 5 -o avg.safetensors",
)


def _per(decay: float | None, step_decay: float | None, sigma_rel: float | None, per: str | None) -> tuple[
        float | None, float | None]:
    """Fold `--per` into (decay, step_decay): `--decay B --per step` is `--step-decay B`. The other two
    modes already say what one update is, so there `--per` may only repeat it. Two modes at once are left
    for `Ema` to refuse."""
    alone = [v is not None for v in (decay, step_decay, sigma_rel)].count(True) == 1
    if per == "step" and decay is not None and alone:
        return None, decay
    if per == "checkpoint" and decay is None and alone:
        given = "--step-decay" if step_decay is not None else "--sigma-rel"
        raise PlanError(f"--per checkpoint goes with --decay; {given} is per optimizer step "
                        "(use --decay B --per checkpoint, or drop --per).")
    return decay, step_decay


def _ema(**kw: Any) -> Ema:
    decay, step_decay = _per(kw["decay"], kw["step_decay"], kw["sigma_rel"], kw["per"] and kw["per"].value)
    return Ema(decay=decay, step_decay=step_decay, sigma_rel=kw["sigma_rel"], warmup=kw["warmup"],
               warmup_gamma=kw["warmup_gamma"], warmup_power=kw["warmup_power"], min_decay=kw["min_decay"],
               update_after_step=kw["update_after_step"], hold=kw["hold"].value, init=kw["init"].value)


add_method(
    "ema", _ema,
    [
        _o("decay", float | None, None, "EMA with this decay: one update per checkpoint, in checkpoint order "
           "(or per optimizer step with --per step).", min=0.0, max=1.0),
        _o("per", Per | None, None, "What one --decay update stands for: a checkpoint (the default) or an "
           "optimizer step (the same as --step-decay B; needs step metadata)."),
        _o("step_decay", float | None, None, "EMA per optimizer step with this decay (needs step metadata).",
           min=0.0, max=1.0),
        _o("sigma_rel", float | None, None, "EDM2 power-function EMA of relative width S (0 < S < 0.289)."),
        _o("warmup", bool, False, "--step-decay: timm ModelEmaV3 warmup, decay = 1-(1+k/gamma)^-power."),
        _o("warmup_gamma", float, 1.0, "--step-decay --warmup: gamma."),
        _o("warmup_power", float, 2 / 3, "--step-decay --warmup: power."),
        _o("min_decay", float, 0.0, "--step-decay --warmup: lower bound of the decay.", min=0.0, max=1.0),
        _o("update_after_step", int, 0, "--step-decay: the EMA copies the weights up to this step.", min=0),
        _o("hold", Hold, Hold("backward"), "Which optimizer steps a sparse checkpoint stands for: since the "
           "previous save (backward), nearest save (midpoint), or until the next save (forward)."),
        _o("init", Init, Init("first"), "Where the initial mass goes: onto the first checkpoint (first), spread by "
           "renormalising (bias-correct), or dropped (zero)."),
    ],
    help="Exponential moving average weights over checkpoints, computed in closed form.\n\n"
    "Examples: ckptavg ema runs/ --decay 0.9 -o ema.safetensors | "
    "ckptavg ema runs/ --decay 0.999 --per step --warmup -o ema.safetensors | "
    "ckptavg ema runs/ --sigma-rel 0.1 -o ema.safetensors",
)


def _round_digits(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise PlanError(f"--round-digits must be an integer >= 0 or 'none', not {text!r}.") from None


add_method(
    "graft",
    lambda **kw: Graft(a=kw["a"], c=kw["c"], bins=kw["bins"], mode=kw["mode"].value, groups=kw["groups"].value,
                       round_digits=_round_digits(kw["round_digits"])),
    [
        _o("a", float, 0.4, "Coefficient range: weights lie within 0.5 +- a/2 for two checkpoints.", min=0.0, max=1.0),
        _o("c", float, 500.0, "Sharpness of the arctan in the entropy difference.", min=0.0),
        _o("bins", int, 10, "Histogram bins of the layer entropy.", min=1),
        _o("mode", GraftMode, GraftMode("pairwise"), "How N checkpoints are grafted."),
        _o("groups", GraftGroups, GraftGroups("auto"), "auto: every 2+-D tensor has its own weights; conv: keys "
           "containing 'conv' (the paper's code)."),
        _o("round_digits", str, "2", "Decimals of each coefficient, as the paper's code rounds them; 'none' to keep all."),
    ],
    help="Entropy-weighted filter grafting: each layer weighted by the information (histogram entropy) it carries.\n\n"
    "Example: ckptavg graft a.pt b.pt -o grafted.safetensors",
)

add_method(
    "linear",
    lambda **kw: Linear(parse_weights(kw["weights"]), kw["normalize"]),
    [
        _o("weights", str, ..., "Comma-separated weights, one per selected checkpoint in order.", show_default=False),
        _o("normalize", bool, False, "Divide the weights by their sum."),
    ],
    help="Average with your own weights.\n\nExample: ckptavg linear a.pt b.pt c.pt --weights 0.2,0.3,0.5 -o out.safetensors",
)


def _soup(**kw: Any) -> Soup:
    spec = kw["eval"]
    fn = load_callable(spec, "evaluate", PlanError) if spec else None
    return Soup(evaluate=fn, mode=kw["mode"].value, uniform=kw["uniform"], strict=kw["strict"], name=spec)


add_method(
    "soup", _soup,
    [
        _o("eval", str | None, None, "MODULE:FUNCTION or file.py:FUNCTION taking a state dict and returning a score."),
        _o("mode", SoupMode, SoupMode("max"), "max if a higher score is better, min for losses."),
        _o("uniform", bool, False, "Uniform soup of every selected checkpoint (no --eval needed)."),
        _o("strict", bool, False, "Add a checkpoint only if it improves the score (default: also on ties)."),
    ],
    help="Model soup: greedy (keep a checkpoint only if the average scores no worse) or uniform.\n\n"
    "Example: ckptavg soup runs/ --eval evals.py:accuracy -o soup.safetensors",
)
