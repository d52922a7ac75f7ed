"""The avatar store's shared location (settings.avatar_uri): a pyarrow filesystem URI or path
every node reads. Tested with local directories, as a plain path and as a file:// URI."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from ray_lipsync.avatar import AvatarStore
from ray_lipsync.avatar.default import DEFAULT_NAME, ensure_default_avatar
from ray_lipsync.avatar.prepare import run_prepare
from ray_lipsync.config import AvatarConfig, Settings
from ray_lipsync.errors import AvatarError, AvatarNotFound
from helpers import assert_same, synthetic_avatar


@pytest.fixture(params=["path", "file-uri"])
def shared(request, tmp_path: Path) -> tuple[Path, str]:
    """(directory, how settings name it)."""
    directory = tmp_path / "shared avatars"  # a space: URIs must be handled, not pasted
    directory.mkdir()
    return directory, str(directory) if request.param == "path" else directory.as_uri()


def test_upload_then_another_node_fetches_on_first_load(tmp_path: Path, shared) -> None:
    directory, uri = shared
    node_a = AvatarStore(tmp_path / "a", uri)
    avatar = synthetic_avatar("alice")
    node_a.save(avatar)
    assert node_a.upload("alice").endswith("/alice")
    assert sorted(p.name for p in (directory / "alice").iterdir()) == ["avatar.arrow", "manifest.json"]

    node_b = AvatarStore(tmp_path / "b", uri)
    assert not node_b.exists("alice") and node_b.names() == []
    assert node_b.names(include_shared=True) == ["alice"]
    assert_same(node_b.load("alice"), avatar)  # fetched, then loaded from the local copy
    assert node_b.exists("alice") and (tmp_path / "b" / "alice" / "manifest.json").is_file()
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".")]  # no temp dirs left

    (directory / "alice" / "avatar.arrow").unlink()  # later loads never go back to the share
    assert_same(node_b.load("alice"), avatar)


def test_missing_everywhere_is_not_found(tmp_path: Path, shared) -> None:
    store = AvatarStore(tmp_path / "local", shared[1])
    assert store.fetch("nobody") is False
    with pytest.raises(AvatarNotFound):
        store.load("nobody")


def test_without_a_shared_location_the_store_is_local_only(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path)
    store.save(synthetic_avatar("bob"))
    assert store.fetch("bob") is False and store.names(include_shared=True) == ["bob"]
    with pytest.raises(AvatarError, match="avatar_uri"):
        store.upload("bob")


def test_bad_location_is_a_clear_error(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path, "nosuchscheme://bucket/avatars")
    with pytest.raises(AvatarError, match="invalid avatar location"):
        store.fetch("alice")


def test_a_broken_shared_avatar_is_rejected_on_load(tmp_path: Path, shared) -> None:
    directory, uri = shared
    (directory / "carol").mkdir()
    (directory / "carol" / "manifest.json").write_text('{"format_version": 1, "frames": 3, "extras": {}}')
    with pytest.raises(AvatarError, match="carol"):
        AvatarStore(tmp_path / "local", uri).load("carol")


def test_cli_prepare_uploads_and_a_fresh_node_serves_it(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    image = tmp_path / "astronaut.png"
    cv2.imwrite(str(image), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    prepared_on = Settings(home=tmp_path / "laptop", avatar_uri=shared.as_uri())
    run_prepare(prepared_on, image=image, video=None, name="astro", progress=False)
    assert (shared / "astro" / "manifest.json").is_file()

    from ray_lipsync.streaming.engine import load_avatar

    worker = Settings(home=tmp_path / "worker", avatar_uri=shared.as_uri())
    avatar = load_avatar(worker, "astro")
    local = AvatarStore(prepared_on.avatars_dir).load("astro")
    assert np.array_equal(avatar.frames, local.frames) and avatar.detected.all()


def test_default_avatar_comes_from_the_share_when_it_is_there(tmp_path: Path, monkeypatch) -> None:
    shared = tmp_path / "shared"
    origin = AvatarStore(tmp_path / "origin", str(shared))
    origin.save(synthetic_avatar(DEFAULT_NAME))
    origin.upload(DEFAULT_NAME)
    import ray_lipsync.avatar.prepare as prepare

    monkeypatch.setattr(prepare, "prepare_image", lambda *a, **k: pytest.fail("prepared again"))
    avatar = ensure_default_avatar(AvatarStore(tmp_path / "node", str(shared)), AvatarConfig())
    assert_same(avatar, synthetic_avatar(DEFAULT_NAME))


def test_avatar_list_route_includes_shared_avatars(tmp_path: Path) -> None:
    from ray_lipsync.api.routes import list_avatars

    shared = tmp_path / "shared"
    origin = AvatarStore(tmp_path / "origin", str(shared))
    origin.save(synthetic_avatar("dora"))
    origin.upload("dora")
    settings = Settings(home=tmp_path / "node", avatar_uri=str(shared))
    listed = list_avatars(settings)
    assert listed["avatars"] == ["default", "dora"]
    assert listed["clips"] == {"default": [], "dora": []}  # not fetched here: none listed yet
