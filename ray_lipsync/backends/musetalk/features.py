"""MuseTalk audio features: Whisper-tiny encoder states -> [50, 384] per video frame.

Whisper-tiny (transformers) with all hidden states gives 5 states [T, 384] at 50 Hz (the
input embedding, layers 1-3, and the layer-normed output of layer 4); stacked [T, 5, 384].
Video frame i takes whisper frames 2i-4 .. 2i+5 (zero outside the audio) -> [10, 5, 384]
-> [50, 384].

Streaming window (the design choice). The transformers `WhisperEncoder.forward` refuses
anything but 3000 mel frames (30 s). Padding every step's audio to 30 s would cost 1500
tokens per window however little audio is new, so instead `encode_states` runs the encoder's
own modules (conv1, conv2, the layers, the final layer norm) on a window of W tokens. Whisper
adds a fixed sinusoidal position table to its input, and offline (MuseTalk) every whisper
frame sits at its place in its 30 s segment of the clip (segments start at 0, 30 s, ... of
the session timeline). So a window is placed inside one segment and adds the table rows of
its absolute positions there; with window-relative rows 0..W the 2 s features were far from
the offline ones, with absolute rows close to them (measured: benchmarks/README.md, section
"musetalk_fidelity.py: streaming vs offline Whisper features, per window and lookahead").
Windows: `encoder_window_s` long (default 2 s = 100 tokens), aligned to 20 ms, ending
`lookahead_ms` past the end of the last frame they serve; they never reach before their
segment's start (early in a segment the window starts there and the tokens not yet heard
are zero-padded, i.e. silence, as Whisper pads its 30 s input), and a group of frames whose
whisper frames straddle a segment boundary reads one window on each side, as offline does.
Every window has the same length, so a frame's features never depend on which other
requests share the batch. `encoder_window_s = 30` makes every window the whole segment so
far: MuseTalk's offline computation on the audio received (15x the tokens of 2 s).
Lookahead: frame i's last whisper frame 2i+5 ends 80 ms after the frame, and the STFT + conv
stack reach ~2 whisper frames (40 ms) further, hence the 120 ms default (>= 100 enforced).
`context_ms` (window - lookahead - 40 ms) asks the batcher for the left context that fills
the window.
`offline_features` is the original whole-clip path (30 s segments, the library's forward);
the offline `render` command uses it, and `fidelity.compare_streaming` measures how far the
streaming features are from it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ray_lipsync.backends.base import Featurizer
from ray_lipsync.backends.musetalk.weights import MuseTalkModels, models_for
from ray_lipsync.clock import SAMPLE_RATE, SAMPLES_PER_FRAME, frames_in_samples, ms_to_samples
from ray_lipsync.config import Settings
from ray_lipsync.types import FeatureRequest

log = logging.getLogger(__name__)

WHISPER_HOP = 320  # samples per whisper encoder frame (50 Hz)
WHISPER_PER_FRAME = SAMPLES_PER_FRAME // WHISPER_HOP  # 2
LEFT_FRAMES = 4  # whisper frames before 2i
SPAN = 10  # whisper frames per video frame: 2i-4 .. 2i+5
RECEPTIVE_FRAMES = 2  # conv + STFT reach of a whisper frame, in whisper frames
SEGMENT_SAMPLES = 30 * SAMPLE_RATE  # Whisper's 30 s input
SEGMENT_WHISPER = SEGMENT_SAMPLES // WHISPER_HOP  # 1500 positions
FEATURE_SHAPE = (50, 384)


def encode_states(whisper: Any, mel: torch.Tensor, offsets: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """Run a transformers WhisperEncoder on mel [B, 80, 2W] of any W <= max positions.

    Window b's whisper frame j gets position row `offsets[b] + j` (its absolute position in
    its 30 s segment; default 0). Returns the 5 (for tiny) hidden states stacked
    [B, W, n_layers + 1, d_model]: with offset 0 and W = 1500 exactly the states
    `forward(output_hidden_states=True)` gives.
    """
    h = torch.nn.functional.gelu(whisper.conv1(mel))
    h = torch.nn.functional.gelu(whisper.conv2(h)).permute(0, 2, 1)
    batch, width = h.shape[:2]
    table = whisper.embed_positions.weight
    start = torch.zeros(batch, dtype=torch.long) if offsets is None else torch.as_tensor(offsets, dtype=torch.long)
    if start.shape != (batch,):
        raise ValueError(f"need one position offset per window ({batch}), got shape {tuple(start.shape)}")
    if width > table.shape[0] or int(start.min()) < 0 or int(start.max()) + width > table.shape[0]:
        raise ValueError(
            f"windows of {width} whisper frames at offsets {start.min()}..{start.max()} exceed the "
            f"encoder's {table.shape[0]} positions"
        )
    rows = start.to(table.device)[:, None] + torch.arange(width, device=table.device)
    h = h + table[rows]
    states = [h]
    for index, layer in enumerate(whisper.layers):
        h = layer(h, None)
        states.append(whisper.layer_norm(h) if index == len(whisper.layers) - 1 else h)
    return torch.stack(states, dim=2)


@dataclass(frozen=True)
class Window:
    """One encoder window: whisper frames [first, first + width) of segment `segment`.

    Only frames in [valid_from, valid_to) hold audio (the rest is zero-padded silence) and
    only those are gathered. `samples` are the window's 16 kHz samples, zeros where none.
    """

    segment: int
    first: int  # absolute whisper frame of the window's first token
    valid_from: int
    valid_to: int
    samples: np.ndarray

    @property
    def offset(self) -> int:
        """Row of the position table for the window's first token."""
        return self.first - self.segment * SEGMENT_WHISPER


