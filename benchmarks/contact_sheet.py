"""Contact sheet: frames of an avatar speaking one utterance, in one PNG, to see what the
procedural backend looks like without starting the service.

The utterance is offline TTS (espeak-ng) of `--text`, or `--audio FILE`. It goes through the
same path as `ray-lipsync render` (VAD, featurizer, renderer, compositor); the sheet shows
`--tiles` face crops evenly spaced from just before the first speech frame to just after the
last, each labelled with its time and mouth opening, above a strip that plots the opening
per frame (dots: the frames shown).

    .venv/bin/python benchmarks/contact_sheet.py [-o docs/procedural-contact-sheet.png]
        [--avatar NAME | --video PATH] [--text "..." | --audio FILE] [--tiles 12] [--tile 168]

The default avatar is prepared into the settings' home on first use; `--video` prepares a
temporary avatar from the first `--video-frames` frames of a talking-head video.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import cv2
import numpy as np

from ray_lipsync.avatar.model import Avatar
from ray_lipsync.backends.procedural import ProceduralFeaturizer
from ray_lipsync.backends.procedural.synthetic import padded_crop
from ray_lipsync.clock import FPS, SAMPLE_RATE, frames_in_samples
from ray_lipsync.config import AvatarConfig, Settings
from ray_lipsync.render import detect_speech, render_frames
from ray_lipsync.types import FeatureRequest

log = logging.getLogger("benchmarks.contact_sheet")
DEFAULT_TEXT = "Hello there! How are you today? Nice to meet you."
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "procedural-contact-sheet.png"
PLOT_HEIGHT = 56
LABEL_RGB = (255, 255, 255)


def load_avatar(settings: Settings, name: str, video: Path | None, video_frames: int) -> Avatar:
    from ray_lipsync.avatar.default import load_or_prepare
    from ray_lipsync.avatar.store import AvatarStore

    if video is None:
        return load_or_prepare(AvatarStore(settings.avatars_dir), name, settings.avatar)
    from ray_lipsync.avatar.prepare import prepare_video

    avatar, _ = prepare_video(video, "sheet", AvatarConfig(max_frames=video_frames), progress=False)
    return avatar


def load_utterance(text: str, audio: Path | None) -> np.ndarray:
    if audio is not None:
        from ray_lipsync.audio import load_audio

        return load_audio(audio)
    from ray_lipsync.tts import Synthesizer

    return Synthesizer().synthesize(text)


def label(tile: np.ndarray, text: str) -> None:
    """White text with a dark outline in the tile's top left corner (in place)."""
    for colour, thickness in (((0, 0, 0), 3), (LABEL_RGB, 1)):
        cv2.putText(tile, text, (5, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.42, colour, thickness, cv2.LINE_AA)


def opening_plot(opening: np.ndarray, shown: list[int], width: int) -> np.ndarray:
    """A strip plotting the mouth opening per frame, the shown frames as dots."""
    strip = np.full((PLOT_HEIGHT, width, 3), 32, np.uint8)
    n = len(opening)
    xs = 8 + np.arange(n) * (width - 16) / max(n - 1, 1)
    ys = PLOT_HEIGHT - 8 - opening * (PLOT_HEIGHT - 20)
    points = np.stack([xs, ys], axis=1).round().astype(np.int32)
    cv2.polylines(strip, [points], False, (230, 170, 90), 1, cv2.LINE_AA)
    for k in shown:
        cv2.circle(strip, tuple(int(v) for v in points[k]), 3, LABEL_RGB, -1, cv2.LINE_AA)
    cv2.putText(strip, "mouth opening per frame (40 ms)", (8, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.36,
                (200, 200, 200), 1, cv2.LINE_AA)
    return strip


def contact_sheet(avatar: Avatar, samples: np.ndarray, settings: Settings, tiles: int, columns: int,
                  tile_px: int) -> np.ndarray:
    """The sheet as an RGB image."""
    n = frames_in_samples(len(samples))
    speech = detect_speech(samples, settings)
    if not speech.any():
        raise SystemExit("the utterance has no speech frames (VAD); use louder or longer audio")
    spoken = np.flatnonzero(speech)
    first, last = max(int(spoken[0]) - 1, 0), min(int(spoken[-1]) + 1, n - 1)
    shown = sorted({round(k) for k in np.linspace(first, last, tiles).tolist()})
    featurizer = ProceduralFeaturizer(settings)
    features = featurizer.featurize([FeatureRequest(featurizer.new_state(), samples, 0, range(n))])[0]
    opening = np.where(speech, features[:, 0], 0.0)  # silent frames show the idle avatar
    images: list[np.ndarray] = []
    for frame in render_frames(samples, avatar, settings, speech=speech):
        if frame.index in shown:
            tile = padded_crop(frame.image, avatar.crop_boxes[avatar.cycle_index(frame.index)], tile_px)
            label(tile, f"{frame.index / FPS:.2f} s  open {opening[frame.index]:.2f}")
            images.append(tile)
    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    rows[-1] += [np.zeros_like(images[0])] * (columns - len(rows[-1]))
    grid = np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)
    plot = opening_plot(opening[first : last + 1], [k - first for k in shown], grid.shape[1])
    return np.concatenate([grid, plot], axis=0)


def save_png(image: np.ndarray, path: Path, colours: int) -> int:
    """Write `image` as a palette PNG (`colours` colours; 0 = full RGB); returns its size."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(image)
    if colours:
        picture = picture.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    picture.save(path, optimize=True)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--avatar", default="default", help="a prepared avatar of the settings' home")
    parser.add_argument("--video", type=Path, help="prepare a temporary avatar from this video instead")
    parser.add_argument("--video-frames", type=int, default=100)
    parser.add_argument("--text", default=DEFAULT_TEXT, help="utterance for the offline TTS")
    parser.add_argument("--audio", type=Path, help="speak this audio file instead of --text")
    parser.add_argument("--tiles", type=int, default=12)
    parser.add_argument("--columns", type=int, default=6)
    parser.add_argument("--tile", type=int, default=168, help="tile side in pixels")
    parser.add_argument("--colours", type=int, default=256, help="PNG palette size (0: full RGB)")
    parser.add_argument("--home", type=Path, help="ray-lipsync home (default: the settings' home)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings(home=args.home) if args.home else Settings()
    avatar = load_avatar(settings, args.avatar, args.video, args.video_frames)
    samples = load_utterance(args.text, args.audio)
    sheet = contact_sheet(avatar, samples, settings, args.tiles, args.columns, args.tile)
    size = save_png(sheet, args.output, args.colours)
    log.info("wrote %s (%dx%d, %.0f KB, %.2f s of speech)", args.output, sheet.shape[1], sheet.shape[0],
             size / 1024, len(samples) / SAMPLE_RATE)
    return args.output


if __name__ == "__main__":
    main()
