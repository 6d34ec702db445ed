"""hearth.gguf on real models: what it reads, how it names quantizations, what it refuses.

Every model here is a real GGUF file (SmolLM2-135M, Gemma 3 270M, and variants of
SmolLM2 made at test time by llama.cpp's own quantizer). Corrupt files are real files
with bytes patched or cut; the fuzz tests feed the real SmolLM2 header through
hypothesis. The rule under test everywhere: a bad file is refused with a one-line
``HearthError``, and nothing else (struct.error, IndexError, MemoryError, ...) escapes.
"""

from __future__ import annotations

import ctypes
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hearth.errors import HearthError, InvalidModel, ModelNotFound, UnsupportedFormat
from hearth.gguf import (
    ArrayInfo,
    inspect_model,
    quantization_from_filename,
    read_gguf,
)

HEAD_BYTES = 64 * 1024  # the first 64 KiB of SmolLM2: header, metadata, part of the vocab
FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------- helpers


class Blob(bytes):
    """Bytes with a short repr, so hypothesis does not print 64 KiB on a failure."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


def assert_one_line_refusal(exc: BaseException) -> str:
    """The error is a HearthError whose message is one non-empty line; returns it."""
    assert isinstance(exc, HearthError), f"{type(exc).__name__} escaped: {exc!r}"
    msg = str(exc)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg and "\r" not in msg, f"multi-line message: {msg!r}"
    return msg


def reason(msg: str, path: Path) -> str:
    """The message without the file's path (tmp paths hold the test's name, which
    would satisfy any check for a word such as "truncated")."""
    assert str(path) in msg, f"the message does not name the file: {msg!r}"
    return msg.replace(str(path), "<path>")


def refusal(cls: type[HearthError], path: Path) -> str:
    """read_gguf(path) raises exactly ``cls`` with a one-line message naming the file;
    returns that message without the path."""
    with pytest.raises(HearthError) as info:
        read_gguf(path)
    assert type(info.value) is cls, f"expected {cls.__name__}, got {info.type.__name__}: {info.value}"
    return reason(assert_one_line_refusal(info.value), path)


def read_or_refuse(path: Path) -> None:
    """read_gguf either succeeds or raises a one-line HearthError; nothing else."""
    try:
        read_gguf(path)
    except HearthError as e:
        assert_one_line_refusal(e)


def kv_type_offset(header: bytes, key: str) -> int:
    """Offset of the u32 value type of metadata ``key`` in a real header (the value
    follows it)."""
    kb = key.encode()
    i = header.index(struct.pack("<Q", len(kb)) + kb)
    return i + 8 + len(kb)


def patched_copy(src: Path, dst: Path, patches: dict[int, bytes]) -> Path:
    """A byte-for-byte copy of a real model with some bytes overwritten."""
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        for offset, data in patches.items():
            f.seek(offset)
            f.write(data)
    return dst


def without_file_type(src: Path, dst: Path) -> Path:
    """A copy whose general.file_type key is renamed (same length), so it is missing."""
    header = src.read_bytes()[: 1 << 21]
    key = b"general.file_type"
    at = header.index(struct.pack("<Q", len(key)) + key) + 8
    return patched_copy(src, dst, {at: b"general.file_typx"})


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path):
    return inspect_model(smollm2_path)


@pytest.fixture(scope="module")
def gemma3(gemma3_path: Path):
    return inspect_model(gemma3_path)


@pytest.fixture(scope="module")
def smollm2_head(smollm2_path: Path) -> bytes:
    with open(smollm2_path, "rb") as f:
        return Blob(f.read(HEAD_BYTES))


@pytest.fixture(scope="module")
def smollm2_header(smollm2_path: Path) -> bytes:
    """Everything before the tensor data: header, all metadata, the tensor table."""
    gf = read_gguf(smollm2_path)
    with open(smollm2_path, "rb") as f:
        return Blob(f.read(gf.data_offset))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory the hypothesis tests reuse (tmp_path is per test, not per example)."""
    return tmp_path_factory.mktemp("gguf-fuzz")


