"""Encrypted artifacts: AES-256-GCM per version, data keys wrapped by a master key, rekey."""

import hashlib
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest

from moorage.config import load_settings
from moorage.errors import EncryptionError, IntegrityError
from moorage.registry import Registry, crypto
from moorage.runtime import Runtime


def _settings(home, key=None, encrypt=True, key_file=None):
    env = {"MOORAGE_HOME": str(home), "MOORAGE_USER": "tester"}
    if encrypt:
        env["MOORAGE_SECURITY__ENCRYPT_ARTIFACTS"] = "true"
    if key:
        env["MOORAGE_SECURITY__MASTER_KEY"] = key
    if key_file:
        env["MOORAGE_SECURITY__MASTER_KEY_FILE"] = str(key_file)
    return load_settings(environ=env)


def _files(root):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("size", [0, 5, crypto.CHUNK - 1, crypto.CHUNK, 2 * crypto.CHUNK + 7])
def test_stream_format_roundtrips_and_rejects_any_change(size):
    key = crypto.new_data_key()
    plain = np.random.default_rng(size).bytes(size)
    sealed = crypto.EncryptingReader(io.BytesIO(plain), key, "w.safetensors").read()
    assert plain[:64] not in sealed or size == 0
    assert crypto.decrypt_file(io.BytesIO(sealed), key, "w.safetensors", "m:1") == plain
    with pytest.raises(EncryptionError, match="failed authentication"):  # moved to another file name
        crypto.decrypt_file(io.BytesIO(sealed), key, "other.safetensors", "m:1")
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(EncryptionError, match="tampered"):
        crypto.decrypt_file(io.BytesIO(bytes(flipped)), key, "w.safetensors", "m:1")
    if size > crypto.CHUNK:  # dropping the last chunk is caught (the new last chunk lacks the flag)
        with pytest.raises(EncryptionError):
            crypto.decrypt_file(io.BytesIO(sealed[: -(size % crypto.CHUNK) - 16]), key, "w.safetensors", "m:1")


def test_master_key_errors_are_one_line():
    with pytest.raises(EncryptionError, match="not base64"):
        crypto.MasterKey.from_text("not a key!", "env")
    with pytest.raises(EncryptionError, match="needs 32"):
        crypto.MasterKey.from_text("aGVsbG8=", "env")
    key = crypto.MasterKey.from_text(crypto.generate_master_key(), "env")
    assert "key=" not in repr(key) and key.id in repr(key)


