/* Fused kernels of the merge engine's fast path (rlm.core.merge.fused) for bf16 and float32 safetensors inputs.
 *
 * Each call covers elements [start, start + count) of one tensor in the base and M models. It reads the stored
 * values itself, with positioned reads (pread) of READ elements per input at a time into small buffers that
 * stay in cache (nothing grows with the tensor or the model), forms the task vectors exactly as the torch
 * engine does (tau = float32(theta_m) - float32(theta_base), one float32 subtraction) and works sub-block by
 * sub-block (SUB elements):
 *
 *   hist       per model, the histogram of the top 16 bits of the float32 pattern of |tau| (32768 bins)
 *   hist_collect  hist, and the bits and flat indices of the entries in a window of bins (where the cut is
 *              expected), so that the cut is usually found without another pass
 *   low_hist   per model, the histogram of the low 16 bits of |tau| among entries in one top-16-bit bin
 *   find_tie   per model, the flat index of the need-th entry whose |tau| has a given bit pattern
 *   l1         per model, sum |tau| and sum |tau * keep| in float64 (the L1 rescale)
 *   merge      the merged values, written as bfloat16 (round to nearest even, as torch) or float32
 *
 * A keep mask is a magnitude cut (|tau| > thr, or == thr at a flat index <= last) or a DARE draw: torch's CPU
 * generator is the Mersenne Twister mt19937 seeded with the low 32 bits of its seed, torch.rand(float32) takes
 * the low 24 bits of each 32-bit draw times 2^-24, and `rand < density` compares in float32; `mt_seed` and
 * the DARE masks reproduce that stream (checked against torch in tests/merge/test_merge_fused.py).
 *
 * The float arithmetic follows the torch engine's operation by operation (float32 products and sums in model
 * order from +0, the sign election, the divisions), so the results are bit-identical; this file must be built
 * without contraction of a*b+c into fused multiply-adds (-ffp-contract=off, setup.py). Every call checks its
 * buffers' lengths and raises ValueError rather than touching memory out of bounds, OSError / EOFError when a
 * read fails. The GIL is released while computing, so several tensors run on several threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "../_kernels_io.h"

#define SUB 2048
#define READ (16 * SUB) /* elements read per input at a time */
#define MAX_MODELS 64
#define ABS_MASK 0x7FFFFFFFu
#define EXP_MASK 0x7F800000u
#define SIGN_MASK 0x80000000u
#define MT_N 624
#define MT_M 397
#define STATE_WORDS 626 /* mt19937 state, the next index, a "draws" flag (density < 1) */

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define HOT __attribute__((target_clones("avx2", "default")))
#else
#define HOT
#endif


/* ---------------------------------------------------------------------------------------------------- */
/* inputs                                                                                                 */
/* ---------------------------------------------------------------------------------------------------- */

typedef struct {
    Py_ssize_t n;            /* inputs: the base, then M models */
    int fd[MAX_MODELS + 1];
    int64_t offset[MAX_MODELS + 1];
    int width[MAX_MODELS + 1]; /* bytes per stored element: 2 (bf16) or 4 (float32) */
    char *data;              /* n buffers of READ elements of 4 bytes */
    int err;
    Py_ssize_t failed;
} Inputs;

static int get_inputs(PyObject *fds, Py_buffer *offsets, Py_buffer *widths, Inputs *in) {
    in->data = NULL;
    in->err = 0;
    in->failed = -1;
    if (!PyTuple_Check(fds) || PyTuple_GET_SIZE(fds) < 2 || PyTuple_GET_SIZE(fds) > MAX_MODELS + 1) {
        PyErr_SetString(PyExc_ValueError, "fds must be a tuple of 2 to 65 file descriptors (base first)");
        return -1;
    }
    in->n = PyTuple_GET_SIZE(fds);
    if (offsets->len != 8 * in->n || widths->len != 4 * in->n) {
        PyErr_SetString(PyExc_ValueError, "offsets (int64) and widths (int32) need one entry per input");
        return -1;
    }
    for (Py_ssize_t i = 0; i < in->n; i++) {
        long fd = PyLong_AsLong(PyTuple_GET_ITEM(fds, i));
        if (fd == -1 && PyErr_Occurred()) return -1;
        if (fd < 0 || fd > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "fds[%zd] = %ld is not a file descriptor", i, fd);
            return -1;
        }
        in->fd[i] = (int)fd;
        in->offset[i] = ((const int64_t *)offsets->buf)[i];
        in->width[i] = ((const int32_t *)widths->buf)[i];
        if (in->offset[i] < 0 || (in->width[i] != 2 && in->width[i] != 4)) {
            PyErr_Format(PyExc_ValueError, "input %zd: negative offset or width not 2 or 4", i);
            return -1;
        }
    }
    in->data = PyMem_RawMalloc((size_t)4 * READ * in->n);
    if (!in->data) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static int read_inputs(Inputs *in, int64_t start, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < in->n; i++) {
        int err = pread_full(in->fd[i], in->data + (size_t)4 * READ * i, (size_t)in->width[i] * (size_t)count,
                             (off_t)(in->offset[i] + in->width[i] * start));
        if (err) {
            in->err = err;
            in->failed = i;
            return -1;
        }
    }
    return 0;
}

