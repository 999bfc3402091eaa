/*
 * Copy on first change: how a fork()ed parent and child stop sharing a
 * chunk's memory file only when one of them changes it.
 *
 * Pool memory is a MAP_SHARED mapping of a memory file, so after fork()
 * both processes map the same pages.  A chunk that no code can write
 * through its mapping (every area WRITE_RARE or MMU-only READ_ONLY: the
 * only way to change it is prmem's own pwrite, seal or hole punch) stays
 * shared after fork(), and each process gives itself a private copy just
 * before its first change to it (prmem_chunk_unshare):
 *
 *   - in the child (shared_with_parent), always: the parent may write at
 *     any time;
 *   - in the parent (shared_gen), only while a child forked since then
 *     still maps the file.  Each fork that leaves chunks shared gets a
 *     pipe: the child keeps the write end (close-on-exec) while it maps a
 *     file of its parent, so the parent sees POLLHUP on the read end once
 *     every such child has exited, exec()ed or made its own copies.  A
 *     parent whose children are gone writes in place and pays nothing.
 *
 * Chunks that code can write directly (WRITABLE areas, or PRMEM_ENFORCE=0)
 * and memfd_secret chunks are copied in the child at fork() as before
 * (fork.c).  Sealed chunks never change and stay shared.
 *
 * Sits above areas.c (uses its helpers), below seal.c, rare.c, the
 * allocator and fork.c, which call it with the pool lock held.  No Python
 * API here: prmem_chunk_unshare may run without the GIL.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "prmem.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>


typedef struct {
    int from_fd, to_fd;
} copy_target;

/* Copy [from, to) of the chunk's file into the new file, file to file: the
 * mapping may be PROT_NONE (a no-access pool) and is not touched. */
static int
copy_range(void *ctx, off_t from, off_t to)
{
    const copy_target *t = ctx;
    while (from < to) {
        loff_t in = from, out = from;
        ssize_t w = copy_file_range(t->from_fd, &in, t->to_fd, &out, (size_t)(to - from), 0);
        if (w < 0 && (errno == EXDEV || errno == EINVAL || errno == ENOSYS ||
                      errno == EOPNOTSUPP)) {
            /* no in-kernel copy between these files: through a buffer */
            char buf[16384];
            size_t len = (size_t)(to - from) < sizeof(buf) ? (size_t)(to - from) : sizeof(buf);
            w = pread(t->from_fd, buf, len, from);
            if (w > 0 && pwrite(t->to_fd, buf, (size_t)w, from) != w)
                w = -1;
        }
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (w == 0) {
            errno = EIO;
            return -1;
        }
        from += w;
    }
    return 0;
}

/* Copy what chunk ch holds into fd.  Only ranges with data are copied
 * (SEEK_DATA), so sparse areas stay sparse; memfd_secret files cannot be
 * read that way and are copied through the mapping, which must be
 * readable. */
PRMEM_INTERNAL int
prmem_copy_chunk_contents(const prmem_chunk *ch, int fd)
{
    if (ch->kind == PRMEM_BACKING_SECRET) {
        if (ch->used == 0)
            return 0;
        char *dst = mmap(NULL, ch->used, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (dst == MAP_FAILED)
            return -1;
        memcpy(dst, ch->base, ch->used); /* every used page is readable */
        munmap(dst, ch->used);
        return 0;
    }
    copy_target target = {ch->fd, fd};
    return prmem_for_each_data_range(ch->fd, (off_t)ch->used, copy_range, &target);
}

/* --------------------------------------------- who else maps our files */

/* Parent side: one pipe per fork() that left chunks shared; the read end
 * reports POLLHUP once no child holds the write end.  A leaf lock: taken
 * with a pool lock held (or in the fork handlers), never the other way. */
#define MAX_SHARERS 64
#define MAX_LINKS 16
static pthread_mutex_t sharers_lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
    int fd;
    unsigned long long gen;
} sharers[MAX_SHARERS];
static int nsharers;
static unsigned long long fork_gen;
/* Child side: write ends that tell our parent (and its parents) that we
 * still map their files; closed once nothing is shared with them. */
static int links[MAX_LINKS];
static int nlinks;
static size_t chunks_shared_with_parent;
/* The pipe of the fork() in progress, made by prmem_lazy_fork_prepare. */
static int fork_pipe[2] = {-1, -1};

/* Drop the pipes whose children are all gone.  sharers_lock held. */
static void
prune_sharers(void)
{
    struct pollfd pfd[MAX_SHARERS];
    for (int i = 0; i < nsharers; i++) {
        pfd[i].fd = sharers[i].fd;
        pfd[i].events = 0; /* POLLHUP and POLLERR are always reported */
        pfd[i].revents = 0;
    }
    if (nsharers == 0 || poll(pfd, (nfds_t)nsharers, 0) <= 0)
        return;
    int kept = 0;
    for (int i = 0; i < nsharers; i++) {
        if (pfd[i].revents & (POLLHUP | POLLERR | POLLNVAL))
            close(sharers[i].fd);
        else
            sharers[kept++] = sharers[i];
    }
    nsharers = kept;
}

