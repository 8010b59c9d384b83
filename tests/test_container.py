"""The container: a valid safetensors file, versioning, checksums, atomic streaming writes."""
import os
import struct

import numpy as np
import pytest
from safetensors import safe_open

import resmoe_format
from resmoe_format import RmoeFormatError, Writer
from resmoe_format.demo import build

from filecraft import rewrite


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build(tmp_path_factory.mktemp("demo") / "demo.rmoe", layers=2, experts=8, hidden=32, inter=48)


def test_rmoe_is_a_valid_safetensors_file(demo):
    with safe_open(demo, "numpy") as f:
        meta = f.metadata()
        assert meta["format"] == "rmoe" and meta["rmoe_version"] == "1.0"
        names = set(f.keys())
    with resmoe_format.open(demo) as r:
        assert names == set(r.tensor_names)
        np.testing.assert_array_equal(r.tensor("model.norm.weight").astype(np.float32), np.ones(32, np.float32))


def test_tensors_are_naturally_aligned_and_zero_copy(demo):
    with resmoe_format.open(demo) as r:
        for name in r.tensor_names:
            a = r.tensor(name)
            assert (r.header.data_start + r.header.tensors[name].begin) % a.dtype.itemsize == 0, name
            assert not a.flags.writeable and not a.flags.owndata


def test_every_tensor_has_a_role_from_the_schema(demo):
    with resmoe_format.open(demo) as r:
        assert set(r.roles) == set(r.tensor_names)
        cats = {role.category for role in r.roles.values()}
    assert {"barycenters", "permutations", "residual_values", "residual_indices", "scales",
            "checksums", "passthrough", "embedded_files"} <= cats


def test_embedded_config_is_returned(demo):
    with resmoe_format.open(demo) as r:
        assert r.config()["model_type"] == "mixtral"
        assert "config.json" in r.files


def test_newer_minor_version_and_unknown_optional_fields_are_accepted(demo, tmp_path):
    def edit_schema(s):
        s["future_field"] = {"x": 1}
        s["layers"][0]["future_layer_field"] = [1, 2]
        s["layers"][0]["extensions"] = {"compressed_experts": {"note": "ignored by 1.0 readers"}}

    p = rewrite(demo, tmp_path / "minor.rmoe", edit_meta=lambda m: m.update(rmoe_version="1.7"),
                edit_schema=edit_schema)
    with resmoe_format.open(p) as r:
        r.verify()
        assert r.version == (1, 7)


@pytest.mark.parametrize("version", ["7.0", "0.9", "x", "1", "1.0.0"])
def test_unknown_major_or_malformed_version_is_rejected(demo, tmp_path, version):
    p = rewrite(demo, tmp_path / "v.rmoe", edit_meta=lambda m: m.update(rmoe_version=version))
    with pytest.raises(RmoeFormatError, match="version"):
        resmoe_format.open(p)


@pytest.mark.parametrize("version", ["0.9", "7.0", "17.2"])
def test_unknown_major_message_names_the_file_version_and_the_majors_read(demo, tmp_path, version):
    p = rewrite(demo, tmp_path / "v.rmoe", edit_meta=lambda m: m.update(rmoe_version=version))
    with pytest.raises(RmoeFormatError, match=rf"this file is \.rmoe version {version}; this reader understands "
                                              r"major versions 1, 2, 3, 4, 5 and 6 only \(upgrade resmoe to read it\)"):
        resmoe_format.open(p)


def test_version_constants():
    from resmoe_format import schema

    assert resmoe_format.VERSION == schema.VERSION == (6, 0) and resmoe_format.VERSION_STR == "6.0"
    assert schema.BASE_VERSION_STR == "1.0" and schema.SHARED_FACTORS_VERSION_STR == "2.0"
    assert schema.KQUANT_VERSION_STR == "3.0" and schema.FIELDS_VERSION_STR == "4.0"
    assert schema.CROSS_FACTORS_VERSION_STR == "5.0" and schema.CE_VERSION_STR == "6.0"
    assert schema.READ_MAJORS == (1, 2, 3, 4, 5, 6)


@pytest.mark.parametrize("version", ["2.0", "3.0", "3.4", "4.0", "5.0"])
def test_later_majors_read_a_file_without_their_features(demo, tmp_path, version):
    p = rewrite(demo, tmp_path / "v.rmoe", edit_meta=lambda m: m.update(rmoe_version=version))
    with resmoe_format.open(p) as r:
        r.verify()
        assert r.version == tuple(map(int, version.split(".")))


