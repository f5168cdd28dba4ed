"""Generated caches: a killed build leaves nothing behind, a damaged cache is rebuilt, and others can read it."""

import os
import stat

import torch

from colqwen3_lib import tiny
from colqwen3_lib.files import build_folder, safetensors_problem


def test_a_killed_build_leaves_no_temporary_folder_after_the_next_one(tmp_path):
    target = tmp_path / "cache" / "thing"
    target.parent.mkdir()
    leftover = target.parent / ".thing-abc123"  # what a build killed mid-way leaves
    leftover.mkdir()
    (leftover / "half.bin").write_bytes(b"x")
    build_folder(target, lambda tmp: (tmp / "done.txt").write_text("ok"))
    assert (target / "done.txt").read_text() == "ok"
    assert sorted(p.name for p in target.parent.iterdir()) == ["thing"]


def test_built_folders_get_the_usual_permissions_not_owner_only(tmp_path):
    """A shared cache is read by other users: the folder, its subfolders and its files (safetensors writes its
    files owner-only, 0600) get what the umask gives, as the tiny checkpoint's model.safetensors does."""

    def write(tmp):
        (tmp / "sub").mkdir(mode=0o700)
        for file in (tmp / "model.safetensors", tmp / "sub" / "data.arrow"):
            file.write_text("x")
            file.chmod(0o600)

    umask = os.umask(0o022)
    try:
        folder = build_folder(tmp_path / "shared", write)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "sub").stat().st_mode) == 0o755
    assert [
        stat.S_IMODE(f.stat().st_mode) for f in (folder / "model.safetensors", folder / "sub" / "data.arrow")
    ] == [0o644, 0o644]


def test_a_damaged_tiny_checkpoint_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv(tiny.CACHE_ENV, str(tmp_path))
    path = tiny.tiny_checkpoint_path()
    weights = path / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 3])  # a copy cut off, a disk error
    assert "cut off" in safetensors_problem(weights)
    assert tiny.tiny_checkpoint_path() == path
    assert weights.read_bytes() == whole  # the same seed rebuilds the same weights


def test_the_untrained_model_is_the_same_on_a_fresh_cache_as_on_a_warm_one(tmp_path, monkeypatch):
    """Building the tiny checkpoint must not consume the seed of the new head's initialisation."""
    from colqwen3_lib.model import load_model

    heads = []
    for attempt in ("fresh", "warm"):
        monkeypatch.setenv(tiny.CACHE_ENV, str(tmp_path / "cache"))
        model, _ = load_model("tiny")
        heads.append(model.custom_text_proj.weight.detach().clone())
        assert (tmp_path / "cache").exists(), attempt
    torch.testing.assert_close(heads[0], heads[1], rtol=0, atol=0)
