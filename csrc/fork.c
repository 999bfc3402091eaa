/*
 * Fork safety.  Pool memory is a MAP_SHARED mapping of a memory file, so
 * after fork() parent and child would see each other's writes, plain and
 * write-rare alike.  Ordinary memory does not behave that way:
 *
 *   - a chunk that code can write through its mapping (a WRITABLE area, or
 *     PRMEM_ENFORCE=0), and every memfd_secret chunk, is copied in the
 *     child right after fork() and before any other code runs: a new
 *     memory file with the same contents, mapped at the same address with
 *     the same per-area protections;
 *   - a chunk that only prmem can change (WRITE_RARE and MMU-only
 *     READ_ONLY areas) stays shared, and whichever process changes it first
 *     makes its own copy then (unshare.c): fork() costs nothing per byte;
 *   - sealed READ_ONLY chunks can never change, for either process, and
 *     stay shared.
 *
 * If the child cannot get a new file for an eager copy (say RLIMIT_NOFILE
 * is exhausted), it gets an anonymous private copy instead, moved over the
 * chunk in one mremap(): views taken before the fork keep reading the data
 * as of the fork, nothing of the parent's file stays mapped (its writable
 * mappings would stop the parent from sealing), and the pool refuses
 * changes in the child (PrmemError, fork_errno).
 *
 * The child handler runs in a process that may have been multi-threaded:
 * it uses syscalls and plain C only, no Python API and no allocation.
 * The prepare handler takes the registry lock and every pool lock, so the
 * child inherits consistent tables and usable (unlocked) locks.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "prmem.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>


/*
 * The registry of live pools is their records in prmem's write-rare
 * metadata: a pool is registered while its record says so (registered),
 * and the handlers find the pools by walking the records (owner checked
 * against its record), never through links kept in ordinary memory, which
 * a stray store could bend to leave a pool's writable memory shared with a
 * child.  registry_lock orders registration against the handlers: a
 * registered record is neither unregistered nor freed while it is held.
 * A process whose metadata is frozen (a fork()ed child without a file of
 * its own, or a lost metadata descriptor: meta.c) cannot change a record:
 * the pools it unregisters are remembered in `gone` (a bit per record),
 * ordinary memory of that degraded process only.
 */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
/* one bit per pool record, grown as needed (plain malloc) */
static unsigned char *gone;
static size_t gone_bytes;

static size_t
record_index(const prmem_pool_meta *m)
{
    return (size_t)((const char *)m - prmem_meta_base - PRMEM_META_RECORDS) /
           PRMEM_META_RECORD;
}

static int
is_gone(const prmem_pool_meta *m)
{
    size_t i = record_index(m);
    return i / 8 < gone_bytes && (gone[i / 8] >> (i % 8)) & 1;
}

/* The next registered pool from record *cursor on; NULL after the last. */
static PoolObject *
next_pool(size_t *cursor)
{
    const prmem_pool_meta *m;
    while ((m = prmem_meta_record_at((*cursor)++)) != NULL) {
        /* the flag first: a free record's first word is a free-list link */
        if (!m->registered || m->owner == NULL || is_gone(m))
            continue;
        PoolObject *p = (PoolObject *)m->owner;
        if (p->m == m && prmem_pool_meta_ok(p))
            return p;
    }
    return NULL;
}

#define FOR_EACH_POOL(p) for (size_t cur_ = 0; ((p) = next_pool(&cur_)) != NULL;)

PRMEM_INTERNAL void
prmem_registry_add(PoolObject *pool)
{
    pthread_mutex_lock(&registry_lock);
    if (prmem_pool_meta_ok(pool) && !prmem_meta_frozen()) /* frozen: no new pools */
        META_SET(pool->m->registered, 1);
    pthread_mutex_unlock(&registry_lock);
}

PRMEM_INTERNAL void
prmem_registry_remove(PoolObject *pool)
{
    pthread_mutex_lock(&registry_lock);
    if (prmem_pool_meta_ok(pool) && pool->m->registered) {
        if (!prmem_meta_frozen())
            META_SET(pool->m->registered, 0);
        else {
            size_t i = record_index(pool->m);
            if (i / 8 >= gone_bytes) {
                size_t bytes = gone_bytes ? gone_bytes : 64;
                while (bytes <= i / 8)
                    bytes *= 2;
                unsigned char *more = realloc(gone, bytes);
                if (more == NULL) {
                    /* cannot remember it: a later fork() would follow a
                     * freed pool; fail closed */
                    static const char msg[] = "prmem: out of memory to remember a pool "
                                              "destroyed while prmem's metadata is frozen; "
                                              "aborting\n";
                    ssize_t ignored = write(STDERR_FILENO, msg, sizeof(msg) - 1);
                    (void)ignored;
                    abort();
                }
                memset(more + gone_bytes, 0, bytes - gone_bytes);
                gone = more;
                gone_bytes = bytes;
            }
            gone[i / 8] |= (unsigned char)(1u << (i % 8));
        }
    }
    pthread_mutex_unlock(&registry_lock);
}

