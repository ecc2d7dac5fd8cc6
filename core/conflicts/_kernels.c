/* Fused kernels of the task-conflict engine (rlm.core.conflicts.fused) for bf16 and float32 safetensors inputs.
 *
 * Each call reads the stored values of one block of a tensor (the base and M models) from the files
 * themselves, with positioned reads (pread) of READ elements at a time into small buffers that stay in the
 * L2 cache (no memory map, no page-table work, nothing that grows with the model), forms tau exactly as the
 * eager engine does (bf16: float32(theta_m) - float32(theta_base); float32: the difference in float64), and
 * computes every per-block quantity sub-block by sub-block (SUB elements, so the scratch stays in cache):
 *
 *   stats_block  sum tau^2 per model; sum tau_a*tau_b and sum (tau_a*tau_b)^2 over tau_a*tau_b < 0 per pair
 *                (products of float32 tau formed in float64, which is exact; all sums in float64);
 *                #{|tau| > t} per model and threshold; the histogram of magnitude bins (top bits of the
 *                float32 pattern of |tau|) and the range of non-zero bins seen.
 *   topk_block   per pair, counts of (first kept rate of a, first kept rate of b, opposite signs) codes, the
 *                first kept rate of a position read off a per-model table bin -> first kept rate.
 *
 * Python (rlm.core.conflicts.fused) checks dtypes and shapes; the C side checks every buffer length, index
 * and table entry against what it will touch and raises ValueError instead of reading or writing out of
 * bounds, OSError / EOFError when a read fails. The GIL is released while computing, so several tensors run
 * on several threads. Scattered updates of coarse histograms and of joint counts go to 4 interleaved copies
 * so that repeated bins do not wait on one counter; the caller sums them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>

#include "../_kernels_io.h"

#define SUB 2048
#define READ (32 * SUB) /* elements read per input at a time: 128 KiB of bf16 */
#define ABS_MASK 0x7FFFFFFFu
#define SIGN_MASK 0x80000000u

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HOT
#endif

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}


/* ---------------------------------------------------------------------------------------------------- */
/* buffers                                                                                                */
/* ---------------------------------------------------------------------------------------------------- */

/* The inputs of one call: file descriptors and byte offsets of the block's data, base first. */
typedef struct {
    Py_ssize_t n;      /* number of inputs (base + models) */
    int fd[65];
    int64_t offset[65];
    char *data;        /* n buffers of READ elements */
    int width;         /* bytes per element: 2 (bf16) or 4 (float32) */
    int err;           /* errno of a failed read, or -1: the file ended before the block */
    Py_ssize_t failed; /* input whose read failed */
} Inputs;

static int get_inputs(PyObject *fds, Py_buffer *offsets, int width, Inputs *in) {
    in->data = NULL;
    in->width = width;
    if (width != 2 && width != 4) {
        PyErr_SetString(PyExc_ValueError, "width must be 2 (bf16) or 4 (float32)");
        return -1;
    }
    in->err = 0;
    in->failed = -1;
    if (!PyTuple_Check(fds) || PyTuple_GET_SIZE(fds) < 2 || PyTuple_GET_SIZE(fds) > 65) {
        PyErr_SetString(PyExc_ValueError, "fds must be a tuple of 2 to 65 file descriptors (base first)");
        return -1;
    }
    in->n = PyTuple_GET_SIZE(fds);
    if (offsets->len != 8 * in->n) {
        PyErr_Format(PyExc_ValueError, "offsets has %zd bytes, expected %zd", offsets->len, 8 * in->n);
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
        if (in->offset[i] < 0) {
            PyErr_Format(PyExc_ValueError, "offsets[%zd] is negative", i);
            return -1;
        }
    }
    in->data = PyMem_RawMalloc((size_t)width * READ * in->n);
    if (!in->data) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Read elements [start, start + count) of every input into its buffer (GIL released); 0 or -1 on error. */
static int read_inputs(Inputs *in, Py_ssize_t start, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < in->n; i++) {
        int err = pread_full(in->fd[i], in->data + (size_t)in->width * READ * i, (size_t)in->width * (size_t)count,
                             (off_t)(in->offset[i] + in->width * (int64_t)start));
        if (err) {
            in->err = err;
            in->failed = i;
            return -1;
        }
    }
    return 0;
}

