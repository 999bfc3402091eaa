/*
 * Writes through a pool's backing files, on the bottom floor with areas.c:
 * rare writes (pwrite(), or a short-lived alias for memfd_secret files),
 * the descriptor identity check made before each of them, and zeroing a
 * chunk's data before it is released.  Never through a writable mapping of
 * the pool's own range.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "prmem.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* The seals on a pool's file that prmem did not add (before sealing, prmem
 * adds none), for the message when a write or a seal is refused. */
static int
fail_foreign_seals(PoolObject *pool, prmem_error *e, const prmem_chunk *ch, const char *what,
                   int err)
{
    int seals = fcntl(ch->fd, F_GET_SEALS);
    return prmem_fail(e, pool->mstate->ProtectionError,
                      "prmem pool '%.200s': %s was refused (%s) because code outside prmem "
                      "added seals to the pool's memory file (F_GET_SEALS = %#x); prmem "
                      "cannot change this memory any more: rebuild the data in a new pool",
                      pool->cname, what, strerror(err), seals < 0 ? 0 : seals);
}

/*
 * memfd_secret() files have no write(): a rare write maps the touched pages
 * writable at a second, fresh address for the duration of one copy, then
 * unmaps them.  The pool's own mapping stays read-only throughout; the
 * window is that other threads could write through the alias while it
 * exists, if they knew its address (documented in docs/threat-model.md).
 */
static int
secret_write(PoolObject *pool, const prmem_chunk *ch, off_t off, const void *src, size_t n,
             int fill_byte, prmem_error *e)
{
    off_t first = off & ~(off_t)(prmem_page_size - 1);
    size_t len = prmem_round_up_pages((size_t)(off - first) + n);
    char *alias = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, ch->fd, first);
    if (alias == MAP_FAILED) {
        int err = errno;
        /* the alias is locked memory too: charged against RLIMIT_MEMLOCK */
        if (err == EAGAIN || err == ENOMEM)
            return prmem_fail_memlock(pool, e, "a rare write to secret memory", len, err);
        return prmem_fail_os(e, "mmap (secret rare write)", err);
    }
    if (src != NULL)
        memcpy(alias + (off - first), src, n);
    else
        memset(alias + (off - first), fill_byte, n);
    munmap(alias, len);
    return 0;
}

/*
 * Write n bytes at dst through the area's backing file (pwrite), never
 * through a writable mapping: the data stays write-protected in every thread
 * while the write happens, and readers see the new bytes at once through
 * their read-only shared mapping.  With src == NULL, writes fill_byte n
 * times.  Writing nothing is a no-op for every backing.
 */
PRMEM_INTERNAL int
prmem_file_write(PoolObject *pool, const prmem_area *area, char *dst, const void *src,
                 size_t n, int fill_byte, prmem_error *e)
{
    if (area->chunk >= pool->m->nchunks)
        return prmem_fail(e, pool->mstate->ProtectionError,
                          "prmem pool '%.200s': an area names no chunk of the pool", pool->cname);
    const prmem_chunk *ch = &pool->m->chunks[area->chunk];
    if (ch->sealed || ch->fd < 0)
        return prmem_fail(e, pool->mstate->ProtectionError,
                          "prmem pool '%.200s': memory is sealed read-only", pool->cname);
    /* The target lies inside the area and the area inside its chunk
     * (protected tables: the caller checked the allocation against them);
     * checked again here for every caller, in plain memory. */
    if (dst < area->start || n > area->size || (size_t)(dst - area->start) > area->size - n ||
        area->start < ch->base || (size_t)(area->start - ch->base) + area->size > ch->used)
        return prmem_fail(e, pool->mstate->ProtectionError,
                          "prmem pool '%.200s': a rare write outside the pool's areas was "
                          "refused", pool->cname);
    /* The descriptor is still the file recorded at creation, checked before
     * every write whatever its size: a descriptor number that was closed
     * and reused, or replaced with dup2(), would otherwise send the bytes
     * into someone else's file (docs/design.md gives the cost). */
    if (prmem_check_backing(pool, ch, e) < 0)
        return -1;
    if (prmem_chunk_is_shared(ch)) /* the caller must prmem_chunk_unshare() first */
        return prmem_fail(e, pool->mstate->PrmemError,
                          "prmem pool '%.200s': internal error: a write to memory still "
                          "shared with a fork()ed process was refused", pool->cname);
    if (n == 0)
        return 0;
    /* A source that overlaps the destination (a view of the same memory)
     * must be staged first: the kernel copies into the page forwards, like
     * memcpy, and so would a copy through the secret alias. */
    if (src != NULL && (const char *)src < dst + n && dst < (const char *)src + n) {
        void *staged = PyMem_RawMalloc(n);
        if (staged == NULL)
            return prmem_fail(e, PyExc_MemoryError,
                              "prmem: no memory to stage an overlapping rare write");
        memcpy(staged, src, n);
        int rc = prmem_file_write(pool, area, dst, staged, n, fill_byte, e);
        PyMem_RawFree(staged);
        return rc;
    }
    off_t off = (off_t)(dst - ch->base);
    if (ch->kind == PRMEM_BACKING_SECRET)
        return secret_write(pool, ch, off, src, n, fill_byte, e);
    unsigned char fill[4096];
    if (src == NULL)
        memset(fill, fill_byte, sizeof(fill));
    while (n > 0) {
        size_t len = n;
        const void *from = src;
        if (src == NULL && len > sizeof(fill))
            len = sizeof(fill);
        if (src == NULL)
            from = fill;
        ssize_t w = pwrite(ch->fd, from, len, off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EPERM)
                return fail_foreign_seals(pool, e, ch, "a rare write", errno);
            return prmem_fail_os(e, "pwrite", errno);
        }
        if (w == 0)
            return prmem_fail_os(e, "pwrite", EIO);
        n -= (size_t)w;
        off += w;
        if (src != NULL)
            src = (const char *)src + w;
    }
    return 0;
}

