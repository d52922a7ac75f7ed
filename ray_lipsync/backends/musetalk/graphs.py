"""The render step replayed from CUDA graphs, one graph per batch-size bucket
(`musetalk.cuda_graphs`).

Why: an eager UNet + VAE forward is thousands of small ops. On a GPU most of its time is the
CPU issuing them, and every op gives Python's GIL away, so the renderer thread waits at each
one while any other thread of the process runs Python (benchmarks/README.md, "One run on an
NVIDIA H200" and "gil_convoy.py"). A captured graph issues all of them as one op.

A batch of n frames runs in the graph of its bucket, the smallest power of two >= n, padded by
repeating its last row; the padded rows' output is never read. Each bucket's graph is
captured once (`warm` captures them all up front, so no session waits for a capture), on
static input buffers that each call fills; the output is a view of the graph's static memory,
valid until the next call. One thread calls a `GraphedStep` (the renderer's batch worker).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
WARMUP_RUNS = 3  # eager runs on a side stream before capture (cuDNN/cuBLAS pick their kernels)


def bucket(n: int) -> int:
    """The batch size of the graph that serves a batch of `n` frames."""
    if n < 1:
        raise ValueError(f"a batch has at least one frame, got {n}")
    return 1 << (n - 1).bit_length()


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` with its last row repeated up to `rows` rows."""
    if len(x) == rows:
        return x
    return torch.cat([x, x[-1:].expand(rows - len(x), *x.shape[1:])])


def fill_rows(static: torch.Tensor, x: torch.Tensor) -> None:
    """`static` := `pad_rows(x, len(static))`, in place (no padded copy of `x` made)."""
    n = len(x)
    static[:n].copy_(x)
    if n < len(static):
        static[n:].copy_(x[-1:].expand(len(static) - n, *x.shape[1:]))


@dataclass(frozen=True)
class Captured:
    """One bucket's graph: fill `inputs`, call `replay()`, read `output`."""

    replay: Callable[[], Any]
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor


Capture = Callable[[Step, Sequence[torch.Tensor]], Captured]


def capture_cuda_graph(step: Step, example: Sequence[torch.Tensor], pool: Any, stream: Any) -> Captured:
    """Capture `step` on static copies of `example` (CUDA tensors) into a torch.cuda.CUDAGraph,
    as torch's CUDA graphs notes prescribe: warm-up runs, then the capture, both on the side
    `stream` (libraries set up their per-stream state before the capture); the graph's memory
    comes from `pool`. Other threads may use CUDA meanwhile (`thread_local` capture mode)."""
    inputs = tuple(x.clone() for x in example)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_RUNS):
            step(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        output = step(*inputs)
    return Captured(graph.replay, inputs, output)


class SharedPoolCapture:
    """`capture_cuda_graph` with one memory pool and one side stream for every graph it
    captures (a pool shared by graphs captured on one stream; they run one at a time)."""

    def __init__(self) -> None:
        self._pool: Any = None
        self._stream: Any = None

    def __call__(self, step: Step, example: Sequence[torch.Tensor]) -> Captured:
        if self._pool is None:
            self._pool, self._stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        return capture_cuda_graph(step, example, self._pool, self._stream)


class GraphedStep:
    """`step(latents, cond)` served from one captured graph per bucket (module docstring);
    `capture` defaults to CUDA graphs sharing one memory pool."""

    def __init__(self, step: Step, capture: Capture | None = None) -> None:
        self._step = step
        self._capture = capture or SharedPoolCapture()
        self._graphs: dict[int, Captured] = {}
        self._lock = threading.Lock()  # one caller at a time: the static buffers are shared

    @property
    def buckets(self) -> list[int]:
        """The batch sizes captured so far."""
        return sorted(self._graphs)

    def warm(self, example: Sequence[torch.Tensor], max_batch: int) -> None:
        """Capture every bucket a batch of up to `max_batch` frames can need, from one example
        row per input (their values do not matter)."""
        rows = [x[:1] for x in example]
        for power in range(bucket(max_batch).bit_length()):
            self._graph(1 << power, rows)

    def __call__(self, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        n = len(latents)
        size = bucket(n)
        with self._lock:
            graph = self._graph(size, [latents, cond])
            for static, value in zip(graph.inputs, (latents, cond)):
                fill_rows(static, value)
            graph.replay()
            return graph.output[:n]

    def _graph(self, size: int, example: Sequence[torch.Tensor]) -> Captured:
        graph = self._graphs.get(size)
        if graph is None:
            graph = self._graphs[size] = self._capture(self._step, [pad_rows(x, size) for x in example])
            log.info("musetalk: render step captured as a CUDA graph for batches of %d", size)
        return graph