static inline const uint16_t *row16(const Inputs *in, Py_ssize_t i, Py_ssize_t s) {
    return (const uint16_t *)(in->data + (size_t)2 * READ * i) + s;
}

static inline const float *row32(const Inputs *in, Py_ssize_t i, Py_ssize_t s) {
    return (const float *)(in->data + (size_t)4 * READ * i) + s;
}

static PyObject *read_error(Inputs *in) {
    if (in->err > 0) {
        errno = in->err;
        PyErr_SetFromErrno(PyExc_OSError);
    } else
        PyErr_Format(PyExc_EOFError, "input %zd ends before the block's data", in->failed);
    return NULL;
}

static int check_pairs(const int64_t *pairs, Py_ssize_t n_pairs, Py_ssize_t n_models) {
    for (Py_ssize_t q = 0; q < 2 * n_pairs; q++)
        if (pairs[q] < 0 || pairs[q] >= n_models) {
            PyErr_Format(PyExc_ValueError, "pair index %lld out of range for %zd models", (long long)pairs[q],
                         n_models);
            return -1;
        }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------- */
/* pass 1: sums, counts above thresholds, magnitude histograms                                             */
/* ---------------------------------------------------------------------------------------------------- */

HOT static double model_sums(const uint16_t *x, const float *bf, Py_ssize_t w, float *tau, uint32_t *mag,
                             uint32_t lim, int64_t *count) {
    double acc = 0.0;
    int64_t c = 0;
#pragma omp simd reduction(+ : acc, c)
    for (Py_ssize_t i = 0; i < w; i++) {
        float t = bf16_to_f32(x[i]) - bf[i];
        uint32_t u = f32_bits(t) & ABS_MASK;
        tau[i] = t;
        mag[i] = u;
        acc += (double)t * (double)t;
        c += u > lim;
    }
    *count = c;
    return acc;
}

HOT static int64_t count_above(const uint32_t *mag, Py_ssize_t w, uint32_t lim) {
    int64_t c = 0;
#pragma omp simd reduction(+ : c)
    for (Py_ssize_t i = 0; i < w; i++) c += mag[i] > lim;
    return c;
}

HOT static void histogram(const uint32_t *mag, Py_ssize_t w, unsigned shift, int32_t *hist, Py_ssize_t stride,
                          int copies, uint32_t *scratch, int64_t *lohi) {
    uint32_t lo = (uint32_t)lohi[0], hi = (uint32_t)lohi[1];
#pragma omp simd reduction(min : lo) reduction(max : hi)
    for (Py_ssize_t i = 0; i < w; i++) {
        uint32_t b = mag[i] >> shift;
        scratch[i] = b;
        hi = b > hi ? b : hi;
        uint32_t nz = b ? b : 0xFFFFFFFFu;
        lo = nz < lo ? nz : lo;
    }
    int32_t *h0 = hist, *h1 = hist + stride, *h2 = hist + 2 * stride, *h3 = hist + 3 * stride;
    Py_ssize_t w4 = w & ~(Py_ssize_t)3, i = 0;
    if (copies == 4) /* few, often repeated bins: spread them so that increments do not wait on each other */
        for (; i < w4; i += 4) {
            h0[scratch[i]]++;
            h1[scratch[i + 1]]++;
            h2[scratch[i + 2]]++;
            h3[scratch[i + 3]]++;
        }
    for (; i < w; i++) h0[scratch[i]]++;
    lohi[0] = lo;
    lohi[1] = hi;
}

HOT static void pair_sums(const float *ta, const float *tb, Py_ssize_t w, double *out) {
    double dsum = 0.0, csum = 0.0;
#pragma omp simd reduction(+ : dsum, csum)
    for (Py_ssize_t i = 0; i < w; i++) {
        double p = (double)ta[i] * (double)tb[i];
        dsum += p;
        csum += p < 0.0 ? p * p : 0.0;
    }
    out[0] += dsum;
    out[1] += csum;
}

/* float32 inputs: tau in float64 (as the eager engine forms it for them), |tau| > t compared in float64,
   magnitude bins from float32(|tau|) */
HOT static double model_sums_f32(const float *x, const float *b, Py_ssize_t w, double *tau, uint32_t *mag,
                                 double lim, int64_t *count) {
    double acc = 0.0;
    int64_t c = 0;
#pragma omp simd reduction(+ : acc, c)
    for (Py_ssize_t i = 0; i < w; i++) {
        double t = (double)x[i] - (double)b[i];
        double a = t < 0.0 ? -t : t;
        tau[i] = t;
        mag[i] = f32_bits((float)a) & ABS_MASK;
        acc += t * t;
        c += a > lim;
    }
    *count = c;
    return acc;
}

HOT static int64_t count_above_f64(const double *tau, Py_ssize_t w, double lim) {
    int64_t c = 0;
#pragma omp simd reduction(+ : c)
    for (Py_ssize_t i = 0; i < w; i++) c += (tau[i] < 0.0 ? -tau[i] : tau[i]) > lim;
    return c;
}

HOT static void pair_sums_f64(const double *ta, const double *tb, Py_ssize_t w, double *out) {
    double dsum = 0.0, csum = 0.0;
#pragma omp simd reduction(+ : dsum, csum)
    for (Py_ssize_t i = 0; i < w; i++) {
        double p = ta[i] * tb[i];
        dsum += p;
        csum += p < 0.0 ? p * p : 0.0;
    }
    out[0] += dsum;
    out[1] += csum;
}

HOT static void bf_row(const uint16_t *base, Py_ssize_t w, float *bf) {
    for (Py_ssize_t i = 0; i < w; i++) bf[i] = bf16_to_f32(base[i]);
}

PyDoc_STRVAR(stats_block_doc,
"stats_block(fds, offsets, n, pairs, above_bits, shift, hist, stride, copies, ss, pair, above, lohi,\n"
"            width=2, above_values=None)\n\n"
"Accumulate the first-pass sums of one block of n elements, read from the files fds (base first, then M models)\n"
"at byte offsets (int64[M + 1]); width 2: bf16 (tau in float32), 4: float32 (tau in float64). pairs:\n"
"int64[P, 2]; above_bits: uint32[K] (bf16: |tau| > t  <=>  bits(|tau|) > above_bits[k]); above_values:\n"
"float64[K], the thresholds themselves (float32 inputs); shift: 32 - bits; hist: int32[M, copies, stride] (stride 0: no histogram; copies 1, or 4\n"
"interleaved copies for coarse bins, summed by the caller); ss: float64[M]; pair: float64[P, 2]; above:\n"
"int64[M, K]; lohi: int64[M, 2] smallest and largest non-zero bin. OSError / EOFError when a read fails.");

/* long: a Python entry point: parses, checks and releases nine buffers around one read loop whose two
   branches (bf16, float32) call the HOT helpers above; split, every buffer would travel through the pieces */
static PyObject *stats_block(PyObject *self, PyObject *args) {
    Py_buffer offsets, pairs, above_bits, hist, ss, pair, above, lohi, above_values = {0};
    PyObject *fds;
    Py_ssize_t n, stride;
    unsigned shift;
    int copies, width = 2;
    if (!PyArg_ParseTuple(args, "Oy*ny*y*Iw*niw*w*w*w*|iy*", &fds, &offsets, &n, &pairs, &above_bits, &shift, &hist,
                          &stride, &copies, &ss, &pair, &above, &lohi, &width, &above_values))
        return NULL;
    PyObject *result = NULL;
    Inputs in;
    in.data = NULL;
    float *scratch_f = NULL;
    uint32_t *scratch_u = NULL;
    if (get_inputs(fds, &offsets, width, &in) < 0) goto done;
    Py_ssize_t m = in.n - 1, n_pairs = pairs.len / 16, n_thr = above_bits.len / 4;
    if (n < 0 || shift < 1 || shift > 31 || (copies != 1 && copies != 4)) {
        PyErr_SetString(PyExc_ValueError, "stats_block: bad n, shift or copies");
        goto done;
    }
    if (width == 4 && above_values.len != 8 * n_thr) {
        PyErr_SetString(PyExc_ValueError, "stats_block: float32 inputs need above_values, one per above_bits");
        goto done;
    }
    Py_ssize_t n_bins = (Py_ssize_t)(ABS_MASK >> shift) + 1;
    if (stride && stride < n_bins) {
        PyErr_Format(PyExc_ValueError, "histogram rows of %zd entries cannot hold %zd bins", stride, n_bins);
        goto done;
    }
    if (need_len(&hist, (Py_ssize_t)sizeof(int32_t) * m * copies * stride, "hist") < 0 ||
        need_len(&ss, 8 * m, "ss") < 0 || need_len(&pair, 16 * n_pairs, "pair") < 0 ||
        need_len(&above, 8 * m * n_thr, "above") < 0 || need_len(&lohi, 16 * m, "lohi") < 0 ||
        check_pairs((const int64_t *)pairs.buf, n_pairs, m) < 0)
        goto done;
    scratch_f = PyMem_RawMalloc(sizeof(double) * SUB * (m + 1)); /* tau: float32, or float64 for float32 inputs */
    scratch_u = PyMem_RawMalloc(sizeof(uint32_t) * SUB * (m + 1));
    if (!scratch_f || !scratch_u) {
        PyErr_NoMemory();
        goto done;
    }
    {
        const int64_t *pr = (const int64_t *)pairs.buf;
        const uint32_t *lims = (const uint32_t *)above_bits.buf;
        const double *limd = width == 4 ? (const double *)above_values.buf : NULL;
        double *tau64 = (double *)scratch_f;
        int32_t *h = (int32_t *)hist.buf;
        double *ssv = (double *)ss.buf, *pv = (double *)pair.buf;
        int64_t *ab = (int64_t *)above.buf, *lh = (int64_t *)lohi.buf;
        float *bf = scratch_f + SUB * m;
        uint32_t *bins = scratch_u + SUB * m;
        int failed = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < n; r += READ) {
            Py_ssize_t count = n - r < READ ? n - r : READ;
            if (read_inputs(&in, r, count) < 0) {
                failed = 1;
                break;
            }
            for (Py_ssize_t s = 0; s < count; s += SUB) {
                Py_ssize_t w = count - s < SUB ? count - s : SUB;
                if (width == 4) {
                    for (Py_ssize_t j = 0; j < m; j++) {
                        uint32_t *mag = scratch_u + SUB * j;
                        int64_t c0 = 0;
                        ssv[j] += model_sums_f32(row32(&in, j + 1, s), row32(&in, 0, s), w, tau64 + SUB * j, mag,
                                                 n_thr ? limd[0] : HUGE_VAL, &c0);
                        if (n_thr) ab[j * n_thr] += c0;
                        for (Py_ssize_t k = 1; k < n_thr; k++)
                            ab[j * n_thr + k] += count_above_f64(tau64 + SUB * j, w, limd[k]);
                        if (stride) histogram(mag, w, shift, h + j * copies * stride, stride, copies, bins, lh + 2 * j);
                    }
                    for (Py_ssize_t q = 0; q < n_pairs; q++)
                        pair_sums_f64(tau64 + SUB * pr[2 * q], tau64 + SUB * pr[2 * q + 1], w, pv + 2 * q);
                    continue;
                }
                bf_row(row16(&in, 0, s), w, bf);
                for (Py_ssize_t j = 0; j < m; j++) {
                    const uint16_t *x = row16(&in, j + 1, s);
                    float *tau = scratch_f + SUB * j;
                    uint32_t *mag = scratch_u + SUB * j;
                    int64_t c0 = 0;
                    ssv[j] += model_sums(x, bf, w, tau, mag, n_thr ? lims[0] : 0xFFFFFFFFu, &c0);
                    if (n_thr) ab[j * n_thr] += c0;
                    for (Py_ssize_t k = 1; k < n_thr; k++) ab[j * n_thr + k] += count_above(mag, w, lims[k]);
                    if (stride) histogram(mag, w, shift, h + j * copies * stride, stride, copies, bins, lh + 2 * j);
                }
                for (Py_ssize_t q = 0; q < n_pairs; q++)
                    pair_sums(scratch_f + SUB * pr[2 * q], scratch_f + SUB * pr[2 * q + 1], w, pv + 2 * q);
            }
        }
        Py_END_ALLOW_THREADS
        if (failed) {
            read_error(&in);
            goto done;
        }
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_RawFree(scratch_f);
    PyMem_RawFree(scratch_u);
    PyMem_RawFree(in.data);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&pairs);
    PyBuffer_Release(&above_bits);
    PyBuffer_Release(&hist);
    PyBuffer_Release(&ss);
    PyBuffer_Release(&pair);
    PyBuffer_Release(&above);
    PyBuffer_Release(&lohi);
    if (above_values.obj) PyBuffer_Release(&above_values);
    return result;
}