static PyObject *read_error(Inputs *in) {
    if (in->err > 0) {
        errno = in->err;
        PyErr_SetFromErrno(PyExc_OSError);
    } else
        PyErr_Format(PyExc_EOFError, "input %zd ends before the tensor's data", in->failed);
    return NULL;
}

/* Values s..s+w of input i as float32. */
HOT static void load_f32(const Inputs *in, Py_ssize_t i, Py_ssize_t s, Py_ssize_t w, float *dst) {
    const char *src = in->data + (size_t)4 * READ * i;
    if (in->width[i] == 4) {
        memcpy(dst, src + 4 * s, 4 * (size_t)w);
        return;
    }
    const uint16_t *x = (const uint16_t *)src + s;
    for (Py_ssize_t j = 0; j < w; j++) {
        uint32_t u = (uint32_t)x[j] << 16;
        memcpy(dst + j, &u, 4);
    }
}

/* tau = theta - base for one model, and whether any tau is not finite. */
HOT static int form_tau(const float *theta, const float *base, Py_ssize_t w, float *tau) {
    uint32_t bad = 0;
    for (Py_ssize_t j = 0; j < w; j++) {
        float t = theta[j] - base[j];
        tau[j] = t;
        bad |= (uint32_t)((f32_bits(t) & EXP_MASK) == EXP_MASK);
    }
    return (int)bad;
}