QUANTS = {
    # name hearth must report -> llama_ftype constant in llama_cpp
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
}


@pytest.fixture(scope="session")
def smollm2_quantized(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SmolLM2 requantized by llama.cpp into every type in QUANTS, once per session.

    The output names carry no quantization tag, so only the file's contents can name it.
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    out_dir = tmp_path_factory.mktemp("quantized")
    made: dict[str, Path] = {}
    for name, const in QUANTS.items():
        dst = out_dir / f"smollm2-variant-{len(made)}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, const)
        params.allow_requantize = True
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(
            str(smollm2_path).encode(), str(dst).encode(), ctypes.byref(params)
        )
        assert rc == 0, f"llama.cpp failed to quantize SmolLM2 to {name} (rc={rc})"
        made[name] = dst
    return made


# --------------------------------------------------------------------------- real models


def test_smollm2_metadata_matches_the_published_model(smollm2):
    assert smollm2.architecture == "llama"
    assert smollm2.gguf_version == 3
    assert smollm2.block_count == 30
    assert smollm2.embedding_length == 576
    assert smollm2.head_count == 9
    assert smollm2.head_count_kv == 3
    assert smollm2.key_length == smollm2.value_length == 64  # 576 / 9
    assert smollm2.vocab_size == 49152
    assert smollm2.context_length == 8192
    assert smollm2.has_chat_template
    assert "im_start" in smollm2.chat_template
    assert smollm2.quantization == "Q4_1"
    assert smollm2.quantization_source == "file_type"
    assert smollm2.file_type == 3
    assert 125_000_000 <= smollm2.parameters <= 145_000_000
    assert smollm2.sliding_window == 0 and smollm2.swa_layers == 0
    assert smollm2.bos_token_id == 1 and smollm2.eos_token_id == 2


def test_gemma3_metadata_matches_the_published_model(gemma3):
    assert gemma3.architecture == "gemma3"
    assert gemma3.block_count == 18
    assert gemma3.embedding_length == 640
    assert gemma3.head_count == 4
    assert gemma3.head_count_kv == 1
    assert gemma3.key_length == gemma3.value_length == 256
    assert gemma3.vocab_size == 262144
    assert gemma3.context_length == 32768
    assert not gemma3.has_chat_template
    assert gemma3.chat_template is None
    assert gemma3.quantization == "Q4_K_M"
    assert gemma3.quantization_source == "file_type"
    assert 250_000_000 <= gemma3.parameters <= 290_000_000
    # gemma3: a 512-token sliding window on 5 of every 6 layers
    assert gemma3.sliding_window == 512
    assert gemma3.swa_layers == 15


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_weight_accounting_adds_up_inside_the_file(model, request):
    info = request.getfixturevalue(model)
    gf = read_gguf(info.path)
    assert 0 < info.weights_bytes <= info.file_size
    assert gf.data_offset + info.weights_bytes <= info.file_size
    assert gf.data_offset % 32 == 0
    assert len(info.layer_bytes) == info.block_count
    assert all(b > 0 for b in info.layer_bytes)
    assert sum(info.layer_bytes) + info.non_layer_bytes == info.weights_bytes
    assert sum(info.tensor_types.values()) == len(gf.tensors)
    assert 3.0 < info.bits_per_weight < 9.0


def test_read_gguf_keeps_small_metadata_and_summarises_big_arrays(smollm2_path):
    gf = read_gguf(smollm2_path)
    assert gf.version == 3
    assert len(gf.tensors) == 272
    assert gf.get("general.architecture") == "llama"
    assert gf.get("llama.block_count") == 30
    assert gf.get("general.languages") == ["en"]
    tokens = gf.get("tokenizer.ggml.tokens")
    assert isinstance(tokens, ArrayInfo) and len(tokens) == 49152
    names = {t.name for t in gf.tensors}
    assert "token_embd.weight" in names and "blk.29.ffn_down.weight" in names
    assert gf.get("no.such.key", "dflt") == "dflt"


def test_model_info_to_dict_is_plain_data(gemma3):
    d = gemma3.to_dict()
    assert d["architecture"] == "gemma3"
    assert d["quantization"] == "Q4_K_M"
    assert d["has_chat_template"] is False
    assert isinstance(d["tensor_types"], dict) and d["tensor_types"]["Q4_K"] > 0


# --------------------------------------------------------------------------- quantization names


@pytest.mark.parametrize("quant", list(QUANTS))
def test_llama_cpp_quantizations_are_named_from_file_type(quant, smollm2_quantized, smollm2):
    info = inspect_model(smollm2_quantized[quant])
    assert info.quantization == quant
    assert info.quantization_source == "file_type"
    assert info.file_type is not None
    # requantizing changes the weights, never the model
    assert info.block_count == smollm2.block_count
    assert info.parameters == smollm2.parameters
    assert info.weights_bytes <= info.file_size


def test_smaller_quantizations_make_smaller_weights(smollm2_quantized):
    size = {q: inspect_model(p).weights_bytes for q, p in smollm2_quantized.items()}
    assert size["Q4_0"] < size["Q8_0"] < size["F16"]
    assert size["Q6_K"] < size["Q8_0"]


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("model.Q4_K_M.gguf", "Q4_K_M"),
        ("foo.Q5_K_M.gguf", "Q5_K_M"),
        ("Llama-3-8B-Instruct-Q4_K_M.gguf", "Q4_K_M"),
        ("qwen2.5-0.5b-instruct-q4_k_m.gguf", "Q4_K_M"),
        ("m-Q3_K_L-00001-of-00002.gguf", "Q3_K_L"),
        ("x-IQ3_XXS.gguf", "IQ3_XXS"),
        ("x.IQ2_XS.gguf", "IQ2_XS"),
        ("m.q8_0.gguf", "Q8_0"),
        ("m-Q6_K.gguf", "Q6_K"),
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
        ("y.f16.gguf", "F16"),
        ("y.BF16.gguf", "BF16"),
        ("z.gguf", None),
        ("FQ4_K_M.gguf", None),  # a tag must start a word
    ],
)
def test_quantization_from_filename_reads_the_whole_tag(filename, expected):
    assert quantization_from_filename(filename) == expected