/*
 * The child copies what can still change from the shared file, so the
 * parent must not change it until the copy is done: otherwise a write the
 * parent makes right after fork() returns could land in the child's copy.
 * The parent waits on a pipe that the child closes once its copies are made
 * (or that closes when the child dies).  Without a free descriptor for the
 * pipe the parent cannot wait; the window is then documented.
 */
static int copied_pipe[2] = {-1, -1};
/* This fork() leaves the chunks only prmem can change shared (unshare.c);
 * otherwise (no pipe to track the child with) the child copies them too. */
static int lazy;

/* Is chunk ci of a live pool copied in the child right after fork()? */
static int
copied_at_fork(PoolObject *p, size_t ci)
{
    const prmem_chunk *ch = &p->m->chunks[ci];
    if (ch->sealed || ch->fd < 0)
        return 0; /* immutable, or an anonymous snapshot that fork() copies */
    return !lazy || !prmem_chunk_can_stay_shared(p, ci);
}

static int
anything_to_copy(void)
{
    PoolObject *p;
    FOR_EACH_POOL(p) {
        if (!p->m->ready || p->m->destroyed)
            continue;
        for (size_t ci = 0; ci < p->m->nchunks; ci++)
            if (copied_at_fork(p, ci))
                return 1;
    }
    return 0;
}

static void
prepare(void)
{
    /* Metadata whose descriptor was lost is frozen now, before anything is
     * shared with the child: sharing is recorded in metadata. */
    int frozen = prmem_meta_check_file() != 0;
    pthread_mutex_lock(&registry_lock);
    PoolObject *p;
    FOR_EACH_POOL(p)
        pthread_mutex_lock(&p->lock);
    lazy = prmem_lazy_fork_prepare(!frozen); /* takes sharers_lock either way */
    if (anything_to_copy() && pipe2(copied_pipe, O_CLOEXEC) < 0)
        copied_pipe[0] = copied_pipe[1] = -1;
    prmem_meta_fork_prepare(); /* last: takes meta.c's leaf lock */
}

static void
unlock_all(void)
{
    PoolObject *p;
    FOR_EACH_POOL(p)
        pthread_mutex_unlock(&p->lock);
    pthread_mutex_unlock(&registry_lock);
}

static void
parent(void)
{
    prmem_meta_fork_parent(); /* frozen now if the descriptor was lost meanwhile */
    unsigned long long gen = prmem_lazy_fork_parent(lazy);
    if (gen != 0 && prmem_meta_frozen()) {
        /* The child may share chunks but nothing can record it: no release
         * zeroes unsealed data from now on (prmem_pool_release). */
        prmem_meta_note_unrecorded_sharing();
        gen = 0;
    }
    PoolObject *p;
    FOR_EACH_POOL(p) {
        if (gen == 0)
            break;
        if (!p->m->ready || p->m->destroyed)
            continue;
        for (size_t ci = 0; ci < p->m->nchunks; ci++)
            if (prmem_chunk_can_stay_shared(p, ci) && p->m->chunks[ci].shared_gen == 0)
                META_SET(p->m->chunks[ci].shared_gen, gen); /* the oldest fork sharing it */
    }
    if (copied_pipe[1] >= 0) {
        char c;
        close(copied_pipe[1]);
        while (read(copied_pipe[0], &c, 1) < 0 && errno == EINTR)
            ;
        close(copied_pipe[0]);
        copied_pipe[0] = copied_pipe[1] = -1;
    }
    unlock_all();
}