static int check_range(int64_t start, Py_ssize_t count) {
    if (start < 0 || count < 0) {
        PyErr_SetString(PyExc_ValueError, "start and count must be non-negative");
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------- */
/* mt19937 (torch's CPU generator) and DARE masks                                                          */
/* ---------------------------------------------------------------------------------------------------- */

static void mt_init(uint32_t *st, uint64_t seed) {
    st[0] = (uint32_t)(seed & 0xFFFFFFFFu);
    for (uint32_t j = 1; j < MT_N; j++) st[j] = 1812433253u * (st[j - 1] ^ (st[j - 1] >> 30)) + j;
    st[MT_N] = MT_N;
}

static inline uint32_t mt_mix(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t y = (a & 0x80000000u) | (b & 0x7FFFFFFFu);
    return c ^ (y >> 1) ^ ((y & 1u) ? 0x9908B0DFu : 0u);
}

HOT static void mt_twist(uint32_t *st) {
    int i = 0;
    for (; i < MT_N - MT_M; i++) st[i] = mt_mix(st[i], st[i + 1], st[i + MT_M]);
    for (; i < MT_N - 1; i++) st[i] = mt_mix(st[i], st[i + 1], st[i + MT_M - MT_N]);
    st[MT_N - 1] = mt_mix(st[MT_N - 1], st[0], st[MT_M - 1]);
    st[MT_N] = 0;
}

/* The next w draws of the generator, as keep masks (all ones when rand < density in float32). */
HOT static void dare_keep(uint32_t *st, float density, Py_ssize_t w, uint32_t *keep) {
    Py_ssize_t j = 0;
    while (j < w) {
        if (st[MT_N] >= MT_N) mt_twist(st);
        uint32_t idx = st[MT_N];
        Py_ssize_t take = (Py_ssize_t)(MT_N - idx);
        if (take > w - j) take = w - j;
        const uint32_t *src = st + idx;
        for (Py_ssize_t q = 0; q < take; q++) {
            uint32_t y = src[q];
            y ^= y >> 11;
            y ^= (y << 7) & 0x9D2C5680u;
            y ^= (y << 15) & 0xEFC60000u;
            y ^= y >> 18;
            keep[j + q] = 0u - (uint32_t)(((float)(y & 0xFFFFFFu) * 0x1p-24f) < density);
        }
        st[MT_N] = idx + (uint32_t)take;
        j += take;
    }
}

/* Keep flags of one model's sub-block: a magnitude cut (mode 1) or a DARE draw (mode 2); mode 0 keeps all. */
typedef struct {
    int mode;
    const int64_t *thr;  /* mode 1: |tau| bit pattern of the cut, per model */
    const int64_t *last; /* mode 1: the last flat index kept among entries equal to the cut */
    uint32_t *states;    /* mode 2: STATE_WORDS per model */
    const float *density;
} Mask;

static int get_mask(int mode, Py_buffer *thr, Py_buffer *last, Py_buffer *states, Py_buffer *density,
                    Py_ssize_t m, Mask *mask) {
    mask->mode = mode;
    mask->thr = thr->buf;
    mask->last = last->buf;
    mask->states = states->buf;
    mask->density = density->buf;
    if (mode == 1) return need_len(thr, 8 * m, "thr") || need_len(last, 8 * m, "last") ? -1 : 0;
    if (mode == 2) return need_len(states, 4 * STATE_WORDS * m, "states") || need_len(density, 4 * m, "density") ? -1 : 0;
    if (mode != 0) {
        PyErr_SetString(PyExc_ValueError, "mask mode must be 0 (none), 1 (magnitude cut) or 2 (DARE)");
        return -1;
    }
    return 0;
}

HOT static void keep_flags(const Mask *mask, Py_ssize_t k, const float *tau, int64_t first, Py_ssize_t w,
                           uint32_t *keep) {
    if (mask->mode == 1) {
        uint32_t thr = (uint32_t)mask->thr[k];
        int64_t span = mask->last[k] - first; /* entries j <= span of this sub-block are at or before last */
        int32_t upto = span < -1 ? -1 : span > (int64_t)w ? (int32_t)w : (int32_t)span;
        for (int32_t j = 0; j < (int32_t)w; j++) {
            uint32_t a = f32_bits(tau[j]) & ABS_MASK;
            keep[j] = 0u - (uint32_t)((a > thr) | ((a == thr) & (j <= upto)));
        }
    } else if (mask->mode == 2 && mask->states[STATE_WORDS * k + MT_N + 1]) {
        dare_keep(mask->states + STATE_WORDS * k, mask->density[k], w, keep);
    } else {
        memset(keep, 0xFF, 4 * (size_t)w);
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* the passes                                                                                             */
/* ---------------------------------------------------------------------------------------------------- */

/* Scratch of one call: the base and every model's tau for one sub-block, keep flags. */
typedef struct {
    float base[SUB];
    float tau[MAX_MODELS][SUB];
    float s[SUB], d[SUB]; /* the sign election's sums */
    uint32_t keep[SUB]; /* keep masks: all ones or 0 */
} Scratch;

/* Read the chunk at c (elements) and form base and tau of sub-block s..s+w; returns the non-finite flag. */
static int sub_block(const Inputs *in, Py_ssize_t s, Py_ssize_t w, Scratch *sc, float *tmp) {
    int bad = 0;
    load_f32(in, 0, s, w, sc->base);
    for (Py_ssize_t k = 1; k < in->n; k++) {
        load_f32(in, k, s, w, tmp);
        bad |= form_tau(tmp, sc->base, w, sc->tau[k - 1]);
    }
    return bad;
}

typedef struct {
    int kind; /* 0 hist, 1 low_hist, 2 find_tie, 3 l1, 4 hist + collect */
    int32_t *hist;
    const int32_t *wlo, *whi; /* kind 4: the window of top-16-bit bins whose entries are collected */
    Py_ssize_t cap;
    uint32_t *cand_bits;
    int32_t *cand_idx;
    int64_t *ncand;
    const int32_t *hi;
    const int64_t *value, *need;
    int64_t *last, *seen;
    double *sums;
    Mask mask;
} Scan;

HOT static void scan_hist(const float *tau, Py_ssize_t w, int32_t *hist) {
    for (Py_ssize_t j = 0; j < w; j++) hist[(f32_bits(tau[j]) & ABS_MASK) >> 16]++;
}

/* The histogram, and the |tau| bits and flat index of the entries in bins wlo..whi (in index order, up to cap;
 * *n counts them all). */
HOT static void scan_collect(const float *tau, Py_ssize_t w, int32_t *hist, uint32_t wlo, uint32_t whi,
                             int64_t first, Py_ssize_t cap, uint32_t *bits, int32_t *idx, int64_t *n) {
    int64_t c = *n;
    for (Py_ssize_t j = 0; j < w; j++) {
        uint32_t a = f32_bits(tau[j]) & ABS_MASK, b = a >> 16;
        hist[b]++;
        if (b - wlo <= whi - wlo) {
            if (c < cap) {
                bits[c] = a;
                idx[c] = (int32_t)(first + j);
            }
            c++;
        }
    }
    *n = c;
}

HOT static void scan_low(const float *tau, Py_ssize_t w, uint32_t hi, int32_t *low) {
    for (Py_ssize_t j = 0; j < w; j++) {
        uint32_t a = f32_bits(tau[j]) & ABS_MASK;
        if ((a >> 16) == hi) low[a & 0xFFFFu]++;
    }
}

HOT static void scan_l1(const float *tau, const uint32_t *keep, Py_ssize_t w, double *before, double *after) {
    double b[8] = {0}, a[8] = {0}; /* 8 lanes: any order will do, the sums need only be accurate */
    Py_ssize_t j = 0;
    for (; j + 8 <= w; j += 8)
        for (int q = 0; q < 8; q++) {
            double v = (double)bits_f32(f32_bits(tau[j + q]) & ABS_MASK);
            b[q] += v;
            a[q] += (double)bits_f32(f32_bits(tau[j + q]) & ABS_MASK & keep[j + q]);
        }
    for (; j < w; j++) {
        double v = (double)bits_f32(f32_bits(tau[j]) & ABS_MASK);
        b[0] += v;
        a[0] += (double)bits_f32(f32_bits(tau[j]) & ABS_MASK & keep[j]);
    }
    *before = ((b[0] + b[1]) + (b[2] + b[3])) + ((b[4] + b[5]) + (b[6] + b[7]));
    *after = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* Neumaier-compensated add of x into (sum, comp). */
static inline void comp_add(double *sum, double *comp, double x) {
    double t = *sum + x;
    if ((*sum >= 0 ? *sum : -*sum) >= (x >= 0 ? x : -x))
        *comp += (*sum - t) + x;
    else
        *comp += (x - t) + *sum;
    *sum = t;
}

/* One scan over [start, start + count); returns 1 when a tau was not finite, 2 when every find_tie is done. */
static int run_scan(Inputs *in, int64_t start, Py_ssize_t count, Scan *sc_, Scratch *sc, float *tmp) {
    Py_ssize_t m = in->n - 1;
    int bad = 0;
    for (Py_ssize_t c = 0; c < count; c += READ) {
        Py_ssize_t len = count - c < READ ? count - c : READ;
        if (read_inputs(in, start + c, len) < 0) return -1;
        for (Py_ssize_t s = 0; s < len; s += SUB) {
            Py_ssize_t w = len - s < SUB ? len - s : SUB;
            int64_t first = start + c + s;
            bad |= sub_block(in, s, w, sc, tmp);
            int pending = 0;
            for (Py_ssize_t k = 0; k < m; k++) {
                const float *tau = sc->tau[k];
                if (sc_->kind == 0) {
                    scan_hist(tau, w, sc_->hist + (size_t)k * 32768);
                } else if (sc_->kind == 4) {
                    if (sc_->wlo[k] < 0)
                        scan_hist(tau, w, sc_->hist + (size_t)k * 32768);
                    else
                        scan_collect(tau, w, sc_->hist + (size_t)k * 32768, (uint32_t)sc_->wlo[k],
                                     (uint32_t)sc_->whi[k], first, sc_->cap, sc_->cand_bits + (size_t)k * sc_->cap,
                                     sc_->cand_idx + (size_t)k * sc_->cap, sc_->ncand + k);
                } else if (sc_->kind == 1) {
                    if (sc_->hi[k] >= 0) scan_low(tau, w, (uint32_t)sc_->hi[k], sc_->hist + (size_t)k * 65536);
                } else if (sc_->kind == 2) {
                    if (sc_->value[k] < 0 || sc_->last[k] >= 0) continue;
                    uint32_t v = (uint32_t)sc_->value[k];
                    for (Py_ssize_t j = 0; j < w; j++)
                        if ((f32_bits(tau[j]) & ABS_MASK) == v && ++sc_->seen[k] == sc_->need[k]) {
                            sc_->last[k] = first + j;
                            break;
                        }
                    pending |= sc_->last[k] < 0;
                } else {
                    double b, a;
                    keep_flags(&sc_->mask, k, tau, first, w, sc->keep);
                    scan_l1(tau, sc->keep, w, &b, &a);
                    comp_add(sc_->sums + 4 * k, sc_->sums + 4 * k + 1, b);
                    comp_add(sc_->sums + 4 * k + 2, sc_->sums + 4 * k + 3, a);
                }
            }
            if (sc_->kind == 2 && !pending) return bad | 2;
        }
    }
    return bad;
}

static PyObject *scan_call(PyObject *fds, Py_buffer *offsets, Py_buffer *widths, int64_t start, Py_ssize_t count,
                           Scan *scan) {
    Inputs in;
    if (check_range(start, count) < 0 || get_inputs(fds, offsets, widths, &in) < 0) return NULL;
    Scratch *sc = PyMem_RawMalloc(sizeof(Scratch));
    float *tmp = PyMem_RawMalloc(4 * SUB);
    int res = -1;
    if (sc && tmp) {
        Py_BEGIN_ALLOW_THREADS
        res = run_scan(&in, start, count, scan, sc, tmp);
        Py_END_ALLOW_THREADS
    }
    PyObject *out = NULL;
    if (!sc || !tmp)
        PyErr_NoMemory();
    else if (res < 0)
        read_error(&in);
    else
        out = PyLong_FromLong(res & 1);
    PyMem_RawFree(sc);
    PyMem_RawFree(tmp);
    PyMem_RawFree(in.data);
    return out;
}

#define SCAN_HEAD "Oy*y*Ln"

static PyObject *py_hist(PyObject *self, PyObject *args) {
    PyObject *fds;
    Py_buffer off, wid, hist;
    long long start;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, SCAN_HEAD "w*", &fds, &off, &wid, &start, &count, &hist)) return NULL;
    PyObject *out = NULL;
    Scan scan = {.kind = 0, .hist = hist.buf};
    Py_ssize_t m = PyTuple_Check(fds) ? PyTuple_GET_SIZE(fds) - 1 : 0;
    if (need_len(&hist, 4 * 32768 * m, "hist") == 0) out = scan_call(fds, &off, &wid, start, count, &scan);
    PyBuffer_Release(&off);
    PyBuffer_Release(&wid);
    PyBuffer_Release(&hist);
    return out;
}

static PyObject *py_hist_collect(PyObject *self, PyObject *args) {
    PyObject *fds;
    Py_buffer off, wid, hist, wlo, whi, bits, idx, ncand;
    long long start;
    Py_ssize_t count, cap;
    if (!PyArg_ParseTuple(args, SCAN_HEAD "w*y*y*nw*w*w*", &fds, &off, &wid, &start, &count, &hist, &wlo, &whi, &cap,
                          &bits, &idx, &ncand))
        return NULL;
    PyObject *out = NULL;
    Scan scan = {.kind = 4, .hist = hist.buf, .wlo = wlo.buf, .whi = whi.buf, .cap = cap, .cand_bits = bits.buf,
                 .cand_idx = idx.buf, .ncand = ncand.buf};
    Py_ssize_t m = PyTuple_Check(fds) ? PyTuple_GET_SIZE(fds) - 1 : 0;
    int ok = 1;
    if (cap < 0 || start + count > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "cap must be >= 0 and the tensor below 2^31 elements");
        ok = 0;
    }
    ok = ok && need_len(&hist, 4 * 32768 * m, "hist") == 0 &&
             need_len(&wlo, 4 * m, "wlo") == 0 && need_len(&whi, 4 * m, "whi") == 0 &&
             need_len(&bits, 4 * cap * m, "cand_bits") == 0 && need_len(&idx, 4 * cap * m, "cand_idx") == 0 &&
             need_len(&ncand, 8 * m, "ncand") == 0;
    for (Py_ssize_t k = 0; ok && k < m; k++)
        if (scan.wlo[k] > 32767 || scan.whi[k] > 32767 || (scan.wlo[k] >= 0 && scan.whi[k] < scan.wlo[k])) {
            PyErr_SetString(PyExc_ValueError, "windows must be bins wlo <= whi below 32768 (wlo < 0: none)");
            ok = 0;
        }
    if (ok) out = scan_call(fds, &off, &wid, start, count, &scan);
    Py_buffer *bufs[] = {&off, &wid, &hist, &wlo, &whi, &bits, &idx, &ncand};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) PyBuffer_Release(bufs[i]);
    return out;
}

/* The cut from collected candidates (|tau| bits and flat indices in index order) of the cut's top-16-bit bin hi,
 * the cut being the rank-th largest there: (bits of the cut, last flat index kept among entries equal to it,
 * or n - 1 when all of them are kept). */
static PyObject *py_cand_cut(PyObject *self, PyObject *args) {
    Py_buffer bits, idx;
    Py_ssize_t count, n;
    long hi;
    long long rank;
    if (!PyArg_ParseTuple(args, "y*y*nlLn", &bits, &idx, &count, &hi, &rank, &n)) return NULL;
    PyObject *out = NULL;
    int32_t *low = NULL;
    if (count < 0 || hi < 0 || hi > 32767 || rank < 1 || need_len(&bits, 4 * count, "bits") < 0 ||
        need_len(&idx, 4 * count, "idx") < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "count >= 0, 0 <= hi < 32768, rank >= 1");
        goto done;
    }
    low = PyMem_RawCalloc(65536, 4);
    if (!low) {
        PyErr_NoMemory();
        goto done;
    }
    const uint32_t *b = bits.buf;
    const int32_t *ix = idx.buf;
    uint32_t h = (uint32_t)hi;
    int64_t above = 0, need = 0, last = -1;
    long lo = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++)
        if ((b[i] >> 16) == h) low[b[i] & 0xFFFFu]++;
    for (long v = 65535; v >= 0; v--) {
        if (above + low[v] >= rank) {
            lo = v;
            need = rank - above;
            break;
        }
        above += low[v];
    }
    if (lo >= 0) {
        uint32_t value = (h << 16) | (uint32_t)lo;
        int64_t seen = 0;
        if (need == low[lo])
            last = (int64_t)n - 1;
        else
            for (Py_ssize_t i = 0; i < count; i++)
                if (b[i] == value && ++seen == need) {
                    last = ix[i];
                    break;
                }
    }
    Py_END_ALLOW_THREADS
    if (lo < 0 || last < 0)
        PyErr_SetString(PyExc_ValueError, "the candidates do not hold the cut");
    else
        out = Py_BuildValue("(lL)", (h << 16) | (uint32_t)lo, (long long)last);