def gather_frames(
    windows: Sequence[tuple[np.ndarray, int, int, int]], n_valid: int, frames: range
) -> np.ndarray:
    """Per-frame features [len(frames), 50, 384] from encoder windows.

    Each window is (states [W, 5, 384], first, valid_from, valid_to): `states[j - first]` is
    absolute whisper frame j for valid_from <= j < valid_to. Whisper frames < 0, >= `n_valid`
    (past the audio) or in no window are zero.
    """
    n_states, dim = windows[0][0].shape[1:] if windows else (5, FEATURE_SHAPE[1])
    out = np.zeros((len(frames), SPAN, n_states, dim), dtype=np.float32)
    if not len(frames):
        return out.reshape(0, SPAN * n_states, dim)
    lo = WHISPER_PER_FRAME * frames.start - LEFT_FRAMES
    hi = WHISPER_PER_FRAME * (frames.stop - 1) - LEFT_FRAMES + SPAN
    span = np.zeros((hi - lo, n_states, dim), dtype=np.float32)
    for states, first, valid_from, valid_to in windows:
        a, b = max(lo, valid_from, 0), min(hi, valid_to, n_valid)
        if a < b:
            span[a - lo : b - lo] = states[a - first : b - first]
    for row in range(len(frames)):
        out[row] = span[WHISPER_PER_FRAME * row : WHISPER_PER_FRAME * row + SPAN]
    return out.reshape(len(frames), SPAN * n_states, dim)


def log_mel(models: MuseTalkModels, windows: Sequence[np.ndarray], length: int) -> torch.Tensor:
    """Whisper log-mel [B, 80, length / 160] of `windows`, each zero-padded to `length` samples."""
    batch = models.feature_extractor(
        [np.asarray(w, dtype=np.float32) for w in windows],
        sampling_rate=SAMPLE_RATE,
        padding="max_length",
        max_length=length,
        truncation=True,
        return_tensors="pt",
        device=str(models.device),
    )
    return batch.input_features.to(device=models.device, dtype=models.dtype)


def offline_features(models: MuseTalkModels, audio: np.ndarray) -> np.ndarray:
    """Whole-clip features [floor(duration x 25), 50, 384] the way MuseTalk computes them.

    The clip is cut into 30 s segments, each padded to 30 s and run through the library's
    encoder forward; the states are concatenated and trimmed to floor(len / 320) frames.
    """
    audio = np.asarray(audio, dtype=np.float32)
    segments = [audio[s : s + SEGMENT_SAMPLES] for s in range(0, max(len(audio), 1), SEGMENT_SAMPLES)]
    parts = []
    with torch.inference_mode():
        for segment in segments:
            mel = log_mel(models, [segment], SEGMENT_SAMPLES)
            hidden = models.whisper(mel, output_hidden_states=True).hidden_states
            parts.append(torch.stack(hidden, dim=2)[0])
    states = torch.cat(parts, dim=0).float().cpu().numpy()
    n_valid = len(audio) // WHISPER_HOP
    return gather_frames([(states, 0, 0, n_valid)], n_valid, range(frames_in_samples(len(audio))))


def _validate(request: FeatureRequest) -> None:
    audio = request.audio
    if not isinstance(audio, np.ndarray) or audio.ndim != 1:
        raise ValueError("FeatureRequest.audio must be a 1-D numpy array of 16 kHz samples")
    if request.audio_start < 0:
        raise ValueError(f"FeatureRequest.audio_start must be >= 0, got {request.audio_start}")
    frames = request.frames
    if frames.step != 1 or (len(frames) and frames.start < 0):
        raise ValueError(f"FeatureRequest.frames must be a non-negative step-1 range, got {frames}")
    end = request.audio_start + len(audio)
    if len(frames) and (frames.start * SAMPLES_PER_FRAME < request.audio_start or frames.stop * SAMPLES_PER_FRAME > end):
        raise ValueError(
            f"audio [{request.audio_start}, {end}) does not cover frames {frames.start}..{frames.stop - 1}; "
            "send the samples of every requested frame"
        )


