/* Base64 (RFC 4648, standard alphabet, padded) for the native message paths.
 *
 * ms_b64_decode accepts only canonical base64 -- length a multiple of 4, every
 * character in the alphabet, '=' only as the last one or two, the bits a short
 * last group leaves over zero -- so that whatever it accepts decodes to exactly
 * what binascii.a2b_base64(strict_mode=True) gives; callers hand anything else
 * to that (which may still accept it, or names the error).
 */
#ifndef MEDIASERVER_B64_H
#define MEDIASERVER_B64_H

#include <stddef.h>

static const char ms_b64_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* The value of each base64 character; -1 outside the standard alphabet ('=' included). */
static const signed char ms_b64_values[256] = {
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 62, -1, -1, -1, 63,
    52, 53, 54, 55, 56, 57, 58, 59, 60, 61, -1, -1, -1, -1, -1, -1,
    -1,  0,  1,  2,  3,  4,  5,  6,  7,  8,  9, 10, 11, 12, 13, 14,
    15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, -1, -1, -1, -1, -1,
    -1, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40,
    41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
};

static inline int ms_b64_value(unsigned char c) { return ms_b64_values[c]; }

/* Decoded size of canonical base64 s[0:n]; -1 when its length or padding is not canonical. */
static inline Py_ssize_t ms_b64_decoded_size(const char *s, Py_ssize_t n) {
    Py_ssize_t pad = 0;
    if (n == 0 || n % 4) return -1;
    if (s[n - 1] == '=') pad = s[n - 2] == '=' ? 2 : 1;
    return n / 4 * 3 - pad;
}

/* Decode canonical base64 s[0:n] (size checked by ms_b64_decoded_size) into out; 0 if not canonical. */
static inline int ms_b64_decode(const char *s, Py_ssize_t n, unsigned char *out) {
    Py_ssize_t i, o = 0, full = n - 4;
    int a, b, c, d;
    for (i = 0; i < full; i += 4) {
        a = ms_b64_value((unsigned char)s[i]);
        b = ms_b64_value((unsigned char)s[i + 1]);
        c = ms_b64_value((unsigned char)s[i + 2]);
        d = ms_b64_value((unsigned char)s[i + 3]);
        if ((a | b | c | d) < 0) return 0;
        out[o] = (unsigned char)((a << 2) | (b >> 4));
        out[o + 1] = (unsigned char)(((b & 15) << 4) | (c >> 2));
        out[o + 2] = (unsigned char)(((c & 3) << 6) | d);
        o += 3;
    }
    a = ms_b64_value((unsigned char)s[full]);
    b = ms_b64_value((unsigned char)s[full + 1]);
    if ((a | b) < 0) return 0;
    out[o] = (unsigned char)((a << 2) | (b >> 4));
    if (s[full + 2] == '=')  /* two pad characters */
        return s[full + 3] == '=' && (b & 15) == 0;
    c = ms_b64_value((unsigned char)s[full + 2]);
    if (c < 0) return 0;
    out[o + 1] = (unsigned char)(((b & 15) << 4) | (c >> 2));
    if (s[full + 3] == '=')  /* one pad character */
        return (c & 3) == 0;
    d = ms_b64_value((unsigned char)s[full + 3]);
    if (d < 0) return 0;
    out[o + 2] = (unsigned char)(((c & 3) << 6) | d);
    return 1;
}

/* Standard padded base64 of src[0:n] into dst: 4 * ceil(n / 3) bytes, as binascii.b2a_base64(newline=False). */
static inline void ms_b64_encode(const unsigned char *src, Py_ssize_t n, unsigned char *dst) {
    Py_ssize_t i = 0, o = 0;
    unsigned int v;
    for (; i + 3 <= n; i += 3, o += 4) {
        v = ((unsigned int)src[i] << 16) | ((unsigned int)src[i + 1] << 8) | src[i + 2];
        dst[o] = ms_b64_alphabet[v >> 18];
        dst[o + 1] = ms_b64_alphabet[(v >> 12) & 63];
        dst[o + 2] = ms_b64_alphabet[(v >> 6) & 63];
        dst[o + 3] = ms_b64_alphabet[v & 63];
    }
    if (n - i == 1) {
        v = (unsigned int)src[i] << 16;
        dst[o] = ms_b64_alphabet[v >> 18];
        dst[o + 1] = ms_b64_alphabet[(v >> 12) & 63];
        dst[o + 2] = '=';
        dst[o + 3] = '=';
    } else if (n - i == 2) {
        v = ((unsigned int)src[i] << 16) | ((unsigned int)src[i + 1] << 8);
        dst[o] = ms_b64_alphabet[v >> 18];
        dst[o + 1] = ms_b64_alphabet[(v >> 12) & 63];
        dst[o + 2] = ms_b64_alphabet[(v >> 6) & 63];
        dst[o + 3] = '=';
    }
}

#endif
