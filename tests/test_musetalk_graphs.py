"""musetalk.cuda_graphs: the render step served from one captured graph per batch bucket.

No GPU exists here, so CUDA's capture is replaced by `eager_capture`, which keeps what a CUDA
graph keeps (static input buffers, a static output) and "replays" by running the step on
those buffers again: the bucketing, padding, buffer filling and output slicing are what these
tests check. The capture itself (capture_cuda_graph) is measured by benchmarks/gpu_check.py's
`graphs` mode on a GPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_lipsync.backends.musetalk.graphs import Captured, GraphedStep, bucket, pad_rows
from ray_lipsync.config import MuseTalkConfig, Settings


def eager_capture(captures: list[int]):
    """A stand-in for CUDA capture that records the batch size of each capture."""

    def capture(step, example) -> Captured:
        inputs = tuple(x.clone() for x in example)
        output = step(*inputs).clone()
        captures.append(len(inputs[0]))
        return Captured(lambda: output.copy_(step(*inputs)), inputs, output)

    return capture


def toy_step(latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    return latents.flatten(1).sum(1, keepdim=True) * 10 + cond.flatten(1).mean(1, keepdim=True)


def test_buckets_are_powers_of_two_and_padding_repeats_the_last_row() -> None:
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 32]
    with pytest.raises(ValueError):
        bucket(0)
    x = torch.arange(6.0).reshape(3, 2)
    padded = pad_rows(x, 4)
    assert padded.shape == (4, 2) and torch.equal(padded[:3], x) and torch.equal(padded[3], x[2])
    assert pad_rows(x, 3) is x


def test_every_batch_size_gets_its_own_rows_from_a_shared_bucket_graph() -> None:
    captures: list[int] = []
    graphed = GraphedStep(toy_step, eager_capture(captures))
    rng = torch.Generator().manual_seed(0)
    for n in (1, 3, 4, 2, 7, 5, 8, 3):
        latents, cond = torch.randn(n, 2, 3, 3, generator=rng), torch.randn(n, 4, 2, generator=rng)
        out = graphed(latents, cond).clone()
        assert out.shape == (n, 1)
        assert torch.allclose(out, toy_step(latents, cond))
    assert captures == [1, 4, 2, 8] and graphed.buckets == [1, 2, 4, 8]  # each bucket captured once


def test_warm_captures_every_bucket_up_to_the_largest_batch() -> None:
    captures: list[int] = []
    graphed = GraphedStep(toy_step, eager_capture(captures))
    graphed.warm((torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 2)), max_batch=5)
    assert captures == [1, 2, 4, 8]
    graphed(torch.ones(6, 2, 3, 3), torch.ones(6, 4, 2))
    assert captures == [1, 2, 4, 8]  # nothing captured while serving


def test_compile_and_cuda_graphs_are_one_or_the_other() -> None:
    assert MuseTalkConfig(cuda_graphs=True).cuda_graphs
    with pytest.raises(ValueError, match="cannot be combined"):
        MuseTalkConfig(compile=True, cuda_graphs=True)


@pytest.mark.slow
def test_graphed_render_matches_the_eager_render_with_tiny_weights(tmp_path: Path, caplog) -> None:
    """The MuseTalk step (tiny weights in the real layout) through `Networks.with_graphs`:
    the same crops as the plain step for every batch size up to max_batch; on the CPU the
    renderer warns and renders eager."""
    from musetalk_fixtures import build_tiny_models

    from ray_lipsync.backends.musetalk.renderer import MuseTalkRenderer, render_latents

    settings = Settings(models_dir=build_tiny_models(tmp_path / "models"), home=tmp_path / "home",
                        pipeline={"max_batch": 4}, musetalk={"cuda_graphs": True})
    with caplog.at_level(logging.WARNING):
        renderer = MuseTalkRenderer(settings, device="cpu")
    assert renderer.networks.graphed is None and "cuda_graphs needs CUDA" in caplog.text
    captures: list[int] = []
    graphed = renderer.networks.with_graphs(renderer.models, 4, eager_capture(captures))
    assert captures == [1, 2, 4]
    rng = torch.Generator().manual_seed(1)
    for n in (1, 2, 3, 4):
        latents = torch.randn(n, 8, 32, 32, generator=rng)
        features = torch.randn(n, 50, 384, generator=rng)
        plain = render_latents(renderer.models, latents, features, renderer.positions, renderer.networks)
        replayed = render_latents(renderer.models, latents, features, renderer.positions, graphed)
        assert replayed.shape == (n, 256, 256, 3) and replayed.dtype == np.uint8
        assert np.abs(plain.astype(int) - replayed.astype(int)).max() <= 1
    assert captures == [1, 2, 4]
