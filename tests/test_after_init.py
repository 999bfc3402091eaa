"""The after-init sections: prmem.ro_after_init and prmem.wr_after_init.

Semantics (seed 000, "read only after init" / "write rare after init"):

* during init, both sections hand out memory freely (alloc, zalloc, strdup,
  calloc) and it is plainly writable;
* mark_init_done() makes ro_after_init READ_ONLY (sealed: mprotect(PROT_WRITE)
  fails, pwrite on its memfd fails) and wr_after_init WRITE_RARE, once:
  calling it again is a no-op;
* afterwards neither section hands out memory (ProtectionError); the
  wr_after_init data can still be changed with rare_write (and only so); it
  can never be made read-only (make_ro -> ProtectionError), and neither
  section can be destroyed (ProtectionError).

The sections are process-wide and the transition is one-way, so every test
here runs in a fresh child interpreter: the pytest process never calls
mark_init_done().
"""
from __future__ import annotations

import signal
import textwrap

import pytest

from conftest import run_child

# Shared by the child scripts below: raw mprotect and the memfd of a section.
HELPERS = """
import errno, mmap
PAGE = prmem.page_size
ro, wr = prmem.ro_after_init, prmem.wr_after_init
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

def mprotect_rw(alloc):
    ctypes.set_errno(0)
    rc = libc.mprotect(alloc.address & ~(PAGE - 1), PAGE, mmap.PROT_READ | mmap.PROT_WRITE)
    return "ok" if rc == 0 else errno.errorcode[ctypes.get_errno()]

def raises(exc_type, fn, *args):
    try:
        fn(*args)
    except exc_type:
        return True
    except BaseException as exc:
        raise AssertionError("expected %s, got %r" % (exc_type.__name__, exc))
    raise AssertionError("expected %s, nothing raised" % exc_type.__name__)
"""


def child(code: str):
    """Run HELPERS + code in a child; it must exit 0 and print OK last."""
    result = run_child(HELPERS + textwrap.dedent(code))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1:] == ["OK"], result.stdout + result.stderr
    return result


def test_fresh_process_is_in_init_phase():
    child("""
        for section in (ro, wr):
            assert not section.init_done
            assert isinstance(section, prmem.Pool)
        assert ro.mode is Mode.RO and wr.mode is Mode.WR
        assert ro.name == "ro_after_init" and wr.name == "wr_after_init"
        print("OK")
    """)


def test_allocate_freely_during_init_then_protect():
    child("""
        made = {}
        for section in (ro, wr):
            a = section.alloc(16)
            z = section.zalloc(32)
            s = section.strdup("config value")
            c = section.calloc(10, 8)
            big = section.alloc(200_000)        # more than one area's worth
            for x in (a, z, c, big):
                assert x.state is State.WRITABLE, x
                assert x[:] == bytes(len(x))
            assert s[:] == b"config value\\0"
            a.write(b"init-time data!!")        # plain writes during init
            c[0:8] = b"calloced"
            big.write(b"tail", offset=len(big) - 4)
            with memoryview(z) as view:
                view[0:4] = b"view"
            made[section.name] = (a, z, s, c, big)

        prmem.mark_init_done()
        assert ro.init_done and wr.init_done

        for name, state in (("ro_after_init", State.READ_ONLY),
                            ("wr_after_init", State.WRITE_RARE)):
            a, z, s, c, big = made[name]
            for x in (a, z, s, c, big):
                assert x.state is state, (name, x)
                raises(prmem.ProtectionError, x.write, b"late")
                assert "w" not in perms_at(x.address), perms_at(x.address)
            # the data written during init is all there
            assert a[:] == b"init-time data!!"
            assert z[0:4] == b"view"
            assert s[:] == b"config value\\0"
            assert c[0:8] == b"calloced"
            assert big[len(big) - 4:] == b"tail"
        print("OK")
    """)