def test_a_file_without_k_quant_values_is_written_byte_for_byte_as_before(tmp_path):
    """3.0 changes nothing for files that do not use it: the worked example of spec 9 is still this 1.0 file."""
    import hashlib
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("we", Path(__file__).parents[1] / "spec" / "worked_example.py")
    we = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(we)
    we.build(str(tmp_path / "we.rmoe"))
    assert hashlib.sha256((tmp_path / "we.rmoe").read_bytes()).hexdigest() == \
        "14674bc591e20639f472c26ed32e6320b94011ab5e666b86e8f996c947f5671e"


def test_k_quant_values_make_a_3_0_file(tmp_path):
    from test_kquant import write_kquant_file

    path, _ = write_kquant_file(tmp_path / "k.rmoe")
    with safe_open(path, "numpy") as f:
        assert f.metadata()["rmoe_version"] == "3.0"
    with resmoe_format.open(path) as r:
        assert r.version == (3, 0) and r.schema.version == "3.0"
        r.verify()


def test_plain_safetensors_file_is_rejected_clearly(tmp_path):
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(3, np.float32)}, tmp_path / "plain.safetensors")
    with pytest.raises(RmoeFormatError, match="not a .rmoe"):
        resmoe_format.open(tmp_path / "plain.safetensors")


def test_corrupt_tensor_data_fails_its_checksum_unless_skipped(demo, tmp_path):
    with resmoe_format.open(demo) as r:
        t = r.header.tensors["rmoe.layers.1.base.down.values"]

    def flip(d):
        d[t.begin + 3] ^= 0x10
        return d

    p = rewrite(demo, tmp_path / "c.rmoe", edit_data=flip)
    with resmoe_format.open(p) as r:  # layout is fine, so it opens
        with pytest.raises(RmoeFormatError, match=r"rmoe.layers.1.base.down.values: crc32 mismatch"):
            r.base(1, "down")
    with resmoe_format.open(p, verify_checksums=False) as r:
        r.base(1, "down")  # skipping verification reads the (corrupt) bytes


def test_schema_edit_without_crc_update_is_caught(demo, tmp_path):
    p = rewrite(demo, tmp_path / "s.rmoe", edit_schema=lambda s: s["model"].update(architecture="Other"),
                fix_crc=False)
    with pytest.raises(RmoeFormatError, match="rmoe_schema_crc32"):
        resmoe_format.open(p)


def test_inconsistent_layout_is_rejected_before_reading_data(demo, tmp_path):
    def shrink(s):
        s["layers"][0]["matrices"][0]["shape"] = [48, 31]

    p = rewrite(demo, tmp_path / "l.rmoe", edit_schema=shrink)
    with pytest.raises(RmoeFormatError, match=r"base.gate.values: shape \[48, 32\] but the schema implies \[48, 31\]"):
        resmoe_format.open(p)


def test_hostile_header_length_does_not_allocate(tmp_path):
    p = tmp_path / "h.rmoe"
    p.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(RmoeFormatError, match="header length"):
        resmoe_format.open(p)


def test_hostile_shape_does_not_allocate(demo, tmp_path):
    def huge(h):
        name = next(iter(h))
        h[name]["shape"] = [2**40, 2**40]

    p = rewrite(demo, tmp_path / "big.rmoe", edit_head=huge)
    with pytest.raises(RmoeFormatError, match="needs"):
        resmoe_format.open(p)


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(RmoeFormatError, match="cannot open"):
        resmoe_format.open(tmp_path / "nope.rmoe")


# --- atomic, streaming writes ----------------------------------------------------------

def _leftovers(d):
    return sorted(x for x in os.listdir(d) if x.startswith("."))


def test_failed_write_leaves_nothing_at_the_target(tmp_path):
    target = tmp_path / "out.rmoe"
    with pytest.raises(RuntimeError):
        with Writer(target, {"architecture": "x"}) as w:
            w.add_passthrough("a", np.ones(1000, np.float32))
            raise RuntimeError("interrupted")
    assert not target.exists() and _leftovers(tmp_path) == []


def test_failed_write_keeps_an_existing_target(tmp_path, demo):
    target = tmp_path / "out.rmoe"
    target.write_bytes(demo.read_bytes())
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        with Writer(target, {"architecture": "x"}) as w:
            w.add_passthrough("a", np.ones(10, np.float32))
            raise RuntimeError("interrupted")
    assert target.read_bytes() == before and _leftovers(tmp_path) == []


