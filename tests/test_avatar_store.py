"""The avatar store (Arrow IPC + manifest), the default avatar and the CLI hooks."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from ray_lipsync.avatar import AvatarStore
from ray_lipsync.avatar import face as face_module
from ray_lipsync.avatar.default import ensure_default_avatar, load_or_prepare
from ray_lipsync.avatar.store import FORMAT_VERSION
from ray_lipsync.avatar.prepare import PrepareReport, list_avatars, run_prepare
from ray_lipsync.config import AvatarConfig, Settings
from ray_lipsync.errors import AvatarError, AvatarNotFound
from helpers import assert_same, synthetic_avatar


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, PrepareReport]:
    """The astronaut prepared once through the CLI hook into a fresh home."""
    home = tmp_path_factory.mktemp("home")
    image = home / "astronaut.png"
    cv2.imwrite(str(image), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    settings = Settings(home=home)
    report = run_prepare(settings, image=image, video=None, name="astro", progress=False)
    return settings, report


@pytest.fixture
def no_analyzer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any face analysis fail loudly: loading must never re-run it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("face analysis ran during load")

    monkeypatch.setattr(face_module.FaceAnalyzer, "__init__", refuse)


def test_round_trip_is_exact_and_memory_mapped(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path)
    avatar = synthetic_avatar()
    path = store.save(avatar, {"frames": 3, "detected": 2, "source": "synthetic"})
    assert path == tmp_path / "synth" and (path / "avatar.arrow").is_file()
    loaded = store.load("synth")
    assert_same(avatar, loaded)
    assert not loaded.frames.flags.writeable and not loaded.crops.flags.writeable
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(path / "avatar.arrow") in maps.read_text()
    copied = store.load("synth", mmap=False)
    assert_same(avatar, copied)
    assert copied.frames.flags.writeable
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["frames"] == 3
    assert (manifest["width"], manifest["height"], manifest["fps"]) == (64, 48, 30.0)
    assert manifest["crop_size"] == 256 and manifest["source"] == "synthetic"
    assert [p.name for p in tmp_path.iterdir()] == ["synth"]  # no temp dirs left behind


def test_save_replaces_and_delete(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path)
    store.save(synthetic_avatar("b"))
    store.save(synthetic_avatar("a", n=2))
    assert store.names() == ["a", "b"] and store.exists("a")
    replacement = synthetic_avatar("a", n=4, seed=7)
    store.save(replacement)
    assert_same(replacement, store.load("a"))
    store.delete("a")
    assert store.names() == ["b"] and not store.exists("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    with pytest.raises(AvatarNotFound):
        store.delete("a")


def test_unknown_name_is_not_found(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path / "nothing-here")
    assert store.names() == []
    with pytest.raises(AvatarNotFound, match="no prepared avatar named 'ghost'") as err:
        store.load("ghost")
    assert isinstance(err.value, KeyError) and isinstance(err.value, AvatarError)


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "-dash", "a b", "x" * 65, "ü", None, 5])
def test_bad_names_rejected(tmp_path: Path, name: object) -> None:
    store = AvatarStore(tmp_path)
    for call in (store.load, store.exists, store.delete, store.manifest):
        with pytest.raises(AvatarError, match="invalid avatar name"):
            call(name)  # type: ignore[arg-type]
    bad = synthetic_avatar()
    bad.name = name  # type: ignore[assignment]
    with pytest.raises(AvatarError, match="invalid avatar name"):
        store.save(bad)
    assert list(tmp_path.iterdir()) == []


def test_good_names_accepted(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path)
    for name in ("a", "A-1_b", "9" * 64):
        store.save(synthetic_avatar(name, n=1))
    assert store.names() == sorted(["a", "A-1_b", "9" * 64])


def test_unsupported_format_version_rejected(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path)
    path = store.save(synthetic_avatar())
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AvatarError, match=f"format_version {FORMAT_VERSION + 1}.*prepare the avatar again"):
        store.load("synth")
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(AvatarError, match="unreadable manifest"):
        store.load("synth")


def test_corrupt_arrow_file_rejected(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path)
    path = store.save(synthetic_avatar())
    (path / "avatar.arrow").write_bytes(b"garbage" * 100)
    with pytest.raises(AvatarError, match="cannot read"):
        store.load("synth")


def test_add_extras_round_trip(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path)
    avatar = synthetic_avatar()
    store.save(avatar)
    latents = np.random.default_rng(1).normal(size=(3, 8, 32, 32)).astype(np.float16)
    store.add_extras("synth", {"musetalk_latents": latents})
    store.add_extras("synth", {"levels": np.arange(3, dtype=np.float32)})
    loaded = store.load("synth")
    assert_same(avatar, loaded)
    assert set(loaded.extras) == {"musetalk_latents", "levels"}
    assert loaded.extras["musetalk_latents"].dtype == np.float16
    assert np.array_equal(loaded.extras["musetalk_latents"], latents)
    assert loaded.extras["levels"].tolist() == [0.0, 1.0, 2.0]
    assert store.manifest("synth")["extras"]["musetalk_latents"] == {"shape": [8, 32, 32], "dtype": "float16"}
    # re-saving the loaded avatar keeps its extras
    store.save(loaded)
    assert np.array_equal(store.load("synth").extras["musetalk_latents"], latents)


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"x": np.zeros((2, 4), np.float32)}, "one row per frame"),
        ({"x": np.array(["a", "b", "c"])}, "numeric"),
        ({"bad key!": np.zeros(3)}, "invalid extras key"),
    ],
)
def test_add_extras_validates(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    store = AvatarStore(tmp_path)
    store.save(synthetic_avatar())
    with pytest.raises(AvatarError, match=match):
        store.add_extras("synth", arrays)
    with pytest.raises(AvatarNotFound):
        store.add_extras("ghost", {"x": np.zeros(3)})


def test_cli_prepare_then_load_without_analysis(cli_home: tuple[Settings, PrepareReport], no_analyzer: None) -> None:
    settings, report = cli_home
    assert report.frames == report.detected == 1 and report.source.endswith("astronaut.png")
    store = AvatarStore(settings.avatars_dir)
    avatar = store.load("astro")
    assert avatar.detected.all() and avatar.size == (512, 512)
    assert np.array_equal(np.asarray(avatar.frames[0]), data.astronaut())
    assert store.manifest("astro")["report"]["detected"] == 1
    rows = list_avatars(settings)
    assert [r["name"] for r in rows] == ["astro"] and rows[0]["frames"] == 1 and rows[0]["extras"] == []


def test_cli_prepare_validates_arguments(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    with pytest.raises(AvatarError, match="exactly one"):
        run_prepare(settings, image=None, video=None, name="x")
    with pytest.raises(AvatarError, match="exactly one"):
        run_prepare(settings, image=tmp_path / "a.png", video=tmp_path / "a.mp4", name="x")
    with pytest.raises(AvatarError, match="does not exist"):
        run_prepare(settings, image=tmp_path / "missing.png", video=None, name="x")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(AvatarError, match="cannot read image"):
        run_prepare(settings, image=tmp_path / "text.png", video=None, name="x")
    with pytest.raises(AvatarError, match="unknown backend"):
        run_prepare(settings, image=tmp_path / "text.png", video=None, name="x", backend="nope")
    with pytest.raises(AvatarError, match="invalid avatar name"):
        run_prepare(settings, image=tmp_path / "text.png", video=None, name="a/b")
    assert list_avatars(settings) == []


def test_default_avatar_prepared_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = AvatarStore(tmp_path)
    config = AvatarConfig()
    first = ensure_default_avatar(store, config)
    assert first.name == "default" and first.size == (512, 512) and first.detected.all()
    assert store.names() == ["default"]
    assert store.manifest("default")["source"] == "skimage.data.astronaut"

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("face analysis ran for a cached default avatar")

    monkeypatch.setattr(face_module.FaceAnalyzer, "__init__", refuse)
    again = load_or_prepare(store, "default", config)
    assert_same(first, again)
    with pytest.raises(AvatarNotFound):
        load_or_prepare(store, "someone", config)
    with pytest.raises(AvatarError, match="invalid avatar name"):
        load_or_prepare(store, "../default", config)


def test_a_default_avatar_of_an_older_store_format_is_prepared_again(tmp_path):
    """After an upgrade that changed the store format, the default avatar is made anew;
    other avatars answer with a clear 'prepare it again'."""
    import json

    from ray_lipsync.avatar.default import ensure_default_avatar
    from ray_lipsync.avatar.store import FORMAT_VERSION, AvatarStore
    from ray_lipsync.config import AvatarConfig

    store = AvatarStore(tmp_path)
    ensure_default_avatar(store, AvatarConfig())
    manifest = tmp_path / "default" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "format_version": FORMAT_VERSION - 1}))
    avatar = ensure_default_avatar(store, AvatarConfig())
    assert json.loads(manifest.read_text())["format_version"] == FORMAT_VERSION
    assert len(avatar) >= 1


def test_shipped_default_landmarks_are_what_face_mesh_finds() -> None:
    """default_face.json is Face Mesh's answer on the default image (regenerate with
    `python -m ray_lipsync.avatar.default` when either changes)."""
    pytest.importorskip("mediapipe")
    from ray_lipsync.avatar.default import default_landmarks, measure_default_landmarks

    shipped, measured = default_landmarks(), measure_default_landmarks()
    assert shipped.shape == (478, 2)
    assert np.abs(shipped - measured).max() < 0.05  # px; the file keeps 3 decimals


def test_default_avatar_needs_no_face_analysis(tmp_path: Path, no_analyzer: None) -> None:
    """Without MediaPipe (the prepare extra) the default avatar is still prepared, also at a
    smaller max_side (the shipped landmarks are scaled with the image)."""
    full = ensure_default_avatar(AvatarStore(tmp_path / "a"), AvatarConfig())
    small = ensure_default_avatar(AvatarStore(tmp_path / "b"), AvatarConfig(max_side=256))
    assert full.size == (512, 512) and small.size == (256, 256)
    # x1, y1, x2 scale with the image (y2 adds extra_margin, in pixels of either size)
    np.testing.assert_allclose(small.crop_boxes[0][:3], full.crop_boxes[0][:3] / 2, atol=1.5)


def test_preparing_without_mediapipe_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from ray_lipsync.avatar.prepare import prepare_image

    monkeypatch.setitem(sys.modules, "mediapipe", None)  # import raises ImportError
    with pytest.raises(AvatarError, match=r"ray-lipsync\[prepare\]"):
        prepare_image(data.astronaut(), "astro", AvatarConfig())
