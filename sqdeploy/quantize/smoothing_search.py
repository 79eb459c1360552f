"""Whole-model smoothing search: which groups to smooth, and how strongly, chosen by what the quantized model loses.

SmoothQuant's ``s = max|X|^a / max|W|^(1-a)`` moves quantization difficulty from the
activations into the weights. How much should move (``a``), and whether a group should be
smoothed at all, depends on the model and the scheme: a model whose ``down_proj`` inputs
carry 46x outliers needs up -> down smoothed for static INT8 activations, while smoothing
its norm -> linear groups only moves difficulty into weights that round worse; per-token
activations absorb most outliers themselves; INT4 weights punish a large ``a``. So the
search chooses a *plan*: one alpha, or no smoothing, per group kind of the family
(norm -> q/k/v, norm -> gate/up, up -> down, v -> o).

**Score.** A plan is scored by the KL divergence of the quantized model's next-token
distribution from the float model's, on calibration sequences *held apart* from those that
give the smoothing statistics (and GPTQ's Hessians): every candidate quantized model is run
layer by layer on its own activation stream, so the error that earlier layers accumulate
reaches the score. Two things make this differ from a sum of per-layer relative output
errors (the SmoothQuant+ paper's loss): (1) the final distribution is what perplexity
measures, and a layer's relative error says little about it (the residual stream's size, and
with it the weight of a layer's error, varies over the layers, and some errors cancel in the
head); (2) scored on the sequences its own statistics came from, a plan is rewarded for
fitting them (GPTQ's rounding and static activation ranges fit the sequences they were
computed on), more for some alphas than for others; held-apart sequences do not reward that.

**Stages** (each a streaming pass, weights read once per pass for all its candidates):
  1. *uniform*: no smoothing (s = 1), and each alpha of the grid on every group, rounded to
     nearest (cheap);
  2. *per group*: from the best so far, each group alone switched off or moved to a
     neighbouring alpha; the changes that lower the score are combined and scored;
  3. *refine* (when the recipe rounds with GPTQ): the ``refine`` best plans and the
     unsmoothed one are scored again with the recipe's own rounding, which picks, unless a
     plan rounded to nearest scored better still: GPTQ fits the sequences its Hessians come
     from (on a small calibration set, far better than it does new text), so the search then
     keeps round-to-nearest (the export's summary and manifest say which rounding was used).
The unsmoothed plan is scored in every stage that picks, so the chosen plan never scores
worse than not smoothing (and, with a refine stage, than not smoothing rounded to nearest).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families.base import ModelConfig, SmoothGroup
from sqdeploy.core.progress import Progress
from sqdeploy.core.schemes import QuantScheme
from sqdeploy.model.loading import TensorSource, load_block, load_model
from sqdeploy.model.transformer import Block, Context
from sqdeploy.quantize.algorithm import SearchInputs
from sqdeploy.quantize.awq import ClipSearch
from sqdeploy.quantize.rtn import Rounding
from sqdeploy.quantize.smoothing import smooth_block, smoothquant_scale
from sqdeploy.quantize.streaming import ChannelStats, LayerData, StatsCollector, embed_chunks, run_block, run_block_in_place

UNIFORM_GRID = (0.2, 0.4, 0.6, 0.8, 1.0)
NEIGHBOURS = (-0.1, 0.1)  # per-group moves of stage 2: with the grid's step of 0.2, every tenth is reachable
MIN_STATS_SEQUENCES = 4

Plan = tuple  # one alpha (float) or None (not smoothed) per group, in the order of the groups


@dataclass(frozen=True)
class SearchSettings:
    """How the search runs; the recipe's ``search_*`` keys."""

    grid: tuple[float, ...] = UNIFORM_GRID
    holdout: int = 6  # calibration sequences held apart to score candidates
    stats_samples: int = 32  # at most this many of the others give the statistics
    per_group: bool = True  # stage 2
    refine: int = 2  # GPTQ-scored finalists (besides the unsmoothed plan); 0 with round-to-nearest


def plan_dict(groups: tuple[SmoothGroup, ...], plan: Plan) -> dict[str, float | None]:
    return {g.name: a for g, a in zip(groups, plan)}


