"""Everyday conveniences, each asked for by a new user.

- ``Allocation.tobytes()``, ``Allocation.decode()``, ``a == b"..."``
  (content equality with any bytes-like object; unhashable, like bytearray);
- leaving ``with Pool(...)`` on an exception while views are alive keeps the
  original exception, and the pool goes with the last view;
- BufferError messages say how many views of which kind and what to do;
- the crypto APIs docs/usage.md ("Keys") lists take an Allocation as it is.
"""
from __future__ import annotations

import array
import hashlib
import hmac
import os

import pytest

import prmem
from prmem import Mode, State


# ------------------------------------------------------------- tobytes()

@pytest.mark.parametrize("mode", [Mode.RO, Mode.WR, Mode.START_WR], ids=lambda m: m.name)
def test_tobytes_is_a_copy_of_the_whole_allocation(pool_factory, mode):
    pool = pool_factory(mode, name="ergo-tobytes")
    a = pool.strdup(b"key material")
    data = a.tobytes()
    assert type(data) is bytes
    assert data == b"key material\0" == bytes(a) == a[:]
    pool.protect()
    assert a.tobytes() == data                      # reading is always allowed
    assert pool.stats().buffer_views == 0           # no view left behind


def test_tobytes_after_destroy(pool_factory):
    pool = pool_factory(name="ergo-tobytes-gone")
    a = pool.alloc(4)
    pool.destroy()
    with pytest.raises(prmem.PoolDestroyedError):
        a.tobytes()


# -------------------------------------------------------------- decode()

def test_decode_gives_strdup_text_back_without_its_nul(pool_factory):
    pool = pool_factory(name="ergo-decode")
    for text in ("production", "", "grüße, 日本"):
        assert pool.strdup(text).decode() == text
    assert pool.strdup(b"bytes too").decode() == "bytes too"


def test_decode_stops_at_the_first_nul_like_c(pool_factory):
    pool = pool_factory(name="ergo-decode-c")
    a = pool.alloc(16)
    a.write(b"abc")
    assert a.decode() == "abc"                      # zero-filled rest
    a.write(b"abc\0def")
    assert a.decode() == "abc"
    full = pool.alloc(4)
    full.write(b"wxyz")                             # no NUL at all: all of it
    assert full.decode() == "wxyz"


def test_decode_encoding_and_errors(pool_factory):
    pool = pool_factory(name="ergo-decode-enc")
    latin = pool.strdup("café".encode("latin-1"))
    with pytest.raises(UnicodeDecodeError):
        latin.decode()
    assert latin.decode("latin-1") == "café"
    assert latin.decode(errors="replace") == "caf\ufffd"
    assert latin.decode(encoding="utf-8", errors="ignore") == "caf"
    with pytest.raises(LookupError):
        latin.decode("no-such-codec")


# ------------------------------------------------------------------- ==

def test_equality_compares_content(pool_factory):
    pool = pool_factory(name="ergo-eq")
    other = pool_factory(name="ergo-eq-other")
    a = pool.strdup(b"abc")
    assert a == b"abc\0" and b"abc\0" == a
    assert a == bytearray(b"abc\0") and bytearray(b"abc\0") == a
    assert a == memoryview(b"abc\0") and memoryview(b"abc\0") == a
    assert a == other.strdup(b"abc")                # another pool, same bytes
    assert a == a
    assert a != b"abc" and b"abc" != a              # the NUL counts
    assert a != b"abd\0"
    assert a != other.strdup(b"abd")


def test_equality_with_other_buffers_compares_raw_bytes(pool_factory):
    pool = pool_factory(name="ergo-eq-raw")
    a = pool.alloc(8)
    a.write(array.array("i", [1, 2]).tobytes())
    assert a == array.array("i", [1, 2])            # as bytearray compares
    assert a != array.array("i", [1, 3])


def test_equality_with_non_buffers_is_false_not_an_error(pool_factory):
    pool = pool_factory(name="ergo-eq-types")
    a = pool.strdup(b"x")
    for value in ("x\0", "x", 120, None, [120, 0], object()):
        assert (a == value) is False
        assert (a != value) is True


def test_equality_leaves_no_view_and_does_not_block_protect(pool_factory):
    pool = pool_factory(name="ergo-eq-views")
    a, b = pool.strdup(b"same"), pool.strdup(b"same")
    assert a == b                                   # both WRITABLE: writable views
    assert pool.stats().buffer_views == 0
    pool.protect()
    assert a.state is State.READ_ONLY and a == b


def test_equality_after_destroy(pool_factory):
    pool = pool_factory(name="ergo-eq-gone")
    a = pool.strdup(b"x")
    pool.destroy()
    with pytest.raises(prmem.PoolDestroyedError):
        a == b"x\0"
    assert a == a                                   # identity needs no memory


def test_allocations_are_unhashable(pool_factory):
    # == follows content that may still change (WRITABLE, WRITE_RARE): like
    # bytearray, an Allocation cannot be a dict key or set member
    pool = pool_factory(name="ergo-hash")
    a = pool.strdup(b"x")
    with pytest.raises(TypeError, match="unhashable"):
        hash(a)
    with pytest.raises(TypeError):
        {a}
    assert {a.address: a}[a.address] is a           # what to key by instead


def test_the_methods_are_documented():
    for name in ("tobytes", "decode", "__eq__"):
        method = getattr(prmem.Allocation, name)
        assert method.__doc__ and method.__qualname__ == f"Allocation.{name}"
    assert prmem.Allocation.__hash__ is None


# ------------------------------------------- leaving `with` on an exception