done:
    PyMem_RawFree(low);
    PyBuffer_Release(&bits);
    PyBuffer_Release(&idx);
    return out;
}

static PyObject *py_low_hist(PyObject *self, PyObject *args) {
    PyObject *fds;
    Py_buffer off, wid, hi, low;
    long long start;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, SCAN_HEAD "y*w*", &fds, &off, &wid, &start, &count, &hi, &low)) return NULL;
    PyObject *out = NULL;
    Scan scan = {.kind = 1, .hist = low.buf, .hi = hi.buf};
    Py_ssize_t m = PyTuple_Check(fds) ? PyTuple_GET_SIZE(fds) - 1 : 0;
    int ok = need_len(&hi, 4 * m, "hi") == 0 && need_len(&low, 4 * 65536 * m, "low") == 0;
    for (Py_ssize_t k = 0; ok && k < m; k++)
        if (scan.hi[k] > 32767) {
            PyErr_SetString(PyExc_ValueError, "hi bins must be below 32768");
            ok = 0;
        }
    if (ok) out = scan_call(fds, &off, &wid, start, count, &scan);
    PyBuffer_Release(&off);
    PyBuffer_Release(&wid);
    PyBuffer_Release(&hi);
    PyBuffer_Release(&low);
    return out;
}

static PyObject *py_find_tie(PyObject *self, PyObject *args) {
    PyObject *fds;
    Py_buffer off, wid, value, needb, last, seen;
    long long start;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, SCAN_HEAD "y*y*w*w*", &fds, &off, &wid, &start, &count, &value, &needb, &last, &seen))
        return NULL;
    PyObject *out = NULL;
    Scan scan = {.kind = 2, .value = value.buf, .need = needb.buf, .last = last.buf, .seen = seen.buf};
    Py_ssize_t m = PyTuple_Check(fds) ? PyTuple_GET_SIZE(fds) - 1 : 0;
    if (need_len(&value, 8 * m, "value") == 0 && need_len(&needb, 8 * m, "need") == 0 &&
        need_len(&last, 8 * m, "last") == 0 && need_len(&seen, 8 * m, "seen") == 0)
        out = scan_call(fds, &off, &wid, start, count, &scan);
    PyBuffer_Release(&off);
    PyBuffer_Release(&wid);
    PyBuffer_Release(&value);
    PyBuffer_Release(&needb);
    PyBuffer_Release(&last);
    PyBuffer_Release(&seen);
    return out;
}

