"""The method options, each an `Annotated` alias shared by a command and its `plan` twin, and the options of
several outputs: `--window`/`--stride` (which shape the weights) and `--eval`/`--eval-mode`/`--keep`.

Every option that takes a number or a name takes a comma list too (`lists.py`): one output per value.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .lists import Floats, Ints, Names, floats, ints, names
from .options import EVALUATION, METHOD, OUTPUT, GraftGroups, GraftMode, Hold, Init, Keep, Per, Schedule, SoupMode

# ---------------------------------------------------------------- defaults (one object each, shared by the twins)

WARMUP_GAMMA, WARMUP_POWER, MIN_DECAY = Floats((1.0,)), Floats((2 / 3,)), Floats((0.0,))
UPDATE_AFTER_STEP, HOLD, INIT = Ints((0,)), Names(("backward",)), Names(("first",))
GRAFT_A, GRAFT_C, GRAFT_BINS = Floats((0.4,)), Floats((500.0,)), Ints((10,))
GRAFT_MODE, GRAFT_GROUPS, SCHEDULE = Names(("pairwise",)), Names(("auto",)), Names(("minus-sqrt",))

# ---------------------------------------------------------------- ema

DecayOpt = Annotated[Floats | None, typer.Option(
    parser=floats(0.0, 1.0), metavar="B", rich_help_panel=METHOD,
    help="EMA with this decay: one update per checkpoint, in checkpoint order (or per optimizer step with --per step).")]
PerOpt = Annotated[Per | None, typer.Option(
    metavar="UNIT", rich_help_panel=METHOD, help="What one --decay update stands for: checkpoint (the default) "
    "or step (an optimizer step: the same as --step-decay B).")]
StepDecayOpt = Annotated[Floats | None, typer.Option(
    parser=floats(0.0, 1.0), metavar="B", rich_help_panel=METHOD,
    help="EMA per optimizer step with this decay (needs step metadata).")]
SigmaRelOpt = Annotated[Floats | None, typer.Option(
    parser=floats(0.0, open_lo=True), metavar="S", rich_help_panel=METHOD,
    help="EDM2 power-function EMA of relative width S (0 < S < 0.289).")]
WarmupOpt = Annotated[bool, typer.Option(
    "--warmup", rich_help_panel=METHOD, help="Per-step EMA: timm ModelEmaV3 warmup, decay = 1-(1+k/gamma)^-power.")]
WarmupGammaOpt = Annotated[Floats, typer.Option(
    parser=floats(0.0, open_lo=True), metavar="G", rich_help_panel=METHOD, help="--warmup: gamma.")]
WarmupPowerOpt = Annotated[Floats, typer.Option(
    parser=floats(0.0, open_lo=True), metavar="P", show_default="0.667", rich_help_panel=METHOD,
    help="--warmup: power (the default is exactly 2/3).")]
MinDecayOpt = Annotated[Floats, typer.Option(
    parser=floats(0.0, 1.0), metavar="B", rich_help_panel=METHOD, help="--warmup: lower bound of the decay.")]
UpdateAfterStepOpt = Annotated[Ints, typer.Option(
    parser=ints(0), metavar="STEP", rich_help_panel=METHOD, help="Per-step EMA: the EMA copies the weights up to this step.")]
_HOLD = ("Steps a sparse checkpoint stands for: backward (since the previous save), midpoint, or forward (until the "
         "next save).")
HoldOpt = Annotated[Names, typer.Option(parser=names(Hold), metavar="HOLD", rich_help_panel=METHOD, help=_HOLD)]
InitOpt = Annotated[Names, typer.Option(
    parser=names(Init), metavar="INIT", rich_help_panel=METHOD, help="Initial mass: onto the first checkpoint (first), "
    "spread by renormalising (bias-correct), or dropped (zero).")]

# ---------------------------------------------------------------- graft

GraftAOpt = Annotated[Floats, typer.Option(
    "--a", parser=floats(0.0, 1.0), metavar="A", rich_help_panel=METHOD,
    help="Coefficient range: weights lie within 0.5 +- A/2 for two checkpoints.")]
GraftCOpt = Annotated[Floats, typer.Option(
    "--c", parser=floats(0.0), metavar="C", rich_help_panel=METHOD, help="Sharpness of the arctan in the entropy difference.")]
GraftBinsOpt = Annotated[Ints, typer.Option(
    parser=ints(1), metavar="N", rich_help_panel=METHOD, help="Histogram bins of the layer entropy.")]
GraftModeOpt = Annotated[Names, typer.Option(
    parser=names(GraftMode), metavar="MODE", rich_help_panel=METHOD,
    help="How N checkpoints are grafted: pairwise (mean of all pairs), cyclic (the paper's ring) or sequential.")]
GraftGroupsOpt = Annotated[Names, typer.Option(
    parser=names(GraftGroups), metavar="GROUPS", rich_help_panel=METHOD,
    help="auto: every 2+-D tensor has its own weights; conv: keys containing 'conv' (the paper's code).")]
RoundDigitsOpt = Annotated[str, typer.Option(
    metavar="N", rich_help_panel=METHOD,
    help="Decimals of each coefficient, as the paper's code rounds them; 'none' to keep all.")]

# ---------------------------------------------------------------- linear (and --weights lr)

WeightsOpt = Annotated[str, typer.Option(
    metavar="W,W,...", show_default=False, rich_help_panel=METHOD,
    help="Comma-separated weights, one per selected checkpoint in order; or 'lr': weights from each checkpoint's "
    "learning rate.")]
NormalizeOpt = Annotated[bool, typer.Option("--normalize", rich_help_panel=METHOD, help="Divide the weights by their sum.")]
LrPowerOpt = Annotated[Floats | None, typer.Option(
    parser=floats(0.0, open_lo=True), metavar="P", rich_help_panel=METHOD,
    help="--weights lr: weight by the sum of lr^P over each checkpoint's steps (default 1; 2 is schedule-free's).")]
LrHoldOpt = Annotated[Names | None, typer.Option(
    parser=names(Hold), metavar="HOLD", rich_help_panel=METHOD, help="--weights lr: " + _HOLD + " Default backward.")]

# ---------------------------------------------------------------- soup

EvalOpt = Annotated[str | None, typer.Option(
    metavar="MOD:FN", rich_help_panel=METHOD,
    help="MODULE:FUNCTION or file.py:FUNCTION taking a state dict and returning a score.")]
SoupModeOpt = Annotated[SoupMode, typer.Option(
    rich_help_panel=METHOD, help="max if a higher score is better, min for losses.")]
UniformOpt = Annotated[bool, typer.Option(
    "--uniform", rich_help_panel=METHOD, help="Uniform soup of every selected checkpoint (no --eval needed).")]
StrictOpt = Annotated[bool, typer.Option(
    "--strict", rich_help_panel=METHOD, help="Add a checkpoint only if it improves the score (default: also on ties).")]

# ---------------------------------------------------------------- wsm

ScheduleOpt = Annotated[Names, typer.Option(
    parser=names(Schedule), metavar="SHAPE", rich_help_panel=METHOD,
    help="Decay shape f(x), x in [0, 1): linear 1-x; minus-sqrt 1-sqrt(x); cosine F+(1-F)(1+cos(pi x))/2; "
    "exponential factor^(x(n-1)); step gamma^#(milestones<=x); inverse-sqrt 1/sqrt(1+x/timescale).")]
FinalOpt = Annotated[Floats | None, typer.Option(
    parser=floats(0.0, 1.0), metavar="F", rich_help_panel=METHOD, help="cosine: the fraction F left at the end (default 0).")]
FactorOpt = Annotated[Floats | None, typer.Option(
    parser=floats(0.0, 1.0, open_lo=True), metavar="R", rich_help_panel=METHOD,
    help="exponential: decay per checkpoint interval (required for it).")]
MilestonesOpt = Annotated[Floats | None, typer.Option(
    parser=floats(0.0, 1.0), metavar="X,X,...", rich_help_panel=METHOD,
    help="step: the drop positions, increasing fractions in (0, 1) (a list, not a sweep).")]
GammaOpt = Annotated[Floats | None, typer.Option(
    parser=floats(0.0, 1.0), metavar="G", rich_help_panel=METHOD, help="step: factor per milestone (default 0.1).")]
TimescaleOpt = Annotated[Floats | None, typer.Option(
    parser=floats(0.0, open_lo=True), metavar="T", rich_help_panel=METHOD,
    help="inverse-sqrt: warmup length relative to the window (default 1).")]
ReverseOpt = Annotated[bool, typer.Option(
    "--reverse", rich_help_panel=METHOD, help="Reverse the coefficients (Megatron's __reverse ablation).")]
ByStepOpt = Annotated[bool, typer.Option(
    "--by-step", rich_help_panel=METHOD,
    help="Evaluate f at each checkpoint's step fraction instead of i/n (evenly spaced saves).")]

# ---------------------------------------------------------------- phema

TargetSigmaRelOpt = Annotated[Floats, typer.Option(
    "--sigma-rel", parser=floats(0.0, open_lo=True), metavar="S", show_default=False, rich_help_panel=METHOD,
    help="Relative width of the EMA to synthesise (0 < S < 0.289).")]
SnapshotSigmaRelOpt = Annotated[Floats | None, typer.Option(
    parser=floats(0.0, open_lo=True), metavar="S,S,...", rich_help_panel=METHOD,
    help="PostHocEMA {index}.{step}.pt: the sigma_rel of each profile, in index order (its default: 0.05,0.28).")]
SnapshotGammaOpt = Annotated[Floats | None, typer.Option(
    parser=floats(0.0), metavar="G,G,...", rich_help_panel=METHOD,
    help="The same as exponents (PostHocEMA(gammas=...)).")]
AtStepOpt = Annotated[Ints | None, typer.Option(
    parser=ints(1), metavar="T", rich_help_panel=METHOD,
    help="Synthesise the EMA as of step T (default: the newest snapshot's); later snapshots are not used.")]
RawOpt = Annotated[bool, typer.Option(
    "--raw", rich_help_panel=METHOD,
    help="Keep the least-squares coefficients as solved, as ema-pytorch's synthesize_ema_model does. Default: "
    "EDM2's, divided by their sum so the weights sum to exactly 1.")]

# ---------------------------------------------------------------- several outputs

WindowOpt = Annotated[int | None, typer.Option(
    min=1, metavar="K", rich_help_panel=METHOD,
    help="One output per window of K checkpoints (LAWA).")]
StrideOpt = Annotated[int | None, typer.Option(
    min=1, metavar="S", rich_help_panel=METHOD, help="Checkpoints between window starts (default 1).")]
RowEvalOpt = Annotated[str | None, typer.Option(
    "--eval", metavar="MOD:FN", rich_help_panel=EVALUATION,
    help="Score each output with fn(state_dict) -> float.")]
EvalModeOpt = Annotated[SoupMode, typer.Option(
    metavar="MODE", rich_help_panel=EVALUATION, help="max: higher scores are better; min: lower.")]
KeepOpt = Annotated[Keep | None, typer.Option(
    metavar="KEEP", rich_help_panel=EVALUATION,
    help="Write the best output (default) or all.")]
SoupKeepOpt = Annotated[Keep | None, typer.Option(
    metavar="KEEP", rich_help_panel=EVALUATION,
    help="Score each output with --eval; write the best or all.")]
PlotOpt = Annotated[str | None, typer.Option(
    metavar="FILE", rich_help_panel=OUTPUT,
    help="Draw each output's weights against step into FILE (.png or .svg; needs matplotlib: ckptavg[plot]).")]