/* The descriptor chunk ch names is still the file recorded for it at
 * creation (st_dev, st_ino): 0, or -1 with ProtectionError in *e (if e). */
PRMEM_INTERNAL int
prmem_check_backing(PoolObject *pool, const prmem_chunk *ch, prmem_error *e)
{
    dev_t dev;
    ino_t ino;
    int fd = ch->fd;
    if (fd >= 0 && prmem_fd_identity(fd, &dev, &ino) == 0 && dev == ch->dev && ino == ch->ino)
        return 0;
    if (e == NULL)
        return -1;
    return prmem_fail(e, pool->mstate->ProtectionError,
                      "prmem pool '%.200s': descriptor %d is no longer the pool's memory file "
                      "(recorded device %lu, inode %lu); something closed or replaced it "
                      "(dup2?), and prmem refuses to write through it",
                      pool->cname, fd, (unsigned long)ch->dev, (unsigned long)ch->ino);
}

/* Call fn(ctx, from, to) for each range of [0, end) of the file that holds
 * data (SEEK_DATA/SEEK_HOLE skip never-touched ranges, so a huge sparse
 * area costs nothing).  Stops at the first fn() that returns -1. */
PRMEM_INTERNAL int
prmem_for_each_data_range(int fd, off_t end, int (*fn)(void *, off_t, off_t), void *ctx)
{
    off_t off = 0;
    while (off < end) {
        off_t data = lseek(fd, off, SEEK_DATA);
        if (data < 0 && errno != ENXIO)
            return -1; /* not "no more data": the copy or zeroing failed */
        if (data < 0 || data >= end)
            break;
        off_t hole = lseek(fd, data, SEEK_HOLE);
        if (hole < 0 || hole > end)
            hole = end;
        if (fn(ctx, data, hole) < 0)
            return -1;
        off = hole;
    }
    return 0;
}

static int
write_zeros(void *ctx, off_t from, off_t to)
{
    static const char zeros[4096];
    int fd = *(int *)ctx;
    while (from < to) {
        size_t len = (size_t)(to - from) < sizeof(zeros) ? (size_t)(to - from) : sizeof(zeros);
        ssize_t w = pwrite(fd, zeros, len, from);
        if (w <= 0) {
            if (w < 0 && errno == EINTR)
                continue;
            return -1;
        }
        from += w;
    }
    return 0;
}

/* Make the data of an unsealed chunk unrecoverable before it is released:
 * punching a hole frees the pages and makes every later read of the file
 * (through a descriptor someone kept) return zeros, in one call; the kernel
 * zeroes freed pages before anyone else gets them.  Where the file cannot
 * punch holes, its pages are overwritten with zeros instead. */
PRMEM_INTERNAL void
prmem_zero_chunk_data(const prmem_chunk *ch)
{
    if (ch->used == 0)
        return;
    if (fallocate(ch->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, (off_t)ch->used) == 0)
        return;
    int fd = ch->fd;
    prmem_for_each_data_range(fd, (off_t)ch->used, write_zeros, &fd);
}