/* Does a child forked at or after generation gen still map our files? */
static int
children_share(unsigned long long gen)
{
    pthread_mutex_lock(&sharers_lock);
    prune_sharers();
    int alive = 0;
    for (int i = 0; i < nsharers; i++)
        if (sharers[i].gen >= gen)
            alive = 1;
    pthread_mutex_unlock(&sharers_lock);
    return alive;
}

/* The child no longer maps chunk ch of its parent's files. */
static void
forget_parent_chunk(const prmem_chunk *ch)
{
    if (!ch->shared_with_parent)
        return;
    META_SET(ch->shared_with_parent, 0);
    pthread_mutex_lock(&sharers_lock);
    if (chunks_shared_with_parent > 0 && --chunks_shared_with_parent == 0) {
        for (int i = 0; i < nlinks; i++)
            close(links[i]);
        nlinks = 0;
    }
    pthread_mutex_unlock(&sharers_lock);
}

/* Does some other process map the file of chunk ch (and might it write
 * there or see our writes)?  Clears the marks that no longer hold. */
static int
chunk_still_shared(const prmem_chunk *ch)
{
    if (ch->shared_gen != 0 && !children_share(ch->shared_gen))
        META_SET(ch->shared_gen, 0ULL);
    return ch->shared_gen != 0 || ch->shared_with_parent;
}

/* ------------------------------------------------------ the copy itself */

/* Chunk ch now lives in the new file fd, mapped in place of the old one:
 * record its identity (what verify() and the descriptor checks compare
 * with), close the old descriptor and keep fd.  Used by copy_away() here
 * and by fork.c's eager copy in the child. */
PRMEM_INTERNAL void
prmem_chunk_adopt_fd(const prmem_chunk *ch, int fd)
{
    dev_t dev;
    ino_t ino;
    int errsave = errno;
    /* checked again: a copy can take long, and a number replaced meanwhile
     * is someone else's, not to be closed */
    int old_is_ours = prmem_check_backing(NULL, ch, NULL) == 0;
    if (prmem_fd_identity(fd, &dev, &ino) == 0) {
        META_SET(ch->dev, dev);
        META_SET(ch->ino, ino);
    }
    if (old_is_ours)
        close(ch->fd);
    META_SET(ch->fd, fd);
    errno = errsave;
}

/*
 * Give this process its own copy of chunk ci: a new file with the same
 * contents, mapped over the old one at the same address.  Other threads
 * may be reading the chunk: the copy is mapped read-only elsewhere first
 * and moved over the used part in one mremap(), so every read sees the
 * same bytes throughout.  On failure nothing has changed.
 */
static int
copy_away(PoolObject *pool, size_t ci, prmem_error *e)
{
    const prmem_chunk *ch = &pool->m->chunks[ci];
    /* the copy reads the file the chunk names: it must still be the one
     * recorded at creation */
    if (ch->fd >= 0 && prmem_check_backing(pool, ch, e) < 0)
        return -1;
    const char *what = "memfd_create";
    int fd = prmem_new_backing(pool, ch->kind);
    if (fd < 0)
        goto fail;
    what = "ftruncate";
    if (ftruncate(fd, (off_t)ch->size) < 0)
        goto fail;
    what = "pwrite";
    if (prmem_copy_chunk_contents(ch, fd) < 0)
        goto fail;
    if (ch->used > 0) {
        what = "mmap";
        int prot = prmem_protected_prot(pool);
        char *copy = mmap(NULL, ch->used, prot, MAP_SHARED | MAP_NORESERVE, fd, 0);
        if (copy == MAP_FAILED)
            goto fail;
        prmem_advise(pool, ch, copy, ch->used);
        /* not populated: readers fault the pages in (see seal_memfd) */
        what = "mremap";
        if (mremap(copy, ch->used, ch->used, MREMAP_MAYMOVE | MREMAP_FIXED, ch->base) ==
            MAP_FAILED) {
            int err = errno;
            munmap(copy, ch->used);
            errno = err;
            goto fail;
        }
        if (pool->m->mlock_areas)
            mlock(ch->base, ch->used);
    }
    /* The unused tail: nobody reads it, so a plain MAP_FIXED will do. */
    if (ch->size > ch->used &&
        mmap(ch->base + ch->used, ch->size - ch->used, PROT_NONE,
             MAP_SHARED | MAP_FIXED | MAP_NORESERVE, fd, (off_t)ch->used) == MAP_FAILED) {
        /* the old file stays mapped there, PROT_NONE and never opened up
         * again while the chunk is shared: harmless, but say it */
        what = "mmap";
        goto fail_mapped;
    }
    if (pool->m->dontdump && !pool->m->noaccess && ch->size > ch->used)
        madvise(ch->base + ch->used, ch->size - ch->used, MADV_DONTDUMP);
    prmem_chunk_adopt_fd(ch, fd);
    return 0;
fail_mapped:
    /* the used part is the copy now; keep it and its descriptor */
    {
        int err = errno;
        prmem_chunk_adopt_fd(ch, fd);
        return prmem_fail_os(e, what, err);
    }
fail:
    {
        int err = errno ? errno : EIO;
        if (fd >= 0)
            close(fd);
        return prmem_fail_errno(e, err,
                                "prmem pool '%.200s': could not make a private copy of "
                                "memory shared with a fork()ed process (%s: %s); "
                                "nothing was written",
                                pool->cname, what, strerror(err));
    }
}