def test_encrypted_minilm_store_holds_no_plaintext_and_serves_the_same(tmp_path):
    from moorage.demo.assets import minilm_folder

    pytest.importorskip("sentence_transformers")
    src = minilm_folder()
    weights = (src / "model.safetensors").read_bytes()
    probes = [weights[i : i + 48] for i in range(len(weights) // 7, len(weights), len(weights) // 7)]
    key = crypto.generate_master_key()

    plain_home, enc_home = tmp_path / "plain", tmp_path / "enc"
    plain = Registry.from_settings(_settings(plain_home, encrypt=False))
    plain.register(src, "minilm", "embed")
    reference = Runtime(plain, _settings(plain_home, encrypt=False).runtime).predict("minilm", ["a calm sea"])[0]

    settings = _settings(enc_home, key)
    reg = Registry.from_settings(settings)
    mem_dirs = set(Path(tempfile.gettempdir()).glob("moorage-mem-*"))
    info = reg.register(src, "minilm", "embed")
    assert info.manifest.encryption["algorithm"] == "AES-256-GCM"
    assert reg.verify("minilm") == []  # checksums of the ciphertext: verify needs no key
    for path, data in _files(enc_home).items():
        assert not any(p in data for p in probes), f"{path} holds plaintext weights"
    out = Runtime(reg, settings.runtime).predict("minilm", ["a calm sea"])[0]
    np.testing.assert_allclose(out, reference, atol=1e-5)
    assert set(Path(tempfile.gettempdir()).glob("moorage-mem-*")) == mem_dirs  # the link folder is gone

    # without the key: a clear error before anything loads
    keyless = Registry.from_settings(_settings(enc_home, encrypt=False))
    with pytest.raises(EncryptionError, match="master key is needed to load minilm:1") as err:
        Runtime(keyless, settings.runtime).get("minilm")
    assert err.value.code == "missing_master_key"
    other = Registry.from_settings(_settings(enc_home, crypto.generate_master_key()))
    with pytest.raises(EncryptionError, match="encrypted under master key") as err:
        Runtime(other, settings.runtime).get("minilm")
    assert err.value.code == "wrong_master_key"


def test_tampered_ciphertext_is_refused_before_loading(registry, settings, fake_model, tmp_path):
    settings = _settings(tmp_path / "h", crypto.generate_master_key())
    reg = Registry.from_settings(settings)
    reg.register(fake_model("embed"), "emb", "embed")
    path = tmp_path / "h" / "artifacts" / "emb" / "1" / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="weights.safetensors does not match its checksum"):
        Runtime(reg, settings.runtime).get("emb")


def test_rekey_rewraps_data_keys_without_touching_ciphertext(tmp_path, fake_model):
    old_key, new_key = crypto.generate_master_key(), crypto.generate_master_key()
    key_file = tmp_path / "new.key"
    key_file.write_text(new_key)
    settings = _settings(tmp_path / "h", old_key)
    reg = Registry.from_settings(settings)
    reg.register(fake_model("embed"), "emb", "embed")
    reg.register(fake_model("classify"), "cls", "classify", encrypt=False)  # not encrypted: untouched
    before = {p: hashlib.sha256(d).hexdigest() for p, d in _files(tmp_path / "h" / "artifacts").items()}
    expected = Runtime(reg, settings.runtime).predict("emb", ["hello"])[0]

    done, skipped = reg.rekey(crypto.MasterKey.from_file(key_file))
    assert (done, skipped) == (1, [])
    after = {p: hashlib.sha256(d).hexdigest() for p, d in _files(tmp_path / "h" / "artifacts").items()}
    assert after == before

    with pytest.raises(EncryptionError, match="encrypted under master key"):
        Runtime(Registry.from_settings(_settings(tmp_path / "h", old_key)), settings.runtime).get("emb")
    fresh = Registry.from_settings(_settings(tmp_path / "h", key_file=key_file))
    np.testing.assert_allclose(Runtime(fresh, settings.runtime).predict("emb", ["hello"])[0], expected)
    assert fresh.rekey(crypto.MasterKey.from_file(key_file)) == (0, [])  # already under the new key


def test_encrypting_without_a_key_says_how_to_get_one(tmp_path, fake_model):
    reg = Registry.from_settings(_settings(tmp_path / "h"))
    with pytest.raises(EncryptionError, match="MOORAGE_SECURITY__MASTER_KEY"):
        reg.register(fake_model("embed"), "emb", "embed")
    assert reg.list_models() == []


def test_export_import_keeps_an_encrypted_version_encrypted(tmp_path, fake_model):
    from moorage.registry import export_model, import_models

    key = crypto.generate_master_key()
    src = Registry.from_settings(_settings(tmp_path / "a", key))
    src.register(fake_model("embed"), "emb", "embed")
    export_model(src, "emb", str(tmp_path / "export"))
    dst_settings = _settings(tmp_path / "b", key)
    dst = Registry.from_settings(dst_settings)
    import_models(dst, str(tmp_path / "export"))
    assert dst.verify("emb:1") == []
    expected = Runtime(src, dst_settings.runtime).predict("emb", ["moor"])[0]
    np.testing.assert_allclose(Runtime(dst, dst_settings.runtime).predict("emb", ["moor"])[0], expected)
    with pytest.raises(EncryptionError, match="master key is needed"):
        Runtime(Registry.from_settings(_settings(tmp_path / "b", encrypt=False)), dst_settings.runtime).get("emb")