def plan_name(groups: tuple[SmoothGroup, ...], plan: Plan) -> str:
    """``attn_norm=0.8 mlp_norm=off ...``: how a plan reads in reports."""
    return " ".join(f"{g.name}={'off' if a is None else f'{a:g}'}" for g, a in zip(groups, plan))


def split_calibration(ids: torch.Tensor, settings: SearchSettings) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """(statistics sequences, held-apart sequences, fallback note); the held-apart ones are spread over the set.

    A set smaller than ``holdout + 4`` sequences falls back to holding a quarter of it apart (at least
    one), and says so in the note (the search's summary and the export's); fewer than 2 is an error.
    """
    n = ids.shape[0]
    need = settings.holdout + MIN_STATS_SEQUENCES
    if settings.holdout < 1:
        raise SqDeployError("search_holdout must be >= 1: the smoothing search scores plans on held-apart sequences")
    holdout, note = settings.holdout, None
    if n < need:
        if n < 2:
            raise SqDeployError(
                f"the smoothing search needs at least 2 calibration sequences (1 held apart to score candidates, 1 for "
                f"the statistics), and {need} for its full split; the calibration set gives {n}: add calibration text "
                "or lower --calib-seq-len"
            )
        holdout = max(1, n // 4)
        note = (f"the calibration set gives {n} sequences, fewer than the {need} of the search's split "
                f"({settings.holdout} held apart + {MIN_STATS_SEQUENCES} for statistics): {holdout} held apart, "
                f"{n - holdout} for statistics")
    step = n / holdout
    held = sorted({int(i * step + step / 2) for i in range(holdout)})
    mask = torch.zeros(n, dtype=torch.bool)
    mask[held] = True
    return ids[~mask][: settings.stats_samples], ids[mask], note


def apply_plan(
    block: Block, cfg: ModelConfig, groups: tuple[SmoothGroup, ...], plan: Plan, scheme: QuantScheme, data: LayerData,
    rounding: Rounding, last: bool = False, clip: ClipSearch | None = None,
):
    """Smooth each group of ``block`` with its alpha of ``plan`` (skipping ``None``), search the weights'
    clipping on the smoothed layer (``clip``), then round as ``rounding`` says."""
    chosen = tuple((g, a) for g, a in zip(groups, plan) if a is not None)
    alphas = {g.name: a for g, a in chosen}
    scale_fn = lambda g, x, _mean, w: smoothquant_scale(x, w, alphas[g.name])  # noqa: E731
    scales, stats = smooth_block(block, cfg, tuple(g for g, _ in chosen), data.stats, scale_fn,
                                 with_xtx=rounding.needs_hessian)
    if last:  # the final pass: nothing else is tried on this layer's statistics
        data.release_sums(stats)
    ratios = None if clip is None or scheme.weight is None else clip(block, cfg.linears, scheme.weight, data)
    return scales, rounding(block, cfg.linears, scheme, data, stats, ratios)


class _Reference:
    """What every pass shares: the held-apart sequences' float outputs, and (for round-to-nearest passes)
    each layer's statistics, so that a pass after the first need not run the float model again."""

    def __init__(self):
        self.final: list[torch.Tensor] | None = None  # float model's last hidden states on the held-apart sequences
        self.stats: dict[int, tuple[dict[str, ChannelStats], torch.Tensor]] = {}


def _kl_and_nll(head, held_ids: torch.Tensor, quant: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, float]:
    """Mean KL(float || quantized) of the next-token distributions, and the quantized model's mean NLL."""
    kl, nll, n = 0.0, 0.0, 0
    row = 0
    with torch.no_grad():
        for q_chunk, r_chunk in zip(quant, ref):
            for q, r in zip(q_chunk, r_chunk):  # one sequence at a time: [seq, vocab] logits
                lq = torch.log_softmax(head.head(q[:-1][None])[0], -1)
                lr = torch.log_softmax(head.head(r[:-1][None])[0], -1)
                kl += float((lr.exp() * (lr - lq)).sum())
                target = held_ids[row, 1:].to(lq.device)
                nll += float(-lq.gather(1, target[:, None]).sum())
                n += target.numel()
                row += 1
    return kl / n, nll / n


def _score_plans(
    src: TensorSource, stats_ids, held_ids, plans: list[Plan], scheme, groups, rounding: Rounding, device, batch,
    progress: bool, title: str, ref: _Reference, clip: ClipSearch | None = None,
) -> dict[Plan, dict]:
    """One streaming pass: every plan's quantized model on its own stream of the held-apart sequences."""
    cfg = src.config
    head = load_model(src, with_layers=False, device=device)  # the scores' logits are computed where the streams are
    held, ctx = embed_chunks(head, held_ids, batch, device)  # every stream lives on the device
    ctx = Context(mask=ctx.mask.to(device), cos=None if ctx.cos is None else ctx.cos.to(device),
                  sin=None if ctx.sin is None else ctx.sin.to(device))
    cached = rounding.method == "rtn" and not rounding.act_scale_search and len(ref.stats) == cfg.num_layers
    x = None if cached else embed_chunks(head, stats_ids, batch, device)[0]
    float_held = list(held) if ref.final is None else None
    streams = {p: list(held) for p in plans}
    with Progress(cfg.num_layers, title, progress) as bar:
        for i in range(cfg.num_layers):
            bar.update(f"layer {i + 1}/{cfg.num_layers}: {len(plans)} candidates")
            block = load_block(src, i, torch.float32, device)
            if cached:
                stats, kv = ref.stats[i]
                data = LayerData(i, [], [], dict(stats), kv, ctx, device)
            else:
                with StatsCollector(block, cfg.linears, rounding.needs_hessian) as collector:
                    y = run_block(block, x, ctx, device)
                data = LayerData(i, x, y, collector.stats, collector.kv_amax, ctx, device)
                ref.stats.setdefault(i, ({n: ChannelStats(s.absmax, s.abssum, s.tokens) for n, s in collector.stats.items()},
                                         collector.kv_amax))
            for p in plans:
                trial = copy.deepcopy(block)
                apply_plan(trial, cfg, groups, p, scheme, data, rounding, clip=clip)
                run_block_in_place(trial, streams[p], ctx, device)
                del trial
            data = collector = None  # this layer's statistics and sums go before the next layer's are collected
            if float_held is not None:
                run_block_in_place(block, float_held, ctx, device)
            del block
            if not cached:
                x, y = y, None
            bar.advance()
    if float_held is not None:
        ref.final = float_held
    out = {}
    for p in plans:
        kl, nll = _kl_and_nll(head, held_ids, streams[p], ref.final)
        out[p] = {"kl": kl, "nll": nll}
    return out


def search_smoothing(
    src: TensorSource,
    ids: torch.Tensor,
    scheme: QuantScheme,
    groups: tuple[SmoothGroup, ...],
    rounding: Rounding = Rounding(),
    settings: SearchSettings = SearchSettings(),
    device: str | torch.device = "cpu",
    batch: int = 8,
    progress: bool = True,
    clip: ClipSearch | None = None,
) -> dict:
    """Choose a smoothing plan for the whole model (see the module's docstring); returns the plan and every score.
    ``clip``: the final pass's clipping search, applied in the refine stage with the final rounding."""
    t0 = time.perf_counter()
    device = torch.device(device)
    stats_ids, held_ids, note = split_calibration(ids, settings)
    ref = _Reference()
    search_rounding = rounding.for_search()
    off: Plan = (None,) * len(groups)
    scores: dict[Plan, dict] = {}
    stages = []

    def run(plans, r, title, c=None):
        new = [p for p in dict.fromkeys(plans) if p not in scores]
        if new:
            scores.update(_score_plans(src, stats_ids, held_ids, new, scheme, groups, r, device, batch, progress, title, ref, c))
        stages.append({"stage": title, "plans": [plan_name(groups, p) for p in dict.fromkeys(plans)]})
        return min(dict.fromkeys(plans), key=lambda p: scores[p]["kl"])

    best = run([off, *((a,) * len(groups) for a in settings.grid)], search_rounding, "smoothing search: uniform alphas")
    if settings.per_group and groups:
        base = best if best != off else min((p for p in scores if p != off), key=lambda p: scores[p]["kl"])
        moves = []
        for k, a in enumerate(base):
            options = [None] if a is not None else []
            ref_alpha = a if a is not None else 0.5
            options += [round(ref_alpha + d, 2) for d in NEIGHBOURS if 0.0 < ref_alpha + d <= 1.0]
            moves += [base[:k] + (o,) + base[k + 1:] for o in options if o != a]
        run([base, *moves], search_rounding, "smoothing search: per group")
        combined = list(base)
        for k in range(len(groups)):
            alts = [m for m in moves if m[k] != base[k] and sum(x != y for x, y in zip(m, base)) == 1]
            win = min(alts, key=lambda p: scores[p]["kl"], default=None)
            if win is not None and scores[win]["kl"] < scores[base]["kl"]:
                combined[k] = win[k]
        best = run([best, tuple(combined), *moves], search_rounding, "smoothing search: combined")
    rtn_scores = dict(scores)
    final_scores = rtn_scores
    chosen_rounding = rounding.method
    if rounding.method == "gptq" and settings.refine > 0:
        ranked = sorted((p for p in rtn_scores if p != off), key=lambda p: rtn_scores[p]["kl"])
        finalists = [*ranked[: settings.refine], off]
        scores = {}
        best = run(finalists, rounding, f"smoothing search: refine ({rounding.method})", clip)
        final_scores = scores
        # GPTQ fits the sequences its Hessians come from; where that does not carry over to the
        # held-apart ones, round to nearest: the plans rounded to nearest are scored on the same sequences
        rtn_best = min(rtn_scores, key=lambda p: rtn_scores[p]["kl"])
        if rtn_scores[rtn_best]["kl"] < final_scores[best]["kl"]:
            best, chosen_rounding = rtn_best, "rtn"
    picked = rtn_scores if chosen_rounding == "rtn" else final_scores
    return {
        "plan": plan_dict(groups, best),
        "plan_name": plan_name(groups, best),
        "rounding": chosen_rounding,
        "unsmoothed": picked[off],
        "chosen": picked[best],
        "scores": {plan_name(groups, p): s for p, s in sorted(final_scores.items(), key=lambda t: t[1]["kl"])},
        "rtn_scores": {plan_name(groups, p): s for p, s in sorted(rtn_scores.items(), key=lambda t: t[1]["kl"])}
        if final_scores is not rtn_scores else None,
        "stages": stages,
        "calibration": {"statistics": int(stats_ids.shape[0]), "held_apart": int(held_ids.shape[0]),
                        "seq_len": int(ids.shape[1]), **({"fallback": note} if note else {})},
        "seconds": time.perf_counter() - t0,
    }



def check_alpha(origin: str, name: str, alpha: Any) -> None:
    """alpha: a number, null (no smoothing), a plan {group: number or null}, 'search' (whole model) or
    'auto' (SmoothQuant: per layer; SmoothQuant+: the whole-model search)."""
    ok_number = lambda a: a is None or (isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1)  # noqa: E731
    if alpha in ("search", "auto") or ok_number(alpha):
        return
    if isinstance(alpha, dict) and all(isinstance(k, str) and ok_number(v) for k, v in alpha.items()):
        return
    raise SqDeployError(f"{origin} algorithm '{name}': alpha must be a number in [0, 1], null, "
                        f"a mapping group -> number or null, 'search' or 'auto'; got {alpha!r}")


def search_plan(config: Any, inputs: SearchInputs) -> tuple[Any, dict]:
    """The whole-model search as an algorithm's ``model_search`` hook: ``config`` has the ``search_*`` keys,
    ``grid`` and the rounding keys (and ``clip``). Returns the config with the chosen plan as its alpha and,
    when round-to-nearest scored better on the held-apart sequences, round-to-nearest as its rounding."""
    clip = ClipSearch() if getattr(config, "clip", False) else None
    settings = SearchSettings(grid=tuple(config.grid) if config.grid else UNIFORM_GRID, holdout=config.search_holdout,
                              stats_samples=config.search_samples, per_group=config.search_groups, refine=config.search_refine)
    search = search_smoothing(inputs.src, inputs.ids, inputs.scheme, inputs.groups, Rounding.of(config), settings,
                              inputs.device, inputs.batch, inputs.progress, clip)
    resolved = replace(config, alpha=search["plan"])
    if search["rounding"] != config.rounding:
        resolved = replace(resolved, rounding=search["rounding"], gptq_act_order=False, gptq_act_aware=False,
                           gptq_quantized_inputs=False, **({"clip": False} if hasattr(config, "clip") else {}))
    return resolved, search