def test_invalid_record_is_refused_before_anything_is_written(tmp_path):
    target = tmp_path / "out.rmoe"
    with pytest.raises(RmoeFormatError, match="reserved"):
        with Writer(target, {"architecture": "x"}) as w:
            w.add_passthrough("rmoe.layers.0.x", np.ones(3, np.float32))
    assert not target.exists()


def test_writes_are_deterministic(tmp_path):
    a = build(tmp_path / "a.rmoe", layers=1, experts=4, hidden=16, inter=24, seed=3)
    b = build(tmp_path / "b.rmoe", layers=1, experts=4, hidden=16, inter=24, seed=3)
    assert a.read_bytes() == b.read_bytes()


def test_writer_streams_data_to_disk_not_memory(tmp_path):
    """Tensors go to spill files as they are added: the writer holds no tensor data."""
    w = Writer(tmp_path / "s.rmoe", {"architecture": "x"})
    w.add_passthrough("big", np.ones(1 << 20, np.float32))
    spilled = sum(os.fstat(f.fileno()).st_size for f in w._out._spills.values())
    assert spilled == 4 << 20
    w.close()
    assert (tmp_path / "s.rmoe").stat().st_size > 4 << 20


@pytest.mark.parametrize("encoding", ["lowrank", "bsr"])
def test_tiny_storage_cannot_declare_a_huge_matrix(tmp_path, encoding):
    """Rank 0 or zero stored blocks take no bytes whatever the shape: the reader caps the shape."""
    from resmoe_format import MatrixSpec, MoELayer, SourceSpec, codecs

    m, n = 2**15, 2**15  # 1 Gi elements, 4 GiB as float32, stored in a few bytes
    enc = (codecs.encode(None, "lowrank", "bf16", u=np.zeros((m, 0)), v=np.zeros((0, n))) if encoding == "lowrank"
           else codecs.encode(np.zeros((m, 16), np.float32), "bsr", "bf16", block_shape=(2**15, 1)))
    if encoding == "bsr":  # widen the declared matrix: with no stored block, nothing else changes size
        enc.shape = (m, n)
        enc.params["block_shape"] = [2**15, 2**15]
        enc.parts["indptr"] = np.zeros(2, np.uint32)
        enc.parts["values"] = enc.parts["values"].reshape(0, 2**15, 2**15)
    with Writer(tmp_path / "t.rmoe", {"architecture": "t"}) as w:
        w.add_layer(MoELayer(0, m, [MatrixSpec("w", (m, n), "bf16", 0)], "none", {}, [{"w": enc}], None,
                             [SourceSpec("w", "bf16", (m, n), 0, ["w"])]))
    with pytest.raises(RmoeFormatError, match="max_matrix_elements"):
        resmoe_format.open(tmp_path / "t.rmoe")
    with resmoe_format.open(tmp_path / "t.rmoe", max_matrix_elements=2**30) as r:  # explicit opt-in
        assert r.layer(0).matrices[0].shape == (m, n)


def test_refused_layer_leaves_the_writer_usable(tmp_path):
    from resmoe_format import MatrixSpec, MoELayer, SourceSpec, codecs

    def layer(perm):
        return MoELayer(0, 4, [MatrixSpec("w", (4, 3), "fp32", 0)], "barycenter",
                        {"w": codecs.encode(np.ones((4, 3)), "dense", "fp32")},
                        [{"w": codecs.encode(np.eye(4, 3), "csr16", "fp32")}], [perm],
                        [SourceSpec("w0", "fp32", (4, 3), 0, ["w"])])

    with Writer(tmp_path / "w.rmoe", {"architecture": "t"}) as w:
        with pytest.raises(RmoeFormatError, match="not a permutation"):
            w.add_layer(layer(np.array([0, 1, 1, 3])))
        w.add_layer(layer(np.array([3, 1, 0, 2])))
    with resmoe_format.open(tmp_path / "w.rmoe") as r:
        r.verify()
        np.testing.assert_array_equal(r.permutation(0, 0), [3, 1, 0, 2])


def test_empty_tensors_of_every_size_keep_checksums_consistent(tmp_path):
    """Empty tensors share offsets with their neighbours; checksum order still matches."""
    with Writer(tmp_path / "e.rmoe", {"architecture": "t"}) as w:
        for i, dt in enumerate([np.uint8, np.float16, np.float32, np.int8, np.float64, np.uint16]):
            w.add_passthrough(f"empty{i}", np.zeros(0, dt))
            w.add_passthrough(f"one{i}", np.ones(3, dt))
    with resmoe_format.open(tmp_path / "e.rmoe") as r:
        r.verify()


