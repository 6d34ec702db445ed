"""Split GGUF models (``name-00001-of-00003.gguf`` ...) on the real SmolLM2 model.

The split is made at test time by ``gguf_split.split_gguf``, which writes the parts
exactly as llama.cpp's ``llama-gguf-split`` does; llama.cpp itself then loads them.
Broken splits (a part missing, truncated, renumbered, or disagreeing on the count)
must be refused by hearth.gguf with one ``InvalidModel`` line naming the part, before
llama.cpp opens anything.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

import hearth
from hearth.engines.llamacpp import model as llamacpp_model
from hearth.errors import InvalidModel
from hearth.gguf import inspect_model, read_gguf, split_parts

from gguf_split import split_gguf

N_PARTS = 3
PROMPT = "The three primary colors are"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def parts(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return split_gguf(smollm2_path, tmp_path_factory.mktemp("split"), N_PARTS)


def link_parts(parts: list[Path], dest: Path) -> list[Path]:
    """The parts, under their own names, in ``dest`` (hard links: no 100 MB copies)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for p in parts:
        q = dest / p.name
        try:
            os.link(p, q)
        except OSError:
            shutil.copyfile(p, q)
        out.append(q)
    return out


def replace_file(path: Path, data: bytes) -> None:
    """Give ``path`` new content without touching a hard-linked original."""
    path.unlink()
    path.write_bytes(data)