def test_with_exit_on_exception_keeps_it_with_a_view_alive():
    view = None
    with pytest.raises(KeyError, match="original"):
        with prmem.Pool(Mode.RO, name="ergo-with-view") as pool:
            view = memoryview(pool.alloc(64))       # writable: WRITABLE memory
            raise KeyError("original")
    assert not pool.destroyed                       # the view still reads the memory
    assert view[0] == 0
    view.release()                                  # the pool goes with the last view
    assert pool.destroyed


def test_with_exit_on_exception_keeps_it_with_a_frozen_handle_alive():
    with pytest.raises(ValueError, match="bad input"):
        with prmem.Pool(Mode.RO, name="ergo-with-frozen") as pool:
            table = pool.freeze({"a": [1, 2]})
            pool.protect()
            raise ValueError("bad input")
    assert table["a"] == [1, 2] and not pool.destroyed
    del table
    assert pool.destroyed


def test_with_exit_on_exception_keeps_it_with_an_array_alive():
    np = pytest.importorskip("numpy")
    with pytest.raises(RuntimeError, match="late failure"):
        with prmem.Pool(Mode.RO, name="ergo-with-array") as pool:
            weights = pool.array(np.arange(4.0))
            raise RuntimeError("late failure")
    assert weights.sum() == 6.0 and not pool.destroyed
    del weights
    assert pool.destroyed


def test_with_exit_without_exception_says_what_is_alive():
    # a normal exit must destroy the pool, so live views are an error there
    with pytest.raises(BufferError) as info:
        with prmem.Pool(Mode.RO, name="ergo-with-normal") as pool:
            a = pool.alloc(8)
            v1, v2 = memoryview(a), memoryview(a)
            table = pool.freeze([1])
    message = str(info.value)
    assert "'ergo-with-normal'" in message
    assert "2 buffer view(s)" in message and "1 frozen container(s)" in message
    assert "release them first" in message and "del them" in message
    assert not pool.destroyed
    v1.release(), v2.release()
    del table
    pool.destroy()


def test_protect_buffer_error_says_how_many_writable_views(pool_factory):
    pool = pool_factory(Mode.RO, name="ergo-protect-views")
    a = pool.alloc(8)
    views = [memoryview(a) for _ in range(3)]
    with pytest.raises(BufferError) as info:
        pool.protect()
    message = str(info.value)
    assert "'ergo-protect-views'" in message
    assert "3 writable buffer view(s)" in message and "release them first" in message
    for v in views:
        v.release()
    pool.protect()


# ------------------------------------------------------------------ keys

@pytest.fixture
def key(pool_factory):
    """A 32-byte key in a protected pool, and the same bytes as bytes."""
    pool = pool_factory(Mode.RO, name="ergo-key")
    k = pool.alloc(32)
    k.write(bytes(range(32)))
    pool.protect()
    assert k.state is State.READ_ONLY
    return k, k.tobytes()


def test_stdlib_hmac_and_hashlib_take_an_allocation(key):
    k, raw = key
    assert hmac.digest(k, b"msg", "sha256") == hmac.digest(raw, b"msg", "sha256")
    assert hmac.compare_digest(k, raw) and not hmac.compare_digest(k, bytes(32))
    assert hashlib.sha256(k).digest() == hashlib.sha256(raw).digest()
    h = hashlib.sha256()
    h.update(k)
    assert h.digest() == hashlib.sha256(raw).digest()
    assert hashlib.blake2b(b"msg", key=k).digest() == hashlib.blake2b(b"msg", key=raw).digest()
    assert (hashlib.pbkdf2_hmac("sha256", k, b"salt", 10)
            == hashlib.pbkdf2_hmac("sha256", raw, b"salt", 10))
    assert (hashlib.scrypt(k, salt=b"salt", n=2, r=1, p=1)
            == hashlib.scrypt(raw, salt=b"salt", n=2, r=1, p=1))
    assert k.pool.stats().buffer_views == 0


def test_hmac_new_refuses_an_allocation(key):
    # hmac.new() wants bytes or bytearray: bytes(k) would be a copy in
    # ordinary memory, so docs/usage.md points to hmac.digest() instead
    k, _raw = key
    with pytest.raises(TypeError, match="bytes or bytearray"):
        hmac.new(k, b"msg", "sha256")


AEADS = ["AESGCM", "ChaCha20Poly1305", "AESCCM", "AESGCMSIV", "AESOCB3"]


@pytest.mark.parametrize("name", AEADS)
def test_cryptography_aeads_take_an_allocation(key, name):
    aead = pytest.importorskip("cryptography.hazmat.primitives.ciphers.aead")
    from cryptography.exceptions import UnsupportedAlgorithm
    k, raw = key
    cls = getattr(aead, name, None)
    if cls is None:
        pytest.skip(f"this cryptography has no {name}")
    try:
        cipher = cls(k)
    except UnsupportedAlgorithm:
        pytest.skip(f"this OpenSSL lacks {name}")
    nonce = os.urandom(12)
    sealed = cipher.encrypt(nonce, b"secret message", b"aad")
    assert sealed == cls(raw).encrypt(nonce, b"secret message", b"aad")
    assert cipher.decrypt(nonce, sealed, b"aad") == b"secret message"


def test_cryptography_hmac_and_private_keys_take_an_allocation(key):
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import hmac as chmac
    from cryptography.hazmat.primitives.asymmetric import ed25519

    k, raw = key

    def mac(secret):
        h = chmac.HMAC(secret, hashes.SHA256())
        h.update(b"msg")
        return h.finalize()

    assert mac(k) == mac(raw) == hmac.digest(raw, b"msg", "sha256")
    sign = ed25519.Ed25519PrivateKey.from_private_bytes
    assert sign(k).sign(b"msg") == sign(raw).sign(b"msg")
