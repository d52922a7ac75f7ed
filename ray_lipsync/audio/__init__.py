"""Audio input: decoding, resampling, streaming chunks and voice activity detection.

Pipeline format: 16 kHz mono float32 in [-1, 1]; a chunk is 20 ms = 320 samples.
`SpeechDetector` (vad.py) is imported from its module: it loads onnxruntime.
"""

from ray_lipsync.audio.decode import (
    AudioFormat,
    decode_audio,
    decode_body,
    decode_pcm16,
    load_audio,
    parse_content_type,
    sniff_format,
)
from ray_lipsync.audio.resample import PIPELINE_RATE, Resampler, resample
from ray_lipsync.audio.stream import (
    CHUNK_SAMPLES,
    AudioStream,
    BufferedStream,
    Chunker,
    PcmStream,
    SniffStream,
    WavStream,
    open_stream,
)

__all__ = [
    "CHUNK_SAMPLES",
    "PIPELINE_RATE",
    "AudioFormat",
    "AudioStream",
    "BufferedStream",
    "Chunker",
    "PcmStream",
    "Resampler",
    "SniffStream",
    "WavStream",
    "decode_audio",
    "decode_body",
    "decode_pcm16",
    "load_audio",
    "open_stream",
    "parse_content_type",
    "resample",
    "sniff_format",
]
