# Tests of directory/pgpy_rsa.py against the installed PGPy: it signs a hub key's signatures with
# one checked RSA key object, and the PGPy behaviour it works around (a new, validated key object
# per signature) is pinned, so that a PGPy release that changes either shows here.
import warnings

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from directory import pgpy_rsa
from directory.errors import DirectoryError
from directory.hub_key import load_key_file
from directory.keys import load_pgpy_key

from conftest import session_signing_key

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from pgpy.constants import HashAlgorithm
    from pgpy.packet.fields import MPI, RSAPriv


def _pgpy_key():
    """The session's hub key as PGPy loads it, before the hub's HubKey touches it."""
    return load_pgpy_key(session_signing_key().read_bytes())


def _sign(key, data: bytes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return key.sign(data, hash=HashAlgorithm.SHA256)


@pytest.fixture
def key_objects_built(monkeypatch) -> list[int]:
    """Counts the RSA key objects cryptography builds from numbers (PGPy's __privkey__ does), from
    after the session's hub key exists (making it builds some)."""
    session_signing_key()
    built = [0]
    original = rsa.RSAPrivateNumbers.private_key

    def counted(self, *args, **kwargs):
        built[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(rsa.RSAPrivateNumbers, "private_key", counted)
    return built


def test_pgpy_itself_builds_a_key_object_per_signature(key_objects_built):
    # The behaviour the module exists for; if a PGPy release stops doing this, the module can go.
    key = _pgpy_key()
    for _ in range(3):
        _sign(key, b"directory")
    assert key_objects_built[0] == 3
    assert "__privkey__" in vars(RSAPriv)  # the method the module shadows per key material


def test_a_hub_key_signs_with_one_key_object_and_its_signatures_verify(key_objects_built):
    key = _pgpy_key()
    pgpy_rsa.sign_with_one_key_object(key)
    assert key_objects_built[0] == 1  # built (and checked) once
    pgpy_rsa.sign_with_one_key_object(key)  # a second call keeps it
    signatures = [_sign(key, f"directory {n}".encode()) for n in range(3)]
    assert key_objects_built[0] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n, signature in enumerate(signatures):
            assert key.pubkey.verify(f"directory {n}".encode(), signature)
            assert not key.pubkey.verify(b"something else", signature)


def test_the_hub_key_class_uses_it(key_objects_built):
    hub_key = load_key_file(session_signing_key())
    packets = [hub_key.signature_packet(b"data", now=1_700_000_000 + n) for n in range(3)]
    assert key_objects_built[0] == 1 and len(set(packets)) == 3


@pytest.mark.parametrize("damaged", ["d", "p", "q=p"])
def test_numbers_that_do_not_form_a_key_are_refused_with_the_fingerprint(damaged):
    key = _pgpy_key()
    (material,) = pgpy_rsa._rsa_materials(key)
    if damaged == "q=p":
        material.q, material.n = material.p, MPI(material.p * material.p)
    else:
        setattr(material, damaged, MPI(getattr(material, damaged) + 2))
    with pytest.raises(DirectoryError, match=r"do not form a key") as raised:
        pgpy_rsa.sign_with_one_key_object(key)
    assert str(key.fingerprint) in str(raised.value)
    assert "__privkey__" not in vars(material)


def test_a_hub_key_file_with_damaged_numbers_is_refused_naming_the_file_and_the_way_out(tmp_path):
    key = _pgpy_key()
    (material,) = pgpy_rsa._rsa_materials(key)
    material.d = MPI(material.d + 2)
    path = tmp_path / "hub-signing-key.asc"
    path.write_text(str(key))  # parses as before: only the numbers are wrong
    with pytest.raises(DirectoryError) as raised:
        load_key_file(path)
    message = str(raised.value)
    assert f"hub key {path}: private key {key.fingerprint}: its RSA numbers do not form a key" in message
    assert "restore the file from the data folder's backup" in message
