"""Band-limited resampling to the pipeline rate with libswresample (PyAV).

`Resampler` keeps the filter state between pushes, so a stream resampled piece by piece is
sample-for-sample the signal resampled in one go: no clicks at chunk joins.
"""

from __future__ import annotations

import av
import numpy as np

PIPELINE_RATE = 16000


class Resampler:
    """Streaming mono float32 resampler `input_rate` -> `output_rate` (Hz).

    Output is clipped to [-1, 1] (the pipeline's contract; band-limiting can overshoot a
    full-scale input slightly).
    """

    def __init__(self, input_rate: int, output_rate: int = PIPELINE_RATE) -> None:
        if input_rate <= 0 or output_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {input_rate} -> {output_rate}")
        self.input_rate = int(input_rate)
        self.output_rate = int(output_rate)
        self._swr: av.AudioResampler | None = None
        if self.input_rate != self.output_rate:
            self._swr = av.AudioResampler(format="flt", layout="mono", rate=self.output_rate)

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Resample the next piece of a mono signal; returns what is ready (may be empty)."""
        samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        if self._swr is None:
            return _clip(samples.copy())
        if samples.size == 0:
            return np.zeros(0, dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate = self.input_rate
        return _clip(_join(self._swr.resample(frame)))

    def flush(self) -> np.ndarray:
        """The samples still inside the filter; call once at the end of the signal."""
        if self._swr is None:
            return np.zeros(0, dtype=np.float32)
        out = _clip(_join(self._swr.resample(None)))
        self._swr = av.AudioResampler(format="flt", layout="mono", rate=self.output_rate)
        return out


def resample(samples: np.ndarray, input_rate: int, output_rate: int = PIPELINE_RATE) -> np.ndarray:
    """Resample a whole mono signal (float32 out, clipped to [-1, 1])."""
    resampler = Resampler(input_rate, output_rate)
    return np.concatenate([resampler.push(samples), resampler.flush()])


def _join(frames: list[av.AudioFrame]) -> np.ndarray:
    if not frames:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32)


def _clip(samples: np.ndarray) -> np.ndarray:
    return np.clip(samples, -1.0, 1.0, out=samples)