@pytest.mark.parametrize("section", ["ro_after_init", "wr_after_init"])
def test_no_allocations_after_init(section):
    child(f"""
        section = prmem.{section}
        section.alloc(8)
        prmem.mark_init_done()
        stats = section.stats()
        for call in (lambda: section.alloc(8), lambda: section.zalloc(8),
                     lambda: section.strdup("x"), lambda: section.calloc(2, 4),
                     lambda: section.alloc(1_000_000)):
            raises(prmem.ProtectionError, call)
            raises(PermissionError, call)
        assert section.stats().allocations == stats.allocations
        print("OK")
    """)


def test_ro_after_init_is_sealed():
    child("""
        a = ro.strdup("sealed after init")
        prmem.mark_init_done()
        assert a.state is State.READ_ONLY
        assert mprotect_rw(a) in ("EACCES", "EPERM"), mprotect_rw(a)
        assert pool_fds("ro_after_init") == []  # sealed: prmem holds no descriptor
        for fd in backing_fds(a.address):
            try:
                os.pwrite(fd, b"EVIL", 0)
            except OSError as exc:
                assert exc.errno == errno.EPERM, exc
            else:
                raise AssertionError("pwrite on the sealed memfd succeeded")
            finally:
                os.close(fd)
        mem = os.open("/proc/self/mem", os.O_RDWR)
        try:
            os.pwrite(mem, b"EVIL", a.address)
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
        else:
            raise AssertionError("write through /proc/self/mem succeeded")
        finally:
            os.close(mem)
        raises(prmem.ProtectionError, prmem.rare_write, a, b"EVIL")
        raises(prmem.ProtectionError, ro.rare_memset, a, 0)
        assert a[:] == b"sealed after init\\0"
        print("OK")
    """)


def test_wr_after_init_rare_write_after_init():
    child("""
        import threading
        counter = wr.zalloc(8)
        name = wr.strdup("v1")
        other = prmem.Pool(Mode.WR, name="other")
        foreign = other.zalloc(8)
        prmem.mark_init_done()
        assert counter.state is State.WRITE_RARE
        assert perms_at(counter.address) == "r--s"
        prmem.rare_write(counter, (41).to_bytes(8, "little"))
        wr.rare_write(counter, b"\\x2a")
        assert int.from_bytes(counter[:], "little") == 42
        prmem.rare_memset(name, ord("2"), 1, 1)
        assert name[:] == b"v2\\0"
        with wr.rare_write_session() as w:
            w.write(name, b"v3")
            w.memset(counter, 0)
        assert name[:] == b"v3\\0" and counter[:] == bytes(8)
        raises(ValueError, wr.rare_write, foreign, b"x")     # not its memory
        raises(ValueError, wr.rare_write, counter, b"123456789")
        # from another thread too
        def bump():
            for n in range(1, 1001):
                prmem.rare_write(counter, n.to_bytes(8, "little"))
        t = threading.Thread(target=bump)
        t.start()
        t.join()
        assert int.from_bytes(counter[:], "little") == 1000
        assert perms_at(counter.address) == "r--s"       # never made writable
        print("OK")
    """)


def test_rare_write_on_ro_after_init_refused_even_during_init():
    # ro_after_init has no write-rare state at all (an RO pool)
    child("""
        a = ro.alloc(8)
        raises(prmem.ProtectionError, prmem.rare_write, a, b"x")
        raises(prmem.ProtectionError, ro.rare_write, a, b"x")
        a.write(b"plainly!")
        prmem.mark_init_done()
        raises(prmem.ProtectionError, prmem.rare_write, a, b"x")
        assert a[:] == b"plainly!"
        print("OK")
    """)