/* Give the child its own copy of chunk ci; -1 on failure (errno set). */
static int
privatize_chunk(PoolObject *pool, size_t ci)
{
    const prmem_chunk *ch = &pool->m->chunks[ci];
    int fd = prmem_new_backing(pool, ch->kind);
    if (fd < 0)
        return -1;
    if (ftruncate(fd, (off_t)ch->size) < 0 || prmem_copy_chunk_contents(ch, fd) < 0)
        goto fail;
    /* Map the copy over the shared mapping at the same address, all
     * PROT_NONE, then give each area back its protection. */
    if (mmap(ch->base, ch->size, PROT_NONE, MAP_SHARED | MAP_FIXED | MAP_NORESERVE, fd, 0) ==
        MAP_FAILED)
        goto fail;
    for (size_t i = 0; i < pool->m->nareas; i++) {
        const prmem_area *a = &pool->m->areas[i];
        if (a->chunk != ci)
            continue;
        int writable = a->state == PRMEM_WRITABLE || !prmem_enforce;
        int prot = writable ? PROT_READ | PROT_WRITE : prmem_protected_prot(pool);
        if (mprotect(a->start, a->size, prot) < 0) {
            /* the copy is mapped now, maybe still PROT_NONE in part: make it
             * readable, so the snapshot the caller falls back to can read it */
            int err = errno;
            mprotect(ch->base, ch->used, PROT_READ);
            errno = err;
            goto fail;
        }
    }
    prmem_advise(pool, ch, ch->base, ch->size);
    if (pool->m->mlock_areas && ch->used > 0)
        mlock(ch->base, ch->used);
    prmem_chunk_adopt_fd(ch, fd);
    return 0;
fail:
    close(fd);
    return -1;
}

/*
 * A chunk the child keeps sharing with its parent until its first change:
 * map it again through a read-only descriptor of the same file (no copy,
 * no page touched) and drop the read-write one.  The child then has no
 * writable path to its parent's memory: its mapping has no "may write"
 * right (mprotect(PROT_WRITE) fails with EACCES, /proc/self/mem writes
 * too), it holds no descriptor that could write the file, and cannot
 * reopen one.  Its first change copies from this mapping
 * into a file of its own (unshare.c).  -1 if /proc is unavailable or a
 * mapping fails: the caller copies the chunk now instead.
 */
static int
share_readonly(PoolObject *pool, size_t ci)
{
    const prmem_chunk *ch = &pool->m->chunks[ci];
    char path[32];
    prmem_fd_path(path, ch->fd);
    /* Owner read-only: the file can no longer be reopened for writing
     * through /proc (except with CAP_DAC_OVERRIDE, which can write the
     * parent's memory through /proc/PID/mem anyway).  Descriptors already
     * open, such as the parent's, keep their access mode. */
    if (fchmod(ch->fd, 0400) < 0)
        return -1;
    int ro = open(path, O_RDONLY | O_CLOEXEC);
    if (ro < 0)
        return -1;
    if ((ch->used > 0 && mmap(ch->base, ch->used, prmem_protected_prot(pool),
                              MAP_SHARED | MAP_FIXED | MAP_NORESERVE, ro, 0) == MAP_FAILED) ||
        (ch->size > ch->used &&
         mmap(ch->base + ch->used, ch->size - ch->used, PROT_NONE,
              MAP_SHARED | MAP_FIXED | MAP_NORESERVE, ro, (off_t)ch->used) == MAP_FAILED)) {
        close(ro);
        return -1;
    }
    prmem_advise(pool, ch, ch->base, ch->size);
    if (pool->m->mlock_areas && ch->used > 0)
        prmem_lock_range(ch->base, ch->used);
    close(ch->fd);
    META_SET(ch->fd, ro);
    return 0;
}

/*
 * No new file for the child: copy the used part into anonymous private
 * memory and move it over the chunk (mremap replaces the old mapping in one
 * step), areas keeping their protection; the unused tail becomes anonymous
 * PROT_NONE.  Nothing of the parent's file stays mapped or open here.
 * Returns -1 only if not even that memory can be had.
 */
static int
snapshot_chunk(PoolObject *pool, size_t ci, int record)
{
    const prmem_chunk *ch = &pool->m->chunks[ci];
    if (ch->used > 0) {
        char *copy = mmap(NULL, ch->used, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                          -1, 0);
        if (copy == MAP_FAILED)
            return -1;
        memcpy(copy, ch->base, ch->used); /* child() made it readable */
        for (size_t i = 0; i < pool->m->nareas; i++) {
            const prmem_area *a = &pool->m->areas[i];
            if (a->chunk == ci && a->state != PRMEM_WRITABLE && prmem_enforce)
                mprotect(copy + (a->start - ch->base), a->size, prmem_protected_prot(pool));
        }
        if (mremap(copy, ch->used, ch->used, MREMAP_MAYMOVE | MREMAP_FIXED, ch->base) ==
            MAP_FAILED) {
            munmap(copy, ch->used);
            return -1;
        }
    }
    if (ch->size > ch->used &&
        mmap(ch->base + ch->used, ch->size - ch->used, PROT_NONE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0) == MAP_FAILED)
        return -1;
    prmem_advise(pool, ch, ch->base, ch->size);
    /* a number that no longer names the pool's file is someone else's */
    if (ch->fd >= 0 && prmem_check_backing(pool, ch, NULL) == 0)
        close(ch->fd);
    if (record) { /* else frozen metadata: the stale number is never used */
        META_SET(ch->fd, -1);
        META_SET(ch->dev, (dev_t)0);
        META_SET(ch->ino, (ino_t)0);
    }
    return 0;
}