static PyObject *py_l1(PyObject *self, PyObject *args) {
    PyObject *fds;
    Py_buffer off, wid, thr, last, states, density, sums;
    long long start;
    Py_ssize_t count;
    int mode;
    if (!PyArg_ParseTuple(args, SCAN_HEAD "iy*y*w*y*w*", &fds, &off, &wid, &start, &count, &mode, &thr, &last, &states,
                          &density, &sums))
        return NULL;
    PyObject *out = NULL;
    Scan scan = {.kind = 3, .sums = sums.buf};
    Py_ssize_t m = PyTuple_Check(fds) ? PyTuple_GET_SIZE(fds) - 1 : 0;
    if (get_mask(mode, &thr, &last, &states, &density, m, &scan.mask) == 0 && need_len(&sums, 32 * m, "sums") == 0)
        out = scan_call(fds, &off, &wid, start, count, &scan);
    PyBuffer_Release(&off);
    PyBuffer_Release(&wid);
    PyBuffer_Release(&thr);
    PyBuffer_Release(&last);
    PyBuffer_Release(&states);
    PyBuffer_Release(&density);
    PyBuffer_Release(&sums);
    return out;
}

static PyObject *py_mt_seed(PyObject *self, PyObject *args) {
    Py_buffer st;
    unsigned long long seed;
    int draws;
    if (!PyArg_ParseTuple(args, "w*Kp", &st, &seed, &draws)) return NULL;
    PyObject *out = NULL;
    if (need_len(&st, 4 * STATE_WORDS, "state") == 0) {
        uint32_t *s = st.buf;
        mt_init(s, (uint64_t)seed);
        s[MT_N + 1] = (uint32_t)draws;
        out = Py_None;
        Py_INCREF(out);
    }
    PyBuffer_Release(&st);
    return out;
}