def test_filename_names_quantization_when_file_type_is_missing(smollm2_quantized, tmp_path):
    # a real Q5_K_M file (its 576-wide rows fell back to Q5_1) with general.file_type gone
    path = without_file_type(smollm2_quantized["Q5_K_M"], tmp_path / "foo.Q5_K_M.gguf")
    assert "general.file_type" not in read_gguf(path).metadata
    info = inspect_model(path)
    assert (info.quantization, info.quantization_source, info.file_type) == (
        "Q5_K_M",
        "filename",
        None,
    )


def test_without_file_type_or_tag_the_tensors_name_the_quantization(smollm2_quantized, tmp_path):
    path = without_file_type(smollm2_quantized["Q8_0"], tmp_path / "foo.gguf")
    info = inspect_model(path)
    assert (info.quantization, info.quantization_source) == ("Q8_0", "tensors")


def test_filename_tag_contradicted_by_the_tensors_is_ignored(smollm2_quantized, tmp_path):
    path = without_file_type(smollm2_quantized["Q8_0"], tmp_path / "foo.Q4_0.gguf")
    info = inspect_model(path)
    assert (info.quantization, info.quantization_source) == ("Q8_0", "tensors")


def test_file_type_contradicted_by_every_tensor_yields_to_the_tensors(smollm2_path, tmp_path):
    header = smollm2_path.read_bytes()[: 1 << 21]
    at = kv_type_offset(header, "general.file_type") + 4  # the u32 value
    path = patched_copy(smollm2_path, tmp_path / "mislabelled.gguf", {at: struct.pack("<I", 1)})
    assert read_gguf(path).get("general.file_type") == 1  # says F16, holds Q4_1
    info = inspect_model(path)
    assert (info.quantization, info.quantization_source) == ("Q4_1", "tensors")


# --------------------------------------------------------------------------- refusals