def test_mark_init_done_twice_is_a_no_op():
    child("""
        r = ro.strdup("ro")
        w = wr.strdup("wr")
        assert prmem.mark_init_done() is None
        before = (ro.stats(), wr.stats())
        assert prmem.mark_init_done() is None
        assert prmem.mark_init_done() is None
        assert (ro.stats(), wr.stats()) == before
        assert r.state is State.READ_ONLY and w.state is State.WRITE_RARE
        # still write-rare: the repeated call did not make it read-only
        prmem.rare_write(w, b"WR")
        assert w[:] == b"WR\\0"
        assert ro.init_done and wr.init_done
        raises(prmem.ProtectionError, ro.alloc, 8)
        print("OK")
    """)


def test_mark_init_done_from_many_threads():
    child("""
        import threading
        a = wr.zalloc(8)
        b = ro.zalloc(8)
        errors = []
        start = threading.Barrier(8)
        def finish():
            try:
                start.wait()
                prmem.mark_init_done()
            except BaseException as exc:
                errors.append(exc)
        threads = [threading.Thread(target=finish) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert errors == [], errors
        assert a.state is State.WRITE_RARE and b.state is State.READ_ONLY
        assert ro.init_done and wr.init_done
        prmem.rare_write(a, b"ok")
        print("OK")
    """)


def test_wr_after_init_cannot_be_made_read_only():
    child("""
        a = wr.strdup("stays write-rare")
        raises(prmem.ProtectionError, wr.make_ro)        # not during init ...
        assert a.state is State.WRITABLE
        prmem.mark_init_done()
        raises(prmem.ProtectionError, wr.make_ro)        # ... nor after
        assert a.state is State.WRITE_RARE
        prmem.rare_write(a, b"S")
        assert a[:] == b"Stays write-rare\\0"
        print("OK")
    """)


def test_sections_cannot_be_destroyed():
    child("""
        r = ro.strdup("ro data")
        w = wr.strdup("wr data")
        for section in (ro, wr):
            raises(prmem.ProtectionError, section.destroy)
            assert not section.destroyed
        prmem.mark_init_done()
        for section in (ro, wr):
            raises(prmem.ProtectionError, section.destroy)
            assert not section.destroyed
        assert r[:] == b"ro data\\0" and w[:] == b"wr data\\0"
        prmem.rare_write(w, b"WR")
        assert w[:] == b"WR data\\0"
        print("OK")
    """)


@pytest.mark.parametrize("section,state", [
    ("ro_after_init", "READ_ONLY"), ("wr_after_init", "WRITE_RARE"),
])
def test_native_write_after_init_segfaults(section, state):
    result = run_child(f"""
        a = prmem.{section}.strdup("protected")
        native_write(a, b"P")                  # fine during init
        prmem.mark_init_done()
        assert a.state is State.{state}
        print("before", bytes(a[0:9]).decode(), flush=True)
        native_write(a, b"EVIL")
        print("survived", flush=True)
    """)
    assert result.returncode == -signal.SIGSEGV, result
    assert "before Protected" in result.stdout
    assert "survived" not in result.stdout


def test_native_write_to_wr_after_init_during_rare_writes_segfaults():
    result = run_child("""
        import threading
        a = prmem.wr_after_init.zalloc(16 * 4096)
        prmem.mark_init_done()
        busy = threading.Event()
        def writer():
            n = 0
            while True:
                prmem.rare_memset(a, n & 0xFF)
                n += 1
                if n == 20:
                    busy.set()
        threading.Thread(target=writer, daemon=True).start()
        busy.wait()
        print("writing natively", flush=True)
        native_write(a, b"X", 5000)
        print("survived", flush=True)
    """)
    assert result.returncode == -signal.SIGSEGV, result
    assert "writing natively" in result.stdout
    assert "survived" not in result.stdout


def test_ordinary_pools_unaffected_by_mark_init_done():
    child("""
        pool = Pool(Mode.RO, name="ordinary")
        before = pool.alloc(8)
        prmem.mark_init_done()
        after = pool.alloc(8)                  # ordinary pools keep allocating
        for x in (before, after):
            assert x.state is State.WRITABLE
            x.write(b"writable")
        pool.protect()
        assert before.state is State.READ_ONLY
        pool.destroy()
        print("OK")
    """)