/* ---------------------------------------------------------------------------------------------------- */
/* merge                                                                                                  */
/* ---------------------------------------------------------------------------------------------------- */

typedef struct {
    Mask mask;
    const float *mults;   /* u_m = tau_m * mults[m] */
    const float *weights; /* the weights summed over agreeing models (elect, norm 1) */
    int elect;            /* TIES sign election */
    int norm;             /* 0 none, 1 divide by the agreeing weights (elect), 2 divide by div */
    float div, lam;
    int use_lam;
    int scaled_base; /* 1: base * total + sum (averaging without normalisation) */
    float total;
    int out_width;    /* 2 bf16, 4 float32 */
} MergeSpec;

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & ABS_MASK) > EXP_MASK) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Merged values of one sub-block into acc (float32); u holds each model's u_m in turn. */
HOT static void combine_sub(const MergeSpec *sp, Scratch *sc, Py_ssize_t m, Py_ssize_t w, int64_t first, float *acc,
                            float (*u)[SUB]) {
    for (Py_ssize_t k = 0; k < m; k++) {
        keep_flags(&sp->mask, k, sc->tau[k], first, w, sc->keep);
        float mult = sp->mults[k];
        for (Py_ssize_t j = 0; j < w; j++) /* v * keep: v, or 0 with v's sign */
            u[k][j] = bits_f32(f32_bits(sc->tau[k][j] * mult) & (sc->keep[j] | SIGN_MASK));
    }
    for (Py_ssize_t j = 0; j < w; j++) acc[j] = 0.0f;
    for (Py_ssize_t k = 0; k < m; k++)
        for (Py_ssize_t j = 0; j < w; j++) acc[j] = acc[j] + u[k][j];
    if (sp->elect) { /* gamma = sign of the sum (+ at 0); agreeing entries and weights summed in model order */
        float *s = sc->s, *d = sc->d;
        for (Py_ssize_t j = 0; j < w; j++) {
            s[j] = 0.0f;
            d[j] = 0.0f;
        }
        for (Py_ssize_t k = 0; k < m; k++) {
            const float *v = u[k];
            uint32_t wbits = f32_bits(sp->weights[k]);
            for (Py_ssize_t j = 0; j < w; j++) { /* branch-free: the signs are random */
                uint32_t pos = 0u - (uint32_t)(acc[j] >= 0.0f);
                uint32_t agree = (pos & (0u - (uint32_t)(v[j] > 0.0f))) | (~pos & (0u - (uint32_t)(v[j] < 0.0f)));
                s[j] = s[j] + bits_f32(f32_bits(v[j]) & (agree | SIGN_MASK)); /* v * agree */
                d[j] = d[j] + bits_f32(wbits & (agree | SIGN_MASK));          /* w * agree */
            }
        }
        if (sp->norm == 1)
            for (Py_ssize_t j = 0; j < w; j++) acc[j] = s[j] / (d[j] == 0.0f ? 1.0f : d[j]);
        else
            for (Py_ssize_t j = 0; j < w; j++) acc[j] = s[j];
    }
    if (sp->norm == 2)
        for (Py_ssize_t j = 0; j < w; j++) acc[j] = acc[j] / sp->div;
    if (sp->use_lam)
        for (Py_ssize_t j = 0; j < w; j++) acc[j] = acc[j] * sp->lam;
    if (sp->scaled_base)
        for (Py_ssize_t j = 0; j < w; j++) acc[j] = sc->base[j] * sp->total + acc[j];
    else
        for (Py_ssize_t j = 0; j < w; j++) acc[j] = acc[j] + sc->base[j];
}