def test_missing_file_is_model_not_found(tmp_path):
    msg = refusal(ModelNotFound, tmp_path / "nope.gguf")
    assert "no such file" in msg
    with pytest.raises(ModelNotFound):
        inspect_model(tmp_path / "nope.gguf")


def test_directory_is_unsupported_format(tmp_path):
    msg = refusal(UnsupportedFormat, tmp_path)
    assert "directory" in msg


def test_empty_file_is_invalid_model(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert "empty" in refusal(InvalidModel, path)


@pytest.mark.parametrize(
    "start", [b"GGML", b"ggUF", b"\x00\x00\x00\x00", b"PK\x03\x04"], ids=repr
)
def test_wrong_magic_is_invalid_model(start, smollm2_head, tmp_path):
    path = tmp_path / "bad-magic.gguf"
    path.write_bytes(start + smollm2_head[4:])
    assert "not a GGUF file" in refusal(InvalidModel, path)


def test_text_file_is_invalid_model(tmp_path):
    path = tmp_path / "readme.gguf"
    path.write_text("this is not a model\nat all\n")
    assert "not a GGUF file" in refusal(InvalidModel, path)


@pytest.mark.parametrize("version", [0, 1, 4, 99, 0xFFFFFFFF])
def test_unsupported_gguf_version_is_invalid_model(version, smollm2_path, tmp_path):
    path = patched_copy(smollm2_path, tmp_path / "v.gguf", {4: struct.pack("<I", version)})
    msg = refusal(InvalidModel, path)
    assert f"unsupported GGUF version {version}" in msg


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda size, hdr: 3, id="inside-magic"),
        pytest.param(lambda size, hdr: 10, id="10-bytes"),
        pytest.param(lambda size, hdr: 24, id="after-counts"),
        pytest.param(lambda size, hdr: 1000, id="in-metadata"),
        pytest.param(lambda size, hdr: 100_000, id="in-vocabulary"),
        pytest.param(lambda size, hdr: hdr - 100, id="in-tensor-table"),
        pytest.param(lambda size, hdr: hdr, id="no-tensor-data"),
        pytest.param(lambda size, hdr: size // 2, id="half"),
        pytest.param(lambda size, hdr: size - 1, id="last-byte-missing"),
    ],
)
def test_truncated_real_model_is_invalid_model_saying_truncated(cut, smollm2_path, tmp_path):
    gf = read_gguf(smollm2_path)
    n = cut(gf.file_size, gf.data_offset)
    path = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(n))
    msg = refusal(InvalidModel, path)
    assert "truncated" in msg or "past the end" in msg, msg
    with pytest.raises(InvalidModel):
        inspect_model(path)


@pytest.mark.parametrize(
    ("offset", "what"),
    [(8, "tensor count"), (16, "metadata count")],
)
@pytest.mark.parametrize("value", [2**63, 2**64 - 1, 10**9])
def test_absurd_header_counts_are_invalid_model(offset, what, value, smollm2_path, tmp_path):
    path = patched_copy(smollm2_path, tmp_path / "count.gguf", {offset: struct.pack("<Q", value)})
    msg = refusal(InvalidModel, path)
    assert what in msg and "absurd" in msg


@pytest.mark.parametrize("value", [2**62, 2**64 - 1, 300 * 1024 * 1024])
def test_absurd_key_length_is_invalid_model(value, smollm2_path, tmp_path):
    # bytes 24..32: the length of the first metadata key
    path = patched_copy(smollm2_path, tmp_path / "key.gguf", {24: struct.pack("<Q", value)})
    assert "absurd" in refusal(InvalidModel, path)


@pytest.mark.parametrize("value", [2**63, 2**64 - 1, 257 * 1024 * 1024])
def test_absurd_string_value_length_is_invalid_model(value, smollm2_path, tmp_path):
    header = smollm2_path.read_bytes()[: 1 << 21]
    at = kv_type_offset(header, "general.name") + 4  # the string's u64 length
    path = patched_copy(smollm2_path, tmp_path / "str.gguf", {at: struct.pack("<Q", value)})
    msg = refusal(InvalidModel, path)
    assert "general.name" in msg and "absurd" in msg