def test_extension_tensors_have_a_role_and_are_counted(tmp_path):
    """Room for other methods: per-expert vectors (Compressed Experts) ride in extensions."""
    from resmoe_format import MatrixSpec, MoELayer, SourceSpec, codecs
    from resmoe_format.accounting import account

    ce = np.ones((2, 3, 4), np.float32)  # per expert: 3 scaling vectors of the hidden size
    layer = MoELayer(0, 3, [MatrixSpec("w", (3, 4), "fp32", 0)], "mean",
                     {"w": codecs.encode(np.ones((3, 4)), "dense", "fp32")}, [{"w": None}, {"w": None}], None,
                     [SourceSpec("w0", "fp32", (3, 4), 0, ["w"])],
                     extensions={"compressed_experts": {"n_ce": 1, "tensors": {"ce": ce}}})
    with Writer(tmp_path / "x.rmoe", {"architecture": "t"}) as w:
        w.add_layer(layer)
    with resmoe_format.open(tmp_path / "x.rmoe") as r:
        r.verify()
        ext = r.layer(0).extensions["compressed_experts"]
        assert ext["n_ce"] == 1
        np.testing.assert_array_equal(r.tensor(ext["tensors"]["ce"]), ce)
        acc = account(r)
    assert acc.bytes["extensions"] == ce.nbytes and sum(acc.bytes.values()) == acc.file_size


# --- strict JSON, unique restored names, portable embedded paths (spec 2.3, 3, 4.4, 4.9) ----------------

def _with_raw_schema(demo, dst, text: str):
    """``demo`` with ``rmoe_schema`` replaced by ``text`` verbatim (CRC fixed)."""
    import zlib

    from filecraft import join, split

    head, _, data, meta = split(demo)
    meta = dict(meta, rmoe_schema=text, rmoe_schema_crc32=str(zlib.crc32(text.encode()) & 0xFFFFFFFF))
    dst.write_bytes(join(head, None, data, meta))
    return dst


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json_in_the_header(demo, tmp_path, constant):
    def edit_head(h):
        h[next(iter(h))]["note"] = float(constant.replace("Infinity", "inf"))  # an ignored member (2.1)

    p = rewrite(demo, tmp_path / "h.rmoe", edit_head=edit_head)
    assert b": " + constant.encode() in p.read_bytes()
    with pytest.raises(RmoeFormatError, match=rf"header: {constant} is not valid JSON"):
        resmoe_format.open(p)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json_in_the_schema(demo, tmp_path, constant):
    p = rewrite(demo, tmp_path / "s.rmoe", edit_schema=lambda s: s["method"].update(
        note=float(constant.replace("Infinity", "inf"))))  # an informative member
    with pytest.raises(RmoeFormatError, match=rf"rmoe_schema: {constant} is not valid JSON"):
        resmoe_format.open(p)


def test_a_member_twice_in_one_schema_object_is_rejected(demo, tmp_path):
    from filecraft import split

    raw = split(demo)[3]["rmoe_schema"]
    assert raw.startswith("{") and '"layers":[' in raw
    # an empty "layers" first: a reader keeping the first occurrence would restore no layer at all
    p = _with_raw_schema(demo, tmp_path / "d.rmoe", '{"layers":[],' + raw[1:])
    with pytest.raises(RmoeFormatError, match="rmoe_schema: key 'layers' appears twice"):
        resmoe_format.open(p)


def test_a_source_named_like_a_passthrough_tensor_is_rejected_at_open(demo, tmp_path):
    def edit(s):
        s["layers"][1]["sources"][0]["name"] = s["passthrough"][0]

    p = rewrite(demo, tmp_path / "pt.rmoe", edit_schema=edit)
    with pytest.raises(RmoeFormatError, match=r"layer 1 restores tensor '.+', which a passthrough tensor restores too"):
        resmoe_format.open(p)


def test_two_sources_of_one_name_are_rejected_at_open(demo, tmp_path):
    def edit(s):
        s["layers"][1]["sources"][3]["name"] = s["layers"][0]["sources"][3]["name"]

    p = rewrite(demo, tmp_path / "two.rmoe", edit_schema=edit)
    with pytest.raises(RmoeFormatError, match=r"layer 1 restores tensor '.+', which layer 0 restores too"):
        resmoe_format.open(p)