/* The child keeps what chunk ci's mapping shows as private memory (a
 * no-access chunk is made readable to be copied; the copy gets the pool's
 * protections back); if not even that memory can be had, the chunk becomes
 * PROT_NONE: never shared with the parent. */
static void
keep_snapshot(PoolObject *p, size_t ci, int record)
{
    const prmem_chunk *ch = &p->m->chunks[ci];
    if (ch->used > 0 && prmem_protected_prot(p) == PROT_NONE)
        mprotect(ch->base, ch->used, PROT_READ);
    if (snapshot_chunk(p, ci, record) < 0)
        mprotect(ch->base, ch->size, PROT_NONE);
}

static void
child(void)
{
    size_t nshared = 0;
    prmem_meta_fork_child(); /* first: this process's metadata is its own */
    int frozen = prmem_meta_frozen() != 0;
    PoolObject *p;
    FOR_EACH_POOL(p) {
        if (!p->m->ready || p->m->destroyed)
            continue;
        for (size_t ci = 0; ci < p->m->nchunks; ci++) {
            const prmem_chunk *ch = &p->m->chunks[ci];
            if (frozen) {
                /* No metadata file: nothing can be recorded, every pool
                 * refuses changes (prmem_meta_frozen); each unsealed chunk
                 * becomes a private snapshot, nothing of the parent's file
                 * stays mapped or open here. */
                if (!ch->sealed)
                    keep_snapshot(p, ci, 0);
                continue;
            }
            /* the parent's children are not ours */
            META_SET(ch->shared_gen, 0ULL);
            if (!ch->sealed && ch->fd >= 0 && prmem_check_backing(p, ch, NULL) < 0) {
                /* The number names another file now (closed and reused,
                 * or dup2()ed over): never touch it.  The child keeps a
                 * private snapshot of what the mapping shows, and the pool
                 * refuses changes here, as after a failed copy. */
                META_SET(ch->shared_with_parent, 0);
                META_SET(p->m->fork_errno, EBADF);
                keep_snapshot(p, ci, 1);
                continue;
            }
            if (!copied_at_fork(p, ci)) {
                META_SET(ch->shared_with_parent, 0);
                if (lazy && !ch->sealed && ch->fd >= 0 && share_readonly(p, ci) == 0) {
                    META_SET(ch->shared_with_parent, 1); /* copied on first change */
                    nshared++;
                    continue;
                }
                if (!lazy || ch->sealed || ch->fd < 0)
                    continue;
                /* could not be shared read-only: copied now, as below */
            }
            META_SET(ch->shared_with_parent, 0);
            /* copies of secret memory, and snapshots, read the mapping: a
             * no-access chunk is made readable here, single-threaded, and
             * the copy gets the pool's protections back */
            if (ch->used > 0 && prmem_protected_prot(p) == PROT_NONE)
                mprotect(ch->base, ch->used, PROT_READ);
            if (privatize_chunk(p, ci) < 0) {
                /* The pool refuses changes from now on; its memory becomes
                 * a private snapshot, or, if not even anonymous memory can
                 * be had, fails closed: never shared with the parent. */
                META_SET(p->m->fork_errno, errno ? errno : EIO);
                keep_snapshot(p, ci, 1);
            }
        }
    }
    prmem_lazy_fork_child(lazy, nshared);
    if (copied_pipe[0] >= 0) {
        close(copied_pipe[0]);
        close(copied_pipe[1]); /* the parent may go on */
        copied_pipe[0] = copied_pipe[1] = -1;
    }
    unlock_all();
}

PRMEM_INTERNAL int
prmem_fork_init(void)
{
    static int done;
    if (done)
        return 0;
    int rc = pthread_atfork(prepare, parent, child);
    if (rc != 0) {
        prmem_set_oserror("pthread_atfork", rc);
        return -1;
    }
    done = 1;
    return 0;
}
