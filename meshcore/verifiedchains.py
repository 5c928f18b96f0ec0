"""Peer certificate chains already verified, remembered per TLS context: a peer that
connects again with the same chain is not verified again. Checking the client's chain is
three fifths of the HBONE server's handshake (`benchmarks/tls_handshake.py`: OpenSSL 3.0's
certificate decoding and verification), and the same few chains come back all the time
(one per source pod identity and node).

Why a remembered success is the answer a new verification would give: the result depends
on the chain the peer sent (the key is the SHA-256 of every certificate, byte for byte, in
order), on the context's trust store and verification parameters (fixed for the context's
life: new certificates or new roots make new contexts, which start empty), and on the time
(each entry keeps the window in which every certificate of the verified chain, the root
included, is valid, and is used only inside it). The mesh uses no revocation lists, so
nothing else enters. Proof that the peer holds the key is not part of it: TLS checks the
peer's CertificateVerify signature on every handshake, remembered chain or not. Only
successes are remembered; a chain that failed is verified again, and fails again, each time.

OpenSSL calls `_verify` in place of X509_verify_cert (SSL_CTX_set_cert_verify_callback,
set through ctypes on a pointer `meshcore.tls` has checked). The callback is one
module-level function object that lives as long as the process, so OpenSSL never holds a
freed one; each context's cache is found by a number passed as the callback's argument. An
error of any kind in it fails the verification (closed), never passes it.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import time
import weakref
from collections import OrderedDict
from typing import Any

# Peers whose chains a context remembers: source identities times nodes, for a tunnel.
CAPACITY = 4096
# A window is used up to this many seconds before its end: OpenSSL and we read the clock
# at different moments, and certificate times have one-second resolution.
MARGIN_S = 1.0
_X509_V_ERR_UNSPECIFIED = 1


class VerifiedChains:
    """Chain digests and the wall-clock window in which their verification holds. Pure."""

    __slots__ = ("_capacity", "_windows", "hits", "misses")

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._capacity = capacity
        self._windows: OrderedDict[bytes, tuple[float, float]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._windows)

    def holds(self, key: bytes, now: float) -> bool:
        """Whether `key`'s chain was verified and its window includes `now`."""
        window = self._windows.get(key)
        if window is not None:
            start, end = window
            if start <= now < end - MARGIN_S:
                self._windows.move_to_end(key)
                self.hits += 1
                return True
            del self._windows[key]  # outside its window: verified afresh from now on
        self.misses += 1
        return False

    def remember(self, key: bytes, start: float, end: float) -> None:
        """A chain verified just now, valid from `start` to `end` (Unix time)."""
        if end - MARGIN_S <= start:
            return
        self._windows[key] = (start, end)
        self._windows.move_to_end(key)
        while len(self._windows) > self._capacity:
            self._windows.popitem(last=False)


def _fn(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
    f = getattr(lib, name)
    f.argtypes, f.restype = argtypes, restype
    return f


class _Lib:
    """The libcrypto/libssl functions the callback uses, from the library `_ssl` links."""

    def __init__(self) -> None:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)
        vp, c_int, c_int_p = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)
        self.set_callback = _fn(lib, "SSL_CTX_set_cert_verify_callback", None, vp, _CALLBACK, vp)
        self.verify = _fn(lib, "X509_verify_cert", c_int, vp)
        self.set_error = _fn(lib, "X509_STORE_CTX_set_error", None, vp, c_int)
        self.untrusted = _fn(lib, "X509_STORE_CTX_get0_untrusted", vp, vp)
        self.chain = _fn(lib, "X509_STORE_CTX_get0_chain", vp, vp)
        self.sk_num = _fn(lib, "OPENSSL_sk_num", c_int, vp)
        self.sk_value = _fn(lib, "OPENSSL_sk_value", vp, vp, c_int)
        self.i2d = _fn(lib, "i2d_X509", c_int, vp, ctypes.POINTER(vp))
        self.not_before = _fn(lib, "X509_get0_notBefore", vp, vp)
        self.not_after = _fn(lib, "X509_get0_notAfter", vp, vp)
        self.time_diff = _fn(lib, "ASN1_TIME_diff", c_int, c_int_p, c_int_p, vp, vp)