PyDoc_STRVAR(fold_histogram_doc,
"fold_histogram(hist, stride, lo, hi, seg, glob) -> zeros\n\n"
"Sum the copies of one model's per-tensor histogram (int32[copies, stride], copies = len(hist) / stride) over bin 0\n"
"and bins lo..hi: bins lo..hi into seg (int64[hi - lo + 1]) and into glob (int64, the model's global\n"
"histogram; empty: not kept), bin 0 into glob[0] and the return value; zero those entries for the next tensor.");

static PyObject *fold_histogram(PyObject *self, PyObject *args) {
    Py_buffer hist, seg, glob;
    Py_ssize_t stride, lo, hi;
    if (!PyArg_ParseTuple(args, "w*nnnw*w*", &hist, &stride, &lo, &hi, &seg, &glob)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t width = hi >= lo ? hi - lo + 1 : 0;
    if (lo < 1 || (width && hi >= stride)) {
        PyErr_Format(PyExc_ValueError, "bin range [%zd, %zd] outside histogram rows of %zd", lo, hi, stride);
        goto done;
    }
    Py_ssize_t copies = stride > 0 ? hist.len / (Py_ssize_t)sizeof(int32_t) / stride : 0;
    if (copies < 1) {
        PyErr_SetString(PyExc_ValueError, "fold_histogram: empty histogram");
        goto done;
    }
    if (need_len(&seg, 8 * width, "seg") < 0 ||
        (glob.len && need_len(&glob, 8 * (width ? hi + 1 : 1), "glob") < 0))
        goto done;
    {
        int32_t *h = (int32_t *)hist.buf;
        int64_t *sg = (int64_t *)seg.buf, *gl = glob.len ? (int64_t *)glob.buf : NULL, zeros = 0;
        memset(sg, 0, 8 * width);
        for (Py_ssize_t c = 0; c < copies; c++) {
            int32_t *row = h + c * stride;
            zeros += row[0];
            row[0] = 0;
            for (Py_ssize_t b = lo; b <= hi; b++) {
                sg[b - lo] += row[b];
                row[b] = 0;
            }
        }
        if (gl) {
            gl[0] += zeros;
            for (Py_ssize_t b = lo; b <= hi; b++) gl[b] += sg[b - lo];
        }
        result = PyLong_FromLongLong(zeros);
    }
done:
    PyBuffer_Release(&hist);
    PyBuffer_Release(&seg);
    PyBuffer_Release(&glob);
    return result;
}

/* ---------------------------------------------------------------------------------------------------- */
/* pass 2: joint top-k counts                                                                              */
/* ---------------------------------------------------------------------------------------------------- */

PyDoc_STRVAR(first_kept_table_doc,
"first_kept_table(thr, n_scopes, lo, hi, table, itemsize)\n\n"
"Fill table (uint8 / uint16 / int32 by itemsize, at least hi - lo + 3 entries, lo >= 1) with the first-kept\n"
"entry of every magnitude bin: entry b - lo + 1 for bin b in [lo, hi]; every other entry says 'never kept',\n"
"which is what bin 0 finds (entry 0 when lo == 1, else the last entry). thr: int32[S, g] threshold bins of S\n"
"scopes, each >= 1 and non-increasing in the kept rate; the entry of bin b is sum_s first_s(b) * G^(S-1-s)\n"
"with first_s(b) = #{k: b < thr[s, k]} and G = g + 1.");

static void put(void *table, int itemsize, Py_ssize_t i, int64_t v) {
    if (itemsize == 1) ((uint8_t *)table)[i] = (uint8_t)v;
    else if (itemsize == 2) ((uint16_t *)table)[i] = (uint16_t)v;
    else ((int32_t *)table)[i] = (int32_t)v;
}

static PyObject *first_kept_table(PyObject *self, PyObject *args) {
    Py_buffer thr, table;
    Py_ssize_t n_scopes, lo, hi;
    int itemsize;
    if (!PyArg_ParseTuple(args, "y*nnnw*i", &thr, &n_scopes, &lo, &hi, &table, &itemsize)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t total = thr.len / 4, g = n_scopes > 0 ? total / n_scopes : 0;
    if (n_scopes < 1 || g < 1 || g * n_scopes * 4 != thr.len || lo < 1 ||
        (itemsize != 1 && itemsize != 2 && itemsize != 4)) {
        PyErr_SetString(PyExc_ValueError, "first_kept_table: bad thresholds, lo or itemsize");
        goto done;
    }
    int64_t span = 1;
    for (Py_ssize_t s = 0; s < n_scopes; s++) span *= g + 1;
    if ((itemsize == 1 && span > 256) || (itemsize == 2 && span > 65536) || span > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "first_kept_table: entries do not fit the table's item size");
        goto done;
    }
    Py_ssize_t len = table.len / itemsize, width = hi >= lo ? hi - lo + 1 : 0;
    if (len < width + 2) {
        PyErr_Format(PyExc_ValueError, "table of %zd entries cannot hold bins [%zd, %zd]", len, lo, hi);
        goto done;
    }
    {
        const int32_t *t = (const int32_t *)thr.buf;
        for (Py_ssize_t s = 0; s < n_scopes; s++)
            for (Py_ssize_t k = 1; k < g; k++)
                if (t[s * g + k] > t[s * g + k - 1]) {
                    PyErr_SetString(PyExc_ValueError, "first_kept_table: thresholds must not increase");
                    goto done;
                }
        int64_t never = span - 1;
        put(table.buf, itemsize, 0, never);
        for (Py_ssize_t i = width + 1; i < len; i++) put(table.buf, itemsize, i, never);
        /* first_s(b) = #{k: b < thr[s, k]} only drops where b reaches a threshold: walk the bins upwards with
           one pointer per scope into its thresholds (ascending from the last kept rate) */
        Py_ssize_t ptr[64];
        int64_t first[64];
        if (n_scopes > 64) {
            PyErr_SetString(PyExc_ValueError, "first_kept_table: at most 64 scopes");
            goto done;
        }
        for (Py_ssize_t s = 0; s < n_scopes; s++) {
            ptr[s] = g - 1;  /* thr[s, ptr] is the smallest threshold not yet passed */
            first[s] = g;
        }
        for (Py_ssize_t b = lo; b <= hi; b++) {
            int64_t v = 0;
            for (Py_ssize_t s = 0; s < n_scopes; s++) {
                while (ptr[s] >= 0 && b >= t[s * g + ptr[s]]) {
                    ptr[s]--;
                    first[s]--;
                }
                v = v * (g + 1) + first[s];
            }
            put(table.buf, itemsize, b - lo + 1, v);
        }
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&thr);
    PyBuffer_Release(&table);
    return result;
}

/* table index (bin - lo + 1 in unsigned arithmetic, clamped to the last entry: bin 0 wraps around and lands
   there, or on entry 0 when lo == 1) with tau's sign in bit 31 */
HOT static void table_index_f32(const float *x, const float *b, Py_ssize_t w, unsigned shift, uint32_t offset,
                                uint32_t last, uint32_t *index) {
#pragma omp simd
    for (Py_ssize_t i = 0; i < w; i++) {
        uint32_t u = f32_bits((float)((double)x[i] - (double)b[i]));
        uint32_t k = ((u & ABS_MASK) >> shift) - offset;
        index[i] = (k < last ? k : last) | (u & SIGN_MASK);
    }
}

HOT static void table_index(const uint16_t *x, const float *bf, Py_ssize_t w, unsigned shift, uint32_t offset,
                            uint32_t last, uint32_t *index) {
#pragma omp simd
    for (Py_ssize_t i = 0; i < w; i++) {
        uint32_t u = f32_bits(bf16_to_f32(x[i]) - bf[i]);
        uint32_t k = ((u & ABS_MASK) >> shift) - offset;
        index[i] = (k < last ? k : last) | (u & SIGN_MASK);
    }
}

#define JOINT_COUNT(NAME, T)                                                                                  \
    HOT static void NAME(const uint32_t *ia, const uint32_t *ib, const T *ta, const T *tb, int64_t span,      \
                         Py_ssize_t w, int64_t *counts, Py_ssize_t len) {                                     \
        int64_t *c0 = counts, *c1 = counts + len, *c2 = counts + 2 * len, *c3 = counts + 3 * len;             \
        Py_ssize_t w4 = w & ~(Py_ssize_t)3, i = 0;                                                            \
        for (; i < w4; i += 4) {                                                                              \
            c0[(((int64_t)ta[ia[i] & ABS_MASK] * span + tb[ib[i] & ABS_MASK]) << 1) + ((ia[i] ^ ib[i]) >> 31)]++; \
            c1[(((int64_t)ta[ia[i + 1] & ABS_MASK] * span + tb[ib[i + 1] & ABS_MASK]) << 1) +                 \
               ((ia[i + 1] ^ ib[i + 1]) >> 31)]++;                                                            \
            c2[(((int64_t)ta[ia[i + 2] & ABS_MASK] * span + tb[ib[i + 2] & ABS_MASK]) << 1) +                 \
               ((ia[i + 2] ^ ib[i + 2]) >> 31)]++;                                                            \
            c3[(((int64_t)ta[ia[i + 3] & ABS_MASK] * span + tb[ib[i + 3] & ABS_MASK]) << 1) +                 \
               ((ia[i + 3] ^ ib[i + 3]) >> 31)]++;                                                            \
        }                                                                                                     \
        for (; i < w; i++)                                                                                    \
            c0[(((int64_t)ta[ia[i] & ABS_MASK] * span + tb[ib[i] & ABS_MASK]) << 1) + ((ia[i] ^ ib[i]) >> 31)]++; \
    }

JOINT_COUNT(joint_count_u8, uint8_t)
JOINT_COUNT(joint_count_u16, uint16_t)
JOINT_COUNT(joint_count_i32, int32_t)

/* largest entry of a table (int32 entries count as unsigned, so negative ones are caught too) */
HOT static uint32_t table_max(const void *table, int itemsize, Py_ssize_t n) {
    uint32_t mx = 0;
    if (itemsize == 1) {
        const uint8_t *t = table;
#pragma omp simd reduction(max : mx)
        for (Py_ssize_t i = 0; i < n; i++) mx = t[i] > mx ? t[i] : mx;
    } else if (itemsize == 2) {
        const uint16_t *t = table;
#pragma omp simd reduction(max : mx)
        for (Py_ssize_t i = 0; i < n; i++) mx = t[i] > mx ? t[i] : mx;
    } else {
        const uint32_t *t = table;
#pragma omp simd reduction(max : mx)
        for (Py_ssize_t i = 0; i < n; i++) mx = t[i] > mx ? t[i] : mx;
    }
    return mx;
}

PyDoc_STRVAR(topk_block_doc,
"topk_block(fds, offsets, n, shift, lo, tables, itemsize, pairs, span, joint, width=2)\n\n"
"Accumulate joint top-k counts of one block of n elements read as in stats_block. lo: int64[M] first non-zero\n"
"bin of each model's table; tables: [M, T] from first_kept_table (all entries < span); joint: int64[P, 4,\n"
"span^2 * 2] counts of (entry_a * span + entry_b) * 2 + opposite_signs in 4 interleaved copies (the caller\n"
"sums them).");

/* long: a Python entry point: parses, checks and releases its buffers around one read loop; split, every
   buffer would travel through the pieces */
static PyObject *topk_block(PyObject *self, PyObject *args) {
    Py_buffer offsets, lo_buf, tables, pairs, joint;
    PyObject *fds;
    Py_ssize_t n;
    unsigned shift;
    int itemsize;
    long long span;
    int width = 2;
    if (!PyArg_ParseTuple(args, "Oy*nIy*y*iy*Lw*|i", &fds, &offsets, &n, &shift, &lo_buf, &tables, &itemsize, &pairs,
                          &span, &joint, &width))
        return NULL;
    PyObject *result = NULL;
    Inputs in;
    in.data = NULL;
    uint32_t *index = NULL;
    if (get_inputs(fds, &offsets, width, &in) < 0) goto done;
    Py_ssize_t m = in.n - 1, n_pairs = pairs.len / 16;
    if (n < 0 || shift < 1 || shift > 31 || (itemsize != 1 && itemsize != 2 && itemsize != 4) || span < 1 ||
        span > 65536) {
        PyErr_SetString(PyExc_ValueError, "topk_block: bad n, shift, itemsize or span");
        goto done;
    }
    Py_ssize_t t_len = tables.len / itemsize / m, len = (Py_ssize_t)(span * span * 2);
    if (t_len < 2 || t_len * m * itemsize != tables.len || need_len(&lo_buf, 8 * m, "lo") < 0 ||
        need_len(&joint, 8 * 4 * len * n_pairs, "joint") < 0 || check_pairs((const int64_t *)pairs.buf, n_pairs, m) < 0)
        goto done;
    if (table_max(tables.buf, itemsize, t_len * m) >= span) { /* every entry must be a valid digit */
        PyErr_Format(PyExc_ValueError, "table entry %lld outside [0, %lld)",
                     (long long)table_max(tables.buf, itemsize, t_len * m), span);
        goto done;
    }
    index = PyMem_RawMalloc(sizeof(uint32_t) * SUB * m + sizeof(float) * SUB);
    if (!index) {
        PyErr_NoMemory();
        goto done;
    }
    {
        const int64_t *lo = (const int64_t *)lo_buf.buf, *pr = (const int64_t *)pairs.buf;
        const char *tb = (const char *)tables.buf;
        int64_t *jc = (int64_t *)joint.buf;
        float *bf = (float *)(index + SUB * m);
        int failed = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < n; r += READ) {
            Py_ssize_t count = n - r < READ ? n - r : READ;
            if (read_inputs(&in, r, count) < 0) {
                failed = 1;
                break;
            }
            for (Py_ssize_t s = 0; s < count; s += SUB) {
                Py_ssize_t w = count - s < SUB ? count - s : SUB;
                if (width == 4)
                    for (Py_ssize_t j = 0; j < m; j++)
                        table_index_f32(row32(&in, j + 1, s), row32(&in, 0, s), w, shift, (uint32_t)(lo[j] - 1),
                                        (uint32_t)(t_len - 1), index + SUB * j);
                else {
                    bf_row(row16(&in, 0, s), w, bf);
                    for (Py_ssize_t j = 0; j < m; j++)
                        table_index(row16(&in, j + 1, s), bf, w, shift, (uint32_t)(lo[j] - 1), (uint32_t)(t_len - 1),
                                    index + SUB * j);
                }
                for (Py_ssize_t q = 0; q < n_pairs; q++) {
                    Py_ssize_t a = pr[2 * q], b = pr[2 * q + 1];
                    const char *ta = tb + a * t_len * itemsize, *tbb = tb + b * t_len * itemsize;
                    int64_t *c = jc + q * 4 * len;
                    if (itemsize == 1)
                        joint_count_u8(index + SUB * a, index + SUB * b, (const uint8_t *)ta, (const uint8_t *)tbb,
                                       span, w, c, len);
                    else if (itemsize == 2)
                        joint_count_u16(index + SUB * a, index + SUB * b, (const uint16_t *)ta, (const uint16_t *)tbb,
                                        span, w, c, len);
                    else
                        joint_count_i32(index + SUB * a, index + SUB * b, (const int32_t *)ta, (const int32_t *)tbb,
                                        span, w, c, len);
                }
            }
        }
        Py_END_ALLOW_THREADS
        if (failed) {
            read_error(&in);
            goto done;
        }
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_RawFree(index);
    PyMem_RawFree(in.data);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&lo_buf);
    PyBuffer_Release(&tables);
    PyBuffer_Release(&pairs);
    PyBuffer_Release(&joint);
    return result;
}

static PyMethodDef methods[] = {
    {"stats_block", stats_block, METH_VARARGS, stats_block_doc},
    {"fold_histogram", fold_histogram, METH_VARARGS, fold_histogram_doc},
    {"first_kept_table", first_kept_table, METH_VARARGS, first_kept_table_doc},
    {"topk_block", topk_block, METH_VARARGS, topk_block_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "Fused kernels of the task-conflict engine (see rlm.core.conflicts.fused).", -1, methods,
};

PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *mod = PyModule_Create(&module);
    if (mod && (PyModule_AddIntConstant(mod, "SUB", SUB) < 0 || PyModule_AddIntConstant(mod, "READ", READ) < 0)) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