/* Merge [start, start + count) into out; returns 1 (a tau not finite) | 2 (an output not finite), or -1. */
static int run_merge(Inputs *in, int64_t start, Py_ssize_t count, const MergeSpec *sp, Scratch *sc, float *tmp,
                     float (*u)[SUB], char *out) {
    Py_ssize_t m = in->n - 1;
    int bad = 0;
    uint32_t out_bad = 0;
    for (Py_ssize_t c = 0; c < count; c += READ) {
        Py_ssize_t len = count - c < READ ? count - c : READ;
        if (read_inputs(in, start + c, len) < 0) return -1;
        for (Py_ssize_t s = 0; s < len; s += SUB) {
            Py_ssize_t w = len - s < SUB ? len - s : SUB;
            bad |= sub_block(in, s, w, sc, tmp);
            combine_sub(sp, sc, m, w, start + c + s, tmp, u);
            if (sp->out_width == 4) {
                float *o = (float *)out + c + s;
                for (Py_ssize_t j = 0; j < w; j++) {
                    o[j] = tmp[j];
                    out_bad |= (uint32_t)((f32_bits(tmp[j]) & EXP_MASK) == EXP_MASK);
                }
            } else {
                uint16_t *o = (uint16_t *)out + c + s;
                for (Py_ssize_t j = 0; j < w; j++) {
                    uint16_t h = f32_to_bf16(tmp[j]);
                    o[j] = h;
                    out_bad |= (uint32_t)((h & 0x7F80u) == 0x7F80u);
                }
            }
        }
    }
    return bad | (out_bad ? 2 : 0);
}