def test_string_running_past_the_end_is_invalid_model(smollm2_path, tmp_path):
    header = smollm2_path.read_bytes()[: 1 << 21]
    at = kv_type_offset(header, "general.name") + 4
    big = 200 * 1024 * 1024  # under the sanity limit, over the file size
    path = patched_copy(smollm2_path, tmp_path / "str.gguf", {at: struct.pack("<Q", big)})
    assert "truncated" in refusal(InvalidModel, path)


@pytest.mark.parametrize("value_type", [13, 99, 0xFFFFFFFF])
def test_unknown_metadata_value_type_is_invalid_model(value_type, smollm2_path, tmp_path):
    header = smollm2_path.read_bytes()[: 1 << 21]
    at = kv_type_offset(header, "llama.block_count")
    path = patched_copy(smollm2_path, tmp_path / "t.gguf", {at: struct.pack("<I", value_type)})
    assert "unknown value type" in refusal(InvalidModel, path)


@pytest.mark.parametrize("value", [2**32 - 1, 2**31, 273, -5])
def test_absurd_block_count_is_refused_without_allocating(value, smollm2_path, tmp_path):
    header = smollm2_path.read_bytes()[: 1 << 21]
    at = kv_type_offset(header, "llama.block_count")
    # keep the 4-byte layout: u32 (type 4) or, for a negative count, i32 (type 5)
    patch = struct.pack("<Ii", 5, value) if value < 0 else struct.pack("<II", 4, value)
    path = patched_copy(smollm2_path, tmp_path / "blocks.gguf", {at: patch})
    read_gguf(path)  # the file itself is well formed
    with pytest.raises(InvalidModel) as info:
        inspect_model(path)
    msg = reason(assert_one_line_refusal(info.value), path)
    assert "block_count" in msg and str(value) in msg


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_metadata_numbers_fall_back_to_defaults(number, smollm2_path, tmp_path):
    header = smollm2_path.read_bytes()[: 1 << 21]
    at = kv_type_offset(header, "llama.context_length")  # u32 -> f32, same 4 bytes
    path = patched_copy(smollm2_path, tmp_path / "f.gguf", {at: struct.pack("<If", 6, number)})
    info = inspect_model(path)
    assert info.context_length == 2048  # hearth's default when the file gives none
    assert info.block_count == 30


# --------------------------------------------------------------------------- fuzzing


@FUZZ
@given(data=st.data())
def test_fuzz_any_truncation_of_the_real_model_is_invalid_model(data, smollm2_path, smollm2_header, scratch):
    """Cut anywhere short of the end: always InvalidModel, the tensors run past the end."""
    size = smollm2_path.stat().st_size
    n = data.draw(
        st.one_of(
            st.integers(0, HEAD_BYTES),  # mostly inside the header
            st.integers(0, len(smollm2_header)),
            st.integers(0, size - 1),
        ),
        label="cut at",
    )
    path = scratch / "truncated.gguf"
    with open(path, "wb") as f:
        f.write(smollm2_header[:n])
        if n > len(smollm2_header):
            # past the header only the length matters to the reader (it never reads
            # tensor data), so extend sparsely instead of copying up to 98 MB per example
            f.truncate(n)
    with pytest.raises(InvalidModel) as info:
        read_gguf(path)
    assert_one_line_refusal(info.value)


@FUZZ
@given(
    mutations=st.lists(
        st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=8
    ),
    cut=st.integers(1024, HEAD_BYTES),
)
def test_fuzz_corrupted_header_bytes_are_refused_in_one_line(mutations, cut, smollm2_head, scratch):
    buf = bytearray(smollm2_head[:cut])
    for offset, value in mutations:
        buf[offset % cut] = value
    path = scratch / "corrupt.gguf"
    path.write_bytes(bytes(buf))
    read_or_refuse(path)


