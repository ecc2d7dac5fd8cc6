/* What rlm's two C extensions (rlm.core.conflicts._kernels, rlm.core.merge._kernels) share: float bit views,
 * the pread loop that fills one input's buffer, and the buffer-length check of their arguments. Included by
 * both sources ("../_kernels_io.h"); everything is static, so each module keeps its own copy. */
#ifndef RLM_KERNELS_IO_H
#define RLM_KERNELS_IO_H

#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Read exactly ``want`` bytes at ``at`` of ``fd`` into ``dst`` (retrying short reads and EINTR); returns 0,
 * the errno of a failed read, or -1 when the file ends first. Called without the GIL. */
static int pread_full(int fd, char *dst, size_t want, off_t at) {
    size_t done = 0;
    while (done < want) {
        ssize_t got = pread(fd, dst + done, want - done, at + (off_t)done);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return got < 0 ? errno : -1;
        done += (size_t)got;
    }
    return 0;
}

/* -1 with a ValueError naming ``what`` when buffer ``b`` is shorter than ``nbytes``; else 0. */
static int need_len(Py_buffer *b, Py_ssize_t nbytes, const char *what) {
    if (b->len < nbytes) {
        PyErr_Format(PyExc_ValueError, "%s has %zd bytes, at least %zd needed", what, b->len, nbytes);
        return -1;
    }
    return 0;
}

#endif
