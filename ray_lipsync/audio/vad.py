"""Voice activity per 20 ms chunk with Silero VAD (the ONNX model faster-whisper ships).

The model reads 512-sample windows (32 ms at 16 kHz) with the previous window's last 64
samples as context and carries an LSTM state (h, c) from window to window; one ONNX call
runs a whole sequence of windows. Chunks (320 samples) and windows (512) do not align, so
a chunk takes the probability of the latest window that is complete when the chunk ends:
causal, and the same whether the audio arrives at once or in pieces. A chunk is speech when
that probability reaches the threshold, and stays speech for `hangover_chunks` more chunks
so short gaps inside words do not close the mouth.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ray_lipsync.config import AudioConfig

logger = logging.getLogger(__name__)

WINDOW = 512  # samples per Silero window at 16 kHz
CONTEXT = 64  # samples of the previous window prepended to each window
CHUNK = 320  # 20 ms pipeline chunk
_MAX_WINDOWS_PER_CALL = 10000
_STATE_SHAPE = (1, 1, 128)


def default_model_path() -> Path:
    """faster-whisper's bundled Silero VAD v6 model (no download)."""
    import faster_whisper

    path = Path(faster_whisper.__file__).parent / "assets" / "silero_vad_v6.onnx"
    if not path.is_file():
        raise FileNotFoundError(
            f"Silero VAD model not found at {path}; reinstall faster-whisper (>=1.1)"
        )
    return path


class SpeechDetector:
    """Holds one single-threaded ONNX session; make one per process (or per actor)."""

    def __init__(
        self, threshold: float = 0.5, hangover_chunks: int = 6, model_path: str | Path | None = None
    ) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be within 0..1, got {threshold}")
        if hangover_chunks < 0:
            raise ValueError(f"hangover_chunks must be >= 0, got {hangover_chunks}")
        import onnxruntime

        self.threshold = float(threshold)
        self.hangover_chunks = int(hangover_chunks)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        path = Path(model_path) if model_path is not None else default_model_path()
        self._session = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )

    @classmethod
    def from_config(cls, audio: AudioConfig) -> "SpeechDetector":
        """A detector with the threshold, hangover and model of `Settings.audio`."""
        return cls(audio.vad_threshold, audio.vad_hangover_chunks, audio.vad_model)

    def stream(self) -> "VadStream":
        """A new streaming state (one per session) sharing this detector's model."""
        return VadStream(self)

    def detect(self, samples: np.ndarray) -> np.ndarray:
        """Speech flags for every complete or partial 20 ms chunk of a whole 16 kHz clip."""
        stream = self.stream()
        return np.concatenate([stream.push(samples), stream.flush()])

    def window_probabilities(
        self, inputs: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run the model over [n, 576] context+window rows in order; returns (probs, h, c)."""
        probs = []
        for start in range(0, inputs.shape[0], _MAX_WINDOWS_PER_CALL):
            batch = inputs[start : start + _MAX_WINDOWS_PER_CALL]
            out, h, c = self._session.run(None, {"input": batch, "h": h, "c": c})
            probs.append(np.asarray(out, dtype=np.float32).reshape(-1))
        return np.concatenate(probs), h, c


class VadStream:
    """Streaming speech flags for one session; results equal `detect` on the concatenation."""

    def __init__(self, detector: SpeechDetector) -> None:
        self._detector = detector
        self._pending = np.zeros(0, dtype=np.float32)  # samples not yet in a full window
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._h = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._c = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._samples = 0  # samples received
        self._windows = 0  # windows run
        self._last_window_prob = 0.0  # probability of window self._windows - 1
        self._chunks = 0  # chunks flagged
        self._since_speech = detector.hangover_chunks + 1  # chunks since the last speech chunk
        self.last_probability = 0.0  # probability behind the latest flag (for metrics / debug)

    @property
    def chunks(self) -> int:
        """Chunks flagged so far."""
        return self._chunks

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Append 16 kHz samples; return one flag per 20 ms chunk they complete."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._samples += samples.size
        buf = np.concatenate([self._pending, samples]) if self._pending.size else samples
        n_windows = buf.size // WINDOW
        first_window = self._windows
        probs = np.zeros(0, dtype=np.float32)
        if n_windows:
            windows = buf[: n_windows * WINDOW].reshape(n_windows, WINDOW)
            contexts = np.concatenate([self._context[None, :], windows[:-1, -CONTEXT:]])
            inputs = np.ascontiguousarray(np.concatenate([contexts, windows], axis=1))
            probs, self._h, self._c = self._detector.window_probabilities(inputs, self._h, self._c)
            self._context = windows[-1, -CONTEXT:].copy()
            self._windows += n_windows
        self._pending = buf[n_windows * WINDOW :].copy()

        flags = []
        while (self._chunks + 1) * CHUNK <= self._samples:
            latest = (self._chunks + 1) * CHUNK // WINDOW - 1  # last window done at chunk end
            if latest < 0:
                prob = 0.0
            elif latest >= first_window:
                prob = float(probs[latest - first_window])
            else:
                prob = self._last_window_prob
            flags.append(self._flag(prob))
            self._chunks += 1
        if n_windows:
            self._last_window_prob = float(probs[-1])
        return np.asarray(flags, dtype=bool)

    def flush(self) -> np.ndarray:
        """Zero-pad a partial last chunk and flag it (empty result if none is partial)."""
        partial = self._samples % CHUNK
        if not partial:
            return np.zeros(0, dtype=bool)
        return self.push(np.zeros(CHUNK - partial, dtype=np.float32))

    def _flag(self, prob: float) -> bool:
        self.last_probability = prob
        if prob >= self._detector.threshold:
            self._since_speech = 0
        else:
            self._since_speech += 1
        return self._since_speech <= self._detector.hangover_chunks
