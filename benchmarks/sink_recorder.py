"""What a speaker would play: record a PulseAudio sink's monitor with wall-clock times.

Used by `benchmarks/browser.py --sink-monitor spk.monitor` to time the sound where it leaves
the browser (the audio device), instead of where the page's AudioWorklet taps it. `parec`
delivers the monitor in small blocks; sample n's wall time is t0 + n / rate with t0 the lower
envelope of (block arrival - samples so far / rate), i.e. the block that arrived with the least
delay. The same loud-block format as the page's tap comes out (`loud_blocks`).

A null sink for it: `pulseaudio -D --exit-idle-time=-1 -n
--load="module-null-sink sink_name=spk" --load=module-native-protocol-unix`.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import numpy as np

RATE = 16_000
READ_BYTES = 160 * 2  # 10 ms blocks
BLOCK = 128  # samples per loud block, as the page's tap reports them


class SinkRecorder:
    """Records `source` (a PulseAudio monitor) from start() to stop()."""

    def __init__(self, source: str) -> None:
        if shutil.which("parec") is None:
            raise RuntimeError("parec not found (apt-get install pulseaudio-utils)")
        self.source = source
        self._chunks: list[bytes] = []
        self._arrivals: list[tuple[float, int]] = []  # (wall time, samples received so far)
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            ["parec", "-d", self.source, "--format=s16le", f"--rate={RATE}", "--channels=1",
             "--latency-msec=5", "--raw"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        received = 0
        while True:
            data = self._proc.stdout.read1(READ_BYTES)  # type: ignore[attr-defined]
            if not data:
                return
            now = time.time()
            self._chunks.append(data)
            received += len(data) // 2
            self._arrivals.append((now, received))

    def stop(self) -> tuple[np.ndarray, float]:
        """The samples (float32) and the wall time of sample 0."""
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(5)
        if self._thread is not None:
            self._thread.join(5)
        pcm = np.frombuffer(b"".join(self._chunks), dtype="<i2")[: (self._arrivals or [(0, 0)])[-1][1]]
        if not self._arrivals:
            raise RuntimeError(f"nothing recorded from {self.source}; is PulseAudio running?")
        t0 = min(t - n / RATE for t, n in self._arrivals)
        return pcm.astype(np.float32) / 32768.0, t0


def loud_blocks(samples: np.ndarray, t0: float, loud: float) -> tuple[np.ndarray, np.ndarray]:
    """Wall times (s) of the first and last loud sample of each loud 128-sample block."""
    n = samples.size // BLOCK
    blocks = np.abs(samples[: n * BLOCK]).reshape(n, BLOCK) > loud
    hit = np.flatnonzero(blocks.any(axis=1))
    first = hit * BLOCK + blocks[hit].argmax(axis=1)
    last = hit * BLOCK + BLOCK - 1 - blocks[hit][:, ::-1].argmax(axis=1)
    return t0 + first / RATE, t0 + last / RATE