class MuseTalkFeaturizer(Featurizer):
    """Streaming Whisper-tiny features for MuseTalk v1.5 (see the module docstring)."""

    name = "musetalk"
    stateful = False  # each window is encoded on its own

    def __init__(
        self,
        settings: Settings,
        device: str | torch.device | None = None,
        models: MuseTalkModels | None = None,
    ) -> None:
        """Load Whisper from `settings.models_dir` (once per process), or use `models`."""
        cfg = settings.musetalk
        self.models = models = models or models_for(settings, ("whisper",), device)
        self.device = models.device
        self.lookahead_ms = cfg.lookahead_ms
        positions = models.whisper.embed_positions.weight.shape[0]
        self.window_frames = min(positions, int(round(cfg.encoder_window_s * SAMPLE_RATE)) // WHISPER_HOP)
        self.context_ms = max(0, self.window_frames * WHISPER_HOP * 1000 // SAMPLE_RATE - cfg.lookahead_ms - 40)
        lookahead_whisper = math.ceil(ms_to_samples(cfg.lookahead_ms) / WHISPER_HOP)
        spare = self.window_frames - lookahead_whisper - LEFT_FRAMES - RECEPTIVE_FRAMES
        self.group_frames = max(1, spare // WHISPER_PER_FRAME)

    def new_state(self) -> Any:
        """Stateless: every window is encoded from the audio the request carries."""
        return None

    def offline_features(self, audio: np.ndarray) -> np.ndarray:
        """Whole-clip features [floor(duration x 25), 50, 384] (MuseTalk's original path)."""
        return offline_features(self.models, audio)

    def windows(self, request: FeatureRequest) -> list[tuple[range, list[Window]]]:
        """The frame groups of one request and the encoder windows each group reads.

        A group's window ends `lookahead_ms` past the group (or at the request's audio end)
        and reaches `window_frames` back, but never across a 30 s segment boundary: a group
        whose whisper frames straddle one reads one window on each side, as offline does.
        """
        out = []
        audio_end = request.audio_start + len(request.audio)
        lookahead = ms_to_samples(self.lookahead_ms)
        available = -(-request.audio_start // WHISPER_HOP)
        width = self.window_frames
        frames = request.frames
        for g0 in range(frames.start, frames.stop, self.group_frames):
            group = range(g0, min(g0 + self.group_frames, frames.stop))
            end = min(audio_end, group.stop * SAMPLES_PER_FRAME + lookahead) // WHISPER_HOP
            need = max(0, WHISPER_PER_FRAME * g0 - LEFT_FRAMES)
            plan = []
            for segment in range(need // SEGMENT_WHISPER, (end - 1) // SEGMENT_WHISPER + 1):
                seg_start = segment * SEGMENT_WHISPER
                valid_to = min(end, seg_start + SEGMENT_WHISPER)
                first = max(seg_start, valid_to - width)
                valid_from = max(first, available)
                if valid_from >= valid_to:
                    continue
                samples = np.zeros(width * WHISPER_HOP, np.float32)
                a = valid_from * WHISPER_HOP - request.audio_start
                piece = request.audio[a : a + (valid_to - valid_from) * WHISPER_HOP]
                at = (valid_from - first) * WHISPER_HOP
                samples[at : at + len(piece)] = piece
                plan.append(Window(segment, first, valid_from, valid_to, samples))
            out.append((group, plan))
        return out

    def featurize(self, requests: Sequence[FeatureRequest]) -> list[np.ndarray]:
        """Features [len(frames), 50, 384] per request; all windows in one encoder forward."""
        for request in requests:
            _validate(request)
        plans = [self.windows(r) for r in requests]
        windows = [w for plan in plans for _, group_windows in plan for w in group_windows]
        if not windows:
            return [np.zeros((len(r.frames), *FEATURE_SHAPE), np.float32) for r in requests]
        with torch.inference_mode():
            mel = log_mel(self.models, [w.samples for w in windows], self.window_frames * WHISPER_HOP)
            offsets = [w.offset for w in windows]
            states = encode_states(self.models.whisper, mel, offsets).float().cpu().numpy()  # one transfer
        results, index = [], 0
        for request, plan in zip(requests, plans):
            n_valid = (request.audio_start + len(request.audio)) // WHISPER_HOP
            parts = []
            for group, group_windows in plan:
                held = []
                for w in group_windows:
                    held.append((states[index], w.first, w.valid_from, w.valid_to))
                    index += 1
                parts.append(gather_frames(held, n_valid, group))
            results.append(np.concatenate(parts) if parts else np.zeros((0, *FEATURE_SHAPE), np.float32))
        return results