@FUZZ
@given(
    mutations=st.lists(
        st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=6
    ),
    table_mutations=st.lists(
        st.tuples(st.integers(0, 8191), st.integers(0, 255)), max_size=4
    ),
)
def test_fuzz_corrupted_metadata_of_a_full_size_model_never_escapes_inspect(
    mutations, table_mutations, smollm2_path, smollm2_header, scratch
):
    """Corrupt the metadata and the tensor table of a full-length file, so parsing gets
    past the size checks into metadata interpretation: inspect_model succeeds or refuses
    in one line."""
    buf = bytearray(smollm2_header)
    for offset, value in mutations:
        buf[offset] = value
    for offset, value in table_mutations:  # the tensor table ends the header
        buf[len(buf) - 1 - offset] = value
    path = scratch / "corrupt-full.gguf"
    with open(path, "wb") as f:
        f.write(buf)
        f.truncate(smollm2_path.stat().st_size)  # tensor data is never read
    try:
        inspect_model(path)
    except HearthError as e:
        assert_one_line_refusal(e)


@FUZZ
@given(
    version=st.sampled_from([2, 3]),
    tail=st.binary(min_size=0, max_size=4096),
)
def test_fuzz_random_bytes_after_a_valid_prefix_are_refused_in_one_line(version, tail, scratch):
    path = scratch / "random.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", version) + tail)
    read_or_refuse(path)


@FUZZ
@given(
    n_tensors=st.integers(0, 3),
    n_kv=st.integers(0, 3),
    tail=st.binary(min_size=0, max_size=512),
)
def test_fuzz_small_counts_with_random_entries_are_refused_in_one_line(n_tensors, n_kv, tail, scratch):
    """Plausible counts make the reader interpret the random bytes as entries."""
    path = scratch / "entries.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + tail)
    read_or_refuse(path)



@pytest.fixture(scope="module")
def smollm2_4byte_values(smollm2_path, smollm2_header) -> list[tuple[str, int]]:
    """(key, offset of its value type) for every 4-byte scalar (u32, i32, f32) in
    SmolLM2's metadata: block_count, context_length, head counts, token ids, ..."""
    out = []
    for key in read_gguf(smollm2_path).metadata:
        at = kv_type_offset(smollm2_header, key)
        (vtype,) = struct.unpack_from("<I", smollm2_header, at)
        if vtype in (4, 5, 6):  # u32, i32, f32
            out.append((key, at))
    assert len(out) >= 10
    return out


SPECIAL_4_BYTES = [
    struct.pack("<f", float("nan")),
    struct.pack("<f", float("inf")),
    struct.pack("<f", float("-inf")),
    struct.pack("<f", 1e30),
    struct.pack("<I", 0),
    struct.pack("<I", 0xFFFFFFFF),
    struct.pack("<i", -1),
    struct.pack("<i", -(2**31)),
]


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_fuzz_metadata_numbers_swapped_for_anything_never_escape_inspect(
    data, smollm2_path, smollm2_header, smollm2_4byte_values, scratch
):
    """Give some 4-byte metadata values another type (u32, i32, f32) and any value,
    NaN, infinities and extremes included: the layout stays valid, so inspect_model
    must interpret the numbers, and may only succeed or refuse in one line."""
    buf = bytearray(smollm2_header)
    picks = data.draw(
        st.lists(st.sampled_from(smollm2_4byte_values), min_size=1, max_size=4, unique=True),
        label="keys",
    )
    for _key, at in picks:
        vtype = data.draw(st.sampled_from([4, 5, 6]), label="type")
        value = data.draw(
            st.one_of(st.sampled_from(SPECIAL_4_BYTES), st.binary(min_size=4, max_size=4)),
            label="value",
        )
        buf[at : at + 8] = struct.pack("<I", vtype) + value
    path = scratch / "numbers.gguf"
    with open(path, "wb") as f:
        f.write(buf)
        f.truncate(smollm2_path.stat().st_size)  # tensor data is never read
    try:
        info = inspect_model(path)
    except HearthError as e:
        assert_one_line_refusal(e)
    else:
        assert 0 <= info.block_count <= 272
        assert len(info.layer_bytes) == info.block_count
        assert isinstance(info.context_length, int)
