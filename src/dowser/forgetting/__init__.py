"""The forgetting benchmark: how much of what a model knew survives fine-tuning, per method.

    from dowser.forgetting import PRESETS, run_benchmark
    result = run_benchmark(PRESETS["quick"], "out/")   # results.json, results.md, plots

Modules, in the order the benchmark uses them:
    tasks.py    the real data sets as multiple-choice tasks (Fashion-MNIST, WordNet, digits)
    model.py    the built-in LLaVA: build, pretrain on the upstream tasks, cache on disk
    encode.py   tasks encoded once into ids and pixels; batched scoring of candidate answers
    train.py    the one training loop every method goes through
    methods.py  every method: which parameters train, what hooks, which merge afterwards
    config.py   BenchConfig (what runs) and Prepared (what the runs share)
    llava.py    the built-in LLaVA track: presets, tasks, scoring
    bench.py    the sweeps, resumable runs, for any track (speech/: Whisper tiny.en)
    report.py   frontiers, best H, matched A_up, depth/ratio tables, plots
    estimators.py, estimators_report.py   the estimator study and its tables and plots
    continual.py, continual_report.py     several downstream tasks in turn (accuracy matrix,
                backward transfer, forgetting): `dowser bench continual`
    speech/     the same benchmark on Whisper tiny.en (speech made with espeak-ng)
"""

from dowser.forgetting.bench import PRESETS, BenchConfig, run_benchmark
from dowser.forgetting.methods import METHODS
from dowser.forgetting.model import BaseConfig

__all__ = ["METHODS", "PRESETS", "BaseConfig", "BenchConfig", "run_benchmark"]
