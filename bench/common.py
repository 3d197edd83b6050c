"""Pieces the benchmarks share: model sizes, peak-memory sampling, machine names."""

from __future__ import annotations

import os
import threading
import time

import torch

# glibc's malloc raises its mmap threshold after big frees and then keeps freed buffers in the
# heap, so RSS would count memory that is free. A fixed threshold returns them to the OS: RSS
# then tracks live memory. Both algorithms run with the same setting.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

SIZES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (64, 128, 2, 4, 4, 1000),  # smoke runs of the GPU script on any machine
    "30m": (512, 1408, 8, 8, 8, 8000),
    "7b": (4096, 11008, 32, 32, 32, 32000),
}


def build_model(size: str, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


class PeakRSS:
    """Peak resident memory of this process above its level at start, sampled in a thread."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self._rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def machine_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0).replace(" ", "-").lower()
    return f"cpu{os.cpu_count()}"
