#!/usr/bin/env python3
"""Updating a protected "policy database" without ever making it writable.

This is the update sequence Igor Stoppa described for the SELinux policy DB
on the pmalloc thread (seed 002):

  1-3. allocate and initialise the new version in a fresh, writable pool;
  4.   lock it all down read-only (protect());
  5.   serve lookups from it;
  6.   on update, build a temporary new version with steps 1-4;
  7.   if that worked, switch to the new one and destroy the old one;
  8.   if it failed, destroy the new one: the old one keeps serving.

The policy data itself is never write-rare: it is read-only, and an update
replaces it as a whole.  The only thing that has to change in place is the
*reference* readers follow to find the current version, and that reference
must be protected too, or an attacker would simply redirect it to forged,
unprotected data.  prmem.ProtectedRef keeps that reference in write-rare
memory and changes it with a single rare write.

Run it (with prmem installed):  python examples/policy_update.py
"""
from __future__ import annotations

import threading

import prmem
from prmem import Mode, State


class PolicyError(Exception):
    """A rule that does not parse."""


class PolicyDB:
    """One version of the policy: a protected pool plus the allocations
    (one NUL-terminated rule each) that live in it."""

    def __init__(self, version: int, rules: list[str]) -> None:
        self.version = version
        # Steps 1-3: a fresh pool, writable while we fill it.
        self.pool = prmem.Pool(Mode.RO, name=f"policy-v{version}")
        try:
            self.rules = []
            for rule in rules:
                if rule.count(":") != 2:
                    raise PolicyError(f"malformed rule {rule!r}")
                self.rules.append(self.pool.strdup(rule))
            # Step 4: everything read-only, sealed by the kernel.  From here
            # on no write can change these bytes, not even one through
            # mprotect() or the pool's file descriptor.
            self.pool.protect()
        except BaseException:
            # Step 8: a version that failed to build is thrown away whole.
            self.pool.destroy()
            raise

    def allows(self, subject: str, obj: str, perm: str) -> bool:
        wanted = f"{subject}:{obj}:{perm}".encode()
        return any(rule[:-1] == wanted for rule in self.rules)

    def destroy(self) -> None:
        self.pool.destroy()


# The protected reference readers use to find the current policy.
current = prmem.ProtectedRef()
# Readers must not use a version while it is being destroyed: a lock is the
# simplest way (the seed's point that users of write-rare must take care of
# atomicity themselves).
lock = threading.Lock()


def check(subject: str, obj: str, perm: str) -> bool:
    """Step 5: what every reader does."""
    with lock:
        # get() verifies the Python-side reference against its write-rare
        # record and raises ProtectionError if it was tampered with.
        return current.get().allows(subject, obj, perm)


def update(version: int, rules: list[str]) -> bool:
    """Steps 6-8.  Returns True if the new version is now in force."""
    try:
        new = PolicyDB(version, rules)      # 1-4: build and protect
    except PolicyError as exc:
        print(f"update to v{version} rejected ({exc}); old policy still serving")
        return False
    with lock:
        old = current.get()
        current.set(new)                    # 7: one rare write swaps the reference
        if old is not None:
            old.destroy()                   # 7: the old version's pages go back
    print(f"policy v{version} in force ({len(rules)} rules)")
    return True


def main() -> None:
    assert update(1, ["httpd:web_content:read", "sshd:shadow:read"])
    assert check("httpd", "web_content", "read")
    assert not check("httpd", "shadow", "read")
    v1 = current.get()

    # The live policy is read-only: neither the API nor a rare write can
    # change it (a native write, e.g. ctypes.memmove, would die by SIGSEGV).
    assert v1.rules[0].state is State.READ_ONLY
    for attempt in (lambda: v1.rules[0].write(b"x"),
                    lambda: prmem.rare_write(v1.rules[0], b"x")):
        try:
            attempt()
        except prmem.ProtectionError:
            pass
        else:
            raise AssertionError("the protected policy was modified")

    # A successful update: v2 takes over, v1 is destroyed.
    assert update(2, ["httpd:web_content:read", "httpd:logs:append"])
    assert check("httpd", "logs", "append")
    assert v1.pool.destroyed
    v2 = current.get()

    # A failed update: the half-built v3 is destroyed, v2 keeps serving.
    assert not update(3, ["httpd:web_content:read", "this rule is broken"])
    assert current.get() is v2 and not v2.pool.destroyed
    assert check("httpd", "logs", "append")

    # Redirecting the reference behind prmem's back is detected, not followed.
    forged = PolicyDB(99, ["attacker:everything:write"])
    object.__setattr__(current, "_target", forged)
    try:
        check("attacker", "everything", "write")
    except prmem.ProtectionError:
        print("tampered reference detected")
    else:
        raise AssertionError("forged policy was used")
    current.set(v2)                         # put things back (legitimately)
    forged.destroy()

    # The same sequence in one call, when the reference points at the pool
    # itself: prmem.replace_pool() builds, protects, swaps and destroys.
    pool_ref = prmem.ProtectedRef()
    first = prmem.replace_pool(pool_ref, lambda p: p.strdup("a:b:read"), name="pool-v1")
    second = prmem.replace_pool(pool_ref, lambda p: p.strdup("a:b:write"), name="pool-v2")
    assert pool_ref.get() is second and first.destroyed
    second.destroy()

    current.get().destroy()
    print("ok")


if __name__ == "__main__":
    main()