def test_writer_refuses_a_restored_name_twice_and_stays_usable(tmp_path):
    from resmoe_format import MatrixSpec, MoELayer, SourceSpec, codecs

    def layer(index, name):
        return MoELayer(index, 3, [MatrixSpec("w", (3, 4), "fp32", 0)], "none", {},
                        [{"w": codecs.encode(np.ones((3, 4)), "dense", "fp32")}], None,
                        [SourceSpec(name, "fp32", (3, 4), 0, ["w"])])

    with Writer(tmp_path / "w.rmoe", {"architecture": "t"}) as w:
        w.add_passthrough("pt", np.ones(3, np.float32))
        with pytest.raises(RmoeFormatError, match="layer 0 restores tensor 'pt', which a passthrough tensor"):
            w.add_layer(layer(0, "pt"))
        w.add_layer(layer(0, "w0"))
        with pytest.raises(RmoeFormatError, match="a passthrough tensor restores tensor 'w0', which layer 0"):
            w.add_passthrough("w0", np.ones(3, np.float32))
        with pytest.raises(RmoeFormatError, match="layer 1 restores tensor 'w0', which layer 0"):
            w.add_layer(layer(1, "w0"))
    with resmoe_format.open(tmp_path / "w.rmoe") as r:
        r.verify()
        assert [s.name for lay in r.layers for s in lay.sources] == ["w0"] and r.schema.passthrough == ["pt"]


UNPORTABLE_PATHS = ["sub\\dir/x.json", "..\\x.json", "C:/x.json", "C:x.json", "/etc/passwd", "../x.json", "a/../b",
                    "a//b", "a/./b", "a/", "", "nul", "NUL.json", "Com1.txt", "lpt\u00b9", "tok/aux .json",
                    "conin$", "x\x00y", "x\ny", "a.", "a /b", "x:stream", 'a"b', "a|b", "a?b", "a*b", "<a>",
                    "model.safetensors", "Model.SafeTensors.index.json"]


@pytest.mark.parametrize("path", UNPORTABLE_PATHS)
def test_an_unportable_embedded_path_is_rejected_at_open(demo, tmp_path, path):
    p = rewrite(demo, tmp_path / "p.rmoe", edit_schema=lambda s: s["files"][0].update(path=path))
    with pytest.raises(RmoeFormatError, match=r"schema.files\[0\].path: .* is not a portable relative file path"):
        resmoe_format.open(p)


@pytest.mark.parametrize("path", UNPORTABLE_PATHS)
def test_writer_refuses_an_unportable_embedded_path(tmp_path, path):
    target = tmp_path / "w.rmoe"
    with Writer(target, {"architecture": "t"}) as w:
        with pytest.raises(RmoeFormatError, match="embedded file: .* is not a portable relative file path"):
            w.add_file(path, b"{}")
    with resmoe_format.open(target) as r:
        assert r.files == {}


@pytest.mark.parametrize("paths", [["a.json", "A.JSON"], ["tok", "tok/x.json"], ["Tok/x.json", "tok"],
                                   ["e\u0301.json", "\u00e9.json"], ["x.json", "x.json"]])
def test_clashing_embedded_paths_are_rejected(tmp_path, demo, paths):
    with Writer(tmp_path / "w.rmoe", {"architecture": "t"}) as w:
        w.add_file(paths[0], b"1")
        with pytest.raises(RmoeFormatError, match="clashes with another embedded file"):
            w.add_file(paths[1], b"2")

    def edit(s):
        s["files"].append(dict(s["files"][0], path=paths[1]))
        s["files"][0]["path"] = paths[0]

    p = rewrite(demo, tmp_path / "c.rmoe", edit_schema=edit)
    with pytest.raises(RmoeFormatError, match=r"schema.files\[1\].path: .* clashes with another embedded file"):
        resmoe_format.open(p)


def test_portable_embedded_paths_are_kept(tmp_path):
    paths = ["config.json", "tokenizer/sub/vocab.json", "console.json", "com10.txt", "nul_x", "a.b.c", "\u017c.json",
             "sub/model.safetensors", ".hidden"]
    with Writer(tmp_path / "ok.rmoe", {"architecture": "t"}) as w:
        for i, p in enumerate(paths):
            w.add_file(p, str(i).encode())
    with resmoe_format.open(tmp_path / "ok.rmoe") as r:
        assert r.files == {p: str(i).encode() for i, p in enumerate(paths)}
