"""The recipe study: which mask recipe keeps the most of what the model knew, on both models.

    dowser bench recipes --model llava|whisper-tiny-en --out DIR

Every recipe (RECIPES) trains through the forgetting benchmark (`dowser.forgetting.bench`)
beside the baselines it has to beat (zero-shot, full-ft, random-mask, SPIDER), over the
masks' learning-rate grid and the seeds, at the default setting (rho = 0.1 of each matrix of
the last four decoder layers). `dowser.forgetting.recipes_report` compares them at matched
downstream accuracy (never at one learning rate: a mask that learns more slowly always looks
as if it forgets less) and writes the cost table.
"""

from __future__ import annotations

from dataclasses import replace

from dowser.forgetting.config import BenchConfig

BASELINES: tuple[str, ...] = ("zero-shot", "full-ft", "random-mask", "spider")
RECIPES: tuple[str, ...] = (
    "dowser",  # the paper's score, |W| ||J|| |h|, data-free
    "dowser-drift",  # ||J|| |h|: gamma = 0
    "dowser-sqrt-w",  # |W|^0.5 ||J|| |h|
    "dowser-gradient-drift",  # the exact per-weight estimator, gamma = 0
    "dowser-task-split",  # task-aware: the half of the 2 rho least important with most |g|
    "dowser-task-ratio",  # task-aware: lowest S / (|g| + eps)
    "task-gradient-mask",  # control: the rho largest |g|, no upstream score
    "dowser-rows",  # whole output rows
    "dowser-columns",  # whole input columns
    "dowser-soft",  # soft: 2 rho trainable, updates scaled 1 - rank / n
    "dowser-random-half",  # random rho from the half with the lowest scores (data-free)
    "dowser-spider",  # the dowser mask trained with SPIDER's pull towards W0
    "random-mask-spider",  # the same with a random mask
    "dowser-task-split-n16",  # how many downstream examples the task-aware mask needs
    "dowser-task-split-n64",
    "dowser-refresh",  # the dowser mask re-probed at steps 100 and 200 of 300
)
# the recipes measured on the slower settings (a Whisper run takes ~2 min on 2 cores): the
# paper's score, the drift scores (gamma 0 and 0.5), the main task-aware one, the soft mask
MAIN: tuple[str, ...] = (
    "dowser",
    "dowser-drift",
    "dowser-sqrt-w",
    "dowser-task-split",
    "dowser-soft",
)


def recipe_presets(model: str = "llava") -> dict[str, BenchConfig]:
    """Presets: "quick" (minutes: one task, one seed, one learning rate), "full" (the
    published figures) and "all" (every recipe on every task of the model: hours).

    llava: every recipe on digits, the main ones (MAIN) on wordnet-topic; whisper-tiny-en: the main recipes and task-gradient-mask on phonemes (the
    task whose seeds agree within 0.01), the drift score on topic; both 2 seeds and three learning rates, the benchmark's own sizes.
    """
    if model == "llava":
        from dowser.forgetting.llava import PRESETS

        base = replace(PRESETS["full"], depths=(), depth_methods=(), ratios=(), ratio_methods=())
        topic = (*BASELINES, *MAIN)
        full = replace(
            base,
            methods=(*BASELINES, *RECIPES),
            task_methods={"wordnet-topic": topic},
        )
    elif model == "whisper-tiny-en":
        from dowser.forgetting.speech.track import speech_presets

        speech = speech_presets()["full"]
        full = replace(
            speech,
            downstream=("phonemes", "topic"),
            methods=(*BASELINES, *MAIN, "task-gradient-mask"),  # and the task-aware control
            # topic: seeds differ by 0.03-0.07 A_down there, so only the recipe that leads on
            # phonemes is checked on it
            task_methods={"topic": (*BASELINES, "dowser", "dowser-drift")},
            depths=(),
            depth_methods=(),
            ratios=(),
            ratio_methods=(),
            encoder_layers=0,
            encoder_methods=(),
        )
    else:
        raise ValueError(f"unknown model {model!r}")
    every = replace(full, methods=(*BASELINES, *RECIPES))  # "all": every recipe on each task
    quick = replace(
        full,
        downstream=full.downstream[:1],
        methods=("zero-shot", "full-ft", "random-mask", "dowser", "dowser-task-split"),
        task_methods={},
        lrs=full.lrs[1:2],
        seeds=(0,),
    )
    return {"quick": quick, "full": full, "all": every}
