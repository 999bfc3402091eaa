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

Each version is a FrozenMap made by Pool.freeze(): the rules, their index and
every nested container live in the version's pool, so once it is protected
nothing that decides a lookup's answer is in writable memory.  The policy is
never write-rare: an update replaces it as a whole.  What has to change in
place is the *reference* readers follow to the version in force, and that
reference must be protected too, or an attacker would simply redirect it to
forged, unprotected data: prmem.ProtectedRef keeps it in write-rare memory,
and prmem.replace_pool_with() runs steps 6-8 around it.

Run it (with prmem installed):  python examples/policy_update.py
"""
from __future__ import annotations

import threading
from typing import Any, Optional

import prmem
from prmem import Mode


class PolicyError(Exception):
    """A rule that does not parse."""


def parse(version: int, rules: list[str]) -> dict[str, Any]:
    """"subject:object:perm" lines -> {"version": n, "allow": {subject: {object: [perm, ...]}}}"""
    allow: dict[str, dict[str, list[str]]] = {}
    for rule in rules:
        parts = rule.split(":")
        if len(parts) != 3 or not all(parts):
            raise PolicyError(f"malformed rule {rule!r}")
        subject, obj, perm = parts
        allow.setdefault(subject, {}).setdefault(obj, []).append(perm)
    return {"version": version, "allow": allow}


# The protected reference to the version in force: the FrozenMap itself.
# Its record is in write-rare memory and changes only with a rare write, and
# get() refuses a reference that no longer matches it.  None until the
# first version is in force (the annotation tells type checkers so).
current: prmem.ProtectedRef[Optional[prmem.FrozenMap]] = prmem.ProtectedRef()
# Readers must not use a version while it is being replaced: a lock is the
# simplest way (the seed's point that users of write-rare must take care of
# atomicity themselves).  Readers keep no handle beyond a check, so the old
# version's pool goes back as soon as an update is done.
lock = threading.Lock()


def check(subject: str, obj: str, perm: str) -> bool:
    """Step 5: what every reader does."""
    with lock:
        # get() verifies the Python-side reference against its write-rare
        # record and raises ProtectionError if it was tampered with.
        policy = current.get()
        if policy is None:                  # no policy in force: deny
            return False
        # Every lookup runs in C on the protected pages; a missing key
        # behaves as with a dict.
        return perm in policy["allow"].get(subject, {}).get(obj, ())


def in_force() -> prmem.FrozenMap:
    """The version in force (this demo always has one once started)."""
    policy = current.get()
    assert policy is not None, "no policy in force"
    return policy


def update(version: int, rules: list[str]) -> bool:
    """Steps 6-8.  Returns True if the new version is now in force."""
    candidate = None

    def build(pool: prmem.Pool) -> prmem.FrozenMap:
        nonlocal candidate
        candidate = pool
        return pool.freeze(parse(version, rules))  # 1-3 (PolicyError: step 8)

    with lock:
        try:
            # 4, 6-7: build, protect, one rare write points the reference at
            # the new FrozenMap, the old version's pool (and its pages) goes.
            prmem.replace_pool_with(current, build, name=f"policy-v{version}")
        except PolicyError as exc:
            # 8: replace_pool_with() destroyed the half-built version.
            assert candidate is not None and candidate.destroyed
            print(f"update to v{version} rejected ({exc}); old policy still serving")
            return False
    print(f"policy v{version} in force ({len(rules)} rules)")
    return True


def main() -> None:
    assert update(1, ["httpd:web_content:read", "sshd:shadow:read"])
    assert check("httpd", "web_content", "read")
    assert not check("httpd", "shadow", "read")
    v1 = in_force().pool

    # The live policy is read-only: the handle refuses assignment (and a
    # type checker flags it before it runs), and a rare write to the
    # protected version is refused too (a native write, e.g.
    # ctypes.memmove(policy.address, ...), would die by SIGSEGV).
    policy = in_force()

    def assign() -> None:
        policy["allow"] = {}  # type: ignore[index]  # mypy: FrozenMap has no __setitem__

    def rare_set() -> None:
        policy.rare_set("version", 99)

    for attempt in (assign, rare_set):
        try:
            attempt()
        except (TypeError, prmem.ProtectionError) as exc:
            print(f"refused: {type(exc).__name__}")
        else:
            raise AssertionError("the protected policy was modified")
    assert policy["version"] == 1
    del policy                              # readers keep no handle

    # A successful update: v2 takes over, v1 is destroyed.
    assert update(2, ["httpd:web_content:read", "httpd:logs:append"])
    assert check("httpd", "logs", "append")
    assert v1.destroyed
    v2 = in_force()

    # A failed update: the half-built v3 is destroyed, v2 keeps serving.
    assert not update(3, ["httpd:web_content:read", "this rule is broken"])
    assert in_force().pool is v2.pool and not v2.pool.destroyed
    assert check("httpd", "logs", "append") and in_force()["version"] == 2

    # Redirecting the reference behind prmem's back to a forged policy is
    # detected, not followed.
    forged = prmem.Pool(Mode.RO, name="forged")
    forged_policy = forged.freeze(parse(99, ["attacker:everything:write"]))
    object.__setattr__(current, "_target", forged_policy)
    try:
        check("attacker", "everything", "write")
    except prmem.ProtectionError:
        print("tampered reference detected")
    else:
        raise AssertionError("forged policy was used")
    current.set(v2)                         # put things back (legitimately)
    del forged_policy
    forged.destroy()

    # Shut down: drop the reference, then the pool can go.
    pool = v2.pool
    del v2
    current.set(None)
    pool.destroy()
    print("ok")


if __name__ == "__main__":
    main()