PRMEM_INTERNAL int
prmem_chunk_unshare(PoolObject *pool, size_t ci, prmem_error *e)
{
    const prmem_chunk *ch = &pool->m->chunks[ci];
    if (!prmem_chunk_is_shared(ch) || !chunk_still_shared(ch))
        return 0;
    if (copy_away(pool, ci, e) < 0)
        return -1;
    META_SET(ch->shared_gen, 0ULL);
    forget_parent_chunk(ch);
    return 0;
}

PRMEM_INTERNAL void
prmem_pool_unshare_for_release(PoolObject *pool)
{
    if (prmem_meta_frozen())
        return; /* nothing can be recorded: prmem_pool_release() keeps the
                 * data of every chunk still marked shared */
    for (size_t ci = 0; ci < pool->m->nchunks; ci++) {
        const prmem_chunk *ch = &pool->m->chunks[ci];
        if (!prmem_chunk_is_shared(ch))
            continue;
        /* Released without a copy; only zeroed (hole punched) if no other
         * process maps the file: keep_data tells prmem_pool_release. */
        META_SET(ch->keep_data, chunk_still_shared(ch));
        META_SET(ch->shared_gen, 0ULL);
        forget_parent_chunk(ch);
    }
}

/* ---------------------------------------------------------- fork hooks */

PRMEM_INTERNAL int
prmem_chunk_can_stay_shared(const PoolObject *pool, size_t ci)
{
    const prmem_chunk *ch = &pool->m->chunks[ci];
    if (!prmem_enforce || ch->sealed || ch->fd < 0 || ch->kind == PRMEM_BACKING_SECRET)
        return 0;
    for (size_t i = 0; i < pool->m->nareas; i++)
        if (pool->m->areas[i].chunk == ci && pool->m->areas[i].state == PRMEM_WRITABLE)
            return 0;
    return 1;
}

/* The fork() hooks, called by fork.c with the fork registry and every pool
 * locked.  prepare() takes sharers_lock, which the parent() or child() hook
 * releases, and says whether this fork can leave chunks shared (it needs a
 * pipe and room to track it); otherwise the child copies everything. */
PRMEM_INTERNAL int
prmem_lazy_fork_prepare(int wanted)
{
    pthread_mutex_lock(&sharers_lock);
    prune_sharers();
    if (wanted && nsharers < MAX_SHARERS && nlinks < MAX_LINKS && pipe2(fork_pipe, O_CLOEXEC) == 0)
        return 1;
    fork_pipe[0] = fork_pipe[1] = -1;
    return 0;
}

PRMEM_INTERNAL unsigned long long
prmem_lazy_fork_parent(int lazy)
{
    unsigned long long gen = 0;
    if (lazy) {
        close(fork_pipe[1]);
        sharers[nsharers].fd = fork_pipe[0];
        sharers[nsharers].gen = gen = ++fork_gen;
        nsharers++;
        fork_pipe[0] = fork_pipe[1] = -1;
    }
    pthread_mutex_unlock(&sharers_lock);
    return gen;
}

PRMEM_INTERNAL void
prmem_lazy_fork_child(int lazy, size_t nshared)
{
    /* Our parent's pipes for our siblings are not ours to watch. */
    for (int i = 0; i < nsharers; i++)
        close(sharers[i].fd);
    nsharers = 0;
    if (lazy)
        close(fork_pipe[0]);
    /* Links we inherited still matter while we share anything: the files
     * we share with our parent may be its parent's too. */
    chunks_shared_with_parent = nshared;
    if (lazy && nshared > 0)
        links[nlinks++] = fork_pipe[1];
    else {
        if (lazy)
            close(fork_pipe[1]);
        for (int i = 0; i < nlinks; i++)
            close(links[i]);
        nlinks = 0;
    }
    fork_pipe[0] = fork_pipe[1] = -1;
    pthread_mutex_unlock(&sharers_lock);
}