# int (*)(X509_STORE_CTX *, void *arg)
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def _load() -> _Lib | str:
    try:
        return _Lib()
    except (OSError, AttributeError, ImportError) as e:
        return f"libssl functions not reachable through _ssl: {e}"


_lib = _load()
_caches: dict[int, VerifiedChains] = {}
_ids = itertools.count(1)


def _chain_key(lib: _Lib, store_ctx: int) -> bytes | None:
    """SHA-256 over the DER of every certificate the peer sent, in order (the leaf first);
    None if they cannot be read."""
    stack = lib.untrusted(store_ctx)
    if not stack:
        return None
    n = lib.sk_num(stack)
    if n <= 0:
        return None
    digest = hashlib.sha256()
    for i in range(n):
        x509 = lib.sk_value(stack, i)
        size = lib.i2d(x509, None) if x509 else -1
        if size <= 0:
            return None
        buf = ctypes.create_string_buffer(size)
        out = ctypes.c_void_p(ctypes.addressof(buf))
        if lib.i2d(x509, ctypes.byref(out)) != size:
            return None
        digest.update(size.to_bytes(4, "big"))
        digest.update(buf.raw)
    return digest.digest()


def _seconds_from_now(lib: _Lib, asn1_time: int | None) -> float | None:
    if not asn1_time:
        return None
    days, secs = ctypes.c_int(), ctypes.c_int()
    if lib.time_diff(ctypes.byref(days), ctypes.byref(secs), None, asn1_time) != 1:
        return None
    return days.value * 86400.0 + secs.value


def _window(lib: _Lib, store_ctx: int, now: float) -> tuple[float, float] | None:
    """When every certificate of the chain just verified (its root included) is valid."""
    chain = lib.chain(store_ctx)
    n = lib.sk_num(chain) if chain else 0
    if n <= 0:
        return None
    start, end = float("-inf"), float("inf")
    for i in range(n):
        x509 = lib.sk_value(chain, i)
        if not x509:
            return None
        before = _seconds_from_now(lib, lib.not_before(x509))
        after = _seconds_from_now(lib, lib.not_after(x509))
        if before is None or after is None:
            return None
        start, end = max(start, now + before), min(end, now + after)
    return start, end


def _decide(store_ctx: int, arg: int | None) -> int:
    lib = _lib
    assert not isinstance(lib, str)
    cache = _caches.get(arg) if arg is not None else None
    key = _chain_key(lib, store_ctx) if cache is not None else None
    now = time.time()
    if cache is not None and key is not None and cache.holds(key, now):
        return 1
    ok = lib.verify(store_ctx)
    if ok != 1:
        return 0  # X509_verify_cert set the error OpenSSL reports
    if cache is not None and key is not None:
        window = _window(lib, store_ctx, now)
        if window is not None:
            cache.remember(key, *window)
    return 1


def _verify(store_ctx: int, arg: int | None) -> int:
    try:
        return _decide(store_ctx, arg)
    except BaseException:  # closed: whatever went wrong, this chain is not accepted
        if not isinstance(_lib, str):
            _lib.set_error(store_ctx, _X509_V_ERR_UNSPECIFIED)
        return 0


# The one C function pointer OpenSSL is given, alive as long as the module.
_VERIFY = _CALLBACK(_verify)


def install(ctx: Any, ssl_ctx_ptr: int) -> VerifiedChains | None:
    """Remember the chains `ctx` (an ssl.SSLContext whose SSL_CTX is at `ssl_ctx_ptr`)
    verifies, for as long as `ctx` lives. None (nothing changed: every chain is verified)
    where the library functions cannot be reached."""
    if isinstance(_lib, str):
        return None
    cache = VerifiedChains()
    key = next(_ids)
    _caches[key] = cache
    weakref.finalize(ctx, _caches.pop, key, None)
    _lib.set_callback(ssl_ctx_ptr, _VERIFY, key)
    return cache


def unavailable() -> str | None:
    """Why chains cannot be remembered here, or None."""
    return _lib if isinstance(_lib, str) else None
