"""CKKS parameters, public/secret contexts and the secret key at rest."""

from __future__ import annotations

import hashlib
import json
import stat

import numpy as np
import pytest
import tenseal as ts

from secure_mor.crypto.context import (
    ContextError,
    KeyStoreError,
    ScryptParams,
    context_fingerprint,
    create_secret_context,
    export_public_context,
    load_public_context,
    load_secret_context,
    public_context_of,
    save_secret_context,
)
from secure_mor.crypto.packing import encrypt_packed
from secure_mor.crypto.params import (
    MAX_MODULUS_BITS_128,
    PARAMETER_SETS,
    CkksParams,
    ParameterError,
    ReleaseConfig,
    get_params,
)

FAST_KDF = ScryptParams(n=2**12)


@pytest.fixture(scope="module")
def secret() -> ts.Context:
    return create_secret_context()


def test_named_parameter_sets_are_128_bit_secure() -> None:
    assert get_params("default") == CkksParams("default", 8192, (60, 40, 40, 60), 40)
    for params in PARAMETER_SETS.values():
        params.validate()
        assert params.total_modulus_bits <= MAX_MODULUS_BITS_128[params.poly_modulus_degree]
    with pytest.raises(ParameterError, match="unknown parameter set"):
        get_params("huge")


@pytest.mark.parametrize(
    "params",
    [
        CkksParams("too-wide", 4096, (60, 40, 40, 60), 40),  # 200 bits > 109
        CkksParams("just-over", 8192, (60, 50, 49, 60), 40),  # 219 bits > 218
        CkksParams("odd-n", 6000, (60, 40, 60), 40),
        CkksParams("no-level", 8192, (60, 60), 40),
    ],
)
def test_insecure_or_malformed_parameter_sets_are_refused(params: CkksParams) -> None:
    with pytest.raises(ParameterError):
        create_secret_context(params)


def test_release_config_statistical_distance() -> None:
    config = ReleaseConfig()
    config.validate()
    assert config.statistical_distance(1, 1) == pytest.approx(10 / 2**32)
    assert config.statistical_distance(4096, 3) < 3e-5
    assert config.statistical_distance(4096, 3, rounds=40) == pytest.approx(40 * config.statistical_distance(4096, 3))
    with pytest.raises(ParameterError):
        ReleaseConfig(mask_bits=10).validate()


def test_public_context_holds_no_secret_key_and_cannot_decrypt(secret: ts.Context) -> None:
    data = export_public_context(secret)
    pub = load_public_context(data, context_fingerprint(data))
    assert pub.fingerprint == hashlib.sha256(data).hexdigest()
    assert not pub.context.is_private() and not pub.context.has_secret_key()
    assert not pub.context.has_galois_keys() and not pub.context.has_relin_keys()
    assert pub.context.global_scale == 2.0**40 and pub.slots == 4096
    with pytest.raises(ValueError):
        pub.context.secret_key()
    vector = encrypt_packed(pub.context, np.arange(10.0))[0]
    assert not vector.context().is_private()
    with pytest.raises(ValueError, match="secret"):
        vector.decrypt()
    # The authority's secret context decrypts what clients encrypt under the public one.
    restored = ts.ckks_vector_from(secret, vector.serialize())
    assert np.allclose(restored.decrypt(), np.arange(10.0), atol=1e-6)


def test_public_context_loader_refuses_secret_foreign_or_damaged_bytes(secret: ts.Context) -> None:
    with_secret = secret.serialize(save_secret_key=True)
    with pytest.raises(ContextError, match="secret key"):
        load_public_context(with_secret, context_fingerprint(with_secret))
    other = export_public_context(create_secret_context())
    with pytest.raises(ContextError, match="foreign context"):
        load_public_context(other, public_context_of(secret).fingerprint)
    damaged = b"\x00" * 100
    with pytest.raises(ContextError, match="does not parse"):
        load_public_context(damaged, context_fingerprint(damaged))


def test_secret_context_at_rest_round_trips(secret: ts.Context, tmp_path) -> None:
    path = save_secret_context(secret, tmp_path / "authority.ckks", "correct horse", FAST_KDF)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    assert secret.serialize(save_secret_key=True, save_relin_keys=False, save_galois_keys=False) not in raw
    restored = load_secret_context(path, "correct horse")
    assert restored.is_private()
    vector = encrypt_packed(public_context_of(secret).context, np.array([1.5, -2.5]))[0]
    assert np.allclose(vector.decrypt(restored.secret_key()), [1.5, -2.5], atol=1e-6)
    # Re-saving over an existing file keeps 0600.
    path.chmod(0o644)
    save_secret_context(secret, path, "correct horse", FAST_KDF)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_secret_context_at_rest_fails_clearly(secret: ts.Context, tmp_path) -> None:
    path = save_secret_context(secret, tmp_path / "authority.ckks", "correct horse", FAST_KDF)
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        load_secret_context(path, "wrong horse")
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 1
    (tmp_path / "damaged.ckks").write_bytes(bytes(damaged))
    with pytest.raises(KeyStoreError, match="wrong passphrase or damaged"):
        load_secret_context(tmp_path / "damaged.ckks", "correct horse")
    with pytest.raises(KeyStoreError, match="cannot read"):
        load_secret_context(tmp_path / "missing.ckks", "correct horse")
    with pytest.raises(KeyStoreError, match="passphrase is required"):
        save_secret_context(secret, tmp_path / "x.ckks", "", FAST_KDF)
    prefix = b"SMRK\x01"
    greedy = {"kdf": "scrypt", "n": 2**22, "r": 8, "p": 1, "salt": "00" * 16, "nonce": "00" * 12}
    for header, reason in [
        (b"[" * 4000, "header is damaged"),
        (b'{"kdf":"scrypt","n":1048576,"r":8,"p":1,"salt":"00","nonce":"00"}', "header is damaged"),
        (json.dumps(greedy).encode(), "out-of-range scrypt"),
    ]:
        (tmp_path / "bad.ckks").write_bytes(prefix + len(header).to_bytes(4, "big") + header + b"\x00" * 32)
        with pytest.raises(KeyStoreError, match=reason):
            load_secret_context(tmp_path / "bad.ckks", "correct horse")
    public = public_context_of(secret).context
    with pytest.raises(KeyStoreError, match="no secret key"):
        save_secret_context(public, tmp_path / "x.ckks", "pw", FAST_KDF)