@pytest.fixture
def no_llama_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tripwire: the test fails if llama.cpp is asked to open any model file."""

    def tripwire(path: bytes, params: object) -> None:
        raise AssertionError(f"llama.cpp was asked to load {path!r}")

    monkeypatch.setattr(llamacpp_model.ll, "llama_model_load_from_file", tripwire)


def refused(path: Path) -> str:
    """Both inspect_model and load_model refuse ``path`` with one InvalidModel line."""
    with pytest.raises(InvalidModel) as exc:
        inspect_model(path)
    msg = str(exc.value)
    assert msg.strip() and "\n" not in msg, msg
    with pytest.raises(InvalidModel) as exc2:
        hearth.load_model(path, n_ctx=256)
    assert str(exc2.value) == msg
    return msg


# --------------------------------------------------------------------------- naming


def test_split_parts_follows_llama_cpp_naming(tmp_path: Path) -> None:
    first = tmp_path / "model-Q4_K_M-00001-of-00003.gguf"
    expected = [tmp_path / f"model-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert split_parts(first) == expected
    assert split_parts(expected[2]) == expected  # any part names them all
    assert split_parts(str(first)) == expected
    for name in (
        "model.gguf",
        "model-00001-of-00001.gguf",  # a one-part "split" is a single file
        "model-0001-of-0003.gguf",  # llama.cpp pads to five digits
        "model-000001-of-000003.gguf",  # ... and no more below 100000
        "model-00004-of-00003.gguf",
        "model-00000-of-00003.gguf",
        "-00001-of-00003.gguf",  # no prefix
        "model-00001-of-00003.GGUF",  # llama.cpp's match is case-sensitive
    ):
        assert split_parts(tmp_path / name) == [tmp_path / name], name


def test_the_splitter_writes_what_llama_gguf_split_writes(parts: list[Path], smollm2_path: Path) -> None:
    src = read_gguf(smollm2_path)
    assert [p.name for p in parts] == [
        f"{smollm2_path.stem}-{i:05d}-of-{N_PARTS:05d}.gguf" for i in range(1, N_PARTS + 1)
    ]
    files = [read_gguf(p) for p in parts]
    for no, gf in enumerate(files):
        assert gf.version == 3
        assert gf.get("split.no") == no
        assert gf.get("split.count") == N_PARTS
        assert gf.get("split.tensors.count") == len(src.tensors)
        assert gf.tensors, "every part holds tensors"
        if no:  # later parts: the split KVs only
            assert set(gf.metadata) == {"split.no", "split.count", "split.tensors.count"}
    # the first part: every source KV (long arrays included), then the split KVs
    assert list(files[0].metadata)[: len(src.metadata)] == list(src.metadata)
    assert {k: v for k, v in files[0].metadata.items() if not k.startswith("split.")} == src.metadata
    joined = [t for gf in files for t in gf.tensors]
    assert [(t.name, t.shape, t.ggml_type) for t in joined] == [
        (t.name, t.shape, t.ggml_type) for t in src.tensors
    ]
    # the tensor data is the source's, byte for byte
    with open(smollm2_path, "rb") as f:
        for gf in files:
            with open(gf.path, "rb") as g:
                for t in gf.tensors[:3] + gf.tensors[-2:]:
                    s = next(x for x in src.tensors if x.name == t.name)
                    f.seek(src.data_offset + s.offset)
                    g.seek(gf.data_offset + t.offset)
                    assert f.read(t.n_bytes) == g.read(t.n_bytes), t.name


# --------------------------------------------------------------------------- inspect


def test_inspect_split_describes_the_whole_model(parts: list[Path], smollm2_path: Path) -> None:
    whole = inspect_model(smollm2_path)
    split = inspect_model(parts[0])
    assert split.path == parts[0]
    assert split.split_count == N_PARTS and whole.split_count == 1
    assert split.file_size == sum(p.stat().st_size for p in parts)
    for attr in (
        "parameters", "weights_bytes", "quantization", "quantization_source", "block_count",
        "layer_bytes", "non_layer_bytes", "output_bytes", "tensor_types", "architecture",
        "context_length", "vocab_size", "chat_template", "embedding_length",
    ):
        assert getattr(split, attr) == getattr(whole, attr), attr
    assert split.bits_per_weight == whole.bits_per_weight
    assert split_parts(parts[0]) == parts
    assert split_parts(smollm2_path) == [smollm2_path]


def test_one_part_alone_would_fail_the_block_count_check(parts: list[Path]) -> None:
    """The sanity check counts the tensors of all parts: the first part alone holds
    fewer tensors than a whole model, yet its split model passes."""
    first = read_gguf(parts[0])
    info = inspect_model(parts[0])
    assert sum(info.tensor_types.values()) == first.get("split.tensors.count") > len(first.tensors)


# --------------------------------------------------------------------------- llama.cpp


def test_llama_cpp_loads_the_split_and_generates_the_same_text(parts: list[Path], smollm2_path: Path) -> None:
    with hearth.load_model(smollm2_path, n_ctx=256) as m:
        want = m.generate_text(PROMPT, max_tokens=16, temperature=0)
    with hearth.load_model(parts[0], n_ctx=256) as m:
        assert m.info.split_count == N_PARTS
        got = m.generate_text(PROMPT, max_tokens=16, temperature=0)
    assert want.text.strip(), "the unsplit model generated nothing"
    assert got.text == want.text
    assert got.token_ids == want.token_ids


# --------------------------------------------------------------------------- refusals


def test_a_missing_part_is_refused(parts: list[Path], tmp_path: Path, no_llama_load: None) -> None:
    copy = link_parts(parts, tmp_path)
    copy[1].unlink()
    msg = refused(copy[0])
    assert str(copy[1]) in msg and "missing" in msg


def test_a_truncated_part_is_refused(parts: list[Path], tmp_path: Path, no_llama_load: None) -> None:
    copy = link_parts(parts, tmp_path)
    data = copy[2].read_bytes()
    replace_file(copy[2], data[: len(data) // 2])
    msg = refused(copy[0])
    assert msg.startswith(str(copy[2])), msg
    assert "truncated" in msg.replace(str(copy[2]), "")


def test_a_part_that_is_not_gguf_is_refused(parts: list[Path], tmp_path: Path, no_llama_load: None) -> None:
    copy = link_parts(parts, tmp_path)
    replace_file(copy[1], b"<html>404 Not Found</html>")  # a failed download
    msg = refused(copy[0])
    assert msg.startswith(str(copy[1])) and "not a GGUF file" in msg


def test_giving_a_later_part_is_refused_naming_the_first(parts: list[Path], no_llama_load: None) -> None:
    for later in parts[1:]:
        msg = refused(later)
        assert str(later) in msg
        assert "first part" in msg and msg.endswith(str(parts[0])), msg


def test_a_part_with_another_split_count_is_refused(parts: list[Path], tmp_path: Path, no_llama_load: None) -> None:
    copy = link_parts(parts, tmp_path)
    data = copy[2].read_bytes()
    field = b"split.count" + struct.pack("<IH", 2, N_PARTS)
    assert data.count(field) == 1
    replace_file(copy[2], data.replace(field, b"split.count" + struct.pack("<IH", 2, N_PARTS + 1)))
    msg = refused(copy[0])
    assert str(copy[2]) in msg and "split.count" in msg


def test_parts_in_the_wrong_order_are_refused(parts: list[Path], tmp_path: Path, no_llama_load: None) -> None:
    copy = link_parts(parts, tmp_path)
    tmp = copy[1].with_name("swap")
    copy[1].rename(tmp)
    copy[2].rename(copy[1])
    tmp.rename(copy[2])
    msg = refused(copy[0])
    assert str(copy[1]) in msg and "split.no" in msg


def test_a_renamed_first_part_is_refused(parts: list[Path], tmp_path: Path, no_llama_load: None) -> None:
    """llama.cpp finds the other parts by the first part's name; without it, it cannot."""
    copy = link_parts(parts, tmp_path)
    renamed = copy[0].with_name("model.gguf")
    copy[0].rename(renamed)
    msg = refused(renamed)
    assert "-00001-of-00003.gguf" in msg