static PyObject *py_merge(PyObject *self, PyObject *args) {
    PyObject *fds;
    Py_buffer off, wid, thr, last, states, density, mults, weights, outb;
    long long start;
    Py_ssize_t count;
    MergeSpec sp;
    int mode;
    if (!PyArg_ParseTuple(args, SCAN_HEAD "iy*y*w*y*y*y*iiffpfpw*i", &fds, &off, &wid, &start, &count, &mode, &thr,
                          &last, &states, &density, &mults, &weights, &sp.elect, &sp.norm, &sp.div, &sp.lam,
                          &sp.use_lam, &sp.total, &sp.scaled_base, &outb, &sp.out_width))
        return NULL;
    PyObject *out = NULL;
    Inputs in = {.data = NULL};
    Scratch *sc = NULL;
    float *tmp = NULL;
    float(*u)[SUB] = NULL;
    Py_ssize_t m = PyTuple_Check(fds) ? PyTuple_GET_SIZE(fds) - 1 : 0;
    sp.mults = mults.buf;
    sp.weights = weights.buf;
    if (check_range(start, count) < 0 || get_mask(mode, &thr, &last, &states, &density, m, &sp.mask) < 0 ||
        need_len(&mults, 4 * m, "mults") < 0 || need_len(&weights, 4 * m, "weights") < 0)
        goto done;
    if ((sp.out_width != 2 && sp.out_width != 4) || sp.norm < 0 || sp.norm > 2) {
        PyErr_SetString(PyExc_ValueError, "out_width must be 2 or 4 and norm 0, 1 or 2");
        goto done;
    }
    if (need_len(&outb, (Py_ssize_t)sp.out_width * count, "out") < 0 || get_inputs(fds, &off, &wid, &in) < 0) goto done;
    sc = PyMem_RawMalloc(sizeof(Scratch));
    tmp = PyMem_RawMalloc(4 * SUB);
    u = PyMem_RawMalloc(sizeof(float) * SUB * (size_t)m);
    if (!sc || !tmp || !u) {
        PyErr_NoMemory();
        goto done;
    }
    int res;
    Py_BEGIN_ALLOW_THREADS
    res = run_merge(&in, start, count, &sp, sc, tmp, u, outb.buf);
    Py_END_ALLOW_THREADS
    out = res < 0 ? read_error(&in) : PyLong_FromLong(res);
done:
    PyMem_RawFree(sc);
    PyMem_RawFree(tmp);
    PyMem_RawFree(u);
    PyMem_RawFree(in.data);
    Py_buffer *bufs[] = {&off, &wid, &thr, &last, &states, &density, &mults, &weights, &outb};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) PyBuffer_Release(bufs[i]);
    return out;
}

static PyMethodDef methods[] = {
    {"hist", py_hist, METH_VARARGS, "hist(fds, offsets, widths, start, count, hist) -> non-finite flag"},
    {"hist_collect", py_hist_collect, METH_VARARGS,
     "hist_collect(fds, offsets, widths, start, count, hist, wlo, whi, cap, cand_bits, cand_idx, ncand) -> flag"},
    {"cand_cut", py_cand_cut, METH_VARARGS, "cand_cut(bits, idx, count, hi, rank, n) -> (cut bits, last index)"},
    {"low_hist", py_low_hist, METH_VARARGS, "low_hist(fds, offsets, widths, start, count, hi, low) -> flag"},
    {"find_tie", py_find_tie, METH_VARARGS, "find_tie(fds, offsets, widths, start, count, value, need, last, seen)"},
    {"l1", py_l1, METH_VARARGS, "l1(fds, offsets, widths, start, count, mode, thr, last, states, density, sums)"},
    {"mt_seed", py_mt_seed, METH_VARARGS, "mt_seed(state, seed, draws): torch's mt19937 seeded with seed"},
    {"merge", py_merge, METH_VARARGS, "merge(...) -> 1 (tau not finite) | 2 (output not finite)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "Fused merge kernels (rlm.core.merge.fused).",
                                    -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *mod = PyModule_Create(&module);
    if (mod && (PyModule_AddIntConstant(mod, "STATE_WORDS", STATE_WORDS) < 0 ||
                PyModule_AddIntConstant(mod, "MAX_MODELS", MAX_MODELS) < 0)) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
